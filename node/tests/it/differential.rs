//! KV and lease semantics side by side with a live etcd 3.4: one seeded random history of
//! puts, deletes, ranges (every option), txns (every compare target and result, nested
//! txns), compactions and leases with chosen IDs is sent to both, one request at a time, and
//! every answer must be the same: the header's revision and every field, or the gRPC code
//! and message. `KEEL_DIFF_SEED` and `KEEL_DIFF_OPS` run other or longer histories.

use std::time::Duration;

use bytes::Bytes;
use keel_proto::pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

use crate::harness::{Keel, LiveEtcd};

/// Keys close together, so ranges, prefixes and from-key spans overlap.
const KEYS: &[&[u8]] = &[
    b"a", b"a\0", b"ab", b"abc", b"b", b"ba", b"c", b"k", b"k/1", b"k/2", b"z", b"\xff",
];
/// Few values, so value compares sometimes hold.
const VALUES: &[&[u8]] = &[b"", b"v1", b"v2", b"v3", b"a longer value of some bytes"];
/// Lease IDs the history grants, revokes and attaches (some never granted).
const LEASES: &[i64] = &[1000, 1001, 1002, 1003];

struct Clients {
    kv: pb::kv_client::KvClient<Channel>,
    lease: pb::lease_client::LeaseClient<Channel>,
}

impl Clients {
    async fn new(url: &str) -> Clients {
        let ch = crate::harness::channel(url).await;
        Clients {
            kv: pb::kv_client::KvClient::new(ch.clone()),
            lease: pb::lease_client::LeaseClient::new(ch),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Range(pb::RangeRequest),
    Put(pb::PutRequest),
    Delete(pb::DeleteRangeRequest),
    Txn(pb::TxnRequest),
    Compact(pb::CompactionRequest),
    Grant(pb::LeaseGrantRequest),
    Revoke(pb::LeaseRevokeRequest),
    TimeToLive(pb::LeaseTimeToLiveRequest),
    Leases,
}

/// What the history knows of the store (from etcd's answers).
struct Gen {
    rng: StdRng,
    rev: i64,
    compacted: i64,
}

impl Gen {
    fn key(&mut self) -> Bytes {
        if self.rng.gen_ratio(1, 40) {
            return Bytes::new();
        }
        Bytes::from_static(KEYS[self.rng.gen_range(0..KEYS.len())])
    }

    fn value(&mut self) -> Bytes {
        Bytes::from_static(VALUES[self.rng.gen_range(0..VALUES.len())])
    }

    fn lease(&mut self) -> i64 {
        LEASES[self.rng.gen_range(0..LEASES.len())]
    }

    /// A range end for `key`: one key, from the key on, its prefix, or up to another key
    /// (possibly before it: an empty span).
    fn range_end(&mut self, key: &[u8]) -> Bytes {
        match self.rng.gen_range(0..5) {
            0 | 1 => Bytes::new(),
            2 => Bytes::from_static(b"\0"),
            3 => prefix_end(key),
            _ => self.key(),
        }
    }

    /// A revision near the store's: current, recent, compacted, or in the future.
    fn revision(&mut self) -> i64 {
        match self.rng.gen_range(0..8) {
            0..=3 => 0,
            4 => self.rev,
            5 => self.rev + self.rng.gen_range(1..3),
            _ => self.rng.gen_range(1..=self.rev.max(1)),
        }
    }

    fn range(&mut self) -> pb::RangeRequest {
        let key = self.key();
        let range_end = self.range_end(&key);
        let bound = |g: &mut Gen| {
            if g.rng.gen_ratio(1, 5) {
                g.rng.gen_range(0..=g.rev + 1)
            } else {
                0
            }
        };
        pb::RangeRequest {
            key,
            range_end,
            limit: if self.rng.gen_ratio(1, 3) {
                self.rng.gen_range(-1..5)
            } else {
                0
            },
            revision: self.revision(),
            sort_order: self.rng.gen_range(0..3),
            sort_target: self.rng.gen_range(0..5),
            serializable: self.rng.gen(),
            keys_only: self.rng.gen_ratio(1, 4),
            count_only: self.rng.gen_ratio(1, 6),
            min_mod_revision: bound(self),
            max_mod_revision: bound(self),
            min_create_revision: bound(self),
            max_create_revision: bound(self),
        }
    }

    fn put(&mut self) -> pb::PutRequest {
        pb::PutRequest {
            key: self.key(),
            value: self.value(),
            lease: if self.rng.gen_ratio(1, 5) {
                self.lease()
            } else {
                0
            },
            prev_kv: self.rng.gen(),
            ignore_value: self.rng.gen_ratio(1, 12),
            ignore_lease: self.rng.gen_ratio(1, 12),
        }
    }

    fn delete(&mut self) -> pb::DeleteRangeRequest {
        let key = self.key();
        pb::DeleteRangeRequest {
            range_end: self.range_end(&key),
            key,
            prev_kv: self.rng.gen(),
        }
    }

    fn compare(&mut self) -> pb::Compare {
        use pb::compare::{CompareTarget, TargetUnion};
        let key = self.key();
        let range_end = if self.rng.gen_ratio(1, 4) {
            self.range_end(&key)
        } else {
            Bytes::new()
        };
        let rev = self.rng.gen_range(0..=self.rev + 1);
        let (target, union) = match self.rng.gen_range(0..5) {
            0 => (
                CompareTarget::Version,
                TargetUnion::Version(self.rng.gen_range(0..4)),
            ),
            1 => (CompareTarget::Create, TargetUnion::CreateRevision(rev)),
            2 => (CompareTarget::Mod, TargetUnion::ModRevision(rev)),
            3 => (CompareTarget::Value, TargetUnion::Value(self.value())),
            _ => (
                CompareTarget::Lease,
                TargetUnion::Lease(if self.rng.gen() { 0 } else { self.lease() }),
            ),
        };
        pb::Compare {
            result: self.rng.gen_range(0..4),
            target: target as i32,
            key,
            range_end,
            target_union: Some(union),
        }
    }

    fn request_op(&mut self, depth: u32) -> pb::RequestOp {
        use pb::request_op::Request;
        let request = match self.rng.gen_range(0..if depth < 2 { 7 } else { 6 }) {
            0 | 1 => Request::RequestPut(self.put()),
            2 | 3 => Request::RequestRange(self.range()),
            4 | 5 => Request::RequestDeleteRange(self.delete()),
            _ => Request::RequestTxn(self.txn(depth + 1)),
        };
        pb::RequestOp {
            request: Some(request),
        }
    }

    fn txn(&mut self, depth: u32) -> pb::TxnRequest {
        let n = self.rng.gen_range(0..3);
        let compare = (0..n).map(|_| self.compare()).collect();
        let n = self.rng.gen_range(0..4);
        let success = (0..n).map(|_| self.request_op(depth)).collect();
        let n = self.rng.gen_range(0..3);
        let failure = (0..n).map(|_| self.request_op(depth)).collect();
        pb::TxnRequest {
            compare,
            success,
            failure,
        }
    }

    fn op(&mut self) -> Op {
        match self.rng.gen_range(0..100) {
            0..=24 => Op::Put(self.put()),
            25..=44 => Op::Range(self.range()),
            45..=54 => Op::Delete(self.delete()),
            55..=84 => {
                let mut t = self.txn(0);
                if has_delete(&t) {
                    clear_ignores(&mut t);
                }
                Op::Txn(t)
            }
            85..=87 => {
                let revision = match self.rng.gen_range(0..6) {
                    0 => self.compacted.max(1),
                    1 => self.rev + 1,
                    _ => self.rng.gen_range(self.compacted.max(1)..=self.rev.max(1)),
                };
                Op::Compact(pb::CompactionRequest {
                    revision,
                    physical: self.rng.gen(),
                })
            }
            88..=91 => Op::Grant(pb::LeaseGrantRequest {
                id: self.lease(),
                ttl: if self.rng.gen_ratio(1, 10) {
                    9_000_000_001
                } else {
                    self.rng.gen_range(600..4000)
                },
            }),
            92..=95 => Op::Revoke(pb::LeaseRevokeRequest { id: self.lease() }),
            96..=98 => Op::TimeToLive(pb::LeaseTimeToLiveRequest {
                id: self.lease(),
                keys: self.rng.gen(),
            }),
            _ => Op::Leases,
        }
    }
}

fn has_delete(t: &pb::TxnRequest) -> bool {
    use pb::request_op::Request;
    t.success
        .iter()
        .chain(&t.failure)
        .any(|op| match &op.request {
            Some(Request::RequestDeleteRange(_)) => true,
            Some(Request::RequestTxn(inner)) => has_delete(inner),
            _ => false,
        })
}

/// etcd's duplicate-key check does not see a from-key delete (range end "\0"), and it checks
/// a txn's puts against the state before the txn: it then panics applying a put with
/// ignore_value or ignore_lease whose key such a delete earlier in the txn removed (found by
/// this test; `a_put_that_needs_a_key_its_txn_deleted_is_refused_whole` covers Keel's
/// answer). Histories sent to it leave those flags out of txns that delete.
fn clear_ignores(t: &mut pb::TxnRequest) {
    use pb::request_op::Request;
    for op in t.success.iter_mut().chain(t.failure.iter_mut()) {
        match &mut op.request {
            Some(Request::RequestPut(p)) => {
                p.ignore_value = false;
                p.ignore_lease = false;
            }
            Some(Request::RequestTxn(inner)) => clear_ignores(inner),
            _ => {}
        }
    }
}

/// etcd's prefix end: the key with its last byte below 0xff incremented ("\0" for none).
fn prefix_end(key: &[u8]) -> Bytes {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end.into();
        }
    }
    Bytes::from_static(b"\0")
}

/// A header as both servers must agree on it: the revision (IDs and term differ).
/// Returns its revision (0 without a header).
fn header(h: &mut Option<pb::ResponseHeader>) -> i64 {
    let Some(h) = h else { return 0 };
    h.cluster_id = 0;
    h.member_id = 0;
    h.raft_term = 0;
    h.revision
}

/// `header` for a txn's header and those of every response in it.
fn txn_headers(t: &mut pb::TxnResponse) -> i64 {
    use pb::response_op::Response;
    for r in &mut t.responses {
        match &mut r.response {
            Some(Response::ResponseRange(x)) => header(&mut x.header),
            Some(Response::ResponsePut(x)) => header(&mut x.header),
            Some(Response::ResponseDeleteRange(x)) => header(&mut x.header),
            Some(Response::ResponseTxn(x)) => txn_headers(x),
            None => 0,
        };
    }
    header(&mut t.header)
}

type Answer = Result<(i64, String), (tonic::Code, String)>;

fn answer<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    fix: impl FnOnce(&mut T) -> i64,
) -> Answer {
    match r {
        Ok(r) => {
            let mut r = r.into_inner();
            let rev = fix(&mut r);
            Ok((rev, format!("{r:?}")))
        }
        Err(s) => Err((s.code(), s.message().to_string())),
    }
}

/// Sends `op`; the answer with its header revision (0 when it has none).
async fn call(c: &mut Clients, op: &Op) -> Answer {
    match op.clone() {
        Op::Range(r) => answer(c.kv.range(r).await, |x| header(&mut x.header)),
        Op::Put(r) => answer(c.kv.put(r).await, |x| header(&mut x.header)),
        Op::Delete(r) => answer(c.kv.delete_range(r).await, |x| header(&mut x.header)),
        Op::Txn(r) => answer(c.kv.txn(r).await, txn_headers),
        Op::Compact(r) => answer(c.kv.compact(r).await, |x| header(&mut x.header)),
        Op::Grant(r) => answer(c.lease.lease_grant(r).await, |x| header(&mut x.header)),
        Op::Revoke(r) => answer(c.lease.lease_revoke(r).await, |x| header(&mut x.header)),
        Op::TimeToLive(r) => answer(c.lease.lease_time_to_live(r).await, |x| {
            // Seconds left move with the clock: only whether the lease is alive.
            x.ttl = x.ttl.signum();
            x.keys.sort();
            header(&mut x.header)
        }),
        Op::Leases => answer(c.lease.lease_leases(pb::LeaseLeasesRequest {}).await, |x| {
            // etcd lists them in map order.
            x.leases.sort_by_key(|l| l.id);
            header(&mut x.header)
        }),
    }
}

/// A txn with both a put and a range that cannot apply is refused for the first of them in
/// op order by etcd 3.6 (checkTxn) and by Keel, which serves 3.6's API; etcd 3.4 checks
/// every put before any range (checkRequests twice), so it names the put.
fn checked_in_3_6_order(op: &Op, keel: &Answer, etcd: &Answer) -> bool {
    let range_refusal = |a: &Answer| matches!(a, Err((_, m)) if m.starts_with("etcdserver: mvcc: required revision"));
    let put_refusal = |a: &Answer| {
        matches!(a, Err((_, m)) if m == "etcdserver: requested lease not found"
            || m == "etcdserver: key not found")
    };
    matches!(op, Op::Txn(_)) && range_refusal(keel) && put_refusal(etcd)
}

/// A number from the environment, or `default`.
fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A fresh live etcd and a fresh Keel side by side, with clients and a history generator.
struct Twins {
    seed: u64,
    g: Gen,
    e: Clients,
    k: Clients,
    etcd: LiveEtcd,
    keel: Keel,
}

impl Twins {
    async fn start(dir: &std::path::Path) -> Twins {
        let seed = env_or("KEEL_DIFF_SEED", 20261201);
        let etcd = LiveEtcd::start(dir).await;
        let keel = Keel::start_async(dir, &[]).await;
        Twins {
            seed,
            g: Gen {
                rng: StdRng::seed_from_u64(seed),
                rev: 1,
                compacted: 0,
            },
            e: Clients::new(&etcd.url).await,
            k: Clients::new(&keel.url()).await,
            etcd,
            keel,
        }
    }

    /// Sends `op` to both (etcd first); their answers must be equal, but for a txn refused
    /// in etcd 3.6's order (`checked_in_3_6_order`, returned as true). Returns etcd's answer.
    async fn both(&mut self, op: &Op, at: &str) -> (Answer, bool) {
        let seed = self.seed;
        let (want, got) = tokio::time::timeout(Duration::from_secs(20), async {
            (call(&mut self.e, op).await, call(&mut self.k, op).await)
        })
        .await
        .unwrap_or_else(|_| panic!("{at} (seed {seed}) timed out: {op:?}"));
        let reordered = checked_in_3_6_order(op, &got, &want);
        if !reordered {
            assert_eq!(
                got, want,
                "{at} (seed {seed}) answered differently (left Keel, right etcd): {op:?}"
            );
        }
        (want, reordered)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_histories_get_etcds_answers() {
    let ops = env_or("KEEL_DIFF_OPS", 1500) as usize;
    let dir = tempfile::tempdir().unwrap();
    let mut t = Twins::start(dir.path()).await;
    let seed = t.seed;
    let mut kinds = std::collections::BTreeMap::<String, (u32, u32)>::new();
    let mut reordered = 0;
    for i in 0..ops {
        let op = t.g.op();
        let (want, other_order) = t.both(&op, &format!("op {i}")).await;
        reordered += other_order as u32;
        let kind = format!("{op:?}").split('(').next().unwrap().to_string();
        let tally = kinds.entry(kind).or_default();
        match &want {
            Ok((rev, _)) => {
                tally.0 += 1;
                t.g.rev = t.g.rev.max(*rev);
                if let Op::Compact(c) = &op {
                    t.g.compacted = c.revision;
                }
            }
            Err(_) => tally.1 += 1,
        }
    }
    // The history reached what it is for: every kind answered both ways, and the store moved.
    eprintln!(
        "seed {seed}: (ok, err) per kind {kinds:?}; revision {}; {reordered} txns refused \
         for a range where etcd 3.4 names a put",
        t.g.rev
    );
    for kind in [
        "Put", "Range", "Delete", "Txn", "Compact", "Grant", "Revoke",
    ] {
        let (ok, err) = kinds.get(kind).copied().unwrap_or_default();
        assert!(ok > 0 && err > 0, "{kind}: {ok} answered, {err} refused");
    }
    assert!(t.g.rev > ops as i64 / 4, "revision {}", t.g.rev);
}

/// The txn that makes etcd 3.4 panic (see `clear_ignores`): a from-key delete, then (in a
/// nested txn, or beside it) a put keeping the deleted key's value or lease. Keel refuses it
/// whole, as it refuses any put that cannot apply, and stays up with the key untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_that_needs_a_key_its_txn_deleted_is_refused_whole() {
    use pb::request_op::Request;
    let dir = tempfile::tempdir().unwrap();
    let keel = Keel::start_async(dir.path(), &[]).await;
    let mut c = Clients::new(&keel.url()).await;
    let put = |ignore_value: bool, ignore_lease| pb::PutRequest {
        key: Bytes::from_static(b"x"),
        value: if ignore_value {
            Bytes::new()
        } else {
            Bytes::from_static(b"new")
        },
        ignore_value,
        ignore_lease,
        ..Default::default()
    };
    let rev =
        c.kv.put(pb::PutRequest {
            value: Bytes::from_static(b"old"),
            ..put(false, false)
        })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    for (ignore_value, ignore_lease) in [(true, false), (false, true)] {
        let txn = pb::TxnRequest {
            success: vec![
                pb::RequestOp {
                    request: Some(Request::RequestDeleteRange(pb::DeleteRangeRequest {
                        key: Bytes::from_static(b"x"),
                        range_end: Bytes::from_static(b"\0"),
                        ..Default::default()
                    })),
                },
                pb::RequestOp {
                    request: Some(Request::RequestPut(put(ignore_value, ignore_lease))),
                },
            ],
            ..Default::default()
        };
        let e = c.kv.txn(txn).await.unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (tonic::Code::InvalidArgument, "etcdserver: key not found")
        );
    }
    let r =
        c.kv.range(pb::RangeRequest {
            key: Bytes::from_static(b"x"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.header.unwrap().revision, rev, "nothing applied");
    assert_eq!(&r.kvs[0].value[..], b"old");
}

/// One watcher on one server: what it has received so far, as lines (each event on its own
/// line, so etcd's and Keel's different grouping of revisions into responses does not
/// matter; everything else a response says is kept).
type Trace = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

async fn open_watch(url: &str, create: pb::WatchCreateRequest) -> (Trace, impl Drop) {
    use pb::watch_request::RequestUnion;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(create)),
    })
    .await
    .unwrap();
    let mut c = pb::watch_client::WatchClient::new(crate::harness::channel(url).await);
    let mut responses = c
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let trace: Trace = Default::default();
    let t = trace.clone();
    let task = tokio::spawn(async move {
        let _keep_sending_side = tx;
        while let Ok(Some(r)) = responses.message().await {
            let mut t = t.lock().unwrap();
            if r.created || r.canceled || r.compact_revision != 0 || r.events.is_empty() {
                t.push(format!(
                    "created {} canceled {} compact {} reason {:?} events {}",
                    r.created,
                    r.canceled,
                    r.compact_revision,
                    r.cancel_reason,
                    r.events.len()
                ));
            }
            for e in r.events {
                t.push(format!("{e:?}"));
            }
        }
    });
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    (trace, Abort(task))
}

/// Watches side by side with a live etcd 3.4: watchers on keys, prefixes, spans and from-key
/// ranges, from now or from a past revision (below a compaction too), with filters and
/// previous values, opened before and during a seeded random history of puts, deletes,
/// txns and lease revokes; each must see exactly the events etcd's twin sees, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_watches_see_etcds_events() {
    use pb::watch_create_request::FilterType;
    let dir = tempfile::tempdir().unwrap();
    let mut t = Twins::start(dir.path()).await;
    let (seed, etcd_url, keel_url) = (t.seed, t.etcd.url.clone(), t.keel.url());
    let mut watchers = Vec::new();
    let mut guards = Vec::new();
    for step in 0..600 {
        if step % 20 == 0 {
            // Let etcd's catch-up (every 100 ms) finish before history is compacted away
            // under a watcher still catching up: which side of it a watcher lands on would
            // be timing, not semantics.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let rev = t.g.rng.gen_range(t.g.compacted.max(1)..=t.g.rev);
            let op = Op::Compact(pb::CompactionRequest {
                revision: rev,
                physical: true,
            });
            if t.both(&op, &format!("step {step}")).await.0.is_ok() {
                t.g.compacted = rev;
            }
        }
        if step % 4 == 0 {
            for _ in 0..t.g.rng.gen_range(1..4) {
                let key = t.g.key();
                let mut filters = Vec::new();
                if t.g.rng.gen_ratio(1, 5) {
                    filters.push(FilterType::Noput as i32);
                }
                if t.g.rng.gen_ratio(1, 5) {
                    filters.push(FilterType::Nodelete as i32);
                }
                let create = pb::WatchCreateRequest {
                    range_end: t.g.range_end(&key),
                    key,
                    start_revision: match t.g.rng.gen_range(0..3) {
                        0 => 0,
                        _ => t.g.rng.gen_range(1..=t.g.rev + 1),
                    },
                    filters,
                    prev_kv: t.g.rng.gen(),
                    ..Default::default()
                };
                let (we, ge) = open_watch(&etcd_url, create.clone()).await;
                let (wk, gk) = open_watch(&keel_url, create.clone()).await;
                guards.push((ge, gk));
                watchers.push((create, we, wk));
            }
        }
        let op = match t.g.rng.gen_range(0..10) {
            0..=3 => Op::Put(t.g.put()),
            4 | 5 => Op::Delete(t.g.delete()),
            6..=8 => {
                let mut t = t.g.txn(0);
                if has_delete(&t) {
                    clear_ignores(&mut t);
                }
                Op::Txn(t)
            }
            _ => match t.g.op() {
                op @ (Op::Grant(_) | Op::Revoke(_)) => op,
                _ => Op::Put(t.g.put()),
            },
        };
        if let (Ok((rev, _)), _) = t.both(&op, &format!("step {step}")).await {
            t.g.rev = t.g.rev.max(rev);
        }
    }
    // Everything delivered: no trace grows for a second (or 20 s pass).
    let total = |ws: &Vec<(pb::WatchCreateRequest, Trace, Trace)>| {
        ws.iter()
            .map(|(_, a, b)| a.lock().unwrap().len() + b.lock().unwrap().len())
            .sum::<usize>()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut last = usize::MAX;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = total(&watchers);
        if now == last {
            break;
        }
        last = now;
    }
    let mut events = 0;
    let mut canceled = 0;
    for (i, (create, we, wk)) in watchers.iter().enumerate() {
        let (want, got) = (we.lock().unwrap().clone(), wk.lock().unwrap().clone());
        for (n, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g, w,
                "watcher {i} (seed {seed}), line {n} (left Keel, right etcd): {create:?}"
            );
        }
        assert_eq!(
            got.len(),
            want.len(),
            "watcher {i} (seed {seed}): {} lines from Keel, {} from etcd: {create:?}",
            got.len(),
            want.len()
        );
        events += want.iter().filter(|l| l.starts_with("Event")).count();
        canceled += want.iter().any(|l| l.contains("canceled true")) as usize;
    }
    eprintln!(
        "seed {seed}: {} watchers, {events} events, {canceled} canceled by compaction; \
         revision {}",
        watchers.len(),
        t.g.rev
    );
    assert!(
        events > 1000 && canceled > 0,
        "{events} events, {canceled} canceled"
    );
    drop(guards);
}
