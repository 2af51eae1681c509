//! KV.RangeStream (etcd 3.7): merged, its chunks equal the unary Range's answer for the same
//! request; intermediate chunks carry key-values only; a large range streams in bounded
//! server memory.

use bytes::Bytes;
use keel_proto::pb;

use crate::harness::{channel, kv, txn_put, Keel};

type Kv = pb::kv_client::KvClient<tonic::transport::Channel>;

/// Puts `n` keys `k000000`.. with values of `size` bytes, 100 per txn.
async fn load(c: &mut Kv, n: usize, size: usize) {
    for start in (0..n).step_by(100) {
        let kvs = (start..(start + 100).min(n)).map(|i| {
            let value = vec![b'a' + (i % 26) as u8; size + i % 7];
            (Bytes::from(format!("k{i:06}")), Bytes::from(value))
        });
        txn_put(c, kvs).await;
    }
}

/// A fresh Keel with `n` keys loaded (see `load`), a client, and the revision after loading.
async fn loaded(dir: &std::path::Path, n: usize, size: usize) -> (Keel, Kv, i64) {
    let k = Keel::start_async(dir, &[]).await;
    let mut c = kv(&k.url()).max_decoding_message_size(usize::MAX);
    load(&mut c, n, size).await;
    let rev = c
        .range(pb::RangeRequest {
            key: Bytes::from_static(b"k"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    (k, c, rev)
}

/// A range request of [key, end).
fn base(key: &str, end: &str) -> pb::RangeRequest {
    pb::RangeRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        range_end: Bytes::copy_from_slice(end.as_bytes()),
        ..Default::default()
    }
}

/// The stream's chunks, and their merge (as proto.Merge would).
async fn stream(c: &mut Kv, r: pb::RangeRequest) -> (Vec<pb::RangeResponse>, pb::RangeResponse) {
    let mut s = c.range_stream(r).await.unwrap().into_inner();
    let mut chunks = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        chunks.push(m.range_response.unwrap());
    }
    let mut merged = pb::RangeResponse::default();
    for ch in &chunks {
        if ch.header.is_some() {
            merged.header = ch.header;
        }
        merged.kvs.extend(ch.kvs.iter().cloned());
        merged.count = merged.count.max(ch.count);
        merged.more |= ch.more;
    }
    (chunks, merged)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_stream_equals_range() {
    let dir = tempfile::tempdir().unwrap();
    let (_k, mut c, rev) = loaded(dir.path(), 6000, 600).await;
    // Overwrite some keys, so revisions and filters have something to tell apart.
    load(&mut c, 500, 10).await;
    let mut cases = vec![
        base("k", "l"),
        base("k000100", ""),
        base("nothing", ""),
        base("k", "\0"),
        base("\0", "\0"),
        base("k003000", "k003001"),
        base("z", "\0"),
    ];
    let mut limited = base("k", "l");
    limited.limit = 2500;
    cases.push(limited.clone());
    limited.limit = 6000;
    cases.push(limited.clone());
    limited.limit = 7000;
    cases.push(limited);
    let mut old = base("k", "l");
    old.revision = rev;
    cases.push(old.clone());
    old.keys_only = true;
    cases.push(old.clone());
    old.count_only = true;
    cases.push(old);
    for r in cases {
        let unary = c.range(r.clone()).await.unwrap().into_inner();
        let (chunks, merged) = stream(&mut c, r.clone()).await;
        assert_eq!(merged, unary, "{r:?}");
        let (last, middle) = chunks.split_last().unwrap();
        assert!(last.header.is_some());
        for ch in middle {
            assert!(ch.header.is_none() && ch.count == 0 && !ch.more, "{r:?}");
        }
        if r.key == "k" && r.range_end == "l" && r.limit == 0 && !r.count_only {
            assert!(
                chunks.len() > 2,
                "a big range comes in chunks: {}",
                chunks.len()
            );
        }
    }
    // What cannot stream is Unimplemented with etcd 3.7's messages, so clients fall back to
    // Range; sort order NONE streams whatever the target.
    let mut sorted = base("k", "l");
    sorted.sort_order = pb::range_request::SortOrder::Descend as i32;
    let mut filtered = base("k", "l");
    filtered.min_mod_revision = rev + 1;
    let mut both = sorted.clone();
    both.max_create_revision = 10;
    for (r, want) in [
        (sorted, "RangeStream does not support custom sort orders"),
        (filtered, "RangeStream does not support revision filters"),
        (both, "RangeStream does not support custom sort orders"),
    ] {
        let e = match c.range_stream(r).await {
            Err(s) => s,
            Ok(s) => s.into_inner().message().await.unwrap_err(),
        };
        assert_eq!((e.code(), e.message()), (tonic::Code::Unimplemented, want));
    }
    let mut by_mod = base("k", "l");
    by_mod.sort_target = pb::range_request::SortTarget::Mod as i32;
    let (_, merged) = stream(&mut c, by_mod).await;
    assert_eq!(merged.kvs.len(), 6000, "NONE order streams in key order");
    // A future revision is etcd's error.
    let mut future = base("k", "l");
    future.revision = 1 << 40;
    let mut s = c.range_stream(future).await.unwrap().into_inner();
    let e = s.message().await.unwrap_err();
    assert_eq!(
        e.message(),
        "etcdserver: mvcc: required revision is a future revision"
    );
}

/// A large Range is read a chunk at a time and goes out as encoded parts: every answer equals
/// the one built whole as a message (which a revision filter that drops nothing forces), field
/// for field, errors included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_ranges_in_parts_equal_the_message() {
    let dir = tempfile::tempdir().unwrap();
    let (_k, mut c, rev) = loaded(dir.path(), 12_000, 100).await;
    load(&mut c, 700, 10).await;
    let mut cases = vec![
        base("k", "l"),
        base("k", "\0"),
        base("\0", "\0"),
        base("k005000", "k009000"),
        base("nothing", "nothinh"),
        base("z", "\0"),
    ];
    for limit in [10_001, 11_999, 12_000, 12_001, 20_000] {
        let mut r = base("k", "l");
        r.limit = limit;
        cases.push(r);
    }
    let mut old = base("k", "l");
    old.revision = rev;
    cases.push(old.clone());
    old.keys_only = true;
    cases.push(old.clone());
    old.limit = 10_500;
    cases.push(old);
    let mut ascending = base("k", "l");
    ascending.sort_order = pb::range_request::SortOrder::Ascend as i32;
    cases.push(ascending);
    let mut future = base("k", "l");
    future.revision = 1 << 40;
    cases.push(future);
    let answer = |r: Result<tonic::Response<pb::RangeResponse>, tonic::Status>| {
        r.map(|r| r.into_inner())
            .map_err(|s| (s.code(), s.message().to_string()))
    };
    let check = |c: &mut Kv, r: pb::RangeRequest| {
        let mut c = c.clone();
        async move {
            let parts = answer(c.range(r.clone()).await);
            let mut whole = r.clone();
            whole.min_mod_revision = 1;
            let message = answer(c.range(whole).await);
            assert_eq!(parts, message, "{r:?}");
            parts
        }
    };
    for r in cases {
        let _ = check(&mut c, r).await;
    }
    let all = check(&mut c, base("k", "l")).await.unwrap();
    assert_eq!(
        (all.kvs.len(), all.count, all.more),
        (12_000, 12_000, false)
    );
    let limited = check(&mut c, {
        let mut r = base("k", "l");
        r.limit = 10_001;
        r
    })
    .await
    .unwrap();
    assert_eq!(
        (limited.kvs.len(), limited.count, limited.more),
        (10_001, 12_000, true)
    );
    // Below the compaction: etcd's error either way.
    c.compact(pb::CompactionRequest {
        revision: rev + 5,
        physical: true,
    })
    .await
    .unwrap();
    let mut compacted = base("k", "l");
    compacted.revision = rev;
    let e = check(&mut c, compacted).await.unwrap_err();
    assert_eq!(
        e.1,
        "etcdserver: mvcc: required revision has been compacted"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

/// 150 MB of values streamed to a slow reader: keel's RSS grows by a bounded amount, not by
/// the size of the result (a unary Range holds all of it at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_stream_memory_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let k = Keel::start_async(dir.path(), &[]).await;
    let mut c =
        pb::kv_client::KvClient::new(channel(&k.url()).await).max_decoding_message_size(usize::MAX);
    load(&mut c, 100_000, 1500).await;
    tokio::time::sleep(std::time::Duration::from_millis(2000)).await;
    let before = rss_kib(k.pid());
    let mut s = c
        .range_stream(pb::RangeRequest {
            key: Bytes::from_static(b"k"),
            range_end: Bytes::from_static(b"l"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut keys, mut peak) = (0, before);
    while let Some(m) = s.message().await.unwrap() {
        keys += m.range_response.unwrap().kvs.len();
        peak = peak.max(rss_kib(k.pid()));
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(keys, 100_000);
    let growth_mib = (peak.saturating_sub(before)) / 1024;
    assert!(
        growth_mib < 64,
        "RSS grew {growth_mib} MiB while streaming 150 MB"
    );
}
