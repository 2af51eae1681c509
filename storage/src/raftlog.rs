//! The raft log store: `raft::Storage` over the WAL.
//!
//! The WAL holds two kinds of records:
//!
//! ```text
//! META  (type 1), first record of a WAL, written once when the member is created:
//!   u8 format=1 | u64 member_id | u64 cluster_id | u32 n | n x u64 voter ids
//!   | u16 name_len | name bytes
//! BATCH (type 2), one per ready-loop turn that has something to persist:
//!   u8 format=1 | u64 hs.term | u64 hs.vote | u64 hs.commit | u32 n | n x entry
//!   entry: u64 index | u64 term | u8 type | u32 data_len | data | u32 ctx_len | ctx
//! SNAPSHOT (type 3), written when the member installs a state the leader sent (the backend
//!   then holds everything up to `index`; earlier records no longer matter):
//!   u8 format=1 | u64 index | u64 term | u64 hs.term | u64 hs.vote | u64 hs.commit
//! ```
//!
//! Every integer is little-endian. A batch whose first entry index is at or below the last
//! one held replaces the entries from that index on (raft's log truncation on conflict);
//! replay applies the same rule, so the recovered log is exactly the one that was acked.
//!
//! Every segment starts with a META record (written when the WAL rolls), so the segments
//! after a snapshot read back on their own: `release` deletes the segments wholly at or
//! before a snapshot's index (less a catch-up margin), and a restart replays only the rest.
//! The snapshot point (index and term of the last entry the state machine holds durably, the
//! backend's consistent index) is passed to `open`; entries at or before it are skipped, and
//! the first entry after it must follow it, or the log is corrupt.
//!
//! In memory we keep the entries raft may still ask for: everything not yet applied plus a
//! margin (`KEEP_APPLIED_ENTRIES`, as etcd keeps 5000 after a snapshot).

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

use bytes::Bytes;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::error::{Error, Result};
use crate::wal::{Recovery, Wal, WalOptions};

pub const RECORD_META: u8 = 1;
pub const RECORD_BATCH: u8 = 2;
pub const RECORD_SNAPSHOT: u8 = 3;
const FORMAT: u8 = 1;

/// Applied entries kept in memory beyond the applied index, for followers catching up.
pub const KEEP_APPLIED_ENTRIES: u64 = 5000;
/// ... and at most this many bytes of them (large values would otherwise keep 5000 large
/// entries in memory).
pub const KEEP_APPLIED_BYTES: usize = 64 << 20;

/// Who this member is; fixed when the member is created and read back from the WAL after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberMeta {
    pub member_id: u64,
    pub cluster_id: u64,
    pub voters: Vec<u64>,
    pub name: String,
}

/// What replay and appends learned about one WAL segment.
#[derive(Clone, Copy, Debug, Default)]
struct SegmentInfo {
    /// Its first record is a META record (so the WAL may start at this segment).
    starts_with_meta: bool,
    /// The highest entry index it holds (0: none).
    last_index: u64,
}

pub struct RaftLog {
    wal: Wal,
    segments: BTreeMap<u64, SegmentInfo>,
    meta: MemberMeta,
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the entry just before `entries[0]`.
    offset_index: u64,
    offset_term: u64,
    entries: VecDeque<Entry>,
    /// The data bytes of `entries`.
    entries_bytes: usize,
    /// The last installed snapshot's (index, term), as the WAL records it.
    installed: Option<(u64, u64)>,
    /// Applied entries kept in memory (`KEEP_APPLIED_ENTRIES` unless set).
    keep_applied: u64,
}

impl RaftLog {
    /// Opens the raft log in `wal_dir`. A new WAL records `bootstrap` as its member meta; an
    /// existing one keeps the meta it was created with. `snapshot` is the (index, term) of the
    /// last entry the state machine holds durably ((0, 0): none). Returns the log and whether
    /// it was new.
    pub fn open(
        wal_dir: &Path,
        opts: WalOptions,
        bootstrap: MemberMeta,
        snapshot: (u64, u64),
    ) -> Result<(Self, bool)> {
        let (mut wal, recovery) = Wal::open(wal_dir, opts)?;
        let fresh = recovery.records.is_empty();
        if fresh {
            wal.append(&[(RECORD_META, &encode_meta(&bootstrap))])?;
        }
        // A new member of a new cluster starts as raft-rs's bootstrap does: term 1, index 1
        // committed, the voters its configuration. One that joins an existing cluster (no
        // voters: it learns them from the leader) starts from nothing, so the leader sends
        // it its whole state rather than a log that lacks the bootstrap configuration.
        let stored = recovery
            .records
            .first()
            .filter(|r| r.record_type == RECORD_META)
            .and_then(|r| decode_meta(&r.payload));
        let joining = stored.as_ref().unwrap_or(&bootstrap).voters.is_empty();
        let (offset_index, offset_term) = match snapshot {
            s if s.0 > 1 => s,
            (0, _) if joining => (0, 0),
            _ => (1, 1),
        };
        let mut log = RaftLog {
            wal,
            segments: BTreeMap::new(),
            meta: bootstrap,
            hard_state: HardState {
                term: 1,
                commit: 1,
                ..Default::default()
            },
            conf_state: ConfState::default(),
            offset_index,
            offset_term,
            entries: VecDeque::new(),
            entries_bytes: 0,
            installed: None,
            keep_applied: KEEP_APPLIED_ENTRIES,
        };
        if fresh {
            log.hard_state.term = offset_term;
            log.hard_state.commit = offset_index;
            log.segments.insert(
                log.wal.segment_seq(),
                SegmentInfo {
                    starts_with_meta: true,
                    last_index: 0,
                },
            );
        } else {
            log.replay(recovery)?;
        }
        log.wal
            .set_segment_header(RECORD_META, encode_meta(&log.meta));
        log.conf_state.voters = log.meta.voters.clone();
        Ok((log, fresh))
    }

    /// Rebuilds the log from the WAL's records. Whatever does not fit the rules of a raft log
    /// (a record that does not decode, an index gap, terms that go back, a commit past the
    /// end) is corruption, reported with the file and offset of the record, never a panic.
    fn replay(&mut self, recovery: Recovery) -> Result<()> {
        let Recovery {
            records, positions, ..
        } = recovery;
        let dir = self.wal.dir().to_path_buf();
        let at = |i: usize, reason: String| {
            let pos = positions[i];
            Error::Corrupted {
                path: crate::wal::segment_path(&dir, pos.segment_seq),
                offset: pos.offset,
                reason: format!("record {}: {reason}", records[i].lsn),
            }
        };
        let first = &records[0];
        if first.record_type != RECORD_META {
            return Err(at(
                0,
                format!(
                    "type {}, expected the member meta record",
                    first.record_type
                ),
            ));
        }
        let meta = decode_meta(&first.payload)
            .ok_or_else(|| at(0, "member meta record does not decode".into()))?;
        let mut last_batch = None;
        // Batches before the last installed snapshot describe a log that state replaced.
        let from = records
            .iter()
            .rposition(|r| r.record_type == RECORD_SNAPSHOT)
            .unwrap_or(0);
        for (i, rec) in records.iter().enumerate() {
            let seq = positions[i].segment_seq;
            let info = self.segments.entry(seq).or_insert(SegmentInfo {
                starts_with_meta: rec.record_type == RECORD_META,
                last_index: 0,
            });
            match rec.record_type {
                RECORD_META => {
                    if decode_meta(&rec.payload).as_ref() != Some(&meta) {
                        return Err(at(i, "member meta differs from the first one".into()));
                    }
                }
                RECORD_SNAPSHOT => {
                    let (index, term, hs) = decode_snapshot(&rec.payload)
                        .ok_or_else(|| at(i, "snapshot record does not decode".into()))?;
                    info.last_index = info.last_index.max(index);
                    if i == from {
                        self.installed = Some((index, term));
                        if index > self.offset_index {
                            self.offset_index = index;
                            self.offset_term = term;
                        }
                        self.entries.clear();
                        self.entries_bytes = 0;
                        self.hard_state = hs;
                    }
                }
                RECORD_BATCH if i < from => {
                    if let Some((_, entries)) = decode_batch(&rec.payload) {
                        if let Some(e) = entries.last() {
                            info.last_index = info.last_index.max(e.index);
                        }
                    }
                }
                RECORD_BATCH => {
                    let (hs, entries) = decode_batch(&rec.payload)
                        .ok_or_else(|| at(i, "batch record does not decode".into()))?;
                    if let Some(e) = entries.last() {
                        info.last_index = info.last_index.max(e.index);
                    }
                    let entries = self.check_batch(&hs, entries).map_err(|r| at(i, r))?;
                    self.hard_state = hs;
                    self.splice(entries);
                    last_batch = Some(i);
                }
                t => return Err(at(i, format!("unknown record type {t}"))),
            }
        }
        // Commit is recorded lazily; the snapshot's entries were committed, in its term.
        self.hard_state.commit = self.hard_state.commit.max(self.offset_index);
        self.hard_state.term = self.hard_state.term.max(self.offset_term);
        if self.hard_state.commit > self.last() {
            return Err(at(
                last_batch.unwrap_or(0),
                format!(
                    "commit index {} past the last entry {}",
                    self.hard_state.commit,
                    self.last()
                ),
            ));
        }
        self.meta = meta;
        Ok(())
    }

    /// The part of a batch read back that follows the log as it stands (entries the
    /// snapshot covers are dropped), or why it cannot follow (what `splice` asserts for
    /// batches raft hands us).
    fn check_batch(&self, hs: &HardState, entries: Vec<Entry>) -> Result<Vec<Entry>, String> {
        if hs.term < self.hard_state.term {
            return Err(format!(
                "hard state term {} after term {}",
                hs.term, self.hard_state.term
            ));
        }
        let mut prev: Option<(u64, u64)> = None;
        let mut kept = Vec::with_capacity(entries.len());
        for e in entries {
            if let Some((index, term)) = prev {
                if e.index != index + 1 {
                    return Err(format!("entry {} after entry {index}", e.index));
                }
                if e.term < term {
                    return Err(format!(
                        "entry {} has term {} (previous {term})",
                        e.index, e.term
                    ));
                }
            }
            if e.term > hs.term {
                return Err(format!(
                    "entry {} has term {} (hard state {})",
                    e.index, e.term, hs.term
                ));
            }
            prev = Some((e.index, e.term));
            if e.index == self.offset_index && e.term != self.offset_term {
                return Err(format!(
                    "entry {} has term {}, the snapshot says {}",
                    e.index, e.term, self.offset_term
                ));
            }
            if e.index > self.offset_index {
                kept.push(e);
            }
        }
        let Some(first) = kept.first() else {
            return Ok(kept);
        };
        if first.index > self.last() + 1 {
            return Err(format!(
                "entry {} does not follow the log (entries {}..={})",
                first.index,
                self.offset_index + 1,
                self.last()
            ));
        }
        let prev_term = if first.index - 1 == self.offset_index {
            self.offset_term
        } else {
            self.entries[(first.index - self.offset_index - 2) as usize].term
        };
        if first.term < prev_term {
            return Err(format!(
                "entry {} has term {} (previous {prev_term})",
                first.index, first.term
            ));
        }
        Ok(kept)
    }

    /// Deletes the WAL segments that hold only entries at or below `index` (a snapshot's,
    /// less a catch-up margin), keeping a segment that starts with META first. Returns how
    /// many segments went.
    pub fn release(&mut self, index: u64) -> Result<usize> {
        let segs: Vec<(u64, SegmentInfo)> = self.segments.iter().map(|(s, i)| (*s, *i)).collect();
        let mut keep_from = None;
        for j in 1..segs.len() {
            if segs[j - 1].1.last_index > index {
                break;
            }
            if segs[j].1.starts_with_meta {
                keep_from = Some(segs[j].0);
            }
        }
        let Some(keep_from) = keep_from else {
            return Ok(0);
        };
        fail::fail_point!("wal-release");
        let n = self.wal.release_before(keep_from)?;
        self.segments.retain(|seq, _| *seq >= keep_from);
        Ok(n)
    }

    /// The WAL segments held, oldest first.
    pub fn segments(&self) -> Vec<u64> {
        self.segments.keys().copied().collect()
    }

    pub fn meta(&self) -> &MemberMeta {
        &self.meta
    }

    /// Persists `entries` and the hard state (updated with `hs` if given) in one WAL record,
    /// durably, then makes the entries visible to raft.
    pub fn append(&mut self, entries: &[Entry], hs: Option<&HardState>) -> Result<()> {
        if let Some(hs) = hs {
            self.hard_state = hs.clone();
        }
        let payload = encode_batch(&self.hard_state, entries);
        let (before, at_start) = (self.wal.segment_seq(), self.wal.offset() == 0);
        self.wal.append(&[(RECORD_BATCH, &payload)])?;
        let seq = self.wal.segment_seq();
        let info = self.segments.entry(seq).or_insert(SegmentInfo {
            // A new (or empty) segment starts with the segment header: META.
            starts_with_meta: seq != before || at_start,
            last_index: 0,
        });
        if let Some(e) = entries.last() {
            info.last_index = info.last_index.max(e.index);
        }
        self.splice(entries.to_vec());
        Ok(())
    }

    /// Installs a state the leader sent, which holds every entry up to `index` (of `term`):
    /// the log restarts after it, durably (a SNAPSHOT record), with `conf_state`.
    pub fn install_snapshot(
        &mut self,
        index: u64,
        term: u64,
        conf_state: ConfState,
        hs: Option<&HardState>,
    ) -> Result<()> {
        // The hard state raft hands over with the snapshot goes in the same record: written
        // apart, its commit (the snapshot's index) would be past the end of the log until the
        // SNAPSHOT record follows, and a crash between the two would leave a WAL that does
        // not open.
        if let Some(hs) = hs {
            self.hard_state = hs.clone();
        }
        self.hard_state.commit = self.hard_state.commit.max(index);
        self.hard_state.term = self.hard_state.term.max(term);
        let mut w = Writer(Vec::with_capacity(41));
        w.u8(FORMAT);
        w.u64(index);
        w.u64(term);
        w.u64(self.hard_state.term);
        w.u64(self.hard_state.vote);
        w.u64(self.hard_state.commit);
        let (before, at_start) = (self.wal.segment_seq(), self.wal.offset() == 0);
        self.wal.append(&[(RECORD_SNAPSHOT, &w.0)])?;
        let seq = self.wal.segment_seq();
        let info = self.segments.entry(seq).or_insert(SegmentInfo {
            starts_with_meta: seq != before || at_start,
            last_index: 0,
        });
        info.last_index = info.last_index.max(index);
        self.entries.clear();
        self.entries_bytes = 0;
        self.offset_index = index;
        self.offset_term = term;
        self.conf_state = conf_state;
        self.installed = Some((index, term));
        Ok(())
    }

    /// Raft's configuration as of the last entry applied (membership changes apply it; at
    /// start it comes from the state the backend holds).
    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.conf_state = cs;
    }

    /// The last snapshot installed from a leader, as the WAL records it.
    pub fn installed(&self) -> Option<(u64, u64)> {
        self.installed
    }

    /// Records a new commit index; it reaches disk with the next batch (commit can always be
    /// recomputed by raft, so it needs no sync of its own).
    pub fn set_commit(&mut self, commit: u64) {
        // Raft's commit index never goes back, and neither does this record of it.
        self.hard_state.commit = self.hard_state.commit.max(commit);
    }

    fn splice(&mut self, entries: Vec<Entry>) {
        let Some(first) = entries.first().map(|e| e.index) else {
            return;
        };
        assert!(
            first > self.offset_index,
            "raft appended entry {first} at or below the compacted index {}",
            self.offset_index
        );
        let keep = (first - self.offset_index - 1) as usize;
        for e in self.entries.range(keep.min(self.entries.len())..) {
            self.entries_bytes -= e.data.len();
        }
        self.entries.truncate(keep);
        assert_eq!(
            self.offset_index + self.entries.len() as u64 + 1,
            first,
            "raft log gap"
        );
        self.entries_bytes += entries.iter().map(|e| e.data.len()).sum::<usize>();
        self.entries.extend(entries);
    }

    /// See `Wal::set_spin`.
    pub fn set_wal_spin(&mut self, spin: std::time::Duration) {
        self.wal.set_spin(spin);
    }

    /// How many applied entries to keep in memory for followers catching up (etcd's
    /// `--snapshot-catchup-entries`); a follower further behind is sent the whole state.
    pub fn set_keep_applied(&mut self, n: u64) {
        self.keep_applied = n;
    }

    /// Drops in-memory entries up to `applied - keep_applied`, and older applied ones
    /// while they hold more than `KEEP_APPLIED_BYTES`.
    pub fn compact_applied(&mut self, applied: u64) {
        let upto = applied.saturating_sub(self.keep_applied);
        while let Some(e) = self.entries.front() {
            let too_big = self.entries_bytes > KEEP_APPLIED_BYTES && e.index <= applied;
            if e.index > upto && !too_big {
                break;
            }
            self.offset_index = e.index;
            self.offset_term = e.term;
            self.entries_bytes -= e.data.len();
            self.entries.pop_front();
        }
    }

    fn last(&self) -> u64 {
        self.offset_index + self.entries.len() as u64
    }
}

impl raft::Storage for RaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.offset_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(
            high <= self.last() + 1,
            "entries({low}, {high}) past the last index"
        );
        let from = (low - self.offset_index - 1) as usize;
        let to = (high - self.offset_index - 1) as usize;
        let mut ents: Vec<Entry> = self.entries.range(from..to).cloned().collect();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.offset_index {
            return Ok(self.offset_term);
        }
        if idx < self.offset_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.offset_index - 1) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.offset_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    /// The snapshot at the log's start: its index, term and membership. Its data (the
    /// backend file) travels outside raft's message, with the peer transport.
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.offset_index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snap = Snapshot::default();
        let meta = snap.mut_metadata();
        meta.index = self.offset_index;
        meta.term = self.offset_term;
        meta.set_conf_state(self.conf_state.clone());
        Ok(snap)
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes32(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .map(|b| u16::from_le_bytes(b.try_into().unwrap()))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    }
    fn bytes32(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

pub fn encode_meta(m: &MemberMeta) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    w.u8(FORMAT);
    w.u64(m.member_id);
    w.u64(m.cluster_id);
    w.u32(m.voters.len() as u32);
    for v in &m.voters {
        w.u64(*v);
    }
    w.u16(m.name.len() as u16);
    w.0.extend_from_slice(m.name.as_bytes());
    w.0
}

pub fn decode_meta(b: &[u8]) -> Option<MemberMeta> {
    let mut r = Reader(b);
    if r.u8()? != FORMAT {
        return None;
    }
    let member_id = r.u64()?;
    let cluster_id = r.u64()?;
    let n = r.u32()? as usize;
    let mut voters = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        voters.push(r.u64()?);
    }
    let name_len = r.u16()? as usize;
    let name = String::from_utf8(r.take(name_len)?.to_vec()).ok()?;
    Some(MemberMeta {
        member_id,
        cluster_id,
        voters,
        name,
    })
}

pub fn encode_batch(hs: &HardState, entries: &[Entry]) -> Vec<u8> {
    let size: usize = entries
        .iter()
        .map(|e| 25 + 8 + e.data.len() + e.context.len())
        .sum();
    let mut w = Writer(Vec::with_capacity(32 + size));
    w.u8(FORMAT);
    w.u64(hs.term);
    w.u64(hs.vote);
    w.u64(hs.commit);
    w.u32(entries.len() as u32);
    for e in entries {
        w.u64(e.index);
        w.u64(e.term);
        w.u8(e.entry_type as u8);
        w.bytes32(&e.data);
        w.bytes32(&e.context);
    }
    w.0
}

fn decode_snapshot(b: &[u8]) -> Option<(u64, u64, HardState)> {
    let mut r = Reader(b);
    if r.u8()? != FORMAT {
        return None;
    }
    let (index, term) = (r.u64()?, r.u64()?);
    let hs = HardState {
        term: r.u64()?,
        vote: r.u64()?,
        commit: r.u64()?,
        ..Default::default()
    };
    Some((index, term, hs))
}

pub fn decode_batch(b: &[u8]) -> Option<(HardState, Vec<Entry>)> {
    let mut r = Reader(b);
    if r.u8()? != FORMAT {
        return None;
    }
    let hs = HardState {
        term: r.u64()?,
        vote: r.u64()?,
        commit: r.u64()?,
        ..Default::default()
    };
    let n = r.u32()? as usize;
    let mut entries = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let index = r.u64()?;
        let term = r.u64()?;
        let entry_type = match r.u8()? {
            0 => EntryType::EntryNormal,
            1 => EntryType::EntryConfChange,
            2 => EntryType::EntryConfChangeV2,
            _ => return None,
        };
        entries.push(Entry {
            index,
            term,
            entry_type,
            data: Bytes::copy_from_slice(r.bytes32()?),
            context: Bytes::copy_from_slice(r.bytes32()?),
            ..Default::default()
        });
    }
    if !r.0.is_empty() {
        return None;
    }
    Some((hs, entries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn meta() -> MemberMeta {
        MemberMeta {
            member_id: 0x8e9e05c52164694d,
            cluster_id: 0xcdf818194e3a8c32,
            voters: vec![0x8e9e05c52164694d],
            name: "default".into(),
        }
    }

    fn entry(index: u64, term: u64, data: &str) -> Entry {
        Entry {
            index,
            term,
            data: Bytes::copy_from_slice(data.as_bytes()),
            ..Default::default()
        }
    }

    #[test]
    fn entries_and_hard_state_survive_reopen_with_truncation() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, fresh) =
                RaftLog::open(dir.path(), WalOptions::default(), meta(), (0, 0)).unwrap();
            assert!(fresh);
            assert_eq!(log.first_index().unwrap(), 2);
            let hs = HardState {
                term: 2,
                vote: 7,
                ..Default::default()
            };
            log.append(
                &[entry(2, 2, "a"), entry(3, 2, "b"), entry(4, 2, "c")],
                Some(&hs),
            )
            .unwrap();
            // A conflicting append from index 3 replaces 3 and 4 (from a leader of term 3,
            // so the hard state moves to term 3 in the same batch, as raft does).
            let hs3 = HardState {
                term: 3,
                vote: 7,
                ..Default::default()
            };
            log.append(&[entry(3, 3, "B")], Some(&hs3)).unwrap();
            log.set_commit(3);
            log.append(&[], None).unwrap();
        }
        let mut other = meta();
        other.name = "ignored".into();
        let (log, fresh) = RaftLog::open(dir.path(), WalOptions::default(), other, (0, 0)).unwrap();
        assert!(!fresh);
        assert_eq!(
            log.meta(),
            &meta(),
            "meta comes from the WAL, not the flags"
        );
        assert_eq!(log.last_index().unwrap(), 3);
        let ents = log
            .entries(2, 4, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(ents[1].data.as_ref(), b"B");
        assert_eq!(log.term(3).unwrap(), 3);
        let st = log.initial_state().unwrap();
        assert_eq!(
            (st.hard_state.term, st.hard_state.vote, st.hard_state.commit),
            (3, 7, 3)
        );
        assert_eq!(st.conf_state.voters, vec![meta().member_id]);
    }

    #[test]
    fn compacting_memory_keeps_terms_and_reports_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) =
            RaftLog::open(dir.path(), WalOptions::default(), meta(), (0, 0)).unwrap();
        let ents: Vec<Entry> = (2..=KEEP_APPLIED_ENTRIES + 100)
            .map(|i| entry(i, 2, "x"))
            .collect();
        log.append(&ents, None).unwrap();
        log.compact_applied(KEEP_APPLIED_ENTRIES + 50);
        assert_eq!(log.first_index().unwrap(), 51);
        assert_eq!(log.term(50).unwrap(), 2);
        assert!(log.term(49).is_err());
        assert!(log
            .entries(50, 60, None, GetEntriesContext::empty(false))
            .is_err());
    }

    #[test]
    fn compacting_memory_bounds_the_bytes_of_applied_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) =
            RaftLog::open(dir.path(), WalOptions::default(), meta(), (0, 0)).unwrap();
        let big = "x".repeat(1 << 20);
        let ents: Vec<Entry> = (2..=101).map(|i| entry(i, 2, &big)).collect();
        log.append(&ents, None).unwrap();
        // Only applied entries go: with 90 applied, the 10 unapplied (10 MiB) stay.
        log.compact_applied(90);
        let kept = KEEP_APPLIED_BYTES >> 20;
        assert_eq!(log.first_index().unwrap(), 102 - kept as u64);
        assert!(log.entries_bytes <= KEEP_APPLIED_BYTES);
        log.compact_applied(20);
        assert_eq!(
            log.first_index().unwrap(),
            102 - kept as u64,
            "nothing more to drop"
        );
    }

    /// A WAL record as (type, payload).
    type RawRecord = (u8, Vec<u8>);

    /// Writes a log with entries 2..=4 (term 2), then `bad` as raw WAL records (CRC-valid),
    /// and returns what reopening says.
    fn reopen_after(bad: &[RawRecord]) -> String {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, _) =
                RaftLog::open(dir.path(), WalOptions::default(), meta(), (0, 0)).unwrap();
            let hs = HardState {
                term: 2,
                commit: 3,
                ..Default::default()
            };
            log.append(
                &[entry(2, 2, "a"), entry(3, 2, "b"), entry(4, 2, "c")],
                Some(&hs),
            )
            .unwrap();
            let records: Vec<(u8, &[u8])> = bad.iter().map(|(t, p)| (*t, &p[..])).collect();
            log.wal.append(&records).unwrap();
        }
        match RaftLog::open(dir.path(), WalOptions::default(), meta(), (0, 0)) {
            Ok(_) => panic!("a corrupt log opened"),
            Err(e @ Error::Corrupted { .. }) => e.to_string(),
            Err(e) => panic!("not reported as corruption: {e}"),
        }
    }

    fn hs(term: u64, commit: u64) -> HardState {
        HardState {
            term,
            commit,
            ..Default::default()
        }
    }

    #[test]
    fn inconsistent_batches_are_corruption_with_file_and_offset() {
        let batch = |h: HardState, e: &[Entry]| (RECORD_BATCH, encode_batch(&h, e));
        let cases: Vec<(Vec<RawRecord>, &str)> = vec![
            (
                vec![batch(hs(2, 3), &[entry(10, 2, "gap")])],
                "entry 10 does not follow",
            ),
            (
                vec![batch(hs(2, 3), &[entry(5, 2, "x"), entry(7, 2, "y")])],
                "entry 7 after entry 5",
            ),
            (vec![batch(hs(3, 3), &[entry(5, 1, "old")])], "has term 1"),
            (vec![batch(hs(2, 3), &[entry(5, 3, "ahead")])], "has term 3"),
            (vec![batch(hs(1, 3), &[])], "hard state term 1 after term 2"),
            (
                vec![batch(hs(2, 9), &[])],
                "commit index 9 past the last entry 4",
            ),
            (
                vec![(RECORD_BATCH, vec![1, 2, 3])],
                "batch record does not decode",
            ),
            (vec![(7, b"what".to_vec())], "unknown record type 7"),
            (
                vec![(
                    RECORD_META,
                    encode_meta(&MemberMeta {
                        member_id: 9,
                        ..meta()
                    }),
                )],
                "member meta differs",
            ),
        ];
        for (records, want) in cases {
            let got = reopen_after(&records);
            assert!(got.contains(want), "{got:?} should say {want:?}");
            // The third record (meta, first batch, this one) starts at 1024 with 512 B blocks.
            assert!(
                got.contains("0000000000000000.wal at offset") && got.contains("record 3"),
                "{got}"
            );
        }
    }

    #[test]
    fn an_installed_snapshot_replaces_the_log_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let opts = || WalOptions {
            segment_bytes: 64 << 10,
            align_bytes: Some(512),
        };
        let hs = HardState {
            term: 3,
            vote: 9,
            ..Default::default()
        };
        {
            let (mut log, _) = RaftLog::open(dir.path(), opts(), meta(), (0, 0)).unwrap();
            // A stale log: entries 2..=50 of term 3, some never committed.
            let ents: Vec<Entry> = (2..=50).map(|i| entry(i, 3, "old")).collect();
            log.append(&ents, Some(&hs)).unwrap();
            log.set_commit(10);
            // The leader's state ends at entry 900 of term 5; entry 40 here had term 3.
            let cs = ConfState {
                voters: vec![1, 2, 3],
                ..Default::default()
            };
            log.install_snapshot(900, 5, cs.clone(), None).unwrap();
            assert_eq!(log.first_index().unwrap(), 901);
            assert_eq!(log.last_index().unwrap(), 900);
            assert_eq!(log.term(900).unwrap(), 5);
            assert_eq!(log.initial_state().unwrap().conf_state, cs);
            log.append(
                &[entry(901, 5, "new")],
                Some(&HardState {
                    term: 5,
                    vote: 2,
                    commit: 901,
                    ..Default::default()
                }),
            )
            .unwrap();
        }
        // Reopened with the backend at the snapshot (the usual case) or still at its old
        // point (a crash before the new backend was renamed in): the log starts after 900.
        for backend in [(900, 5), (10, 3)] {
            let (log, _) = RaftLog::open(dir.path(), opts(), meta(), backend).unwrap();
            assert_eq!(log.installed(), Some((900, 5)));
            assert_eq!(log.first_index().unwrap(), 901);
            assert_eq!(log.last_index().unwrap(), 901);
            let hs = log.initial_state().unwrap().hard_state;
            assert_eq!((hs.term, hs.vote, hs.commit), (5, 2, 901));
        }
    }

    #[test]
    fn released_segments_leave_a_log_that_reopens_from_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let small = || WalOptions {
            segment_bytes: 64 << 10,
            align_bytes: Some(512),
        };
        let hs = HardState {
            term: 2,
            ..Default::default()
        };
        {
            let (mut log, _) = RaftLog::open(dir.path(), small(), meta(), (0, 0)).unwrap();
            for b in 0..200u64 {
                let ents: Vec<Entry> = (0..10)
                    .map(|i| entry(2 + b * 10 + i, 2, &"x".repeat(100)))
                    .collect();
                log.append(&ents, Some(&hs)).unwrap();
            }
            log.set_commit(2001);
            log.append(&[], None).unwrap();
            let before = log.segments().len();
            assert!(before >= 4, "the test must span segments: {before}");
            assert_eq!(log.release(0).unwrap(), 0, "nothing is at or below index 0");
            let released = log.release(1500).unwrap();
            assert!(released >= 3, "released {released} of {before}");
            assert_eq!(log.segments().len(), before - released);
            assert_eq!(
                crate::wal::list_segments(dir.path()).unwrap(),
                log.segments()
            );
        }
        let (log, _) = RaftLog::open(dir.path(), small(), meta(), (1500, 2)).unwrap();
        assert_eq!(log.meta(), &meta(), "the meta comes from a segment header");
        assert_eq!(log.first_index().unwrap(), 1501);
        assert_eq!(log.last_index().unwrap(), 2001);
        assert_eq!(log.term(1500).unwrap(), 2);
        let e = log
            .entries(1501, 1503, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(e[0].index, 1501);
        assert_eq!(log.initial_state().unwrap().hard_state.commit, 2001);
        let snap = raft::Storage::snapshot(&log, 1500, 0).unwrap();
        assert_eq!(
            (snap.get_metadata().index, snap.get_metadata().term),
            (1500, 2)
        );
        drop(log);
        // Without the snapshot the remaining log has a hole before it.
        match RaftLog::open(dir.path(), small(), meta(), (0, 0)) {
            Err(Error::Corrupted { reason, .. }) => {
                assert!(reason.contains("does not follow"), "{reason}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a log with a hole opened"),
        }
    }

    /// A crash right after a roll leaves an empty segment; the next write must still start it
    /// with the member meta, or releasing the segments before it would leave a WAL that does
    /// not read back.
    #[test]
    fn an_empty_segment_left_by_a_crash_gets_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let small = || WalOptions {
            segment_bytes: 64 << 10,
            align_bytes: Some(512),
        };
        {
            let (mut log, _) = RaftLog::open(dir.path(), small(), meta(), (0, 0)).unwrap();
            log.append(&[entry(2, 2, "a")], Some(&hs(2, 2))).unwrap();
        }
        // What a roll leaves when the process dies before the first write lands.
        std::fs::write(crate::wal::segment_path(dir.path(), 1), vec![0u8; 64 << 10]).unwrap();
        {
            let (mut log, _) = RaftLog::open(dir.path(), small(), meta(), (0, 0)).unwrap();
            log.append(&[entry(3, 2, "b")], Some(&hs(2, 3))).unwrap();
            assert_eq!(
                log.release(2).unwrap(),
                1,
                "segment 1 starts a WAL: 0 can go"
            );
        }
        let (_, rec) = crate::wal::Wal::open(dir.path(), small()).unwrap();
        assert_eq!(rec.positions[0].segment_seq, 1);
        assert_eq!(rec.records[0].record_type, RECORD_META);
        let (log, _) = RaftLog::open(dir.path(), small(), meta(), (2, 2)).unwrap();
        assert_eq!(log.last_index().unwrap(), 3);
    }

    #[test]
    fn a_snapshot_in_a_later_term_than_early_records_reopens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, _) =
                RaftLog::open(dir.path(), WalOptions::default(), meta(), (0, 0)).unwrap();
            let ents: Vec<Entry> = (2..=5).map(|i| entry(i, 2, "a")).collect();
            log.append(&ents, Some(&hs(2, 5))).unwrap();
            log.append(&[entry(6, 3, "b")], Some(&hs(3, 6))).unwrap();
        }
        let (log, _) = RaftLog::open(dir.path(), WalOptions::default(), meta(), (6, 3)).unwrap();
        let st = log.initial_state().unwrap().hard_state;
        assert_eq!((st.term, st.commit), (3, 6));
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (7, 6)
        );
    }

    /// Fuzz smoke: the WAL payload decoders take any bytes without a panic (`KEEL_FUZZ_ITERS`).
    #[test]
    fn decoders_take_random_bytes() {
        use rand::{Rng, SeedableRng};
        let iters = crate::test_cases("KEEL_FUZZ_ITERS", 3000);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xba7c);
        let good = encode_batch(&HardState::default(), &[entry(5, 1, "hello")]);
        for _ in 0..iters {
            let mut b = if rng.gen_bool(0.5) {
                good.clone()
            } else {
                (0..rng.gen_range(0..200)).map(|_| rng.gen()).collect()
            };
            for _ in 0..rng.gen_range(0..4) {
                if !b.is_empty() {
                    let i = rng.gen_range(0..b.len());
                    b[i] = rng.gen();
                }
            }
            b.truncate(rng.gen_range(0..=b.len()));
            let _ = decode_batch(&b);
            let _ = decode_meta(&b);
            let _ = crate::mvcc::decode_record(&b);
        }
    }

    #[test]
    fn batch_codec_rejects_trailing_or_short_bytes() {
        let hs = HardState::default();
        let mut b = encode_batch(&hs, &[entry(5, 1, "hello")]);
        assert_eq!(decode_batch(&b).unwrap().1[0].data.as_ref(), b"hello");
        b.push(0);
        assert!(decode_batch(&b).is_none());
        b.truncate(b.len() - 3);
        assert!(decode_batch(&b).is_none());
    }
}
