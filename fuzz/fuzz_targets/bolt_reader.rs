//! The bbolt reader on arbitrary bytes: opening, listing buckets and walking every entry (what
//! `snapshot status` and `snapshot restore` do to a file they are given) must end in a result
//! or an error, never a panic, a hang or an out-of-bounds read.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(file) = keel_storage::bolt::BoltFile::open(data) {
        let _ = keel_storage::bolt::status(&file);
    }
});
