//! Auto-compaction with etcd's semantics (`--auto-compaction-mode`, `--auto-compaction-retention`,
//! etcd `server/etcdserver/api/v3compactor`): the leader proposes KV.Compact through raft.
//!
//! - periodic: every `retention / 10` (at most 6 min) the current revision is sampled; once
//!   `min(retention, 1h)` has passed since the last compaction, it compacts to the revision
//!   sampled `retention` ago.
//! - revision: every 5 minutes, it compacts to `current - retention` (if that moved).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How often revision mode looks (etcd's checkCompactInterval).
const REVISION_CHECK_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// Periodic mode samples the revision `retention / RETRY_DIVISOR` apart.
const RETRY_DIVISOR: u32 = 10;
const HOUR: Duration = Duration::from_secs(3600);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Periodic(Duration),
    Revision(i64),
}

/// The resolved auto-compaction setting: None when retention is 0 (off, etcd's default).
pub fn parse(mode: &str, retention: &str) -> anyhow::Result<Option<Mode>> {
    let m = match (mode, retention.parse::<i64>()) {
        ("periodic", Ok(h)) if h >= 0 => Mode::Periodic(HOUR * h as u32),
        ("revision", Ok(r)) if r >= 0 => Mode::Revision(r),
        ("periodic", _) => Mode::Periodic(parse_go_duration(retention).ok_or_else(|| {
            anyhow::anyhow!("error parsing CompactionRetention: invalid duration {retention:?}")
        })?),
        ("revision", _) => {
            anyhow::bail!("error parsing CompactionRetention: invalid revision {retention:?}")
        }
        (other, _) => anyhow::bail!("unknown auto-compaction-mode {other:?}"),
    };
    Ok(match m {
        Mode::Periodic(d) if d.is_zero() => None,
        Mode::Revision(0) => None,
        m => Some(m),
    })
}

/// Go's time.ParseDuration for non-negative values: "1h", "30m", "1h30m", "1.5s", "500ms".
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * secs;
    }
    Some(Duration::from_secs_f64(total))
}

/// The decisions of either mode, fed the time and the current revision at each tick.
pub struct AutoCompactor {
    mode: Mode,
    /// Periodic: revisions sampled `tick()` apart, oldest first.
    revs: VecDeque<i64>,
    last_success: Instant,
    /// Periodic: the first compaction waits a whole period, later ones the compact interval.
    first_done: bool,
    last_rev: i64,
}

impl AutoCompactor {
    pub fn new(mode: Mode, now: Instant) -> AutoCompactor {
        AutoCompactor {
            mode,
            revs: VecDeque::new(),
            last_success: now,
            first_done: false,
            last_rev: 0,
        }
    }

    /// How long between two calls to `step`.
    pub fn tick(&self) -> Duration {
        match self.mode {
            Mode::Periodic(p) => p.min(HOUR) / RETRY_DIVISOR,
            Mode::Revision(_) => REVISION_CHECK_INTERVAL,
        }
    }

    /// The revision to compact to now, if any. `compacted` is called back on success.
    pub fn step(&mut self, now: Instant, current_rev: i64) -> Option<i64> {
        match self.mode {
            Mode::Periodic(period) => {
                let keep = (period.as_secs_f64() / self.tick().as_secs_f64()) as usize + 1;
                self.revs.push_back(current_rev);
                if self.revs.len() > keep {
                    self.revs.pop_front();
                }
                let wait = if self.first_done {
                    period.min(HOUR)
                } else {
                    period
                };
                if now.duration_since(self.last_success) < wait {
                    return None;
                }
                self.revs.front().copied().filter(|r| *r > 1)
            }
            Mode::Revision(retention) => {
                let rev = current_rev - retention;
                (rev > 0 && rev != self.last_rev).then_some(rev)
            }
        }
    }

    /// A compaction to `rev` succeeded (or was already done).
    pub fn compacted(&mut self, now: Instant, rev: i64) {
        self.last_success = now;
        self.first_done = true;
        self.last_rev = rev;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_parses_as_etcd_does() {
        assert_eq!(parse("periodic", "0").unwrap(), None);
        assert_eq!(parse("periodic", "1").unwrap(), Some(Mode::Periodic(HOUR)));
        assert_eq!(
            parse("periodic", "30m").unwrap(),
            Some(Mode::Periodic(Duration::from_secs(1800)))
        );
        assert_eq!(
            parse("periodic", "1h30m").unwrap(),
            Some(Mode::Periodic(Duration::from_secs(5400)))
        );
        assert_eq!(
            parse("revision", "1000").unwrap(),
            Some(Mode::Revision(1000))
        );
        assert_eq!(parse("revision", "0").unwrap(), None);
        assert!(parse("revision", "1h").is_err());
        assert!(parse("periodic", "soon").is_err());
        let e = parse("daily", "1").unwrap_err().to_string();
        assert_eq!(e, "unknown auto-compaction-mode \"daily\"");
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
    }

    #[test]
    fn periodic_compacts_to_the_revision_of_one_period_ago() {
        let t0 = Instant::now();
        let mut c = AutoCompactor::new(Mode::Periodic(Duration::from_secs(10)), t0);
        assert_eq!(c.tick(), Duration::from_secs(1));
        let mut got = Vec::new();
        for s in 1..=25u64 {
            let now = t0 + Duration::from_secs(s);
            let rev = 100 * s as i64;
            if let Some(r) = c.step(now, rev) {
                got.push((s, r));
                c.compacted(now, r);
            }
        }
        // First at 10 s to the revision seen at 0-1 s; then every 10 s, 10 s behind.
        assert_eq!(got, [(10, 100), (20, 1000)]);
    }

    #[test]
    fn revision_mode_keeps_the_last_n_revisions() {
        let t0 = Instant::now();
        let mut c = AutoCompactor::new(Mode::Revision(1000), t0);
        assert_eq!(c.step(t0, 500), None, "not enough revisions yet");
        assert_eq!(c.step(t0, 5000), Some(4000));
        c.compacted(t0, 4000);
        assert_eq!(c.step(t0, 5000), None, "nothing new");
        assert_eq!(c.step(t0, 7000), Some(6000));
    }
}
