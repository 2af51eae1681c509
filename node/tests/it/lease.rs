//! Leases end to end: etcdctl's lease commands, etcd's answers to bad lease calls (checked
//! against a live etcd), expiry deleting keys (seen by a watcher), keep-alive streams, and
//! leases surviving a restart.

use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_proto::pb;

use crate::harness::{channel, etcdctl, kv, Keel, LiveEtcd};

fn ok(ep: &str, args: &[&str]) -> String {
    let (success, out, err) = etcdctl(ep, args, None);
    assert!(success, "etcdctl {args:?}: {out}{err}");
    out
}

/// The hex lease ID etcdctl prints in "lease 694d... granted with TTL(Ns)".
fn granted(out: &str) -> String {
    out.split_whitespace().nth(1).unwrap().to_string()
}

#[test]
fn etcdctl_lease_commands() {
    for url_form in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let k = Keel::start(dir.path(), &[]);
        let ep = if url_form { k.url() } else { k.endpoint() };
        let out = ok(&ep, &["lease", "grant", "100"]);
        assert!(out.ends_with("granted with TTL(100s)\n"), "{out}");
        let id = granted(&out);
        ok(&ep, &["put", "--lease", &id, "svc/a", "1"]);
        ok(&ep, &["put", "--lease", &id, "svc/b", "2"]);
        let ttl = ok(&ep, &["lease", "timetolive", &id, "--keys"]);
        let want = format!("lease {id} granted with TTL(100s), remaining(");
        assert!(ttl.starts_with(&want), "{ttl}");
        assert!(ttl.ends_with("s), attached keys([svc/a svc/b])\n"), "{ttl}");
        assert_eq!(
            ok(&ep, &["lease", "keep-alive", "--once", &id]),
            format!("lease {id} keepalived with TTL(100)\n")
        );
        assert_eq!(
            ok(&ep, &["lease", "list"]),
            format!("found 1 leases\n{id}\n")
        );
        assert_eq!(
            ok(&ep, &["lease", "revoke", &id]),
            format!("lease {id} revoked\n")
        );
        assert_eq!(ok(&ep, &["get", "svc/", "--prefix"]), "");
        assert_eq!(
            ok(&ep, &["lease", "timetolive", &id]),
            format!("lease {id} already expired\n")
        );
        // A short lease: its key goes when it expires (min TTL 2 s here).
        let short = granted(&ok(&ep, &["lease", "grant", "1"]));
        ok(&ep, &["put", "--lease", &short, "eph", "x"]);
        assert_eq!(ok(&ep, &["get", "eph", "--print-value-only"]), "x\n");
        let started = Instant::now();
        while !ok(&ep, &["get", "eph"]).is_empty() {
            assert!(
                started.elapsed() < Duration::from_secs(6),
                "key outlived its lease"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(started.elapsed() >= Duration::from_millis(1500));
        assert_eq!(ok(&ep, &["lease", "list"]), "found 0 leases\n");
    }
}

/// Lease calls' answers, with the parts that differ by server (IDs, terms) left out.
async fn lease_answers(url: &str) -> Vec<String> {
    let ch = channel(url).await;
    let mut l = pb::lease_client::LeaseClient::new(ch);
    let mut c = kv(url);
    let mut out = Vec::new();
    let mut note = |what: &str, r: Result<String, tonic::Status>| {
        out.push(match r {
            Ok(s) => format!("{what}: {s}"),
            Err(e) => format!("{what}: {:?} {}", e.code(), e.message()),
        })
    };
    let grant = |id, ttl| pb::LeaseGrantRequest { id, ttl };
    let g = l.lease_grant(grant(7, 30)).await.map(|r| {
        let r = r.into_inner();
        format!(
            "id {} ttl {} rev {}",
            r.id,
            r.ttl,
            r.header.unwrap().revision
        )
    });
    note("grant 7", g);
    let again = l.lease_grant(grant(7, 30)).await.map(|_| String::new());
    note("grant 7 again", again);
    let huge = l
        .lease_grant(grant(8, 9_000_000_001))
        .await
        .map(|_| String::new());
    note("ttl too large", huge);
    let min = l.lease_grant(grant(9, 1)).await.map(|r| {
        let r = r.into_inner();
        format!("ttl {}", r.ttl)
    });
    note("ttl under the minimum", min);
    let r9 = l
        .lease_revoke(pb::LeaseRevokeRequest { id: 9 })
        .await
        .map(|_| String::new());
    note("revoke 9", r9);
    let revoke = l
        .lease_revoke(pb::LeaseRevokeRequest { id: 12345 })
        .await
        .map(|_| String::new());
    note("revoke unknown", revoke);
    let ttl = l
        .lease_time_to_live(pb::LeaseTimeToLiveRequest {
            id: 12345,
            keys: true,
        })
        .await
        .map(|r| {
            let r = r.into_inner();
            format!(
                "ttl {} granted {} keys {}",
                r.ttl,
                r.granted_ttl,
                r.keys.len()
            )
        });
    note("timetolive unknown", ttl);
    let put = |lease| pb::PutRequest {
        key: Bytes::from_static(b"k"),
        value: Bytes::from_static(b"v"),
        lease,
        ..Default::default()
    };
    note(
        "put with an unknown lease",
        c.put(put(12345)).await.map(|_| String::new()),
    );
    let txn = pb::TxnRequest {
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(put(12345))),
        }],
        ..Default::default()
    };
    note(
        "txn put with an unknown lease",
        c.txn(txn).await.map(|_| String::new()),
    );
    let leased = c
        .put(put(7))
        .await
        .map(|r| format!("rev {}", r.into_inner().header.unwrap().revision));
    note("put with lease 7", leased);
    // Keep-alives: a known lease gets its TTL, an unknown one 0.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::LeaseKeepAliveRequest { id: 7 }).await.unwrap();
    tx.send(pb::LeaseKeepAliveRequest { id: 12345 })
        .await
        .unwrap();
    let mut stream = l
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        let r = stream.message().await.unwrap().unwrap();
        note("keep-alive", Ok(format!("id {} ttl {}", r.id, r.ttl)));
    }
    let ttl = l
        .lease_time_to_live(pb::LeaseTimeToLiveRequest { id: 7, keys: true })
        .await
        .map(|r| {
            let r = r.into_inner();
            format!("granted {} keys {:?}", r.granted_ttl, r.keys)
        });
    note("timetolive 7", ttl);
    let revoked = l
        .lease_revoke(pb::LeaseRevokeRequest { id: 7 })
        .await
        .map(|r| format!("rev {}", r.into_inner().header.unwrap().revision));
    note("revoke 7", revoked);
    let gone = c
        .range(pb::RangeRequest {
            key: Bytes::from_static(b"k"),
            ..Default::default()
        })
        .await
        .map(|r| format!("count {}", r.into_inner().count));
    note("k after revoke", gone);
    let list = l
        .lease_leases(pb::LeaseLeasesRequest {})
        .await
        .map(|r| format!("{:?}", r.into_inner().leases));
    note("leases", list);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_answers_match_live_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = LiveEtcd::start(dir.path()).await;
    let want = lease_answers(&etcd.url).await;
    let kdir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(kdir.path(), &[]).await;
    let got = lease_answers(&k.url()).await;
    assert_eq!(got, want);
}

async fn all_keys(c: &mut pb::kv_client::KvClient<tonic::transport::Channel>) -> Vec<String> {
    c.range(pb::RangeRequest {
        key: Bytes::from_static(b"\0"),
        range_end: Bytes::from_static(b"\0"),
        keys_only: true,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .kvs
    .iter()
    .map(|kv| String::from_utf8(kv.key.to_vec()).unwrap())
    .collect()
}

/// Leases and their keys survive a restart; a lease whose TTL runs out after the restart still
/// takes its keys with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut k = Keel::start_async(dir.path(), &[]).await;
    let mut l = pb::lease_client::LeaseClient::new(channel(&k.url()).await);
    let grant = |id, ttl| pb::LeaseGrantRequest { id, ttl };
    l.lease_grant(grant(100, 600)).await.unwrap();
    l.lease_grant(grant(200, 3)).await.unwrap();
    let mut c = kv(&k.url());
    for (key, lease) in [
        ("long/a", 100),
        ("long/b", 100),
        ("short", 200),
        ("none", 0),
    ] {
        c.put(pb::PutRequest {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::from_static(b"v"),
            lease,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    tokio::task::block_in_place(|| {
        k.kill9();
        k.restart();
    });
    let mut l = pb::lease_client::LeaseClient::new(channel(&k.url()).await);
    let ttl = l
        .lease_time_to_live(pb::LeaseTimeToLiveRequest {
            id: 100,
            keys: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ttl.granted_ttl, 600);
    assert_eq!(ttl.keys, [&b"long/a"[..], b"long/b"]);
    let mut c = kv(&k.url());
    let started = Instant::now();
    while all_keys(&mut c).await.contains(&"short".to_string()) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "lease 200 never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(all_keys(&mut c).await, ["long/a", "long/b", "none"]);
    l.lease_revoke(pb::LeaseRevokeRequest { id: 100 })
        .await
        .unwrap();
    assert_eq!(all_keys(&mut c).await, ["none"]);
}

async fn next_event(events: &mut etcd_client::WatchStream) -> etcd_client::WatchResponse {
    tokio::time::timeout(Duration::from_secs(6), events.message())
        .await
        .expect("an event")
        .unwrap()
        .unwrap()
}

/// The guide's service registration (§5.2): a service registers under a lease and keeps it
/// alive; a prefix watcher sees it come, and go once the keep-alives stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_registration_with_lease_and_watch() {
    use etcd_client::{Client, EventType, PutOptions, WatchOptions};
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(dir.path(), &[]).await;
    let mut c = Client::connect([k.url()], None).await.unwrap();
    let (_w, mut events) = c
        .watch("/services/web/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let lease = c.lease_grant(2, None).await.unwrap().id();
    c.put(
        "/services/web/node1",
        "10.0.0.1:8080",
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    let (mut keeper, mut acks) = c.lease_keep_alive(lease).await.unwrap();
    // Keep it alive past its TTL.
    for _ in 0..6 {
        keeper.keep_alive().await.unwrap();
        let ack = acks.message().await.unwrap().unwrap();
        assert_eq!((ack.id(), ack.ttl()), (lease, 2));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let alive = c.get("/services/web/node1", None).await.unwrap();
    assert_eq!(alive.kvs().len(), 1, "kept alive past its TTL");
    // Stop: the registration goes within the TTL (plus the expiry scan).
    let put = next_event(&mut events).await;
    assert_eq!(put.events()[0].event_type(), EventType::Put);
    let gone = next_event(&mut events).await;
    assert_eq!(gone.events()[0].event_type(), EventType::Delete);
    assert_eq!(gone.events()[0].kv().unwrap().key(), b"/services/web/node1");
}

/// With etcd's lease checkpoints on, a restart resumes a lease from its last checkpoint (plus
/// the election timeout etcd's Promote adds), kept with the lease in the store; without them
/// it restarts at its full TTL (plus the same), as etcd 3.4 does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_leases_from_their_checkpoints() {
    for checkpoints in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let flags: &[&str] = if checkpoints {
            &[
                "--experimental-enable-lease-checkpoint",
                "--experimental-lease-checkpoint-interval",
                "1s",
            ]
        } else {
            &[]
        };
        let mut k = Keel::start_async(dir.path(), flags).await;
        let mut l = pb::lease_client::LeaseClient::new(channel(&k.url()).await);
        l.lease_grant(pb::LeaseGrantRequest { id: 7, ttl: 30 })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(4500)).await;
        tokio::task::block_in_place(|| {
            k.kill9();
            k.restart();
        });
        let mut l = pb::lease_client::LeaseClient::new(channel(&k.url()).await);
        let ttl = l
            .lease_time_to_live(pb::LeaseTimeToLiveRequest { id: 7, keys: false })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ttl.granted_ttl, 30);
        if checkpoints {
            // Checkpointed at 29, 28, 27 and maybe 26 s left; plus 1 s on promotion.
            assert!(
                (24..=28).contains(&ttl.ttl),
                "from its checkpoint: {}",
                ttl.ttl
            );
        } else {
            assert!((29..=31).contains(&ttl.ttl), "its full TTL: {}", ttl.ttl);
        }
    }
}
