//! Leases, with etcd's semantics (etcd `server/lease/lessor.go`).
//!
//! What a lease is (its ID and granted TTL) is state-machine state: granted and revoked through
//! raft, persisted in the store. When it expires is the leader's own soft state: a deadline
//! per lease that keep-alives push forward on whichever net core the stream lives (no raft
//! round, as etcd's), and that restarts at a full TTL (plus an election timeout) when the node
//! starts leading. The raft core looks for expired leases every `EXPIRY_SCAN` and proposes their
//! revocation; a revocation deletes the lease's keys in one revision.
//!
//! Sharing: `Leases` (a lock-free map of lease -> deadline, TTL and attached keys) is read by
//! the net cores and changed only by the raft core's apply, except deadlines. Which key belongs
//! to which lease is also kept on the raft core alone (`LeaseBook::key_lease`), so a put or
//! delete learns the key's old lease without reading the store.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_skiplist::SkipMap;
use keel_net::ApiError;
use keel_storage::mvcc::Change;
use keel_storage::store::{LeaseRecord, Store};

/// etcd's MaxLeaseTTL: 9,000,000,000 seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// How often the raft core looks for expired leases (etcd: 500 ms).
pub const EXPIRY_SCAN: Duration = Duration::from_millis(500);
/// Revocations proposed per scan (etcd revokes at most 1000 leases a second).
const REVOKES_PER_SCAN: usize = 500;
/// An expired lease whose revocation has not applied yet is proposed again after this.
const REVOKE_RETRY: Duration = Duration::from_secs(3);
const SUFFIX_MASK: u64 = (1 << 48) - 1;

pub struct Lease {
    /// The granted TTL, seconds.
    pub ttl: i64,
    /// When it expires, in µs on the lessor's clock. Once passed, the lease cannot be renewed:
    /// its revocation is under way.
    deadline_us: AtomicI64,
    /// When its revocation may be proposed again (0: not proposed yet).
    retry_us: AtomicI64,
    /// The remaining TTL last checkpointed (0: none): where a new leader restarts it.
    checkpoint: AtomicI64,
    /// When the leader checkpoints it next, in µs on the lessor's clock (i64::MAX: not due).
    next_checkpoint_us: AtomicI64,
    /// Renewed since its last checkpoint: the leader tells the members to forget it.
    clear_checkpoint: AtomicBool,
    keys: Mutex<BTreeSet<Bytes>>,
}

impl Lease {
    fn new(ttl: i64, deadline_us: i64) -> Arc<Lease> {
        Arc::new(Lease {
            ttl,
            deadline_us: AtomicI64::new(deadline_us),
            retry_us: AtomicI64::new(0),
            checkpoint: AtomicI64::new(0),
            next_checkpoint_us: AtomicI64::new(FOREVER),
            clear_checkpoint: AtomicBool::new(false),
            keys: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn keys(&self) -> Vec<Bytes> {
        self.keys
            .lock()
            .expect("lease keys lock")
            .iter()
            .cloned()
            .collect()
    }
}

/// The node's leases, shared by every core.
pub struct Leases {
    map: SkipMap<i64, Arc<Lease>>,
    clock: Instant,
    /// etcd's minimum TTL: ceil(1.5 election timeouts), seconds.
    pub min_ttl: i64,
    /// etcd's request ID generator for granted IDs: the member ID's low 16 bits, then a
    /// 48-bit suffix started from the time (ms << 8) and counted up.
    id_prefix: u64,
    id_suffix: AtomicU64,
    /// This member leads: deadlines run. A follower's leases never expire (etcd's demoted
    /// lessor); they start running when it leads (`promote`).
    primary: AtomicBool,
    /// etcd's lease checkpoint interval, µs (0: checkpointing off, etcd's default).
    checkpoint_us: AtomicI64,
}

/// A deadline that never comes (a follower's).
const FOREVER: i64 = i64::MAX;

impl Leases {
    pub fn new(member_id: u64, heartbeat_ms: u64, election_ms: u64) -> Leases {
        let election_ticks = election_ms / heartbeat_ms.max(1);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Leases {
            map: SkipMap::new(),
            clock: Instant::now(),
            min_ttl: ((3 * election_ticks / 2) * heartbeat_ms).div_ceil(1000) as i64,
            id_prefix: (member_id & 0xffff) << 48,
            id_suffix: AtomicU64::new((now_ms << 8) & SUFFIX_MASK),
            primary: AtomicBool::new(false),
            checkpoint_us: AtomicI64::new(0),
        }
    }

    /// Turns on etcd's lease checkpoints (--experimental-enable-lease-checkpoint): the leader
    /// records each lease's remaining TTL through raft every `interval`, so a new leader
    /// resumes it from there rather than from its full TTL.
    pub fn set_checkpointing(&self, interval: Duration) {
        self.checkpoint_us
            .store(interval.as_micros() as i64, Ordering::Release);
    }

    /// Schedules a lease's next checkpoint, if it lives longer than one interval (etcd's
    /// scheduleCheckpointIfNeeded).
    fn schedule_checkpoint(&self, l: &Lease, left_secs: i64) {
        let every = self.checkpoint_us.load(Ordering::Acquire);
        let at = if every > 0 && left_secs * 1_000_000 > every {
            self.now_us() + every
        } else {
            FOREVER
        };
        l.next_checkpoint_us.store(at, Ordering::Release);
    }

    /// The leader's checkpoints due now (etcd's findDueScheduledCheckpoints, at most `max`):
    /// (lease, remaining seconds rounded up), and a 0 for each lease renewed since its last
    /// checkpoint (etcd's Renew clears it).
    pub fn take_checkpoints(&self, max: usize) -> Vec<(i64, i64)> {
        if !self.primary.load(Ordering::Acquire) || self.checkpoint_us.load(Ordering::Acquire) == 0
        {
            return Vec::new();
        }
        let now = self.now_us();
        let mut out = Vec::new();
        for e in self.map.iter() {
            if out.len() == max {
                break;
            }
            let l = e.value();
            if l.clear_checkpoint.swap(false, Ordering::AcqRel) {
                out.push((*e.key(), 0));
                continue;
            }
            if l.next_checkpoint_us.load(Ordering::Acquire) > now {
                continue;
            }
            l.next_checkpoint_us.store(FOREVER, Ordering::Release);
            let deadline = l.deadline_us.load(Ordering::Acquire);
            if deadline <= now {
                continue;
            }
            let left = (deadline - now + 999_999) / 1_000_000;
            if left < l.ttl {
                out.push((*e.key(), left));
            }
        }
        out
    }

    /// This member leads from now: every lease runs again from its remaining TTL (its last
    /// checkpoint, else its full TTL) plus `extend` (etcd's Promote: the old leader's clock
    /// is lost; the extension covers the election).
    pub fn promote(&self, extend: Duration) {
        self.primary.store(true, Ordering::Release);
        for e in self.map.iter() {
            let l = e.value();
            let left = match l.checkpoint.load(Ordering::Acquire) {
                0 => l.ttl,
                c => c,
            };
            let deadline = self.after(left) + extend.as_micros() as i64;
            l.deadline_us.store(deadline, Ordering::Release);
            l.retry_us.store(0, Ordering::Release);
            self.schedule_checkpoint(l, left);
        }
    }

    /// This member stopped leading: no lease expires here (etcd's Demote).
    pub fn demote(&self) {
        self.primary.store(false, Ordering::Release);
        for e in self.map.iter() {
            e.value().deadline_us.store(FOREVER, Ordering::Release);
        }
    }

    /// The deadline of a lease granted or renewed now for `secs`.
    fn deadline(&self, secs: i64) -> i64 {
        if self.primary.load(Ordering::Acquire) {
            self.after(secs)
        } else {
            FOREVER
        }
    }

    fn now_us(&self) -> i64 {
        self.clock.elapsed().as_micros() as i64
    }

    /// `secs` from now, on the lessor's clock.
    fn after(&self, secs: i64) -> i64 {
        self.now_us() + secs * 1_000_000
    }

    /// A new lease ID as etcd makes them: positive, unique per member and across restarts.
    pub fn generate_id(&self) -> i64 {
        loop {
            let suffix = self.id_suffix.fetch_add(1, Ordering::Relaxed) + 1;
            let id = (self.id_prefix | (suffix & SUFFIX_MASK)) & (i64::MAX as u64);
            if id != 0 {
                return id as i64;
            }
        }
    }

    pub fn get(&self, id: i64) -> Option<Arc<Lease>> {
        self.map.get(&id).map(|e| e.value().clone())
    }

    pub fn exists(&self, id: i64) -> bool {
        self.map.contains_key(&id)
    }

    /// Exists and has not expired (an expired lease is only waiting for its revocation).
    pub fn alive(&self, id: i64) -> bool {
        self.get(id)
            .is_some_and(|l| l.deadline_us.load(Ordering::Acquire) > self.now_us())
    }

    /// A keep-alive: the lease's TTL, or 0 if it does not exist or has already expired (its
    /// revocation is under way), as etcd answers.
    pub fn renew(&self, id: i64) -> i64 {
        let Some(l) = self.get(id) else { return 0 };
        let now = self.now_us();
        if l.deadline_us.load(Ordering::Acquire) <= now {
            return 0;
        }
        l.deadline_us.store(self.deadline(l.ttl), Ordering::Release);
        if self.checkpoint_us.load(Ordering::Acquire) > 0 {
            if l.checkpoint.load(Ordering::Acquire) > 0 {
                l.clear_checkpoint.store(true, Ordering::Release);
            }
            self.schedule_checkpoint(&l, l.ttl);
        }
        l.ttl
    }

    /// Whole seconds left (etcd truncates), or None if there is no such lease.
    pub fn remaining(&self, id: i64) -> Option<(Arc<Lease>, i64)> {
        let l = self.get(id)?;
        let left = (l.deadline_us.load(Ordering::Acquire) - self.now_us()).max(0) / 1_000_000;
        Some((l, left))
    }

    /// Every lease ID, soonest to expire first (etcd's order).
    pub fn list(&self) -> Vec<i64> {
        let mut all: Vec<(i64, i64)> = self
            .map
            .iter()
            .map(|e| (e.value().deadline_us.load(Ordering::Acquire), *e.key()))
            .collect();
        all.sort_unstable();
        all.into_iter().map(|(_, id)| id).collect()
    }

    /// Expired leases to revoke now (at most `REVOKES_PER_SCAN`); each is proposed again after
    /// `REVOKE_RETRY` in case its revocation is lost. Their deadlines stay passed, so no
    /// keep-alive can bring them back meanwhile (etcd answers those "not found").
    pub fn take_expired(&self) -> Vec<i64> {
        let now = self.now_us();
        let mut out = Vec::new();
        for e in self.map.iter() {
            let l = e.value();
            let expired = l.deadline_us.load(Ordering::Acquire) <= now;
            if expired && l.retry_us.load(Ordering::Acquire) <= now {
                l.retry_us
                    .store(now + REVOKE_RETRY.as_micros() as i64, Ordering::Release);
                out.push(*e.key());
                if out.len() == REVOKES_PER_SCAN {
                    break;
                }
            }
        }
        out
    }
}

/// The raft core's side of leases: the state-machine operations apply calls.
pub struct LeaseBook {
    pub shared: Arc<Leases>,
    /// The lease of every live key that has one.
    key_lease: HashMap<Bytes, i64>,
}

impl LeaseBook {
    /// A book with no leases.
    pub fn new(shared: Arc<Leases>) -> LeaseBook {
        LeaseBook {
            shared,
            key_lease: HashMap::new(),
        }
    }

    /// The leases of an opened store, each given a full TTL plus `extend` from now (etcd's
    /// Promote: the new leader cannot know how long the old one had left).
    pub fn recover(shared: Arc<Leases>, store: &mut Store, extend: Duration) -> LeaseBook {
        for (id, rec) in store.leases() {
            let l = Lease::new(rec.ttl, FOREVER);
            l.checkpoint.store(rec.remaining_ttl, Ordering::Release);
            shared.map.insert(*id, l);
        }
        if shared.primary.load(Ordering::Acquire) {
            shared.promote(extend);
        }
        let mut book = LeaseBook::new(shared);
        for (key, lease) in store.take_recovered_lease_keys() {
            book.attach(Bytes::from(key), lease);
        }
        book
    }

    /// Grants a lease (etcd's lessor.Grant): the TTL is raised to the minimum.
    pub fn grant(&mut self, store: &mut Store, id: i64, ttl: i64) -> Result<i64, ApiError> {
        if id == 0 {
            return Err(ApiError::LeaseNotFound);
        }
        if ttl > MAX_LEASE_TTL {
            return Err(ApiError::LeaseTtlTooLarge);
        }
        if self.shared.exists(id) {
            return Err(ApiError::LeaseExists);
        }
        let ttl = ttl.max(self.shared.min_ttl);
        store.put_lease(
            id,
            LeaseRecord {
                ttl,
                remaining_ttl: 0,
            },
        );
        let deadline = self.shared.deadline(ttl);
        let lease = Lease::new(ttl, deadline);
        if self.shared.primary.load(Ordering::Acquire) {
            self.shared.schedule_checkpoint(&lease, ttl);
        }
        self.shared.map.insert(id, lease);
        Ok(ttl)
    }

    /// Applies the leader's checkpoint (etcd's lessor.Checkpoint): each lease's remaining TTL
    /// is where a new leader restarts it; it is kept with the lease in the store.
    pub fn checkpoint(&mut self, store: &mut Store, checkpoints: &[(i64, i64)]) {
        for &(id, remaining) in checkpoints {
            let Some(l) = self.shared.get(id) else {
                continue;
            };
            l.checkpoint.store(remaining.max(0), Ordering::Release);
            store.put_lease(
                id,
                LeaseRecord {
                    ttl: l.ttl,
                    remaining_ttl: remaining.max(0),
                },
            );
            if self.shared.primary.load(Ordering::Acquire) && remaining > 0 {
                self.shared.schedule_checkpoint(&l, remaining);
            }
        }
    }

    /// Revokes a lease: its keys go in one revision (in key order, as etcd's), then the lease.
    pub fn revoke(&mut self, store: &mut Store, id: i64) -> Result<(), ApiError> {
        let Some(lease) = self.shared.get(id) else {
            return Err(ApiError::LeaseNotFound);
        };
        let keys = lease.keys();
        if !keys.is_empty() {
            let mut t = store.write();
            for k in &keys {
                t.delete_range(keel_storage::mvcc::KeyRange::Single(k));
            }
            self.track(t.changes());
            t.commit();
        }
        store.delete_lease(id);
        self.shared.map.remove(&id);
        Ok(())
    }

    /// Follows a write's changes: a put attaches its key to its lease (and detaches it from
    /// the one it had), a delete detaches it.
    pub fn track(&mut self, changes: &[Change]) {
        for (_, kv) in changes {
            let lease = if kv.version == 0 { 0 } else { kv.lease };
            self.attach(kv.key.clone(), lease);
        }
    }

    fn attach(&mut self, key: Bytes, lease: i64) {
        let old = if lease == 0 {
            self.key_lease.remove(&key)
        } else {
            self.key_lease.insert(key.clone(), lease)
        };
        if old == Some(lease) {
            return;
        }
        if let Some(l) = old.and_then(|old| self.shared.get(old)) {
            l.keys.lock().expect("lease keys lock").remove(&key);
        }
        if lease != 0 {
            if let Some(l) = self.shared.get(lease) {
                l.keys.lock().expect("lease keys lock").insert(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_ttl_and_ids_follow_etcd() {
        // etcd's default election timeout (1 s): 1.5 s, rounded up to 2 s.
        let l = Leases::new(0x8e9e05c52164694d, 100, 1000);
        assert_eq!(l.min_ttl, 2);
        assert_eq!(Leases::new(1, 100, 5000).min_ttl, 8);
        assert_eq!(Leases::new(1, 300, 1000).min_ttl, 2, "3 ticks: 4 x 300 ms");
        let a = l.generate_id();
        let b = l.generate_id();
        assert!(a > 0 && b == a + 1);
        assert_eq!((a as u64) >> 48, 0x694d);
    }

    #[test]
    fn expiry_renewal_and_order() {
        let l = Leases::new(1, 100, 1000);
        l.promote(Duration::ZERO);
        let add = |id: i64, deadline: i64| {
            l.map.insert(id, Lease::new(5, deadline));
        };
        let now = l.now_us();
        add(1, now + 60_000_000);
        add(2, now - 1);
        add(3, now + 30_000_000);
        assert_eq!(l.list(), [2, 3, 1]);
        assert_eq!(l.renew(2), 0, "expired: being revoked");
        assert_eq!(l.renew(9), 0, "no such lease");
        assert_eq!(l.renew(1), 5);
        std::thread::sleep(Duration::from_millis(1));
        assert_eq!(l.remaining(1).unwrap().1, 4, "whole seconds, truncated");
        assert_eq!(l.take_expired(), [2]);
        assert!(
            l.take_expired().is_empty(),
            "held off while its revocation runs"
        );
        assert_eq!(l.renew(2), 0, "a keep-alive cannot bring it back meanwhile");
        assert_eq!(l.remaining(2).unwrap().1, 0);
        assert!(!l.alive(2) && l.alive(1));
    }

    /// A mass expiry is revoked in bounded batches, each lease once until its retry is due.
    #[test]
    fn expired_leases_are_taken_in_bounded_batches() {
        let l = Leases::new(1, 100, 1000);
        l.promote(Duration::ZERO);
        let now = l.now_us();
        let n = REVOKES_PER_SCAN * 2 + 7;
        for id in 1..=n as i64 {
            l.map.insert(id, Lease::new(5, now - id));
        }
        l.map.insert(0x7fff, Lease::new(5, now + 60_000_000));
        let mut taken = std::collections::BTreeSet::new();
        for want in [REVOKES_PER_SCAN, REVOKES_PER_SCAN, 7, 0] {
            let batch = l.take_expired();
            assert_eq!(batch.len(), want);
            for id in batch {
                assert!(taken.insert(id), "lease {id} taken twice");
            }
        }
        assert_eq!(taken, (1..=n as i64).collect());
        assert!(l.alive(0x7fff));
    }

    #[test]
    fn only_a_leader_runs_deadlines() {
        let l = Leases::new(1, 100, 1000);
        l.map.insert(1, Lease::new(10, FOREVER));
        l.map.insert(2, Lease::new(10, FOREVER));
        l.get(2).unwrap().checkpoint.store(3, Ordering::Release);
        assert_eq!(l.renew(1), 10);
        assert!(
            l.remaining(1).unwrap().1 > MAX_LEASE_TTL,
            "a follower's never expire"
        );
        l.promote(Duration::from_secs(1));
        // The full TTL plus the extension, truncated: 11 if not a microsecond has passed
        // since the promotion, else 10.
        let left = l.remaining(1).unwrap().1;
        assert!(
            (10..=11).contains(&left),
            "full TTL plus the extension: {left}"
        );
        // From its checkpoint plus the extension, likewise; not the full TTL.
        let left = l.remaining(2).unwrap().1;
        assert!((3..=4).contains(&left), "from its checkpoint: {left}");
        l.demote();
        assert!(l.take_expired().is_empty());
        assert!(l.remaining(2).unwrap().1 > MAX_LEASE_TTL);
    }

    #[test]
    fn checkpoints_come_due_apply_and_a_renewal_clears_them() {
        let shared = Arc::new(Leases::new(1, 100, 1000));
        shared.set_checkpointing(Duration::from_millis(1));
        shared.promote(Duration::ZERO);
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("db"), Default::default()).unwrap();
        let mut book = LeaseBook::new(shared.clone());
        book.grant(&mut store, 7, 60).unwrap();
        // Nothing is due before a whole second is gone (59.x s rounds up to the full TTL).
        std::thread::sleep(Duration::from_millis(1100));
        let due = shared.take_checkpoints(10);
        assert_eq!(due, vec![(7, 59)]);
        book.checkpoint(&mut store, &due);
        assert_eq!(store.leases()[&7].remaining_ttl, 59);
        assert_eq!(
            shared.get(7).unwrap().checkpoint.load(Ordering::Acquire),
            59
        );
        // A keep-alive restarts the lease: the members are told to forget the checkpoint.
        assert_eq!(shared.renew(7), 60);
        assert_eq!(shared.take_checkpoints(10), vec![(7, 0)]);
        // A follower proposes none.
        shared.demote();
        assert!(shared.take_checkpoints(10).is_empty());
    }
}
