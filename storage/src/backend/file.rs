//! The backend's file I/O, behind a trait so tests can crash it: `MmapFile` is the real one
//! (pwrite + fdatasync to write, a shared read-only memory map to read, so written pages sit
//! in the page cache and count in RSS only while they are read); `CrashFile` keeps written
//! bytes and durable bytes apart and can produce what a power cut at any moment would leave.

use std::fs::{File, OpenOptions};
use std::ops::Deref;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{IoContext, Result};

/// A read-only view of the whole file as of when it was taken (later writes to pages the view
/// covers may or may not show: callers read only pages no writer touches while they look).
pub trait PageFile: Send + Sync + 'static {
    type View: Deref<Target = [u8]> + Send + Sync + 'static;
    /// Whether a view shows writes made after it was taken (a shared map does; a copy does
    /// not, so a new view is taken at every commit).
    const LIVE_VIEW: bool;

    fn len_bytes(&self) -> Result<u64>;
    fn set_len(&self, len: u64) -> Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes every write so far durable (fdatasync).
    fn sync(&self) -> Result<()>;
    /// Starts writing dirty pages back without waiting for them (a copy that is synced once
    /// at its end, so its writes leave the page cache steadily instead of in one burst).
    fn start_writeback(&self) {}
    /// Makes the file's directory entry durable (after creating it).
    fn sync_dir(&self) -> Result<()> {
        Ok(())
    }
    fn view(&self) -> Result<Self::View>;

    /// Drops `view`'s resident pages from this process (they stay in the page cache and come
    /// back on the next read), so pages read once do not count in RSS for ever.
    fn release(_view: &Self::View) {}
}

/// The real file.
pub struct MmapFile {
    file: File,
    path: PathBuf,
}

impl MmapFile {
    pub fn open(path: &Path) -> Result<MmapFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .io_ctx("open backend file", path)?;
        Ok(MmapFile {
            file,
            path: path.to_path_buf(),
        })
    }
}

/// A map of the file; an empty file has an empty view.
pub enum MapView {
    Empty,
    Map(memmap2::Mmap),
}

impl Deref for MapView {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            MapView::Empty => &[],
            MapView::Map(m) => m,
        }
    }
}

impl PageFile for MmapFile {
    type View = MapView;
    const LIVE_VIEW: bool = true;

    fn len_bytes(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .io_ctx("stat backend file", &self.path)?
            .len())
    }

    /// Grows the file with allocated blocks (fallocate), so page writes and syncs change no
    /// block map (measured: pwrite into a sparse ext4 file spent most of its time allocating).
    /// Falls back to a sparse extension where fallocate is not supported.
    fn set_len(&self, len: u64) -> Result<()> {
        let cur = self.len_bytes()?;
        if len > cur {
            // SAFETY: fallocate on an fd we own; mode 0 allocates and extends the size.
            let rc = unsafe {
                libc::fallocate(
                    std::os::unix::io::AsRawFd::as_raw_fd(&self.file),
                    0,
                    cur as libc::off_t,
                    (len - cur) as libc::off_t,
                )
            };
            if rc == 0 {
                return Ok(());
            }
        }
        self.file
            .set_len(len)
            .io_ctx("grow backend file", &self.path)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .io_ctx("write backend page", &self.path)
    }

    fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .io_ctx("fdatasync backend file", &self.path)
    }

    /// Only a hint: its result is ignored (the final fdatasync makes the file durable
    /// whatever happens here).
    fn start_writeback(&self) {
        // SAFETY: sync_file_range on an fd we own; offset 0, nbytes 0 = the whole file.
        unsafe {
            libc::sync_file_range(
                std::os::unix::io::AsRawFd::as_raw_fd(&self.file),
                0,
                0,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    fn sync_dir(&self) -> Result<()> {
        match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => crate::wal::sync_dir(dir),
            _ => Ok(()),
        }
    }

    fn view(&self) -> Result<MapView> {
        if self.len_bytes()? == 0 {
            return Ok(MapView::Empty);
        }
        // SAFETY: the map is read-only and the file is Keel's own (held under the data-dir
        // lock); pages a view's readers use are never rewritten while they use them.
        let map = unsafe { memmap2::MmapOptions::new().map(&self.file) }
            .io_ctx("mmap backend file", &self.path)?;
        Ok(MapView::Map(map))
    }

    fn release(view: &MapView) {
        if let MapView::Map(m) = view {
            // SAFETY: MADV_DONTNEED on a read-only shared file mapping only drops this
            // process's page-table entries; reads fault the same file contents back in.
            let _ = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }
}

/// One write not yet made durable by a sync.
#[derive(Clone, Debug)]
struct PendingWrite {
    offset: u64,
    bytes: Vec<u8>,
}

#[derive(Default)]
struct CrashState {
    /// What reads see: every write applied.
    written: Vec<u8>,
    /// What survives a crash for sure: the content as of the last sync.
    durable: Vec<u8>,
    /// Writes since the last sync, in order (each may or may not survive a crash).
    pending: Vec<PendingWrite>,
    /// Operations (writes, syncs, resizes) done so far.
    ops: u64,
    /// Fail every operation from this one on, as if the process died there.
    die_at: Option<u64>,
}

/// A file in memory that can crash: `crash_image` gives what a power cut could leave.
#[derive(Clone, Default)]
pub struct CrashFile {
    state: Arc<Mutex<CrashState>>,
}

impl CrashFile {
    pub fn new() -> CrashFile {
        CrashFile::default()
    }

    /// A file whose durable content is `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> CrashFile {
        let f = CrashFile::new();
        {
            let mut s = f.state.lock().unwrap();
            s.written = bytes.clone();
            s.durable = bytes;
        }
        f
    }

    /// Makes operation number `op` (counting from 0) and every later one fail.
    pub fn die_at(&self, op: u64) {
        self.state.lock().unwrap().die_at = Some(op);
    }

    pub fn ops(&self) -> u64 {
        self.state.lock().unwrap().ops
    }

    /// What a crash now could leave: the durable bytes plus each unsynced write either lost,
    /// applied whole, or applied in part (its first 512-byte sectors), chosen by `pick`.
    pub fn crash_image(&self, mut pick: impl FnMut(usize) -> usize) -> Vec<u8> {
        let s = self.state.lock().unwrap();
        let mut image = s.durable.clone();
        image.resize(s.written.len().max(s.durable.len()), 0);
        for w in &s.pending {
            let sectors = w.bytes.len().div_ceil(512);
            // 0: lost; sectors: whole; between: torn after that many sectors.
            let keep = pick(sectors + 1).min(sectors);
            let n = (keep * 512).min(w.bytes.len());
            let at = w.offset as usize;
            if image.len() < at + n {
                image.resize(at + n, 0);
            }
            image[at..at + n].copy_from_slice(&w.bytes[..n]);
        }
        image
    }

    fn op(&self) -> Result<std::sync::MutexGuard<'_, CrashState>> {
        let mut s = self.state.lock().unwrap();
        let n = s.ops;
        s.ops += 1;
        if s.die_at.is_some_and(|d| n >= d) {
            return Err(crate::error::Error::Io {
                op: "crash file operation",
                path: PathBuf::from("crash-file"),
                source: std::io::Error::other("injected crash"),
            });
        }
        Ok(s)
    }
}

impl PageFile for CrashFile {
    type View = Arc<[u8]>;
    const LIVE_VIEW: bool = false;

    fn len_bytes(&self) -> Result<u64> {
        Ok(self.state.lock().unwrap().written.len() as u64)
    }

    fn set_len(&self, len: u64) -> Result<()> {
        let mut s = self.op()?;
        s.written.resize(len as usize, 0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut s = self.op()?;
        let end = offset as usize + buf.len();
        if s.written.len() < end {
            s.written.resize(end, 0);
        }
        s.written[offset as usize..end].copy_from_slice(buf);
        s.pending.push(PendingWrite {
            offset,
            bytes: buf.to_vec(),
        });
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let mut s = self.op()?;
        s.durable = s.written.clone();
        s.pending.clear();
        Ok(())
    }

    fn view(&self) -> Result<Arc<[u8]>> {
        Ok(Arc::from(self.state.lock().unwrap().written.as_slice()))
    }
}
