//! A member's whole state in transit: what a leader sends a member too far behind its log
//! (raft's snapshot), and what that member writes down before it switches to it.
//!
//! The state is the backend's content as of one durable commit: every (key, value) of the
//! tree in key order, the meta entries included, so the consistent index and term say which
//! raft entry the state ends with and the membership travels with it. The sender reads a
//! pinned snapshot of the tree (its pages are not reused while it is held), so writes go on
//! meanwhile; the receiver writes a new backend file in bounded transactions. Nothing here
//! holds more than one chunk in memory.
//!
//! ```text
//! chunk: n x (u32 key_len | key | u32 value_len | value)          (all LE)
//! end:   b"KEELEND" | u64 pairs | u32 crc32c over every pair's bytes as sent
//! ```

use std::path::Path;
use std::sync::Arc;

use crate::backend::file::MmapFile;
use crate::backend::{Backend, Snapshot};
use crate::error::{Error, Result};
use crate::store::{META_CONSISTENT_INDEX, META_MEMBERS, META_TERM};

/// A chunk is cut once it holds this much.
pub const CHUNK_BYTES: usize = 1 << 20;
const END_MAGIC: &[u8; 7] = b"KEELEND";
/// The receiver commits its file every this many bytes.
const TXN_BYTES: usize = 16 << 20;

/// A pinned state to send.
pub struct Outgoing {
    snap: Arc<Snapshot<MmapFile>>,
}

impl Outgoing {
    pub fn new(snap: Arc<Snapshot<MmapFile>>) -> Outgoing {
        Outgoing { snap }
    }

    fn meta_u64(&self, key: &[u8]) -> Result<u64> {
        Ok(self
            .snap
            .get(key)?
            .and_then(|v| v.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0))
    }

    /// (index, term) of the last raft entry this state holds.
    pub fn point(&self) -> Result<(u64, u64)> {
        Ok((
            self.meta_u64(META_CONSISTENT_INDEX)?,
            self.meta_u64(META_TERM)?,
        ))
    }

    /// The membership as the node encoded it, if any.
    pub fn members(&self) -> Result<Option<Vec<u8>>> {
        Ok(self.snap.get(META_MEMBERS)?.map(|v| v.to_vec()))
    }

    /// Calls `chunk` with each chunk, then with the end frame; stops early (Ok(false)) when
    /// `chunk` returns false.
    pub fn send(&self, mut chunk: impl FnMut(Vec<u8>) -> bool) -> Result<bool> {
        let mut buf = Vec::with_capacity(CHUNK_BYTES + 64 * 1024);
        let (mut pairs, mut crc, mut stopped) = (0u64, 0u32, false);
        self.snap.range(b"", None, |k, v| {
            let start = buf.len();
            buf.extend_from_slice(&(k.len() as u32).to_le_bytes());
            buf.extend_from_slice(k);
            buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
            buf.extend_from_slice(v);
            crc = crc32c::crc32c_append(crc, &buf[start..]);
            pairs += 1;
            if buf.len() >= CHUNK_BYTES {
                let full = std::mem::replace(&mut buf, Vec::with_capacity(CHUNK_BYTES + 65536));
                if !chunk(full) {
                    stopped = true;
                    return false;
                }
            }
            true
        })?;
        if stopped {
            return Ok(false);
        }
        if !buf.is_empty() && !chunk(buf) {
            return Ok(false);
        }
        Ok(chunk(end_frame(pairs, crc)))
    }
}

fn end_frame(pairs: u64, crc: u32) -> Vec<u8> {
    let mut end = Vec::with_capacity(19);
    end.extend_from_slice(END_MAGIC);
    end.extend_from_slice(&pairs.to_le_bytes());
    end.extend_from_slice(&crc.to_le_bytes());
    end
}

/// A new backend file filled in bounded transactions (commits every `TXN_BYTES`).
pub(crate) struct Filler {
    pub(crate) db: Backend<MmapFile>,
    txn: Vec<(Vec<u8>, Vec<u8>)>,
    bytes: usize,
}

impl Filler {
    /// Starts a new file at `path`.
    pub(crate) fn create(path: &Path) -> Result<Filler> {
        Ok(Filler {
            db: Backend::open(MmapFile::open(path)?)?,
            txn: Vec::new(),
            bytes: 0,
        })
    }

    pub(crate) fn put(&mut self, k: Vec<u8>, v: Vec<u8>) -> Result<()> {
        self.bytes += k.len() + v.len();
        self.txn.push((k, v));
        if self.bytes >= TXN_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Commits what is waiting (synced).
    pub(crate) fn flush(&mut self) -> Result<()> {
        if self.txn.is_empty() {
            return Ok(());
        }
        let mut t = self.db.write()?;
        for (k, v) in self.txn.drain(..) {
            t.put_owned(k, v)?;
        }
        t.commit()?;
        self.bytes = 0;
        self.db.release_map();
        Ok(())
    }
}

/// A state being received into a new backend file.
pub struct Incoming {
    fill: Filler,
    pairs: u64,
    crc: u32,
    last_key: Option<Vec<u8>>,
    done: bool,
}

fn bad(why: impl Into<String>) -> Error {
    Error::Invalid(format!("received state: {}", why.into()))
}

impl Incoming {
    /// Starts a new file at `path` (replacing any there).
    pub fn create(path: &Path) -> Result<Incoming> {
        let _ = std::fs::remove_file(path);
        Ok(Incoming {
            fill: Filler::create(path)?,
            pairs: 0,
            crc: 0,
            last_key: None,
            done: false,
        })
    }

    /// Takes one frame: a chunk, or the end frame (after which nothing more is taken).
    pub fn frame(&mut self, f: &[u8]) -> Result<()> {
        if self.done {
            return Err(bad("data after the end"));
        }
        if f.len() == 19 && &f[..7] == END_MAGIC {
            let pairs = u64::from_le_bytes(f[7..15].try_into().expect("8 bytes"));
            let crc = u32::from_le_bytes(f[15..19].try_into().expect("4 bytes"));
            if pairs != self.pairs || crc != self.crc {
                return Err(bad(format!(
                    "{} pairs with crc {:08x} received, the sender sent {pairs} with {crc:08x}",
                    self.pairs, self.crc
                )));
            }
            self.done = true;
            return Ok(());
        }
        let mut at = 0;
        let take = |at: &mut usize| -> Result<&[u8]> {
            let len = f.get(*at..*at + 4).ok_or_else(|| bad("a truncated pair"))?;
            let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
            let b = f
                .get(*at + 4..*at + 4 + len)
                .ok_or_else(|| bad("a truncated pair"))?;
            *at += 4 + len;
            Ok(b)
        };
        while at < f.len() {
            let start = at;
            let k = take(&mut at)?.to_vec();
            let v = take(&mut at)?.to_vec();
            self.crc = crc32c::crc32c_append(self.crc, &f[start..at]);
            if self.last_key.as_ref().is_some_and(|l| *l >= k) {
                return Err(bad("keys out of order"));
            }
            self.last_key = Some(k.clone());
            self.pairs += 1;
            self.fill.put(k, v)?;
        }
        Ok(())
    }

    /// Writes the rest down (synced); the (index, term) the state ends with. Fails if the
    /// end frame never came.
    pub fn finish(mut self) -> Result<(u64, u64)> {
        if !self.done {
            return Err(bad("the stream ended before its end frame"));
        }
        self.fill.flush()?;
        let snap = self.fill.db.snapshot();
        let get = |key: &[u8]| -> Result<u64> {
            snap.get(key)?
                .and_then(|v| v.try_into().ok())
                .map(u64::from_le_bytes)
                .ok_or_else(|| bad(format!("no {}", String::from_utf8_lossy(key))))
        };
        Ok((get(META_CONSISTENT_INDEX)?, get(META_TERM)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(dir: &Path, n: usize) -> Backend<MmapFile> {
        let mut db = Backend::open(MmapFile::open(&dir.join("src.db")).unwrap()).unwrap();
        let mut t = db.write().unwrap();
        for i in 0..n {
            t.put(format!("k{i:06}").as_bytes(), &vec![i as u8; i % 3000])
                .unwrap();
        }
        t.put(META_CONSISTENT_INDEX, &4242u64.to_le_bytes())
            .unwrap();
        t.put(META_TERM, &7u64.to_le_bytes()).unwrap();
        t.commit().unwrap();
        db
    }

    #[test]
    fn a_state_arrives_whole_and_equal() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path(), 5000);
        let out = Outgoing::new(src.snapshot());
        assert_eq!(out.point().unwrap(), (4242, 7));
        let mut frames = Vec::new();
        assert!(out
            .send(|c| {
                frames.push(c);
                true
            })
            .unwrap());
        assert!(frames.len() > 3, "cut into chunks");
        let path = dir.path().join("dst.db");
        let mut inc = Incoming::create(&path).unwrap();
        for f in &frames {
            inc.frame(f).unwrap();
        }
        assert_eq!(inc.finish().unwrap(), (4242, 7));
        let dst = Backend::open(MmapFile::open(&path).unwrap()).unwrap();
        let (a, b) = (src.snapshot(), dst.snapshot());
        let mut left = Vec::new();
        a.range(b"", None, |k, v| {
            left.push((k.to_vec(), v.to_vec()));
            true
        })
        .unwrap();
        let mut right = Vec::new();
        b.range(b"", None, |k, v| {
            right.push((k.to_vec(), v.to_vec()));
            true
        })
        .unwrap();
        assert_eq!(left.len(), 5002);
        assert!(left == right, "the copy differs");
    }

    #[test]
    fn a_damaged_or_cut_stream_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path(), 2000);
        let mut frames = Vec::new();
        Outgoing::new(src.snapshot())
            .send(|c| {
                frames.push(c);
                true
            })
            .unwrap();
        let path = dir.path().join("dst.db");
        // The end frame never comes.
        let mut inc = Incoming::create(&path).unwrap();
        for f in &frames[..frames.len() - 1] {
            inc.frame(f).unwrap();
        }
        assert!(inc.finish().is_err());
        // A chunk lost on the way.
        let mut inc = Incoming::create(&path).unwrap();
        let r: Result<()> = frames
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 1)
            .try_for_each(|(_, f)| inc.frame(f));
        assert!(r.is_err(), "the end frame's count catches a lost chunk");
        assert!(inc.finish().is_err());
        // A flipped byte inside a value: the end frame's CRC catches it.
        let mut inc = Incoming::create(&path).unwrap();
        let mut bad = frames.clone();
        let mid = bad[0].len() / 2;
        bad[0][mid] ^= 1;
        let r: Result<()> = bad.iter().try_for_each(|f| inc.frame(f));
        assert!(r.is_err() || inc.finish().is_err());
        // A length cut short.
        let mut inc = Incoming::create(&path).unwrap();
        assert!(inc.frame(&frames[0][..frames[0].len() - 3]).is_err());
    }
}
