//! Results: merged from every client, printed as a text table or JSON, and drawn as an SVG
//! (latency percentiles over time, and the latency CDF). Clients keep only samples (every
//! request is one: when it started, how long it took), so a thousand clients do not each
//! carry a histogram through the run; the whole run's percentiles come from an HDR histogram
//! (3 significant digits) made of them at the end, the p99 of each second and of the run
//! after its first second from the samples themselves.

use std::collections::BTreeMap;
use std::fmt::Write;

use hdrhistogram::Histogram;

use crate::Outcome;

pub struct Summary {
    pub hist: Histogram<u64>,
    pub errors: BTreeMap<String, u64>,
    /// The longest a failed request waited for its error (µs).
    pub error_max_us: u64,
    pub writes: u64,
    pub seconds: f64,
    pub client_cpu_cores: f64,
    pub samples: Vec<(u32, u32)>,
    /// Deltas of the server's disk histograms over the run, when it exposes them.
    pub server_metrics: BTreeMap<String, crate::metrics::Hist>,
}

impl Summary {
    pub fn merge(outcomes: Vec<Outcome>, seconds: f64, cores: f64) -> anyhow::Result<Summary> {
        let mut s = Summary {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            errors: BTreeMap::new(),
            error_max_us: 0,
            writes: 0,
            seconds,
            client_cpu_cores: cores,
            samples: Vec::new(),
            server_metrics: BTreeMap::new(),
        };
        for o in outcomes {
            for (k, v) in o.errors {
                *s.errors.entry(k).or_default() += v;
            }
            s.writes += o.writes;
            s.error_max_us = s.error_max_us.max(o.error_max_us);
            s.samples.extend(o.samples);
        }
        s.samples.sort_unstable();
        for (_, us) in &s.samples {
            s.hist.saturating_record(u64::from(*us).max(1));
        }
        Ok(s)
    }

    pub fn requests(&self) -> u64 {
        self.hist.len()
    }

    pub fn requests_per_sec(&self) -> f64 {
        self.requests() as f64 / self.seconds.max(1e-9)
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Latency at quantile `q` in ms (0 when nothing succeeded).
    pub fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    /// The p99 latency (ms) of the requests started in each whole second of the run, from
    /// the samples (shows a warm-up or a burst that the run's p99 folds in).
    pub fn p99_by_second(&self) -> Vec<f64> {
        let mut out = Vec::new();
        let mut second: Vec<u32> = Vec::new();
        let mut at = 0;
        let mut flush = |second: &mut Vec<u32>| {
            if !second.is_empty() {
                out.push(p99_ms(second));
                second.clear();
            }
        };
        for (ms, us) in &self.samples {
            if ms / 1000 != at {
                flush(&mut second);
                at = ms / 1000;
            }
            second.push(*us);
        }
        flush(&mut second);
        out
    }

    /// Every sample as `start_ms latency_us` lines, in start order.
    pub fn samples_text(&self) -> String {
        let mut out = String::with_capacity(self.samples.len() * 12);
        for (ms, us) in &self.samples {
            let _ = writeln!(out, "{ms} {us}");
        }
        out
    }

    /// p99 of the requests sent from the second second of the run on (the run without its
    /// warm-up: connections opening, buffers and windows filling once); None if none were.
    pub fn p99_after_first_second(&self) -> Option<f64> {
        let mut later: Vec<u32> = self
            .samples
            .iter()
            .filter(|(ms, _)| *ms >= 1000)
            .map(|(_, us)| *us)
            .collect();
        (!later.is_empty()).then(|| p99_ms(&mut later))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "p99_ms_by_second": self.p99_by_second(),
            "p99_ms_after_first_second": self.p99_after_first_second(),
            "requests": self.requests(),
            "writes": self.writes,
            "reads": self.requests() - self.writes,
            "seconds": self.seconds,
            "requests_per_sec": self.requests_per_sec(),
            "latency_ms": {
                "p50": self.ms(0.5), "p90": self.ms(0.9), "p99": self.ms(0.99),
                "p999": self.ms(0.999), "max": self.hist.max() as f64 / 1000.0,
                "mean": self.hist.mean() / 1000.0,
            },
            "errors": self.errors,
            "error_count": self.error_count(),
            // The longest any request waited for its answer, a success or an error (a
            // client's view of a failover: a write lost with the old leader fails, and how
            // long it hung before failing is what the client felt).
            "max_answer_ms": self.hist.max().max(self.error_max_us) as f64 / 1000.0,
            "client_cpu_cores": self.client_cpu_cores,
            "server_metrics": self.server_metrics.iter()
                .map(|(k, h)| (k.clone(), h.json()))
                .collect::<serde_json::Map<String, serde_json::Value>>(),
        })
    }

    pub fn text(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "requests      {} ({} writes)",
            self.requests(),
            self.writes
        );
        let _ = writeln!(t, "seconds       {:.3}", self.seconds);
        let _ = writeln!(t, "requests/sec  {:.1}", self.requests_per_sec());
        let _ = writeln!(
            t,
            "latency ms    p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            self.ms(0.5),
            self.ms(0.9),
            self.ms(0.99),
            self.ms(0.999),
            self.hist.max() as f64 / 1000.0
        );
        let _ = writeln!(t, "harness CPU   {:.2} cores", self.client_cpu_cores);
        for (name, h) in &self.server_metrics {
            let j = h.json();
            let _ = writeln!(
                t,
                "server        {name}: {} in the run, mean {:.3} ms, p99 <= {} ms",
                h.count,
                j["mean_ms"].as_f64().unwrap_or(0.0),
                j["p99_ms_at_most"]
                    .as_f64()
                    .map_or("?".into(), |v| format!("{v:.3}"))
            );
        }
        for (e, n) in &self.errors {
            let _ = writeln!(t, "error         {n} x {e}");
        }
        t
    }
}

const W: f64 = 900.0;
const H: f64 = 300.0;
const PAD: f64 = 50.0;

/// log10 scale of a latency in µs onto [0, 1] between `lo` and `hi` µs.
fn log_pos(us: f64, lo: f64, hi: f64) -> f64 {
    ((us.max(lo).ln() - lo.ln()) / (hi.ln() - lo.ln()).max(1e-9)).clamp(0.0, 1.0)
}

/// Two panels: p50/p99 per time bucket over the run, and the CDF of all latencies.
pub fn svg(s: &Summary) -> String {
    let mut out = String::new();
    let total_h = 2.0 * H + 3.0 * PAD;
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{total_h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let lo = (s.hist.min().max(1) as f64).min(100.0);
    let hi = (s.hist.max().max(2) as f64) * 1.1;
    let plot_w = W - 2.0 * PAD;
    // Panel 1: latency over time.
    let y0 = PAD;
    let _ = writeln!(
        out,
        r#"<text x="{PAD}" y="{}">latency over time (ms, log scale): p50 blue, p99 red; {:.0} req/s</text>"#,
        y0 - 10.0,
        s.requests_per_sec()
    );
    let _ = writeln!(
        out,
        r#"<rect x="{PAD}" y="{y0}" width="{plot_w}" height="{H}" fill="none" stroke="black"/>"#
    );
    let end_ms = s.samples.last().map_or(1, |x| x.0.max(1)) as f64;
    let buckets = 100usize;
    let mut per: Vec<Vec<u32>> = vec![Vec::new(); buckets];
    for (at, us) in &s.samples {
        let b = ((*at as f64 / end_ms) * (buckets - 1) as f64) as usize;
        per[b.min(buckets - 1)].push(*us);
    }
    for (q, color) in [(0.5, "blue"), (0.99, "red")] {
        let mut pts = String::new();
        for (b, v) in per.iter_mut().enumerate() {
            if v.is_empty() {
                continue;
            }
            v.sort_unstable();
            let us = v[((v.len() - 1) as f64 * q) as usize] as f64;
            let x = PAD + plot_w * b as f64 / (buckets - 1) as f64;
            let y = y0 + H * (1.0 - log_pos(us, lo, hi));
            let _ = write!(pts, "{x:.1},{y:.1} ");
        }
        let _ = writeln!(
            out,
            r#"<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5"/>"#
        );
    }
    axis_labels(&mut out, y0, lo, hi);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="end">{:.1} s</text>"#,
        W - PAD,
        y0 + H + 15.0,
        end_ms / 1000.0
    );
    // Panel 2: CDF.
    let y1 = y0 + H + 2.0 * PAD;
    let _ = writeln!(
        out,
        r#"<text x="{PAD}" y="{}">latency CDF: share of requests (y) at or below a latency (x, ms, log scale)</text>"#,
        y1 - 10.0
    );
    let _ = writeln!(
        out,
        r#"<rect x="{PAD}" y="{y1}" width="{plot_w}" height="{H}" fill="none" stroke="black"/>"#
    );
    let mut pts = String::new();
    for v in s.hist.iter_quantiles(2) {
        let us = v.value_iterated_to() as f64;
        let x = PAD + plot_w * log_pos(us, lo, hi);
        let y = y1 + H * (1.0 - v.quantile_iterated_to());
        let _ = write!(pts, "{x:.1},{y:.1} ");
    }
    let _ = writeln!(
        out,
        r#"<polyline points="{pts}" fill="none" stroke="black" stroke-width="1.5"/>"#
    );
    for (frac, pct) in [(0.0, 0), (0.5, 50), (1.0, 100)] {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{pct}%</text>"#,
            PAD - 4.0,
            y1 + H * (1.0 - frac) + 4.0
        );
    }
    for (frac, label) in [(0.0, lo), (0.5, (lo * hi).sqrt()), (1.0, hi)] {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.3}</text>"#,
            PAD + plot_w * frac,
            y1 + H + 15.0,
            label / 1000.0
        );
    }
    let _ = writeln!(out, "</svg>");
    out
}

fn axis_labels(out: &mut String, y0: f64, lo: f64, hi: f64) {
    for (frac, us) in [(0.0, lo), (0.5, (lo * hi).sqrt()), (1.0, hi)] {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{:.3}</text>"#,
            PAD - 4.0,
            y0 + H * (1.0 - frac) + 4.0,
            us / 1000.0
        );
    }
}

/// The p99 of latencies in µs, in ms (sorts them).
fn p99_ms(us: &mut [u32]) -> f64 {
    us.sort_unstable();
    let i = ((us.len() as f64 * 0.99).ceil() as usize).clamp(1, us.len());
    us[i - 1] as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(latencies_us: &[u64], errors: &[(&str, u64)]) -> Outcome {
        Outcome {
            errors: errors.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            error_max_us: 0,
            writes: latencies_us.len() as u64,
            samples: latencies_us
                .iter()
                .enumerate()
                .map(|(i, l)| (i as u32, *l as u32))
                .collect(),
        }
    }

    #[test]
    fn percentiles_come_from_the_merged_histogram() {
        // 1..=1000 µs across two clients: p50 is 500 µs, p99 990 µs, whatever the split.
        let a: Vec<u64> = (1..=600).collect();
        let b: Vec<u64> = (601..=1000).collect();
        let s = Summary::merge(
            vec![
                outcome(&a, &[("Unavailable: x", 2)]),
                outcome(&b, &[("Unavailable: x", 3)]),
            ],
            2.0,
            0.25,
        )
        .unwrap();
        assert_eq!(s.requests(), 1000);
        assert!((s.ms(0.5) - 0.5).abs() < 0.001, "{}", s.ms(0.5));
        assert!((s.ms(0.99) - 0.99).abs() < 0.001, "{}", s.ms(0.99));
        assert_eq!(s.errors["Unavailable: x"], 5);
        assert_eq!(s.requests_per_sec(), 500.0);
        assert_eq!(s.json()["max_answer_ms"], 1.0, "no error waited longer");
    }

    #[test]
    fn the_longest_answer_counts_requests_that_failed() {
        let mut slow_error = outcome(&[100, 200], &[("Unavailable: leader changed", 1)]);
        slow_error.error_max_us = 1_500_000;
        let s = Summary::merge(vec![slow_error, outcome(&[300], &[])], 1.0, 0.0).unwrap();
        assert_eq!(s.json()["latency_ms"]["max"], 0.3);
        assert_eq!(s.json()["max_answer_ms"], 1500.0);
    }

    #[test]
    fn p99_by_second_splits_the_run_at_whole_seconds() {
        // 100 requests in second 0 (1..=100 ms), 10 in second 2 (all 5 ms), none in second 1.
        let mut o = outcome(&[], &[]);
        o.samples = (1..=100u32)
            .map(|i| (i * 9, i * 1000))
            .chain((0..10).map(|i| (2000 + i, 5000)))
            .collect();
        let s = Summary::merge(vec![o], 3.0, 0.0).unwrap();
        assert_eq!(s.p99_by_second(), vec![99.0, 5.0]);
        let text = s.samples_text();
        assert!(text.starts_with("9 1000\n18 2000\n"), "{text}");
        assert!(text.ends_with("2009 5000\n"), "{text}");
        assert_eq!(text.lines().count(), 110);
        assert_eq!(s.p99_after_first_second(), Some(5.0));
        assert_eq!(s.json()["p99_ms_after_first_second"], 5.0);
    }

    #[test]
    fn json_has_every_field_and_svg_draws_both_panels() {
        let s = Summary::merge(vec![outcome(&[100, 200, 300], &[])], 1.0, 0.5).unwrap();
        let j = s.json();
        for k in [
            "requests",
            "requests_per_sec",
            "latency_ms",
            "errors",
            "client_cpu_cores",
        ] {
            assert!(j.get(k).is_some(), "missing {k}");
        }
        for p in ["p50", "p90", "p99", "p999", "max", "mean"] {
            assert!(j["latency_ms"][p].is_number(), "missing latency {p}");
        }
        let svg = svg(&s);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 3);
    }
}
