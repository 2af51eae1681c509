//! Concurrent compare-and-swap through txns: many clients increment one counter, each txn
//! guarded by the counter's mod_revision. A lost update, a txn applied twice or half, or a
//! revision handed out twice shows up as a wrong final count.

use std::collections::HashSet;

use bytes::Bytes;
use keel_proto::pb;
use keel_proto::pb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_proto::pb::request_op::Request;

use crate::harness::{kv, Keel};

async fn read_counter(
    c: &mut pb::kv_client::KvClient<tonic::transport::Channel>,
) -> pb::RangeResponse {
    c.range(pb::RangeRequest {
        key: Bytes::from_static(b"counter"),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

const CLIENTS: usize = 16;
const INCREMENTS: usize = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cas_increments_are_never_lost() {
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(dir.path(), &["--cores", "3"]).await;
    let url = k.url();
    kv(&url)
        .put(pb::PutRequest {
            key: Bytes::from_static(b"counter"),
            value: Bytes::from_static(b"0"),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = kv(&url);
            let mut won_revisions = Vec::new();
            let mut attempts = 0;
            while won_revisions.len() < INCREMENTS {
                attempts += 1;
                assert!(attempts < 100_000, "livelock");
                let got = read_counter(&mut c).await;
                let kv0 = &got.kvs[0];
                let n: u64 = std::str::from_utf8(&kv0.value).unwrap().parse().unwrap();
                let txn = pb::TxnRequest {
                    compare: vec![pb::Compare {
                        result: CompareResult::Equal as i32,
                        target: CompareTarget::Mod as i32,
                        key: Bytes::from_static(b"counter"),
                        target_union: Some(TargetUnion::ModRevision(kv0.mod_revision)),
                        range_end: Bytes::new(),
                    }],
                    success: vec![pb::RequestOp {
                        request: Some(Request::RequestPut(pb::PutRequest {
                            key: Bytes::from_static(b"counter"),
                            value: Bytes::from((n + 1).to_string()),
                            ..Default::default()
                        })),
                    }],
                    failure: vec![],
                };
                let r = c.txn(txn).await.unwrap().into_inner();
                if r.succeeded {
                    won_revisions.push(r.header.unwrap().revision);
                }
            }
            won_revisions
        }));
    }
    let mut all = HashSet::new();
    for t in tasks {
        for rev in t.await.unwrap() {
            assert!(
                all.insert(rev),
                "revision {rev} acknowledged to two writers"
            );
        }
    }
    let end = read_counter(&mut kv(&url)).await;
    let total = (CLIENTS * INCREMENTS) as u64;
    assert_eq!(end.kvs[0].value, Bytes::from(total.to_string()));
    assert_eq!(end.kvs[0].version, total as i64 + 1);
    // Only the winning txns wrote: the counter's put at revision 2, then one per increment.
    assert_eq!(end.header.unwrap().revision, 2 + total as i64);
}
