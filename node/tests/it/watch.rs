//! Watch, end to end: the same raw gRPC sessions against keel and a live etcd 3.4 must give the
//! same responses; history, compaction, fragments, progress, slow watchers, etcdctl and the
//! etcd-client crate.

use std::time::Duration;

use bytes::Bytes;
use keel_proto::pb;
use keel_proto::pb::watch_create_request::FilterType;
use keel_proto::pb::watch_request::RequestUnion;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::harness::{channel, etcdctl, kv, txn_put, Keel, LiveEtcd};

type Kv = pb::kv_client::KvClient<tonic::transport::Channel>;

/// One open Watch stream: requests in, responses out.
struct Session {
    tx: mpsc::Sender<pb::WatchRequest>,
    /// The call, until its response stream is needed: etcd (grpc-go) answers the call only
    /// with its first message, so requests must flow before the call resolves.
    call: Option<tokio::task::JoinHandle<Streaming<pb::WatchResponse>>>,
    rx: Option<Streaming<pb::WatchResponse>>,
}

impl Session {
    async fn open(url: &str) -> Session {
        let (tx, rrx) = mpsc::channel(64);
        let mut c = pb::watch_client::WatchClient::new(channel(url).await)
            .max_decoding_message_size(usize::MAX);
        let call = tokio::spawn(async move {
            c.watch(ReceiverStream::new(rrx))
                .await
                .expect("watch call")
                .into_inner()
        });
        Session {
            tx,
            call: Some(call),
            rx: None,
        }
    }

    async fn send(&self, u: RequestUnion) {
        let req = pb::WatchRequest {
            request_union: Some(u),
        };
        self.tx.send(req).await.expect("stream open");
    }

    async fn create(&self, c: pb::WatchCreateRequest) {
        self.send(RequestUnion::CreateRequest(c)).await;
    }

    async fn cancel(&self, watch_id: i64) {
        self.send(RequestUnion::CancelRequest(pb::WatchCancelRequest {
            watch_id,
        }))
        .await;
    }

    async fn progress(&self) {
        self.send(RequestUnion::ProgressRequest(
            pb::WatchProgressRequest::default(),
        ))
        .await;
    }

    /// The next response, or None after `wait` without one.
    async fn next(&mut self, wait: Duration) -> Option<pb::WatchResponse> {
        if let Some(call) = self.call.take() {
            // The call itself is not what `wait` times: give it time on a loaded machine.
            let limit = wait.max(Duration::from_secs(10));
            match tokio::time::timeout(limit, call).await {
                Ok(rx) => self.rx = Some(rx.expect("watch call")),
                Err(_) => panic!("the watch call was not answered in {limit:?}"),
            }
        }
        let rx = self.rx.as_mut().expect("set above");
        match tokio::time::timeout(wait, rx.message()).await {
            Ok(Ok(Some(r))) => Some(r),
            Ok(other) => panic!("watch stream ended: {other:?}"),
            Err(_) => None,
        }
    }

    /// Every response until the stream is quiet for `QUIET`.
    async fn settle(&mut self) -> Vec<pb::WatchResponse> {
        let mut out = Vec::new();
        while let Some(r) = self.next(QUIET).await {
            out.push(r);
        }
        out
    }
}

const QUIET: Duration = Duration::from_millis(400);

fn create(key: &str, end: &str) -> pb::WatchCreateRequest {
    pb::WatchCreateRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        range_end: Bytes::copy_from_slice(end.as_bytes()),
        ..Default::default()
    }
}

async fn put(c: &mut Kv, k: &str, v: &str) -> i64 {
    let r = c
        .put(pb::PutRequest {
            key: Bytes::copy_from_slice(k.as_bytes()),
            value: Bytes::copy_from_slice(v.as_bytes()),
            ..Default::default()
        })
        .await
        .unwrap();
    r.into_inner().header.unwrap().revision
}

async fn del(c: &mut Kv, k: &str, end: &str) {
    c.delete_range(pb::DeleteRangeRequest {
        key: Bytes::copy_from_slice(k.as_bytes()),
        range_end: Bytes::copy_from_slice(end.as_bytes()),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// A response with only what etcd and keel must agree on (the header's revision, not its
/// member or cluster IDs), as text.
fn norm(r: &pb::WatchResponse) -> String {
    let mut r = r.clone();
    let rev = r.header.take().map(|h| h.revision);
    format!("rev={rev:?} {r:?}")
}

/// A phase's responses, in a stable order: by watch ID, each watcher's in arrival order (etcd
/// interleaves different watchers' responses in no fixed order).
fn phase(rs: Vec<pb::WatchResponse>) -> Vec<String> {
    let mut rs = rs;
    rs.sort_by_key(|r| r.watch_id);
    rs.iter().map(norm).collect()
}

/// A scripted session on `url`; returns each phase's responses.
async fn script(url: &str) -> Vec<Vec<String>> {
    let mut c = kv(url);
    let mut s = Session::open(url).await;
    let mut phases = Vec::new();

    s.create(create("a", "")).await;
    let mut prefix = create("p", "q");
    prefix.prev_kv = true;
    s.create(prefix).await;
    let mut chosen = create("a", "c");
    chosen.watch_id = 7;
    chosen.filters = vec![FilterType::Noput as i32];
    s.create(chosen.clone()).await;
    s.create(chosen).await; // duplicate ID
    s.create(create("b", "a")).await; // empty range
    s.create(create("x", "\0")).await; // from "x" on
    phases.push(phase(s.settle().await));

    put(&mut c, "a", "1").await;
    put(&mut c, "p1", "1").await;
    put(&mut c, "p1", "2").await;
    put(&mut c, "b", "1").await;
    del(&mut c, "a", "").await;
    del(&mut c, "p", "q").await;
    let kvs = ["x1", "x2", "y"].map(|k| (Bytes::from(k), Bytes::from_static(b"t")));
    txn_put(&mut c, kvs).await;
    phases.push(phase(s.settle().await));

    s.cancel(1).await;
    s.cancel(99).await; // unknown: no answer
    put(&mut c, "p2", "x").await; // nobody watches "p" any more
    phases.push(phase(s.settle().await));

    // History: from revision 2 on "a", and everything from revision 1 with prev_kv.
    let mut hist = create("a", "");
    hist.start_revision = 2;
    s.create(hist).await;
    let mut all = create("", "\0");
    all.start_revision = 1;
    all.prev_kv = true;
    s.create(all).await;
    phases.push(phase(s.settle().await));

    // Every watcher is synced and the stream quiet: a progress request is answered.
    s.progress().await;
    phases.push(phase(s.settle().await));

    // Compaction: a watch from below it is created, then canceled with compact_revision.
    let rev = put(&mut c, "k", "1").await;
    put(&mut c, "k", "2").await;
    c.compact(pb::CompactionRequest {
        revision: rev,
        physical: true,
    })
    .await
    .unwrap();
    let mut old = create("k", "");
    old.start_revision = rev - 1;
    s.create(old).await;
    phases.push(s.settle().await.iter().map(norm).collect());
    let mut at = create("k", "");
    at.start_revision = rev;
    s.create(at).await;
    phases.push(s.settle().await.iter().map(norm).collect());
    phases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sessions_match_live_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = LiveEtcd::start(dir.path()).await;
    let want = script(&etcd.url).await;
    let kdir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(kdir.path(), &[]).await;
    let got = script(&k.url()).await;
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "phase {i}: keel vs etcd");
    }
    // The script saw something in every phase (so agreement is not two empty lists).
    assert!(want.iter().all(|p| !p.is_empty()), "{want:#?}");
}

/// A watch with `fragment` set gets a revision too large for one message in pieces, as etcd
/// splits it (the limit is --max-request-bytes + 512 KiB).
async fn fragments(url: &str) -> Vec<(bool, usize)> {
    let mut c = kv(url);
    let big = "v".repeat(8 << 10);
    for i in 0..100 {
        put(&mut c, &format!("f{i:03}"), &big).await;
    }
    let mut s = Session::open(url).await;
    let mut w = create("f", "g");
    w.prev_kv = true;
    w.fragment = true;
    s.create(w).await;
    let mut plain = create("f", "g");
    plain.prev_kv = true;
    s.create(plain).await;
    assert!(s.settle().await.iter().all(|r| r.created));
    del(&mut c, "f", "g").await;
    let rs = s.settle().await;
    let mut out: Vec<(bool, usize)> = rs
        .iter()
        .filter(|r| r.watch_id == 0)
        .map(|r| (r.fragment, r.events.len()))
        .collect();
    let whole: Vec<usize> = rs
        .iter()
        .filter(|r| r.watch_id == 1)
        .map(|r| r.events.len())
        .collect();
    assert_eq!(whole, [100], "without fragment: one response");
    out.push((false, usize::MAX)); // marks the end of the list
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_watch_responses_match_live_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = LiveEtcd::start_with(dir.path(), &["--max-request-bytes", "100000"]).await;
    let want = fragments(&etcd.url).await;
    let kdir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(kdir.path(), &["--max-request-bytes", "100000"]).await;
    let got = fragments(&k.url()).await;
    assert_eq!(got, want);
    assert!(want.len() > 2, "etcd split it: {want:?}");
}

/// Writes `puts` keys `{prefix}{i}` of `value_len` bytes from 8 clients at once, while the
/// watcher the caller holds reads nothing; the writes must all finish within 60 s.
async fn write_past_a_stalled_watcher(
    url: &str,
    prefix: &'static str,
    puts: usize,
    value_len: usize,
) {
    let mut writers = Vec::new();
    for w in 0..8 {
        let url = url.to_string();
        writers.push(tokio::spawn(async move {
            let mut c = kv(&url);
            for i in (w..puts).step_by(8) {
                put(&mut c, &format!("{prefix}{i}"), &"x".repeat(value_len)).await;
            }
        }));
    }
    for w in writers {
        tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .expect("writes go on while a watcher does not read")
            .unwrap();
    }
}

/// A client that stops reading while many revisions go by neither blocks writes nor loses or
/// repeats an event: once it reads again it gets every revision, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_stops_reading_gets_everything_later() {
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(dir.path(), &[]).await;
    let url = k.url();
    let mut s = Session::open(&url).await;
    s.create(create("s", "t")).await;
    assert!(s.next(Duration::from_secs(5)).await.unwrap().created);
    // More revisions than the hub holds (4096), written by 8 clients at once.
    const PUTS: usize = 6000;
    write_past_a_stalled_watcher(&url, "s", PUTS, 200).await;
    let mut revs = Vec::new();
    while revs.len() < PUTS {
        let r = s
            .next(Duration::from_secs(10))
            .await
            .expect("every event comes");
        revs.extend(r.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision));
    }
    assert_eq!(revs.len(), PUTS);
    let want: Vec<i64> = (2..2 + PUTS as i64).collect();
    assert_eq!(revs, want, "each revision once, in order");
    assert!(s.next(QUIET).await.is_none());
}

/// A stream that falls behind while the revisions it owes are still in the hub (fewer than
/// it holds) sends each watcher several revisions per response: far fewer responses than
/// revisions, every revision once, in order, each response's header at or past its events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_behind_sends_several_revisions_per_response() {
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(dir.path(), &[]).await;
    let url = k.url();
    let mut s = Session::open(&url).await;
    s.create(create("b", "c")).await;
    assert!(s.next(Duration::from_secs(5)).await.unwrap().created);
    // Fewer revisions than the hub holds (4096); far more bytes than the stream's window.
    const PUTS: usize = 3000;
    write_past_a_stalled_watcher(&url, "b", PUTS, 300).await;
    let mut revs = Vec::new();
    let mut responses = 0;
    while revs.len() < PUTS {
        let r = s
            .next(Duration::from_secs(10))
            .await
            .expect("every event comes");
        responses += 1;
        let last = r.events.last().unwrap().kv.as_ref().unwrap().mod_revision;
        assert!(r.header.as_ref().unwrap().revision >= last);
        revs.extend(r.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision));
    }
    let want: Vec<i64> = (2..2 + PUTS as i64).collect();
    assert_eq!(revs, want, "each revision once, in order");
    assert!(
        responses < PUTS / 2,
        "{responses} responses for {PUTS} revisions"
    );
    assert!(s.next(QUIET).await.is_none());
}

/// Progress requests (etcd 3.6 semantics): answered with watch_id -1 and a revision at which
/// every earlier event has been sent; not answered while a watcher is still catching up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_requests_follow_etcd_3_6() {
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(dir.path(), &[]).await;
    let mut c = kv(&k.url());
    let mut s = Session::open(&k.url()).await;
    s.progress().await;
    assert!(s.next(QUIET).await.is_none(), "no watchers: no answer");
    s.create(create("a", "")).await;
    assert!(s.next(QUIET).await.unwrap().created);
    let mut last = 0;
    for i in 0..50 {
        last = put(&mut c, "a", &i.to_string()).await;
    }
    s.progress().await;
    let mut seen = 0;
    let progress = loop {
        let r = s
            .next(Duration::from_secs(5))
            .await
            .expect("a progress response");
        if let Some(e) = r.events.last() {
            seen = e.kv.as_ref().unwrap().mod_revision;
            continue;
        }
        break r;
    };
    assert_eq!(progress.watch_id, -1);
    assert_eq!(progress.header.unwrap().revision, last);
    assert_eq!(
        seen, last,
        "every event up to the progress revision came before it"
    );
    // A watcher catching up from far back: an answer, if any comes while it catches up,
    // comes only after every event up to its revision.
    let mut from1 = create("", "\0");
    from1.start_revision = 1;
    let mut s2 = Session::open(&k.url()).await;
    s2.create(from1).await;
    s2.progress().await;
    let rs = s2.settle().await;
    assert!(rs[0].created);
    let mut events = 0;
    for r in &rs[1..] {
        if r.watch_id == -1 {
            assert_eq!(events, 50, "progress before the events it covers: {rs:?}");
        }
        events += r.events.len();
    }
    assert_eq!(events, 50);
    s2.progress().await;
    let r = s2.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!((r.watch_id, r.header.unwrap().revision), (-1, last));
}

/// Periodic progress notifications (--watch-progress-notify-interval) reach watchers that
/// asked for them, with the current revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_progress_notifications() {
    let dir = tempfile::tempdir().unwrap();
    let flag = ["--experimental-watch-progress-notify-interval", "300ms"];
    let k = Keel::start_async(dir.path(), &flag).await;
    let mut c = kv(&k.url());
    let rev = put(&mut c, "z", "1").await;
    let mut s = Session::open(&k.url()).await;
    let mut w = create("a", "");
    w.progress_notify = true;
    s.create(w).await;
    s.create(create("b", "")).await;
    let mut notes = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < until {
        if let Some(r) = s.next(Duration::from_millis(100)).await {
            if !r.created {
                notes.push((r.watch_id, r.header.unwrap().revision, r.events.len()));
            }
        }
    }
    assert!(notes.len() >= 3, "{notes:?}");
    assert!(notes.iter().all(|n| *n == (0, rev, 0)), "{notes:?}");
}

/// etcdctl's watch: a key, a prefix with --prev-kv, and history with --rev, running while
/// another client writes.
#[test]
fn etcdctl_watch() {
    for url_form in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let k = Keel::start(dir.path(), &[]);
        let ep = if url_form { k.url() } else { k.endpoint() };
        etcdctl(&ep, &["put", "foo", "0"], None);
        let spawn = |args: &[&str]| {
            std::process::Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg("--endpoints")
                .arg(&ep)
                .args(args)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let watchers = [
            spawn(&["watch", "foo"]),
            spawn(&["watch", "foo", "--prefix", "--prev-kv"]),
            spawn(&["watch", "foo", "--rev", "1"]),
        ];
        std::thread::sleep(Duration::from_millis(700));
        assert!(etcdctl(&ep, &["put", "foo", "1"], None).0);
        assert!(etcdctl(&ep, &["put", "foobar", "2"], None).0);
        assert!(etcdctl(&ep, &["del", "foo"], None).0);
        std::thread::sleep(Duration::from_millis(700));
        let outs: Vec<String> = watchers
            .into_iter()
            .map(|mut w| {
                let _ = w.kill();
                let out = w.wait_with_output().unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
            .collect();
        assert_eq!(outs[0], "PUT\nfoo\n1\nDELETE\nfoo\n\n");
        assert_eq!(
            outs[1],
            "PUT\nfoo\n0\nfoo\n1\nPUT\nfoobar\n2\nDELETE\nfoo\n1\nfoo\n\n"
        );
        assert_eq!(outs[2], "PUT\nfoo\n0\nPUT\nfoo\n1\nDELETE\nfoo\n\n");
    }
}

/// The etcd-client crate: watch, a compaction cancel, and a progress request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_crate_watch() {
    use etcd_client::{Client, EventType, WatchOptions};
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(dir.path(), &[]).await;
    let mut c = Client::connect([k.url()], None).await.unwrap();
    let (mut watcher, mut stream) = c
        .watch(
            "svc/",
            Some(WatchOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .unwrap();
    c.put("svc/a", "1", None).await.unwrap();
    c.put("svc/a", "2", None).await.unwrap();
    c.delete("svc/a", None).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let r = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        for e in r.events() {
            let prev = e.prev_kv().map(|p| p.value().to_vec());
            seen.push((e.event_type(), e.kv().unwrap().value().to_vec(), prev));
        }
    }
    assert_eq!(
        seen,
        [
            (EventType::Put, b"1".to_vec(), None),
            (EventType::Put, b"2".to_vec(), Some(b"1".to_vec())),
            (EventType::Delete, Vec::new(), Some(b"2".to_vec())),
        ]
    );
    watcher.request_progress().await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.watch_id(), -1);
    assert_eq!(r.header().unwrap().revision(), 4);

    c.compact(3, None).await.unwrap();
    let (_w, mut old) = c
        .watch(
            "svc/",
            Some(WatchOptions::new().with_prefix().with_start_revision(2)),
        )
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), old.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(r.canceled());
    assert_eq!(r.compact_revision(), 3);
}

/// One expected or received event: (revision, key, value; None for a delete).
type Ev = (i64, String, Option<String>);

/// A watcher of the model test: its range and start, and what it was sent.
struct ModelWatcher {
    key: String,
    /// "": the key alone; "\0": every key from `key` on.
    end: String,
    start: i64,
}

impl ModelWatcher {
    fn contains(&self, k: &str) -> bool {
        match self.end.as_str() {
            "" => k == self.key,
            "\0" => k >= self.key.as_str(),
            end => k >= self.key.as_str() && k < end,
        }
    }

    fn create(&self, id: i64, start: i64) -> pb::WatchCreateRequest {
        let mut c = create(&self.key, &self.end);
        c.watch_id = id;
        c.start_revision = start;
        c
    }
}

/// 100 watchers over random ranges of keys w00..w19 (one key, a span, from a key on, all),
/// starting at random revisions in `starts`.
fn random_watchers(rng: &mut impl rand::Rng, starts: std::ops::Range<i64>) -> Vec<ModelWatcher> {
    (0..100)
        .map(|_| {
            let a = rng.gen_range(0..20);
            let (key, end) = match rng.gen_range(0..4) {
                0 => (format!("w{a:02}"), String::new()),
                1 => (
                    format!("w{a:02}"),
                    format!("w{:02}", rng.gen_range(a + 1..=20)),
                ),
                2 => (format!("w{a:02}"), "\0".to_string()),
                _ => ("w".to_string(), "x".to_string()),
            };
            ModelWatcher {
                key,
                end,
                start: rng.gen_range(starts.clone()),
            }
        })
        .collect()
}

/// Writes random puts, deletes and multi-put txns over keys w00..w19; returns the events
/// each revision made, in order.
async fn random_writes(
    c: &mut Kv,
    rng: &mut impl rand::Rng,
    n: usize,
    live: &mut std::collections::BTreeSet<String>,
) -> Vec<Ev> {
    let mut evs = Vec::new();
    for i in 0..n {
        let k = format!("w{:02}", rng.gen_range(0..20));
        match rng.gen_range(0..10) {
            0..=5 => {
                let v = format!("v{i}");
                let rev = put(c, &k, &v).await;
                live.insert(k.clone());
                evs.push((rev, k, Some(v)));
            }
            6..=7 => {
                let end = format!("w{:02}", rng.gen_range(0..21));
                let r = c
                    .delete_range(pb::DeleteRangeRequest {
                        key: Bytes::copy_from_slice(k.as_bytes()),
                        range_end: Bytes::copy_from_slice(end.as_bytes()),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let doomed: Vec<String> = live
                    .iter()
                    .filter(|x| x.as_str() >= k.as_str() && x.as_str() < end.as_str())
                    .cloned()
                    .collect();
                assert_eq!(r.deleted as usize, doomed.len());
                for d in doomed {
                    live.remove(&d);
                    evs.push((r.header.unwrap().revision, d, None));
                }
            }
            _ => {
                let mut keys: Vec<String> = (0..3)
                    .map(|_| format!("w{:02}", rng.gen_range(0..20)))
                    .collect();
                keys.sort();
                keys.dedup();
                let value = Bytes::from(format!("t{i}"));
                let kvs = keys.iter().map(|k| (Bytes::from(k.clone()), value.clone()));
                let r = txn_put(c, kvs).await;
                for k in keys {
                    live.insert(k.clone());
                    evs.push((r.header.unwrap().revision, k, Some(format!("t{i}"))));
                }
            }
        }
    }
    evs
}

/// Reads every stream's responses into `got[watch_id]` until each watcher has `want[id]`
/// events (or 20 s pass); returns the compact revisions of canceled watchers.
async fn collect(
    sessions: &mut [Session],
    got: &mut std::collections::HashMap<i64, Vec<Ev>>,
    want: &std::collections::HashMap<i64, usize>,
) -> std::collections::HashMap<i64, i64> {
    let mut canceled = std::collections::HashMap::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let done = want
            .iter()
            .all(|(id, n)| canceled.contains_key(id) || got.get(id).map_or(0, |g| g.len()) >= *n);
        if done || tokio::time::Instant::now() > until {
            return canceled;
        }
        for s in sessions.iter_mut() {
            while let Some(r) = s.next(Duration::from_millis(20)).await {
                if r.canceled {
                    canceled.insert(r.watch_id, r.compact_revision);
                }
                let evs = got.entry(r.watch_id).or_default();
                for e in &r.events {
                    let kv = e.kv.as_ref().unwrap();
                    let key = String::from_utf8(kv.key.to_vec()).unwrap();
                    let value =
                        (e.r#type == 0).then(|| String::from_utf8(kv.value.to_vec()).unwrap());
                    evs.push((kv.mod_revision, key, value));
                }
            }
        }
    }
}

/// 100 watchers at random start revisions over random ranges, while random writes go on;
/// then every stream reconnects from the revision its progress response vouched for, after a
/// compaction; and late watchers from below the compaction are canceled with it. Each
/// watcher's events equal the model's for its range, in order, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_see_exactly_the_history_across_compaction_and_reconnect() {
    use rand::SeedableRng;
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(dir.path(), &[]).await;
    let url = k.url();
    let mut c = kv(&url);
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let mut live = std::collections::BTreeSet::new();
    let mut model = random_writes(&mut c, &mut rng, 150, &mut live).await;
    let first_rev = model.last().unwrap().0;
    let watchers = random_watchers(&mut rng, 1..first_rev + 20);
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(Session::open(&url).await);
    }
    for (i, w) in watchers.iter().enumerate() {
        sessions[i % 4]
            .create(w.create(i as i64 + 1, w.start))
            .await;
    }
    model.extend(random_writes(&mut c, &mut rng, 150, &mut live).await);
    let expected = |w: &ModelWatcher, from: i64, model: &[Ev]| -> Vec<Ev> {
        model
            .iter()
            .filter(|e| e.0 >= from && w.contains(&e.1))
            .cloned()
            .collect()
    };
    let want: std::collections::HashMap<i64, usize> = watchers
        .iter()
        .enumerate()
        .map(|(i, w)| (i as i64 + 1, expected(w, w.start, &model).len()))
        .collect();
    let mut got = std::collections::HashMap::new();
    let canceled = collect(&mut sessions, &mut got, &want).await;
    assert!(canceled.is_empty(), "{canceled:?}");
    // Each stream's progress: every event at or below it has been sent.
    let mut progress = Vec::new();
    for s in sessions.iter_mut() {
        s.progress().await;
        let r = loop {
            let r = s.next(Duration::from_secs(5)).await.expect("progress");
            if r.watch_id == -1 {
                break r;
            }
            assert!(r.events.is_empty(), "all events were read already");
        };
        progress.push(r.header.unwrap().revision);
    }
    let now = model.last().unwrap().0;
    assert!(progress.iter().all(|p| *p == now), "{progress:?} vs {now}");
    // Compact, write more, reconnect every watcher from progress + 1.
    c.compact(pb::CompactionRequest {
        revision: now - 10,
        physical: false,
    })
    .await
    .unwrap();
    drop(sessions);
    model.extend(random_writes(&mut c, &mut rng, 150, &mut live).await);
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(Session::open(&url).await);
    }
    for (i, w) in watchers.iter().enumerate() {
        let from = w.start.max(progress[i % 4] + 1);
        sessions[i % 4].create(w.create(i as i64 + 1, from)).await;
    }
    // Late watchers from below the compaction: canceled with it.
    for (i, w) in watchers.iter().take(5).enumerate() {
        sessions[0]
            .create(w.create(1000 + i as i64, now - 20))
            .await;
    }
    let mut want2: std::collections::HashMap<i64, usize> = watchers
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let from = w.start.max(progress[i % 4] + 1);
            (i as i64 + 1, expected(w, from, &model).len())
        })
        .collect();
    want2.extend((0..5).map(|i| (1000 + i, 1)));
    let mut got2 = std::collections::HashMap::new();
    let canceled = collect(&mut sessions, &mut got2, &want2).await;
    for i in 0..5 {
        assert_eq!(
            canceled.get(&(1000 + i)),
            Some(&(now - 10)),
            "late watcher {i}"
        );
    }
    for (i, w) in watchers.iter().enumerate() {
        let id = i as i64 + 1;
        let mut all = got.remove(&id).unwrap_or_default();
        all.extend(got2.remove(&id).unwrap_or_default());
        assert_eq!(
            all,
            expected(w, w.start, &model),
            "watcher {id} {}..{:?} from {}",
            w.key,
            w.end,
            w.start
        );
    }
}

/// A compaction lands while 100 watchers are still reading a long history (their client not
/// reading yet, so their streams are behind): each watcher is sent a prefix of the model's
/// events, then either the rest or a cancel at the compaction (only if it started below
/// it). After more writes every watcher reconnects from its last seen revision + 1 (or its
/// start): below the compaction it is canceled with it, else it is sent exactly the model's
/// events from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_while_watchers_catch_up_cancels_exactly_those_behind_it() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(dir.path(), &[]).await;
    let url = k.url();
    let mut c = kv(&url);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // 600 puts of 2 KB over w00..w19: about 1.2 MB of history for a watcher of every key.
    let mut model: Vec<Ev> = Vec::new();
    for i in 0..600 {
        let k = format!("w{:02}", rng.gen_range(0..20));
        let v = format!("{i:05}{}", "x".repeat(2000));
        let rev = put(&mut c, &k, &v).await;
        model.push((rev, k, Some(v)));
    }
    let (first, last) = (model[0].0, model.last().unwrap().0);
    let compact_at = first + 300;
    let watchers = random_watchers(&mut rng, first..last + 6);
    let expected = |w: &ModelWatcher, from: i64, model: &[Ev]| -> Vec<Ev> {
        model
            .iter()
            .filter(|e| e.0 >= from && w.contains(&e.1))
            .cloned()
            .collect()
    };
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(Session::open(&url).await);
    }
    for (i, w) in watchers.iter().enumerate() {
        sessions[i % 4]
            .create(w.create(i as i64 + 1, w.start))
            .await;
    }
    c.compact(pb::CompactionRequest {
        revision: compact_at,
        physical: false,
    })
    .await
    .unwrap();
    let want: std::collections::HashMap<i64, usize> = watchers
        .iter()
        .enumerate()
        .map(|(i, w)| (i as i64 + 1, expected(w, w.start, &model).len()))
        .collect();
    let mut got = std::collections::HashMap::new();
    let canceled = collect(&mut sessions, &mut got, &want).await;
    let mut resume = Vec::new();
    for (i, w) in watchers.iter().enumerate() {
        let id = i as i64 + 1;
        let seen = got.remove(&id).unwrap_or_default();
        let all = expected(w, w.start, &model);
        let at = format!("watcher {id} {}..{:?} from {}", w.key, w.end, w.start);
        assert_eq!(seen[..], all[..seen.len().min(all.len())], "{at}: a prefix");
        match canceled.get(&id) {
            Some(rev) => {
                assert_eq!(*rev, compact_at, "{at}");
                assert!(
                    w.start < compact_at,
                    "{at}: canceled though it needs nothing below"
                );
            }
            None => assert_eq!(seen.len(), all.len(), "{at}: not canceled, so sent all"),
        }
        resume.push(seen.last().map_or(w.start, |e| e.0 + 1));
    }
    let behind = canceled.values().filter(|r| **r == compact_at).count();
    assert!(
        behind > 0 && behind < watchers.len(),
        "{behind} of {} watchers canceled: the compaction must split them",
        watchers.len()
    );
    // Reconnect from the last seen revision + 1 after more writes.
    drop(sessions);
    let mut live: std::collections::BTreeSet<String> = model.iter().map(|e| e.1.clone()).collect();
    model.extend(random_writes(&mut c, &mut rng, 100, &mut live).await);
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(Session::open(&url).await);
    }
    for (i, w) in watchers.iter().enumerate() {
        sessions[i % 4]
            .create(w.create(i as i64 + 1, resume[i]))
            .await;
    }
    let want: std::collections::HashMap<i64, usize> = watchers
        .iter()
        .enumerate()
        .map(|(i, w)| (i as i64 + 1, expected(w, resume[i], &model).len()))
        .collect();
    let mut got = std::collections::HashMap::new();
    let canceled = collect(&mut sessions, &mut got, &want).await;
    for (i, w) in watchers.iter().enumerate() {
        let id = i as i64 + 1;
        let seen = got.remove(&id).unwrap_or_default();
        let at = format!("watcher {id} {}..{:?} from {}", w.key, w.end, resume[i]);
        if resume[i] < compact_at {
            assert_eq!(canceled.get(&id), Some(&compact_at), "{at}");
            assert!(seen.is_empty(), "{at}");
        } else {
            assert_eq!(canceled.get(&id), None, "{at}");
            assert_eq!(seen, expected(w, resume[i], &model), "{at}");
        }
    }
}
