//! Keel's network edge: the etcd v3 gRPC services, request validation with etcd's exact
//! errors, and the per-core listeners. It sees the node through the `Backend` trait only.

pub mod authority;
pub mod backend;
pub mod coalesce;
pub mod concurrency;
pub mod error;
pub mod lease;
pub mod peer;
pub mod range;
pub mod serve;
pub mod service;
pub mod unserved;
pub mod validate;
pub mod watch;
pub mod written;

pub use backend::{
    Backend, Limits, ObserveResponses, RangeChunks, SnapshotChunks, WatchRequests, WatchResponses,
    WriteRequest, WriteResponse, GRPC_OVERHEAD_BYTES,
};
pub use error::ApiError;
pub use range::RangeOut;
pub use watch::WatchOut;
