//! `keel-bench disk`: what the WAL's disk can do, measured the way Keel writes, then the
//! target sheet of HARDWARE.md with a verdict per line.
//!
//! Every write is O_DIRECT through io_uring and durable before the next starts, in two sync
//! modes: `dsync` (one write flagged RWF_DSYNC, what Keel's WAL does) and `fdatasync` (a
//! write linked to an fdatasync, the classic WAL pattern), each on a preallocated (zero-filled
//! and synced) file and on a file that grows with every write (what a WAL without
//! preallocation pays).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use hdrhistogram::Histogram;
use io_uring::{opcode, squeue, types, IoUring};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    Dsync,
    Fdatasync,
}

#[derive(Debug, Clone)]
pub struct Probe {
    pub block_bytes: usize,
    pub preallocated: bool,
    pub mode: SyncMode,
    pub hist: Histogram<u64>,
    pub seconds: f64,
}

impl Probe {
    pub fn name(&self) -> String {
        format!(
            "{} KiB {} {}",
            self.block_bytes / 1024,
            if self.preallocated {
                "prealloc"
            } else {
                "append"
            },
            match self.mode {
                SyncMode::Dsync => "dsync",
                SyncMode::Fdatasync => "fdatasync",
            }
        )
    }

    pub fn iops(&self) -> f64 {
        self.hist.len() as f64 / self.seconds
    }

    pub fn mb_per_sec(&self) -> f64 {
        self.iops() * self.block_bytes as f64 / 1e6
    }
}

/// A 4096-aligned buffer for O_DIRECT.
struct Aligned(*mut u8, std::alloc::Layout);

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!p.is_null());
        Aligned(p, layout)
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.0, self.1) }
    }
}

/// Runs one probe: `count` durable writes of `block_bytes` at consecutive offsets.
pub fn probe(
    dir: &Path,
    block_bytes: usize,
    preallocated: bool,
    mode: SyncMode,
    count: usize,
) -> anyhow::Result<Probe> {
    let path: PathBuf = dir.join(format!("keel-disk-probe-{}.tmp", std::process::id()));
    let _cleanup = Cleanup(path.clone());
    {
        let mut f = std::fs::File::create(&path).with_context(|| format!("{}", path.display()))?;
        if preallocated {
            let zeros = vec![0u8; 1 << 20];
            let mut left = block_bytes * count;
            while left > 0 {
                let n = left.min(zeros.len());
                f.write_all(&zeros[..n])?;
                left -= n;
            }
        }
        f.sync_all()?;
    }
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .with_context(|| format!("open {} O_DIRECT", path.display()))?;
    let fd = types::Fd(file.as_raw_fd());
    let buf = Aligned::new(block_bytes);
    // SAFETY: buf is valid for block_bytes.
    unsafe { std::ptr::write_bytes(buf.0, 0x5a, block_bytes) };
    let mut ring = IoUring::new(8)?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let started = Instant::now();
    for i in 0..count {
        let offset = (i * block_bytes) as u64;
        let t = Instant::now();
        let expected = match mode {
            SyncMode::Dsync => {
                let w = opcode::Write::new(fd, buf.0, block_bytes as u32)
                    .offset(offset)
                    .rw_flags(libc::RWF_DSYNC)
                    .build();
                // SAFETY: buf outlives the wait below.
                unsafe { ring.submission().push(&w)? };
                1
            }
            SyncMode::Fdatasync => {
                let w = opcode::Write::new(fd, buf.0, block_bytes as u32)
                    .offset(offset)
                    .build()
                    .flags(squeue::Flags::IO_LINK);
                let s = opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build();
                // SAFETY: buf outlives the wait below.
                unsafe {
                    ring.submission().push(&w)?;
                    ring.submission().push(&s)?;
                }
                2
            }
        };
        ring.submit_and_wait(expected)?;
        for cqe in ring.completion() {
            anyhow::ensure!(cqe.result() >= 0, "write failed: errno {}", -cqe.result());
        }
        hist.saturating_record(t.elapsed().as_micros().max(1) as u64);
    }
    Ok(Probe {
        block_bytes,
        preallocated,
        mode,
        hist,
        seconds: started.elapsed().as_secs_f64(),
    })
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One line of the target sheet.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verdict {
    pub item: String,
    pub target: String,
    pub measured: String,
    pub pass: bool,
}

pub fn machine_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

pub fn machine_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// HARDWARE.md's target sheet against what was measured. `wal` is the 4 KiB preallocated
/// dsync probe (Keel's WAL pattern); `commit` the 64 KiB fdatasync probe (a backend commit's
/// pattern: a larger write, then a sync).
pub fn verdicts(wal: &Probe, commit: &Probe) -> Vec<Verdict> {
    let cores = machine_cores();
    let mem_gib = machine_memory_bytes() as f64 / (1u64 << 30) as f64;
    let wal_p99_ms = wal.hist.value_at_quantile(0.99) as f64 / 1000.0;
    let commit_p99_ms = commit.hist.value_at_quantile(0.99) as f64 / 1000.0;
    vec![
        Verdict {
            item: "CPU cores".into(),
            target: ">= 4".into(),
            measured: cores.to_string(),
            pass: cores >= 4,
        },
        Verdict {
            item: "memory".into(),
            target: ">= 8 GiB".into(),
            measured: format!("{mem_gib:.1} GiB"),
            pass: mem_gib >= 7.5,
        },
        Verdict {
            item: "durable 4 KiB write IOPS".into(),
            target: ">= 5000".into(),
            measured: format!("{:.0}", wal.iops()),
            pass: wal.iops() >= 5000.0,
        },
        Verdict {
            item: "wal fsync p99 (etcd guidance)".into(),
            target: "< 10 ms".into(),
            measured: format!("{wal_p99_ms:.2} ms"),
            pass: wal_p99_ms < 10.0,
        },
        Verdict {
            item: "backend commit p99 (etcd guidance)".into(),
            target: "< 25 ms".into(),
            measured: format!("{commit_p99_ms:.2} ms"),
            pass: commit_p99_ms < 25.0,
        },
    ]
}

/// Runs every probe on `dir` and prints the table, the sheet and the derived bounds.
pub fn run(dir: &Path, count: usize, json: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut probes = Vec::new();
    for block in [4096, 65536] {
        for preallocated in [true, false] {
            for mode in [SyncMode::Dsync, SyncMode::Fdatasync] {
                probes.push(probe(dir, block, preallocated, mode, count)?);
            }
        }
    }
    let find = |b: usize, pre: bool, m: SyncMode| {
        probes
            .iter()
            .find(|p| p.block_bytes == b && p.preallocated == pre && p.mode == m)
            .expect("probe ran")
    };
    let wal = find(4096, true, SyncMode::Dsync);
    let commit = find(65536, true, SyncMode::Fdatasync);
    let sheet = verdicts(wal, commit);
    let wal_p50_us = wal.hist.value_at_quantile(0.5);
    let commits_per_sec = 1e6 / wal.hist.mean();
    if json {
        let rows: Vec<serde_json::Value> = probes
            .iter()
            .map(|p| {
                serde_json::json!({
                    "probe": p.name(), "writes": p.hist.len(),
                    "p50_us": p.hist.value_at_quantile(0.5),
                    "p99_us": p.hist.value_at_quantile(0.99),
                    "max_us": p.hist.max(), "iops": p.iops(), "mb_per_sec": p.mb_per_sec(),
                })
            })
            .collect();
        let v = serde_json::json!({
            "dir": dir.display().to_string(), "probes": rows, "targets": sheet,
            "sequential_durable_commits_per_sec": commits_per_sec,
            "wal_write_p50_us": wal_p50_us,
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "disk probe on {} ({count} durable writes per line)\n",
        dir.display()
    );
    println!("| probe | p50 us | p99 us | max us | IOPS | MB/s |");
    println!("|---|---|---|---|---|---|");
    for p in &probes {
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.1} |",
            p.name(),
            p.hist.value_at_quantile(0.5),
            p.hist.value_at_quantile(0.99),
            p.hist.max(),
            p.iops(),
            p.mb_per_sec()
        );
    }
    println!("\n| target | wants | measured | verdict |");
    println!("|---|---|---|---|");
    for v in &sheet {
        let verdict = if v.pass { "PASS" } else { "FAIL" };
        println!("| {} | {} | {} | {verdict} |", v.item, v.target, v.measured);
    }
    println!(
        "\nmost sequential durable commits/s (one WAL write each): {commits_per_sec:.0}\n\
         floor for a single-client put: {wal_p50_us} us WAL write + one client round trip \
         (each commit batches every write waiting, so many clients share one WAL write)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_counts_every_write_and_verdicts_follow_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = probe(dir.path(), 4096, true, SyncMode::Dsync, 20).unwrap();
        assert_eq!(p.hist.len(), 20);
        assert!(p.iops() > 0.0 && p.mb_per_sec() > 0.0);
        let q = probe(dir.path(), 65536, false, SyncMode::Fdatasync, 5).unwrap();
        assert_eq!(q.hist.len(), 5);
        let sheet = verdicts(&p, &q);
        assert_eq!(sheet.len(), 5);
        let iops_line = &sheet[2];
        assert_eq!(iops_line.pass, p.iops() >= 5000.0);
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "probe file removed"
        );
    }
}
