//! Lock and election: etcdctl's client-side recipes (lock, elect) and the Lock and Election
//! gRPC services through the etcd-client crate, with waiters served in order and a lock never
//! reported held once its lease is gone.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, LockOptions, ProclaimOptions, ResignOptions};

use crate::harness::Keel;

fn etcdctl_bg(ep: &str, args: &[&str]) -> std::process::Child {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(ep)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn stop(mut c: std::process::Child) {
    // SIGTERM, so etcdctl closes its session (revokes its lease) as a user's Ctrl-C would.
    let _ = Command::new("kill").arg(c.id().to_string()).status();
    c.stdout.take();
    let _ = c.wait();
}

/// Reads the child's stdout so far without waiting for it to end.
fn lines_so_far(c: &mut std::process::Child, wait: Duration) -> String {
    use std::io::Read;
    let out = c.stdout.as_mut().unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(out);
    // SAFETY: fcntl on a pipe fd we own; only sets O_NONBLOCK.
    unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
    std::thread::sleep(wait);
    let mut buf = [0u8; 4096];
    match out.read(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(_) => String::new(),
    }
}

#[test]
fn etcdctl_lock_and_elect() {
    for url_form in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let k = Keel::start(dir.path(), &[]);
        let ep = if url_form { k.url() } else { k.endpoint() };
        let mut first = etcdctl_bg(&ep, &["lock", "mylock"]);
        let got = lines_so_far(&mut first, Duration::from_millis(800));
        assert!(got.starts_with("mylock/"), "{got:?}");
        let mut second = etcdctl_bg(&ep, &["lock", "mylock"]);
        assert_eq!(
            lines_so_far(&mut second, Duration::from_millis(800)),
            "",
            "the second contender waits while the first holds the lock"
        );
        stop(first);
        let got = lines_so_far(&mut second, Duration::from_millis(1500));
        assert!(got.starts_with("mylock/"), "second gets it after: {got:?}");
        stop(second);

        let mut c1 = etcdctl_bg(&ep, &["elect", "myelection", "p1"]);
        let got = lines_so_far(&mut c1, Duration::from_millis(800));
        assert!(
            got.starts_with("myelection/") && got.ends_with("\np1\n"),
            "{got:?}"
        );
        let mut c2 = etcdctl_bg(&ep, &["elect", "myelection", "p2"]);
        let mut observer = etcdctl_bg(&ep, &["elect", "-l", "myelection"]);
        let seen = lines_so_far(&mut observer, Duration::from_millis(800));
        assert!(seen.ends_with("\np1\n"), "{seen:?}");
        assert_eq!(lines_so_far(&mut c2, Duration::from_millis(100)), "");
        stop(c1);
        let got = lines_so_far(&mut c2, Duration::from_millis(1500));
        assert!(
            got.ends_with("\np2\n"),
            "p2 leads after p1 resigns: {got:?}"
        );
        let seen = lines_so_far(&mut observer, Duration::from_millis(300));
        assert!(seen.ends_with("\np2\n"), "the observer follows: {seen:?}");
        stop(c2);
        stop(observer);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_service_through_the_etcd_client_crate() {
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(dir.path(), &[]).await;
    let mut c = Client::connect([k.url()], None).await.unwrap();
    let l1 = c.lease_grant(30, None).await.unwrap().id();
    let l2 = c.lease_grant(2, None).await.unwrap().id();
    let held = c
        .lock("job", Some(LockOptions::new().with_lease(l1)))
        .await
        .unwrap();
    let key1 = held.key().to_vec();
    assert_eq!(key1, format!("job/{l1:x}").into_bytes());
    // The second waits for the first...
    let mut c2 = c.clone();
    let waiter = tokio::spawn(async move {
        let r = c2
            .lock("job", Some(LockOptions::new().with_lease(l2)))
            .await;
        (Instant::now(), r.map(|r| r.key().to_vec()))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiter.is_finished());
    // ...but its own lease (2 s, never kept alive) runs out while it waits: once the first
    // unlocks, the second must not be told it holds the lock.
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.unlock(key1).await.unwrap();
    let (_, r) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    // etcd's server returns concurrency's ErrSessionExpired, a plain error: code Unknown.
    let e = r.expect_err("a lock whose lease expired is never held");
    let text = format!("{e:?}");
    assert!(
        text.contains("mutex: session is expired") && text.contains("Unknown"),
        "{text}"
    );
    // A waiter whose client gives up (its call is cancelled) leaves no key in the queue.
    let l4 = c.lease_grant(30, None).await.unwrap().id();
    let blocker = c
        .lock("gate", Some(LockOptions::new().with_lease(l1)))
        .await
        .unwrap();
    let mut c4 = c.clone();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(500),
        c4.lock("gate", Some(LockOptions::new().with_lease(l4))),
    )
    .await;
    assert!(gave_up.is_err(), "it waits behind the holder");
    let queued = format!("gate/{l4:x}");
    let started = Instant::now();
    while !c.get(queued.clone(), None).await.unwrap().kvs().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the waiter's key stayed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.unlock(blocker.key()).await.unwrap();
    // A third contender with a live lease gets it at once.
    let l3 = c.lease_grant(30, None).await.unwrap().id();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        c.lock("job", Some(LockOptions::new().with_lease(l3))),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(r.key(), format!("job/{l3:x}").as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_service_through_the_etcd_client_crate() {
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(dir.path(), &[]).await;
    let mut c = Client::connect([k.url()], None).await.unwrap();
    let e = c.leader("svc").await.unwrap_err().to_string();
    assert!(e.contains("election: no leader"), "{e}");
    let l1 = c.lease_grant(30, None).await.unwrap().id();
    let l2 = c.lease_grant(30, None).await.unwrap().id();
    let won = c.campaign("svc", "a", l1).await.unwrap();
    let leader1 = won.leader().unwrap().clone();
    assert_eq!(leader1.key(), format!("svc/{l1:x}").as_bytes());
    let mut obs = c.observe("svc").await.unwrap();
    let first = obs.message().await.unwrap().unwrap();
    assert_eq!(first.kv().unwrap().value(), b"a");
    c.proclaim(
        "a2",
        Some(ProclaimOptions::new().with_leader(leader1.clone())),
    )
    .await
    .unwrap();
    let changed = obs.message().await.unwrap().unwrap();
    assert_eq!(changed.kv().unwrap().value(), b"a2");
    assert_eq!(c.leader("svc").await.unwrap().kv().unwrap().value(), b"a2");
    // A second candidate waits, then leads once the first resigns.
    let mut c2 = c.clone();
    let second = tokio::spawn(async move { c2.campaign("svc", "b", l2).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!second.is_finished());
    c.resign(Some(ResignOptions::new().with_leader(leader1.clone())))
        .await
        .unwrap();
    let won2 = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        won2.leader().unwrap().key(),
        format!("svc/{l2:x}").as_bytes()
    );
    let next = obs.message().await.unwrap().unwrap();
    assert_eq!(next.kv().unwrap().value(), b"b");
    // The old leader can no longer proclaim.
    let e = c
        .proclaim("x", Some(ProclaimOptions::new().with_leader(leader1)))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("election: not leader"), "{e}");
}

/// What etcd's Lock and Election services answer where they differ from its KV service: every
/// error comes back as gRPC Unknown with etcd's text (etcd relays its own client's error as a
/// plain error) unless grpc refused the request first, and a repeated Campaign answers with its
/// own transaction's header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_election_answer_as_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(dir.path(), &[]).await;
    let mut c = Client::connect([k.url()], None).await.unwrap();
    let unknown = |e: etcd_client::Error| match e {
        etcd_client::Error::GRpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("not a gRPC status: {other:?}"),
    };
    let lease_not_found = (
        tonic::Code::Unknown,
        "etcdserver: requested lease not found".to_string(),
    );
    let e = c
        .lock("job", Some(LockOptions::new().with_lease(0x1234)))
        .await
        .unwrap_err();
    assert_eq!(unknown(e), lease_not_found);
    let e = c.campaign("svc", "a", 0x1234).await.unwrap_err();
    assert_eq!(unknown(e), lease_not_found);
    let e = c.unlock("").await.unwrap_err();
    assert_eq!(
        unknown(e),
        (
            tonic::Code::Unknown,
            "etcdserver: key is not provided".to_string()
        )
    );
    // Over grpc's receive limit, grpc itself refuses it (ResourceExhausted), as etcd's.
    let huge = "n".repeat(2_600_000);
    let e = c.lock(huge, None).await.unwrap_err();
    let (code, msg) = unknown(e);
    assert_eq!(code, tonic::Code::ResourceExhausted, "{msg}");
    assert!(
        msg.starts_with("grpc: received message larger than max"),
        "{msg}"
    );
    // A second campaign with the same lease and a new value proclaims it, and answers with
    // the header of its transaction, from before the proclaim.
    let l = c.lease_grant(30, None).await.unwrap().id();
    let first = c.campaign("svc", "a", l).await.unwrap();
    let leader = first.leader().unwrap().clone();
    let again = c.campaign("svc", "b", l).await.unwrap();
    assert_eq!(again.leader().unwrap().rev(), leader.rev());
    assert_eq!(again.header().unwrap().revision(), leader.rev());
    let now = c.get(leader.key(), None).await.unwrap();
    assert_eq!(now.kvs()[0].value(), b"b");
    assert_eq!(now.kvs()[0].mod_revision(), leader.rev() + 1);
}
