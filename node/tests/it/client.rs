//! The Rust `etcd-client` crate against keel: a real client library's view of the KV API.

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse,
};

use keel_proto::pb;

use crate::harness::Keel;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_crate_kv_txn_and_status() {
    kv_txn_and_status(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_crate_with_an_http_url_endpoint() {
    kv_txn_and_status(true).await;
}

/// The crate's KV, txn, status and member calls on a fresh keel, dialled as `127.0.0.1:PORT`
/// or as `http://127.0.0.1:PORT`.
async fn kv_txn_and_status(url_form: bool) {
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(dir.path(), &[]).await;
    let ep = if url_form { k.url() } else { k.endpoint() };
    let mut c = Client::connect([ep], None).await.unwrap();

    let r = c.put("a", "1", None).await.unwrap();
    assert_eq!(r.header().unwrap().revision(), 2);
    let r = c
        .put("a", "2", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert_eq!(r.prev_key().unwrap().value(), b"1");
    c.put("b", "3", None).await.unwrap();
    c.put("c", "4", None).await.unwrap();

    let r = c
        .get(
            "",
            Some(
                GetOptions::new()
                    .with_from_key()
                    .with_sort(SortTarget::Mod, SortOrder::Descend)
                    .with_limit(2),
            ),
        )
        .await
        .unwrap();
    let keys: Vec<&[u8]> = r.kvs().iter().map(|kv| kv.key()).collect();
    assert_eq!(keys, vec![b"c".as_ref(), b"b".as_ref()]);
    assert!(r.more());
    assert_eq!(r.count(), 3);

    let r = c
        .get("a", Some(GetOptions::new().with_revision(2)))
        .await
        .unwrap();
    assert_eq!(r.kvs()[0].value(), b"1");

    let txn = Txn::new()
        .when([Compare::value("a", CompareOp::Equal, "2")])
        .and_then([TxnOp::put("a", "3", None), TxnOp::get("b", None)])
        .or_else([TxnOp::put("never", "x", None)]);
    let r = c.txn(txn).await.unwrap();
    assert!(r.succeeded());
    assert_eq!(r.header().unwrap().revision(), 6);
    match &r.op_responses()[1] {
        TxnOpResponse::Get(g) => assert_eq!(g.kvs()[0].value(), b"3"),
        other => panic!("unexpected {other:?}"),
    }
    let txn = Txn::new()
        .when([Compare::version("a", CompareOp::Greater, 10)])
        .and_then([TxnOp::put("never", "x", None)])
        .or_else([TxnOp::delete(
            "b",
            Some(DeleteOptions::new().with_prev_key()),
        )]);
    let r = c.txn(txn).await.unwrap();
    assert!(!r.succeeded());
    match &r.op_responses()[0] {
        TxnOpResponse::Delete(d) => {
            assert_eq!(d.deleted(), 1);
            assert_eq!(d.prev_kvs()[0].value(), b"3");
        }
        other => panic!("unexpected {other:?}"),
    }

    let r = c
        .delete("", Some(DeleteOptions::new().with_from_key()))
        .await
        .unwrap();
    assert_eq!(r.deleted(), 2);
    assert_eq!(c.get("never", None).await.unwrap().count(), 0);

    let s = c.status().await.unwrap();
    assert_eq!(s.version(), "3.6.0");
    assert_eq!(s.leader(), s.header().unwrap().member_id());
    assert!(s.raft_index() >= s.raft_applied_index() && s.raft_applied_index() > 0);
    let m = c.member_list().await.unwrap();
    assert_eq!(m.members().len(), 1);
    assert_eq!(m.members()[0].name(), "default");
    // etcd answers Defragment and MoveLeader without a header (the etcd-client crate's own
    // tests check it).
    assert!(c.defragment().await.unwrap().header().is_none());
    assert!(c.move_leader(s.leader()).await.unwrap().header().is_none());
    // Fields the crate does not show: etcd 3.6's storage version and quota (etcd's default
    // when not set) in Status; no header on any Snapshot piece, the version on each.
    let mut m =
        pb::maintenance_client::MaintenanceClient::new(crate::harness::channel(&k.url()).await);
    let st = m.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.storage_version, "3.6.0");
    assert_eq!(st.db_size_quota, 2 << 30);
    let mut snap = m
        .snapshot(pb::SnapshotRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut pieces = 0;
    while let Some(piece) = snap.message().await.unwrap() {
        assert!(piece.header.is_none(), "piece {pieces} has a header");
        assert_eq!(piece.version, "3.6.0");
        pieces += 1;
    }
    assert!(pieces >= 2, "a file and its sha256: {pieces}");
    // Maintenance.Hash: stable while nothing changes, different after a write.
    let h1 = c.hash().await.unwrap().hash();
    assert_eq!(c.hash().await.unwrap().hash(), h1);
    c.put("after-hash", "1", None).await.unwrap();
    assert_ne!(c.hash().await.unwrap().hash(), h1);
    let e = c.user_list().await.unwrap_err().to_string();
    assert!(
        e.contains("keel: etcdserverpb.Auth/UserList is not implemented yet"),
        "{e}"
    );
}

/// The standard gRPC health service, registered as etcd registers it ("" is SERVING), so
/// grpc_health_probe and health-checking load balancers work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_service_reports_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(dir.path(), &[]).await;
    let ch = crate::harness::channel(&k.url()).await;
    let mut h = HealthClient::new(ch);
    let r = h
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, ServingStatus::Serving as i32);
    let unknown = h
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

/// Calls keel doesn't serve answer Unimplemented naming the call (etcd's not-yet-served
/// RPCs, etcd 3.7's RangeStream) or with grpc-go's text for anything else, as etcd does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unserved_calls_name_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(dir.path(), &[]).await;
    let ch = crate::harness::channel(&k.url()).await;
    for (path, want) in [
        (
            "/etcdserverpb.Auth/UserGet",
            "keel: etcdserverpb.Auth/UserGet is not implemented yet",
        ),
        (
            "/etcdserverpb.Auth/AuthStatus",
            "keel: etcdserverpb.Auth/AuthStatus is not implemented yet",
        ),
        (
            "/etcdserverpb.Auth/RoleGet",
            "keel: etcdserverpb.Auth/RoleGet is not implemented yet",
        ),
        (
            "/etcdserverpb.Auth/Nope",
            "unknown method Nope for service etcdserverpb.Auth",
        ),
        (
            "/etcdserverpb.Watch/Nope",
            "unknown method Nope for service etcdserverpb.Watch",
        ),
        (
            "/etcdserverpb.KV/Nope",
            "unknown method Nope for service etcdserverpb.KV",
        ),
        ("/no.Such/Call", "unknown service no.Such"),
    ] {
        let mut g = tonic::client::Grpc::new(ch.clone());
        g.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<pb::RangeRequest, pb::RangeResponse>::default();
        let st = g
            .unary(
                tonic::Request::new(pb::RangeRequest::default()),
                http::uri::PathAndQuery::from_static(path),
                codec,
            )
            .await
            .unwrap_err();
        assert_eq!(
            (st.code(), st.message()),
            (tonic::Code::Unimplemented, want),
            "{path}"
        );
    }
    // A served call still works on the same connection.
    let mut kv = pb::kv_client::KvClient::new(ch);
    kv.range(pb::RangeRequest {
        key: b"a".to_vec().into(),
        ..Default::default()
    })
    .await
    .unwrap();
}
