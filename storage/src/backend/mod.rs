//! The backend: one file holding a copy-on-write B+tree of byte keys to byte values, read
//! through a memory map, written with pwrite, committed by flipping one of two checksummed
//! meta pages (the LMDB/bbolt pattern). The page formats are drawn in `page`.
//!
//! # Transactions
//! One writer at a time (`Backend::write`), any number of readers (`Reader::snapshot`), no
//! lock between them. A write transaction materialises the pages it changes as in-memory nodes;
//! `commit` writes them (and large values, in overflow runs) to pages no snapshot uses, syncs,
//! writes the next meta page, syncs again, then publishes the new snapshot. A crash at any
//! point leaves the last meta whose sync completed: the previous commit or this one, whole.
//!
//! # Page reuse
//! A page a commit replaces is still part of older snapshots. It goes to the freelist only
//! once no reader holds a snapshot that old (counted through the snapshots' `Arc`s), and
//! never within the commit that freed it (a crash before the meta flip needs it). The
//! freelist is written at every commit, listing every page not in the new tree, so a restart
//! (with no readers) can reuse them all.
//!
//! # Shape
//! Keys are sorted bytewise. Nodes are filled greedily when written; a node left empty by
//! deletes disappears from its parent and a branch left with one child is replaced by it, so
//! a branch's children need not all have the same height.

pub mod file;
pub mod page;

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::error::Result;
use file::PageFile;
use page::{corrupt, LeafBytes, LeafValue, Meta, PageId, PageRef, PAGE_BYTES};

/// Deepest tree a read follows before calling the file corrupt (a cycle of page pointers).
const DEPTH_MAX: usize = 64;
/// The file grows by at least this much (and at least a quarter of its size) at a time, so
/// the map is rebuilt rarely.
pub const GROW_BYTES_MIN_DEFAULT: u64 = 16 << 20;

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub grow_bytes_min: u64,
    /// Whether each commit is made durable (two fdatasyncs). A copy that is only used once
    /// it is whole (defrag) commits without them and syncs once at the end.
    pub durable_commits: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            grow_bytes_min: GROW_BYTES_MIN_DEFAULT,
            durable_commits: true,
        }
    }
}

/// A committed state of the tree that readers hold while they read.
pub struct Snapshot<F: PageFile> {
    meta: Meta,
    view: Arc<F::View>,
}

/// A value read from a snapshot, borrowed from the file's map.
pub type Value<'a> = &'a [u8];

impl<F: PageFile> Snapshot<F> {
    pub fn txid(&self) -> u64 {
        self.meta.txid
    }

    /// Drops the resident pages of this snapshot's map from RSS (a long read of the whole
    /// tree calls it as it goes); safe beside readers, which fault back what they touch.
    pub fn release_map(&self) {
        F::release(&self.view);
    }

    fn page(&self, id: PageId, what: &str) -> Result<PageRef<'_>> {
        page::read(&self.view, id, what)
    }

    fn value<'a>(&'a self, v: LeafValue<'a>) -> Result<Value<'a>> {
        match v {
            LeafValue::Inline(b) => Ok(b),
            LeafValue::Overflow { page, len } => {
                let run = self.page(page, "overflow")?;
                if run.kind() != page::KIND_OVERFLOW || run.payload().len() < len {
                    return Err(corrupt(page, "bad overflow run".into()));
                }
                Ok(&run.payload()[..len])
            }
        }
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Value<'_>>> {
        self.get_under(self.meta.root, key)
    }

    fn get_under(&self, mut id: PageId, key: &[u8]) -> Result<Option<Value<'_>>> {
        for _ in 0..DEPTH_MAX {
            if id == 0 {
                return Ok(None);
            }
            let p = self.page(id, "tree")?;
            let (i, exact) = p.search(key)?;
            match p.kind() {
                page::KIND_BRANCH => id = p.branch(child_index(i, exact))?.1,
                page::KIND_LEAF if exact => return Ok(Some(self.value(p.leaf(i)?.1)?)),
                page::KIND_LEAF => return Ok(None),
                k => return Err(corrupt(id, format!("tree page of kind {k}"))),
            }
        }
        Err(corrupt(id, "tree deeper than any keel writes".into()))
    }

    /// Calls `f` with every (key, value) in `[start, end)` (`end` None: to the last key) in
    /// key order, until `f` returns false.
    pub fn range(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        mut f: impl FnMut(&[u8], Value<'_>) -> bool,
    ) -> Result<()> {
        self.walk(self.meta.root, start, end, &mut f, 0).map(|_| ())
    }

    /// `range` with a callback that can fail: its first error ends the walk and is returned.
    pub fn try_range<E: From<crate::Error>>(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        mut f: impl FnMut(&[u8], Value<'_>) -> std::result::Result<bool, E>,
    ) -> std::result::Result<(), E> {
        let mut failed = None;
        self.range(start, end, |k, v| match f(k, v) {
            Ok(go_on) => go_on,
            Err(e) => {
                failed = Some(e);
                false
            }
        })?;
        failed.map_or(Ok(()), Err)
    }

    /// Returns false once `f` asked to stop or `end` was reached.
    fn walk(
        &self,
        id: PageId,
        start: &[u8],
        end: Option<&[u8]>,
        f: &mut dyn FnMut(&[u8], Value<'_>) -> bool,
        depth: usize,
    ) -> Result<bool> {
        if id == 0 {
            return Ok(true);
        }
        if depth > DEPTH_MAX {
            return Err(corrupt(id, "tree deeper than any keel writes".into()));
        }
        let p = self.page(id, "tree")?;
        let (first, exact) = p.search(start)?;
        if p.kind() == page::KIND_BRANCH {
            for i in child_index(first, exact)..p.count() {
                let (key, child) = p.branch(i)?;
                if i > 0 && end.is_some_and(|e| key >= e) {
                    return Ok(false);
                }
                if !self.walk(child, start, end, f, depth + 1)? {
                    return Ok(false);
                }
            }
            return Ok(true);
        }
        if p.kind() != page::KIND_LEAF {
            return Err(corrupt(id, format!("tree page of kind {}", p.kind())));
        }
        for i in first..p.count() {
            let (key, v) = p.leaf(i)?;
            if end.is_some_and(|e| key >= e) || !f(key, self.value(v)?) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// The child of a branch to descend into, from a search's (index, exact match).
fn child_index(i: usize, exact: bool) -> usize {
    if exact {
        i
    } else {
        i.saturating_sub(1)
    }
}

/// What readers share with the writer: the current snapshot.
pub struct Reader<F: PageFile> {
    current: Arc<ArcSwap<Snapshot<F>>>,
}

impl<F: PageFile> Clone for Reader<F> {
    fn clone(&self) -> Self {
        Reader {
            current: self.current.clone(),
        }
    }
}

impl<F: PageFile> Reader<F> {
    /// The latest committed state; it stays readable (and its pages unreused) while held.
    pub fn snapshot(&self) -> Arc<Snapshot<F>> {
        self.current.load_full()
    }

    /// Drops the map's resident pages from RSS (see `PageFile::release`); safe beside
    /// readers, which fault what they touch back in.
    pub fn release_map(&self) {
        F::release(&self.current.load().view);
    }
}

/// Space accounting, for Status' db size and quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpaceStats {
    /// Pages the file uses (its logical size).
    pub pages: u64,
    /// Of those, pages holding nothing the current tree needs.
    pub free_pages: u64,
}

impl SpaceStats {
    /// The file's logical size (etcd's `dbSize`).
    pub fn bytes(&self) -> u64 {
        self.pages * PAGE_BYTES as u64
    }

    /// The part of it in use (etcd's `dbSizeInUse`).
    pub fn bytes_in_use(&self) -> u64 {
        (self.pages - self.free_pages) * PAGE_BYTES as u64
    }
}

/// The writer's side of the backend. Owned by one thread.
pub struct Backend<F: PageFile> {
    file: F,
    current: Arc<ArcSwap<Snapshot<F>>>,
    /// Reusable now, sorted from the highest id down, so the lowest pops off the end.
    free: Vec<PageId>,
    /// Freed by a commit, reusable once no reader holds this snapshot (or an older one).
    pending: VecDeque<(Arc<Snapshot<F>>, Vec<PageId>)>,
    file_len: u64,
    opts: Options,
    /// While a copy of an earlier snapshot is being made (defrag): every key a transaction
    /// has put or deleted since, so the copy can be brought up to date at the end.
    touched: Option<HashSet<Vec<u8>>>,
    /// Set when a commit failed midway: the in-memory state is no longer trusted.
    poisoned: bool,
}

impl<F: PageFile> Backend<F> {
    /// Opens the backend in `file`, creating an empty tree in an empty file.
    pub fn open(file: F) -> Result<Backend<F>> {
        Backend::open_with(file, Options::default())
    }

    pub fn open_with(file: F, opts: Options) -> Result<Backend<F>> {
        if file.len_bytes()? == 0 {
            let empty = Meta {
                txid: 0,
                root: 0,
                freelist: 0,
                page_count: 2,
            };
            file.write_at(&empty.encode(), 0)?;
            let second = Meta { txid: 1, ..empty };
            file.write_at(&second.encode(), PAGE_BYTES as u64)?;
            file.sync()?;
            file.sync_dir()?;
        }
        let view = Arc::new(file.view()?);
        let meta = newest_meta(&view)?;
        let file_len = view.len() as u64;
        if meta.page_count * PAGE_BYTES as u64 > file_len {
            return Err(corrupt(
                meta.page_count,
                format!("meta names {} pages, the file holds fewer", meta.page_count),
            ));
        }
        let snap = Snapshot { meta, view };
        let mut free = if meta.freelist == 0 {
            Vec::new()
        } else {
            page::decode_freelist(snap.page(meta.freelist, "freelist")?)?
        };
        sort_free(&mut free);
        if free.iter().any(|id| *id < 2 || *id >= meta.page_count) {
            return Err(corrupt(
                meta.freelist,
                "freelist names pages outside the file".into(),
            ));
        }
        Ok(Backend {
            file,
            current: Arc::new(ArcSwap::from_pointee(snap)),
            free,
            pending: VecDeque::new(),
            file_len,
            opts,
            touched: None,
            poisoned: false,
        })
    }

    pub fn reader(&self) -> Reader<F> {
        Reader {
            current: self.current.clone(),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot<F>> {
        self.current.load_full()
    }

    /// Drops the map's resident pages from RSS (see `PageFile::release`).
    pub fn release_map(&self) {
        F::release(&self.current.load().view);
    }

    pub fn space(&self) -> SpaceStats {
        let pending: usize = self.pending.iter().map(|(_, p)| p.len()).sum();
        let snap = self.current.load();
        let freelist_pages = if snap.meta.freelist == 0 {
            0
        } else {
            page::run_pages(8 + 8 * (self.free.len() + pending)) as u64
        };
        SpaceStats {
            pages: snap.meta.page_count,
            free_pages: (self.free.len() + pending) as u64 + freelist_pages,
        }
    }

    /// Starts the write transaction (there is only ever one).
    pub fn write(&mut self) -> Result<WriteTxn<'_, F>> {
        if self.poisoned {
            return Err(corrupt(
                0,
                "an earlier commit failed; reopen the backend".into(),
            ));
        }
        self.release_pending();
        let base = self.current.load_full();
        Ok(WriteTxn {
            root: Child::Clean(base.meta.root),
            base,
            backend: self,
            freed: Vec::new(),
        })
    }

    /// Moves pages no reader can see any more to the free list.
    fn release_pending(&mut self) {
        let mut released = false;
        while let Some((snap, _)) = self.pending.front() {
            if Arc::strong_count(snap) > 1 {
                break;
            }
            let (_, pages) = self.pending.pop_front().expect("front exists");
            self.free.extend(pages);
            released = true;
        }
        if released {
            sort_free(&mut self.free);
        }
    }

    /// `n` contiguous pages: from the free list if a run is there (the lowest free page in
    /// O(1) for one page), else at the end.
    fn alloc(&mut self, n: usize, page_count: &mut u64) -> PageId {
        if n == 1 {
            if let Some(id) = self.free.pop() {
                return id;
            }
        }
        let mut run_start = 0;
        for i in 0..self.free.len() {
            if i > 0 && self.free[i] + 1 != self.free[i - 1] {
                run_start = i;
            }
            if i + 1 - run_start == n {
                let id = self.free[i];
                self.free.drain(run_start..=i);
                return id;
            }
        }
        let id = *page_count;
        *page_count += n as u64;
        id
    }
}

impl<F: PageFile> Backend<F> {
    /// Writes the current tree compactly into `to` (see `compact_copy_of`).
    pub fn compact_copy<G: PageFile>(
        &self,
        to: G,
        opts: Options,
        chunk_bytes: usize,
        after_chunk: impl FnMut(usize) -> bool,
    ) -> Result<Backend<G>> {
        compact_copy_of(&self.snapshot(), to, opts, chunk_bytes, after_chunk)
    }

    /// Starts recording the keys every later transaction writes (`take_touched`), for a
    /// copy of the snapshot returned.
    pub fn track_writes(&mut self) -> Arc<Snapshot<F>> {
        self.touched = Some(HashSet::new());
        self.snapshot()
    }

    /// How many keys were written since `track_writes`.
    pub fn touched_count(&self) -> usize {
        self.touched.as_ref().map_or(0, HashSet::len)
    }

    /// The keys written since `track_writes`; stops recording.
    pub fn take_touched(&mut self) -> HashSet<Vec<u8>> {
        self.touched.take().unwrap_or_default()
    }

    /// Brings `dst` (a copy of an earlier state) up to this backend's current state for
    /// `keys` (the only keys written since that state), and makes all of `dst` durable.
    pub fn bring_up_to_date<G: PageFile>(
        &self,
        dst: &mut Backend<G>,
        keys: &HashSet<Vec<u8>>,
    ) -> Result<()> {
        copy_keys(&self.snapshot(), dst, keys, BRING_UP_TO_DATE_KEYS, |_| true)?;
        dst.file.sync()
    }

    /// Takes over `other`'s file (a compact copy of this tree, `compact_copy`): new snapshots
    /// read it; snapshots already held keep reading the old file, whose pages nothing
    /// rewrites any more.
    pub fn replace_with(&mut self, other: Backend<F>) {
        let Backend {
            file,
            current,
            mut free,
            pending,
            file_len,
            ..
        } = other;
        // Nothing reads the copy's older snapshots: what they held is free now.
        for (_, pages) in pending {
            free.extend(pages);
        }
        sort_free(&mut free);
        self.file = file;
        self.free = free;
        self.file_len = file_len;
        self.pending.clear();
        self.current.store(current.load_full());
    }
}

/// Writes the tree of `snap` compactly into `to` (an empty file): the entries in order, in
/// commits of about `chunk_bytes`, so memory stays bounded however large the tree;
/// `after_chunk` runs after each with its size (to pace the copy; false stops it with an
/// error). With `opts.durable_commits` off the chunks are not synced one by one; the whole
/// copy is synced at its end.
pub fn compact_copy_of<F: PageFile, G: PageFile>(
    snap: &Snapshot<F>,
    to: G,
    opts: Options,
    chunk_bytes: usize,
    mut after_chunk: impl FnMut(usize) -> bool,
) -> Result<Backend<G>> {
    let mut dst = Backend::open_with(to, opts)?;
    let mut from: Vec<u8> = Vec::new();
    let mut first = true;
    loop {
        let mut chunk: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0;
        snap.range(&from, None, |k, v| {
            if !first && k == from.as_slice() {
                return true;
            }
            size += k.len() + v.len();
            chunk.push((k.to_vec(), v.to_vec()));
            size < chunk_bytes
        })?;
        first = false;
        let Some((last, _)) = chunk.last() else {
            dst.file.sync()?;
            return Ok(dst);
        };
        from = last.clone();
        let mut txn = dst.write()?;
        for (k, v) in chunk {
            txn.put_owned(k, v)?;
        }
        txn.commit()?;
        if !after_chunk(size) {
            return Err(crate::Error::Invalid("the copy was stopped".into()));
        }
    }
}

/// Keys per commit of `Backend::bring_up_to_date`.
const BRING_UP_TO_DATE_KEYS: usize = 20_000;

/// Sets `keys` in `dst` as they are in `snap` (put, or deleted where `snap` has none), in
/// key order, in commits of `per_commit` keys (so a large set never sits in a transaction
/// whole); `after_commit` runs after each with the bytes it put (false stops the copy with
/// an error).
pub fn copy_keys<F: PageFile, G: PageFile>(
    snap: &Snapshot<F>,
    dst: &mut Backend<G>,
    keys: &HashSet<Vec<u8>>,
    per_commit: usize,
    mut after_commit: impl FnMut(usize) -> bool,
) -> Result<()> {
    let mut sorted: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    sorted.sort_unstable();
    for chunk in sorted.chunks(per_commit) {
        let bytes = update_copy(snap, dst, chunk)?;
        if !after_commit(bytes) {
            return Err(crate::Error::Invalid("the copy was stopped".into()));
        }
    }
    Ok(())
}

/// `copy_keys` for one commit; the bytes of the keys and values put.
fn update_copy<F: PageFile, G: PageFile>(
    snap: &Snapshot<F>,
    dst: &mut Backend<G>,
    keys: &[&[u8]],
) -> Result<usize> {
    let mut txn = dst.write()?;
    let mut bytes = 0;
    for k in keys {
        match snap.get(k)? {
            Some(v) => {
                bytes += k.len() + v.len();
                txn.put(k, v)?;
            }
            None => {
                txn.delete(k)?;
            }
        }
    }
    txn.commit()?;
    Ok(bytes)
}

/// Free lists are kept from the highest page id down (see `Backend::free`).
fn sort_free(free: &mut [PageId]) {
    free.sort_unstable_by(|a, b| b.cmp(a));
}

fn newest_meta(view: &[u8]) -> Result<Meta> {
    if view.len() < 2 * PAGE_BYTES {
        return Err(corrupt(0, "file shorter than its two meta pages".into()));
    }
    let a = Meta::decode(&view[..PAGE_BYTES]);
    let b = Meta::decode(&view[PAGE_BYTES..2 * PAGE_BYTES]);
    match (a, b) {
        (Ok(a), Ok(b)) => Ok(if a.txid >= b.txid { a } else { b }),
        (Ok(m), Err(_)) | (Err(_), Ok(m)) => Ok(m),
        (Err(ea), Err(eb)) => Err(corrupt(0, format!("no valid meta page: {ea}; {eb}"))),
    }
}

/// A value in a node being written.
#[derive(Clone, Debug)]
enum Val {
    /// Already in the file: inline bytes copied out, or an overflow run kept as it is.
    Stored(LeafBytes),
    New(Vec<u8>),
}

enum Child {
    Clean(PageId),
    Dirty(Box<Node>),
}

enum Node {
    Leaf(Vec<(Vec<u8>, Val)>),
    Branch(Vec<(Vec<u8>, Child)>),
}

/// The one write transaction. Dropped without `commit`, it changes nothing.
pub struct WriteTxn<'a, F: PageFile> {
    backend: &'a mut Backend<F>,
    base: Arc<Snapshot<F>>,
    root: Child,
    /// Pages of the base tree this transaction replaces or drops.
    freed: Vec<PageId>,
}

impl<F: PageFile> WriteTxn<'_, F> {
    /// Reads `key` as this transaction would leave it.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut child = &self.root;
        loop {
            match child {
                Child::Clean(id) => {
                    return Ok(self.base.get_under(*id, key)?.map(<[u8]>::to_vec));
                }
                Child::Dirty(node) => match node.as_ref() {
                    Node::Branch(children) => child = &children[branch_slot(children, key)].1,
                    Node::Leaf(entries) => {
                        let Ok(i) = entries.binary_search_by(|(k, _)| k.as_slice().cmp(key)) else {
                            return Ok(None);
                        };
                        return Ok(Some(match &entries[i].1 {
                            Val::New(v) | Val::Stored(LeafBytes::Inline(v)) => v.clone(),
                            Val::Stored(LeafBytes::Overflow { page, len }) => {
                                let v = LeafValue::Overflow {
                                    page: *page,
                                    len: *len,
                                };
                                self.base.value(v)?.to_vec()
                            }
                        }));
                    }
                },
            }
        }
    }

    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.put_owned(key.to_vec(), value.to_vec())
    }

    /// `put` with buffers the transaction can keep.
    pub fn put_owned(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<()> {
        assert!(
            key.len() <= page::KEY_BYTES_MAX,
            "backend keys are at most {} bytes",
            page::KEY_BYTES_MAX
        );
        if let Some(t) = &mut self.backend.touched {
            t.insert(key.clone());
        }
        let leaf = self.leaf_for(&key)?;
        let val = Val::New(value);
        match leaf.binary_search_by(|(k, _)| k.as_slice().cmp(&key)) {
            Ok(i) => {
                let old = std::mem::replace(&mut leaf[i].1, val);
                free_value(&old, &mut self.freed);
            }
            Err(i) => leaf.insert(i, (key, val)),
        }
        Ok(())
    }

    /// Removes `key`; whether it was there.
    pub fn delete(&mut self, key: &[u8]) -> Result<bool> {
        if let Some(t) = &mut self.backend.touched {
            t.insert(key.to_vec());
        }
        let leaf = self.leaf_for(key)?;
        match leaf.binary_search_by(|(k, _)| k.as_slice().cmp(key)) {
            Ok(i) => {
                let (_, old) = leaf.remove(i);
                free_value(&old, &mut self.freed);
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    /// The in-memory leaf where `key` belongs, materialising the path to it.
    fn leaf_for(&mut self, key: &[u8]) -> Result<&mut Vec<(Vec<u8>, Val)>> {
        let base = &self.base;
        let freed = &mut self.freed;
        let mut child = &mut self.root;
        for _ in 0..DEPTH_MAX {
            if let Child::Clean(id) = *child {
                *child = Child::Dirty(Box::new(load(base, id, freed)?));
            }
            let Child::Dirty(node) = child else {
                unreachable!("made dirty above")
            };
            match node.as_mut() {
                Node::Leaf(entries) => return Ok(entries),
                Node::Branch(children) => {
                    let i = branch_slot(children, key);
                    child = &mut children[i].1;
                }
            }
        }
        Err(corrupt(0, "tree deeper than any keel writes".into()))
    }

    /// Writes the transaction durably and publishes it to readers.
    pub fn commit(self) -> Result<()> {
        let WriteTxn {
            backend,
            base,
            root,
            mut freed,
        } = self;
        backend.poisoned = true;
        let mut page_count = base.meta.page_count;
        let mut writes: Vec<(PageId, Vec<u8>)> = Vec::new();
        let mut spill = Spill {
            backend,
            page_count: &mut page_count,
            writes: &mut writes,
        };
        let root = match root {
            Child::Clean(id) => id,
            Child::Dirty(node) => spill.root(*node)?,
        };
        if base.meta.freelist != 0 {
            let old = base.page(base.meta.freelist, "freelist")?;
            let n = old.bytes.len() / PAGE_BYTES;
            freed.extend((0..n as u64).map(|i| base.meta.freelist + i));
        }
        // The freelist lists every page outside the new tree: free now, pending for readers,
        // and freed by this commit. Its own run comes out of the free list first.
        let listed = backend.free.len()
            + backend.pending.iter().map(|(_, p)| p.len()).sum::<usize>()
            + freed.len();
        let run = page::run_pages(8 + 8 * listed);
        let freelist = backend.alloc(run, &mut page_count);
        let mut ids: Vec<PageId> = backend.free.clone();
        for (_, p) in &backend.pending {
            ids.extend_from_slice(p);
        }
        ids.extend_from_slice(&freed);
        writes.push((freelist, page::encode_freelist(&ids)));
        let meta = Meta {
            txid: base.meta.txid + 1,
            root,
            freelist,
            page_count,
        };
        backend.write_out(&writes, &meta)?;
        fail::fail_point!("backend-after-commit");
        let grown = meta.page_count * PAGE_BYTES as u64 > base.view.len() as u64;
        let view = if grown || !F::LIVE_VIEW {
            Arc::new(backend.file.view()?)
        } else {
            base.view.clone()
        };
        backend.current.store(Arc::new(Snapshot { meta, view }));
        backend.pending.push_back((base, freed));
        backend.poisoned = false;
        Ok(())
    }
}

impl<F: PageFile> Backend<F> {
    /// Pages first, synced; then the meta in its slot, synced.
    fn write_out(&mut self, writes: &[(PageId, Vec<u8>)], meta: &Meta) -> Result<()> {
        let need = meta.page_count * PAGE_BYTES as u64;
        if need > self.file_len {
            let step = self.opts.grow_bytes_min.max(self.file_len / 4);
            let len = need.max(self.file_len + step);
            self.file.set_len(len)?;
            self.file_len = len;
        }
        fail::fail_point!("backend-before-commit");
        for (id, bytes) in writes {
            self.file.write_at(bytes, id * PAGE_BYTES as u64)?;
        }
        let durable = self.opts.durable_commits;
        if durable {
            self.file.sync()?;
            fail::fail_point!("backend-before-meta");
        }
        let slot = meta.txid % 2;
        self.file
            .write_at(&meta.encode(), slot * PAGE_BYTES as u64)?;
        if durable {
            self.file.sync()
        } else {
            self.file.start_writeback();
            Ok(())
        }
    }
}

/// The node stored at `id`, read into memory; its page goes to `freed`.
fn load<F: PageFile>(base: &Snapshot<F>, id: PageId, freed: &mut Vec<PageId>) -> Result<Node> {
    if id == 0 {
        return Ok(Node::Leaf(Vec::new()));
    }
    let p = base.page(id, "tree")?;
    let node = match p.kind() {
        page::KIND_LEAF => Node::Leaf(
            (0..p.count())
                .map(|i| {
                    let (k, v) = p.leaf(i)?;
                    let stored = match v {
                        LeafValue::Inline(b) => LeafBytes::Inline(b.to_vec()),
                        // A run the transaction may free must lie in the file (found by the
                        // backend_pages fuzz target: a wild one overflowed the freelist).
                        LeafValue::Overflow { page, len }
                            if page >= 2
                                && page
                                    .checked_add(page::run_pages(len) as u64)
                                    .is_some_and(|end| end <= base.meta.page_count) =>
                        {
                            LeafBytes::Overflow { page, len }
                        }
                        LeafValue::Overflow { page, .. } => {
                            return Err(corrupt(id, format!("overflow run at page {page}")))
                        }
                    };
                    Ok((k.to_vec(), Val::Stored(stored)))
                })
                .collect::<Result<_>>()?,
        ),
        // Keel never writes a branch without children (one left empty disappears).
        page::KIND_BRANCH if p.count() == 0 => {
            return Err(corrupt(id, "branch page with no children".into()))
        }
        page::KIND_BRANCH => Node::Branch(
            (0..p.count())
                .map(|i| {
                    let (k, c) = p.branch(i)?;
                    Ok((k.to_vec(), Child::Clean(c)))
                })
                .collect::<Result<_>>()?,
        ),
        k => return Err(corrupt(id, format!("tree page of kind {k}"))),
    };
    freed.push(id);
    Ok(node)
}

/// Where `key` belongs among a branch's children.
fn branch_slot(children: &[(Vec<u8>, Child)], key: &[u8]) -> usize {
    match children.binary_search_by(|(k, _)| k.as_slice().cmp(key)) {
        Ok(i) => i,
        Err(i) => i.saturating_sub(1),
    }
}

/// An overwritten or deleted value's overflow run is freed with it.
fn free_value(v: &Val, freed: &mut Vec<PageId>) {
    if let Val::Stored(LeafBytes::Overflow { page, len }) = v {
        let n = page::run_pages(*len) as u64;
        freed.extend((0..n).map(|i| page + i));
    }
}

/// Writing a transaction's nodes out, bottom-up.
struct Spill<'a, F: PageFile> {
    backend: &'a mut Backend<F>,
    page_count: &'a mut u64,
    writes: &'a mut Vec<(PageId, Vec<u8>)>,
}

impl<F: PageFile> Spill<'_, F> {
    fn place(&mut self, bytes: Vec<u8>) -> PageId {
        let id = self
            .backend
            .alloc(bytes.len() / PAGE_BYTES, self.page_count);
        self.writes.push((id, bytes));
        id
    }

    /// The new root page (0: empty tree).
    fn root(&mut self, node: Node) -> Result<PageId> {
        let mut level = self.node(node)?;
        while level.len() > 1 {
            let branch = Node::Branch(
                level
                    .into_iter()
                    .map(|(k, id)| (k, Child::Clean(id)))
                    .collect(),
            );
            level = self.node(branch)?;
        }
        Ok(level.first().map_or(0, |(_, id)| *id))
    }

    /// Writes `node` as one or more pages; returns each page's first key and id.
    fn node(&mut self, node: Node) -> Result<Vec<(Vec<u8>, PageId)>> {
        match node {
            Node::Leaf(entries) => {
                let stored: Vec<(Vec<u8>, LeafBytes)> = entries
                    .into_iter()
                    .map(|(k, v)| {
                        let b = self.leaf_value(&k, v);
                        (k, b)
                    })
                    .collect();
                let sizes: Vec<usize> = stored
                    .iter()
                    .map(|(k, v)| page::leaf_entry_bytes(k.len(), v))
                    .collect();
                let mut out = Vec::new();
                for chunk in pack(&sizes) {
                    let part: Vec<(&[u8], &LeafBytes)> = stored[chunk.clone()]
                        .iter()
                        .map(|(k, v)| (k.as_slice(), v))
                        .collect();
                    let id = self.place(page::encode_leaf(&part));
                    out.push((stored[chunk.start].0.clone(), id));
                }
                Ok(out)
            }
            Node::Branch(children) => {
                let mut entries: Vec<(Vec<u8>, PageId)> = Vec::new();
                for (key, child) in children {
                    match child {
                        Child::Clean(id) => entries.push((key, id)),
                        Child::Dirty(n) => entries.extend(self.node(*n)?),
                    }
                }
                if entries.len() <= 1 {
                    // A branch of one child is that child (or nothing).
                    return Ok(entries);
                }
                let sizes: Vec<usize> = entries
                    .iter()
                    .map(|(k, _)| page::branch_entry_bytes(k.len()))
                    .collect();
                let mut out = Vec::new();
                for chunk in pack(&sizes) {
                    let part: Vec<(&[u8], PageId)> = entries[chunk.clone()]
                        .iter()
                        .map(|(k, id)| (k.as_slice(), *id))
                        .collect();
                    let id = self.place(page::encode_branch(&part));
                    out.push((entries[chunk.start].0.clone(), id));
                }
                Ok(out)
            }
        }
    }

    /// A new value big enough goes to an overflow run of its own.
    fn leaf_value(&mut self, key: &[u8], v: Val) -> LeafBytes {
        match v {
            Val::Stored(b) => b,
            Val::New(bytes) => {
                let inline = LeafBytes::Inline(bytes);
                if page::leaf_entry_bytes(key.len(), &inline) <= page::INLINE_ENTRY_BYTES_MAX {
                    return inline;
                }
                let LeafBytes::Inline(bytes) = inline else {
                    unreachable!()
                };
                let len = bytes.len();
                let page = self.place(page::encode_overflow(&bytes));
                LeafBytes::Overflow { page, len }
            }
        }
    }
}

/// Splits entries of these sizes into runs that each fit one page.
fn pack(sizes: &[usize]) -> Vec<std::ops::Range<usize>> {
    let room = PAGE_BYTES - page::HEADER_BYTES;
    let mut out = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, s) in sizes.iter().enumerate() {
        if used + s > room && i > start {
            out.push(start..i);
            start = i;
            used = 0;
        }
        used += s;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

#[cfg(test)]
mod tests;
