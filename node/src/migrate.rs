//! `keel migrate`: a stopped etcd member's data dir to a new Keel member's.
//!
//! etcd's state is its backend file (`member/snap/db`, bbolt) as of its consistent index,
//! plus the committed entries of its WAL after that index (etcd batches backend commits, so a
//! member killed rather than stopped has applied entries only its WAL holds). Both are read:
//! the backend is imported (`keel_storage::etcdfmt`), then the WAL's committed entries after
//! the consistent index are applied with Keel's own apply, as etcd would on its next start.
//!
//! ```text
//! etcd WAL file (member/wal/SEQ-INDEX.wal, in name order), a sequence of frames:
//!   len u64 LE: low 56 bits the record's size; if the top bit is set, bits 56..59 are the
//!               padding after it (to 8 bytes); 0: the end (preallocated space)
//!   walpb.Record {type int64 = 1, crc uint32 = 2, data bytes = 3}
//! types: 1 metadata, 2 raftpb.Entry, 3 raftpb.HardState, 4 crc (the previous file's running
//!        crc, which the chain continues from), 5 walpb.Snapshot {index = 1, term = 2}
//! crc: CRC-32C over every record's data in order, chained across files.
//! ```
//! A torn or zero frame ends the log (etcd's rule for the tail); a record whose CRC does not
//! match the chain is corruption and stops the migration.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use keel_proto::keelpb::InternalRequest;
use keel_proto::prost::Message as _;
use keel_storage::bolt::BoltFile;
use keel_storage::etcdfmt;
use keel_storage::store::{Store, StoreOptions};
use protobuf::Message as _;
use raft::eraftpb::{Entry, EntryType, HardState};

use crate::lease::{LeaseBook, Leases};
use crate::snapshot::{log, Mapped, Target};

const REC_ENTRY: i64 = 2;
const REC_STATE: i64 = 3;
const REC_CRC: i64 = 4;
const REC_SNAPSHOT: i64 = 5;

/// walpb.Record.
#[derive(Clone, PartialEq, keel_proto::prost::Message)]
struct WalRecord {
    #[prost(int64, tag = "1")]
    kind: i64,
    #[prost(uint32, tag = "2")]
    crc: u32,
    #[prost(bytes = "vec", tag = "3")]
    data: Vec<u8>,
}

/// walpb.Snapshot.
#[derive(Clone, PartialEq, keel_proto::prost::Message)]
struct WalSnapshot {
    #[prost(uint64, tag = "1")]
    index: u64,
    #[prost(uint64, tag = "2")]
    term: u64,
}

/// What an etcd WAL holds: its entries (later ones replacing earlier ones at the same index)
/// and the last hard state.
#[derive(Default)]
pub struct EtcdWal {
    pub entries: Vec<Entry>,
    pub commit: u64,
}

/// Reads every `.wal` file of `dir` in name order.
pub fn read_wal(dir: &Path) -> anyhow::Result<EtcdWal> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("read wal dir {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    files.sort();
    let mut wal = EtcdWal::default();
    let mut crc = 0u32;
    let n = files.len();
    for (i, f) in files.iter().enumerate() {
        let map = Mapped::open(f)?;
        read_wal_file(map.bytes(), &mut crc, &mut wal, i + 1 == n)
            .with_context(|| format!("etcd wal {}", f.display()))?;
    }
    Ok(wal)
}

fn read_wal_file(b: &[u8], crc: &mut u32, wal: &mut EtcdWal, last: bool) -> anyhow::Result<()> {
    let mut at = 0usize;
    while at + 8 <= b.len() {
        let len = u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        if len == 0 {
            break;
        }
        let size = (len & !(0xffu64 << 56)) as usize;
        let pad = if len >> 63 == 1 {
            ((len >> 56) & 0x7) as usize
        } else {
            0
        };
        let body = at
            .checked_add(8)
            .and_then(|s| s.checked_add(size))
            .filter(|&e| e <= b.len() && size > 0);
        let Some(end) = body else {
            if last {
                break; // a torn frame at the tail
            }
            anyhow::bail!("a record at offset {at} runs past the end of the file");
        };
        let rec = match WalRecord::decode(&b[at + 8..end]) {
            Ok(r) => r,
            Err(_) if last => break,
            Err(e) => anyhow::bail!("the record at offset {at} does not decode: {e}"),
        };
        if rec.kind == REC_CRC {
            if *crc != 0 && rec.crc != *crc {
                anyhow::bail!("crc record at offset {at} does not continue the chain");
            }
            *crc = rec.crc;
        } else {
            *crc = crc32c::crc32c_append(*crc, &rec.data);
            if rec.crc != *crc {
                anyhow::bail!("record at offset {at}: crc mismatch (corrupted)");
            }
            match rec.kind {
                REC_ENTRY => {
                    let e = Entry::parse_from_bytes(&rec.data)
                        .with_context(|| format!("entry at offset {at}"))?;
                    // A later entry at an index replaces it and everything after.
                    let keep = wal.entries.partition_point(|x| x.index < e.index);
                    wal.entries.truncate(keep);
                    wal.entries.push(e);
                }
                REC_STATE => {
                    let hs = HardState::parse_from_bytes(&rec.data)
                        .with_context(|| format!("hard state at offset {at}"))?;
                    if hs.commit > 0 {
                        wal.commit = hs.commit;
                    }
                }
                REC_SNAPSHOT => {
                    let s = WalSnapshot::decode(rec.data.as_slice())
                        .with_context(|| format!("snapshot record at offset {at}"))?;
                    wal.commit = wal.commit.max(s.index);
                    let keep = wal.entries.partition_point(|x| x.index <= s.index);
                    wal.entries.drain(..keep);
                }
                _ => {}
            }
        }
        at = end + pad;
    }
    Ok(())
}

/// The etcd backend's consistent index ("meta" bucket, u64 BE).
fn consistent_index(f: &BoltFile<'_>) -> anyhow::Result<u64> {
    let Some(meta) = f.bucket(b"meta")? else {
        return Ok(0);
    };
    let mut index = 0;
    f.for_each(&meta, |k, v| {
        if k == b"consistent_index" {
            if let Ok(b) = v.try_into() {
                index = u64::from_be_bytes(b);
            }
            return Ok(false);
        }
        Ok(true)
    })?;
    Ok(index)
}

pub fn migrate(etcd_dir: &Path, etcd_wal: Option<&Path>, target: Target) -> anyhow::Result<()> {
    let db_path = etcd_dir.join("member").join("snap").join("db");
    let wal_dir = etcd_wal
        .map(Path::to_path_buf)
        .unwrap_or_else(|| etcd_dir.join("member").join("wal"));
    let db = Mapped::open(&db_path)?;
    let bolt = BoltFile::open(db.bytes())
        .map_err(|e| anyhow::anyhow!("etcd backend {}: {e}", db_path.display()))?;
    let from = consistent_index(&bolt)?;
    let wal = read_wal(&wal_dir)?;
    let tail: Vec<&Entry> = wal
        .entries
        .iter()
        .filter(|e| e.index > from && e.index <= wal.commit)
        .collect();
    let mut applied = 0u64;
    target.create("etcd data dir", etcd_dir, |path, members| {
        etcdfmt::import(&bolt, path, (1, 1), Some(members), Default::default())
            .map_err(|e| anyhow::anyhow!("etcd backend {}: {e}", db_path.display()))?;
        let mut store = Store::open(path, StoreOptions::default())?;
        let shared = Arc::new(Leases::new(1, 100, 1000));
        let mut book = LeaseBook::recover(shared, &mut store, Duration::ZERO);
        for e in &tail {
            if e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty() {
                continue;
            }
            // etcd's InternalRaftRequest: its KV, lease, compaction and alarm fields have the
            // numbers Keel's InternalRequest uses; the rest (v2 requests, lease checkpoints,
            // membership attributes, auth) do not change what a migration keeps.
            let Ok(mut req) = InternalRequest::decode(&e.data[..]) else {
                continue;
            };
            req.member_attributes = None;
            req.member_update = None;
            let kv = req.put.is_some()
                || req.delete_range.is_some()
                || req.txn.is_some()
                || req.compaction.is_some()
                || req.lease_grant.is_some()
                || req.lease_revoke.is_some()
                || req.alarm.is_some();
            if !kv {
                continue;
            }
            // An entry refused by etcd's apply is refused here too: no change.
            let _ = crate::apply::apply(&mut store, &mut book, req);
            applied += 1;
        }
        store.set_applied(1, 1);
        store.commit()?;
        let revision = store.mvcc().current_rev();
        let compact_rev = store.mvcc().compact_rev();
        Ok(etcdfmt::Imported {
            revision,
            compact_rev,
            records: 0,
            leases: store.leases().len() as u64,
        })
    })?;
    log(
        "applied the etcd wal's committed entries after the backend's consistent index",
        &[
            ("consistent-index", from.into()),
            ("wal-commit", wal.commit.into()),
            ("applied-entries", applied.into()),
        ],
    );
    Ok(())
}
