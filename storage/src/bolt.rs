//! etcd's backend file format (bbolt), read and written here, for etcd-format snapshots:
//! Maintenance.Snapshot streams one, `keel snapshot restore` and `keel migrate` read one.
//!
//! ```text
//! page: page_size bytes, or a run of 1 + overflow pages; a 16-byte header, little-endian:
//!   id u64 | flags u16 | count u16 | overflow u32
//! meta page (pages 0 and 1, flags 0x04), after the header:
//!   magic u32 = 0xED0CDAED | version u32 = 2 | page_size u32 | flags u32
//!   | root bucket: root page u64 | sequence u64
//!   | freelist page u64 (u64::MAX: not kept, free pages are those no tree reaches)
//!   | pgid u64 (pages in use: the file's size is pgid x page_size) | txid u64
//!   | checksum u64 (FNV-1a 64 of the 56 bytes before it)
//!   The valid meta with the higher txid is the current one.
//! branch page (flags 0x01): count x (pos u32 | ksize u32 | child page u64), then the keys;
//!   pos counts from the element's own first byte; a child holds the keys from its key on.
//! leaf page (flags 0x02): count x (flags u32 | pos u32 | ksize u32 | vsize u32), then each
//!   key and value; element flags 0x01: the value is a bucket: root page u64 | sequence u64,
//!   and when root is 0 the bucket is inline: a leaf page (header, elements, data; not
//!   padded) follows in the value.
//! The root bucket (the meta's) holds the named buckets; etcd's hold plain keys.
//! ```
//!
//! The reader checks every offset against the file, every page number against the meta's
//! page count, key order and that no page is reached twice, so a truncated or damaged file is
//! an error naming the problem, never a panic or a loop.
//!
//! The writer lays the tree out bottom-up from entries given in order, bucket by bucket, with
//! bounded memory (one page of entries per tree level). Its meta pages come first in the file
//! but name the page count and the root, known only at the end, so a file is made in two
//! passes over the same entries: `plan` computes the layout without writing, `write` streams
//! the bytes. Like etcd's own snapshots it keeps no freelist.

use std::io::Write;

pub const PAGE_SIZE: usize = 4096;
const HEADER: usize = 16;
const ELEMENT: usize = 16;
const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
const FLAG_BRANCH: u16 = 0x01;
const FLAG_LEAF: u16 = 0x02;
const FLAG_META: u16 = 0x04;
const ELEM_BUCKET: u32 = 0x01;
const NO_FREELIST: u64 = u64::MAX;
/// Most bytes in a leaf made of large entries.
const LARGE_NODE_BYTES: usize = 64 << 10;
/// Deepest tree the reader follows.
const DEPTH_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum BoltError {
    #[error("{0}")]
    Bad(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub(crate) fn bad<T>(why: impl Into<String>) -> Result<T, BoltError> {
    Err(BoltError::Bad(why.into()))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn fnv64a(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h ^= x as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The current meta page's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    pub page_size: u32,
    pub root: u64,
    pub freelist: u64,
    pub pgid: u64,
    pub txid: u64,
}

fn decode_meta(page: &[u8]) -> Result<Meta, String> {
    let m = page
        .get(HEADER..HEADER + 64)
        .ok_or("file too short for a meta page")?;
    let field = |at| u64_at(m, at).expect("64 bytes");
    if u32_at(m, 0) != Some(MAGIC) {
        return Err("not a bbolt file: bad magic in the meta page".into());
    }
    let version = u32_at(m, 4).expect("64 bytes");
    if version != VERSION {
        return Err(format!("unsupported bbolt version {version}"));
    }
    if fnv64a(&m[..56]) != field(56) {
        return Err("meta page checksum mismatch".into());
    }
    let page_size = u32_at(m, 8).expect("64 bytes");
    if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        return Err(format!("bad page size {page_size} in the meta page"));
    }
    Ok(Meta {
        page_size,
        root: field(16),
        freelist: field(32),
        pgid: field(40),
        txid: field(48),
    })
}

/// A bucket of the root bucket.
#[derive(Clone, Copy, Debug)]
pub struct Bucket<'a> {
    pub name: &'a [u8],
    root: Root<'a>,
}

#[derive(Clone, Copy, Debug)]
enum Root<'a> {
    Page(u64),
    /// An inline bucket's leaf page.
    Inline(&'a [u8]),
}

/// A bbolt file, read in place (a memory map or a buffer).
pub struct BoltFile<'a> {
    data: &'a [u8],
    ps: usize,
    meta: Meta,
}

impl<'a> BoltFile<'a> {
    /// Checks the meta pages and that the file holds every page they count.
    pub fn open(data: &'a [u8]) -> Result<BoltFile<'a>, BoltError> {
        let m0 = decode_meta(data);
        // The second meta is one page on: the first's page size, else the usual 4 KiB.
        let ps = m0
            .as_ref()
            .map(|m| m.page_size as usize)
            .unwrap_or(PAGE_SIZE);
        let m1 = data.get(ps..).map(decode_meta);
        let meta = match (m0, m1) {
            (Ok(a), Some(Ok(b))) => {
                if b.txid > a.txid && b.page_size == a.page_size {
                    b
                } else {
                    a
                }
            }
            (Ok(a), _) => a,
            (Err(_), Some(Ok(b))) => b,
            (Err(e), _) => return bad(e),
        };
        let ps = meta.page_size as usize;
        let need = meta.pgid.checked_mul(ps as u64);
        match need {
            Some(n) if n <= data.len() as u64 => {}
            _ => {
                return bad(format!(
                    "file is truncated: it holds {} bytes, its meta page counts {} pages of {ps}",
                    data.len(),
                    meta.pgid
                ))
            }
        }
        if meta.pgid < 3 || meta.root < 2 || meta.root >= meta.pgid {
            return bad(format!(
                "meta page names root page {} of {} pages",
                meta.root, meta.pgid
            ));
        }
        Ok(BoltFile { data, ps, meta })
    }

    pub fn meta(&self) -> Meta {
        self.meta
    }

    /// The database's size as etcd reports it (pages in use x page size).
    pub fn size(&self) -> u64 {
        self.meta.pgid * self.ps as u64
    }

    /// The run of pages starting at `id`, checked.
    fn page(&self, id: u64, seen: &mut Seen) -> Result<&'a [u8], BoltError> {
        if id < 2 || id >= self.meta.pgid {
            return bad(format!(
                "page {id} is out of bounds (the file has {} pages)",
                self.meta.pgid
            ));
        }
        let at = id as usize * self.ps;
        let head = &self.data[at..at + self.ps];
        let overflow = u32_at(head, 12).expect("a page") as u64;
        if u64_at(head, 0) != Some(id) {
            return bad(format!(
                "page {id} has the id of page {:?}",
                u64_at(head, 0)
            ));
        }
        if id + overflow >= self.meta.pgid {
            return bad(format!(
                "page {id} runs {overflow} pages past the end of the file"
            ));
        }
        for p in id..=id + overflow {
            seen.mark(p)?;
        }
        Ok(&self.data[at..at + (1 + overflow as usize) * self.ps])
    }

    /// The buckets of the root bucket, in name order.
    pub fn buckets(&self) -> Result<Vec<Bucket<'a>>, BoltError> {
        let mut seen = Seen::new(self.meta.pgid);
        let mut out = Vec::new();
        let root = self.page(self.meta.root, &mut seen)?;
        self.walk(root, 0, &mut seen, &mut None, &mut |k, v, bucket| {
            if !bucket {
                return bad(format!(
                    "the root bucket holds a plain key {:?}",
                    String::from_utf8_lossy(k)
                ));
            }
            out.push(Bucket {
                name: k,
                root: bucket_root(k, v)?,
            });
            Ok(true)
        })?;
        Ok(out)
    }

    /// The bucket named `name`, if there is one.
    pub fn bucket(&self, name: &[u8]) -> Result<Option<Bucket<'a>>, BoltError> {
        Ok(self.buckets()?.into_iter().find(|b| b.name == name))
    }

    /// Calls `f` with every key and value of `bucket` in key order until it returns false. A
    /// bucket nested in it is an error (etcd's buckets hold none).
    pub fn for_each(
        &self,
        bucket: &Bucket<'a>,
        mut f: impl FnMut(&'a [u8], &'a [u8]) -> Result<bool, BoltError>,
    ) -> Result<(), BoltError> {
        let mut seen = Seen::new(self.meta.pgid);
        let page = match bucket.root {
            Root::Page(id) => self.page(id, &mut seen)?,
            Root::Inline(p) => p,
        };
        let name = bucket.name;
        self.walk(page, 0, &mut seen, &mut None, &mut |k, v, nested| {
            if nested {
                return bad(format!(
                    "bucket {:?} holds a nested bucket",
                    String::from_utf8_lossy(name)
                ));
            }
            f(k, v)
        })
        .map(|_| ())
    }

    /// Visits the entries under `page` in order; false from `f` stops the walk (returned).
    #[allow(clippy::type_complexity)]
    fn walk(
        &self,
        page: &'a [u8],
        depth: usize,
        seen: &mut Seen,
        last: &mut Option<&'a [u8]>,
        f: &mut dyn FnMut(&'a [u8], &'a [u8], bool) -> Result<bool, BoltError>,
    ) -> Result<bool, BoltError> {
        if depth > DEPTH_MAX {
            return bad("tree deeper than 64 levels (a cycle of pages)");
        }
        let (Some(flags), Some(count)) = (u16_at(page, 8), u16_at(page, 10)) else {
            return bad("page shorter than its header");
        };
        let id = u64_at(page, 0).unwrap_or(0);
        let count = count as usize;
        if HEADER + count * ELEMENT > page.len() {
            return bad(format!(
                "page {id}: {count} elements do not fit in {} bytes",
                page.len()
            ));
        }
        let slice = |at: usize, pos: u32, len: u32| -> Result<&'a [u8], BoltError> {
            let from = at.checked_add(pos as usize);
            let to = from.and_then(|s| s.checked_add(len as usize));
            match (from, to) {
                (Some(s), Some(e)) if e <= page.len() => Ok(&page[s..e]),
                _ => bad(format!("page {id}: an element points past the page")),
            }
        };
        if flags & FLAG_LEAF != 0 {
            for i in 0..count {
                let at = HEADER + i * ELEMENT;
                let eflags = u32_at(page, at).expect("checked");
                let pos = u32_at(page, at + 4).expect("checked");
                let ksize = u32_at(page, at + 8).expect("checked");
                let vsize = u32_at(page, at + 12).expect("checked");
                let key = slice(at, pos, ksize)?;
                let value = slice(at, pos.saturating_add(ksize), vsize)?;
                if let Some(prev) = *last {
                    if prev >= key {
                        return bad(format!("page {id}: keys out of order"));
                    }
                }
                *last = Some(key);
                if !f(key, value, eflags & ELEM_BUCKET != 0)? {
                    return Ok(false);
                }
            }
            Ok(true)
        } else if flags & FLAG_BRANCH != 0 {
            for i in 0..count {
                let at = HEADER + i * ELEMENT;
                let pos = u32_at(page, at).expect("checked");
                let ksize = u32_at(page, at + 4).expect("checked");
                let child = u64_at(page, at + 8).expect("checked");
                slice(at, pos, ksize)?;
                let child = self.page(child, seen)?;
                if !self.walk(child, depth + 1, seen, last, f)? {
                    return Ok(false);
                }
            }
            Ok(true)
        } else {
            bad(format!(
                "page {id}: flags {flags:#x} are neither branch nor leaf"
            ))
        }
    }
}

/// A bucket value: its root page, or its inline leaf.
fn bucket_root<'a>(name: &[u8], v: &'a [u8]) -> Result<Root<'a>, BoltError> {
    let Some(root) = u64_at(v, 0).filter(|_| v.len() >= 16) else {
        return bad(format!(
            "bucket {:?}: value too short for a bucket",
            String::from_utf8_lossy(name)
        ));
    };
    if root != 0 {
        return Ok(Root::Page(root));
    }
    let page = &v[16..];
    match u16_at(page, 8) {
        Some(f) if f & FLAG_LEAF != 0 => Ok(Root::Inline(page)),
        _ => bad(format!(
            "bucket {:?}: inline page is not a leaf",
            String::from_utf8_lossy(name)
        )),
    }
}

/// Pages reached so far: reaching one twice is a damaged file (or a cycle).
struct Seen(Vec<u64>);

impl Seen {
    fn new(pages: u64) -> Seen {
        Seen(vec![0; pages.div_ceil(64) as usize])
    }

    fn mark(&mut self, id: u64) -> Result<(), BoltError> {
        let (w, b) = ((id / 64) as usize, id % 64);
        if self.0[w] & (1 << b) != 0 {
            return bad(format!("page {id} is referenced twice"));
        }
        self.0[w] |= 1 << b;
        Ok(())
    }
}

/// Where a file's pages go, in page order; `None` only counts them (the planning pass).
struct Out<W: Write> {
    w: Option<W>,
    next: u64,
}

impl<W: Write> Out<W> {
    /// Writes a page run (header filled in here) and returns its first page number.
    fn page(&mut self, flags: u16, count: usize, body: &[u8]) -> Result<u64, BoltError> {
        let id = self.next;
        let pages = (HEADER + body.len()).div_ceil(PAGE_SIZE).max(1);
        self.next += pages as u64;
        if let Some(w) = &mut self.w {
            let mut b = Vec::with_capacity(pages * PAGE_SIZE);
            b.extend_from_slice(&id.to_le_bytes());
            b.extend_from_slice(&flags.to_le_bytes());
            b.extend_from_slice(&(count as u16).to_le_bytes());
            b.extend_from_slice(&((pages - 1) as u32).to_le_bytes());
            b.extend_from_slice(body);
            b.resize(pages * PAGE_SIZE, 0);
            w.write_all(&b)?;
        }
        Ok(id)
    }
}

/// One element waiting in a node: a leaf's (flags, key, value) or a branch's (key, child).
struct Elem {
    flags: u32,
    key: Vec<u8>,
    value: Vec<u8>,
    child: u64,
}

#[derive(Default)]
struct Level {
    elems: Vec<Elem>,
    bytes: usize,
    emitted: u64,
}

/// Elements of a page body (after the header) for a leaf or a branch.
fn encode_body(leaf: bool, elems: &[Elem]) -> Vec<u8> {
    let data: usize = elems.iter().map(|e| e.key.len() + e.value.len()).sum();
    let mut b = Vec::with_capacity(elems.len() * ELEMENT + data);
    let mut pos = elems.len() * ELEMENT;
    for e in elems {
        if leaf {
            b.extend_from_slice(&e.flags.to_le_bytes());
            b.extend_from_slice(&(pos as u32).to_le_bytes());
            b.extend_from_slice(&(e.key.len() as u32).to_le_bytes());
            b.extend_from_slice(&(e.value.len() as u32).to_le_bytes());
        } else {
            b.extend_from_slice(&(pos as u32).to_le_bytes());
            b.extend_from_slice(&(e.key.len() as u32).to_le_bytes());
            b.extend_from_slice(&e.child.to_le_bytes());
        }
        // The next element's data starts after this one's, counted from the next element.
        pos = pos - ELEMENT + e.key.len() + e.value.len();
    }
    for e in elems {
        b.extend_from_slice(&e.key);
        b.extend_from_slice(&e.value);
    }
    b
}

/// A B+tree laid out bottom-up from entries in key order: level 0 is the leaves.
#[derive(Default)]
struct Tree {
    levels: Vec<Level>,
}

impl Tree {
    fn add<W: Write>(&mut self, out: &mut Out<W>, level: usize, e: Elem) -> Result<(), BoltError> {
        if self.levels.len() <= level {
            self.levels.push(Level::default());
        }
        let size = ELEMENT + e.key.len() + e.value.len();
        let l = &self.levels[level];
        let now = HEADER + l.bytes;
        // A page holds what fits; large entries (over half a page each) share a run of
        // pages up to LARGE_NODE_BYTES instead of taking a run each, half of it padding.
        let fits = now + size <= PAGE_SIZE
            || (now > PAGE_SIZE / 2 && size > PAGE_SIZE / 2 && now + size <= LARGE_NODE_BYTES);
        if !l.elems.is_empty() && !fits {
            let (key, id) = self.flush(out, level)?;
            self.add(out, level + 1, branch(key, id))?;
        }
        let l = &mut self.levels[level];
        l.bytes += size;
        l.elems.push(e);
        Ok(())
    }

    /// Writes the node of `level`; returns its first key and page.
    fn flush<W: Write>(
        &mut self,
        out: &mut Out<W>,
        level: usize,
    ) -> Result<(Vec<u8>, u64), BoltError> {
        let l = &mut self.levels[level];
        let elems = std::mem::take(&mut l.elems);
        l.bytes = 0;
        l.emitted += 1;
        let leaf = level == 0;
        let id = out.page(
            if leaf { FLAG_LEAF } else { FLAG_BRANCH },
            elems.len(),
            &encode_body(leaf, &elems),
        )?;
        let key = elems.into_iter().next().map(|e| e.key).unwrap_or_default();
        Ok((key, id))
    }

    /// Writes what is left, bottom-up; returns the root page.
    fn finish<W: Write>(mut self, out: &mut Out<W>) -> Result<u64, BoltError> {
        if self.levels.is_empty() {
            self.levels.push(Level::default());
        }
        let mut level = 0;
        loop {
            let top = level + 1 == self.levels.len();
            if top && self.levels[level].emitted == 0 {
                return Ok(self.flush(out, level)?.1);
            }
            let (key, id) = self.flush(out, level)?;
            self.add(out, level + 1, branch(key, id))?;
            level += 1;
        }
    }
}

fn branch(key: Vec<u8>, child: u64) -> Elem {
    Elem {
        flags: 0,
        key,
        value: Vec::new(),
        child,
    }
}

/// A bucket being written: small ones stay inline (bbolt's rule: at most a quarter page).
enum BucketBody {
    Small { elems: Vec<Elem>, bytes: usize },
    Tree(Tree),
}

/// The shape of a file: what the meta pages say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub root: u64,
    pub pgid: u64,
}

impl Layout {
    pub fn size(&self) -> u64 {
        self.pgid * PAGE_SIZE as u64
    }
}

/// Writes a bbolt file from buckets given in name order, each one's entries in key order.
/// Planning (`Writer::plan`) and writing (`Writer::write`) must be given the same entries.
pub struct Writer<W: Write> {
    out: Out<W>,
    planned: Option<Layout>,
    dir: Vec<(Vec<u8>, Vec<u8>)>,
    current: Option<(Vec<u8>, BucketBody)>,
}

impl Writer<std::io::Sink> {
    /// The planning pass: counts pages, writes nothing.
    pub fn plan() -> Writer<std::io::Sink> {
        Writer {
            out: Out { w: None, next: 2 },
            planned: None,
            dir: Vec::new(),
            current: None,
        }
    }
}

impl<W: Write> Writer<W> {
    /// The writing pass, for the layout the planning pass found: the meta pages go out now.
    pub fn write(mut w: W, planned: Layout) -> Result<Writer<W>, BoltError> {
        for (id, txid) in [(0u64, 1u64), (1, 2)] {
            w.write_all(&meta_page(id, planned, txid))?;
        }
        Ok(Writer {
            out: Out {
                w: Some(w),
                next: 2,
            },
            planned: Some(planned),
            dir: Vec::new(),
            current: None,
        })
    }

    pub fn begin_bucket(&mut self, name: &[u8]) -> Result<(), BoltError> {
        self.end_bucket()?;
        if let Some((last, _)) = self.dir.last() {
            if last.as_slice() >= name {
                return bad("buckets out of order");
            }
        }
        self.current = Some((
            name.to_vec(),
            BucketBody::Small {
                elems: Vec::new(),
                bytes: HEADER,
            },
        ));
        Ok(())
    }

    /// Adds an entry to the current bucket (keys in increasing order).
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), BoltError> {
        let Some((_, body)) = &mut self.current else {
            return bad("an entry outside any bucket");
        };
        let e = Elem {
            flags: 0,
            key: key.to_vec(),
            value: value.to_vec(),
            child: 0,
        };
        match body {
            BucketBody::Small { elems, bytes } => {
                if let Some(last) = elems.last() {
                    if last.key.as_slice() >= key {
                        return bad("keys out of order");
                    }
                }
                *bytes += ELEMENT + key.len() + value.len();
                elems.push(e);
                if *bytes > PAGE_SIZE / 4 {
                    let mut tree = Tree::default();
                    for e in std::mem::take(elems) {
                        tree.add(&mut self.out, 0, e)?;
                    }
                    *body = BucketBody::Tree(tree);
                }
            }
            BucketBody::Tree(t) => t.add(&mut self.out, 0, e)?,
        }
        Ok(())
    }

    fn end_bucket(&mut self) -> Result<(), BoltError> {
        let Some((name, body)) = self.current.take() else {
            return Ok(());
        };
        let mut value = Vec::new();
        match body {
            BucketBody::Small { elems, .. } => {
                value.extend_from_slice(&[0u8; 16]);
                value.extend_from_slice(&0u64.to_le_bytes());
                value.extend_from_slice(&FLAG_LEAF.to_le_bytes());
                value.extend_from_slice(&(elems.len() as u16).to_le_bytes());
                value.extend_from_slice(&0u32.to_le_bytes());
                value.extend_from_slice(&encode_body(true, &elems));
            }
            BucketBody::Tree(t) => {
                let root = t.finish(&mut self.out)?;
                value.extend_from_slice(&root.to_le_bytes());
                value.extend_from_slice(&0u64.to_le_bytes());
            }
        }
        self.dir.push((name, value));
        Ok(())
    }

    /// Writes the root bucket; returns the layout (and the writer's output). In the writing
    /// pass a layout other than the planned one is an error: the entries changed.
    pub fn finish(mut self) -> Result<(Layout, Option<W>), BoltError> {
        self.end_bucket()?;
        let mut root = Tree::default();
        for (name, value) in std::mem::take(&mut self.dir) {
            root.add(
                &mut self.out,
                0,
                Elem {
                    flags: ELEM_BUCKET,
                    key: name,
                    value,
                    child: 0,
                },
            )?;
        }
        let root = root.finish(&mut self.out)?;
        let layout = Layout {
            root,
            pgid: self.out.next,
        };
        if let Some(p) = self.planned {
            if p != layout {
                return bad(format!(
                    "the state changed between planning ({p:?}) and writing ({layout:?})"
                ));
            }
        }
        let mut w = self.out.w.take();
        if let Some(w) = &mut w {
            w.flush()?;
        }
        Ok((layout, w))
    }
}

fn meta_page(id: u64, l: Layout, txid: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    p[0..8].copy_from_slice(&id.to_le_bytes());
    p[8..10].copy_from_slice(&FLAG_META.to_le_bytes());
    let m = &mut p[HEADER..HEADER + 64];
    m[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    m[4..8].copy_from_slice(&VERSION.to_le_bytes());
    m[8..12].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    m[16..24].copy_from_slice(&l.root.to_le_bytes());
    m[32..40].copy_from_slice(&NO_FREELIST.to_le_bytes());
    m[40..48].copy_from_slice(&l.pgid.to_le_bytes());
    m[48..56].copy_from_slice(&txid.to_le_bytes());
    let sum = fnv64a(&m[..56]);
    m[56..64].copy_from_slice(&sum.to_le_bytes());
    p
}

/// etcd's `snapshot status` of a file: a CRC-32C over every bucket's name and entries, the
/// revision of the last record in "key", the entry count and the size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub hash: u32,
    pub revision: i64,
    pub total_key: u64,
    pub total_size: u64,
}

pub fn status(file: &BoltFile<'_>) -> Result<Status, BoltError> {
    let mut st = Status {
        hash: 0,
        revision: 0,
        total_key: 0,
        total_size: file.size(),
    };
    for b in file.buckets()? {
        st.hash = crc32c::crc32c_append(st.hash, b.name);
        let is_key = b.name == b"key";
        file.for_each(&b, |k, v| {
            st.hash = crc32c::crc32c_append(st.hash, k);
            st.hash = crc32c::crc32c_append(st.hash, v);
            if let (true, Some(main)) = (is_key, k.get(..8)) {
                st.revision = u64::from_be_bytes(main.try_into().expect("8 bytes")) as i64;
            }
            st.total_key += 1;
            Ok(true)
        })?;
    }
    Ok(st)
}

/// Buckets and their entries, in order (for tests).
#[cfg(test)]
pub(crate) type Buckets = Vec<(Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>)>;

/// A whole file from `buckets`, through both passes (for tests).
#[cfg(test)]
pub(crate) fn build_file(buckets: &Buckets) -> Vec<u8> {
    fn feed<W: Write>(w: &mut Writer<W>, buckets: &Buckets) {
        for (name, entries) in buckets {
            w.begin_bucket(name).unwrap();
            for (k, v) in entries {
                w.put(k, v).unwrap();
            }
        }
    }
    let mut plan = Writer::plan();
    feed(&mut plan, buckets);
    let (layout, _) = plan.finish().unwrap();
    let mut w = Writer::write(Vec::new(), layout).unwrap();
    feed(&mut w, buckets);
    let (written, out) = w.finish().unwrap();
    assert_eq!(written, layout);
    out.unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(buckets: &Buckets) -> Vec<u8> {
        let out = build_file(buckets);
        assert_eq!(
            out.len() as u64,
            BoltFile::open(&out).unwrap().size(),
            "the file is exactly its pages"
        );
        out
    }

    fn read_all(data: &[u8]) -> Result<Buckets, BoltError> {
        let f = BoltFile::open(data)?;
        let mut out = Vec::new();
        for b in f.buckets()? {
            let mut entries = Vec::new();
            f.for_each(&b, |k, v| {
                entries.push((k.to_vec(), v.to_vec()));
                Ok(true)
            })?;
            out.push((b.name.to_vec(), entries));
        }
        Ok(out)
    }

    fn sample(n: usize, value: usize) -> Buckets {
        let big: Vec<(Vec<u8>, Vec<u8>)> = (0..n as u64)
            .map(|i| (i.to_be_bytes().to_vec(), vec![(i % 251) as u8; value]))
            .collect();
        vec![
            (b"alarm".to_vec(), vec![]),
            (b"key".to_vec(), big),
            (
                b"meta".to_vec(),
                vec![(b"consistent_index".to_vec(), 7u64.to_be_bytes().to_vec())],
            ),
        ]
    }

    #[test]
    fn round_trips_small_large_and_overflowing_buckets() {
        for (n, value) in [
            (0, 0),
            (3, 10),
            (1000, 100),
            (20_000, 40),
            (5, 9000),
            (300, 5000),
        ] {
            let b = sample(n, value);
            let data = build(&b);
            assert_eq!(read_all(&data).unwrap(), b, "n={n} value={value}");
        }
    }

    #[test]
    fn large_values_share_page_runs() {
        // 300 values of 5000 bytes: one run each would take 2 pages (8 KiB) per value.
        let data = build(&sample(300, 5000));
        assert!(
            data.len() < 300 * 5000 * 21 / 20,
            "{} bytes for 1.5 MB of values",
            data.len()
        );
    }

    #[test]
    fn small_buckets_are_inline_and_large_ones_are_trees() {
        let data = build(&sample(1000, 100));
        let f = BoltFile::open(&data).unwrap();
        let kinds: Vec<(Vec<u8>, bool)> = f
            .buckets()
            .unwrap()
            .iter()
            .map(|b| (b.name.to_vec(), matches!(b.root, Root::Inline(_))))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (b"alarm".to_vec(), true),
                (b"key".to_vec(), false),
                (b"meta".to_vec(), true)
            ]
        );
    }

    #[test]
    fn status_counts_entries_and_takes_the_last_revision() {
        let mut b = sample(0, 0);
        let rev = |main: u64| {
            let mut k = main.to_be_bytes().to_vec();
            k.push(b'_');
            k.extend_from_slice(&0u64.to_be_bytes());
            k
        };
        b[1].1 = vec![(rev(2), b"x".to_vec()), (rev(9), b"y".to_vec())];
        let data = build(&b);
        let st = status(&BoltFile::open(&data).unwrap()).unwrap();
        assert_eq!(st.revision, 9);
        assert_eq!(st.total_key, 3);
        assert_eq!(st.total_size, data.len() as u64);
        let mut crc = 0;
        for (name, entries) in &b {
            crc = crc32c::crc32c_append(crc, name);
            for (k, v) in entries {
                crc = crc32c::crc32c_append(crc, k);
                crc = crc32c::crc32c_append(crc, v);
            }
        }
        assert_eq!(st.hash, crc);
    }

    #[test]
    fn damage_is_named() {
        let data = build(&sample(2000, 100));
        let err = |d: &[u8]| match read_all(d) {
            Err(BoltError::Bad(s)) => s,
            other => panic!("expected an error, got {:?}", other.map(|b| b.len())),
        };
        assert!(err(&data[..data.len() - PAGE_SIZE]).contains("truncated"));
        let mut d = data.clone();
        d[16] ^= 1;
        d[PAGE_SIZE + 16] ^= 1;
        assert!(err(&d).contains("magic"));
        let mut d = data.clone();
        d[16 + 20] ^= 1; // inside meta 0's root field: checksum fails, meta 1 still reads
        d[PAGE_SIZE + 16 + 20] ^= 1;
        assert!(err(&d).contains("checksum"));
        // A leaf page's first element pointing far away.
        let mut d = data.clone();
        let at = 2 * PAGE_SIZE + HEADER + 4;
        d[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(err(&d).contains("past the page"));
        // A branch pointing at itself.
        let f = BoltFile::open(&data).unwrap();
        let key = f.bucket(b"key").unwrap().unwrap();
        let Root::Page(root) = key.root else {
            panic!("a tree")
        };
        let mut d = data.clone();
        let at = root as usize * PAGE_SIZE + HEADER + 8;
        d[at..at + 8].copy_from_slice(&root.to_le_bytes());
        assert!(err(&d).contains("referenced twice"));
    }

    /// Seeds for the libFuzzer target (scripts/fuzz-smoke.sh runs this to fill its corpus).
    #[test]
    #[ignore]
    fn write_fuzz_seeds() {
        let dir = std::env::var("KEEL_FUZZ_SEEDS").expect("KEEL_FUZZ_SEEDS names a directory");
        std::fs::create_dir_all(&dir).unwrap();
        for (i, (n, value)) in [(0, 0), (3, 10), (200, 30), (5, 9000)]
            .into_iter()
            .enumerate()
        {
            std::fs::write(format!("{dir}/seed{i}"), build(&sample(n, value))).unwrap();
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let base = build(&sample(600, 50));
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..crate::test_cases("KEEL_FUZZ_ITERS", 2000) {
            let mut d = base.clone();
            for _ in 0..rng.gen_range(1..8) {
                let i = rng.gen_range(0..d.len());
                d[i] = rng.gen();
            }
            if rng.gen_bool(0.2) {
                let n = rng.gen_range(0..d.len());
                d.truncate(n);
            }
            // Keep the metas valid now and then, so damage reaches the tree.
            if rng.gen_bool(0.5) && d.len() >= 2 * PAGE_SIZE {
                let l = BoltFile::open(&base).unwrap().meta();
                let layout = Layout {
                    root: l.root,
                    pgid: l.pgid,
                };
                d[..PAGE_SIZE].copy_from_slice(&meta_page(0, layout, 1));
            }
            if let Ok(f) = BoltFile::open(&d) {
                let _ = status(&f);
            }
        }
    }
}
