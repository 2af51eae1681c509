//! Workloads over gRPC streams, in the style of etcd's benchmark tool:
//! - `watch`: streams x watchers per stream on a set of keys, then puts at a fixed rate whose
//!   values carry their send time; reports event delivery latency (put sent -> event received).
//! - `watch-get`: many watchers left unsynced (started at revision 1 on a key with history),
//!   while clients range the key; reports range latency.
//! - `lease-keepalive`: each client grants a lease, then keeps it alive over one stream;
//!   reports keep-alive round trips.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use keel_proto::pb;

use crate::grpc::{Bidi, Conn, Status};
use crate::Outcome;

const WATCH: &str = "/etcdserverpb.Watch/Watch";

fn outcome() -> Outcome {
    Outcome {
        errors: BTreeMap::new(),
        error_max_us: 0,
        writes: 0,
        samples: Vec::new(),
    }
}

fn count_error(o: &mut Outcome, s: &Status) {
    *o.errors
        .entry(format!("{}: {}", s.code_name(), s.message))
        .or_insert(0) += 1;
}

fn watch_key(n: u64) -> Bytes {
    Bytes::from(format!("watch/{n:08}"))
}

/// Opens a watch stream and creates one watcher per key in `keys` (from `start_rev` if > 0);
/// waits until every watcher is confirmed.
async fn open_watchers(
    conn: &Conn,
    keys: &[Bytes],
    start_rev: i64,
) -> Result<Bidi<pb::WatchRequest, pb::WatchResponse>, Status> {
    let mut w = conn
        .bidi::<pb::WatchRequest, pb::WatchResponse>(WATCH)
        .await?;
    for key in keys {
        w.send(&pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: key.clone(),
                    start_revision: start_rev,
                    ..Default::default()
                },
            )),
        })?;
    }
    let mut created = 0;
    while created < keys.len() {
        match tokio::time::timeout(Duration::from_secs(10), w.recv()).await {
            Ok(Ok(Some(r))) => created += r.created as usize,
            Ok(Ok(None)) => return Err(Status::transport("watch stream ended")),
            Ok(Err(s)) => return Err(s),
            Err(_) => return Err(Status::transport("watch create timed out")),
        }
    }
    Ok(w)
}

/// `n` watchers on every key that are never read again, each on its own connection (a stream
/// nobody reads holds its connection's flow-control window): slow consumers, for a workload
/// to run beside. Each holds at most `window` bytes of events (its stream's and its
/// connection's flow-control window). They stay until the returned value is dropped.
pub async fn stalled_watchers(
    eps: &[String],
    n: usize,
    window: u32,
) -> anyhow::Result<Vec<(Conn, Bidi<pb::WatchRequest, pb::WatchResponse>)>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let conn = Conn::connect_with_window(&eps[i % eps.len()], window, window).await?;
        let mut w = conn
            .bidi::<pb::WatchRequest, pb::WatchResponse>(WATCH)
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", s.code_name(), s.message))?;
        w.send(&pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: Bytes::from_static(b"\0"),
                    range_end: Bytes::from_static(b"\0"),
                    ..Default::default()
                },
            )),
        })
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code_name(), s.message))?;
        match tokio::time::timeout(Duration::from_secs(10), w.recv()).await {
            Ok(Ok(Some(r))) if r.created => out.push((conn, w)),
            other => anyhow::bail!("slow watcher {i} not created: {other:?}"),
        }
    }
    Ok(out)
}

pub struct WatchPlan {
    pub streams: usize,
    pub watchers_per_stream: usize,
    pub keys: u64,
    pub put_total: u64,
    pub put_rate: u64,
    pub val_size: usize,
}

/// Runs the watch fan-out; returns the outcomes (event latencies) and the run's seconds.
pub async fn watch(conns: &[Conn], p: WatchPlan) -> (Vec<Outcome>, f64) {
    let keys = p.keys.max(1);
    let mut watchers_of_key = vec![0u64; keys as usize];
    let mut streams = Vec::new();
    let mut setup = outcome();
    for s in 0..p.streams.max(1) {
        let ks: Vec<Bytes> = (0..p.watchers_per_stream.max(1))
            .map(|j| {
                let k = ((s * p.watchers_per_stream + j) as u64) % keys;
                watchers_of_key[k as usize] += 1;
                watch_key(k)
            })
            .collect();
        match open_watchers(&conns[s % conns.len()], &ks, 0).await {
            Ok(w) => streams.push(w),
            Err(e) => {
                count_error(&mut setup, &e);
                return (vec![setup], 0.0);
            }
        }
    }
    let expected: u64 = (0..p.put_total)
        .map(|i| watchers_of_key[(i % keys) as usize])
        .sum();
    let received = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut readers = Vec::new();
    for mut w in streams {
        let (received, mut stop) = (received.clone(), stop_rx.clone());
        readers.push(tokio::spawn(async move {
            let mut o = outcome();
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    r = w.recv() => match r {
                        Ok(Some(resp)) => {
                            let now_ns = start.elapsed().as_nanos() as u64;
                            for ev in resp.events {
                                let v = ev.kv.map(|kv| kv.value).unwrap_or_default();
                                if v.len() >= 8 {
                                    let sent = u64::from_be_bytes(v[..8].try_into().unwrap());
                                    let us = now_ns.saturating_sub(sent) / 1000;
                                    o.samples.push(((sent / 1_000_000) as u32, us as u32));
                                }
                                received.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(None) => break,
                        Err(s) => { count_error(&mut o, &s); break; }
                    }
                }
            }
            o
        }));
    }
    let mut putter = outcome();
    let c = &conns[0];
    for i in 0..p.put_total {
        if p.put_rate > 0 {
            let at = start + Duration::from_secs_f64(i as f64 / p.put_rate as f64);
            tokio::time::sleep_until(at.into()).await;
        }
        let mut v = BytesMut::with_capacity(p.val_size.max(8));
        v.put_u64(start.elapsed().as_nanos() as u64);
        v.resize(p.val_size.max(8), b'v');
        let put = pb::PutRequest {
            key: watch_key(i % keys),
            value: v.freeze(),
            ..Default::default()
        };
        if let Err(s) = c
            .unary::<_, pb::PutResponse>("/etcdserverpb.KV/Put", &put)
            .await
        {
            count_error(&mut putter, &s);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    let mut outs = vec![putter];
    for r in readers {
        if let Ok(o) = r.await {
            outs.push(o);
        }
    }
    let missing = expected.saturating_sub(received.load(Ordering::Relaxed));
    if missing > 0 {
        outs[0].errors.insert(
            "missing watch events (not delivered in 10 s)".into(),
            missing,
        );
    }
    (outs, seconds)
}

/// Puts `history` versions of `key`, then leaves `watchers` unsynced watchers on it (from
/// revision 1) over `streams` streams. The returned streams must be kept open for the run.
pub async fn unsynced_watchers(
    conns: &[Conn],
    key: &Bytes,
    history: u64,
    watchers: usize,
    streams: usize,
) -> Result<Vec<Bidi<pb::WatchRequest, pb::WatchResponse>>, Status> {
    for i in 0..history {
        let put = pb::PutRequest {
            key: key.clone(),
            value: Bytes::from(i.to_string()),
            ..Default::default()
        };
        conns[0]
            .unary::<_, pb::PutResponse>("/etcdserverpb.KV/Put", &put)
            .await?;
    }
    let per = watchers.div_ceil(streams.max(1));
    let mut out = Vec::new();
    let mut left = watchers;
    for s in 0..streams.max(1) {
        let n = per.min(left);
        if n == 0 {
            break;
        }
        left -= n;
        let keys = vec![key.clone(); n];
        out.push(open_watchers(&conns[s % conns.len()], &keys, 1).await?);
    }
    Ok(out)
}

/// One lease keep-alive client: grant a lease, then `total` keep-alives on one stream (taking
/// turns with the other clients through `issued`).
pub async fn keepalive_client(conn: Conn, issued: Arc<AtomicU64>, total: u64, ttl: i64) -> Outcome {
    let mut o = outcome();
    let grant = pb::LeaseGrantRequest { ttl, id: 0 };
    let id = match conn
        .unary::<_, pb::LeaseGrantResponse>("/etcdserverpb.Lease/LeaseGrant", &grant)
        .await
    {
        Ok(r) => r.id,
        Err(s) => {
            count_error(&mut o, &s);
            return o;
        }
    };
    let mut stream = match conn
        .bidi::<pb::LeaseKeepAliveRequest, pb::LeaseKeepAliveResponse>(
            "/etcdserverpb.Lease/LeaseKeepAlive",
        )
        .await
    {
        Ok(s) => s,
        Err(s) => {
            count_error(&mut o, &s);
            return o;
        }
    };
    let start = Instant::now();
    while issued.fetch_add(1, Ordering::Relaxed) < total {
        let t = Instant::now();
        let r = match stream.send(&pb::LeaseKeepAliveRequest { id }) {
            Ok(()) => stream.recv().await,
            Err(s) => Err(s),
        };
        match r {
            Ok(Some(resp)) if resp.ttl > 0 => {
                let us = t.elapsed().as_micros().max(1) as u64;
                o.samples.push(((t - start).as_millis() as u32, us as u32));
            }
            Ok(Some(_)) => {
                *o.errors
                    .entry("lease expired (TTL <= 0)".into())
                    .or_insert(0) += 1;
                break;
            }
            Ok(None) => {
                count_error(&mut o, &Status::transport("keep-alive stream ended"));
                break;
            }
            Err(s) => {
                count_error(&mut o, &s);
                break;
            }
        }
    }
    let revoke = pb::LeaseRevokeRequest { id };
    let _ = conn
        .unary::<_, pb::LeaseRevokeResponse>("/etcdserverpb.Lease/LeaseRevoke", &revoke)
        .await;
    o
}
