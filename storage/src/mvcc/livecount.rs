//! Live-key counts by key span, so a range's `count` costs about O(log N) plus a few short
//! walks instead of a walk over every key (etcd walks them all).
//!
//! The key space is cut into buckets at sorted bounds (`bounds[0]` is the empty key, so every
//! key falls in one bucket: the last bound at or below it). Each bucket holds between a few
//! and `SPLIT_ABOVE` live keys. A segment tree over the buckets holds, per node, the sum of
//! their live counts at the newest committed revision and the highest revision at which any
//! of their counts changed (`changed_rev`).
//!
//! Counting `[from, end)` at revision R: walk the bucket holding `from` from `from` on, walk
//! the bucket holding `end` up to `end`, and take the buckets between from the tree. A bucket
//! whose count changed after R (`changed_rev > R`) cannot answer for R: it is walked at R
//! instead. Walks go through the version index at R, which is exact for any readable R, so
//! the answer is exact; the tree only saves walking.
//!
//! Concurrency: one writer (the apply loop, at each commit) and any number of readers, with no
//! lock. The writer changes the tree between two increments of a sequence number (a seqlock);
//! a reader takes the tree's figures between two equal, even reads of it, else tries again. A
//! split or merge builds a new layout and swaps it in inside the same window. The writer
//! updates the counts before it publishes the revision, so a reader that loaded revision R
//! finds every change at or below R in the tree.
//!
//! Memory: about 20 bytes per bucket, so a few hundred KiB for millions of keys.

use std::sync::atomic::{fence, AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::Key;

/// A bucket over this many live keys is split into pieces of `PIECE_KEYS`.
const SPLIT_ABOVE: i64 = 256;
const PIECE_KEYS: usize = 128;
/// Two neighbours with fewer live keys together are merged.
const MERGE_BELOW: i64 = 32;
/// Buckets walked instead of read from the tree before a count gives up (the caller then
/// walks the whole range).
const STALE_BUCKETS_MAX: usize = 16;
/// Reads of the tree retried while the writer changes it.
const READ_TRIES: usize = 64;

pub(super) struct LiveCounts {
    seq: AtomicU64,
    /// False until the index was built (a store recovering from its backend).
    ready: AtomicBool,
    layout: ArcSwap<Layout>,
}

/// Bucket bounds with their segment tree. Leaves are at `leaves..leaves + bounds.len()`,
/// node `i`'s children at `2i` and `2i + 1` (node 0 unused).
struct Layout {
    bounds: Vec<Key>,
    leaves: usize,
    live: Vec<AtomicI64>,
    changed_rev: Vec<AtomicI64>,
}

impl Layout {
    fn new(buckets: Vec<(Key, i64, i64)>) -> Layout {
        let leaves = buckets.len().next_power_of_two();
        let live: Vec<AtomicI64> = (0..2 * leaves).map(|_| AtomicI64::new(0)).collect();
        let changed_rev: Vec<AtomicI64> = (0..2 * leaves).map(|_| AtomicI64::new(0)).collect();
        let mut bounds = Vec::with_capacity(buckets.len());
        for (i, (bound, count, rev)) in buckets.into_iter().enumerate() {
            bounds.push(bound);
            live[leaves + i].store(count, Ordering::Relaxed);
            changed_rev[leaves + i].store(rev, Ordering::Relaxed);
        }
        let layout = Layout {
            bounds,
            leaves,
            live,
            changed_rev,
        };
        for node in (1..leaves).rev() {
            layout.pull(node);
        }
        layout
    }

    /// Recomputes node `i` from its children.
    fn pull(&self, i: usize) {
        let (l, r) = (2 * i, 2 * i + 1);
        let live = self.live[l].load(Ordering::Relaxed) + self.live[r].load(Ordering::Relaxed);
        let rev = self.changed_rev[l]
            .load(Ordering::Relaxed)
            .max(self.changed_rev[r].load(Ordering::Relaxed));
        self.live[i].store(live, Ordering::Relaxed);
        self.changed_rev[i].store(rev, Ordering::Relaxed);
    }

    /// The bucket holding `key`.
    fn bucket_of(&self, key: &[u8]) -> usize {
        self.bounds.partition_point(|b| **b <= *key) - 1
    }

    fn count(&self, bucket: usize) -> i64 {
        self.live[self.leaves + bucket].load(Ordering::Relaxed)
    }

    fn add(&self, bucket: usize, delta: i64, rev: i64) {
        let mut i = self.leaves + bucket;
        let live = self.live[i].load(Ordering::Relaxed) + delta;
        assert!(live >= 0, "live count of bucket {bucket} below zero");
        self.live[i].store(live, Ordering::Relaxed);
        self.changed_rev[i].store(rev, Ordering::Relaxed);
        while i > 1 {
            i /= 2;
            self.pull(i);
        }
    }

    /// The live keys of buckets `[lo, hi)` whose counts hold at `rev`, and the buckets whose
    /// counts changed after it (None: more than `STALE_BUCKETS_MAX` of them).
    fn sum(&self, lo: usize, hi: usize, rev: i64) -> Option<(i64, Vec<usize>)> {
        let mut out = (0, Vec::new());
        self.sum_node(1, 0, self.leaves, lo, hi, rev, &mut out)
            .then_some(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn sum_node(
        &self,
        node: usize,
        node_lo: usize,
        node_hi: usize,
        lo: usize,
        hi: usize,
        rev: i64,
        out: &mut (i64, Vec<usize>),
    ) -> bool {
        if hi <= node_lo || node_hi <= lo {
            return true;
        }
        let inside = lo <= node_lo && node_hi <= hi;
        if inside && self.changed_rev[node].load(Ordering::Relaxed) <= rev {
            out.0 += self.live[node].load(Ordering::Relaxed);
            return true;
        }
        if node >= self.leaves {
            out.1.push(node - self.leaves);
            return out.1.len() <= STALE_BUCKETS_MAX;
        }
        let mid = (node_lo + node_hi) / 2;
        self.sum_node(2 * node, node_lo, mid, lo, hi, rev, out)
            && self.sum_node(2 * node + 1, mid, node_hi, lo, hi, rev, out)
    }

    /// (bound, live, changed revision) of every bucket.
    fn buckets(&self) -> Vec<(Key, i64, i64)> {
        self.bounds
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let leaf = self.leaves + i;
                let rev = self.changed_rev[leaf].load(Ordering::Relaxed);
                (b.clone(), self.live[leaf].load(Ordering::Relaxed), rev)
            })
            .collect()
    }
}

/// Counts live keys at a revision in `[start, end)` (`end` empty: no bound) by walking.
pub(super) trait Walker {
    fn count(&self, start: &[u8], end: &[u8], rev: i64) -> i64;
    /// Every `every`th live key at `rev` in `[start, end)`, the first one skipped.
    fn cut_points(&self, start: &[u8], end: &[u8], rev: i64, every: usize) -> Vec<Key>;
}

impl LiveCounts {
    /// An index of an empty store.
    pub(super) fn empty() -> LiveCounts {
        LiveCounts {
            seq: AtomicU64::new(0),
            ready: AtomicBool::new(true),
            layout: ArcSwap::from_pointee(Layout::new(vec![(Key::new(b""), 0, 0)])),
        }
    }

    /// An index to be built (`rebuild`) once the store is loaded.
    pub(super) fn unbuilt() -> LiveCounts {
        let counts = LiveCounts::empty();
        counts.ready.store(false, Ordering::Release);
        counts
    }

    /// Builds the index from the live keys at `rev` (writer only, before readers count).
    pub(super) fn rebuild(&self, walker: &impl Walker, rev: i64) {
        let mut bounds = vec![Key::new(b"")];
        bounds.extend(walker.cut_points(b"", b"", rev, PIECE_KEYS));
        let buckets = self.buckets_of(walker, bounds, &Key::new(b""), rev);
        self.swap(Layout::new(buckets));
        self.ready.store(true, Ordering::Release);
    }

    fn swap(&self, layout: Layout) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        self.layout.store(Arc::new(layout));
        self.seq.store(s + 2, Ordering::Release);
    }

    /// Applies a committed transaction's changes to live keys (+1 a key created, -1 a key
    /// deleted) at revision `rev`; splits and merges buckets as needed (writer only).
    pub(super) fn apply(&self, walker: &impl Walker, deltas: &[(&[u8], i64)], rev: i64) {
        if deltas.is_empty() || !self.ready.load(Ordering::Acquire) {
            return;
        }
        let layout = self.layout.load();
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        let mut touched = Vec::with_capacity(deltas.len());
        for &(key, delta) in deltas {
            let b = layout.bucket_of(key);
            layout.add(b, delta, rev);
            touched.push(b);
        }
        self.seq.store(s + 2, Ordering::Release);
        touched.sort_unstable();
        touched.dedup();
        let reshape = touched.iter().any(|&b| {
            let n = layout.count(b);
            let next = (b + 1 < layout.bounds.len()).then(|| layout.count(b + 1));
            let prev = (b > 0).then(|| layout.count(b - 1));
            n > SPLIT_ABOVE
                || next.is_some_and(|m| n + m < MERGE_BELOW)
                || prev.is_some_and(|m| n + m < MERGE_BELOW)
        });
        if reshape {
            let buckets = self.reshape(walker, layout.buckets(), rev);
            self.swap(Layout::new(buckets));
        }
    }

    /// Splits the buckets over `SPLIT_ABOVE` and merges small neighbours; the buckets it
    /// makes take `rev` as their changed revision.
    fn reshape(
        &self,
        walker: &impl Walker,
        buckets: Vec<(Key, i64, i64)>,
        rev: i64,
    ) -> Vec<(Key, i64, i64)> {
        let mut out: Vec<(Key, i64, i64)> = Vec::with_capacity(buckets.len() + 4);
        let none = Key::new(b"");
        for (i, (bound, n, changed)) in buckets.iter().enumerate() {
            if let Some(last) = out.last_mut() {
                if last.1 + n < MERGE_BELOW {
                    last.1 += n;
                    last.2 = rev;
                    continue;
                }
            }
            if *n > SPLIT_ABOVE {
                let end = buckets.get(i + 1).map_or(&none, |b| &b.0);
                let mut bounds = vec![bound.clone()];
                bounds.extend(walker.cut_points(bound, end, rev, PIECE_KEYS));
                out.extend(self.buckets_of(walker, bounds, end, rev));
            } else {
                out.push((bound.clone(), *n, *changed));
            }
        }
        out
    }

    /// Buckets at these bounds, the last one ending at `end` (empty: no bound), counted at
    /// `rev` (which they also take as changed revision).
    fn buckets_of(
        &self,
        walker: &impl Walker,
        bounds: Vec<Key>,
        end: &Key,
        rev: i64,
    ) -> Vec<(Key, i64, i64)> {
        let ends: Vec<Key> = bounds.iter().skip(1).chain([end]).cloned().collect();
        bounds
            .into_iter()
            .zip(ends)
            .map(|(b, e)| {
                let n = walker.count(&b, &e, rev);
                (b, n, rev)
            })
            .collect()
    }

    /// Live keys in `[from, end)` at `rev` (`end` empty: no bound; `rev` at most the
    /// published revision), or None when too much changed after `rev` to answer cheaply.
    pub(super) fn count(
        &self,
        walker: &impl Walker,
        from: &[u8],
        end: &[u8],
        rev: i64,
    ) -> Option<i64> {
        if !self.ready.load(Ordering::Acquire) {
            return None;
        }
        if !end.is_empty() && end <= from {
            return Some(0);
        }
        for _ in 0..READ_TRIES {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let layout = self.layout.load_full();
            let first = layout.bucket_of(from);
            let last = match end {
                [] => layout.bounds.len(),
                end => layout.bucket_of(end),
            };
            if first == last {
                return Some(walker.count(from, end, rev));
            }
            let middle = layout.sum(first + 1, last, rev);
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) != s1 {
                continue;
            }
            let (mut total, stale) = middle?;
            let bound = |b: usize| layout.bounds.get(b).map_or(&b""[..], |k| &k[..]);
            total += walker.count(from, bound(first + 1), rev);
            for b in stale {
                total += walker.count(bound(b), bound(b + 1), rev);
            }
            if last < layout.bounds.len() {
                total += walker.count(bound(last), end, rev);
            }
            return Some(total);
        }
        None
    }

    /// How many buckets there are (tests and figures).
    #[cfg(test)]
    pub(super) fn buckets_total(&self) -> usize {
        self.layout.load().bounds.len()
    }
}
