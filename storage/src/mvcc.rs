//! The MVCC key-value state, with etcd's revision semantics.
//!
//! Every version of every key lives in one lock-free ordered map (crossbeam's skiplist) keyed
//! by `(key, main revision, sub revision)`, so a range is a walk in key order and "the latest
//! version of k at revision R" is one seek. A delete writes a tombstone.
//!
//! Concurrency: exactly one writer (the raft core's apply loop) and any number of readers
//! (the net cores), with no lock. The writer inserts a transaction's versions under revision
//! `current + 1`, then publishes it with one atomic store of `current_rev`; readers load
//! `current_rev` first and never look above it, so they see whole transactions or nothing.
//! Compaction first raises `compact_rev`, then removes superseded versions; a reader re-checks
//! `compact_rev` after its walk and reports `Compacted` if its revision fell below it meanwhile.
//!
//! Revisions: a fresh store is at revision 1 (as etcd's); every write transaction takes the
//! next main revision, and each change inside it the next sub revision. `create_revision`,
//! `version` (1 on create, +1 per put, tombstone resets) and `lease` are stored per version.
//!
//! Values: a version's value stays in memory until the backend commit that holds it is
//! published (`forget_value`); after that it is read from the backend by revision (`store`
//! owns the backend and the batching). A store without a backend (tests) keeps every value.

use std::ops::Bound::{Excluded, Included};
use std::sync::atomic::{AtomicI64, Ordering};

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use crossbeam_skiplist::map::Entry;
use crossbeam_skiplist::SkipMap;
use keel_proto::mvccpb::KeyValue;
use triomphe::ThinArc;

mod livecount;

use livecount::LiveCounts;

use crate::backend::file::MmapFile;
use crate::backend::{Reader, Snapshot};
use crate::error::{Error, Result};

/// A key's bytes, shared by all versions of the key: one allocation per key, and one pointer
/// in each version (the length lives in the allocation beside the count; an `Arc<[u8]>` is
/// two words, a `Bytes` four). The index holds one per version, so with millions of versions
/// every word counts.
#[derive(Clone)]
pub struct Key(ThinArc<(), u8>);

impl Key {
    pub fn new(bytes: &[u8]) -> Key {
        Key(ThinArc::from_header_and_slice((), bytes))
    }
}

impl std::ops::Deref for Key {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0.slice
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        **self == **other
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Key) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Key) -> std::cmp::Ordering {
        (**self).cmp(&**other)
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self))
    }
}

/// A version's place in the index.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyRev {
    pub key: Key,
    pub main: i64,
    pub sub: i64,
}

impl KeyRev {
    fn new(key: &[u8], main: i64, sub: i64) -> KeyRev {
        KeyRev {
            key: Key::new(key),
            main,
            sub,
        }
    }
}

/// A version in the index: what the writer needs to write the key's next version. The rest
/// (value, lease) is in the backend's record, or in `pending` until the backend commit that
/// holds the record is published.
#[derive(Debug)]
struct Version {
    /// None once the record is in the published backend snapshot (and for tombstones).
    pending: ArcSwapOption<Pending>,
    create_rev: i64,
    /// 0 marks a tombstone.
    version: i64,
}

#[derive(Debug)]
struct Pending {
    value: Bytes,
    lease: i64,
}

impl Version {
    fn new(value: Bytes, create_rev: i64, version: i64, lease: i64) -> Version {
        Version {
            pending: ArcSwapOption::from_pointee(Pending { value, lease }),
            create_rev,
            version,
        }
    }

    fn tombstone() -> Version {
        Version {
            pending: ArcSwapOption::empty(),
            create_rev: 0,
            version: 0,
        }
    }
}

type BackendSnapshot = Arc<Snapshot<MmapFile>>;

/// The backend key of the record of revision (main, sub): `r` + both big-endian, so records
/// sort by revision.
pub fn record_key(main: i64, sub: i64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = b'r';
    k[1..9].copy_from_slice(&(main as u64).to_be_bytes());
    k[9..17].copy_from_slice(&(sub as u64).to_be_bytes());
    k
}

/// A record's value: `create_rev i64 | version i64 (0: tombstone) | lease i64 | key_len u32
/// | key | value`, little-endian.
pub fn encode_record(kv: &KeyValue) -> Vec<u8> {
    let mut r = Vec::with_capacity(28 + kv.key.len() + kv.value.len());
    r.extend_from_slice(&kv.create_revision.to_le_bytes());
    r.extend_from_slice(&kv.version.to_le_bytes());
    r.extend_from_slice(&kv.lease.to_le_bytes());
    r.extend_from_slice(&(kv.key.len() as u32).to_le_bytes());
    r.extend_from_slice(&kv.key);
    r.extend_from_slice(&kv.value);
    r
}

/// A decoded record: (key, value, create_rev, version, lease).
pub struct Record<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub create_rev: i64,
    pub version: i64,
    pub lease: i64,
}

pub fn decode_record(r: &[u8]) -> Option<Record<'_>> {
    let i64_at = |at: usize| Some(i64::from_le_bytes(r.get(at..at + 8)?.try_into().ok()?));
    let klen = u32::from_le_bytes(r.get(24..28)?.try_into().ok()?) as usize;
    Some(Record {
        create_rev: i64_at(0)?,
        version: i64_at(8)?,
        lease: i64_at(16)?,
        key: r.get(28..28 + klen)?,
        value: r.get(28 + klen..)?,
    })
}

/// Which keys a range covers, in etcd's terms.
#[derive(Clone, Copy, Debug)]
pub enum KeyRange<'a> {
    /// Exactly this key (request `range_end` empty).
    Single(&'a [u8]),
    /// `[start, end)`; `end` empty means no upper bound (request `range_end` "\0").
    Span(&'a [u8], &'a [u8]),
}

impl<'a> KeyRange<'a> {
    /// Builds the range from a request's key and range_end, as etcd does.
    pub fn from_request(key: &'a [u8], range_end: &'a [u8]) -> KeyRange<'a> {
        match range_end {
            [] => KeyRange::Single(key),
            [0] => KeyRange::Span(key, &[]),
            end => KeyRange::Span(key, end),
        }
    }

    fn start(&self) -> &'a [u8] {
        match *self {
            KeyRange::Single(k) | KeyRange::Span(k, _) => k,
        }
    }

    pub fn contains(&self, k: &[u8]) -> bool {
        match *self {
            KeyRange::Single(s) => k == s,
            KeyRange::Span(s, e) => k >= s && (e.is_empty() || k < e),
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RangeOptions {
    /// 0: no limit.
    pub limit: usize,
    /// <= 0: the current revision.
    pub rev: i64,
    pub count_only: bool,
}

#[derive(Debug, Default)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// Live keys in the range at the read revision, regardless of limit.
    pub count: usize,
    /// The store's current revision when the range ran.
    pub rev: i64,
}

/// Live-key counts of `[start, end)` at one revision, sampled every `COUNT_SAMPLE_KEYS` keys.
/// A paginated list asks again and again with the same end and revision and a start that
/// moves forward (kube-apiserver's lists): with this, each later page counts in
/// O(sample + limit) instead of walking to the end of the range again (etcd walks it).
/// History at a revision never changes, so an index stays true while the revision is
/// readable.
struct CountIndex {
    rev: i64,
    start: Bytes,
    /// Empty: no upper bound.
    end: Bytes,
    total: usize,
    /// (key, live keys in [start, key)) for every `COUNT_SAMPLE_KEYS`th live key, ascending.
    samples: Vec<(Key, usize)>,
}

const COUNT_SAMPLE_KEYS: usize = 256;
/// Ranges with fewer live keys are simply walked.
const COUNT_INDEX_KEYS_MIN: usize = 4096;
/// Count indexes kept (most recent first).
const COUNT_INDEXES_MAX: usize = 8;

pub struct Mvcc {
    /// Recent count indexes (see `CountIndex`); readers only.
    count_indexes: std::sync::Mutex<std::collections::VecDeque<Arc<CountIndex>>>,
    map: SkipMap<KeyRev, Version>,
    /// Live-key counts by key span, at the newest revision (see `livecount`).
    live: LiveCounts,
    current_rev: AtomicI64,
    compact_rev: AtomicI64,
    /// Revisions readers have pinned (`pin`), with how many readers each: the compactor
    /// removes nothing a compaction past one of them would (`compact_chunk_unpinned`).
    pins: std::sync::Mutex<std::collections::BTreeMap<i64, usize>>,
    /// Where values live once forgotten in memory.
    db: Option<Reader<MmapFile>>,
}

impl Default for Mvcc {
    fn default() -> Self {
        Mvcc::new()
    }
}

impl Mvcc {
    /// An in-memory store (every value stays in memory).
    pub fn new() -> Mvcc {
        Mvcc {
            count_indexes: Default::default(),
            map: SkipMap::new(),
            live: LiveCounts::empty(),
            current_rev: AtomicI64::new(1),
            compact_rev: AtomicI64::new(-1),
            pins: Default::default(),
            db: None,
        }
    }

    /// A store whose forgotten values are read from `db`, at these revisions.
    pub fn with_backend(db: Reader<MmapFile>, current_rev: i64, compact_rev: i64) -> Mvcc {
        Mvcc {
            count_indexes: Default::default(),
            map: SkipMap::new(),
            live: LiveCounts::unbuilt(),
            current_rev: AtomicI64::new(current_rev),
            compact_rev: AtomicI64::new(compact_rev),
            pins: Default::default(),
            db: Some(db),
        }
    }

    /// Adds a version read back from the backend (its value stays there). Versions of one
    /// key share the key's bytes.
    pub fn insert_recovered(&self, key: &[u8], main: i64, sub: i64, r: &Record<'_>) {
        let probe = KeyRev::new(key, 0, 0);
        let shared = match self.map.lower_bound(Included(&probe)) {
            Some(e) if *e.key().key == *key => e.key().key.clone(),
            _ => probe.key,
        };
        let v = Version {
            pending: ArcSwapOption::empty(),
            create_rev: r.create_rev,
            version: r.version,
        };
        self.map.insert(
            KeyRev {
                key: shared,
                main,
                sub,
            },
            v,
        );
    }

    /// Builds the live-key counts once every recovered version is in (before any read or
    /// write): until then counts walk.
    pub fn recovered(&self) {
        self.live.rebuild(self, self.current_rev());
    }

    /// The backend this index reads forgotten values from.
    pub fn backend(&self) -> Option<&Reader<MmapFile>> {
        self.db.as_ref()
    }

    /// Drops the backend map's resident pages from this process's RSS (a long read, such as
    /// a streamed range, calls it as it goes so the pages it read do not pile up).
    pub fn release_map(&self) {
        if let Some(db) = &self.db {
            db.release_map();
        }
    }

    /// Drops the in-memory copy of a version's value (it is in the published backend).
    pub fn forget_value(&self, kr: &KeyRev) {
        if let Some(e) = self.map.get(kr) {
            e.value().pending.store(None);
        }
    }

    /// A version's value and lease: from memory, else from the backend (reloading the
    /// snapshot when the record was published after `snap` was taken).
    fn value_of(
        &self,
        kr: &KeyRev,
        v: &Version,
        snap: &mut Option<BackendSnapshot>,
    ) -> Result<(Bytes, i64)> {
        if let Some(p) = v.pending.load_full() {
            return Ok((p.value.clone(), p.lease));
        }
        let db = self
            .db
            .as_ref()
            .expect("values are forgotten only with a backend");
        let key = record_key(kr.main, kr.sub);
        for fresh in [false, true] {
            if fresh || snap.is_none() {
                *snap = Some(db.snapshot());
            }
            let s = snap.as_ref().expect("set above");
            if let Some(rec) = s.get(&key)? {
                let r = decode_record(rec).ok_or_else(|| {
                    let what = format!("record of revision {}/{} does not decode", kr.main, kr.sub);
                    crate::backend::page::corrupt(0, what)
                })?;
                return Ok((Bytes::copy_from_slice(r.value), r.lease));
            }
        }
        // Gone from the newest snapshot too: compacted away while this read ran (the
        // caller's re-check of the compaction revision reports it).
        Err(Error::Compacted)
    }

    pub fn current_rev(&self) -> i64 {
        self.current_rev.load(Ordering::Acquire)
    }

    /// The last compaction revision, -1 if never compacted.
    pub fn compact_rev(&self) -> i64 {
        self.compact_rev.load(Ordering::Acquire)
    }

    /// A read at the published revision (or at `opts.rev`).
    pub fn range(&self, range: KeyRange<'_>, opts: RangeOptions) -> Result<RangeResult> {
        self.range_at(range, opts, self.current_rev(), false)
    }

    /// `pinned`: the read is at a revision a `ReadPin` holds, which stays readable whatever
    /// compaction comes.
    fn range_at(
        &self,
        range: KeyRange<'_>,
        opts: RangeOptions,
        cur: i64,
        pinned: bool,
    ) -> Result<RangeResult> {
        if opts.rev > cur {
            return Err(Error::FutureRev);
        }
        let rev = if opts.rev <= 0 { cur } else { opts.rev };
        if !pinned && rev < self.compact_rev() {
            return Err(Error::Compacted);
        }
        let mut out = RangeResult {
            rev: cur,
            ..Default::default()
        };
        let mut snap = None;
        let mut failed = None;
        // Keys past the limit, and all of a count-only range, are only counted: without a
        // walk when the counts can tell (only at published revisions).
        let countable = rev <= self.current_rev();
        if let (true, true, KeyRange::Span(start, end)) = (countable, opts.count_only, range) {
            out.count = self.count_from(start, end, rev);
            return self.checked(rev, out, pinned);
        }
        let indexable = countable && opts.limit > 0 && !opts.count_only;
        let mut rest_from: Option<Key> = None;
        self.walk_while(range, rev, |kr, v| {
            if indexable && out.kvs.len() == opts.limit {
                if let KeyRange::Span(..) = range {
                    rest_from = Some(kr.key.clone());
                    return false;
                }
            }
            out.count += 1;
            if failed.is_none()
                && !opts.count_only
                && (opts.limit == 0 || out.kvs.len() < opts.limit)
            {
                match self.to_kv(kr, v, &mut snap) {
                    Ok(kv) => out.kvs.push(kv),
                    Err(e) => failed = Some(e),
                }
            }
            true
        });
        if let (Some(from), KeyRange::Span(_, end)) = (rest_from, range) {
            out.count += self.count_from(&from, end, rev);
        }
        if let Some(e) = failed {
            return Err(e);
        }
        self.checked(rev, out, pinned)
    }

    /// `out`, unless a compaction past `rev` began while it was read.
    fn checked(&self, rev: i64, out: RangeResult, pinned: bool) -> Result<RangeResult> {
        if !pinned && rev < self.compact_rev() {
            return Err(Error::Compacted);
        }
        Ok(out)
    }

    /// Live keys in `[from, end)` at `rev` (`end` empty: no bound): from a count index made for
    /// a paginated list at `rev` when one covers it, else from the live counts, else by a walk
    /// (a long one builds a count index).
    fn count_from(&self, from: &[u8], end: &[u8], rev: i64) -> usize {
        let found = self
            .count_indexes
            .lock()
            .expect("count index lock")
            .iter()
            .find(|ix| ix.rev == rev && ix.end == end && ix.start.as_ref() <= from)
            .cloned();
        if let Some(ix) = found {
            // The last sample at or before `from`, then a short walk to `from`.
            let i = ix.samples.partition_point(|(k, _)| k.as_ref() <= from);
            let (sample, before) = match i {
                0 => return ix.total,
                i => (&ix.samples[i - 1].0, ix.samples[i - 1].1),
            };
            let mut between = 0;
            self.walk(KeyRange::Span(sample, from), rev, |_, _| between += 1);
            return ix.total - before - between;
        }
        if let Some(n) = self.live.count(self, from, end, rev) {
            return n as usize;
        }
        let mut total = 0;
        let mut samples = Vec::new();
        self.walk(KeyRange::Span(from, end), rev, |kr, _| {
            if total % COUNT_SAMPLE_KEYS == 0 {
                samples.push((kr.key.clone(), total));
            }
            total += 1;
        });
        if total >= COUNT_INDEX_KEYS_MIN {
            let mut ixs = self.count_indexes.lock().expect("count index lock");
            ixs.push_front(Arc::new(CountIndex {
                rev,
                start: Bytes::copy_from_slice(from),
                end: Bytes::copy_from_slice(end),
                total,
                samples,
            }));
            ixs.truncate(COUNT_INDEXES_MAX);
        }
        total
    }

    /// Calls `f(key and revision, version)` for each key live at `rev` in `range`, in order.
    fn walk(&self, range: KeyRange<'_>, rev: i64, mut f: impl FnMut(&KeyRev, &Version)) {
        self.walk_while(range, rev, |kr, v| {
            f(kr, v);
            true
        });
    }

    /// `walk` until `f` returns false. Steps through the versions in order (cheap next-entry
    /// moves; most keys have a version or two) and seeks past a long history instead.
    fn walk_while(
        &self,
        range: KeyRange<'_>,
        rev: i64,
        mut f: impl FnMut(&KeyRev, &Version) -> bool,
    ) {
        const STEPS_BEFORE_SEEK: usize = 4;
        let start = KeyRev::new(range.start(), 0, 0);
        let mut cursor = self.map.lower_bound(Included(&start));
        while let Some(first) = cursor {
            if !range.contains(&first.key().key) {
                return;
            }
            let mut best = None;
            let mut e = first;
            let mut steps = 0;
            let next_key = loop {
                if e.key().main <= rev {
                    best = Some(e.clone());
                }
                match e.next() {
                    Some(n) if n.key().key == e.key().key => {
                        steps += 1;
                        if steps < STEPS_BEFORE_SEEK {
                            e = n;
                            continue;
                        }
                        // A long history: seek to the version at `rev`, then past the key.
                        let at = KeyRev {
                            key: e.key().key.clone(),
                            main: rev,
                            sub: i64::MAX,
                        };
                        if let Some(l) = self.map.upper_bound(Included(&at)) {
                            if l.key().key == at.key && l.key().main <= rev {
                                best = Some(l);
                            }
                        }
                        let past = KeyRev {
                            key: at.key,
                            main: i64::MAX,
                            sub: i64::MAX,
                        };
                        break self.map.lower_bound(Excluded(&past));
                    }
                    other => break other,
                }
            };
            if let Some(b) = best {
                if b.value().version != 0 && !f(b.key(), b.value()) {
                    return;
                }
            }
            if let KeyRange::Single(_) = range {
                return;
            }
            cursor = next_key;
        }
    }

    /// Starts the (single) write transaction of the next revision.
    pub fn write(&self) -> WriteTxn<'_> {
        let begin = self.current_rev();
        WriteTxn {
            mvcc: self,
            begin_rev: begin,
            sub: 0,
            changes: Vec::new(),
            committed: false,
        }
    }

    /// Compacts to `rev` at once (tests): `schedule_compact`, then every chunk.
    #[cfg(test)]
    pub fn compact(&self, rev: i64) -> Result<Vec<(i64, i64)>> {
        self.schedule_compact(rev)?;
        let mut dropped = Vec::new();
        let mut from = Key::new(b"");
        loop {
            let (mut d, next) = self.compact_chunk(rev, &from, usize::MAX);
            dropped.append(&mut d);
            match next {
                Some(k) => from = k,
                None => return Ok(dropped),
            }
        }
    }

    /// Pins `rev` for a read made of several (a large Range read a chunk at a time, which
    /// etcd reads in one transaction): while the pin lives, a compaction past `rev` still
    /// refuses new reads below it, but removes nothing the pinned read needs. Fails as a read
    /// would if `rev` is compacted already.
    pub fn pin(self: &Arc<Self>, rev: i64) -> Result<ReadPin> {
        let mut pins = self.pins.lock().expect("pins lock");
        if rev < self.compact_rev() {
            return Err(Error::Compacted);
        }
        *pins.entry(rev).or_default() += 1;
        Ok(ReadPin {
            mvcc: self.clone(),
            rev,
        })
    }

    /// `compact_chunk`, unless a read has pinned a revision below `rev` (None: try again
    /// later). A pin is taken only at or above the compaction revision, and a chunk runs
    /// with the pins held, so no pinned read loses a version it reads.
    pub fn compact_chunk_unpinned(
        &self,
        rev: i64,
        from: &[u8],
        keys_max: usize,
    ) -> Option<CompactChunk> {
        let pins = self.pins.lock().expect("pins lock");
        if pins.first_key_value().is_some_and(|(&p, _)| p < rev) {
            return None;
        }
        Some(self.compact_chunk(rev, from, keys_max))
    }

    /// Raises the compaction revision to `rev`, checked as etcd does: reads below it fail
    /// from now on. The versions it supersedes go later, chunk by chunk (`compact_chunk`).
    pub fn schedule_compact(&self, rev: i64) -> Result<()> {
        if rev <= self.compact_rev() {
            return Err(Error::Compacted);
        }
        if rev > self.current_rev() {
            return Err(Error::FutureRev);
        }
        self.compact_rev.store(rev, Ordering::Release);
        Ok(())
    }

    /// Physically compacts up to `keys_max` keys from `from` on: drops every version below
    /// `rev` that is not the latest of its key at `rev`, and keys whose latest version at
    /// `rev` is a tombstone. Returns the revisions dropped (for the backend) and the key to
    /// continue from (None: done). Safe beside the writer and readers: it only removes
    /// versions no read at or above `rev` can see.
    pub fn compact_chunk(&self, rev: i64, from: &[u8], keys_max: usize) -> CompactChunk {
        let mut dropped = Vec::new();
        let mut cursor = self.map.lower_bound(Included(&KeyRev::new(from, 0, 0)));
        let mut keys = 0;
        while let Some(entry) = cursor {
            let key = entry.key().key.clone();
            if keys == keys_max {
                return (dropped, Some(key));
            }
            keys += 1;
            let at = KeyRev {
                key: key.clone(),
                main: rev,
                sub: i64::MAX,
            };
            if let Some(latest) = self.map.upper_bound(Included(&at)) {
                if latest.key().key == key {
                    let keep = latest.key().clone();
                    let tombstone = latest.value().version == 0;
                    let low = KeyRev::new(&key, 0, 0);
                    let upto = if tombstone {
                        Included(&keep)
                    } else {
                        Excluded(&keep)
                    };
                    for old in self.map.range((Included(&low), upto)) {
                        dropped.push((old.key().main, old.key().sub));
                        old.remove();
                    }
                }
            }
            let past = KeyRev {
                key,
                main: i64::MAX,
                sub: i64::MAX,
            };
            cursor = self.map.lower_bound(Excluded(&past));
        }
        (dropped, None)
    }

    /// etcd's HashKV: a CRC-32C over the versions up to `rev` (0: now) in revision order, each
    /// as etcd's backend stores it (17-byte revision key, `t` appended for a tombstone; the
    /// protobuf `KeyValue`), after the bucket name "key". Versions at or below the compaction
    /// revision count only if they are their key's live version at `rev` (etcd skips those
    /// a compaction is deleting), unless no key is live at `rev`. Equal to etcd's for the same
    /// history. Returns (hash, compaction revision, hashed revision).
    pub fn hash_kv(&self, rev: i64) -> Result<(u32, i64, i64)> {
        use keel_proto::prost::Message;
        let (cur, compact) = (self.current_rev(), self.compact_rev());
        if rev > 0 && rev < compact {
            return Err(Error::Compacted);
        }
        if rev > cur {
            return Err(Error::FutureRev);
        }
        let rev = if rev <= 0 { cur } else { rev };
        let mut keep = std::collections::HashSet::new();
        self.walk(KeyRange::Span(b"", b""), rev, |kr, _| {
            keep.insert((kr.main, kr.sub));
        });
        let mut versions: Vec<_> = self
            .map
            .iter()
            .filter(|e| e.key().main <= rev)
            .filter(|e| {
                let kr = e.key();
                kr.main > compact || keep.is_empty() || keep.contains(&(kr.main, kr.sub))
            })
            .collect();
        versions.sort_by_key(|e| (e.key().main, e.key().sub));
        let mut snap = None;
        let mut crc = crc32c::crc32c(b"key");
        let mut buf = Vec::new();
        for e in versions {
            let (kr, v) = (e.key(), e.value());
            let mut k = Vec::with_capacity(18);
            k.extend_from_slice(&kr.main.to_be_bytes());
            k.push(b'_');
            k.extend_from_slice(&kr.sub.to_be_bytes());
            let kv = if v.version == 0 {
                k.push(b't');
                KeyValue {
                    key: Bytes::copy_from_slice(&kr.key),
                    ..Default::default()
                }
            } else {
                self.to_kv(kr, v, &mut snap)?
            };
            buf.clear();
            kv.encode(&mut buf).expect("a Vec grows");
            crc = crc32c::crc32c_append(crc, &k);
            crc = crc32c::crc32c_append(crc, &buf);
        }
        if rev < self.compact_rev() {
            return Err(Error::Compacted);
        }
        Ok((crc, compact, rev))
    }

    /// The changes to keys in `range` at revisions `from..=to`, in revision order: what watch
    /// events are made of (a tombstone's key-value holds only the key and its mod revision,
    /// as etcd's delete events). Stops at the end of the revision where `max` changes are
    /// reached (one revision's changes are never split): returns the changes and the last
    /// revision they cover. Memory stays within about twice `max` changes (or twice the
    /// largest revision) however many match.
    pub fn changes(
        &self,
        range: KeyRange<'_>,
        from: i64,
        to: i64,
        max: usize,
    ) -> Result<(Vec<Change>, i64)> {
        let max = max.max(1);
        if from < self.compact_rev() {
            return Err(Error::Compacted);
        }
        let mut bound = to;
        let mut found = Vec::new();
        let mut cut_at = max.saturating_mul(2);
        // Keeps the changes of the first `max` (plus the rest of the last revision) and lowers
        // `bound` to the last revision kept.
        let cut = |found: &mut Vec<Entry<'_, KeyRev, Version>>, bound: &mut i64| {
            found.sort_by_key(|e| (e.key().main, e.key().sub));
            if found.len() > max {
                let last = found[max - 1].key().main;
                found.retain(|e| e.key().main <= last);
                *bound = last;
            }
        };
        let mut cursor = self
            .map
            .lower_bound(Included(&KeyRev::new(range.start(), 0, 0)));
        while let Some(first) = cursor {
            if !range.contains(&first.key().key) {
                break;
            }
            let key = first.key().key.clone();
            let at = KeyRev {
                key: key.clone(),
                main: from,
                sub: 0,
            };
            let mut e = self.map.lower_bound(Included(&at));
            while let Some(v) = e {
                if v.key().key != key || v.key().main > bound {
                    break;
                }
                e = v.next();
                found.push(v);
                // Cut when twice what was kept at the last cut: amortised, even when one
                // revision holds more than `max` changes (a big delete) and cuts cannot
                // shrink below it, or one key has a long history.
                if found.len() > cut_at {
                    cut(&mut found, &mut bound);
                    cut_at = found.len().max(max).saturating_mul(2);
                }
            }
            if let KeyRange::Single(_) = range {
                break;
            }
            let past = KeyRev {
                key,
                main: i64::MAX,
                sub: i64::MAX,
            };
            cursor = self.map.lower_bound(Excluded(&past));
        }
        cut(&mut found, &mut bound);
        let mut snap = None;
        let mut out = Vec::with_capacity(found.len());
        for e in found {
            let (kr, v) = (e.key(), e.value());
            let kv = if v.version == 0 {
                KeyValue {
                    key: Bytes::copy_from_slice(&kr.key),
                    mod_revision: kr.main,
                    ..Default::default()
                }
            } else {
                self.to_kv(kr, v, &mut snap)?
            };
            out.push((kr.clone(), kv));
        }
        if from < self.compact_rev() {
            return Err(Error::Compacted);
        }
        Ok((out, bound))
    }

    /// How many versions (including tombstones) are stored.
    pub fn versions_total(&self) -> usize {
        self.map.len()
    }
}

impl Mvcc {
    fn to_kv(
        &self,
        kr: &KeyRev,
        v: &Version,
        snap: &mut Option<BackendSnapshot>,
    ) -> Result<KeyValue> {
        let (value, lease) = self.value_of(kr, v, snap)?;
        Ok(KeyValue {
            key: Bytes::copy_from_slice(&kr.key),
            create_revision: v.create_rev,
            mod_revision: kr.main,
            version: v.version,
            value,
            lease,
        })
    }
}

impl livecount::Walker for Mvcc {
    fn count(&self, start: &[u8], end: &[u8], rev: i64) -> i64 {
        let mut n = 0;
        self.walk(KeyRange::Span(start, end), rev, |_, _| n += 1);
        n
    }

    fn cut_points(&self, start: &[u8], end: &[u8], rev: i64, every: usize) -> Vec<Key> {
        let (mut seen, mut cuts) = (0, Vec::new());
        self.walk(KeyRange::Span(start, end), rev, |kr, _| {
            if seen > 0 && seen % every == 0 {
                cuts.push(kr.key.clone());
            }
            seen += 1;
        });
        cuts
    }
}

/// A revision pinned for a read (`Mvcc::pin`); reads through it never fail as compacted.
pub struct ReadPin {
    mvcc: Arc<Mvcc>,
    rev: i64,
}

impl Drop for ReadPin {
    fn drop(&mut self) {
        let mut pins = self.mvcc.pins.lock().expect("pins lock");
        if let Some(n) = pins.get_mut(&self.rev) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.rev);
            }
        }
    }
}

impl ReadView for ReadPin {
    /// A read at the pinned revision (`opts.rev` must be it).
    fn read(&self, range: KeyRange<'_>, opts: RangeOptions) -> Result<RangeResult> {
        debug_assert_eq!(opts.rev, self.rev);
        let pinned = opts.rev == self.rev;
        self.mvcc
            .range_at(range, opts, self.mvcc.current_rev(), pinned)
    }
    fn first_rev(&self) -> i64 {
        self.mvcc.compact_rev()
    }
    fn rev(&self) -> i64 {
        self.mvcc.current_rev()
    }
}

/// The storage seam reads go through: a view of the state at a revision. The published store
/// (net cores' reads) and a write transaction (apply, seeing its own writes) both are one.
pub trait ReadView {
    fn read(&self, range: KeyRange<'_>, opts: RangeOptions) -> Result<RangeResult>;
    /// The lowest readable revision (the compaction revision).
    fn first_rev(&self) -> i64;
    /// The revision a read with no revision sees.
    fn rev(&self) -> i64;
}

impl ReadView for Mvcc {
    fn read(&self, range: KeyRange<'_>, opts: RangeOptions) -> Result<RangeResult> {
        self.range(range, opts)
    }
    fn first_rev(&self) -> i64 {
        self.compact_rev()
    }
    fn rev(&self) -> i64 {
        self.current_rev()
    }
}

impl ReadView for WriteTxn<'_> {
    fn read(&self, range: KeyRange<'_>, opts: RangeOptions) -> Result<RangeResult> {
        self.range(range, opts)
    }
    fn first_rev(&self) -> i64 {
        self.compact_rev()
    }
    fn rev(&self) -> i64 {
        WriteTxn::rev(self)
    }
}

/// A compaction chunk's outcome: the (main, sub) revisions dropped, and the key to go on
/// from (None: done).
pub type CompactChunk = (Vec<(i64, i64)>, Option<Key>);

/// One change of a write transaction: the version's index key and its key-value.
pub type Change = (KeyRev, KeyValue);

/// One write transaction: the changes of one revision. Reads inside it see its own writes.
///
/// Dropped without `commit`, it removes what it inserted: readers never saw it (the revision
/// was not published), and the next transaction reuses the revision on a clean slate.
/// `changes[i]` is the write at sub revision `i` (its index key and its key-value), so it
/// also says what to remove.
pub struct WriteTxn<'a> {
    mvcc: &'a Mvcc,
    begin_rev: i64,
    sub: i64,
    changes: Vec<Change>,
    committed: bool,
}

impl Drop for WriteTxn<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for (kr, _) in &self.changes {
            self.mvcc.map.remove(kr);
        }
    }
}

impl WriteTxn<'_> {
    fn main(&self) -> i64 {
        self.begin_rev + 1
    }

    /// The revision a read inside this transaction sees.
    pub fn rev(&self) -> i64 {
        if self.changes.is_empty() {
            self.begin_rev
        } else {
            self.main()
        }
    }

    pub fn range(&self, range: KeyRange<'_>, opts: RangeOptions) -> Result<RangeResult> {
        self.mvcc.range_at(range, opts, self.rev(), false)
    }

    /// The live version of `key` as this transaction sees it.
    pub fn get(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        let mut found = None;
        let mut snap = None;
        self.mvcc.walk(KeyRange::Single(key), self.rev(), |kr, v| {
            found = Some(self.mvcc.to_kv(kr, v, &mut snap))
        });
        found.transpose()
    }

    /// The live version's shared key bytes, create revision and version, without its value.
    fn latest(&self, key: &[u8]) -> Option<(Key, i64, i64)> {
        let mut found = None;
        self.mvcc.walk(KeyRange::Single(key), self.rev(), |kr, v| {
            found = Some((kr.key.clone(), v.create_rev, v.version))
        });
        found
    }

    /// Puts `key`; returns the revision it was written at.
    pub fn put(&mut self, key: &[u8], value: Bytes, lease: i64) -> i64 {
        let main = self.main();
        let (key, create_rev, version) = match self.latest(key) {
            Some((shared, create, version)) => (shared, create, version + 1),
            None => (Key::new(key), main, 1),
        };
        let kr = KeyRev {
            key,
            main,
            sub: self.sub,
        };
        self.sub += 1;
        debug_assert_eq!(self.changes.len() as i64, kr.sub);
        let kv = KeyValue {
            key: Bytes::copy_from_slice(&kr.key),
            create_revision: create_rev,
            mod_revision: main,
            version,
            value: value.clone(),
            lease,
        };
        self.mvcc
            .map
            .insert(kr.clone(), Version::new(value, create_rev, version, lease));
        self.changes.push((kr, kv));
        main
    }

    /// Deletes every live key in `range`; returns how many.
    pub fn delete_range(&mut self, range: KeyRange<'_>) -> i64 {
        let mut keys = Vec::new();
        self.mvcc
            .walk(range, self.rev(), |kr, _| keys.push(kr.key.clone()));
        let main = self.main();
        for key in &keys {
            let kr = KeyRev {
                key: key.clone(),
                main,
                sub: self.sub,
            };
            self.sub += 1;
            let kv = KeyValue {
                key: Bytes::copy_from_slice(key),
                mod_revision: main,
                ..Default::default()
            };
            self.mvcc.map.insert(kr.clone(), Version::tombstone());
            self.changes.push((kr, kv));
        }
        keys.len() as i64
    }

    /// Publishes the transaction to readers; returns its changes (for watchers) and the
    /// store's revision after it.
    pub fn commit(mut self) -> (Vec<Change>, i64) {
        let rev = self.rev();
        if !self.changes.is_empty() {
            // Keys created (+1) and deleted (-1); each change's version says which, in the
            // order the transaction made them.
            let deltas: Vec<(&[u8], i64)> = self
                .changes
                .iter()
                .filter_map(|(kr, kv)| match kv.version {
                    0 => Some((&kr.key[..], -1)),
                    1 => Some((&kr.key[..], 1)),
                    _ => None,
                })
                .collect();
            self.mvcc.live.apply(self.mvcc, &deltas, rev);
            self.mvcc.current_rev.store(rev, Ordering::Release);
        }
        self.committed = true;
        (std::mem::take(&mut self.changes), rev)
    }

    /// The compaction revision (reads below it fail).
    pub fn compact_rev(&self) -> i64 {
        self.mvcc.compact_rev()
    }

    /// The changes made so far, in order.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn put(m: &Mvcc, k: &str, v: &str) -> i64 {
        let mut t = m.write();
        let r = t.put(k.as_bytes(), Bytes::copy_from_slice(v.as_bytes()), 0);
        t.commit();
        r
    }

    fn del(m: &Mvcc, k: &str, end: &str) -> i64 {
        let mut t = m.write();
        let n = t.delete_range(KeyRange::from_request(k.as_bytes(), end.as_bytes()));
        t.commit();
        n
    }

    /// Every live key at `rev` (0: now).
    fn all_at(m: &Mvcc, rev: i64) -> Result<RangeResult> {
        m.range(
            KeyRange::from_request(b"\0", b"\0"),
            RangeOptions {
                rev,
                ..Default::default()
            },
        )
    }

    /// Key `k` at `rev` (0: now).
    fn key_at(m: &Mvcc, k: &[u8], rev: i64) -> RangeResult {
        m.range(
            KeyRange::Single(k),
            RangeOptions {
                rev,
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn keys(r: &RangeResult) -> Vec<String> {
        r.kvs
            .iter()
            .map(|kv| String::from_utf8(kv.key.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn revisions_versions_and_tombstones_follow_etcd() {
        let m = Mvcc::new();
        assert_eq!(m.current_rev(), 1);
        assert_eq!(put(&m, "a", "1"), 2);
        assert_eq!(put(&m, "a", "2"), 3);
        let r = m
            .range(KeyRange::Single(b"a"), RangeOptions::default())
            .unwrap();
        let kv = &r.kvs[0];
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));
        assert_eq!(del(&m, "a", ""), 1);
        assert_eq!(m.current_rev(), 4);
        assert_eq!(del(&m, "a", ""), 0);
        assert_eq!(m.current_rev(), 4, "a delete of nothing writes no revision");
        put(&m, "a", "3");
        let kv = m
            .range(KeyRange::Single(b"a"), RangeOptions::default())
            .unwrap()
            .kvs[0]
            .clone();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (5, 5, 1));
        let old = key_at(&m, b"a", 3);
        assert_eq!(old.kvs[0].value, Bytes::from_static(b"2"));
        assert_eq!(old.rev, 5, "header revision is the current one");
        let gone = key_at(&m, b"a", 4);
        assert!(gone.kvs.is_empty());
    }

    #[test]
    fn ranges_limits_counts_and_bounds() {
        let m = Mvcc::new();
        for k in ["a", "ab", "abc", "b", "c"] {
            put(&m, k, k);
        }
        let all = m
            .range(
                KeyRange::from_request(b"\0", b"\0"),
                RangeOptions::default(),
            )
            .unwrap();
        assert_eq!(keys(&all), ["a", "ab", "abc", "b", "c"]);
        let pre = m
            .range(KeyRange::from_request(b"a", b"b"), RangeOptions::default())
            .unwrap();
        assert_eq!(keys(&pre), ["a", "ab", "abc"]);
        let lim = m
            .range(
                KeyRange::from_request(b"a", b"\0"),
                RangeOptions {
                    limit: 2,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!((keys(&lim), lim.count), (vec!["a".into(), "ab".into()], 5));
        let cnt = m
            .range(
                KeyRange::from_request(b"ab", b"\0"),
                RangeOptions {
                    count_only: true,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!((cnt.kvs.len(), cnt.count), (0, 4));
        let empty = m
            .range(KeyRange::from_request(b"c", b"a"), RangeOptions::default())
            .unwrap();
        assert_eq!(empty.count, 0);
        assert!(matches!(
            m.range(
                KeyRange::Single(b"a"),
                RangeOptions {
                    rev: 99,
                    ..Default::default()
                }
            ),
            Err(Error::FutureRev)
        ));
    }

    #[test]
    fn compaction_keeps_latest_and_reports_errors() {
        let m = Mvcc::new();
        put(&m, "a", "1"); // 2
        put(&m, "a", "2"); // 3
        put(&m, "b", "1"); // 4
        del(&m, "b", ""); // 5
        put(&m, "c", "1"); // 6
        assert_eq!(m.compact(5).unwrap(), [(2, 0), (4, 0), (5, 0)]);
        let at = |rev| all_at(&m, rev);
        assert!(matches!(at(4), Err(Error::Compacted)));
        assert_eq!(keys(&at(5).unwrap()), ["a"]);
        assert_eq!(keys(&at(6).unwrap()), ["a", "c"]);
        assert_eq!(m.versions_total(), 2, "a@3 and c@6 remain");
        assert!(matches!(m.compact(5), Err(Error::Compacted)));
        assert!(matches!(m.compact(4), Err(Error::Compacted)));
        assert!(matches!(m.compact(7), Err(Error::FutureRev)));
    }

    /// The hashes etcd 3.4.23 gives for the same history (`etcdctl endpoint hashkv`).
    #[test]
    fn hash_kv_equals_etcds() {
        let m = Mvcc::new();
        assert_eq!(m.hash_kv(0).unwrap(), (1084519789, -1, 1));
        put(&m, "a", "1"); // 2
        put(&m, "b", "2"); // 3
        put(&m, "a", "3"); // 4
        del(&m, "b", ""); // 5
        assert_eq!(m.hash_kv(0).unwrap(), (1125682900, -1, 5));
        assert_eq!(m.hash_kv(3).unwrap(), (1827592406, -1, 3));
        m.compact(3).unwrap();
        assert_eq!(m.hash_kv(0).unwrap(), (1468967122, 3, 5));
        assert!(matches!(m.hash_kv(2), Err(Error::Compacted)));
        assert!(matches!(m.hash_kv(9), Err(Error::FutureRev)));
    }

    #[test]
    fn txn_reads_its_own_writes_and_readers_do_not_until_commit() {
        let m = Mvcc::new();
        let mut t = m.write();
        t.put(b"x", Bytes::from_static(b"1"), 0);
        assert!(t.get(b"x").unwrap().is_some());
        assert!(m
            .range(KeyRange::Single(b"x"), RangeOptions::default())
            .unwrap()
            .kvs
            .is_empty());
        t.put(b"y", Bytes::from_static(b"1"), 0);
        let (changes, rev) = t.commit();
        assert_eq!((changes.len(), rev), (2, 2));
        assert_eq!(
            m.range(KeyRange::Single(b"y"), RangeOptions::default())
                .unwrap()
                .kvs[0]
                .mod_revision,
            2
        );
    }

    #[test]
    fn dropped_txn_leaves_no_trace() {
        let m = Mvcc::new();
        put(&m, "a", "1");
        {
            let mut t = m.write();
            t.put(b"b", Bytes::from_static(b"2"), 0);
            assert_eq!(t.delete_range(KeyRange::Single(b"a")), 1);
            t.put(b"c", Bytes::from_static(b"2"), 0);
        }
        assert_eq!(m.versions_total(), 1, "the puts and the tombstone are gone");
        put(&m, "b", "3");
        let r = all_at(&m, 0).unwrap();
        assert_eq!(keys(&r), ["a", "b"]);
        assert_eq!(r.kvs[0].value, Bytes::from_static(b"1"));
    }

    /// Pages of a long list (the same end and revision, a start moving forward, a limit)
    /// count exactly what a full walk counts, also once a count index serves them.
    #[test]
    fn paginated_counts_match_a_full_walk() {
        let m = Mvcc::new();
        for i in 0..6000 {
            put(&m, &format!("p/{i:05}"), "v");
        }
        del(&m, "p/01000", "p/01500");
        let rev = m.current_rev();
        // Keys created after the list's revision all over its range: the live counts cannot
        // tell the list's revision, so a count index is made.
        for i in (0..6000).step_by(60) {
            put(&m, &format!("p/{i:05}/later"), "later");
        }
        let (mut start, mut seen) = (b"p/".to_vec(), 0);
        loop {
            let page = m
                .range(
                    KeyRange::Span(&start, b"p0"),
                    RangeOptions {
                        limit: 500,
                        rev,
                        count_only: false,
                    },
                )
                .unwrap();
            assert_eq!(page.count, 5500 - seen, "after {seen} keys");
            seen += page.kvs.len();
            if page.kvs.len() < 500 {
                break;
            }
            start = page.kvs.last().unwrap().key.to_vec();
            start.push(0);
        }
        assert_eq!(seen, 5500);
        assert_eq!(
            m.count_indexes.lock().unwrap().len(),
            1,
            "one index served the pages"
        );
    }

    /// Random puts/deletes checked against a model of every revision.
    #[test]
    fn matches_a_model_at_every_revision() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let m = Mvcc::new();
        let mut model: BTreeMap<String, String> = BTreeMap::new();
        let mut history = vec![(1i64, model.clone())];
        for i in 0..400 {
            let k = format!("k{}", rng.gen_range(0..30));
            if rng.gen_bool(0.7) {
                put(&m, &k, &i.to_string());
                model.insert(k, i.to_string());
            } else {
                let end = format!("k{}", rng.gen_range(0..30));
                let n = del(&m, &k, &end);
                let doomed: Vec<String> = model
                    .keys()
                    .filter(|x| x.as_str() >= k.as_str() && x.as_str() < end.as_str())
                    .cloned()
                    .collect();
                assert_eq!(n as usize, doomed.len());
                for d in doomed {
                    model.remove(&d);
                }
            }
            if history.last().unwrap().1 != model {
                history.push((m.current_rev(), model.clone()));
            }
        }
        for (rev, snap) in &history {
            let r = all_at(&m, *rev).unwrap();
            let got: BTreeMap<String, String> = r
                .kvs
                .iter()
                .map(|kv| {
                    (
                        String::from_utf8(kv.key.to_vec()).unwrap(),
                        String::from_utf8(kv.value.to_vec()).unwrap(),
                    )
                })
                .collect();
            assert_eq!(&got, snap, "at revision {rev}");
        }
    }

    /// Live keys of a model in `[from, end)` (`end` empty: no bound).
    fn model_count(model: &std::collections::BTreeSet<Vec<u8>>, from: &[u8], end: &[u8]) -> i64 {
        model
            .iter()
            .filter(|k| k.as_slice() >= from && (end.is_empty() || k.as_slice() < end))
            .count() as i64
    }

    /// Random transactions (creates, updates, range deletes, several at a revision) over a key
    /// space large enough to split and merge buckets: the live counts equal a model's at
    /// every revision they answer for, and they answer for the newest one whatever the range.
    #[test]
    fn live_counts_equal_a_model_at_every_revision() {
        use rand::{Rng, SeedableRng};
        use std::collections::BTreeSet;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let m = Mvcc::new();
        let key = |i: u32| format!("k{i:05}").into_bytes();
        let mut model = BTreeSet::new();
        let mut history = vec![(1i64, model.clone())];
        let (mut buckets_max, mut recent_answered) = (0, 0);
        for round in 0..1500 {
            let mut t = m.write();
            for _ in 0..rng.gen_range(1..4) {
                let k = key(rng.gen_range(0..6000));
                // Grow first, then shrink, so buckets split and then merge.
                let grow = if round < 1000 { 0.9 } else { 0.05 };
                if rng.gen_bool(grow) {
                    for j in 0..rng.gen_range(1..20) {
                        let k = key(rng.gen_range(0..6000) / 20 * 20 + j);
                        t.put(&k, Bytes::from_static(b"v"), 0);
                        model.insert(k);
                    }
                } else {
                    let end = key(rng.gen_range(0..6000));
                    let n = t.delete_range(KeyRange::Span(&k, &end));
                    let before = model.len();
                    model.retain(|x| !(x.as_slice() >= &k[..] && x.as_slice() < &end[..]));
                    assert_eq!(n as usize, before - model.len());
                }
            }
            t.commit();
            if round % 7 == 0 {
                history.push((m.current_rev(), model.clone()));
            }
            buckets_max = buckets_max.max(m.live.buckets_total());
            let cur = m.current_rev();
            for _ in 0..round % 2 {
                let (a, b) = (key(rng.gen_range(0..6100)), key(rng.gen_range(0..6100)));
                let end: &[u8] = if rng.gen_bool(0.2) { b"" } else { &b };
                let got = m.live.count(&m, &a, end, cur);
                assert_eq!(got, Some(model_count(&model, &a, end)), "at {cur}");
            }
            // A recent older revision: buckets changed since are walked at it.
            if round % 5 == 0 {
                let (rev, snap) =
                    &history[rng.gen_range(history.len().saturating_sub(5)..history.len())];
                let a = key(rng.gen_range(0..1000));
                let got = m.live.count(&m, &a, b"", *rev);
                if let Some(n) = got {
                    assert_eq!(n, model_count(snap, &a, b""), "at {rev} of {cur}");
                    recent_answered += 1;
                }
            }
        }
        assert!(
            recent_answered > 100,
            "recent revisions answered: {recent_answered}"
        );
        assert!(buckets_max > 10, "the buckets split: {buckets_max}");
        let buckets_end = m.live.buckets_total();
        assert!(
            buckets_end < buckets_max / 4,
            "merged: {buckets_end} of {buckets_max}"
        );
        let (mut answered, mut asked) = (0, 0);
        for (rev, snap) in &history {
            for _ in 0..2 {
                let (a, b) = (key(rng.gen_range(0..6100)), key(rng.gen_range(0..6100)));
                asked += 1;
                if let Some(n) = m.live.count(&m, &a, &b, *rev) {
                    answered += 1;
                    assert_eq!(n, model_count(snap, &a, &b), "at {rev}");
                }
                let r = m.range(
                    KeyRange::Span(&a, &b),
                    RangeOptions {
                        rev: *rev,
                        count_only: true,
                        ..Default::default()
                    },
                );
                assert_eq!(r.unwrap().count as i64, model_count(snap, &a, &b));
            }
        }
        assert!(
            answered > asked / 10,
            "older revisions answered: {answered}/{asked}"
        );
    }

    /// Readers counting at the published revision while the writer creates and deletes keys
    /// (splitting and merging buckets) get exactly what a walk at that revision counts.
    #[test]
    fn live_counts_hold_beside_a_running_writer() {
        use rand::{Rng, SeedableRng};
        let m = Arc::new(Mvcc::new());
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (m, done) = (m.clone(), done.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(5);
                for _ in 0..6000 {
                    let k = format!("k{:05}", rng.gen_range(0..4000));
                    let mut t = m.write();
                    if rng.gen_bool(0.7) {
                        t.put(k.as_bytes(), Bytes::from_static(b"v"), 0);
                    } else {
                        let end = format!("k{:05}", rng.gen_range(0..4000));
                        t.delete_range(KeyRange::Span(k.as_bytes(), end.as_bytes()));
                    }
                    t.commit();
                }
                done.store(true, Ordering::Release);
            })
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let mut answered = 0;
        while !done.load(Ordering::Acquire) || answered == 0 {
            let rev = m.current_rev();
            let a = format!("k{:05}", rng.gen_range(0..4000));
            let got = m.live.count(&*m, a.as_bytes(), b"", rev);
            let mut walked = 0;
            m.walk(KeyRange::Span(a.as_bytes(), b""), rev, |_, _| walked += 1);
            if let Some(n) = got {
                assert_eq!(n, walked, "from {a} at {rev}");
                answered += 1;
            }
        }
        writer.join().unwrap();
        assert!(answered > 100, "answered {answered}");
    }

    #[test]
    fn changes_are_the_history_of_a_range_in_revision_order() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let m = Mvcc::new();
        let mut live: BTreeMap<String, i64> = BTreeMap::new();
        // (revision, sub, key, value or None for a delete, create revision, version)
        let mut log: Vec<(i64, i64, String, Option<String>, i64, i64)> = Vec::new();
        for i in 0..300 {
            let k = format!("k{:02}", rng.gen_range(0..20));
            if rng.gen_bool(0.75) {
                let rev = put(&m, &k, &format!("v{i}"));
                let kv = m.range(KeyRange::Single(k.as_bytes()), RangeOptions::default());
                let kv = kv.unwrap().kvs.remove(0);
                live.insert(k.clone(), kv.create_revision);
                log.push((
                    rev,
                    0,
                    k,
                    Some(format!("v{i}")),
                    kv.create_revision,
                    kv.version,
                ));
            } else {
                let end = format!("k{:02}", rng.gen_range(0..20));
                let doomed: Vec<String> = live
                    .keys()
                    .filter(|x| x.as_str() >= k.as_str() && x.as_str() < end.as_str())
                    .cloned()
                    .collect();
                del(&m, &k, &end);
                for (sub, d) in doomed.into_iter().enumerate() {
                    live.remove(&d);
                    log.push((m.current_rev(), sub as i64, d, None, 0, 0));
                }
            }
        }
        let cur = m.current_rev();
        for _ in 0..300 {
            let a = format!("k{:02}", rng.gen_range(0..20));
            let b = format!("k{:02}", rng.gen_range(0..21));
            let single = rng.gen_bool(0.3);
            let range = if single {
                KeyRange::Single(a.as_bytes())
            } else {
                KeyRange::Span(a.as_bytes(), b.as_bytes())
            };
            let from = rng.gen_range(1..cur + 2);
            let to = rng.gen_range(from - 1..cur + 1);
            let max = rng.gen_range(1..40);
            let (got, last) = m.changes(range, from, to, max).unwrap();
            let mut want: Vec<_> = log
                .iter()
                .filter(|e| e.0 >= from && e.0 <= to && range.contains(e.2.as_bytes()))
                .collect();
            let mut want_last = to;
            if want.len() > max {
                want_last = want[max - 1].0;
                want.retain(|e| e.0 <= want_last);
            }
            assert_eq!(
                last, want_last,
                "{a}..{b} single {single} {from}..={to} max {max}"
            );
            assert_eq!(got.len(), want.len(), "{a}..{b} {from}..={to} max {max}");
            for ((kr, kv), w) in got.iter().zip(&want) {
                assert_eq!((kr.main, kr.sub), (w.0, w.1));
                assert_eq!(kv.key, w.2.as_bytes());
                assert_eq!(kv.mod_revision, w.0);
                match &w.3 {
                    Some(v) => {
                        assert_eq!(kv.value, v.as_bytes());
                        assert_eq!((kv.create_revision, kv.version), (w.4, w.5));
                    }
                    None => assert_eq!((kv.create_revision, kv.version), (0, 0)),
                }
            }
        }
        m.compact(cur / 2).unwrap();
        let all = KeyRange::Span(b"", b"");
        assert!(matches!(
            m.changes(all, cur / 2 - 1, cur, 10),
            Err(Error::Compacted)
        ));
        let (after, _) = m.changes(all, cur / 2 + 1, cur, usize::MAX).unwrap();
        let want = log.iter().filter(|e| e.0 > cur / 2).count();
        assert_eq!(after.len(), want);
    }

    #[test]
    fn changes_keep_a_revision_larger_than_the_limit_whole() {
        let m = Mvcc::new();
        for i in 0..3000 {
            put(&m, &format!("b{i:04}"), "v");
        }
        put(&m, "a", "before");
        del(&m, "b", "c"); // one revision, 3000 deletes
        let del_rev = m.current_rev();
        put(&m, "c", "after");
        let all = KeyRange::Span(b"", b"");
        let (got, last) = m.changes(all, del_rev - 1, m.current_rev(), 10).unwrap();
        assert_eq!(last, del_rev, "cut after the big revision, not inside it");
        assert_eq!(got.len(), 3001);
        assert_eq!(got[0].1.key, &b"a"[..]);
        assert!(got[1..]
            .iter()
            .all(|(kr, kv)| kr.main == del_rev && kv.version == 0));
        let subs: Vec<i64> = got[1..].iter().map(|(kr, _)| kr.sub).collect();
        assert_eq!(subs, (0..3000).collect::<Vec<i64>>());
        // One key's long history is cut too, at whole revisions.
        for i in 0..500 {
            put(&m, "hot", &i.to_string());
        }
        let first = m.current_rev() - 499;
        let (got, last) = m
            .changes(KeyRange::Single(b"hot"), first, m.current_rev(), 100)
            .unwrap();
        assert_eq!((got.len() as i64, last), (100, first + 99));
    }
}
