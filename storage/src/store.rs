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
//! Batches are written by a committer thread of their own, so the raft core never waits for
//! the backend's page writes and syncs: it hands a batch over a one-slot channel and goes on
//! applying (a batch that finds the slot taken keeps growing until it is free). The committer
//! publishes the new snapshot, then drops the batch's values from memory. A backend that
//! cannot be written is fatal: the committer panics, which stops the process.
//!
//! ```text
//! backend keys:
//!   'r' | main u64 BE | sub u64 BE    -> record (see mvcc::encode_record)
//!   "m/consistent_index"              -> u64 LE
//!   "m/term"                          -> u64 LE, term of that entry
//!   "m/current_rev"                   -> i64 LE
//!   "m/compact_rev"                   -> i64 LE (-1: never compacted)
//!   "m/alarms"                        -> n x (member u64 LE | alarm type i32 LE)
//!   "m/finished_compact_rev"          -> i64 LE, the last compaction carried out in full
//!   "m/members"                       -> the membership, encoded by the node (opaque here)
//! ```
//!
//! Compaction (etcd's scheduled/finished pair): applying KV.Compact raises the compaction
//! revision at once (reads below it fail from then on) and hands the physical work to a
//! compactor thread. It waits until the backend holds everything up to the compaction's
//! entry, then removes superseded versions from the index in chunks of
//! `COMPACTION_KEYS_PER_CHUNK` keys, sending their record deletes to the committer, with a
//! pause between chunks, so writes never wait for it. A restart that finds the finished
//! revision behind the scheduled one compacts again (it is idempotent).

use std::collections::HashSet;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::backend::file::MmapFile;
use crate::backend::{compact_copy_of, copy_keys, Backend, Options, SpaceStats};
use crate::error::{Error, Result};
use crate::mvcc::{decode_record, encode_record, record_key, Change, Key, Mvcc, WriteTxn};

pub(crate) const META_CONSISTENT_INDEX: &[u8] = b"m/consistent_index";
pub(crate) const META_TERM: &[u8] = b"m/term";
pub(crate) const META_CURRENT_REV: &[u8] = b"m/current_rev";
pub(crate) const META_COMPACT_REV: &[u8] = b"m/compact_rev";
pub(crate) const META_ALARMS: &[u8] = b"m/alarms";
pub(crate) const META_FINISHED_COMPACT_REV: &[u8] = b"m/finished_compact_rev";
pub(crate) const META_MEMBERS: &[u8] = b"m/members";
/// Lease records: `l` + lease ID (8 bytes, big-endian) -> `ttl i64 | remaining_ttl i64`
/// (little-endian; remaining 0: none checkpointed).
pub(crate) const LEASE_PREFIX: u8 = b'l';

/// A lease as the state machine keeps it (etcd's leasepb.Lease).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// The granted TTL, seconds.
    pub ttl: i64,
    /// The remaining TTL at the last checkpoint (0: none).
    pub remaining_ttl: i64,
}

pub(crate) fn lease_key(id: i64) -> [u8; 9] {
    let mut k = [LEASE_PREFIX; 9];
    k[1..].copy_from_slice(&(id as u64).to_be_bytes());
    k
}
/// Keys per compaction chunk and the pause after each (etcd's compaction batch limit and
/// sleep interval defaults).
const COMPACTION_KEYS_PER_CHUNK: usize = 1000;
const COMPACTION_PAUSE: Duration = Duration::from_millis(10);
/// How often the committer drops the backend map's resident pages from RSS.
const MAP_RELEASE_INTERVAL: Duration = Duration::from_secs(10);
/// The niceness of the defragmentation copy's thread where SCHED_IDLE is refused.
const DEFRAG_NICE: libc::c_int = 10;
/// While writes are being applied, a defrag copies at most this many bytes a second.
const DEFRAG_BYTES_PER_SEC_UNDER_LOAD: f64 = (32 << 20) as f64;
/// Keys per commit of a defrag's catch-up rounds.
const DEFRAG_CATCH_UP_KEYS: usize = if cfg!(test) { 50 } else { 20_000 };
/// The committer copies the last keys written during a defrag itself once at most this many
/// are left, or after this many rounds (writes outpacing the copy).
const DEFRAG_FINAL_KEYS: usize = if cfg!(test) { 64 } else { 20_000 };
const DEFRAG_ROUNDS_MAX: usize = 8;
/// Catch-up rounds after which the copy stops resting (see `copy_and_catch_up`).
const DEFRAG_PACED_ROUNDS: usize = 4;
/// Defragmentation copies the tree in commits of about this much.
const DEFRAG_CHUNK_BYTES: usize = 4 << 20;

/// An active alarm: (member ID, etcd's AlarmType number).
pub type Alarm = (u64, i32);

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

/// Changes applied but not yet in the backend. Records are encoded by the committer, off
/// the raft core.
#[derive(Default)]
struct Pending {
    /// New versions (index key, key-value): each record is written, then the version's
    /// value is dropped from memory.
    changes: Vec<Change>,
    since: Option<Instant>,
}

/// Lease changes not yet in the backend (None: revoked).
type LeaseChanges = std::collections::BTreeMap<i64, Option<LeaseRecord>>;

/// Work for the committer thread.
enum Job {
    Batch(Batch),
    /// Rewrite the file compactly; the result goes back on the sender.
    Defrag(Sender<Result<()>>),
    /// Record deletes of a compaction chunk; the last chunk also says it is finished.
    Compacted {
        revisions: Vec<(i64, i64)>,
        finished: Option<i64>,
    },
    Stop,
}

/// One backend commit's worth of changes, handed to the committer.
struct Batch {
    pending: Pending,
    /// The alarms, when they changed since the last batch.
    alarms: Option<Vec<Alarm>>,
    /// The membership, when it changed since the last batch.
    members: Option<Vec<u8>>,
    leases: LeaseChanges,
    applied: (u64, u64),
    current_rev: i64,
    compact_rev: i64,
    /// Told once the batch is durable and published (for `commit`).
    done: Option<Sender<()>>,
}

/// What the committer publishes for everyone else.
#[derive(Default)]
struct Published {
    pages: AtomicU64,
    free_pages: AtomicU64,
    /// The consistent index of the last durable batch.
    index: AtomicU64,
    /// The last compaction revision carried out in full (durably).
    finished_compact_rev: std::sync::atomic::AtomicI64,
    /// Set when the store goes: the compactor stops between chunks (a restart resumes).
    stopping: std::sync::atomic::AtomicBool,
    /// Set while a defrag runs: the old file grows by what is written meanwhile (its freed
    /// pages wait for the copy), so the quota counts only the pages in use.
    defragging: std::sync::atomic::AtomicBool,
}

pub struct Store {
    mvcc: Arc<Mvcc>,
    jobs: Sender<Job>,
    committer: Option<std::thread::JoinHandle<()>>,
    /// Compactions to carry out: (revision, index of the entry that scheduled it).
    compactions: Option<Sender<(i64, u64)>>,
    compactor: Option<std::thread::JoinHandle<()>>,
    published: Arc<Published>,
    pending: Pending,
    opts: StoreOptions,
    /// The last entry applied: (index, term).
    applied: (u64, u64),
    /// The consistent index of the last batch handed over.
    handed: u64,
    /// Active alarms, sorted (state-machine state, persisted with the batches).
    alarms: Vec<Alarm>,
    alarms_changed: bool,
    /// Bumped at every alarm change, so watchers of the alarms compare a number.
    alarms_epoch: u64,
    /// The membership as the node encodes it (state-machine state), if ever set.
    members: Option<Vec<u8>>,
    members_changed: bool,
    sink: Option<Box<dyn EventSink>>,
    /// Leases (state-machine state), and their changes since the last batch.
    leases: std::collections::BTreeMap<i64, LeaseRecord>,
    lease_changes: LeaseChanges,
    /// (key, lease) of every live key with a lease, found at open (taken by the lessor).
    recovered_lease_keys: Vec<(Vec<u8>, i64)>,
}

impl Drop for Store {
    fn drop(&mut self) {
        // The compactor stops between chunks; the committer finishes what it holds.
        self.published.stopping.store(true, Ordering::Release);
        self.compactions.take();
        if let Some(t) = self.compactor.take() {
            let _ = t.join();
        }
        let _ = self.jobs.send(Job::Stop);
        if let Some(t) = self.committer.take() {
            let _ = t.join();
        }
    }
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
        // A defragmentation the last run did not finish left its copy: the old file stands.
        let _ = std::fs::remove_file(defrag_path(path));
        let db = Backend::open(MmapFile::open(path)?)?;
        let snap = db.snapshot();
        let applied = (
            meta_i64(&snap, META_CONSISTENT_INDEX, 0)? as u64,
            meta_i64(&snap, META_TERM, 0)? as u64,
        );
        let mvcc = Mvcc::with_backend(
            db.reader(),
            meta_i64(&snap, META_CURRENT_REV, 1)?,
            meta_i64(&snap, META_COMPACT_REV, -1)?,
        );
        let finished = meta_i64(&snap, META_FINISHED_COMPACT_REV, -1)?;
        let alarms = match snap.get(META_ALARMS)? {
            Some(v) => decode_alarms(v).ok_or_else(|| bad_meta(META_ALARMS))?,
            None => Vec::new(),
        };
        let members = snap.get(META_MEMBERS)?.map(|v| v.to_vec());
        let mut failed = None;
        let mut leases = std::collections::BTreeMap::new();
        snap.range(&[LEASE_PREFIX], Some(&[LEASE_PREFIX + 1]), |k, v| {
            let id = k.get(1..9).and_then(|b| b.try_into().ok());
            let rec = (v.len() == 16).then(|| LeaseRecord {
                ttl: i64::from_le_bytes(v[..8].try_into().expect("8 bytes")),
                remaining_ttl: i64::from_le_bytes(v[8..].try_into().expect("8 bytes")),
            });
            match (id, rec) {
                (Some(id), Some(rec)) => {
                    leases.insert(u64::from_be_bytes(id) as i64, rec);
                    true
                }
                _ => {
                    failed = Some(bad_meta(k));
                    false
                }
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        // The lease of each key's latest version (records come in revision order).
        let mut lease_of: std::collections::HashMap<Vec<u8>, i64> = Default::default();
        snap.range(b"r", Some(b"s"), |k, v| {
            let main = k.get(1..9).unwrap_or(&[]).try_into();
            let sub = k.get(9..17).unwrap_or(&[]).try_into();
            let (Ok(main), Ok(sub)) = (main, sub) else {
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
            if rec.version == 0 || rec.lease == 0 {
                lease_of.remove(rec.key);
            } else {
                lease_of.insert(rec.key.to_vec(), rec.lease);
            }
            true
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        drop(snap);
        mvcc.recovered();
        // The rebuild read every record through the map: none of it need stay resident.
        db.release_map();
        let mvcc = Arc::new(mvcc);
        let published = Arc::new(Published::default());
        publish_space(&db, &published);
        published.index.store(applied.0, Ordering::Release);
        published
            .finished_compact_rev
            .store(finished, Ordering::Release);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let committer = {
            let (mvcc, published) = (mvcc.clone(), published.clone());
            std::thread::Builder::new()
                .name("keel-backend".into())
                .spawn({
                    let path = path.to_path_buf();
                    move || run_committer(db, path, rx, mvcc, published)
                })
                .map_err(|source| Error::Io {
                    op: "spawn backend committer",
                    path: path.to_path_buf(),
                    source,
                })?
        };
        let (ctx, crx) = crossbeam_channel::unbounded();
        let compactor = {
            let (mvcc, published, jobs) = (mvcc.clone(), published.clone(), tx.clone());
            std::thread::Builder::new()
                .name("keel-compact".into())
                .spawn(move || run_compactor(crx, mvcc, jobs, published))
                .map_err(|source| Error::Io {
                    op: "spawn compactor",
                    path: path.to_path_buf(),
                    source,
                })?
        };
        let compact_rev = mvcc.compact_rev();
        if compact_rev > finished {
            // A compaction the last run did not finish.
            let _ = ctx.send((compact_rev, 0));
        }
        Ok(Store {
            mvcc,
            jobs: tx,
            committer: Some(committer),
            compactions: Some(ctx),
            compactor: Some(compactor),
            published,
            pending: Pending::default(),
            opts,
            applied,
            handed: applied.0,
            alarms,
            alarms_changed: false,
            alarms_epoch: 0,
            members,
            members_changed: false,
            sink: None,
            leases,
            lease_changes: Default::default(),
            recovered_lease_keys: lease_of.into_iter().collect(),
        })
    }

    /// The active alarms.
    pub fn alarms(&self) -> &[Alarm] {
        &self.alarms
    }

    /// Raises an alarm; whether it was new.
    pub fn activate_alarm(&mut self, alarm: Alarm) -> bool {
        match self.alarms.binary_search(&alarm) {
            Ok(_) => false,
            Err(i) => {
                self.alarms.insert(i, alarm);
                self.alarm_changed();
                true
            }
        }
    }

    /// Clears an alarm; whether it was there.
    pub fn deactivate_alarm(&mut self, alarm: Alarm) -> bool {
        match self.alarms.binary_search(&alarm) {
            Ok(i) => {
                self.alarms.remove(i);
                self.alarm_changed();
                true
            }
            Err(_) => false,
        }
    }

    /// The leases.
    pub fn leases(&self) -> &std::collections::BTreeMap<i64, LeaseRecord> {
        &self.leases
    }

    /// Adds or updates a lease (persisted with the next batch).
    pub fn put_lease(&mut self, id: i64, rec: LeaseRecord) {
        self.leases.insert(id, rec);
        self.lease_changes.insert(id, Some(rec));
        self.pending.since.get_or_insert_with(Instant::now);
    }

    /// Removes a lease (persisted with the next batch).
    pub fn delete_lease(&mut self, id: i64) {
        if self.leases.remove(&id).is_some() {
            self.lease_changes.insert(id, None);
            self.pending.since.get_or_insert_with(Instant::now);
        }
    }

    /// (key, lease) of every live key attached to a lease when the store opened; once.
    pub fn take_recovered_lease_keys(&mut self) -> Vec<(Vec<u8>, i64)> {
        std::mem::take(&mut self.recovered_lease_keys)
    }

    /// The membership as last set (`None` for a store that never had one).
    pub fn members(&self) -> Option<&[u8]> {
        self.members.as_deref()
    }

    /// Sets the membership; it is persisted with the next batch.
    pub fn set_members(&mut self, encoded: Vec<u8>) {
        self.members = Some(encoded);
        self.members_changed = true;
    }

    /// A number that changes whenever the alarms do.
    pub fn alarms_epoch(&self) -> u64 {
        self.alarms_epoch
    }

    fn alarm_changed(&mut self) {
        self.alarms_epoch += 1;
        self.alarms_changed = true;
        self.pending.since.get_or_insert_with(Instant::now);
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
            sink: self.sink.as_deref_mut(),
        }
    }

    /// Where committed changes are published from now on (the watch hub).
    pub fn set_event_sink(&mut self, sink: Box<dyn EventSink>) {
        self.sink = Some(sink);
    }

    /// Applies a compaction: the revision rises now, the physical work goes to the
    /// compactor once the backend holds this entry (the next after the last applied).
    pub fn compact(&mut self, rev: i64) -> Result<()> {
        self.mvcc.schedule_compact(rev)?;
        self.pending.since.get_or_insert_with(Instant::now);
        let entry = self.applied.0 + 1;
        if let Some(c) = &self.compactions {
            let _ = c.send((rev, entry));
        }
        Ok(())
    }

    /// Records that every entry up to `index` (of `term`) is applied.
    pub fn set_applied(&mut self, index: u64, term: u64) {
        self.applied = (index, term);
    }

    /// Hands a batch to the committer if one is due (old or large enough) and the committer
    /// is free. Whether it did.
    pub fn commit_if_due(&mut self, now: Instant) -> Result<bool> {
        let due = match self.pending.since {
            Some(t) => {
                now.duration_since(t) >= self.opts.commit_interval
                    || self.pending.changes.len() >= self.opts.commit_ops_max
            }
            None => self.applied.0 != self.handed,
        };
        if !due {
            return Ok(false);
        }
        let handed = self.handed;
        let batch = self.batch(None);
        match self.jobs.try_send(Job::Batch(batch)) {
            Ok(()) => Ok(true),
            Err(TrySendError::Full(Job::Batch(b))) => {
                // The committer is busy: the batch keeps growing until it is free.
                self.pending = b.pending;
                self.handed = handed;
                self.alarms_changed |= b.alarms.is_some();
                self.members_changed |= b.members.is_some();
                let mut leases = b.leases;
                leases.append(&mut self.lease_changes);
                self.lease_changes = leases;
                Ok(false)
            }
            Err(_) => Err(committer_gone()),
        }
    }

    /// Commits everything applied so far and waits until it is durable and published.
    pub fn commit(&mut self) -> Result<()> {
        let (done, wait) = crossbeam_channel::bounded(1);
        let batch = self.batch(Some(done));
        self.jobs
            .send(Job::Batch(batch))
            .map_err(|_| committer_gone())?;
        wait.recv().map_err(|_| committer_gone())
    }

    /// A handle for other threads: defragments the backend, reports its size.
    pub fn handle(&self) -> StoreHandle {
        StoreHandle {
            jobs: self.jobs.clone(),
            published: self.published.clone(),
            mvcc: self.mvcc.clone(),
        }
    }

    fn batch(&mut self, done: Option<Sender<()>>) -> Batch {
        self.handed = self.applied.0;
        let alarms = std::mem::take(&mut self.alarms_changed).then(|| self.alarms.clone());
        let members = std::mem::take(&mut self.members_changed)
            .then(|| self.members.clone())
            .flatten();
        Batch {
            alarms,
            members,
            leases: std::mem::take(&mut self.lease_changes),
            pending: std::mem::take(&mut self.pending),
            applied: self.applied,
            current_rev: self.mvcc.current_rev(),
            compact_rev: self.mvcc.compact_rev(),
            done,
        }
    }

    /// The consistent index of the last batch made durable: the WAL before it is needed only
    /// by followers catching up.
    pub fn persisted(&self) -> u64 {
        self.published.index.load(Ordering::Acquire)
    }
}

fn committer_gone() -> Error {
    Error::Invalid("the backend committer has stopped".into())
}

fn publish_space(db: &Backend<MmapFile>, to: &Published) {
    let space = db.space();
    to.pages.store(space.pages, Ordering::Release);
    to.free_pages.store(space.free_pages, Ordering::Release);
}

/// What other threads (net cores) may ask of the store: its size, and a defragmentation.
#[derive(Clone)]
pub struct StoreHandle {
    jobs: Sender<Job>,
    published: Arc<Published>,
    mvcc: Arc<Mvcc>,
}

impl StoreHandle {
    /// The consistent index of the last batch made durable.
    pub fn persisted(&self) -> u64 {
        self.published.index.load(Ordering::Acquire)
    }

    /// Polls `ready` until it holds or `limit` passes (then the caller goes on regardless).
    fn wait_for(&self, limit: Duration, ready: impl Fn() -> bool) {
        let deadline = Instant::now() + limit;
        while !ready() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The last compaction carried out in full.
    /// The state as of the last durable commit, pinned (its pages are not reused while the
    /// result is held), to send whole to a member far behind.
    pub fn outgoing(&self) -> Option<crate::transfer::Outgoing> {
        self.mvcc
            .backend()
            .map(|r| crate::transfer::Outgoing::new(r.snapshot()))
    }

    pub fn finished_compact_rev(&self) -> i64 {
        self.published.finished_compact_rev.load(Ordering::Acquire)
    }

    /// The backend's size as of its last commit or defragmentation.
    pub fn space(&self) -> SpaceStats {
        SpaceStats {
            pages: self.published.pages.load(Ordering::Acquire),
            free_pages: self.published.free_pages.load(Ordering::Acquire),
        }
    }

    /// The size the backend quota is checked against: the file's size, but while a defrag
    /// runs only the pages in use (the old file's growth meanwhile is released by the switch,
    /// so it must not raise NOSPACE).
    pub fn quota_bytes(&self) -> u64 {
        let space = self.space();
        if self.published.defragging.load(Ordering::Acquire) {
            space.bytes_in_use()
        } else {
            space.bytes()
        }
    }

    /// etcd's Maintenance.Hash: a CRC-32C over every backend entry (keys and values, in key
    /// order) but the consistent index and its term (etcd's default ignores), once everything
    /// applied up to `applied` is in the backend. For tests and checks, as in etcd; its value
    /// is Keel's own (etcd hashes its bbolt file's buckets).
    pub fn hash(&self, applied: u64) -> Result<u32> {
        self.wait_for(Duration::from_secs(10), || self.persisted() >= applied);
        let db = self
            .mvcc
            .backend()
            .expect("a store's index reads its backend");
        let mut crc = 0u32;
        db.snapshot().range(b"", None, |k, v| {
            if k != META_CONSISTENT_INDEX && k != META_TERM {
                crc = crc32c::crc32c_append(crc, k);
                crc = crc32c::crc32c_append(crc, v);
            }
            true
        })?;
        Ok(crc)
    }

    /// The state once everything applied up to `applied` is in the backend, pinned (its
    /// pages are not reused while it is held): what Maintenance.Snapshot sends.
    pub fn pinned(&self, applied: u64) -> Result<Arc<crate::backend::Snapshot<MmapFile>>> {
        self.wait_for(Duration::from_secs(10), || self.persisted() >= applied);
        if self.persisted() < applied {
            // Never a state older than what was acknowledged before the call.
            return Err(Error::Invalid(format!(
                "the backend holds entries up to {}, not yet {applied}",
                self.persisted()
            )));
        }
        Ok(self
            .mvcc
            .backend()
            .expect("a store's index reads its backend")
            .snapshot())
    }

    /// Rewrites the backend file compactly (etcd's defrag) once everything applied up to
    /// `applied` is in it (the raft core hands batches over within the commit interval), and
    /// waits for it. Writes go on being applied and committed meanwhile (see
    /// `start_defrag`).
    pub fn defragment(&self, applied: u64) -> Result<()> {
        // A compaction in progress finishes first (`compact; defrag` then shrinks the file,
        // as it does with etcd, whose compactions of small stores end at once).
        self.wait_for(Duration::from_secs(30), || {
            self.persisted() >= applied && self.finished_compact_rev() >= self.mvcc.compact_rev()
        });
        let (done, wait) = crossbeam_channel::bounded(1);
        self.jobs
            .send(Job::Defrag(done))
            .map_err(|_| committer_gone())?;
        wait.recv().map_err(|_| committer_gone())?
    }
}

/// Where a defrag writes its copy of the backend at `path` (removed at open if left over).
fn defrag_path(path: &Path) -> std::path::PathBuf {
    path.with_extension("db.defrag")
}

/// A defragmentation in progress (see `start_defrag`).
struct DefragRun {
    from_copy: Receiver<FromCopy>,
    thread: std::thread::JoinHandle<()>,
    waiters: Vec<Sender<Result<()>>>,
    /// Catch-up rounds handed to the copy so far.
    rounds: usize,
    started: Instant,
}

/// What a defrag's copy thread asks of the committer.
enum FromCopy {
    /// The keys written since the state the copy holds, and the backend as it is now (the
    /// committer records anew from it); None: few are left, the committer finishes.
    Delta(Sender<Option<Delta>>),
    /// The copy, up to date but for the keys written since the last delta (or the error
    /// that stopped it).
    Done(Result<Backend<MmapFile>>),
}

type BackendSnapshot = crate::backend::Snapshot<MmapFile>;
/// Keys written since the copy's state, and a state to copy them from.
type Delta = (HashSet<Vec<u8>>, Arc<BackendSnapshot>);

/// The committer thread: writes each batch, publishes it, forgets its values in memory;
/// defragments when asked.
fn run_committer(
    mut db: Backend<MmapFile>,
    path: std::path::PathBuf,
    jobs: Receiver<Job>,
    mvcc: Arc<Mvcc>,
    published: Arc<Published>,
) {
    let mut released = Instant::now();
    let mut defrag: Option<DefragRun> = None;
    loop {
        let job = match &defrag {
            None => jobs.recv(),
            Some(run) => crossbeam_channel::select! {
                recv(jobs) -> job => job,
                recv(run.from_copy) -> msg => {
                    let run = defrag.as_mut().expect("a defrag is running");
                    match msg {
                        Ok(FromCopy::Delta(reply)) => {
                            let delta = (db.touched_count() > DEFRAG_FINAL_KEYS
                                && run.rounds < DEFRAG_ROUNDS_MAX)
                                .then(|| {
                                    run.rounds += 1;
                                    let keys = db.take_touched();
                                    (keys, db.track_writes())
                                });
                            let _ = reply.send(delta);
                        }
                        done => {
                            let run = defrag.take().expect("a defrag is running");
                            end_defrag(run, done, &mut db, &path, &published);
                        }
                    }
                    continue;
                }
            },
        };
        let Ok(job) = job else { return };
        // Pages read for commits (and by readers) leave RSS from time to time.
        if released.elapsed() >= MAP_RELEASE_INTERVAL {
            db.release_map();
            released = Instant::now();
        }
        let batch = match job {
            Job::Batch(b) => b,
            Job::Defrag(done) => {
                match &mut defrag {
                    // One copy serves every request made while it runs.
                    Some(run) => run.waiters.push(done),
                    None => match start_defrag(&mut db, &path, &mvcc, &published) {
                        Ok(mut run) => {
                            run.waiters.push(done);
                            defrag = Some(run);
                        }
                        Err(e) => {
                            stop_tracking(&mut db, &published);
                            let _ = done.send(Err(e));
                        }
                    },
                }
                continue;
            }
            Job::Stop => {
                if let Some(run) = defrag.take() {
                    // The copy stops at its next chunk (the store is stopping); a copy
                    // waiting for a catch-up round is told there is none.
                    for msg in run.from_copy.iter() {
                        match msg {
                            FromCopy::Delta(reply) => {
                                let _ = reply.send(None);
                            }
                            FromCopy::Done(_) => break,
                        }
                    }
                    let _ = run.thread.join();
                    let _ = std::fs::remove_file(defrag_path(&path));
                }
                return;
            }
            Job::Compacted {
                revisions,
                finished,
            } => {
                if let Err(e) = write_compacted(&mut db, &revisions, finished) {
                    panic!("backend commit failed: {e}");
                }
                publish_space(&db, &published);
                if let Some(rev) = finished {
                    published.finished_compact_rev.store(rev, Ordering::Release);
                }
                continue;
            }
        };
        if let Err(e) = write_batch(&mut db, &batch) {
            // Fatal by design: the process must not go on with a backend it cannot write.
            panic!("backend commit failed: {e}");
        }
        publish_space(&db, &published);
        published.index.store(batch.applied.0, Ordering::Release);
        for change in batch.pending.changes {
            mvcc.forget_value(&change.0);
        }
        if let Some(done) = batch.done {
            let _ = done.send(());
        }
    }
}

/// Ends defrag `run` with the copy thread's last word `done` (the copy, or why it stopped):
/// switches to the copy, or removes it; answers every request made while it ran.
fn end_defrag(
    run: DefragRun,
    done: std::result::Result<FromCopy, crossbeam_channel::RecvError>,
    db: &mut Backend<MmapFile>,
    path: &Path,
    published: &Published,
) {
    let _ = run.thread.join();
    let result = match done {
        Ok(FromCopy::Done(copy)) => copy.and_then(|copy| {
            let copied_ms = run.started.elapsed().as_millis() as u64;
            let before = db.space();
            let last_keys = db.touched_count();
            finish_defrag(db, path, copy)?;
            tracing::info!(
                copied_ms,
                rounds = run.rounds,
                last_keys,
                took_ms = run.started.elapsed().as_millis() as u64,
                size_before = before.bytes(),
                size_after = db.space().bytes(),
                "defragmented the backend"
            );
            Ok(())
        }),
        _ => Err(Error::Invalid("the defrag copy stopped".into())),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(defrag_path(path));
    }
    stop_tracking(db, published);
    for w in run.waiters {
        let r = match &result {
            Ok(()) => Ok(()),
            Err(e) => Err(Error::Invalid(e.to_string())),
        };
        let _ = w.send(r);
    }
}

/// No defrag runs any more: writes are no longer recorded, the quota counts the file.
fn stop_tracking(db: &mut Backend<MmapFile>, published: &Published) {
    db.take_touched();
    publish_space(db, published);
    published.defragging.store(false, Ordering::Release);
}

/// Starts a defragmentation: a thread of its own copies the backend as it is now compactly
/// to `{path}.defrag` while the committer goes on writing batches into the file and records
/// the keys they touch. The copy then catches up in rounds (each copies the keys written
/// during the one before, from a newer state), until few are left; the committer copies
/// those itself and switches (`finish_defrag`).
///
/// The copy disturbs the writes being applied as little as it can: it runs under SCHED_IDLE,
/// its chunks are not synced one by one (it is synced whole at its end, before the rename),
/// and while writes are being applied it copies at most `DEFRAG_BYTES_PER_SEC_UNDER_LOAD`
/// (so under a heavy write load a large file takes longer to defragment, at a small cost to
/// the writes). On an idle node it runs flat out.
fn start_defrag(
    db: &mut Backend<MmapFile>,
    path: &Path,
    mvcc: &Arc<Mvcc>,
    published: &Arc<Published>,
) -> Result<DefragRun> {
    let tmp = defrag_path(path);
    let _ = std::fs::remove_file(&tmp);
    let file = MmapFile::open(&tmp)?;
    let snap = db.track_writes();
    published.defragging.store(true, Ordering::Release);
    let (tx, from_copy) = crossbeam_channel::bounded(1);
    let (mvcc, published) = (mvcc.clone(), published.clone());
    let thread = std::thread::Builder::new()
        .name("keel-defrag".into())
        .spawn(move || {
            lower_priority();
            let mut pace = Pace::new(mvcc, published);
            let result = copy_and_catch_up(snap, file, &tx, &mut pace);
            let _ = tx.send(FromCopy::Done(result));
        })
        .map_err(|source| Error::Io {
            op: "spawn defrag copy",
            path: tmp.clone(),
            source,
        })?;
    Ok(DefragRun {
        from_copy,
        thread,
        waiters: Vec::new(),
        rounds: 0,
        started: Instant::now(),
    })
}

/// The calling thread runs only when nothing else wants the CPU (SCHED_IDLE: a thread that
/// wakes takes the core from it at once), else at nice 10 where that is refused.
fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sets the calling thread's policy (pid 0 = this thread).
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        // SAFETY: setpriority on the calling thread (Linux: who 0 = this thread).
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, DEFRAG_NICE) };
    }
}

/// The defrag copy's pace (see `start_defrag`), and its stop when the store goes.
struct Pace {
    mvcc: Arc<Mvcc>,
    published: Arc<Published>,
    started: Instant,
    rev: i64,
    /// Catch-up rounds begun.
    rounds: usize,
}

impl Pace {
    fn new(mvcc: Arc<Mvcc>, published: Arc<Published>) -> Pace {
        let rev = mvcc.current_rev();
        Pace {
            mvcc,
            published,
            started: Instant::now(),
            rev,
            rounds: 0,
        }
    }

    /// After a chunk of `bytes`: if writes were applied meanwhile, waits until the chunk has
    /// taken as long as `DEFRAG_BYTES_PER_SEC_UNDER_LOAD` allows; false once the store stops.
    fn after_chunk(&mut self, bytes: usize) -> bool {
        if self.published.stopping.load(Ordering::Acquire) {
            return false;
        }
        if self.mvcc.current_rev() != self.rev && self.rounds <= DEFRAG_PACED_ROUNDS {
            let due = Duration::from_secs_f64(bytes as f64 / DEFRAG_BYTES_PER_SEC_UNDER_LOAD);
            if let Some(rest) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        self.rev = self.mvcc.current_rev();
        self.started = Instant::now();
        true
    }
}

/// The copy thread's work: the first copy, then catch-up rounds until the committer says
/// few keys are left. Each snapshot is let go as soon as it has been copied from, so the
/// old file's freed pages can be reused in between.
fn copy_and_catch_up(
    snap: Arc<BackendSnapshot>,
    file: MmapFile,
    to_committer: &Sender<FromCopy>,
    pace: &mut Pace,
) -> Result<Backend<MmapFile>> {
    let opts = Options {
        durable_commits: false,
        ..Options::default()
    };
    let mut copy = compact_copy_of(&snap, file, opts, DEFRAG_CHUNK_BYTES, |n| {
        pace.after_chunk(n)
    })?;
    drop(snap);
    loop {
        // Past a few rounds the writes outpace the paced copy: it stops resting so the
        // rounds shrink and the committer's last one stays short.
        pace.rounds += 1;
        let (reply, delta) = crossbeam_channel::bounded(1);
        to_committer
            .send(FromCopy::Delta(reply))
            .map_err(|_| committer_gone())?;
        let Some((keys, newer)) = delta.recv().map_err(|_| committer_gone())? else {
            return Ok(copy);
        };
        copy_keys(&newer, &mut copy, &keys, DEFRAG_CATCH_UP_KEYS, |n| {
            pace.after_chunk(n)
        })?;
        drop(newer);
    }
}

/// Brings the copy up to date with what was written while it was made, renames it over
/// `path` (synced), and switches to it. A crash before the rename leaves the old file;
/// after, the new one.
fn finish_defrag(
    db: &mut Backend<MmapFile>,
    path: &Path,
    mut copy: Backend<MmapFile>,
) -> Result<()> {
    let tmp = defrag_path(path);
    let touched = db.take_touched();
    db.bring_up_to_date(&mut copy, &touched)?;
    fail::fail_point!("defrag-copy");
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        op: "rename defragmented backend",
        path: path.to_path_buf(),
        source,
    })?;
    // From here the file at `path` is the copy: the committer must switch to it whatever
    // happens, or it would go on writing batches into the old, unnamed file (and the WAL
    // would be released past what a restart finds). A directory that cannot be synced is
    // fatal.
    db.replace_with(copy);
    if let Some(dir) = path.parent() {
        if let Err(e) = crate::wal::sync_dir(dir) {
            panic!("syncing the backend dir after a defrag failed: {e}");
        }
    }
    fail::fail_point!("defrag-switch");
    db.release_map();
    Ok(())
}

fn write_compacted(
    db: &mut Backend<MmapFile>,
    revisions: &[(i64, i64)],
    finished: Option<i64>,
) -> Result<()> {
    let mut txn = db.write()?;
    for (main, sub) in revisions {
        txn.delete(&record_key(*main, *sub))?;
    }
    if let Some(rev) = finished {
        txn.put(META_FINISHED_COMPACT_REV, &rev.to_le_bytes())?;
    }
    txn.commit()
}

/// The compactor thread: carries out each scheduled compaction in chunks (see the module
/// note). Ends when the store goes.
fn run_compactor(
    compactions: Receiver<(i64, u64)>,
    mvcc: Arc<Mvcc>,
    jobs: Sender<Job>,
    published: Arc<Published>,
) {
    let stopping = || published.stopping.load(Ordering::Acquire);
    for (rev, entry) in compactions.iter() {
        // The records it deletes must be in the backend first, or a delete could overtake
        // its put.
        while published.index.load(Ordering::Acquire) < entry {
            if stopping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut from = Key::new(b"");
        loop {
            // A large Range reading below `rev` (it started before this compaction) keeps
            // what it reads until it ends.
            let Some((revisions, next)) =
                mvcc.compact_chunk_unpinned(rev, &from, COMPACTION_KEYS_PER_CHUNK)
            else {
                if stopping() {
                    return;
                }
                std::thread::sleep(COMPACTION_PAUSE);
                continue;
            };
            let done = next.is_none();
            fail::fail_point!("compaction-chunk");
            if !revisions.is_empty() || done {
                let job = Job::Compacted {
                    revisions,
                    finished: done.then_some(rev),
                };
                if jobs.send(job).is_err() {
                    return;
                }
            }
            match next {
                Some(k) if !stopping() => from = k,
                Some(_) => return,
                None => break,
            }
            std::thread::sleep(COMPACTION_PAUSE);
        }
        tracing::info!(revision = rev, "finished compaction");
    }
}

fn write_batch(db: &mut Backend<MmapFile>, batch: &Batch) -> Result<()> {
    let mut txn = db.write()?;
    for (kr, kv) in &batch.pending.changes {
        let key = record_key(kr.main, kr.sub);
        txn.put_owned(key.to_vec(), encode_record(kv))?;
    }
    let (index, term) = batch.applied;
    txn.put(META_CONSISTENT_INDEX, &index.to_le_bytes())?;
    txn.put(META_TERM, &term.to_le_bytes())?;
    txn.put(META_CURRENT_REV, &batch.current_rev.to_le_bytes())?;
    txn.put(META_COMPACT_REV, &batch.compact_rev.to_le_bytes())?;
    if let Some(alarms) = &batch.alarms {
        txn.put(META_ALARMS, &encode_alarms(alarms))?;
    }
    if let Some(members) = &batch.members {
        txn.put(META_MEMBERS, members)?;
    }
    for (id, rec) in &batch.leases {
        match rec {
            Some(r) => {
                let mut v = [0u8; 16];
                v[..8].copy_from_slice(&r.ttl.to_le_bytes());
                v[8..].copy_from_slice(&r.remaining_ttl.to_le_bytes());
                txn.put(&lease_key(*id), &v)?;
            }
            None => {
                txn.delete(&lease_key(*id))?;
            }
        }
    }
    txn.commit()
}

pub(crate) fn encode_alarms(alarms: &[Alarm]) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 * alarms.len());
    for (member, alarm) in alarms {
        v.extend_from_slice(&member.to_le_bytes());
        v.extend_from_slice(&alarm.to_le_bytes());
    }
    v
}

pub(crate) fn decode_alarms(v: &[u8]) -> Option<Vec<Alarm>> {
    if !v.len().is_multiple_of(12) {
        return None;
    }
    Some(
        v.chunks(12)
            .map(|c| {
                let member = u64::from_le_bytes(c[..8].try_into().expect("8 bytes"));
                (
                    member,
                    i32::from_le_bytes(c[8..].try_into().expect("4 bytes")),
                )
            })
            .collect(),
    )
}

/// A meta entry (an i64, little-endian) of the state `snap`, else `default`.
pub(crate) fn meta_i64<F: crate::backend::file::PageFile>(
    snap: &crate::backend::Snapshot<F>,
    key: &[u8],
    default: i64,
) -> Result<i64> {
    match snap.get(key)? {
        Some(v) => v
            .try_into()
            .map(i64::from_le_bytes)
            .map_err(|_| bad_meta(key)),
        None => Ok(default),
    }
}

fn bad_meta(key: &[u8]) -> Error {
    let key = String::from_utf8_lossy(key);
    crate::backend::page::corrupt(0, format!("entry {key:?} does not decode"))
}

/// Told the changes of every committed write transaction, in revision order, on the thread
/// that applies them (the watch hub). It must not block.
pub trait EventSink: Send {
    fn publish(&mut self, rev: i64, changes: &[Change]);
}

/// A write transaction whose committed changes go to the next backend batch.
pub struct StoreTxn<'a> {
    txn: Option<WriteTxn<'a>>,
    pending: &'a mut Pending,
    sink: Option<&'a mut (dyn EventSink + 'static)>,
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
    /// Publishes the transaction to readers and queues its changes for the backend; returns
    /// the revision after it.
    pub fn commit(mut self) -> i64 {
        let (changes, rev) = self.txn.take().expect("live until commit").commit();
        if !changes.is_empty() {
            self.pending.since.get_or_insert_with(Instant::now);
            if let Some(sink) = self.sink.as_mut() {
                sink.publish(rev, &changes);
            }
        }
        self.pending.changes.extend(changes);
        rev
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::{KeyRange, RangeOptions};
    use bytes::Bytes;

    /// (key, value, create revision, version, lease) of every live key at `rev`.
    fn all(m: &Mvcc, rev: i64) -> Vec<(String, String, i64, i64, i64)> {
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
                kv.lease,
            )
        })
        .collect()
    }

    /// Runs `f` on a thread of its own; fails the test unless it returns within `limit`.
    fn finishes_within(limit: Duration, f: impl FnOnce() + Send + 'static) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            f();
            let _ = tx.send(());
        });
        match rx.recv_timeout(limit) {
            Ok(()) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("did not finish within {limit:?}")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("it panicked"),
        }
    }

    /// Puts `k` with a lease of its length (the lease is kept in the record, not the index).
    fn put(s: &mut Store, k: &str, v: &str) {
        let mut t = s.write();
        t.put(
            k.as_bytes(),
            Bytes::copy_from_slice(v.as_bytes()),
            k.len() as i64,
        );
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
            let in_memory = all(s.mvcc(), 0);
            s.commit().unwrap();
            // Values and leases now come from the backend, not memory.
            assert_eq!(all(s.mvcc(), 0), in_memory);
            (in_memory, all(s.mvcc(), 250))
        };
        let s = Store::open(&path, StoreOptions::default()).unwrap();
        assert_eq!(s.applied(), (77, 3));
        assert_eq!(s.mvcc().current_rev(), 303);
        assert_eq!(s.mvcc().compact_rev(), 200);
        assert_eq!(all(s.mvcc(), 0), before);
        assert_eq!(all(s.mvcc(), 250), old);
        assert!(before
            .iter()
            .any(|(k, v, _, _, lease)| k == "big" && v.len() == 50_000 && *lease == 3));
    }

    #[test]
    fn defragment_shrinks_the_file_and_keeps_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut s = Store::open(&path, StoreOptions::default()).unwrap();
        for i in 0..2000 {
            put(&mut s, &format!("k{}", i % 20), &"v".repeat(1000));
            if i % 100 == 99 {
                s.commit().unwrap();
            }
        }
        let rev = s.mvcc().current_rev();
        s.compact(rev).unwrap();
        s.set_applied(3000, 2);
        s.commit().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.handle().finished_compact_rev() < rev {
            assert!(Instant::now() < deadline, "compaction never finished");
            std::thread::sleep(Duration::from_millis(5));
        }
        let before_versions = s.mvcc().versions_total();
        assert_eq!(before_versions, 20, "one version per key is left");
        let before = (all(s.mvcc(), 0), s.handle().space());
        let held = s.mvcc().clone();
        s.handle().defragment(3000).unwrap();
        let after = s.handle().space();
        assert!(
            after.pages * 4 < before.1.pages,
            "{:?} -> {after:?}",
            before.1
        );
        assert_eq!(all(s.mvcc(), 0), before.0);
        assert_eq!(all(&held, 0), before.0);
        put(&mut s, "new", "1");
        s.commit().unwrap();
        drop(s);
        let s = Store::open(&path, StoreOptions::default()).unwrap();
        assert_eq!(s.applied(), (3000, 2));
        assert_eq!(all(s.mvcc(), 0).len(), 21);
        assert!(!defrag_path(&path).exists());
    }

    /// Writes, deletes and a compaction go on while the copy is made: the switch brings the
    /// copy up to date, so nothing written meanwhile is lost (now or after a reopen).
    #[test]
    fn defragment_keeps_what_is_written_while_it_copies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut s = Store::open(&path, StoreOptions::default()).unwrap();
        let big = "v".repeat(10_000);
        // About 30 MB: several copy chunks, each followed by a rest while writes flow.
        for i in 0..3000 {
            put(&mut s, &format!("k{i:05}"), &big);
            if i % 500 == 499 {
                s.commit().unwrap();
            }
        }
        s.set_applied(10, 1);
        s.commit().unwrap();
        let handle = s.handle();
        let copying = std::thread::spawn(move || handle.defragment(10));
        let mut during = 0;
        let mut quota_below_file = 0;
        let mut i = 0u64;
        while !copying.is_finished() || during < 50 {
            assert!(i < 200_000, "the defrag never finished");
            let n = i % 3000;
            match i % 4 {
                0 | 1 => put(&mut s, &format!("k{n:05}"), &format!("new{i}")),
                2 => {
                    let mut t = s.write();
                    t.delete_range(KeyRange::Single(format!("k{n:05}").as_bytes()));
                    t.commit();
                }
                _ => put(&mut s, &format!("n{i}"), "x"),
            }
            if i == 100 {
                let rev = s.mvcc().current_rev();
                s.compact(rev).unwrap();
            }
            s.set_applied(11 + i, 1);
            s.commit().unwrap();
            if !copying.is_finished() {
                during += 1;
                // The old file grows meanwhile; the quota counts only what is in use.
                let h = s.handle();
                if h.quota_bytes() < h.space().bytes() {
                    quota_below_file += 1;
                }
            }
            i += 1;
        }
        copying.join().unwrap().unwrap();
        assert!(during >= 50, "only {during} commits overlapped the copy");
        assert!(quota_below_file > 0, "the quota counted the growing file");
        assert_eq!(s.handle().quota_bytes(), s.handle().space().bytes());
        put(&mut s, "last", "1");
        s.set_applied(11 + i, 1);
        s.commit().unwrap();
        let want = all(s.mvcc(), 0);
        assert!(want.len() > 1000, "{} keys", want.len());
        drop(s);
        let s = Store::open(&path, StoreOptions::default()).unwrap();
        assert_eq!(all(s.mvcc(), 0), want);
        assert_eq!(s.applied(), (11 + i, 1));
        assert!(!defrag_path(&path).exists());
    }

    /// A store dropped while a defrag copies (writes flowing, so the copy rests and catches
    /// up in rounds) stops it at once and leaves no copy behind; the state is intact.
    #[test]
    fn drop_during_a_defrag_stops_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let p = path.clone();
        finishes_within(Duration::from_secs(30), move || {
            let mut s = Store::open(&p, StoreOptions::default()).unwrap();
            let big = "v".repeat(10_000);
            for i in 0..3000 {
                put(&mut s, &format!("k{i:05}"), &big);
            }
            s.set_applied(10, 1);
            s.commit().unwrap();
            let handle = s.handle();
            let copying = std::thread::spawn(move || handle.defragment(10));
            for i in 0..20 {
                put(&mut s, &format!("n{i}"), "x");
                s.set_applied(11 + i, 1);
                s.commit().unwrap();
            }
            drop(s);
            let _ = copying.join().unwrap();
        });
        assert!(!defrag_path(&path).exists());
        let s = Store::open(&path, StoreOptions::default()).unwrap();
        assert_eq!(all(s.mvcc(), 0).len(), 3020);
        assert_eq!(s.applied(), (30, 1));
    }

    /// A store dropped with a compaction whose entry never reached the backend must not
    /// wait for it (the compactor stops; a restart compacts again).
    #[test]
    fn drop_does_not_wait_for_a_compaction_that_cannot_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let p = path.clone();
        finishes_within(Duration::from_secs(10), move || {
            let mut s = Store::open(&p, StoreOptions::default()).unwrap();
            put(&mut s, "a", "1");
            put(&mut s, "a", "2");
            s.compact(3).unwrap();
            drop(s);
        });
        let s = Store::open(&path, StoreOptions::default()).unwrap();
        assert_eq!(
            s.mvcc().compact_rev(),
            -1,
            "the compaction was never committed"
        );
    }

    #[test]
    fn hash_covers_the_state_not_the_consistent_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("db"), StoreOptions::default()).unwrap();
        put(&mut s, "a", "1");
        s.set_applied(5, 2);
        s.commit().unwrap();
        let h1 = s.handle().hash(5).unwrap();
        s.set_applied(9, 2); // entries without changes
        s.commit().unwrap();
        assert_eq!(s.handle().hash(9).unwrap(), h1, "same state, same hash");
        put(&mut s, "a", "2");
        s.set_applied(10, 2);
        s.commit().unwrap();
        assert_ne!(s.handle().hash(10).unwrap(), h1);
    }

    /// A compaction cut short by a restart (here the store going mid-way) is carried out at
    /// the next open: every superseded version goes, in the index and in the backend.
    #[test]
    fn an_unfinished_compaction_resumes_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let rev = {
            let mut s = Store::open(&path, StoreOptions::default()).unwrap();
            for round in 0..2 {
                for i in 0..5000 {
                    put(&mut s, &format!("k{i:05}"), &round.to_string());
                }
            }
            let rev = s.mvcc().current_rev();
            s.compact(rev).unwrap();
            s.set_applied(20_000, 2);
            s.commit().unwrap();
            // Dropped here, most likely between two of the compaction's 5 chunks.
            rev
        };
        let s = Store::open(&path, StoreOptions::default()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while s.handle().finished_compact_rev() < rev {
            assert!(Instant::now() < deadline, "the compaction never finished");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            s.mvcc().versions_total(),
            5000,
            "one version per key is left"
        );
        drop(s);
        let s = Store::open(&path, StoreOptions::default()).unwrap();
        assert_eq!(
            s.mvcc().versions_total(),
            5000,
            "the backend lost the superseded records too"
        );
        assert_eq!(all(s.mvcc(), 0)[0].1, "1");
    }

    /// A read pinned at a revision (a large Range read in chunks) keeps reading it while a
    /// compaction past it lands: new reads below the compaction fail at once, as etcd's, but
    /// the compactor removes nothing until the pin goes; then it finishes.
    #[test]
    fn a_pinned_read_keeps_its_revision_through_a_compaction() {
        use crate::mvcc::ReadView;
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("db"), StoreOptions::default()).unwrap();
        let keys = 3000;
        for i in 0..keys {
            put(&mut s, &format!("k{i:05}"), "old");
        }
        let old = s.mvcc().current_rev();
        let pin = s.mvcc().pin(old).unwrap();
        for i in 0..keys {
            put(&mut s, &format!("k{i:05}"), "new");
        }
        let rev = s.mvcc().current_rev();
        s.compact(rev).unwrap();
        s.set_applied(10_000, 2);
        s.commit().unwrap();
        let at_old = RangeOptions {
            rev: old,
            ..Default::default()
        };
        let whole = || KeyRange::from_request(b"\0", b"\0");
        assert!(
            matches!(s.mvcc().range(whole(), at_old), Err(Error::Compacted)),
            "an unpinned read below the compaction fails"
        );
        assert!(matches!(s.mvcc().pin(old), Err(Error::Compacted)));
        // Give the compactor time to run, were it not held.
        std::thread::sleep(Duration::from_millis(300));
        assert!(s.handle().finished_compact_rev() < rev);
        let read = pin.read(whole(), at_old).unwrap();
        assert_eq!(read.kvs.len(), keys);
        assert!(read.kvs.iter().all(|kv| &kv.value[..] == b"old"));
        assert_eq!(s.mvcc().versions_total(), 2 * keys);

        drop(pin);
        let deadline = Instant::now() + Duration::from_secs(20);
        while s.handle().finished_compact_rev() < rev {
            assert!(Instant::now() < deadline, "the compaction never finished");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(s.mvcc().versions_total(), keys);
        assert!(all(s.mvcc(), 0).iter().all(|kv| kv.1 == "new"));
    }

    #[test]
    fn alarms_persist_with_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let mut s = Store::open(&path, StoreOptions::default()).unwrap();
            assert!(s.activate_alarm((7, 1)));
            assert!(!s.activate_alarm((7, 1)), "already active");
            assert!(s.activate_alarm((3, 2)));
            assert!(s.deactivate_alarm((3, 2)));
            assert!(!s.deactivate_alarm((3, 2)));
            assert_eq!(s.members(), None);
            s.set_members(b"three members".to_vec());
            s.set_applied(9, 2);
            s.commit().unwrap();
        }
        let s = Store::open(&path, StoreOptions::default()).unwrap();
        assert_eq!(s.alarms(), [(7, 1)]);
        assert_eq!(s.members(), Some(&b"three members"[..]));
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
        assert_eq!(all(s.mvcc(), 0), [("a".into(), "1".into(), 2, 1, 1)]);
        put(&mut s, "a", "2"); // raft re-delivers entry 6
        assert_eq!(all(s.mvcc(), 0), [("a".into(), "2".into(), 2, 2, 1)]);
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
        // Hands over when due, waiting for the committer's slot to be free.
        let hand = |s: &mut Store, now: Instant| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !s.commit_if_due(now).unwrap() {
                assert!(Instant::now() < deadline, "never handed over");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let t0 = Instant::now();
        for i in 0..9 {
            put(&mut s, &format!("k{i}"), "v");
        }
        assert!(!s.commit_if_due(t0).unwrap());
        put(&mut s, "k9", "v");
        hand(&mut s, t0);
        put(&mut s, "late", "v");
        assert!(!s.commit_if_due(Instant::now()).unwrap());
        hand(&mut s, Instant::now() + Duration::from_secs(3601));
        s.set_applied(40, 2);
        hand(&mut s, Instant::now());
        assert!(!s.commit_if_due(Instant::now()).unwrap(), "nothing new");
        s.commit().unwrap();
        drop(s);
        let s = Store::open(&dir.path().join("db"), opts).unwrap();
        assert_eq!(s.applied(), (40, 2));
        assert_eq!(s.mvcc().current_rev(), 12);
    }

    #[test]
    fn leases_and_the_keys_attached_to_them_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let mut s = Store::open(&path, StoreOptions::default()).unwrap();
            let rec = |ttl| LeaseRecord {
                ttl,
                remaining_ttl: 0,
            };
            s.put_lease(7, rec(10));
            s.put_lease(-3, rec(20));
            s.put_lease(9, rec(30));
            s.commit().unwrap();
            s.delete_lease(9);
            s.put_lease(
                7,
                LeaseRecord {
                    ttl: 10,
                    remaining_ttl: 4,
                },
            );
            // put() attaches each key to a lease of its length.
            put(&mut s, "a", "1"); // lease 1
            put(&mut s, "bb", "1"); // lease 2
            put(&mut s, "ccc", "1"); // lease 3
            let mut t = s.write();
            t.put(b"bb", Bytes::from_static(b"2"), 0); // detached
            t.commit();
            let mut t = s.write();
            t.delete_range(KeyRange::Single(b"ccc")); // gone
            t.commit();
            s.commit().unwrap();
        }
        let mut s = Store::open(&path, StoreOptions::default()).unwrap();
        let leases: Vec<(i64, i64, i64)> = s
            .leases()
            .iter()
            .map(|(id, r)| (*id, r.ttl, r.remaining_ttl))
            .collect();
        assert_eq!(leases, [(-3, 20, 0), (7, 10, 4)]);
        assert_eq!(s.take_recovered_lease_keys(), [(b"a".to_vec(), 1)]);
        assert!(s.take_recovered_lease_keys().is_empty());
    }
}
