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
use keel_proto::keelpb::{self, InternalRequest};
use keel_proto::prost::Message as _;
use keel_storage::bolt::BoltFile;
use keel_storage::etcdfmt::{self, member_from_json};
use keel_storage::store::{Store, StoreOptions};
use protobuf::Message as _;
use raft::eraftpb::{Entry, EntryType, HardState};

use crate::lease::{LeaseBook, Leases};
use crate::snapshot::{log, map_file, sync_dir, Target};

const REC_METADATA: i64 = 1;
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

/// etcd's raftpb.ConfChange (its change types differ from raft-rs's: etcd has UpdateNode).
#[derive(Clone, PartialEq, keel_proto::prost::Message)]
struct ConfChange {
    #[prost(int32, tag = "2")]
    kind: i32,
    #[prost(uint64, tag = "3")]
    node_id: u64,
    #[prost(bytes = "vec", tag = "4")]
    context: Vec<u8>,
}

const CC_ADD_NODE: i32 = 0;
const CC_REMOVE_NODE: i32 = 1;
const CC_UPDATE_NODE: i32 = 2;
const CC_ADD_LEARNER_NODE: i32 = 3;

/// etcdserverpb.Metadata: the member a WAL belongs to.
#[derive(Clone, PartialEq, keel_proto::prost::Message)]
struct WalMetadata {
    #[prost(uint64, tag = "1")]
    node_id: u64,
    #[prost(uint64, tag = "2")]
    cluster_id: u64,
}

/// What an etcd WAL holds: its entries after its last snapshot (later ones replacing earlier
/// ones at the same index), the last hard state's commit, the member it belongs to, and every
/// membership change it still holds (snapshot or not: a restored member's membership lives in
/// the conf changes its restore wrote before the snapshot record).
#[derive(Default)]
pub struct EtcdWal {
    pub entries: Vec<Entry>,
    pub commit: u64,
    pub member_id: u64,
    pub cluster_id: u64,
    conf: Vec<(u64, ConfChange)>,
    /// The index of the last raft snapshot the WAL records (entries before it are gone).
    snapshot_index: u64,
    /// Normal entries met (kept or not): none means a member that never ran, such as one
    /// `etcdctl snapshot restore` just made (its WAL holds only membership changes).
    normal_entries: u64,
}

/// Reads every `.wal` file of `dir` in name order, keeping the entries after `skip_through`
/// (those the backend already holds need no memory). Refuses a WAL a running etcd holds.
pub fn read_wal(dir: &Path, skip_through: u64) -> anyhow::Result<EtcdWal> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("read wal dir {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    files.sort();
    if let Some(last) = files.last() {
        // etcd holds an exclusive flock on the WAL file it appends to.
        let f = std::fs::File::open(last).with_context(|| format!("open {}", last.display()))?;
        if !crate::try_lock(&f) {
            anyhow::bail!(
                "etcd is running on {} (its WAL {} is locked): stop it first",
                dir.display(),
                last.display()
            );
        }
    }
    let mut wal = EtcdWal::default();
    let mut crc = 0u32;
    let n = files.len();
    for (i, f) in files.iter().enumerate() {
        let map = map_file(f)?;
        read_wal_file(&map, &mut crc, &mut wal, i + 1 == n, skip_through)
            .with_context(|| format!("etcd wal {}", f.display()))?;
    }
    Ok(wal)
}

/// etcd's isTornEntry: a record whose CRC fails at the end of the last file is a write the
/// crash cut short if one of its 512-byte sectors is all zeros.
fn torn(b: &[u8], from: usize, to: usize) -> bool {
    let mut at = from;
    while at < to {
        let next = ((at / 512) + 1) * 512;
        let chunk = &b[at..next.min(to)];
        if chunk.iter().all(|x| *x == 0) {
            return true;
        }
        at = next;
    }
    false
}

fn read_wal_file(
    b: &[u8],
    crc: &mut u32,
    wal: &mut EtcdWal,
    last: bool,
    skip_through: u64,
) -> anyhow::Result<()> {
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
                if last && torn(b, at, end) {
                    break;
                }
                anyhow::bail!("record at offset {at}: crc mismatch (corrupted)");
            }
            match rec.kind {
                REC_METADATA => {
                    if let Ok(m) = WalMetadata::decode(rec.data.as_slice()) {
                        wal.member_id = m.node_id;
                        wal.cluster_id = m.cluster_id;
                    }
                }
                REC_ENTRY => {
                    let e = Entry::parse_from_bytes(&rec.data)
                        .with_context(|| format!("entry at offset {at}"))?;
                    // A later entry at an index replaces it and everything after.
                    let keep = wal.entries.partition_point(|x| x.index < e.index);
                    wal.entries.truncate(keep);
                    wal.conf.retain(|(i, _)| *i < e.index);
                    match e.get_entry_type() {
                        EntryType::EntryConfChange => {
                            if let Ok(cc) = ConfChange::decode(&e.data[..]) {
                                wal.conf.push((e.index, cc));
                            }
                        }
                        EntryType::EntryNormal => wal.normal_entries += 1,
                        _ => {}
                    }
                    if e.index > skip_through {
                        wal.entries.push(e);
                    }
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
                    wal.snapshot_index = wal.snapshot_index.max(s.index);
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

/// The membership an etcd data dir records. A WAL that still starts at index 1 holds every
/// membership change, so it alone decides (a member `etcdctl snapshot restore` made has such
/// a WAL, while its backend still lists the old cluster's members). Otherwise the backend's
/// "members" bucket (less "members_removed") is the membership as of its consistent index,
/// and the WAL's committed changes after that index apply on top. Also the IDs removed.
fn etcd_members(
    bolt: &BoltFile<'_>,
    wal: &EtcdWal,
    from: u64,
) -> anyhow::Result<(Vec<keelpb::Member>, Vec<u64>)> {
    let mut members: Vec<keelpb::Member> = Vec::new();
    let mut removed: Vec<u64> = Vec::new();
    let whole_log = wal.conf.first().is_some_and(|(i, _)| *i == 1);
    if !whole_log {
        if let Some(b) = bolt.bucket(b"members_removed")? {
            bolt.for_each(&b, |k, _| {
                if let Some(id) = std::str::from_utf8(k)
                    .ok()
                    .and_then(|h| u64::from_str_radix(h, 16).ok())
                {
                    removed.push(id);
                }
                Ok(true)
            })?;
        }
        if let Some(b) = bolt.bucket(b"members")? {
            bolt.for_each(&b, |_, v| {
                if let Some(m) = member_from_json(v) {
                    members.push(m);
                }
                Ok(true)
            })?;
        }
        members.retain(|m| !removed.contains(&m.id));
    }
    let after = if whole_log { 0 } else { from };
    for (index, cc) in &wal.conf {
        if *index <= after {
            continue;
        }
        if *index > wal.commit {
            break;
        }
        let id = cc.node_id;
        match cc.kind {
            CC_ADD_NODE | CC_ADD_LEARNER_NODE => {
                if let Some(mut m) = member_from_json(&cc.context) {
                    m.id = id;
                    m.is_learner = cc.kind == CC_ADD_LEARNER_NODE;
                    members.retain(|x| x.id != id);
                    members.push(m);
                }
            }
            CC_REMOVE_NODE => {
                members.retain(|x| x.id != id);
                removed.push(id);
            }
            CC_UPDATE_NODE => {
                if let (Some(new), Some(m)) = (
                    member_from_json(&cc.context),
                    members.iter_mut().find(|x| x.id == id),
                ) {
                    m.peer_urls = new.peer_urls;
                }
            }
            _ => {}
        }
    }
    members.sort_by_key(|m| m.id);
    removed.sort_unstable();
    removed.dedup();
    Ok((members, removed))
}

/// What a conversion did.
struct Converted {
    imported: etcdfmt::Imported,
    /// Committed WAL entries after the backend's consistent index that changed the state,
    /// and those etcd's apply would have refused too (no change).
    applied: u64,
    refused: u64,
}

/// Writes the Keel backend at `path` from etcd's backend (consistent index `from`) and the
/// WAL's committed entries after it, which must all be there: a gap means WAL files are
/// missing, and going on would lose writes.
fn convert(
    bolt: &BoltFile<'_>,
    wal: &EtcdWal,
    from: u64,
    path: &Path,
    members: Vec<u8>,
) -> anyhow::Result<Converted> {
    // etcd 3.4 records the consistent index only with changes to keys, and snapshots its
    // raft log after committing its backend: entries up to the later of the two are in it.
    let from = from.max(wal.snapshot_index);
    let tail: Vec<&Entry> = wal
        .entries
        .iter()
        .filter(|e| e.index > from && e.index <= wal.commit)
        .collect();
    let expected = wal.commit.saturating_sub(from);
    let contiguous = tail
        .iter()
        .enumerate()
        .all(|(i, e)| e.index == from + 1 + i as u64);
    if tail.len() as u64 != expected || !contiguous {
        anyhow::bail!(
            "the etcd WAL lacks committed entries: the backend holds entries up to {from}, the \
             WAL's commit is {}, and it has {} of the {expected} entries between (is a WAL file \
             missing, or --etcd-wal-dir wrong?)",
            wal.commit,
            tail.len()
        );
    }
    let mut imported = etcdfmt::import(bolt, path, (1, 1), Some(members), Default::default())
        .map_err(|e| anyhow::anyhow!("etcd backend: {e}"))?;
    let mut store = Store::open(path, StoreOptions::default())?;
    let shared = Arc::new(Leases::new(1, 100, 1000));
    let mut book = LeaseBook::recover(shared, &mut store, Duration::ZERO);
    let (mut applied, mut refused) = (0, 0);
    for e in tail {
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
        match crate::apply::apply(&mut store, &mut book, req) {
            Ok(_) => applied += 1,
            // What etcd's apply refused (a compare that failed is not an error): no change.
            Err(_) => refused += 1,
        }
    }
    store.set_applied(1, 1);
    store.commit()?;
    imported.revision = store.mvcc().current_rev();
    imported.compact_rev = store.mvcc().compact_rev();
    imported.leases = store.leases().len() as u64;
    Ok(Converted {
        imported,
        applied,
        refused,
    })
}

pub fn migrate(etcd_dir: &Path, etcd_wal: Option<&Path>, target: Target) -> anyhow::Result<()> {
    let db_path = etcd_dir.join("member").join("snap").join("db");
    let wal_dir = etcd_wal
        .map(Path::to_path_buf)
        .unwrap_or_else(|| etcd_dir.join("member").join("wal"));
    let db = map_file(&db_path)?;
    let bolt = BoltFile::open(&db)
        .map_err(|e| anyhow::anyhow!("etcd backend {}: {e}", db_path.display()))?;
    let from = consistent_index(&bolt)?;
    let wal = read_wal(&wal_dir, from)?;
    let mut done = None;
    target.create("etcd data dir", etcd_dir, |path, members| {
        let c = convert(&bolt, &wal, from, path, members)?;
        let imported = c.imported;
        done = Some(c);
        Ok(imported)
    })?;
    let c = done.expect("created");
    log(
        "applied the etcd wal's committed entries after the backend's consistent index",
        &[
            ("consistent-index", from.into()),
            ("wal-commit", wal.commit.into()),
            ("applied-entries", c.applied.into()),
            ("refused-entries", c.refused.into()),
        ],
    );
    Ok(())
}

/// Takes over an etcd member's data dir in place when Keel is started on one (the guide's
/// `etcdctl snapshot restore ... --data-dir /var/lib/etcd`, then start the server): converts
/// its backend and WAL tail into Keel's, keeping etcd's member ID, cluster ID and membership
/// (its identity, as etcd would on restart), and moves etcd's files aside
/// (`member/snap/etcd-imported.db`, the WAL dir + `.etcd-imported`). Every step is a rename
/// after the new files are whole, so a crash at any point is finished by the next start.
/// Returns whether it took one over.
pub fn adopt(cfg: &crate::config::Config) -> anyhow::Result<bool> {
    let keel_db = cfg.db_path();
    let snap_dir = keel_db
        .parent()
        .expect("the backend is in a dir")
        .to_path_buf();
    let etcd_db = snap_dir.join("db");
    let staged = snap_dir.join("keel.db.import");
    let etcd_db_aside = snap_dir.join("etcd-imported.db");
    let mut aside = cfg.wal_dir.clone().into_os_string();
    aside.push(".etcd-imported");
    let wal_aside = PathBuf::from(aside);
    if keel_db.exists() {
        return Ok(false);
    }
    if !etcd_db.exists() {
        if staged.exists() && etcd_db_aside.exists() {
            // The last start stopped just before the final rename.
            std::fs::rename(&staged, &keel_db)?;
            sync_dir(&snap_dir)?;
            return Ok(true);
        }
        return Ok(false);
    }
    let _ = std::fs::remove_file(&staged);
    let etcd_wal = if wal_aside.exists() {
        wal_aside.clone()
    } else {
        cfg.wal_dir.clone()
    };
    let db = map_file(&etcd_db)?;
    let bolt = BoltFile::open(&db)
        .map_err(|e| anyhow::anyhow!("etcd backend {}: {e}", etcd_db.display()))?;
    let from = consistent_index(&bolt)?;
    let wal = read_wal(&etcd_wal, from)?;
    let (members, removed) = etcd_members(&bolt, &wal, from)?;
    let voters = members.iter().filter(|m| !m.is_learner).count();
    if voters > 1 && wal.normal_entries > 0 {
        // Members of a cluster that ran stop at different points: taken over one by one, each
        // would start Keel's log afresh from a different state, and nothing would repair it.
        anyhow::bail!(
            "etcd data dir {}: a member of a {voters}-member cluster that has run; its members \
             stopped at different points, so they cannot be taken over one by one. Take one \
             snapshot (etcdctl snapshot save) and restore it into every member (etcdctl or keel \
             snapshot restore), or run `keel migrate` on one member's data dir for every member",
            cfg.data_dir.display()
        );
    }
    if wal.member_id == 0 || !members.iter().any(|m| m.id == wal.member_id) {
        anyhow::bail!(
            "etcd data dir {}: its WAL names member {:x}, which its membership ({} members) \
             lacks",
            cfg.data_dir.display(),
            wal.member_id,
            members.len()
        );
    }
    let c = convert(
        &bolt,
        &wal,
        from,
        &staged,
        crate::cluster::Membership::encode(&members, &removed),
    )?;
    drop(db);
    if etcd_wal == cfg.wal_dir {
        std::fs::rename(&cfg.wal_dir, &wal_aside)?;
    } else if cfg.wal_dir.exists() {
        // Keel's WAL from an attempt that stopped before the backend was renamed.
        std::fs::remove_dir_all(&cfg.wal_dir)?;
    }
    let me = members
        .iter()
        .find(|m| m.id == wal.member_id)
        .expect("checked above");
    let meta = keel_storage::raftlog::MemberMeta {
        member_id: wal.member_id,
        cluster_id: wal.cluster_id,
        voters: members
            .iter()
            .filter(|m| !m.is_learner)
            .map(|m| m.id)
            .collect(),
        name: if me.name.is_empty() {
            cfg.name.clone()
        } else {
            me.name.clone()
        },
    };
    let wal_opts = keel_storage::wal::WalOptions {
        segment_bytes: cfg.wal_segment_bytes,
        ..Default::default()
    };
    let (log, _) = keel_storage::raftlog::RaftLog::open(&cfg.wal_dir, wal_opts, meta, (1, 1))?;
    drop(log);
    std::fs::rename(&etcd_db, &etcd_db_aside)?;
    std::fs::rename(&staged, &keel_db)?;
    sync_dir(&snap_dir)?;
    tracing::info!(
        data_dir = %cfg.data_dir.display(),
        member_id = format!("{:x}", wal.member_id),
        cluster_id = format!("{:x}", wal.cluster_id),
        members = members.len(),
        revision = c.imported.revision,
        compact_revision = c.imported.compact_rev,
        wal_entries_applied = c.applied,
        wal_entries_refused = c.refused,
        "took over an etcd data dir: etcd's files are kept as {} and {}",
        etcd_db_aside.display(),
        wal_aside.display()
    );
    Ok(true)
}
