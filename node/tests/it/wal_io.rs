//! Evidence that the WAL is written through io_uring with O_DIRECT: the running keel holds an
//! io_uring instance and its open WAL segment's file flags include O_DIRECT.

use crate::harness::Keel;

#[test]
fn wal_segment_is_open_o_direct_beside_an_io_uring() {
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start(dir.path(), &[]);
    let fds = format!("/proc/{}/fd", k.pid());
    let mut uring = false;
    let mut direct_wal = false;
    for e in std::fs::read_dir(&fds).unwrap() {
        let e = e.unwrap();
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        if t.contains("io_uring") {
            uring = true;
        }
        if t.ends_with(".wal") {
            let info = std::fs::read_to_string(format!(
                "/proc/{}/fdinfo/{}",
                k.pid(),
                e.file_name().to_string_lossy()
            ))
            .unwrap();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
                .unwrap();
            if flags & libc::O_DIRECT as u32 != 0 {
                direct_wal = true;
            }
        }
    }
    assert!(uring, "no io_uring instance among keel's fds");
    assert!(direct_wal, "no WAL segment open with O_DIRECT");
}
