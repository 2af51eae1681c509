//! The backend's page decoder and tree walker on arbitrary pages. Pages carry checksums, so
//! raw bytes would never get past them: the input is cut into pages that are then sealed
//! (valid checksums over arbitrary contents), behind valid meta pages whose root and
//! freelist point among them. Opening, reading every entry, a lookup and a write transaction
//! must end in a result or an error naming corruption, never a panic or a hang.
//!
//! Input: n x (kind u8 | count u16 LE | run pages u8 | up to 508 body bytes), 512 bytes each;
//! the first two input bytes pick the meta's root and freelist pages.
#![no_main]

use keel_storage::backend::file::CrashFile;
use keel_storage::backend::page::{seal, Meta, HEADER_BYTES, PAGE_BYTES};
use keel_storage::backend::{Backend, Options};

const CHUNK: usize = 512;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (pick, rest) = data.split_at(2);
    let mut pages: Vec<u8> = Vec::new();
    for chunk in rest.chunks(CHUNK).take(16) {
        let kind = chunk[0] % 6;
        let count = u16::from_le_bytes([
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ]);
        let run = 1 + chunk.get(3).copied().unwrap_or(0) as usize % 2;
        let mut buf = vec![0u8; run * PAGE_BYTES];
        let body = chunk.get(4..).unwrap_or(&[]);
        buf[HEADER_BYTES..HEADER_BYTES + body.len()].copy_from_slice(body);
        seal(&mut buf, kind, count);
        pages.extend_from_slice(&buf);
    }
    let n = (pages.len() / PAGE_BYTES) as u64;
    if n == 0 {
        return;
    }
    let meta = Meta {
        txid: 5,
        root: 2 + pick[0] as u64 % n,
        freelist: if pick[1] % 2 == 0 { 0 } else { 2 + pick[1] as u64 % n },
        page_count: 2 + n,
    };
    let mut file = meta.encode().to_vec();
    file.extend_from_slice(&Meta { txid: 4, ..meta }.encode());
    file.extend_from_slice(&pages);
    // A small growth step: the default 16 MiB would make every commit slow here.
    let opts = Options {
        grow_bytes_min: 64 << 10,
        ..Options::default()
    };
    let Ok(mut db) = Backend::open_with(CrashFile::from_bytes(file), opts) else {
        return;
    };
    let snap = db.snapshot();
    let mut seen = 0usize;
    let _ = snap.range(b"", None, |_, _| {
        seen += 1;
        seen < 100_000
    });
    let _ = snap.get(b"r\0\0\0\0\0\0\0\x02");
    drop(snap);
    if let Ok(mut t) = db.write() {
        let _ = t.put(b"key", b"value");
        let _ = t.delete(b"r");
        let _ = t.commit();
    }
});
