//! Fail-point tests: crashes and panics injected at every site the storage engine names (WAL
//! save, backend commit and meta flip, WAL release, compaction, defrag), each followed by a
//! restart that must find every acknowledged write. They form their own test binary and run
//! one at a time (`serial`), apart from the other end-to-end tests.
#![cfg(feature = "failpoints")]

#[allow(dead_code)]
#[path = "../it/harness.rs"]
mod harness;

mod fatal;

/// Held by each test for its whole run: the fail-point tests never overlap.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}
