//! Storage errors. `Corrupted` (bad bytes on disk, detected by checksum or framing) is kept
//! apart from `Io` (the OS said no), because an operator must treat them differently: the first
//! means the data dir cannot be trusted, the second may be a full disk or a permission.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("wal corrupted: {path} at offset {offset}: {reason}")]
    Corrupted {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    #[error("mvcc: required revision is a future revision")]
    FutureRev,
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches the operation and path to an I/O error.
pub(crate) trait IoContext<T> {
    fn io_ctx(self, op: &'static str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io_ctx(self, op: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        })
    }
}
