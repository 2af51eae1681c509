//! Kubernetes-style traffic, as kube-apiserver drives its store: optimistic updates (txn on
//! mod_revision, else read the key), paginated lists at one revision with continuation, a
//! prefix watch from rev+1 with prev_kv and progress requests, and the compaction loop (CAS on
//! compact_rev_key, then Compact). Checked against a model: no update lost or duplicated,
//! the watcher's view is the history, every list is consistent at its revision.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_proto::pb;
use keel_proto::pb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_proto::pb::request_op::Request;
use keel_proto::pb::response_op::Response;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::harness::{channel, kv, Keel};

type Kv = pb::kv_client::KvClient<tonic::transport::Channel>;

const OBJECTS: usize = 8;
const PREFIX: &str = "/registry/pods/default/";

fn key(i: usize) -> Bytes {
    Bytes::from(format!("{PREFIX}p{i}"))
}

fn op(r: Request) -> pb::RequestOp {
    pb::RequestOp { request: Some(r) }
}

async fn get(c: &mut Kv, i: usize) -> keel_proto::mvccpb::KeyValue {
    let r = c
        .range(pb::RangeRequest {
            key: key(i),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    r.kvs.into_iter().next().expect("the object exists")
}

/// kube's OptimisticPut: if the key's mod_revision is still `rev`, write; else read it back.
/// Returns the new (value, mod_revision) on success, or the current ones.
async fn optimistic_put(c: &mut Kv, k: Bytes, rev: i64, value: i64) -> (bool, i64, i64) {
    let r = c
        .txn(pb::TxnRequest {
            compare: vec![pb::Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Mod as i32,
                key: k.clone(),
                target_union: Some(TargetUnion::ModRevision(rev)),
                ..Default::default()
            }],
            success: vec![op(Request::RequestPut(pb::PutRequest {
                key: k.clone(),
                value: Bytes::from(value.to_string()),
                ..Default::default()
            }))],
            failure: vec![op(Request::RequestRange(pb::RangeRequest {
                key: k,
                ..Default::default()
            }))],
        })
        .await
        .unwrap()
        .into_inner();
    if r.succeeded {
        return (true, value, r.header.unwrap().revision);
    }
    let Some(Response::ResponseRange(rr)) = &r.responses[0].response else {
        panic!("else branch reads the key");
    };
    let kv = &rr.kvs[0];
    let v = String::from_utf8(kv.value.to_vec())
        .unwrap()
        .parse()
        .unwrap();
    (false, v, kv.mod_revision)
}

/// A paginated list of the prefix, 3 per page, all at the first page's revision; restarts if
/// kube's OptimisticDelete: if the key's mod_revision is still `rev`, delete it (with its
/// previous version); else read it back. Returns whether it deleted, and the version deleted
/// or the current one.
async fn optimistic_delete(c: &mut Kv, k: Bytes, rev: i64) -> (bool, keel_proto::mvccpb::KeyValue) {
    let r = c
        .txn(pb::TxnRequest {
            compare: vec![pb::Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Mod as i32,
                key: k.clone(),
                target_union: Some(TargetUnion::ModRevision(rev)),
                ..Default::default()
            }],
            success: vec![op(Request::RequestDeleteRange(pb::DeleteRangeRequest {
                key: k.clone(),
                prev_kv: true,
                ..Default::default()
            }))],
            failure: vec![op(Request::RequestRange(pb::RangeRequest {
                key: k,
                ..Default::default()
            }))],
        })
        .await
        .unwrap()
        .into_inner();
    match &r.responses[0].response {
        Some(Response::ResponseDeleteRange(d)) if r.succeeded => {
            assert_eq!(d.deleted, 1);
            (true, d.prev_kvs[0].clone())
        }
        Some(Response::ResponseRange(rr)) if !r.succeeded => (false, rr.kvs[0].clone()),
        other => panic!("unexpected txn answer: {other:?}"),
    }
}

/// a compaction overtakes it (kube's "continue token expired"). Checks it against one Range
/// at the same revision.
async fn paginated_list(c: &mut Kv) -> usize {
    'again: loop {
        let mut rev = 0;
        let mut from = Bytes::from(PREFIX);
        let mut items = Vec::new();
        let mut count = None;
        loop {
            let page = c
                .range(pb::RangeRequest {
                    key: from.clone(),
                    range_end: Bytes::from("/registry/pods/default0"),
                    limit: 3,
                    revision: rev,
                    ..Default::default()
                })
                .await;
            let page = match page {
                Ok(p) => p.into_inner(),
                Err(e) if e.message().contains("compacted") => continue 'again,
                Err(e) => panic!("{e}"),
            };
            if rev == 0 {
                rev = page.header.unwrap().revision;
                count = Some(page.count);
            }
            items.extend(page.kvs.iter().cloned());
            if !page.more {
                break;
            }
            let mut next = page.kvs.last().unwrap().key.to_vec();
            next.push(0);
            from = Bytes::from(next);
        }
        let whole = match c
            .range(pb::RangeRequest {
                key: Bytes::from(PREFIX),
                range_end: Bytes::from("/registry/pods/default0"),
                revision: rev,
                ..Default::default()
            })
            .await
        {
            Ok(w) => w.into_inner(),
            Err(e) if e.message().contains("compacted") => continue 'again,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            items, whole.kvs,
            "a paginated list at {rev} equals one range"
        );
        assert_eq!(count, Some(whole.count));
        return items.len();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_style_traffic_against_a_model() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(dir.path(), &[]).await;
    let url = k.url();
    let mut c = kv(&url);
    let mut start = 0;
    for i in 0..OBJECTS {
        let r = c
            .put(pb::PutRequest {
                key: key(i),
                value: Bytes::from("0"),
                ..Default::default()
            })
            .await
            .unwrap();
        start = r.into_inner().header.unwrap().revision;
    }
    // The watch cache: from start+1, with prev_kv and progress notify.
    let (wtx, wrx) = mpsc::channel(16);
    let mut wc = pb::watch_client::WatchClient::new(channel(&url).await);
    wtx.send(pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: Bytes::from(PREFIX),
                range_end: Bytes::from("/registry/pods/default0"),
                start_revision: start + 1,
                prev_kv: true,
                progress_notify: true,
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let mut events = wc
        .watch(ReceiverStream::new(wrx))
        .await
        .unwrap()
        .into_inner();
    let updates = Arc::new(std::sync::Mutex::new(vec![0i64; OBJECTS]));
    // The highest revision compacted so far: only an event at or below it may lack prev_kv.
    let compacted = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let mut tasks = Vec::new();
    for u in 0..4u64 {
        let (url, updates) = (url.clone(), updates.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = kv(&url);
            let mut rng = rand::rngs::StdRng::seed_from_u64(u);
            for _ in 0..60 {
                let i = rng.gen_range(0..OBJECTS);
                let kv = get(&mut c, i).await;
                let (mut v, mut rev) = (
                    String::from_utf8(kv.value.to_vec())
                        .unwrap()
                        .parse::<i64>()
                        .unwrap(),
                    kv.mod_revision,
                );
                loop {
                    let (ok, nv, nrev) = optimistic_put(&mut c, key(i), rev, v + 1).await;
                    if ok {
                        updates.lock().unwrap()[i] += 1;
                        break;
                    }
                    (v, rev) = (nv, nrev);
                }
            }
        }));
    }
    // Lists, and the compaction loop, while updates run.
    let lister = {
        let url = url.clone();
        tokio::spawn(async move {
            let mut c = kv(&url);
            for _ in 0..30 {
                assert_eq!(paginated_list(&mut c).await, OBJECTS);
            }
        })
    };
    let compactor = {
        let (url, compacted) = (url.clone(), compacted.clone());
        tokio::spawn(async move {
            let mut c = kv(&url);
            let (mut version, mut last) = (0i64, 0i64);
            for _ in 0..8 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                let cur = c
                    .range(pb::RangeRequest {
                        key: Bytes::from("compact_rev_key"),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .header
                    .unwrap()
                    .revision;
                let r = c
                    .txn(pb::TxnRequest {
                        compare: vec![pb::Compare {
                            result: CompareResult::Equal as i32,
                            target: CompareTarget::Version as i32,
                            key: Bytes::from("compact_rev_key"),
                            target_union: Some(TargetUnion::Version(version)),
                            ..Default::default()
                        }],
                        success: vec![op(Request::RequestPut(pb::PutRequest {
                            key: Bytes::from("compact_rev_key"),
                            value: Bytes::from(cur.to_string()),
                            ..Default::default()
                        }))],
                        failure: vec![],
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(r.succeeded, "only this loop writes compact_rev_key");
                version += 1;
                if last > 0 {
                    c.compact(pb::CompactionRequest {
                        revision: last,
                        physical: false,
                    })
                    .await
                    .unwrap();
                    compacted.fetch_max(last, std::sync::atomic::Ordering::SeqCst);
                }
                last = cur;
            }
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    lister.await.unwrap();
    compactor.await.unwrap();
    let totals = updates.lock().unwrap().clone();
    assert_eq!(totals.iter().sum::<i64>(), 240);
    // The store: each object's value is the number of its successful updates.
    for (i, n) in totals.iter().enumerate() {
        assert_eq!(
            get(&mut c, i).await.value,
            n.to_string().as_bytes(),
            "object {i}"
        );
    }
    // OptimisticDelete of half the objects: a stale revision reads the object back, the
    // current one deletes it and returns what it deleted.
    let mut deleted = vec![false; OBJECTS];
    for (i, gone) in deleted.iter_mut().enumerate().take(OBJECTS / 2) {
        let kv = get(&mut c, i).await;
        let (ok, current) = optimistic_delete(&mut c, key(i), kv.mod_revision - 1).await;
        assert!(!ok, "a stale delete of object {i} applied");
        assert_eq!(current, kv);
        let (ok, prev) = optimistic_delete(&mut c, key(i), kv.mod_revision).await;
        assert!(ok, "object {i} not deleted");
        assert_eq!(prev, kv);
        *gone = true;
    }
    let live = OBJECTS - OBJECTS / 2;
    assert_eq!(paginated_list(&mut c).await, live);
    // kube's Count (count-only) and a keys-only list of the same range.
    let range = |count_only: bool, keys_only: bool| pb::RangeRequest {
        key: Bytes::from(PREFIX),
        range_end: Bytes::from("/registry/pods/default0"),
        count_only,
        keys_only,
        ..Default::default()
    };
    let counted = c.range(range(true, false)).await.unwrap().into_inner();
    assert_eq!((counted.count, counted.kvs.len()), (live as i64, 0));
    let keys = c.range(range(false, true)).await.unwrap().into_inner();
    let want: Vec<Bytes> = (OBJECTS / 2..OBJECTS).map(key).collect();
    let got: Vec<Bytes> = keys.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(got, want);
    assert!(keys
        .kvs
        .iter()
        .all(|kv| kv.value.is_empty() && kv.mod_revision > 0));
    // The watcher: every update of every object once, in order, with its previous value,
    // then the deletes; progress vouches for what came before it.
    let mut seen = vec![0i64; OBJECTS];
    let mut seen_deleted = vec![false; OBJECTS];
    let mut with_prev = 0;
    let mut last_rev = start;
    let mut progress_asked = false;
    loop {
        let r = match tokio::time::timeout(Duration::from_secs(5), events.message()).await {
            Ok(r) => r.unwrap().unwrap(),
            Err(_) => panic!("watch stalled: seen {seen:?} of {totals:?}"),
        };
        if r.watch_id == -1 {
            assert_eq!(seen, totals, "progress came before events it covers");
            assert_eq!(seen_deleted, deleted, "progress came before the deletes");
            assert!(r.header.unwrap().revision >= last_rev);
            break;
        }
        for e in &r.events {
            let kv = e.kv.as_ref().unwrap();
            assert!(kv.mod_revision > last_rev, "in order, once");
            last_rev = kv.mod_revision;
            let i: usize = std::str::from_utf8(&kv.key[PREFIX.len() + 1..])
                .unwrap()
                .parse()
                .unwrap();
            // prev_kv is gone only if the compaction loop overtook the event (as in etcd).
            let prev = match &e.prev_kv {
                Some(p) => {
                    with_prev += 1;
                    Some(
                        std::str::from_utf8(&p.value)
                            .unwrap()
                            .parse::<i64>()
                            .unwrap(),
                    )
                }
                None => {
                    let c = compacted.load(std::sync::atomic::Ordering::SeqCst);
                    assert!(
                        kv.mod_revision <= c,
                        "an event at {} above every compaction ({c}) without prev_kv",
                        kv.mod_revision
                    );
                    None
                }
            };
            if let Some(p) = prev {
                assert_eq!(p, seen[i], "object {i}'s previous value");
            }
            if e.r#type == keel_proto::mvccpb::event::EventType::Delete as i32 {
                assert!(deleted[i] && !seen_deleted[i], "object {i}: one delete");
                assert_eq!(seen[i], totals[i], "object {i} deleted after its updates");
                seen_deleted[i] = true;
                continue;
            }
            assert!(!seen_deleted[i], "object {i} written after its delete");
            let v: i64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
            assert_eq!(v, seen[i] + 1, "object {i}: every update once, in order");
            seen[i] = v;
        }
        if seen == totals && seen_deleted == deleted && !progress_asked {
            progress_asked = true;
            wtx.send(pb::WatchRequest {
                request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
                    pb::WatchProgressRequest {},
                )),
            })
            .await
            .unwrap();
        }
    }
    assert!(with_prev > 0, "no event carried prev_kv");
}

/// kube-apiserver's event leases: one lease of 3660 s (an hour and a minute) shared by the
/// events written in the same minute; its keys and TTL read back as etcd reports them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_leases_of_3660_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(dir.path(), &[]).await;
    let mut c = kv(&k.url());
    let mut leases = pb::lease_client::LeaseClient::new(channel(&k.url()).await);
    let lease = leases
        .lease_grant(pb::LeaseGrantRequest { ttl: 3660, id: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((lease.ttl, lease.error.as_str()), (3660, ""));
    let events: Vec<Bytes> = (0..3)
        .map(|i| Bytes::from(format!("/registry/events/default/pod-{i}.17f0")))
        .collect();
    for e in &events {
        c.put(pb::PutRequest {
            key: e.clone(),
            value: Bytes::from("event"),
            lease: lease.id,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let ttl = leases
        .lease_time_to_live(pb::LeaseTimeToLiveRequest {
            id: lease.id,
            keys: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ttl.granted_ttl, 3660);
    assert!((3600..=3660).contains(&ttl.ttl), "ttl {}", ttl.ttl);
    let mut keys: Vec<Bytes> = ttl.keys.into_iter().collect();
    keys.sort();
    assert_eq!(keys, events);
    let listed = c
        .range(pb::RangeRequest {
            key: Bytes::from("/registry/events/"),
            range_end: Bytes::from("/registry/events0"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.kvs.iter().all(|kv| kv.lease == lease.id));
    assert_eq!(listed.count, 3);
}
