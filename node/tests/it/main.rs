//! End-to-end tests: the real `keel` binary as a process on loopback, driven by real clients
//! (etcdctl 3.4 from Debian's etcd-client, the `etcd-client` crate, raw gRPC).

mod harness;

mod cas;
mod client;
mod concurrency;
mod config;
mod crash;
mod differential;
mod errors;
mod etcdctl;
mod kube;
mod lease;
mod range_stream;
mod recovery;
mod snapshot;
mod wal_io;
mod watch;
