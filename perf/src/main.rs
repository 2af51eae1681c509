//! keel-bench: a black-box etcd v3 load generator in the style of etcd's `benchmark` tool. It
//! speaks only the etcd gRPC API, so it drives real etcd and Keel alike; every figure Keel
//! claims is a ratio of two runs of this tool on the same machine.
//!
//! Clients share connections as in etcd's tool: client i uses connection i % conns. Each
//! client records a (start, latency) sample per request; the percentiles, the per-second
//! p99s and the plot are made of them at the end. The harness reports its own CPU use, since it shares
//! the machine with the server under test.

/// The harness shares the machine with the server it measures: the allocator the server uses
/// costs it less CPU than glibc's (7% of the harness's time under load went to malloc/free).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod disk;
mod grpc;
mod metrics;
mod report;
mod streams;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use grpc::{Conn, Status};
use keel_proto::pb;
use keel_proto::pb::request_op::Request;

#[derive(Parser, Debug)]
#[command(
    name = "keel-bench",
    about = "etcd v3 load generator (drives etcd and Keel alike)"
)]
pub struct Args {
    /// Comma-separated gRPC endpoints (host:port).
    #[arg(long, global = true, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// Total number of gRPC connections.
    #[arg(long, global = true, default_value_t = 1)]
    conns: usize,
    /// Total number of concurrent clients (they share the connections).
    #[arg(long, global = true, default_value_t = 1)]
    clients: usize,
    /// Runtime worker threads of the harness itself.
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    /// Send requests only to the leader (found with Maintenance.Status on each endpoint).
    #[arg(long, global = true)]
    target_leader: bool,
    /// Run this many seconds instead of a request count.
    #[arg(long, global = true)]
    duration: Option<f64>,
    /// Requests per second across all clients; 0: as fast as they go.
    #[arg(long, global = true, default_value_t = 0)]
    rate: u64,
    /// Print the result as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Write an SVG plot (latency over time, latency CDF) to this file.
    #[arg(long, global = true)]
    plot: Option<std::path::PathBuf>,
    /// Write each request's start (ms into the run) and latency (us), one per line, to this
    /// file (what the per-second p99s are computed from).
    #[arg(long, global = true)]
    samples: Option<std::path::PathBuf>,
    /// Before the workload, open this many watchers on every key, each on its own
    /// connection, that never read again (slow consumers running beside the workload).
    #[arg(long, global = true, default_value_t = 0)]
    slow_watchers: usize,
    /// Flow-control window of each slow watcher's stream and connection: what it holds
    /// unread. 65535 is where grpc-go, grpcio and tonic clients start.
    #[arg(long, global = true, default_value_t = 1 << 20)]
    slow_watcher_window: u32,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
struct Keys {
    /// Key size in bytes.
    #[arg(long, default_value_t = 8)]
    key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 8)]
    val_size: usize,
    /// Keys are drawn from this many distinct keys.
    #[arg(long, default_value_t = 1)]
    key_space_size: u64,
    /// Sequential keys (i % key-space-size) instead of random ones.
    #[arg(long)]
    sequential_keys: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Probes the disk the way Keel's WAL writes and checks it against HARDWARE.md's sheet.
    Disk {
        /// A directory on the disk to probe.
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
        #[command(flatten)]
        keys: Keys,
    },
    /// Reads a key or a range [key, range_end).
    Range {
        key: String,
        range_end: Option<String>,
        #[arg(long, default_value_t = 10_000)]
        total: u64,
        /// l: linearizable, s: serializable.
        #[arg(long, default_value = "l")]
        consistency: String,
        /// Most keys per response; 0: all.
        #[arg(long, default_value_t = 0)]
        limit: i64,
        /// Read at this revision; 0: the newest.
        #[arg(long, default_value_t = 0)]
        rev: i64,
        /// Ask only for the count of keys (etcdctl 3.5's `get --count-only`).
        #[arg(long)]
        count_only: bool,
        /// Through etcd 3.7's KV.RangeStream (the chunks read whole) instead of Range.
        #[arg(long)]
        stream: bool,
    },
    /// Paginated lists of [key, range_end), as kube-apiserver lists: pages of --page-size
    /// keys, each from the last key of the one before, all at the first page's revision.
    /// One request is one whole list.
    List {
        key: String,
        range_end: Option<String>,
        /// Whole lists to run.
        #[arg(long, default_value_t = 3)]
        total: u64,
        #[arg(long, default_value_t = 500)]
        page_size: i64,
    },
    /// Txns of --txn-ops puts each.
    TxnPut {
        #[arg(long, default_value_t = 10_000)]
        total: u64,
        #[arg(long, default_value_t = 1)]
        txn_ops: usize,
        #[command(flatten)]
        keys: Keys,
    },
    /// Read-only txns (a range over [key, range_end)) mixed with txns that put a key.
    TxnMixed {
        key: String,
        range_end: Option<String>,
        #[arg(long, default_value_t = 10_000)]
        total: u64,
        /// Reads per write.
        #[arg(long, default_value_t = 1.0)]
        rw_ratio: f64,
        #[command(flatten)]
        keys: Keys,
    },
    /// Watch fan-out: watchers on a set of keys, puts at a fixed rate; event delivery latency.
    Watch {
        #[arg(long, default_value_t = 10)]
        streams: usize,
        #[arg(long, default_value_t = 10)]
        watchers_per_stream: usize,
        /// Distinct keys the watchers spread over.
        #[arg(long, default_value_t = 10)]
        watched_key_total: u64,
        #[arg(long, default_value_t = 1000)]
        put_total: u64,
        /// Puts per second.
        #[arg(long, default_value_t = 100)]
        put_rate: u64,
        #[arg(long, default_value_t = 32)]
        val_size: usize,
    },
    /// Serializable ranges of a key while many unsynced watchers (from revision 1) exist.
    WatchGet {
        #[arg(long, default_value_t = 10_000)]
        watchers: usize,
        #[arg(long, default_value_t = 10)]
        streams: usize,
        /// Versions of the key written first, for the watchers to catch up on.
        #[arg(long, default_value_t = 100)]
        history: u64,
        /// Ranges to send.
        #[arg(long, default_value_t = 10_000)]
        total: u64,
    },
    /// Lease keep-alives: each client grants a lease and keeps it alive over one stream.
    LeaseKeepalive {
        #[arg(long, default_value_t = 10_000)]
        total: u64,
        #[arg(long, default_value_t = 30)]
        ttl: i64,
    },
    /// Sends nothing: holds the connections and the --slow-watchers open for --duration
    /// seconds (or until killed), so slow consumers can be a client process of their own
    /// beside the one measuring. Prints `holding` on stdout once they are all in place.
    Hold,
    /// Single-key ranges mixed with puts over the same key space.
    Mixed {
        #[arg(long, default_value_t = 10_000)]
        total: u64,
        /// Reads per write.
        #[arg(long, default_value_t = 1.0)]
        rw_ratio: f64,
        /// Reads: l linearizable, s serializable.
        #[arg(long, default_value = "l")]
        consistency: String,
        #[command(flatten)]
        keys: Keys,
    },
}

/// What each request of a run is.
#[derive(Clone)]
enum Work {
    Put(Keys, Bytes),
    Range(pb::RangeRequest),
    RangeStream(pb::RangeRequest),
    List(pb::RangeRequest),
    TxnPut(Keys, Bytes, usize),
    TxnMixed(pb::RangeRequest, Keys, Bytes, f64),
    Mixed(Keys, Bytes, f64, bool),
}

fn make_key(i: u64, key_size: usize) -> Bytes {
    let mut k = vec![b'k'; key_size.max(1)];
    let b = i.to_be_bytes();
    let n = b.len().min(k.len());
    let at = k.len() - n;
    k[at..].copy_from_slice(&b[b.len() - n..]);
    Bytes::from(k)
}

/// xorshift: cheap per-client randomness, so the harness spends its CPU on requests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn pick_key(k: &Keys, i: u64, rng: &mut Rng) -> Bytes {
    let space = k.key_space_size.max(1);
    let n = if k.sequential_keys {
        i % space
    } else {
        rng.next() % space
    };
    make_key(n, k.key_size)
}

fn put_req(k: &Keys, value: &Bytes, i: u64, rng: &mut Rng) -> pb::PutRequest {
    pb::PutRequest {
        key: pick_key(k, i, rng),
        value: value.clone(),
        ..Default::default()
    }
}

const PUT: &str = "/etcdserverpb.KV/Put";
const WATCH_GET_KEY: &str = "watchget";
const RANGE: &str = "/etcdserverpb.KV/Range";
const RANGE_STREAM: &str = "/etcdserverpb.KV/RangeStream";
const TXN: &str = "/etcdserverpb.KV/Txn";

impl Work {
    /// Sends request `i`; returns whether it was a write.
    async fn one(&self, c: &Conn, i: u64, rng: &mut Rng) -> Result<bool, Status> {
        match self {
            Work::Put(k, v) => {
                c.unary::<_, pb::PutResponse>(PUT, &put_req(k, v, i, rng))
                    .await?;
                Ok(true)
            }
            Work::Range(r) => {
                c.unary::<_, pb::RangeResponse>(RANGE, r).await?;
                Ok(false)
            }
            Work::RangeStream(r) => {
                let mut s = c
                    .bidi::<pb::RangeRequest, pb::RangeStreamResponse>(RANGE_STREAM)
                    .await?;
                s.send(r)?;
                s.close_send()?;
                while s.recv().await?.is_some() {}
                Ok(false)
            }
            Work::List(first) => {
                let mut req = first.clone();
                loop {
                    let page = c.unary::<_, pb::RangeResponse>(RANGE, &req).await?;
                    if req.revision == 0 {
                        req.revision = page.header.as_ref().map_or(0, |h| h.revision);
                    }
                    match page.kvs.last() {
                        Some(last) if page.more => {
                            let mut next = last.key.to_vec();
                            next.push(0);
                            req.key = Bytes::from(next);
                        }
                        _ => return Ok(false),
                    }
                }
            }
            Work::TxnPut(k, v, ops) => {
                // Consecutive keys from one base: a txn may not put a key twice.
                let space = k.key_space_size.max(1);
                let base = if k.sequential_keys {
                    i * *ops as u64
                } else {
                    rng.next()
                };
                let success = (0..*ops as u64)
                    .map(|j| pb::RequestOp {
                        request: Some(Request::RequestPut(pb::PutRequest {
                            key: make_key(base.wrapping_add(j) % space, k.key_size),
                            value: v.clone(),
                            ..Default::default()
                        })),
                    })
                    .collect();
                let t = pb::TxnRequest {
                    success,
                    ..Default::default()
                };
                c.unary::<_, pb::TxnResponse>(TXN, &t).await?;
                Ok(true)
            }
            Work::TxnMixed(read, k, v, rw) => {
                let write = rng.unit() < 1.0 / (1.0 + rw);
                let op = if write {
                    Request::RequestPut(put_req(k, v, i, rng))
                } else {
                    Request::RequestRange(read.clone())
                };
                let t = pb::TxnRequest {
                    success: vec![pb::RequestOp { request: Some(op) }],
                    ..Default::default()
                };
                c.unary::<_, pb::TxnResponse>(TXN, &t).await?;
                Ok(write)
            }
            Work::Mixed(k, v, rw, serializable) => {
                if rng.unit() < 1.0 / (1.0 + rw) {
                    c.unary::<_, pb::PutResponse>(PUT, &put_req(k, v, i, rng))
                        .await?;
                    Ok(true)
                } else {
                    let r = pb::RangeRequest {
                        key: pick_key(k, i, rng),
                        serializable: *serializable,
                        ..Default::default()
                    };
                    c.unary::<_, pb::RangeResponse>(RANGE, &r).await?;
                    Ok(false)
                }
            }
        }
    }
}

fn range_req(key: &str, end: &Option<String>, serializable: bool, limit: i64) -> pb::RangeRequest {
    pb::RangeRequest {
        key: Bytes::from(key.to_string()),
        range_end: Bytes::from(end.clone().unwrap_or_default()),
        serializable,
        limit,
        ..Default::default()
    }
}

fn range_at(mut r: pb::RangeRequest, revision: i64) -> pb::RangeRequest {
    r.revision = revision;
    r
}

/// The workload and its request count.
fn plan(cmd: &Cmd) -> (Work, u64) {
    let value = |k: &Keys| Bytes::from(vec![b'v'; k.val_size]);
    match cmd {
        Cmd::Disk { .. } | Cmd::Watch { .. } | Cmd::LeaseKeepalive { .. } | Cmd::Hold => {
            unreachable!("runs its own loop")
        }
        Cmd::WatchGet { total, .. } => (
            Work::Range(range_req(WATCH_GET_KEY, &None, true, 0)),
            *total,
        ),
        Cmd::Put { total, keys } => (Work::Put(keys.clone(), value(keys)), *total),
        Cmd::Range {
            key,
            range_end,
            total,
            consistency,
            limit,
            rev,
            count_only,
            stream,
        } => {
            let mut r = range_req(key, range_end, consistency == "s", *limit);
            r.count_only = *count_only;
            let r = range_at(r, *rev);
            let work = if *stream {
                Work::RangeStream(r)
            } else {
                Work::Range(r)
            };
            (work, *total)
        }
        Cmd::List {
            key,
            range_end,
            total,
            page_size,
        } => (
            Work::List(range_req(key, range_end, false, *page_size)),
            *total,
        ),
        Cmd::TxnPut {
            total,
            txn_ops,
            keys,
        } => (
            Work::TxnPut(keys.clone(), value(keys), (*txn_ops).max(1)),
            *total,
        ),
        Cmd::TxnMixed {
            key,
            range_end,
            total,
            rw_ratio,
            keys,
        } => (
            Work::TxnMixed(
                range_req(key, range_end, false, 0),
                keys.clone(),
                value(keys),
                *rw_ratio,
            ),
            *total,
        ),
        Cmd::Mixed {
            total,
            rw_ratio,
            consistency,
            keys,
        } => (
            Work::Mixed(keys.clone(), value(keys), *rw_ratio, consistency == "s"),
            *total,
        ),
    }
}

/// The endpoints to load: all, or only the current leader's.
async fn endpoints(args: &Args) -> anyhow::Result<Vec<String>> {
    let all: Vec<String> = args.endpoints.split(',').map(str::to_string).collect();
    if !args.target_leader {
        return Ok(all);
    }
    for ep in &all {
        let Ok(c) = Conn::connect(ep).await else {
            continue;
        };
        if let Ok(s) = c
            .unary::<_, pb::StatusResponse>(
                "/etcdserverpb.Maintenance/Status",
                &pb::StatusRequest {},
            )
            .await
        {
            if s.header.as_ref().is_some_and(|h| h.member_id == s.leader) {
                return Ok(vec![ep.clone()]);
            }
        }
    }
    anyhow::bail!(
        "--target-leader: no endpoint of {} reports itself leader",
        args.endpoints
    )
}

/// What one client saw.
pub struct Outcome {
    pub errors: BTreeMap<String, u64>,
    /// The longest a failed request waited for its error (µs).
    pub error_max_us: u64,
    pub writes: u64,
    /// (ms since start when sent, latency in µs): every request that succeeded.
    pub samples: Vec<(u32, u32)>,
}

struct Limits {
    total: Option<u64>,
    deadline: Option<Instant>,
    rate: u64,
    start: Instant,
}

async fn client(
    conn: Conn,
    work: Work,
    issued: Arc<AtomicU64>,
    limits: Arc<Limits>,
    seed: u64,
) -> Outcome {
    let mut out = Outcome {
        errors: BTreeMap::new(),
        error_max_us: 0,
        writes: 0,
        samples: Vec::new(),
    };
    let mut rng = Rng(seed.wrapping_mul(0x9e3779b97f4a7c15) | 1);
    loop {
        let i = issued.fetch_add(1, Ordering::Relaxed);
        if limits.total.is_some_and(|t| i >= t) {
            break;
        }
        if limits.rate > 0 {
            let at = limits.start + Duration::from_secs_f64(i as f64 / limits.rate as f64);
            tokio::time::sleep_until(at.into()).await;
        }
        let t0 = Instant::now();
        if limits.deadline.is_some_and(|d| t0 >= d) {
            break;
        }
        match work.one(&conn, i, &mut rng).await {
            Ok(write) => {
                let us = t0.elapsed().as_micros().max(1) as u64;
                out.writes += write as u64;
                let at_ms = (t0 - limits.start).as_millis() as u32;
                out.samples.push((at_ms, us.min(u32::MAX as u64) as u32));
            }
            Err(s) => {
                out.error_max_us = out.error_max_us.max(t0.elapsed().as_micros() as u64);
                *out.errors
                    .entry(format!("{}: {}", s.code_name(), s.message))
                    .or_insert(0) += 1;
                if s.code == 14 {
                    // Unavailable: do not spin on a dead endpoint.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    out
}

/// etcd's disk histograms summed over the endpoints that expose them.
async fn scrape_all(eps: &[String]) -> BTreeMap<String, metrics::Hist> {
    let mut out: BTreeMap<String, metrics::Hist> = BTreeMap::new();
    for ep in eps {
        let Some(text) = metrics::scrape(ep).await else {
            continue;
        };
        for name in metrics::HISTOGRAMS {
            if let Some(h) = metrics::parse(&text, name) {
                let sum = out.entry(name.to_string()).or_default();
                sum.sum += h.sum;
                sum.count += h.count;
                for (le, c) in h.buckets {
                    match sum.buckets.iter_mut().find(|(b, _)| *b == le) {
                        Some(b) => b.1 += c,
                        None => sum.buckets.push((le, c)),
                    }
                }
            }
        }
    }
    out
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let eps = endpoints(&args).await?;
    let mut conns = Vec::with_capacity(args.conns.max(1));
    for i in 0..args.conns.max(1) {
        let ep = &eps[i % eps.len()];
        conns.push(
            Conn::connect(ep)
                .await
                .with_context(|| format!("connect {ep}"))?,
        );
    }
    let _slow =
        streams::stalled_watchers(&eps, args.slow_watchers, args.slow_watcher_window).await?;
    if let Cmd::Hold = args.cmd {
        println!("holding");
        std::io::stdout().flush()?;
        match args.duration {
            Some(d) => tokio::time::sleep(Duration::from_secs_f64(d)).await,
            None => std::future::pending().await,
        }
        return Ok(());
    }
    let metrics_before = scrape_all(&eps).await;
    let cpu0 = cpu_seconds();
    let (outcomes, seconds) = match &args.cmd {
        Cmd::Watch {
            streams,
            watchers_per_stream,
            watched_key_total,
            put_total,
            put_rate,
            val_size,
        } => {
            let plan = streams::WatchPlan {
                streams: *streams,
                watchers_per_stream: *watchers_per_stream,
                keys: *watched_key_total,
                put_total: *put_total,
                put_rate: *put_rate,
                val_size: *val_size,
            };
            streams::watch(&conns, plan).await
        }
        Cmd::LeaseKeepalive { total, ttl } => {
            let issued = Arc::new(AtomicU64::new(0));
            let start = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..args.clients.max(1) {
                let conn = conns[c % conns.len()].clone();
                tasks.push(tokio::spawn(streams::keepalive_client(
                    conn,
                    issued.clone(),
                    *total,
                    *ttl,
                )));
            }
            let mut outs = Vec::new();
            for t in tasks {
                outs.push(t.await?);
            }
            (outs, start.elapsed().as_secs_f64())
        }
        _ => {
            // watch-get: the unsynced watchers must stay open while the ranges run.
            let _watchers = match &args.cmd {
                Cmd::WatchGet {
                    watchers,
                    streams,
                    history,
                    ..
                } => {
                    let key = Bytes::from_static(WATCH_GET_KEY.as_bytes());
                    streams::unsynced_watchers(&conns, &key, *history, *watchers, *streams)
                        .await
                        .map_err(|s| {
                            anyhow::anyhow!("watch-get setup: {}: {}", s.code_name(), s.message)
                        })?
                }
                _ => Vec::new(),
            };
            requests(&args, &conns).await?
        }
    };
    let cpu = cpu_seconds() - cpu0;
    let cores = if seconds > 1e-3 { cpu / seconds } else { 0.0 };
    let mut summary = report::Summary::merge(outcomes, seconds, cores)?;
    let metrics_after = scrape_all(&eps).await;
    for (name, after) in metrics_after {
        if let Some(before) = metrics_before.get(&name) {
            summary
                .server_metrics
                .insert(name, metrics::delta(before, &after));
        }
    }
    if let Some(path) = &args.samples {
        std::fs::write(path, summary.samples_text())
            .with_context(|| format!("write samples {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, report::svg(&summary))
            .with_context(|| format!("write plot {}", path.display()))?;
    }
    if args.json {
        println!("{}", summary.json());
    } else {
        print!("{}", summary.text());
    }
    Ok(())
}

/// The request loop shared by the unary workloads: clients pull request numbers until the
/// total or the deadline.
async fn requests(args: &Args, conns: &[Conn]) -> anyhow::Result<(Vec<Outcome>, f64)> {
    let (work, total) = plan(&args.cmd);
    let start = Instant::now();
    let limits = Arc::new(Limits {
        total: args.duration.is_none().then_some(total),
        deadline: args.duration.map(|d| start + Duration::from_secs_f64(d)),
        rate: args.rate,
        start,
    });
    let issued = Arc::new(AtomicU64::new(0));
    let progress = progress_bar(args, total);
    let ticker = {
        let (issued, progress, limits) = (issued.clone(), progress.clone(), limits.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                match limits.total {
                    Some(t) => progress.set_position(issued.load(Ordering::Relaxed).min(t)),
                    None => progress.set_position(limits.start.elapsed().as_secs()),
                }
            }
        })
    };
    let mut tasks = Vec::new();
    for c in 0..args.clients.max(1) {
        let conn = conns[c % conns.len()].clone();
        tasks.push(tokio::spawn(client(
            conn,
            work.clone(),
            issued.clone(),
            limits.clone(),
            c as u64 + 1,
        )));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await?);
    }
    let seconds = start.elapsed().as_secs_f64();
    ticker.abort();
    progress.finish_and_clear();
    Ok((outcomes, seconds))
}

fn progress_bar(args: &Args, total: u64) -> indicatif::ProgressBar {
    if args.json || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    match args.duration {
        Some(d) => indicatif::ProgressBar::new(d.ceil() as u64).with_message("seconds"),
        None => indicatif::ProgressBar::new(total),
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
