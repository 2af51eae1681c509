//! Installing a whole state sent by the leader (raft's snapshot), crash-safe.
//!
//! 1. The receiver writes the state to `keel.db.incoming.{index}.{term}` and checks it whole
//!    (count, CRC, the entry it ends with).
//! 2. Once raft accepts it: rename to `keel.db.installing` (synced): a complete state that
//!    is not in effect yet.
//! 3. A SNAPSHOT record in the WAL (synced): from here the log starts after that state.
//! 4. Rename over `keel.db` (synced), and the process starts over (exec) on it: the key
//!    index, leases, watchers and members all come from the new backend as at any start.
//!
//! At start: a WAL whose snapshot is ahead of the backend finds `keel.db.installing` and
//! finishes step 4; an `installing` file the WAL does not know of (a crash before step 3)
//! and any `incoming` files are deleted.

use std::path::{Path, PathBuf};

use anyhow::Context;

pub struct Paths {
    pub db: PathBuf,
    pub installing: PathBuf,
}

impl Paths {
    pub fn new(db: &Path) -> Paths {
        Paths {
            db: db.to_path_buf(),
            installing: db.with_extension("db.installing"),
        }
    }

    fn sync_dir(&self) -> anyhow::Result<()> {
        let dir = self.db.parent().context("backend path has a directory")?;
        keel_storage::wal::sync_dir(dir).context("sync the backend directory")
    }

    /// Where a state that ends with entry `point` (index, term) is received.
    pub fn incoming(&self, point: (u64, u64)) -> PathBuf {
        self.db
            .with_extension(format!("db.incoming.{}.{}", point.0, point.1))
    }

    /// Step 2: the state received for `point` (at `from`) becomes the one to install.
    pub fn stage(&self, from: &Path, point: (u64, u64)) -> anyhow::Result<()> {
        anyhow::ensure!(
            *from == self.incoming(point) && from.exists(),
            "raft accepted a state ending at {point:?} that was never received"
        );
        std::fs::rename(from, &self.installing).context("rename incoming state")?;
        self.sync_dir()
    }

    /// Deletes every received state not installed.
    fn clear_incoming(&self) {
        let (Some(dir), Some(name)) = (self.db.parent(), self.db.file_name()) else {
            return;
        };
        let prefix = format!("{}.incoming", name.to_string_lossy());
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Step 4: the staged state replaces the backend.
    pub fn switch(&self) -> anyhow::Result<()> {
        std::fs::rename(&self.installing, &self.db).context("rename installing state")?;
        self.sync_dir()
    }

    /// At start: whether the WAL (whose installed snapshot ends at `wal_snapshot`) needs the
    /// staged state switched in because the backend (at `backend`) is behind it. Clears what
    /// a crash left half-way.
    pub fn recover(&self, wal_snapshot: Option<u64>, backend: u64) -> anyhow::Result<bool> {
        self.clear_incoming();
        let behind = wal_snapshot.is_some_and(|s| s > backend);
        if behind {
            anyhow::ensure!(
                self.installing.exists(),
                "the WAL starts after entry {} but the backend holds only up to entry \
                 {backend}, and the state that covers the gap ({}) is missing",
                wal_snapshot.unwrap_or(0),
                self.installing.display()
            );
            self.switch()?;
            return Ok(true);
        }
        let _ = std::fs::remove_file(&self.installing);
        Ok(false)
    }
}

/// Starts this process over with the same arguments and environment (same PID, so a
/// supervisor sees no exit). Files and sockets are close-on-exec, so the data dir lock and
/// the listeners are released for the new image. The image is the running one (the kernel's
/// /proc/self/exe), even if its file was replaced or deleted since it started (a package
/// upgrade): the member goes on as the version it was.
pub fn restart() -> ! {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| "keel".into());
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(args)
        .exec();
    crate::fatal(crate::FATAL_EXIT_CODE, &format!("restart: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_finishes_or_clears_an_install() {
        let dir = tempfile::tempdir().unwrap();
        let p = Paths::new(&dir.path().join("keel.db"));
        std::fs::write(&p.db, "old").unwrap();
        // Only the state received for the accepted point is staged.
        let got = p.incoming((9, 2));
        std::fs::write(&got, "new").unwrap();
        assert!(p.stage(&p.incoming((9, 3)), (9, 3)).is_err());
        assert!(p.stage(&got, (9, 3)).is_err(), "a file for another point");
        // Crash after staging, before the WAL knew: the staged state is dropped.
        p.stage(&got, (9, 2)).unwrap();
        assert!(!p.recover(None, 5).unwrap());
        assert!(!p.installing.exists());
        assert_eq!(std::fs::read_to_string(&p.db).unwrap(), "old");
        // Crash after the WAL record, before the switch: start finishes it.
        std::fs::write(&got, "new").unwrap();
        p.stage(&got, (9, 2)).unwrap();
        assert!(p.recover(Some(9), 5).unwrap());
        assert_eq!(std::fs::read_to_string(&p.db).unwrap(), "new");
        // Nothing to do once switched; stray incoming files go.
        std::fs::write(p.incoming((12, 3)), "partial").unwrap();
        assert!(!p.recover(Some(9), 9).unwrap());
        assert!(!p.incoming((12, 3)).exists());
        // The WAL is ahead and the state is gone: refuse to start.
        assert!(p.recover(Some(20), 9).is_err());
    }
}
