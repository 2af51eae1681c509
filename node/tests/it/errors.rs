//! Bad input gets etcd's answer: the same gRPC code and message text. The expected table was
//! recorded from etcd 3.4.23 (Debian's etcd-server); `table_matches_live_etcd` re-checks it
//! against a real etcd started side by side whenever `etcd` is on PATH (scripts/setup.sh
//! installs it), so the table cannot drift from etcd's truth.

use bytes::Bytes;
use keel_proto::pb;
use keel_proto::pb::request_op::Request;
use keel_proto::prost::Message;
use tonic::Code;

use crate::harness::{kv, Keel, LiveEtcd};

fn put(key: &str, value: &[u8]) -> pb::PutRequest {
    pb::PutRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value),
        ..Default::default()
    }
}

fn op_put(key: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Request::RequestPut(put(key, b"v"))),
    }
}

fn range(key: &str, rev: i64) -> pb::RangeRequest {
    pb::RangeRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        revision: rev,
        ..Default::default()
    }
}

/// The table: (case, expected code, expected message). `{N}` in a message is the request's
/// encoded size, computed by the case.
fn expected() -> Vec<(&'static str, Code, String)> {
    let big = put("k", &vec![b'x'; 3 << 20]).encoded_len();
    let ia = Code::InvalidArgument;
    vec![
        (
            "put empty key",
            ia,
            "etcdserver: key is not provided".into(),
        ),
        (
            "range empty key",
            ia,
            "etcdserver: key is not provided".into(),
        ),
        (
            "delete empty key",
            ia,
            "etcdserver: key is not provided".into(),
        ),
        (
            "put ignore_value with value",
            ia,
            "etcdserver: value is provided".into(),
        ),
        (
            "put ignore_lease with lease",
            ia,
            "etcdserver: lease is provided".into(),
        ),
        (
            "put ignore_value missing key",
            ia,
            "etcdserver: key not found".into(),
        ),
        (
            "put unknown lease",
            Code::NotFound,
            "etcdserver: requested lease not found".into(),
        ),
        (
            "txn 129 ops",
            ia,
            "etcdserver: too many operations in txn request".into(),
        ),
        (
            "txn duplicate put",
            ia,
            "etcdserver: duplicate key given in txn request".into(),
        ),
        (
            "txn put in deleted range",
            ia,
            "etcdserver: duplicate key given in txn request".into(),
        ),
        (
            "txn compare empty key",
            ia,
            "etcdserver: key is not provided".into(),
        ),
        ("txn empty op", ia, "etcdserver: key not found".into()),
        (
            "txn put unknown lease",
            Code::NotFound,
            "etcdserver: requested lease not found".into(),
        ),
        (
            "txn range future rev",
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision".into(),
        ),
        (
            "range future rev",
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision".into(),
        ),
        (
            "range compacted rev",
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted".into(),
        ),
        (
            "compact compacted rev",
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted".into(),
        ),
        (
            "compact future rev",
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision".into(),
        ),
        (
            "put over max-request-bytes",
            ia,
            "etcdserver: request is too large".into(),
        ),
        (
            "put over grpc limit",
            Code::ResourceExhausted,
            format!("grpc: received message larger than max ({big} vs. 2097152)"),
        ),
    ]
}

/// Sends every bad request to a fresh server at `url`; returns what came back.
async fn run_table(url: &str) -> Vec<(&'static str, Code, String)> {
    let mut c = kv(url).max_encoding_message_size(64 << 20);
    // Revisions 2..=5 exist, compacted at 4.
    for i in 0..4 {
        c.put(put("k", format!("{i}").as_bytes())).await.unwrap();
    }
    c.compact(pb::CompactionRequest {
        revision: 4,
        physical: true,
    })
    .await
    .unwrap();
    let txn = |success: Vec<pb::RequestOp>| pb::TxnRequest {
        compare: vec![],
        success,
        failure: vec![],
    };
    let mut out = Vec::new();
    macro_rules! case {
        ($name:expr, $call:expr) => {{
            let r = $call.await;
            let (code, msg) = match r {
                Ok(_) => (Code::Ok, String::new()),
                Err(s) => (s.code(), s.message().to_string()),
            };
            out.push(($name, code, msg));
        }};
    }
    case!("put empty key", c.put(put("", b"v")));
    case!("range empty key", c.range(range("", 0)));
    case!(
        "delete empty key",
        c.delete_range(pb::DeleteRangeRequest::default())
    );
    let mut p = put("k", b"v");
    p.ignore_value = true;
    case!("put ignore_value with value", c.put(p));
    let mut p = put("k", b"");
    p.ignore_lease = true;
    p.lease = 5;
    case!("put ignore_lease with lease", c.put(p));
    let mut p = put("missing", b"");
    p.ignore_value = true;
    case!("put ignore_value missing key", c.put(p));
    let mut p = put("k", b"v");
    p.lease = 12345;
    case!("put unknown lease", c.put(p));
    let many: Vec<pb::RequestOp> = (0..129).map(|i| op_put(&format!("k{i}"))).collect();
    case!("txn 129 ops", c.txn(txn(many)));
    case!(
        "txn duplicate put",
        c.txn(txn(vec![op_put("a"), op_put("a")]))
    );
    let del = pb::RequestOp {
        request: Some(Request::RequestDeleteRange(pb::DeleteRangeRequest {
            key: Bytes::from_static(b"a"),
            range_end: Bytes::from_static(b"c"),
            ..Default::default()
        })),
    };
    case!(
        "txn put in deleted range",
        c.txn(txn(vec![del, op_put("b")]))
    );
    let mut t = txn(vec![op_put("a")]);
    t.compare.push(pb::Compare::default());
    case!("txn compare empty key", c.txn(t));
    case!(
        "txn empty op",
        c.txn(txn(vec![pb::RequestOp { request: None }]))
    );
    let mut p = put("z", b"v");
    p.lease = 777;
    let t = txn(vec![
        op_put("y"),
        pb::RequestOp {
            request: Some(Request::RequestPut(p)),
        },
    ]);
    case!("txn put unknown lease", c.txn(t));
    let t = txn(vec![
        op_put("y"),
        pb::RequestOp {
            request: Some(Request::RequestRange(range("k", 1000))),
        },
    ]);
    case!("txn range future rev", c.txn(t));
    case!("range future rev", c.range(range("k", 1000)));
    case!("range compacted rev", c.range(range("k", 3)));
    case!(
        "compact compacted rev",
        c.compact(pb::CompactionRequest {
            revision: 4,
            physical: false
        })
    );
    case!(
        "compact future rev",
        c.compact(pb::CompactionRequest {
            revision: 1000,
            physical: false
        })
    );
    case!(
        "put over max-request-bytes",
        c.put(put("k", &vec![b'x'; 1_572_864]))
    );
    case!("put over grpc limit", c.put(put("k", &vec![b'x'; 3 << 20])));

    // Nothing from the failed txns was written: "y" never appeared, revision still 5.
    let r = c.range(range("y", 0)).await.unwrap().into_inner();
    assert_eq!(r.count, 0, "a failed txn wrote something");
    assert_eq!(r.header.unwrap().revision, 5);
    out
}

fn check(got: Vec<(&'static str, Code, String)>) {
    let want = expected();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want.iter()) {
        assert_eq!(g, w, "case {:?}", w.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_etcds_code_and_message() {
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(dir.path(), &[]).await;
    check(run_table(&k.url()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_matches_live_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = LiveEtcd::start(dir.path()).await;
    check(run_table(&etcd.url).await);
}
