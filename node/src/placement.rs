//! Which CPU each core of Keel runs on.
//!
//! The raft core waits on every WAL write; its completion arrives as the disk's interrupt. If
//! that interrupt is taken on another CPU, every write pays an extra cross-CPU wake. So the
//! raft core goes on the CPU that takes most of the WAL device's interrupts (measured on the
//! 2-core VM here: put 1x1 p50 ~280 us instead of ~300 us, 100x1000 +15% req/s), and the net
//! cores on the others. Where the device or its interrupts cannot be found, CPU 0.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The CPU serving most interrupts of the block device that holds `dir`, if known.
pub fn disk_irq_cpu(dir: &Path) -> Option<usize> {
    let name = block_device_name(dir)?;
    let text = std::fs::read_to_string("/proc/interrupts").ok()?;
    busiest_cpu(&text, &name)
}

/// The kernel's name of the device behind `dir`'s block device (e.g. `virtio1`, `nvme0`).
fn block_device_name(dir: &Path) -> Option<String> {
    let dev = std::fs::metadata(dir).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let mut sys: PathBuf = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    if sys.join("partition").exists() {
        sys = sys.parent()?.to_path_buf();
    }
    // `device` points at the controller: virtio1 for vda, nvme0 for nvme0n1.
    let device = std::fs::canonicalize(sys.join("device")).ok()?;
    Some(device.file_name()?.to_string_lossy().into_owned())
}

/// Sums, per CPU, the `/proc/interrupts` lines whose action names the device's queues.
fn busiest_cpu(interrupts: &str, device: &str) -> Option<usize> {
    let mut lines = interrupts.lines();
    let cpus = lines.next()?.split_whitespace().count();
    let mut per_cpu = vec![0u64; cpus];
    for line in lines {
        let action = line.split_whitespace().last().unwrap_or("");
        let queue = action
            .strip_prefix(device)
            .is_some_and(|rest| rest.starts_with("-req") || rest.starts_with('q'));
        if !queue {
            continue;
        }
        let counts = line.split_whitespace().skip(1).take(cpus);
        for (cpu, c) in counts.enumerate() {
            per_cpu[cpu] += c.parse::<u64>().unwrap_or(0);
        }
    }
    let (cpu, n) = per_cpu.iter().enumerate().max_by_key(|(_, n)| **n)?;
    (*n > 0).then_some(cpu)
}

/// CPUs for the raft core and each net core: raft on `raft_cpu` (if it is among the CPUs we
/// may use), net cores round-robin over the others (or over all, if there are no others).
pub fn plan(cores: usize, raft_cpu: Option<usize>) -> (Option<usize>, Vec<Option<usize>>) {
    let all: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    if all.is_empty() {
        return (None, vec![None; cores.saturating_sub(1).max(1)]);
    }
    let usable: Vec<usize> = all.iter().copied().take(cores.max(1)).collect();
    let raft = raft_cpu.filter(|c| usable.contains(c)).unwrap_or(usable[0]);
    let others: Vec<usize> = usable.iter().copied().filter(|c| *c != raft).collect();
    let pool = if others.is_empty() {
        vec![raft]
    } else {
        others
    };
    let net_cores = cores.saturating_sub(1).max(1);
    let net = (0..net_cores).map(|i| Some(pool[i % pool.len()])).collect();
    (Some(raft), net)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "           CPU0       CPU1
  28:          0          0 PCI-MSIX-0000:00:01.0   0-edge      virtio0-config
  36:         12     797776 PCI-MSIX-0000:00:02.0   1-edge      virtio1-req.0
  37:          0          0 PCI-MSIX-0000:00:03.0   0-edge      virtio2-config
  40:        900          0 PCI-MSIX-0000:00:04.0   1-edge      virtio10-req.0
";

    #[test]
    fn picks_the_cpu_taking_the_devices_queue_interrupts() {
        assert_eq!(busiest_cpu(SAMPLE, "virtio1"), Some(1));
        assert_eq!(busiest_cpu(SAMPLE, "virtio10"), Some(0));
        assert_eq!(
            busiest_cpu(SAMPLE, "virtio2"),
            None,
            "config irqs are not queues"
        );
        assert_eq!(busiest_cpu(SAMPLE, "nvme0"), None);
    }
}
