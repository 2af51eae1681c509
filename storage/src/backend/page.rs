//! The backend file's page formats: meta pages, tree pages (branch, leaf), overflow runs that
//! hold large values, and freelist runs. Every page (or run of pages) carries a CRC32C, checked
//! on every read: a bad checksum is corruption, reported, never served.
//!
//! ```text
//! file:  | meta 0 | meta 1 | page 2 | page 3 | ...                 (PAGE_BYTES each)
//!
//! meta page (the rest of the page is zeros):
//!   0  magic "KEELBT01"   8  format u32 (1)   12 page_bytes u32
//!   16 txid u64           24 root u64 (0: empty tree)
//!   32 freelist u64 (first page of the freelist run, 0: none)
//!   40 page_count u64 (pages the file uses, free ones included)
//!   48 crc32c u32 over bytes 0..48
//!
//! tree/overflow/freelist page header (16 bytes):
//!   0 kind u8 (1 branch, 2 leaf, 3 overflow, 4 freelist)  1 zero u8  2 count u16
//!   4 run u32 (pages in this run, >= 1)  8 crc32c u32 (over the run, this field as 0)
//!   12 zero u32
//!
//! branch: header | count x u16 slot offsets | ... entries packed at the end of the page
//!   entry: klen u16 | child page u64 | key
//! leaf:   header | count x u16 slot offsets | ... entries
//!   entry: klen u16 | vkind u8 (0 inline, 1 overflow) | vlen u32 | key
//!          | value (inline) or first page of its overflow run u64
//! overflow run: header | value bytes (the run spans as many pages as it needs)
//! freelist run: header | n u64 | n x page id u64
//! ```
//!
//! All integers are little-endian. Keys in a page are sorted; a branch's key for a child is
//! the child's first key (the first child's key is never compared against).

use crate::error::{Error, Result};

pub const PAGE_BYTES: usize = 4096;
pub const HEADER_BYTES: usize = 16;
pub const MAGIC: &[u8; 8] = b"KEELBT01";
pub const FORMAT: u32 = 1;
pub const META_BYTES: usize = 52;

pub const KIND_BRANCH: u8 = 1;
pub const KIND_LEAF: u8 = 2;
pub const KIND_OVERFLOW: u8 = 3;
pub const KIND_FREELIST: u8 = 4;

/// A leaf entry larger than this keeps its value in an overflow run, so a leaf always holds
/// at least a few entries.
pub const INLINE_ENTRY_BYTES_MAX: usize = PAGE_BYTES / 4;
/// Keys are short (a revision, a lease ID, a name): at most this long.
pub const KEY_BYTES_MAX: usize = 512;

pub type PageId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Meta {
    pub txid: u64,
    pub root: PageId,
    pub freelist: PageId,
    pub page_count: u64,
}

impl Meta {
    pub fn encode(&self) -> [u8; PAGE_BYTES] {
        let mut p = [0u8; PAGE_BYTES];
        p[0..8].copy_from_slice(MAGIC);
        p[8..12].copy_from_slice(&FORMAT.to_le_bytes());
        p[12..16].copy_from_slice(&(PAGE_BYTES as u32).to_le_bytes());
        p[16..24].copy_from_slice(&self.txid.to_le_bytes());
        p[24..32].copy_from_slice(&self.root.to_le_bytes());
        p[32..40].copy_from_slice(&self.freelist.to_le_bytes());
        p[40..48].copy_from_slice(&self.page_count.to_le_bytes());
        let crc = crc32c::crc32c(&p[0..48]);
        p[48..52].copy_from_slice(&crc.to_le_bytes());
        p
    }

    /// The meta in `p`, or why it is not one (torn, never written, another format).
    pub fn decode(p: &[u8]) -> std::result::Result<Meta, &'static str> {
        if p.len() < META_BYTES {
            return Err("short meta page");
        }
        if crc32c::crc32c(&p[0..48]) != u32_at(p, 48) {
            return Err("meta checksum mismatch");
        }
        if &p[0..8] != MAGIC {
            return Err("not a keel backend file");
        }
        if u32_at(p, 8) != FORMAT || u32_at(p, 12) as usize != PAGE_BYTES {
            return Err("unsupported backend format or page size");
        }
        Ok(Meta {
            txid: u64_at(p, 16),
            root: u64_at(p, 24),
            freelist: u64_at(p, 32),
            page_count: u64_at(p, 40),
        })
    }
}

pub fn u16_at(p: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(p[at..at + 2].try_into().expect("2 bytes"))
}

pub fn u32_at(p: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(p[at..at + 4].try_into().expect("4 bytes"))
}

pub fn u64_at(p: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(p[at..at + 8].try_into().expect("8 bytes"))
}

/// Pages a run with `payload` bytes after its header needs.
pub fn run_pages(payload: usize) -> usize {
    (HEADER_BYTES + payload).div_ceil(PAGE_BYTES)
}

/// Writes the header of a run (`buf` is the whole run) and its checksum.
pub fn seal(buf: &mut [u8], kind: u8, count: u16) {
    debug_assert!(buf.len().is_multiple_of(PAGE_BYTES) && !buf.is_empty());
    buf[0] = kind;
    buf[1] = 0;
    buf[2..4].copy_from_slice(&count.to_le_bytes());
    let run = (buf.len() / PAGE_BYTES) as u32;
    buf[4..8].copy_from_slice(&run.to_le_bytes());
    buf[8..16].fill(0);
    let crc = crc32c::crc32c(buf);
    buf[8..12].copy_from_slice(&crc.to_le_bytes());
}

/// A checked view of one page or run read from the file.
#[derive(Clone, Copy)]
pub struct PageRef<'a> {
    pub id: PageId,
    pub bytes: &'a [u8],
}

/// Checks the page (or run) at `id` in `file` (the whole file's bytes) and returns it.
pub fn read<'a>(file: &'a [u8], id: PageId, what: &str) -> Result<PageRef<'a>> {
    let at = (id as usize)
        .checked_mul(PAGE_BYTES)
        .filter(|at| at.checked_add(PAGE_BYTES).is_some_and(|e| e <= file.len()) && id >= 2)
        .ok_or_else(|| corrupt(id, format!("{what} page {id} is outside the file")))?;
    let first = &file[at..at + PAGE_BYTES];
    let run = u32_at(first, 4) as usize;
    let end = run.checked_mul(PAGE_BYTES).and_then(|n| n.checked_add(at));
    if run == 0 || end.is_none_or(|e| e > file.len()) {
        return Err(corrupt(id, format!("{what} page {id}: run of {run} pages")));
    }
    let bytes = &file[at..at + run * PAGE_BYTES];
    let want = u32_at(first, 8);
    let mut h = crc32c::crc32c(&first[..8]);
    h = crc32c::crc32c_append(h, &[0; 4]);
    h = crc32c::crc32c_append(h, &bytes[12..]);
    if h != want {
        return Err(corrupt(id, format!("{what} page {id}: checksum mismatch")));
    }
    Ok(PageRef { id, bytes })
}

pub fn corrupt(id: PageId, reason: String) -> Error {
    Error::Corrupted {
        path: std::path::PathBuf::from("backend"),
        offset: id.saturating_mul(PAGE_BYTES as u64),
        reason,
    }
}

impl<'a> PageRef<'a> {
    pub fn kind(&self) -> u8 {
        self.bytes[0]
    }

    pub fn count(&self) -> usize {
        u16_at(self.bytes, 2) as usize
    }

    fn slot(&self, i: usize) -> Result<usize> {
        let at = HEADER_BYTES + 2 * i;
        if i >= self.count() || at + 2 > PAGE_BYTES {
            return Err(corrupt(self.id, format!("slot {i} past the page's slots")));
        }
        let off = u16_at(self.bytes, at) as usize;
        if off < HEADER_BYTES + 2 * self.count() || off >= PAGE_BYTES {
            return Err(corrupt(
                self.id,
                format!("slot {i} points outside the page"),
            ));
        }
        Ok(off)
    }

    fn key_at(&self, off: usize, fixed: usize) -> Result<&'a [u8]> {
        let klen = u16_at(self.bytes, off) as usize;
        if klen > KEY_BYTES_MAX {
            // Keel never writes one: a branch of such keys could not be packed (found by
            // the backend_pages fuzz target: a commit looped, growing the file).
            return Err(corrupt(self.id, format!("a key of {klen} bytes")));
        }
        let start = off + fixed;
        self.bytes
            .get(start..start + klen)
            .filter(|_| start + klen <= PAGE_BYTES)
            .ok_or_else(|| corrupt(self.id, "entry runs past the page".into()))
    }

    /// Branch entry `i`: (key, child).
    pub fn branch(&self, i: usize) -> Result<(&'a [u8], PageId)> {
        let off = self.slot(i)?;
        if off + 10 > PAGE_BYTES {
            return Err(corrupt(self.id, "branch entry past the page".into()));
        }
        Ok((self.key_at(off, 10)?, u64_at(self.bytes, off + 2)))
    }

    /// Leaf entry `i`: (key, value).
    pub fn leaf(&self, i: usize) -> Result<(&'a [u8], LeafValue<'a>)> {
        let off = self.slot(i)?;
        if off + 7 > PAGE_BYTES {
            return Err(corrupt(self.id, "leaf entry past the page".into()));
        }
        let key = self.key_at(off, 7)?;
        let vlen = u32_at(self.bytes, off + 3) as usize;
        let vat = off + 7 + key.len();
        let value = match self.bytes[off + 2] {
            0 => LeafValue::Inline(
                self.bytes
                    .get(vat..vat + vlen)
                    .filter(|_| vat + vlen <= PAGE_BYTES)
                    .ok_or_else(|| corrupt(self.id, "value runs past the page".into()))?,
            ),
            1 if vat + 8 <= PAGE_BYTES => LeafValue::Overflow {
                page: u64_at(self.bytes, vat),
                len: vlen,
            },
            _ => return Err(corrupt(self.id, "bad leaf value kind".into())),
        };
        Ok((key, value))
    }

    /// The index of the first entry whose key is >= `key` (leaf) / the child to descend
    /// into for `key` (branch), by binary search.
    pub fn search(&self, key: &[u8]) -> Result<(usize, bool)> {
        let (mut lo, mut hi) = (0, self.count());
        while lo < hi {
            let mid = (lo + hi) / 2;
            let k = if self.kind() == KIND_BRANCH {
                self.branch(mid)?.0
            } else {
                self.leaf(mid)?.0
            };
            match k.cmp(key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Equal => return Ok((mid, true)),
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        Ok((lo, false))
    }

    /// Overflow run payload.
    pub fn payload(&self) -> &'a [u8] {
        &self.bytes[HEADER_BYTES..]
    }
}

#[derive(Clone, Copy, Debug)]
pub enum LeafValue<'a> {
    Inline(&'a [u8]),
    Overflow { page: PageId, len: usize },
}

/// Bytes a leaf entry takes in a page (slot included).
pub fn leaf_entry_bytes(key: usize, value: &LeafBytes) -> usize {
    2 + 7
        + key
        + match value {
            LeafBytes::Inline(v) => v.len(),
            LeafBytes::Overflow { .. } => 8,
        }
}

pub fn branch_entry_bytes(key: usize) -> usize {
    2 + 10 + key
}

/// A leaf value as it will be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeafBytes {
    Inline(Vec<u8>),
    Overflow { page: PageId, len: usize },
}

/// Encodes sorted leaf entries into one page. The caller sized the page.
pub fn encode_leaf(entries: &[(&[u8], &LeafBytes)]) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_BYTES];
    let mut end = PAGE_BYTES;
    for (i, (k, v)) in entries.iter().enumerate() {
        let body = leaf_entry_bytes(k.len(), v) - 2;
        end -= body;
        p[HEADER_BYTES + 2 * i..HEADER_BYTES + 2 * i + 2]
            .copy_from_slice(&(end as u16).to_le_bytes());
        p[end..end + 2].copy_from_slice(&(k.len() as u16).to_le_bytes());
        let vlen = match v {
            LeafBytes::Inline(b) => b.len(),
            LeafBytes::Overflow { len, .. } => *len,
        };
        p[end + 2] = matches!(v, LeafBytes::Overflow { .. }) as u8;
        p[end + 3..end + 7].copy_from_slice(&(vlen as u32).to_le_bytes());
        p[end + 7..end + 7 + k.len()].copy_from_slice(k);
        let vat = end + 7 + k.len();
        match v {
            LeafBytes::Inline(b) => p[vat..vat + b.len()].copy_from_slice(b),
            LeafBytes::Overflow { page, .. } => {
                p[vat..vat + 8].copy_from_slice(&page.to_le_bytes())
            }
        }
    }
    assert!(
        end >= HEADER_BYTES + 2 * entries.len(),
        "leaf entries overflow the page"
    );
    seal(&mut p, KIND_LEAF, entries.len() as u16);
    p
}

/// Encodes sorted branch entries into one page.
pub fn encode_branch(entries: &[(&[u8], PageId)]) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_BYTES];
    let mut end = PAGE_BYTES;
    for (i, (k, child)) in entries.iter().enumerate() {
        end -= 10 + k.len();
        p[HEADER_BYTES + 2 * i..HEADER_BYTES + 2 * i + 2]
            .copy_from_slice(&(end as u16).to_le_bytes());
        p[end..end + 2].copy_from_slice(&(k.len() as u16).to_le_bytes());
        p[end + 2..end + 10].copy_from_slice(&child.to_le_bytes());
        p[end + 10..end + 10 + k.len()].copy_from_slice(k);
    }
    assert!(
        end >= HEADER_BYTES + 2 * entries.len(),
        "branch entries overflow the page"
    );
    seal(&mut p, KIND_BRANCH, entries.len() as u16);
    p
}

/// An overflow run holding `value`.
pub fn encode_overflow(value: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; run_pages(value.len()) * PAGE_BYTES];
    p[HEADER_BYTES..HEADER_BYTES + value.len()].copy_from_slice(value);
    seal(&mut p, KIND_OVERFLOW, 0);
    p
}

/// A freelist run listing `ids`.
pub fn encode_freelist(ids: &[PageId]) -> Vec<u8> {
    let mut p = vec![0u8; run_pages(8 + 8 * ids.len()) * PAGE_BYTES];
    p[HEADER_BYTES..HEADER_BYTES + 8].copy_from_slice(&(ids.len() as u64).to_le_bytes());
    for (i, id) in ids.iter().enumerate() {
        let at = HEADER_BYTES + 8 + 8 * i;
        p[at..at + 8].copy_from_slice(&id.to_le_bytes());
    }
    seal(&mut p, KIND_FREELIST, 0);
    p
}

pub fn decode_freelist(page: PageRef<'_>) -> Result<Vec<PageId>> {
    if page.kind() != KIND_FREELIST {
        return Err(corrupt(page.id, "freelist page has another kind".into()));
    }
    let body = page.payload();
    let n = u64_at(body, 0) as usize;
    let fits = n
        .checked_mul(8)
        .and_then(|b| b.checked_add(8))
        .is_some_and(|b| b <= body.len());
    if !fits {
        return Err(corrupt(page.id, "freelist longer than its run".into()));
    }
    Ok((0..n).map(|i| u64_at(body, 8 + 8 * i)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(pages: &[Vec<u8>]) -> Vec<u8> {
        let mut f = vec![0u8; 2 * PAGE_BYTES];
        for p in pages {
            f.extend_from_slice(p);
        }
        f
    }

    #[test]
    fn meta_round_trips_and_a_flipped_bit_is_refused() {
        let m = Meta {
            txid: 7,
            root: 9,
            freelist: 3,
            page_count: 12,
        };
        let mut p = m.encode();
        assert_eq!(Meta::decode(&p), Ok(m));
        p[20] ^= 1;
        assert_eq!(Meta::decode(&p), Err("meta checksum mismatch"));
        assert!(
            Meta::decode(&[0u8; PAGE_BYTES]).is_err(),
            "zeros are no meta"
        );
    }

    #[test]
    fn leaf_and_branch_entries_read_back_and_search() {
        let big = LeafBytes::Overflow {
            page: 42,
            len: 9000,
        };
        let small = LeafBytes::Inline(b"value".to_vec());
        let leaf = encode_leaf(&[(b"a", &small), (b"c", &big), (b"e", &small)]);
        let branch = encode_branch(&[(b"", 5), (b"m", 6)]);
        let f = file_with(&[leaf, branch]);
        let l = read(&f, 2, "leaf").unwrap();
        assert_eq!((l.kind(), l.count()), (KIND_LEAF, 3));
        let (k, v) = l.leaf(1).unwrap();
        assert_eq!(k, b"c");
        assert!(matches!(
            v,
            LeafValue::Overflow {
                page: 42,
                len: 9000
            }
        ));
        assert!(matches!(l.leaf(2).unwrap().1, LeafValue::Inline(b"value")));
        assert_eq!(l.search(b"c").unwrap(), (1, true));
        assert_eq!(l.search(b"d").unwrap(), (2, false));
        assert_eq!(l.search(b"z").unwrap(), (3, false));
        let b = read(&f, 3, "branch").unwrap();
        assert_eq!(b.branch(1).unwrap(), (&b"m"[..], 6));
    }

    #[test]
    fn any_flipped_byte_in_a_run_is_corruption() {
        let run = encode_overflow(&vec![7u8; 5000]);
        assert_eq!(run.len(), 2 * PAGE_BYTES);
        let f = file_with(&[run]);
        assert_eq!(read(&f, 2, "overflow").unwrap().payload()[4999], 7);
        for at in [0, 5, 12, 100, PAGE_BYTES + 1, 2 * PAGE_BYTES - 1] {
            let mut g = f.clone();
            g[2 * PAGE_BYTES + at] ^= 0x10;
            assert!(read(&g, 2, "overflow").is_err(), "flip at {at} unnoticed");
        }
        assert!(read(&f, 4, "x").is_err(), "past the end");
        assert!(read(&f, 1, "x").is_err(), "meta pages are not tree pages");
    }

    /// Fuzz smoke: random page bodies sealed with a valid checksum (so they get past it) are
    /// decoded entry by entry; every answer is a value or `Corrupted`, never a panic.
    /// `KEEL_FUZZ_ITERS` sets the cases (scripts/fuzz-smoke.sh runs many more).
    /// Found by the backend_pages fuzz target: a page id from a damaged branch, so large that
    /// its file offset overflows, panicked while naming the corruption.
    #[test]
    fn a_page_id_past_any_file_is_an_error() {
        let f = file_with(&[]);
        let err = read(&f, u64::MAX / 2, "tree").err().unwrap().to_string();
        assert!(err.contains("outside the file"), "{err}");
    }

    /// Found by the backend_pages fuzz target: branch keys longer than Keel writes made a
    /// commit pack one key per page forever.
    #[test]
    fn a_key_longer_than_keel_writes_is_corruption() {
        let long = vec![b'k'; KEY_BYTES_MAX + 1];
        let mut run = encode_branch(&[(b"a".as_slice(), 3), (long.as_slice(), 4)]);
        seal(&mut run, KIND_BRANCH, 2);
        let f = file_with(&[run]);
        let p = read(&f, 2, "tree").unwrap();
        assert!(p.branch(0).is_ok());
        let err = p.branch(1).err().unwrap().to_string();
        assert!(err.contains("a key of 513 bytes"), "{err}");
    }

    #[test]
    fn random_sealed_pages_never_panic() {
        use rand::{Rng, SeedableRng};
        let iters = crate::test_cases("KEEL_FUZZ_ITERS", 3000);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xfeed);
        for _ in 0..iters {
            let pages = rng.gen_range(1..3);
            let mut run = vec![0u8; pages * PAGE_BYTES];
            rng.fill(&mut run[HEADER_BYTES..]);
            // Small counts and offsets are the interesting ones: bias some of them.
            if rng.gen_bool(0.5) {
                for b in run[HEADER_BYTES..HEADER_BYTES + 64].iter_mut() {
                    *b %= 16;
                }
            }
            let kind = rng.gen_range(0..6u8);
            let count = if rng.gen_bool(0.5) {
                rng.gen_range(0..8)
            } else {
                rng.gen()
            };
            seal(&mut run, kind, count);
            if rng.gen_bool(0.1) {
                run[4] = rng.gen(); // a bad run length, checksummed
                let crc = {
                    run[8..12].fill(0);
                    crc32c::crc32c(&run)
                };
                run[8..12].copy_from_slice(&crc.to_le_bytes());
            }
            let f = file_with(&[run]);
            let Ok(p) = read(&f, 2, "fuzz") else { continue };
            for i in 0..p.count().min(64) {
                let _ = p.leaf(i);
                let _ = p.branch(i);
            }
            let _ = p.search(b"key");
            if p.kind() == KIND_FREELIST {
                let _ = decode_freelist(p);
            }
        }
    }

    #[test]
    fn freelist_round_trips_across_pages() {
        let ids: Vec<PageId> = (10..1000).collect();
        let f = file_with(&[encode_freelist(&ids)]);
        assert_eq!(
            decode_freelist(read(&f, 2, "freelist").unwrap()).unwrap(),
            ids
        );
    }
}
