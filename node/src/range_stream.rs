//! etcd 3.7's KV.RangeStream: a Range served in chunks, every chunk read at the revision the
//! stream started at, so server memory stays bounded however large the range. Merged, the
//! chunks are exactly the unary Range's response: intermediate chunks carry key-values only,
//! the last one also the header, `count` and `more`. Chunks grow or shrink toward
//! `CHUNK_TARGET_BYTES` (doubling or halving their key count, as etcd's adaptive sizing).
//!
//! A large unary Range is read the same way, each chunk encoded as it is read (`encoded`).

use std::sync::Arc;

use bytes::Bytes;
use keel_net::{ApiError, RangeOut};
use keel_proto::mvccpb::KeyValue;
use keel_proto::pb;
use keel_proto::prost::Message;
use keel_storage::mvcc::ReadPin;
use tokio::sync::mpsc;

use crate::watch::WatchContext;

/// Keys in the first chunk.
const FIRST_CHUNK_KEYS: i64 = 64;
/// What a chunk aims at.
const CHUNK_TARGET_BYTES: usize = 1 << 20;
/// Chunks queued toward the client (the rest waits for it).
const CHUNKS_QUEUED: usize = 2;
/// A Range with a limit above this is read in chunks as well (kube-apiserver pages by 500 or
/// 10000).
const ENCODED_LIMIT_MIN: i64 = 10_000;
/// The pages of the backend map read for the stream leave RSS after this much.
const RELEASE_MAP_BYTES: usize = 8 << 20;

type Streamed = Result<pb::RangeStreamResponse, ApiError>;

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

/// Reads a range a chunk at a time, every chunk at the revision the read started at: what
/// RangeStream streams, and what a large Range encodes piece by piece.
struct Chunks {
    r: pb::RangeRequest,
    /// The revision every chunk is read at, and the store's revision when the read started.
    rev: i64,
    now: i64,
    limit: usize,
    cursor: Bytes,
    /// Keys to ask for in the next chunk.
    keys: i64,
    /// The whole range's count, from the first read.
    count: Option<i64>,
    sent: usize,
    read_bytes: usize,
    /// Reads every chunk under a pin of `rev` (a unary Range, which etcd reads in one
    /// transaction: a compaction while it is read must not fail it). RangeStream reads
    /// unpinned, as etcd 3.7 reads each chunk as a Range of its own.
    pinned: bool,
    pin: Option<ReadPin>,
}

enum Chunk {
    /// Key-values with more to follow.
    Part(Vec<KeyValue>),
    /// The last key-values, the response's `more` and `count`.
    Last(Vec<KeyValue>, bool, i64),
}

impl Chunks {
    fn new(ctx: &WatchContext, r: pb::RangeRequest, pinned: bool) -> Chunks {
        let now = ctx.mvcc.current_rev();
        Chunks {
            rev: if r.revision > 0 { r.revision } else { now },
            now,
            limit: r.limit.max(0) as usize,
            cursor: r.key.clone(),
            keys: FIRST_CHUNK_KEYS,
            count: None,
            sent: 0,
            read_bytes: 0,
            pinned,
            pin: None,
            r,
        }
    }

    fn next(&mut self, ctx: &WatchContext) -> Result<Chunk, ApiError> {
        let r = &self.r;
        let q = pb::RangeRequest {
            key: self.cursor.clone(),
            range_end: r.range_end.clone(),
            revision: self.rev,
            limit: if r.count_only { 0 } else { self.keys },
            keys_only: r.keys_only,
            count_only: r.count_only,
            ..Default::default()
        };
        if self.pinned && self.pin.is_none() {
            self.pin = Some(ctx.mvcc.pin(self.rev).map_err(crate::apply::storage_err)?);
        }
        let resp = match &self.pin {
            Some(pin) => crate::apply::range(pin, &q)?,
            None => crate::apply::range(&*ctx.mvcc, &q)?,
        };
        if self.count.is_none() {
            // A revision asked for past the start's is there by now (else the read failed):
            // the header's revision is at least it, as etcd's.
            let read_at = resp.header.as_ref().map_or(0, |h| h.revision);
            self.now = self.now.max(read_at);
        }
        // The first read counts the whole range (later ones only what is left of it).
        let total = *self.count.get_or_insert(resp.count);
        let bytes: usize = resp.kvs.iter().map(|kv| kv.encoded_len()).sum();
        self.read_bytes += bytes;
        if self.read_bytes >= RELEASE_MAP_BYTES {
            ctx.mvcc.release_map();
            self.read_bytes = 0;
        }
        let last = resp.kvs.last().map(|kv| kv.key.clone());
        let rest = resp.more && !r.range_end.is_empty();
        // (Revision filters and sorting are refused before a stream starts, as etcd's, and
        // never take this way for a Range.)
        let mut kvs = resp.kvs;
        let mut more = false;
        if self.limit > 0 && self.sent + kvs.len() > self.limit {
            kvs.truncate(self.limit - self.sent);
            more = true;
        }
        self.sent += kvs.len();
        if more || !rest || r.count_only {
            return Ok(Chunk::Last(kvs, more, total));
        }
        let mut next = last.expect("more keys follow a non-empty chunk").to_vec();
        next.push(0);
        self.cursor = Bytes::from(next);
        if bytes < CHUNK_TARGET_BYTES / 2 {
            self.keys = (self.keys * 2).min(1 << 20);
        } else if bytes > CHUNK_TARGET_BYTES {
            self.keys = (self.keys / 2).max(1);
        }
        Ok(Chunk::Part(kvs))
    }
}

async fn stream(
    ctx: &WatchContext,
    r: pb::RangeRequest,
    tx: &mpsc::Sender<Streamed>,
) -> Result<(), ApiError> {
    // The client went away: stop reading.
    let gone = || ApiError::Internal("keel: range stream receiver gone".into());
    let mut chunks = Chunks::new(ctx, r, false);
    loop {
        match chunks.next(ctx)? {
            Chunk::Part(kvs) => {
                if kvs.is_empty() {
                    continue;
                }
                let part = pb::RangeResponse {
                    kvs,
                    ..Default::default()
                };
                tx.send(Ok(chunk(part))).await.map_err(|_| gone())?;
            }
            Chunk::Last(kvs, more, count) => {
                let last = pb::RangeResponse {
                    header: Some(ctx.header(chunks.now)),
                    kvs,
                    more,
                    count,
                };
                return tx.send(Ok(chunk(last))).await.map_err(|_| gone());
            }
        }
    }
}

/// Whether a Range goes out as encoded parts: a span with no limit or a large one, in key
/// order, with no revision filters and not count-only (anything else is small or needs
/// every key-value at once).
pub fn encodes(r: &pb::RangeRequest) -> bool {
    use pb::range_request::{SortOrder, SortTarget};
    let by_key = r.sort_target == SortTarget::Key as i32;
    let natural = by_key
        && (r.sort_order == SortOrder::None as i32 || r.sort_order == SortOrder::Ascend as i32);
    !r.range_end.is_empty()
        && (r.limit <= 0 || r.limit > ENCODED_LIMIT_MIN)
        && natural
        && !r.count_only
        && !keel_net::validate::has_revision_filters(r)
}

/// A Range read a chunk at a time into encoded parts: the same response, byte for byte, as
/// the message, holding one chunk's key-values at a time beside the encoded ones.
pub fn encoded(ctx: &WatchContext, r: pb::RangeRequest) -> Result<RangeOut, ApiError> {
    let mut chunks = Chunks::new(ctx, r, true);
    let mut pieces = Vec::new();
    let frame = |kvs: &[KeyValue]| {
        let mut b = Vec::with_capacity(kvs.iter().map(keel_net::range::framed_kv_len).sum());
        for kv in kvs {
            keel_net::range::frame_kv(kv, &mut b);
        }
        Bytes::from(b)
    };
    loop {
        match chunks.next(ctx)? {
            Chunk::Part(kvs) => pieces.push(frame(&kvs)),
            Chunk::Last(kvs, more, count) => {
                pieces.push(frame(&kvs));
                return Ok(RangeOut::Parts {
                    header: ctx.header(chunks.now),
                    kvs: pieces,
                    more,
                    count,
                });
            }
        }
    }
}
