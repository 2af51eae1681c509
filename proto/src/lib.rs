//! The etcd v3 API as Rust types (prost) and gRPC stubs (tonic), plus Keel's raft entry
//! format. No logic lives here.

#![allow(clippy::all)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}
pub mod authpb {
    tonic::include_proto!("authpb");
}
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}
pub mod keelpb {
    tonic::include_proto!("keelpb");
}

pub mod codec;

pub use etcdserverpb as pb;
pub use prost;
