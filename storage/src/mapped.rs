//! A file's bytes through a read-only map: reading a large file into the heap would leave
//! that much in the allocator afterwards; a map's pages go with the map.

use std::fs::File;
use std::path::Path;

/// A file mapped read-only (an empty file, which cannot be mapped, reads as no bytes).
pub struct Mapped(Option<memmap2::Mmap>);

impl Mapped {
    /// Maps `path`. The caller makes sure nothing writes the file while it reads the map
    /// (a WAL not open yet, a snapshot file, a stopped member's files).
    pub fn open(path: &Path) -> std::io::Result<Mapped> {
        let file = File::open(path)?;
        if file.metadata()?.len() == 0 {
            return Ok(Mapped(None));
        }
        // SAFETY: read-only map of a file nothing writes while it is read (see above); a
        // file changed underneath reads as damage, which every reader of these bytes checks.
        let map = unsafe { memmap2::Mmap::map(&file) }?;
        Ok(Mapped(Some(map)))
    }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}
