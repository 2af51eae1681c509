//! Measures WAL append latency (one record = one io_uring write + fdatasync) on a directory:
//! `cargo run --release -p keel-storage --example wal_bench -- DIR [COUNT] [PAYLOAD_BYTES]`.

use std::time::Instant;

use keel_storage::wal::{Wal, WalOptions};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("DIR"));
    let count: usize = args.next().map_or(2000, |s| s.parse().unwrap());
    let payload = vec![7u8; args.next().map_or(300, |s| s.parse().unwrap())];
    let _ = std::fs::remove_dir_all(&dir);
    let (mut wal, _) = Wal::open(&dir, WalOptions::default()).unwrap();
    let gap_us: u64 = std::env::var("GAP_US")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut us: Vec<u64> = Vec::with_capacity(count);
    for _ in 0..count {
        if gap_us > 0 {
            std::thread::sleep(std::time::Duration::from_micros(gap_us));
        }
        let t = Instant::now();
        wal.append(&[(2, &payload)]).unwrap();
        us.push(t.elapsed().as_micros() as u64);
    }
    us.sort_unstable();
    let q = |f: f64| us[((us.len() as f64 * f) as usize).min(us.len() - 1)];
    println!(
        "appends {count} x {} B: p50 {} us  p90 {} us  p99 {} us  max {} us",
        payload.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        us[us.len() - 1]
    );
}
