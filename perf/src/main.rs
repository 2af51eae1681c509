//! keel-bench: a black-box etcd v3 load generator in the style of etcd's `benchmark` tool. It
//! speaks only the etcd gRPC API, so it drives real etcd and Keel alike; every figure Keel
//! claims is a ratio of two runs of this tool on the same machine.
//!
//! Clients share connections as in etcd's tool: client i uses connection i % conns. Each
//! client records latencies in its own HDR histogram; they are merged at the end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use keel_proto::pb;

mod disk;
mod grpc;
use grpc::Conn;

#[derive(Parser, Debug)]
#[command(
    name = "keel-bench",
    about = "etcd v3 load generator (drives etcd and Keel alike)"
)]
struct Args {
    /// Comma-separated gRPC endpoints (host:port).
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// Total number of gRPC connections.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Total number of concurrent clients.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Runtime worker threads of the harness itself (it shares the machine with the server).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Probes the disk the way Keel's WAL writes (O_DIRECT, io_uring, durable writes) and
    /// checks it against the target sheet of HARDWARE.md.
    Disk {
        /// A directory on the disk to probe (e.g. the data dir's parent).
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Durable writes per probe line.
        #[arg(long, default_value_t = 2000)]
        count: usize,
    },
    /// Puts keys.
    Put {
        #[arg(long, default_value_t = 10_000)]
        total: u64,
        #[arg(long, default_value_t = 8)]
        key_size: usize,
        #[arg(long, default_value_t = 8)]
        val_size: usize,
        /// Keys are drawn from this many distinct keys.
        #[arg(long, default_value_t = 1)]
        key_space_size: u64,
        /// Use sequential keys (i % key-space-size) instead of random ones.
        #[arg(long)]
        sequential_keys: bool,
    },
    /// Reads a key or range.
    Range {
        key: String,
        range_end: Option<String>,
        #[arg(long, default_value_t = 10_000)]
        total: u64,
        /// l: linearizable, s: serializable.
        #[arg(long, default_value = "l")]
        consistency: String,
    },
}

struct Outcome {
    hist: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

fn make_key(i: u64, key_size: usize) -> Bytes {
    let mut k = vec![0u8; key_size.max(8)];
    k[..8].copy_from_slice(&i.to_be_bytes());
    k.truncate(key_size.max(1));
    Bytes::from(k)
}

async fn connect(endpoints: &[String], conns: usize) -> anyhow::Result<Vec<Conn>> {
    let mut out = Vec::with_capacity(conns);
    for i in 0..conns {
        let ep = &endpoints[i % endpoints.len()];
        out.push(
            Conn::connect(ep)
                .await
                .with_context(|| format!("connect {ep}"))?,
        );
    }
    Ok(out)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let endpoints: Vec<String> = args.endpoints.split(',').map(str::to_string).collect();
    let chans = connect(&endpoints, args.conns.max(1)).await?;
    let issued = Arc::new(AtomicU64::new(0));
    let total = match &args.cmd {
        Cmd::Put { total, .. } | Cmd::Range { total, .. } => *total,
        Cmd::Disk { .. } => unreachable!("disk runs without a server"),
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients.max(1) {
        let ch = chans[c % chans.len()].clone();
        let issued = issued.clone();
        let cmd = match &args.cmd {
            Cmd::Put {
                key_size,
                val_size,
                key_space_size,
                sequential_keys,
                ..
            } => Work::Put {
                key_size: *key_size,
                value: Bytes::from(vec![b'v'; *val_size]),
                space: (*key_space_size).max(1),
                sequential: *sequential_keys,
            },
            Cmd::Disk { .. } => unreachable!("disk runs without a server"),
            Cmd::Range {
                key,
                range_end,
                consistency,
                ..
            } => Work::Range(pb::RangeRequest {
                key: Bytes::from(key.clone()),
                range_end: Bytes::from(range_end.clone().unwrap_or_default()),
                serializable: consistency == "s",
                ..Default::default()
            }),
        };
        tasks.push(tokio::spawn(client(ch, cmd, issued, total, c as u64)));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        let o = t.await?;
        hist.add(&o.hist)?;
        for (k, v) in o.errors {
            *errors.entry(k).or_default() += v;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    report(&args, &hist, &errors, secs);
    Ok(())
}

enum Work {
    Put {
        key_size: usize,
        value: Bytes,
        space: u64,
        sequential: bool,
    },
    Range(pb::RangeRequest),
}

async fn client(ch: Conn, work: Work, issued: Arc<AtomicU64>, total: u64, seed: u64) -> Outcome {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut errors = BTreeMap::new();
    let mut rng = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    loop {
        let i = issued.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            break;
        }
        let t0 = Instant::now();
        let res = match &work {
            Work::Put {
                key_size,
                value,
                space,
                sequential,
            } => {
                let k = if *sequential {
                    i % space
                } else {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % space
                };
                let req = pb::PutRequest {
                    key: make_key(k, *key_size),
                    value: value.clone(),
                    ..Default::default()
                };
                ch.unary::<_, pb::PutResponse>("/etcdserverpb.KV/Put", &req)
                    .await
                    .map(|_| ())
            }
            Work::Range(r) => ch
                .unary::<_, pb::RangeResponse>("/etcdserverpb.KV/Range", r)
                .await
                .map(|_| ()),
        };
        match res {
            Ok(()) => {
                let us = t0.elapsed().as_micros() as u64;
                hist.saturating_record(us.max(1));
            }
            Err(s) => {
                *errors
                    .entry(format!("{}: {}", s.code_name(), s.message))
                    .or_insert(0) += 1;
                if s.code == 14 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    Outcome { hist, errors }
}

fn report(args: &Args, h: &Histogram<u64>, errors: &BTreeMap<String, u64>, secs: f64) {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let rps = h.len() as f64 / secs;
    if args.json {
        let v = serde_json::json!({
            "requests": h.len(),
            "seconds": secs,
            "requests_per_sec": rps,
            "latency_ms": {
                "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999),
                "max": h.max() as f64 / 1000.0, "mean": h.mean() / 1000.0,
            },
            "errors": errors,
        });
        println!("{v}");
    } else {
        println!("requests      {}", h.len());
        println!("seconds       {secs:.3}");
        println!("requests/sec  {rps:.1}");
        println!(
            "latency ms    p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(0.999),
            h.max() as f64 / 1000.0
        );
        for (e, n) in errors {
            println!("error         {n} x {e}");
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Cmd::Disk { dir, count } = &args.cmd {
        return disk::run(dir, *count, args.json);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}
