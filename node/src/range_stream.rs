//! etcd 3.7's KV.RangeStream: a Range served in chunks, every chunk read at the revision the
//! stream started at, so server memory stays bounded however large the range. Merged, the
//! chunks are exactly the unary Range's response: intermediate chunks carry key-values only,
//! the last one also the header, `count` and `more`. Chunks grow or shrink toward
//! `CHUNK_TARGET_BYTES` (doubling or halving their key count, as etcd's adaptive sizing).

use std::sync::Arc;

use bytes::Bytes;
use keel_net::ApiError;
use keel_proto::pb;
use keel_proto::prost::Message;
use tokio::sync::mpsc;

use crate::watch::WatchContext;

/// Keys in the first chunk.
const FIRST_CHUNK_KEYS: i64 = 64;
/// What a chunk aims at.
const CHUNK_TARGET_BYTES: usize = 1 << 20;
/// Chunks queued toward the client (the rest waits for it).
const CHUNKS_QUEUED: usize = 2;
/// The pages of the backend map read for the stream leave RSS after this much.
const RELEASE_MAP_BYTES: usize = 8 << 20;

type Chunk = Result<pb::RangeStreamResponse, ApiError>;

/// Streams `r` once `ready` (the linearizable read's barrier) allows.
pub fn serve(
    ctx: Arc<WatchContext>,
    r: pb::RangeRequest,
    ready: impl std::future::Future<Output = Result<(), ApiError>> + Send + 'static,
) -> keel_net::RangeChunks {
    let (tx, rx) = mpsc::channel(CHUNKS_QUEUED);
    tokio::spawn(async move {
        let streamed = match ready.await {
            Ok(()) => stream(&ctx, r, &tx).await,
            Err(e) => Err(e),
        };
        if let Err(e) = streamed {
            let _ = tx.send(Err(e)).await;
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

fn chunk(resp: pb::RangeResponse) -> pb::RangeStreamResponse {
    pb::RangeStreamResponse {
        range_response: Some(resp),
    }
}

async fn stream(
    ctx: &WatchContext,
    r: pb::RangeRequest,
    tx: &mpsc::Sender<Chunk>,
) -> Result<(), ApiError> {
    // The client went away: stop reading.
    let gone = || ApiError::Internal("keel: range stream receiver gone".into());
    let now = ctx.mvcc.current_rev();
    let rev = if r.revision > 0 { r.revision } else { now };
    let limit = r.limit.max(0) as usize;
    let mut cursor = r.key.clone();
    let mut keys = FIRST_CHUNK_KEYS;
    let mut count = None;
    let mut sent = 0usize;
    let mut read_bytes = 0usize;
    loop {
        let q = pb::RangeRequest {
            key: cursor.clone(),
            range_end: r.range_end.clone(),
            revision: rev,
            limit: if r.count_only { 0 } else { keys },
            keys_only: r.keys_only,
            count_only: r.count_only,
            ..Default::default()
        };
        let resp = crate::apply::range(&*ctx.mvcc, &q)?;
        // The first read counts the whole range (later ones only what is left of it).
        let total = *count.get_or_insert(resp.count);
        let bytes: usize = resp.kvs.iter().map(|kv| kv.encoded_len()).sum();
        read_bytes += bytes;
        if read_bytes >= RELEASE_MAP_BYTES {
            ctx.mvcc.release_map();
            read_bytes = 0;
        }
        let last = resp.kvs.last().map(|kv| kv.key.clone());
        let rest = resp.more && !r.range_end.is_empty();
        // (Revision filters and sorting are refused before a stream starts, as etcd's.)
        let mut kvs = resp.kvs;
        let mut more = false;
        if limit > 0 && sent + kvs.len() > limit {
            kvs.truncate(limit - sent);
            more = true;
        }
        sent += kvs.len();
        if more || !rest || r.count_only {
            let last = pb::RangeResponse {
                header: Some(ctx.header(now)),
                kvs,
                more,
                count: total,
            };
            return tx.send(Ok(chunk(last))).await.map_err(|_| gone());
        }
        if !kvs.is_empty() {
            let part = pb::RangeResponse {
                kvs,
                ..Default::default()
            };
            tx.send(Ok(chunk(part))).await.map_err(|_| gone())?;
        }
        let mut next = last.expect("more keys follow a non-empty chunk").to_vec();
        next.push(0);
        cursor = Bytes::from(next);
        if bytes < CHUNK_TARGET_BYTES / 2 {
            keys = (keys * 2).min(1 << 20);
        } else if bytes > CHUNK_TARGET_BYTES {
            keys = (keys / 2).max(1);
        }
    }
}
