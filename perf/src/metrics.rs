//! The server's own view of a run: `/metrics` (Prometheus text, on the client port as etcd
//! serves it) read before and after, and the deltas of etcd's disk histograms: WAL fsync and
//! backend commit. A server without them (or without /metrics) reports nothing.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const HISTOGRAMS: [&str; 2] = [
    "etcd_disk_wal_fsync_duration_seconds",
    "etcd_disk_backend_commit_duration_seconds",
];

/// A Prometheus histogram: cumulative (upper bound, count) buckets, sum and count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hist {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

/// GET /metrics over HTTP/1.0 (so the body is plain, not chunked); None on any failure.
pub async fn scrape(endpoint: &str) -> Option<String> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(endpoint).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nAccept: text/plain\r\n\r\n")
            .await
            .ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.")
            .then_some(())
            .filter(|_| head.split_whitespace().nth(1) == Some("200"))?;
        Some(body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(3), fetch)
        .await
        .ok()
        .flatten()
}

/// The histogram `name` in a Prometheus text exposition, summed over label sets.
pub fn parse(text: &str, name: &str) -> Option<Hist> {
    let mut h = Hist::default();
    let mut seen = false;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((metric, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        if let Some(rest) = metric.strip_prefix(name) {
            if let Some(labels) = rest.strip_prefix("_bucket") {
                let le = labels
                    .split("le=\"")
                    .nth(1)
                    .and_then(|x| x.split('"').next())
                    .map(|x| {
                        if x == "+Inf" {
                            f64::INFINITY
                        } else {
                            x.parse().unwrap_or(f64::NAN)
                        }
                    });
                if let Some(le) = le {
                    match h.buckets.iter_mut().find(|(b, _)| *b == le) {
                        Some(b) => b.1 += v,
                        None => h.buckets.push((le, v)),
                    }
                    seen = true;
                }
            } else if rest.starts_with("_sum") {
                h.sum += v;
            } else if rest.starts_with("_count") {
                h.count += v;
            }
        }
    }
    h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    seen.then_some(h)
}

/// What happened between two scrapes.
pub fn delta(before: &Hist, after: &Hist) -> Hist {
    Hist {
        buckets: after
            .buckets
            .iter()
            .map(|(le, c)| {
                let was = before
                    .buckets
                    .iter()
                    .find(|(b, _)| b == le)
                    .map_or(0.0, |x| x.1);
                (*le, c - was)
            })
            .collect(),
        sum: after.sum - before.sum,
        count: after.count - before.count,
    }
}

impl Hist {
    /// The upper bound (seconds) of the bucket holding quantile `q`.
    pub fn quantile_upper_bound(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let want = q * self.count;
        self.buckets
            .iter()
            .find(|(_, c)| *c >= want)
            .map(|(le, _)| *le)
    }

    pub fn json(&self) -> serde_json::Value {
        let ms = |s: Option<f64>| s.filter(|x| x.is_finite()).map(|x| x * 1000.0);
        serde_json::json!({
            "count": self.count,
            "mean_ms": (self.count > 0.0).then(|| self.sum / self.count * 1000.0),
            "p99_ms_at_most": ms(self.quantile_upper_bound(0.99)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# HELP x\n\
etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"} 10\n\
etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.002\"} 12\n\
etcd_disk_wal_fsync_duration_seconds_bucket{le=\"+Inf\"} 12\n\
etcd_disk_wal_fsync_duration_seconds_sum 0.011\n\
etcd_disk_wal_fsync_duration_seconds_count 12\n";

    const AFTER: &str = "etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"} 100\n\
etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.002\"} 111\n\
etcd_disk_wal_fsync_duration_seconds_bucket{le=\"+Inf\"} 112\n\
etcd_disk_wal_fsync_duration_seconds_sum 0.111\n\
etcd_disk_wal_fsync_duration_seconds_count 112\n";

    #[test]
    fn deltas_and_quantiles_from_prometheus_text() {
        let name = HISTOGRAMS[0];
        let d = delta(&parse(BEFORE, name).unwrap(), &parse(AFTER, name).unwrap());
        assert_eq!(d.count, 100.0);
        assert!((d.sum - 0.1).abs() < 1e-9);
        assert_eq!(d.quantile_upper_bound(0.5), Some(0.001));
        assert_eq!(d.quantile_upper_bound(0.99), Some(0.002));
        assert_eq!(d.quantile_upper_bound(1.0), Some(f64::INFINITY));
        assert!(parse(AFTER, HISTOGRAMS[1]).is_none());
    }
}
