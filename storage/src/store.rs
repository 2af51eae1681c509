//! The persistent key-value state: the MVCC index in memory (`Mvcc`, shared with readers)
//! over the backend file, which holds the record of every version by revision and the
//! state's meta. Owned by the raft core, which applies entries through `write`.
//!
//! The WAL is the durability point, so the backend is committed in batches (every
//! `commit_interval` or `commit_ops_max` records), always between two applied entries, with
//! the index and term of the last entry applied (the consistent index). After a crash the
//! node reopens the backend and has raft re-deliver only the entries after it, so replay is
//! idempotent: the backend holds exactly the state after entry `consistent_index`.
//!
//! ```text
//! backend keys:
//!   'r' | main u64 BE | sub u64 BE    -> record (see mvcc::encode_record)
//!   "m/consistent_index"              -> u64 LE
//!   "m/term"                          -> u64 LE, term of that entry
//!   "m/current_rev"                   -> i64 LE
//!   "m/compact_rev"                   -> i64 LE (-1: never compacted)
//! ```

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_proto::mvccpb::KeyValue;

use crate::backend::file::MmapFile;
use crate::backend::{Backend, SpaceStats};
use crate::error::{Error, Result};
use crate::mvcc::{decode_record, encode_record, record_key, KeyRev, Mvcc, WriteTxn};

const META_CONSISTENT_INDEX: &[u8] = b"m/consistent_index";
const META_TERM: &[u8] = b"m/term";
const META_CURRENT_REV: &[u8] = b"m/current_rev";
const META_COMPACT_REV: &[u8] = b"m/compact_rev";

#[derive(Clone, Copy, Debug)]
pub struct StoreOptions {
    /// Longest a change waits in memory for a backend commit.
    pub commit_interval: Duration,
    /// Most records in one backend commit.
    pub commit_ops_max: usize,
}

impl Default for StoreOptions {
    /// etcd's backend batch defaults: 100 ms or 10000 operations.
    fn default() -> Self {
        StoreOptions {
            commit_interval: Duration::from_millis(100),
            commit_ops_max: 10_000,
        }
    }
}

/// Changes applied but not yet in the backend.
#[derive(Default)]
struct Pending {
    /// Record puts (Some) and deletes (None), in the order applied.
    records: Vec<([u8; 17], Option<Vec<u8>>)>,
    /// Versions whose in-memory values can go once the records are published.
    versions: Vec<KeyRev>,
    since: Option<Instant>,
}

pub struct Store {
    mvcc: Arc<Mvcc>,
    db: Backend<MmapFile>,
    pending: Pending,
    opts: StoreOptions,
    /// The last entry applied: (index, term).
    applied: (u64, u64),
    /// The consistent index in the backend.
    persisted: u64,
}

impl Store {
    /// Opens (creating) the backend at `path` and rebuilds the index from its records.
    pub fn open(path: &Path, opts: StoreOptions) -> Result<Store> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                op: "create backend dir",
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let db = Backend::open(MmapFile::open(path)?)?;
        let snap = db.snapshot();
        let meta_i64 = |k: &[u8], default: i64| -> Result<i64> {
            match snap.get(k)? {
                Some(v) => v
                    .try_into()
                    .map(i64::from_le_bytes)
                    .map_err(|_| bad_meta(k)),
                None => Ok(default),
            }
        };
        let applied = (
            meta_i64(META_CONSISTENT_INDEX, 0)? as u64,
            meta_i64(META_TERM, 0)? as u64,
        );
        let mvcc = Mvcc::with_backend(
            db.reader(),
            meta_i64(META_CURRENT_REV, 1)?,
            meta_i64(META_COMPACT_REV, -1)?,
        );
        let mut failed = None;
        snap.range(b"r", Some(b"s"), |k, v| {
            let (Ok(main), Ok(sub)) = (k[1..9].try_into(), k.get(9..17).unwrap_or(&[]).try_into())
            else {
                failed = Some(bad_meta(k));
                return false;
            };
            let Some(rec) = decode_record(v) else {
                failed = Some(bad_meta(k));
                return false;
            };
            let (main, sub) = (
                u64::from_be_bytes(main) as i64,
                u64::from_be_bytes(sub) as i64,
            );
            mvcc.insert_recovered(rec.key, main, sub, &rec);
            true
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        drop(snap);
        Ok(Store {
            mvcc: Arc::new(mvcc),
            db,
            pending: Pending::default(),
            opts,
            applied,
            persisted: applied.0,
        })
    }

    /// The shared index readers use.
    pub fn mvcc(&self) -> &Arc<Mvcc> {
        &self.mvcc
    }

    /// The last entry whose effects the store holds, as (index, term).
    pub fn applied(&self) -> (u64, u64) {
        self.applied
    }

    /// The write transaction of the next revision.
    pub fn write(&mut self) -> StoreTxn<'_> {
        StoreTxn {
            txn: Some(self.mvcc.write()),
            pending: &mut self.pending,
        }
    }

    /// Compacts the index and schedules the dropped records' deletion.
    pub fn compact(&mut self, rev: i64) -> Result<()> {
        let dropped = self.mvcc.compact(rev)?;
        self.pending.since.get_or_insert_with(Instant::now);
        self.pending.records.extend(
            dropped
                .into_iter()
                .map(|(main, sub)| (record_key(main, sub), None)),
        );
        Ok(())
    }

    /// Records that every entry up to `index` (of `term`) is applied.
    pub fn set_applied(&mut self, index: u64, term: u64) {
        self.applied = (index, term);
    }

    /// Commits to the backend if a batch is due (old or large enough). Whether it did.
    pub fn commit_if_due(&mut self, now: Instant) -> Result<bool> {
        let due = match self.pending.since {
            Some(t) => {
                now.duration_since(t) >= self.opts.commit_interval
                    || self.pending.records.len() >= self.opts.commit_ops_max
            }
            None => self.applied.0 != self.persisted,
        };
        if due {
            self.commit()?;
        }
        Ok(due)
    }

    /// Writes what is pending and the consistent index to the backend, durably.
    pub fn commit(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        let mut txn = self.db.write()?;
        for (key, record) in &pending.records {
            match record {
                Some(r) => txn.put(key, r)?,
                None => {
                    txn.delete(key)?;
                }
            }
        }
        let (index, term) = self.applied;
        txn.put(META_CONSISTENT_INDEX, &index.to_le_bytes())?;
        txn.put(META_TERM, &term.to_le_bytes())?;
        txn.put(META_CURRENT_REV, &self.mvcc.current_rev().to_le_bytes())?;
        txn.put(META_COMPACT_REV, &self.mvcc.compact_rev().to_le_bytes())?;
        txn.commit()?;
        self.persisted = index;
        for kr in &pending.versions {
            self.mvcc.forget_value(kr);
        }
        Ok(())
    }

    /// The backend's size, for Status' db size and quota.
    pub fn space(&self) -> SpaceStats {
        self.db.space()
    }
}

fn bad_meta(key: &[u8]) -> Error {
    Error::Corrupted {
        path: "backend".into(),
        offset: 0,
        reason: format!("entry {:?} does not decode", String::from_utf8_lossy(key)),
    }
}

/// A write transaction whose committed changes go to the next backend batch.
pub struct StoreTxn<'a> {
    txn: Option<WriteTxn<'a>>,
    pending: &'a mut Pending,
}

impl<'a> Deref for StoreTxn<'a> {
    type Target = WriteTxn<'a>;
    fn deref(&self) -> &WriteTxn<'a> {
        self.txn.as_ref().expect("live until commit")
    }
}

impl<'a> DerefMut for StoreTxn<'a> {
    fn deref_mut(&mut self) -> &mut WriteTxn<'a> {
        self.txn.as_mut().expect("live until commit")
    }
}

impl StoreTxn<'_> {
    /// Publishes the transaction to readers and queues its records; returns its changes and
    /// the revision after it.
    pub fn commit(mut self) -> (Vec<KeyValue>, i64) {
        let (changes, rev) = self.txn.take().expect("live until commit").commit();
        if !changes.is_empty() {
            self.pending.since.get_or_insert_with(Instant::now);
        }
        for (sub, kv) in changes.iter().enumerate() {
            let sub = sub as i64;
            self.pending
                .records
                .push((record_key(rev, sub), Some(encode_record(kv))));
            self.pending.versions.push(KeyRev {
                key: kv.key.clone(),
                main: rev,
                sub,
            });
        }
        (changes, rev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::{KeyRange, RangeOptions};
    use bytes::Bytes;

    fn all(m: &Mvcc, rev: i64) -> Vec<(String, String, i64, i64)> {
        m.range(
            KeyRange::from_request(b"\0", b"\0"),
            RangeOptions {
                rev,
                ..Default::default()
            },
        )
        .unwrap()
        .kvs
        .iter()
        .map(|kv| {
            (
                String::from_utf8(kv.key.to_vec()).unwrap(),
                String::from_utf8(kv.value.to_vec()).unwrap(),
                kv.create_revision,
                kv.version,
            )
        })
        .collect()
    }

    fn put(s: &mut Store, k: &str, v: &str) {
        let mut t = s.write();
        t.put(k.as_bytes(), Bytes::copy_from_slice(v.as_bytes()), 0);
        t.commit();
    }

    #[test]
    fn state_survives_reopen_with_values_read_from_the_backend() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let (before, old) = {
            let mut s = Store::open(&path, StoreOptions::default()).unwrap();
            for i in 0..300 {
                put(&mut s, &format!("k{}", i % 50), &format!("v{i}"));
            }
            let mut t = s.write();
            t.delete_range(KeyRange::from_request(b"k1", b"k2"));
            t.commit();
            s.compact(200).unwrap();
            put(&mut s, "big", &"x".repeat(50_000));
            s.set_applied(77, 3);
            s.commit().unwrap();
            // Values now come from the backend, not memory.
            (all(s.mvcc(), 0), all(s.mvcc(), 250))
        };
        let s = Store::open(&path, StoreOptions::default()).unwrap();
        assert_eq!(s.applied(), (77, 3));
        assert_eq!(s.mvcc().current_rev(), 303);
        assert_eq!(s.mvcc().compact_rev(), 200);
        assert_eq!(all(s.mvcc(), 0), before);
        assert_eq!(all(s.mvcc(), 250), old);
        assert!(before
            .iter()
            .any(|(k, v, _, _)| k == "big" && v.len() == 50_000));
    }

    #[test]
    fn uncommitted_changes_are_lost_and_replay_restores_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let mut s = Store::open(&path, StoreOptions::default()).unwrap();
            put(&mut s, "a", "1");
            s.set_applied(5, 2);
            s.commit().unwrap();
            put(&mut s, "a", "2"); // applied as entry 6, never committed
            s.set_applied(6, 2);
        }
        let mut s = Store::open(&path, StoreOptions::default()).unwrap();
        assert_eq!(s.applied(), (5, 2));
        assert_eq!(all(s.mvcc(), 0), [("a".into(), "1".into(), 2, 1)]);
        put(&mut s, "a", "2"); // raft re-delivers entry 6
        assert_eq!(all(s.mvcc(), 0), [("a".into(), "2".into(), 2, 2)]);
        assert_eq!(s.mvcc().current_rev(), 3);
    }

    #[test]
    fn batches_commit_when_old_or_large() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            commit_interval: Duration::from_secs(3600),
            commit_ops_max: 10,
        };
        let mut s = Store::open(&dir.path().join("db"), opts).unwrap();
        let t0 = Instant::now();
        for i in 0..9 {
            put(&mut s, &format!("k{i}"), "v");
        }
        assert!(!s.commit_if_due(t0).unwrap());
        put(&mut s, "k9", "v");
        assert!(s.commit_if_due(t0).unwrap());
        put(&mut s, "late", "v");
        assert!(!s.commit_if_due(Instant::now()).unwrap());
        assert!(s
            .commit_if_due(Instant::now() + Duration::from_secs(3601))
            .unwrap());
        s.set_applied(40, 2);
        assert!(
            s.commit_if_due(Instant::now()).unwrap(),
            "a new index alone"
        );
        assert!(!s.commit_if_due(Instant::now()).unwrap());
    }
}
