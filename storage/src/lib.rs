//! Keel storage: the write-ahead log (O_DIRECT, io_uring), the raft log store built on it
//! (`raft::Storage`), and the MVCC key-value state with etcd's revision semantics.
//!
//! No tonic, no tokio: this crate is driven by the node's raft core thread and read by the
//! net cores through `Mvcc`'s concurrent read API.

pub mod backend;
pub mod bolt;
pub mod error;
pub mod etcdfmt;
pub mod mapped;
pub mod mvcc;
pub mod raftlog;
pub mod store;
pub mod transfer;
pub mod wal;

pub use error::{Error, Result};

/// A test's case count from the environment (`name`), else `default`: CI runs the default,
/// scripts/fuzz-smoke.sh many more.
#[cfg(test)]
pub(crate) fn test_cases(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
