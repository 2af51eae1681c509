//! Watch: the hub the raft core publishes committed changes to, and the per-stream task that
//! serves etcd's Watch stream on a net core.
//!
//! The hub is a bounded broadcast ring of committed revisions (`HUB_REVISIONS`). The raft core
//! only appends to it and never waits: a stream that falls behind by more than the ring holds
//! loses its place ("lagged") and every watcher it serves moves to the catch-up path, which
//! reads the history out of the store (etcd's unsynced group). A stream whose client stops
//! reading blocks only itself: its queue is bounded in entries (`STREAM_RESPONSES`, each
//! the responses of one fan-out) and in bytes (`STREAM_BYTES` queued, plus the entry the
//! transport is writing), so it stops taking events from the ring, lags, and later catches up
//! from the store. Neither apply nor memory waits on a slow watcher.
//!
//! Invariants, per stream:
//! - `delivered`: every synced watcher has been sent every event at or below it. It starts at
//!   the store's revision when the stream subscribed (everything at or below is in the store;
//!   everything above comes through the ring) and follows the ring.
//! - A watcher's `next_rev` is the first revision it has not been sent. A synced watcher takes
//!   events from the ring at or above `next_rev`; an unsynced one reads `next_rev ..= now` from
//!   the store in chunks of whole revisions, and becomes synced with `next_rev = now + 1`
//!   (anything at or below `now` still in the ring is then skipped for it).
//! - Events reach a watcher in revision order, each once; one revision's events go in one
//!   response unless the watcher asked for fragments.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use keel_net::{ApiError, WatchOut};
use keel_proto::mvccpb::{event::EventType, Event, KeyValue};
use keel_proto::pb;
use keel_proto::prost::Message;
use keel_storage::mvcc::{Change, KeyRange, Mvcc, RangeOptions};
use keel_storage::store::EventSink;
use keel_storage::Error as StoreError;
use tokio::sync::{broadcast, mpsc, Semaphore};
use tokio_stream::{Stream, StreamExt};

use crate::raft_core::RaftStatus;

/// Committed revisions the hub holds for streams that are behind.
const HUB_REVISIONS: usize = 4096;
/// Changes per read of the catch-up path (whole revisions, so possibly more).
const CATCH_UP_CHANGES: usize = 1000;
/// Queue entries (a fan-out's responses each) a stream holds toward its client before it
/// stops taking events.
const STREAM_RESPONSES: usize = 64;
/// ... and about this many bytes of events (responses carrying several revisions are big).
const STREAM_BYTES: usize = 256 << 10;
/// etcd's watch ID for responses not tied to one watcher (progress for the whole stream).
const NO_WATCH_ID: i64 = -1;
/// A stream that is behind takes up to this many revisions waiting in the ring at once and
/// sends each watcher one response for all of them (as etcd's catch-up responses carry
/// several revisions), so a backed-up stream spends its time on events rather than on
/// per-response overhead. A stream that keeps up finds one revision waiting and sends it
/// alone.
const BATCH_REVISIONS: usize = 256;
/// ... and up to about this many bytes of events (a response stays far below clients'
/// receive limits, 4 MiB by default in gRPC libraries).
const BATCH_BYTES: usize = 256 << 10;
/// What an event adds to its key and value, encoded (revisions, version, framing).
const EVENT_OVERHEAD_BYTES: usize = 32;

/// The changes of one committed revision, as watch events.
pub struct Revision {
    pub rev: i64,
    pub events: Vec<Event>,
    /// Each event encoded: by the first stream that sends it, then shared by every stream
    /// and watcher (an event fanned out to a thousand watchers is encoded once; one no
    /// watcher wants, never).
    encoded: Box<[OnceLock<Bytes>]>,
}

impl Revision {
    pub fn new(rev: i64, events: Vec<Event>) -> Revision {
        let encoded = events.iter().map(|_| OnceLock::new()).collect();
        Revision {
            rev,
            events,
            encoded,
        }
    }

    fn encoded(&self, i: usize) -> &Bytes {
        self.encoded[i].get_or_init(|| encode_event(&self.events[i]))
    }
}

fn encode_event(e: &Event) -> Bytes {
    Bytes::from(e.encode_to_vec())
}

/// What a response takes in memory besides its bytes (its slot, its parts).
const RESPONSE_MEMORY_BYTES: usize = 64;

/// A watcher's events as the responses that carry them: one, or (for a watcher that asked
/// for fragments, when they are too big for one message) etcd's sendFragments: as many
/// events per message as fit under `limit` (at least one), `fragment` set on all but the
/// last. `header` is the responses' header field (`keel_net::watch::header_field`).
fn events_responses(
    header: &Bytes,
    watch_id: i64,
    fragment: bool,
    limit: usize,
    events: Vec<Bytes>,
    out: &mut Vec<WatchOut>,
) {
    let response = |fragment: bool, events: Vec<Bytes>| WatchOut::Events {
        header: header.clone(),
        watch_id,
        fragment,
        events,
    };
    let body: usize = events
        .iter()
        .map(|e| keel_net::watch::framed_event_len(e))
        .sum();
    let whole = response(false, Vec::new()).encoded_len() + body;
    if !fragment || events.len() < 2 || whole < limit {
        out.push(response(false, events));
        return;
    }
    let shell = response(true, Vec::new()).encoded_len();
    let mut part = Vec::new();
    let mut size = shell;
    for e in events {
        let grow = keel_net::watch::framed_event_len(&e);
        if !part.is_empty() && size + grow >= limit {
            out.push(response(true, std::mem::take(&mut part)));
            size = shell;
        }
        size += grow;
        part.push(e);
    }
    out.push(response(false, part));
}

/// An event with the key's version just before it, encoded.
fn encode_with_prev(mvcc: &Mvcc, mut ev: Event) -> Bytes {
    ev.prev_kv = prev_kv(mvcc, &ev);
    encode_event(&ev)
}

/// The key's version just before the event (none for a create, or if it did not exist or
/// was compacted).
fn prev_kv(mvcc: &Mvcc, ev: &Event) -> Option<KeyValue> {
    let kv = ev.kv.as_ref()?;
    let create = ev.r#type == EventType::Put as i32 && kv.create_revision == kv.mod_revision;
    if create || kv.mod_revision <= 1 {
        return None;
    }
    let opts = RangeOptions {
        rev: kv.mod_revision - 1,
        ..Default::default()
    };
    let mut r = mvcc.range(KeyRange::Single(&kv.key), opts).ok()?;
    r.kvs.pop()
}

/// The bytes of an event's keys and values (its key-value and previous key-value).
fn event_bytes(e: &Event) -> usize {
    let len = |kv: &Option<KeyValue>| kv.as_ref().map_or(0, |kv| kv.key.len() + kv.value.len());
    len(&e.kv) + len(&e.prev_kv)
}

/// About what a revision's events take encoded.
fn encoded_bytes(rev: &Revision) -> usize {
    rev.events
        .iter()
        .map(|e| event_bytes(e) + EVENT_OVERHEAD_BYTES)
        .sum()
}

pub type Hub = broadcast::Sender<Arc<Revision>>;

pub fn hub() -> Hub {
    broadcast::channel(HUB_REVISIONS).0
}

/// The store's event sink: publishes each committed revision to the hub (only while some
/// stream listens).
pub struct HubSink(pub Hub);

impl EventSink for HubSink {
    fn publish(&mut self, rev: i64, changes: &[Change]) {
        if self.0.receiver_count() == 0 {
            return;
        }
        let events = changes.iter().map(|(_, kv)| event_of(kv.clone())).collect();
        let _ = self.0.send(Arc::new(Revision::new(rev, events)));
    }
}

/// A change as etcd's event: a delete's key-value holds only the key and its mod revision.
fn event_of(kv: KeyValue) -> Event {
    let kind = if kv.version == 0 {
        EventType::Delete
    } else {
        EventType::Put
    };
    Event {
        r#type: kind as i32,
        kv: Some(kv),
        prev_kv: None,
    }
}

/// What every watch stream of the node shares.
pub struct WatchContext {
    pub mvcc: Arc<Mvcc>,
    pub hub: Hub,
    pub status: Arc<RaftStatus>,
    pub cluster_id: u64,
    pub member_id: u64,
    /// etcd fragments a response above --max-request-bytes for watchers that ask for it.
    pub max_request_bytes: usize,
    pub progress_interval: Duration,
}

impl WatchContext {
    pub fn header(&self, revision: i64) -> pb::ResponseHeader {
        pb::ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision,
            raft_term: self.status.term.load(Ordering::Acquire),
        }
    }
}

/// A stream hands its core's freed memory back every this many watcher creations.
const CREATES_PER_COLLECT: u64 = 1024;

pub type Responses = Pin<Box<dyn Stream<Item = Result<WatchOut, ApiError>> + Send>>;

/// Serves one Watch stream: spawns its task on the calling (net core's) runtime.
pub fn serve(
    ctx: Arc<WatchContext>,
    requests: Pin<Box<dyn Stream<Item = pb::WatchRequest> + Send>>,
) -> Responses {
    let (tx, rx) = mpsc::channel::<(Vec<Result<WatchOut, ApiError>>, usize)>(STREAM_RESPONSES);
    let budget = Arc::new(Semaphore::new(STREAM_BYTES));
    tokio::spawn(run(
        ctx,
        requests,
        Out {
            tx,
            budget: budget.clone(),
        },
    ));
    // Bytes taken by the transport go back to the stream's budget.
    Box::pin(futures::StreamExt::flat_map(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        move |(rs, bytes)| {
            budget.add_permits(bytes);
            tokio_stream::iter(rs)
        },
    ))
}

/// A stream's way to its client: responses, several to a queue entry, with their charge
/// against its byte budget.
#[derive(Clone)]
struct Out {
    tx: mpsc::Sender<(Vec<Result<WatchOut, ApiError>>, usize)>,
    budget: Arc<Semaphore>,
}

impl Out {
    /// Sends a response other than events (those are not charged).
    async fn send(&self, r: Result<WatchOut, ApiError>) -> Result<(), Gone> {
        self.put(vec![r], 0).await
    }

    /// Sends event responses, charged what they take encoded (what the transport copies
    /// out): as few queue entries as the byte budget allows (one for a revision fanned out
    /// to a stream's watchers). Their events are shared, so holding them costs little more.
    async fn send_events(&self, responses: Vec<WatchOut>) -> Result<(), Gone> {
        let mut entry = Vec::new();
        let mut bytes = 0;
        for r in responses {
            let cost = (r.encoded_len() + RESPONSE_MEMORY_BYTES).min(STREAM_BYTES);
            if bytes + cost > STREAM_BYTES && !entry.is_empty() {
                self.put(std::mem::take(&mut entry), bytes).await?;
                bytes = 0;
            }
            bytes += cost;
            entry.push(Ok(r));
        }
        if entry.is_empty() {
            return Ok(());
        }
        self.put(entry, bytes).await
    }

    async fn put(&self, rs: Vec<Result<WatchOut, ApiError>>, bytes: usize) -> Result<(), Gone> {
        if bytes > 0 {
            // A client that goes while its queue is full takes the queued responses (and the
            // permits they hold) with it: waiting for permits must end with it.
            let permit = tokio::select! {
                p = self.budget.acquire_many(bytes as u32) => p.map_err(|_| Gone)?,
                _ = self.tx.closed() => return Err(Gone),
            };
            permit.forget();
        }
        self.tx.send((rs, bytes)).await.map_err(|_| Gone)
    }

    async fn closed(&self) {
        self.tx.closed().await
    }
}

/// One watcher, kept small (tens of thousands live on a core): its key and range end share
/// one allocation, its options and state are bits.
struct Watcher {
    /// The key, then for a span the range end (empty: every key from the key on).
    bytes: Box<[u8]>,
    /// Where the key ends in `bytes`.
    key_len: u32,
    flags: u16,
    /// The start revision asked for (0: none).
    start_rev: i64,
    next_rev: i64,
}

/// `Watcher::flags`: what it asked for...
const NO_PUT: u16 = 1;
const NO_DELETE: u16 = 1 << 1;
const PREV_KV: u16 = 1 << 2;
const PROGRESS_NOTIFY: u16 = 1 << 3;
const FRAGMENT: u16 = 1 << 4;
/// ... a range rather than one key ...
const SPAN: u16 = 1 << 5;
/// ... and where it is: taking events from the ring;
const SYNCED: u16 = 1 << 6;
/// canceled by a compaction: it takes nothing more, but keeps its ID until the client
/// cancels it (as etcd's);
const COMPACTED: u16 = 1 << 7;
/// sent events since the last periodic progress tick (which then skips it, as etcd's).
const SENT_SINCE_TICK: u16 = 1 << 8;

impl Watcher {
    fn is(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    fn set(&mut self, flag: u16, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    fn range(&self) -> KeyRange<'_> {
        let (key, end) = self.bytes.split_at(self.key_len as usize);
        if self.is(SPAN) {
            KeyRange::Span(key, end)
        } else {
            KeyRange::Single(key)
        }
    }

    /// Unsynced and not canceled by a compaction: the catch-up path owes it history.
    fn catching_up(&self) -> bool {
        !self.is(SYNCED) && !self.is(COMPACTED)
    }

    /// Has been sent everything at or below `delivered` and wants nothing below its start:
    /// a progress response may vouch for it (etcd's progressIfSync).
    fn progress_ready(&self, delivered: i64) -> bool {
        self.is(SYNCED) && !self.is(COMPACTED) && self.start_rev <= delivered
    }

    fn wants(&self, ev: &Event) -> bool {
        let Some(kv) = &ev.kv else { return false };
        let delete = ev.r#type == EventType::Delete as i32;
        !(delete && self.is(NO_DELETE) || !delete && self.is(NO_PUT))
            && self.range().contains(&kv.key)
    }
}

/// The client is gone (or the stream failed): stop serving.
struct Gone;

struct WatchStream {
    ctx: Arc<WatchContext>,
    out: Out,
    watchers: BTreeMap<i64, Watcher>,
    next_id: i64,
    /// Watchers created on this stream so far.
    created: u64,
    delivered: i64,
    /// Where the catch-up path goes next (round robin over unsynced watchers).
    catch_up_from: i64,
}

async fn run(
    ctx: Arc<WatchContext>,
    mut requests: Pin<Box<dyn Stream<Item = pb::WatchRequest> + Send>>,
    out: Out,
) {
    let mut ring = ctx.hub.subscribe();
    let progress_every = ctx.progress_interval;
    let mut s = WatchStream {
        delivered: ctx.mvcc.current_rev(),
        ctx,
        out,
        watchers: BTreeMap::new(),
        next_id: 0,
        created: 0,
        catch_up_from: 0,
    };
    let mut progress =
        tokio::time::interval_at(tokio::time::Instant::now() + progress_every, progress_every);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut requests_open = true;
    loop {
        let catching_up = s.watchers.values().any(Watcher::catching_up);
        let out = s.out.clone();
        let step = tokio::select! {
            r = requests.next(), if requests_open => match r {
                Some(req) => s.handle(req, &mut ring).await,
                // etcd keeps serving a stream whose client closed its sending side.
                None => {
                    requests_open = false;
                    Ok(())
                }
            },
            m = ring.recv() => match m {
                Ok(rev) => s.take_batch(rev, &mut ring).await,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    s.lagged();
                    Ok(())
                }
                Err(broadcast::error::RecvError::Closed) => Err(Gone),
            },
            _ = progress.tick() => s.progress_notify(&mut ring).await,
            _ = std::future::ready(()), if catching_up => s.catch_up().await,
            _ = out.closed() => Err(Gone),
        };
        if step.is_err() {
            return;
        }
    }
}

impl WatchStream {
    async fn send(&self, r: pb::WatchResponse) -> Result<(), Gone> {
        self.out.send(Ok(WatchOut::Message(r))).await
    }

    async fn handle(
        &mut self,
        req: pb::WatchRequest,
        ring: &mut broadcast::Receiver<Arc<Revision>>,
    ) -> Result<(), Gone> {
        use pb::watch_request::RequestUnion;
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => {
                self.created += 1;
                if self.created.is_multiple_of(CREATES_PER_COLLECT) {
                    // Creating watchers by the thousand leaves decoded requests and sent
                    // responses freed on this core, which stay in RSS while the core is busy
                    // (it purges only when idle): hand them back every so many creates.
                    crate::return_freed_memory();
                }
                self.create(c).await
            }
            Some(RequestUnion::CancelRequest(c)) => {
                if self.watchers.remove(&c.watch_id).is_none() {
                    return Ok(());
                }
                let r = pb::WatchResponse {
                    header: Some(self.ctx.header(self.ctx.mvcc.current_rev())),
                    watch_id: c.watch_id,
                    canceled: true,
                    ..Default::default()
                };
                self.send(r).await
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                // etcd 3.6 (and 3.4.25+/3.5.8+): answered only when every watcher of the
                // stream is synced and past its start revision, else not at all (the client
                // asks again); a stream without watchers gets nothing either.
                self.drain(ring).await?;
                let delivered = self.delivered;
                let ready = |w: &Watcher| w.progress_ready(delivered);
                if !self.watchers.is_empty() && self.watchers.values().all(ready) {
                    self.send_progress(NO_WATCH_ID).await?;
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    async fn create(&mut self, c: pb::WatchCreateRequest) -> Result<(), Gone> {
        use pb::watch_create_request::FilterType;
        let current = self.ctx.mvcc.current_rev();
        // etcd's normalisation: an empty key is "\0"; range_end "\0" means every key from
        // `key` on; an empty range_end, the key alone.
        let key = if c.key.is_empty() {
            vec![0]
        } else {
            c.key.to_vec()
        };
        let end = match &c.range_end[..] {
            [] => None,
            [0] => Some(Vec::new()),
            e => Some(e.to_vec()),
        };
        let refuse = |reason: &str| pb::WatchResponse {
            header: Some(self.ctx.header(current)),
            watch_id: NO_WATCH_ID,
            created: true,
            canceled: true,
            cancel_reason: reason.to_string(),
            ..Default::default()
        };
        if c.start_revision < 0 {
            return self.send(refuse(&ApiError::Compacted.to_string())).await;
        }
        if matches!(&end, Some(e) if !e.is_empty() && key >= *e) {
            return self.send(refuse("mvcc: watcher range is empty")).await;
        }
        let key_len = key.len();
        let id = if c.watch_id == 0 {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        } else if self.watchers.contains_key(&c.watch_id) {
            let reason = "mvcc: duplicate watch ID provided on the WatchStream";
            return self.send(refuse(reason)).await;
        } else {
            c.watch_id
        };
        let next_rev = if c.start_revision == 0 {
            current + 1
        } else {
            c.start_revision
        };
        let mut bytes = key;
        if let Some(e) = &end {
            bytes.extend_from_slice(e);
        }
        let mut w = Watcher {
            bytes: bytes.into_boxed_slice(),
            key_len: key_len as u32,
            flags: 0,
            start_rev: c.start_revision,
            next_rev,
        };
        w.set(SPAN, end.is_some());
        w.set(NO_PUT, c.filters.contains(&(FilterType::Noput as i32)));
        w.set(
            NO_DELETE,
            c.filters.contains(&(FilterType::Nodelete as i32)),
        );
        w.set(PREV_KV, c.prev_kv);
        w.set(PROGRESS_NOTIFY, c.progress_notify);
        w.set(FRAGMENT, c.fragment);
        w.set(SYNCED, next_rev > current);
        self.watchers.insert(id, w);
        self.send(pb::WatchResponse {
            header: Some(self.ctx.header(current)),
            watch_id: id,
            created: true,
            ..Default::default()
        })
        .await
    }

    /// Takes every revision waiting in the ring, so `delivered` is as fresh as it can be.
    async fn drain(&mut self, ring: &mut broadcast::Receiver<Arc<Revision>>) -> Result<(), Gone> {
        loop {
            match ring.try_recv() {
                Ok(rev) => self.take_batch(rev, ring).await?,
                Err(broadcast::error::TryRecvError::Lagged(_)) => self.lagged(),
                Err(broadcast::error::TryRecvError::Empty) => return Ok(()),
                Err(broadcast::error::TryRecvError::Closed) => return Err(Gone),
            }
        }
    }

    /// Dispatches `first` with whatever else is waiting in the ring right behind it, up to
    /// `BATCH_REVISIONS` / `BATCH_BYTES`.
    async fn take_batch(
        &mut self,
        first: Arc<Revision>,
        ring: &mut broadcast::Receiver<Arc<Revision>>,
    ) -> Result<(), Gone> {
        let mut bytes = encoded_bytes(&first);
        let mut batch = vec![first];
        let mut lagged = false;
        let mut closed = false;
        while batch.len() < BATCH_REVISIONS && bytes < BATCH_BYTES {
            match ring.try_recv() {
                Ok(rev) => {
                    bytes += encoded_bytes(&rev);
                    batch.push(rev);
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    lagged = true;
                    break;
                }
                Err(broadcast::error::TryRecvError::Empty) => break,
                Err(broadcast::error::TryRecvError::Closed) => {
                    closed = true;
                    break;
                }
            }
        }
        // The batch holds consecutive revisions from before any lag: they go out first, then
        // everything moves to the catch-up path.
        self.dispatch(&batch).await?;
        if lagged {
            self.lagged();
        }
        if closed {
            return Err(Gone);
        }
        Ok(())
    }

    /// Sends consecutive committed revisions' events to the synced watchers that want them:
    /// one response per watcher for the whole batch. Each event is encoded once (once with
    /// its previous version, if some watcher asked for it), whatever the number of watchers.
    async fn dispatch(&mut self, batch: &[Arc<Revision>]) -> Result<(), Gone> {
        let delivered = self.delivered;
        let revs: Vec<&Revision> = batch
            .iter()
            .map(|r| r.as_ref())
            .filter(|r| r.rev > delivered)
            .collect();
        let Some(last) = revs.last().map(|r| r.rev) else {
            return Ok(());
        };
        self.delivered = last;
        let header = keel_net::watch::header_field(&self.ctx.header(last));
        let limit = self.ctx.max_request_bytes + keel_net::GRPC_OVERHEAD_BYTES;
        let mvcc = &self.ctx.mvcc;
        let mut with_prev: HashMap<(usize, usize), Bytes> = HashMap::new();
        let mut sends: Vec<WatchOut> = Vec::new();
        for (id, w) in self.watchers.iter_mut() {
            if !w.is(SYNCED) || w.is(COMPACTED) || w.next_rev > last {
                continue;
            }
            let mut events: Vec<Bytes> = Vec::new();
            for (ri, r) in revs.iter().enumerate() {
                if r.rev < w.next_rev {
                    continue;
                }
                for (ei, e) in r.events.iter().enumerate() {
                    if !w.wants(e) {
                        continue;
                    }
                    events.push(if w.is(PREV_KV) {
                        with_prev
                            .entry((ri, ei))
                            .or_insert_with(|| encode_with_prev(mvcc, e.clone()))
                            .clone()
                    } else {
                        r.encoded(ei).clone()
                    });
                }
            }
            w.next_rev = last + 1;
            if !events.is_empty() {
                w.set(SENT_SINCE_TICK, true);
                events_responses(&header, *id, w.is(FRAGMENT), limit, events, &mut sends);
            }
        }
        self.out.send_events(sends).await
    }

    /// The stream fell out of the ring: every synced watcher catches up from the store.
    fn lagged(&mut self) {
        for w in self.watchers.values_mut() {
            w.set(SYNCED, false);
        }
    }

    /// One step of the catch-up path: one read for one unsynced watcher.
    async fn catch_up(&mut self) -> Result<(), Gone> {
        let next = self
            .watchers
            .range(self.catch_up_from..)
            .chain(self.watchers.range(..self.catch_up_from))
            .find(|(_, w)| w.catching_up())
            .map(|(id, _)| *id);
        let Some(id) = next else { return Ok(()) };
        self.catch_up_from = id + 1;
        let mvcc = self.ctx.mvcc.clone();
        let now = mvcc.current_rev();
        let w = self.watchers.get_mut(&id).expect("found above");
        if w.next_rev > now {
            w.set(SYNCED, true);
            return Ok(());
        }
        match mvcc.changes(w.range(), w.next_rev, now, CATCH_UP_CHANGES) {
            Ok((changes, last)) => {
                w.next_rev = last + 1;
                w.set(SYNCED, last >= now);
                let prev = w.is(PREV_KV);
                let events: Vec<Bytes> = changes
                    .into_iter()
                    .map(|(_, kv)| event_of(kv))
                    .filter(|e| w.wants(e))
                    .map(|e| {
                        if prev {
                            encode_with_prev(&mvcc, e)
                        } else {
                            encode_event(&e)
                        }
                    })
                    .collect();
                if !events.is_empty() {
                    self.send_events(id, events, now).await?;
                }
                Ok(())
            }
            Err(StoreError::Compacted) => {
                w.set(COMPACTED, true);
                // As etcd: the header carries no revision, compact_revision says where
                // history now starts; the ID stays taken until the client cancels it.
                let r = pb::WatchResponse {
                    header: Some(self.ctx.header(0)),
                    watch_id: id,
                    canceled: true,
                    compact_revision: mvcc.compact_rev(),
                    ..Default::default()
                };
                self.send(r).await
            }
            Err(e) => {
                let _ = self.out.send(Err(ApiError::Internal(e.to_string()))).await;
                Err(Gone)
            }
        }
    }

    /// Sends `events` (encoded, with their previous versions if it asked) to watcher `id`,
    /// split into fragments if it asked for them and they are too big for one message.
    async fn send_events(
        &mut self,
        id: i64,
        events: Vec<Bytes>,
        header_rev: i64,
    ) -> Result<(), Gone> {
        let Some(w) = self.watchers.get_mut(&id) else {
            return Ok(());
        };
        w.set(SENT_SINCE_TICK, true);
        let header = keel_net::watch::header_field(&self.ctx.header(header_rev));
        let limit = self.ctx.max_request_bytes + keel_net::GRPC_OVERHEAD_BYTES;
        let mut parts = Vec::new();
        events_responses(&header, id, w.is(FRAGMENT), limit, events, &mut parts);
        self.out.send_events(parts).await
    }

    /// A progress response for the whole stream (`NO_WATCH_ID`) or one watcher: every event
    /// at or below its header revision has been sent.
    async fn send_progress(&self, watch_id: i64) -> Result<(), Gone> {
        self.send(pb::WatchResponse {
            header: Some(self.ctx.header(self.delivered)),
            watch_id,
            ..Default::default()
        })
        .await
    }

    /// The periodic progress notification, to each synced watcher that asked for it and was
    /// sent no events since the last tick.
    async fn progress_notify(
        &mut self,
        ring: &mut broadcast::Receiver<Arc<Revision>>,
    ) -> Result<(), Gone> {
        self.drain(ring).await?;
        let delivered = self.delivered;
        let mut ids = Vec::new();
        for (id, w) in self.watchers.iter_mut() {
            let quiet = !w.is(SENT_SINCE_TICK);
            w.set(SENT_SINCE_TICK, false);
            if w.is(PROGRESS_NOTIFY) && quiet && w.progress_ready(delivered) {
                ids.push(*id);
            }
        }
        for id in ids {
            self.send_progress(id).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use keel_storage::mvcc::{Key, KeyRev};

    /// A client that goes while its stream's queue is full (the stream waiting for budget)
    /// ends the stream: its task, watchers and place in the hub go with it.
    #[tokio::test]
    async fn a_stream_whose_client_goes_while_its_queue_is_full_ends() {
        let mvcc = Arc::new(Mvcc::new());
        let hub = hub();
        let ctx = Arc::new(WatchContext {
            mvcc: mvcc.clone(),
            hub: hub.clone(),
            status: Arc::new(RaftStatus::default()),
            cluster_id: 1,
            member_id: 1,
            max_request_bytes: 1 << 20,
            progress_interval: Duration::from_secs(600),
        });
        let (req_tx, req_rx) = mpsc::channel(4);
        let mut responses = serve(
            ctx,
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(req_rx)),
        );
        let create = pb::watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
            key: Bytes::from_static(b"k"),
            ..Default::default()
        });
        req_tx
            .send(pb::WatchRequest {
                request_union: Some(create),
            })
            .await
            .unwrap();
        let created = responses.next().await.unwrap().unwrap().into_message();
        assert!(created.created);
        // 2 MiB of events for a client that reads nothing: far past the stream's budget.
        let mut sink = HubSink(hub.clone());
        let start = mvcc.current_rev() + 1;
        for rev in start..start + 32 {
            let kv = KeyValue {
                key: Bytes::from_static(b"k"),
                value: Bytes::from(vec![b'v'; 64 << 10]),
                create_revision: start,
                mod_revision: rev,
                version: rev - start + 1,
                lease: 0,
            };
            let at = KeyRev {
                key: Key::new(b"k"),
                main: rev,
                sub: 0,
            };
            sink.publish(rev, &[(at, kv)]);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(hub.receiver_count(), 1, "the stream is still serving");
        drop(responses);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while hub.receiver_count() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the stream outlived its client"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn event(key: &[u8], value_len: usize, rev: i64) -> Event {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue {
                key: Bytes::copy_from_slice(key),
                value: Bytes::from(vec![b'v'; value_len]),
                create_revision: 2,
                mod_revision: rev,
                version: rev - 1,
                lease: 0,
            }),
            prev_kv: None,
        }
    }

    /// etcd's sendFragments over messages, as the model of the encoded split.
    fn model_fragments(r: pb::WatchResponse, limit: usize) -> Vec<pb::WatchResponse> {
        if r.encoded_len() < limit || r.events.len() < 2 {
            return vec![r];
        }
        let shell = pb::WatchResponse {
            events: Vec::new(),
            fragment: true,
            ..r.clone()
        };
        let mut out = Vec::new();
        let mut idx = 0;
        loop {
            let mut cur = shell.clone();
            for ev in &r.events[idx..] {
                cur.events.push(ev.clone());
                if cur.events.len() > 1 && cur.encoded_len() >= limit {
                    cur.events.pop();
                    break;
                }
                idx += 1;
            }
            cur.fragment = idx < r.events.len();
            let last = !cur.fragment;
            out.push(cur);
            if last {
                return out;
            }
        }
    }

    /// Encoded responses are the bytes prost gives the same message, and fragments split
    /// where etcd's sendFragments splits.
    #[test]
    fn encoded_responses_are_the_messages_etcd_would_send() {
        let header = pb::ResponseHeader {
            cluster_id: u64::MAX - 3,
            member_id: 77,
            revision: 1 << 40,
            raft_term: 9,
        };
        let hb = keel_net::watch::header_field(&header);
        let sizes = [0usize, 1, 100, 127, 128, 300, 5000, 20_000, 70_000];
        let events: Vec<Event> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| event(format!("key{i}").as_bytes(), *n, 10 + i as i64))
            .collect();
        let encoded: Vec<Bytes> = events.iter().map(encode_event).collect();
        for watch_id in [0i64, 1, 300, -1, i64::MAX] {
            for n in [1usize, 2, 6, events.len()] {
                // Every limit around the small events' sizes, a few past the big ones.
                let dense = if n <= 6 { 1..700 } else { 0..0 };
                for limit in dense.chain([50, 400, 6000, 30_000, 1 << 20]) {
                    for fragment in [false, true] {
                        let msg = pb::WatchResponse {
                            header: Some(header),
                            watch_id,
                            events: events[..n].to_vec(),
                            ..Default::default()
                        };
                        let want = if fragment {
                            model_fragments(msg.clone(), limit)
                        } else {
                            vec![msg.clone()]
                        };
                        let mut got = Vec::new();
                        let evs = encoded[..n].to_vec();
                        events_responses(&hb, watch_id, fragment, limit, evs, &mut got);
                        let want: Vec<Vec<u8>> = want.iter().map(|m| m.encode_to_vec()).collect();
                        let got: Vec<Vec<u8>> = got.iter().map(|r| r.to_vec()).collect();
                        assert_eq!(got, want, "id {watch_id}, {n} events, limit {limit}");
                    }
                }
            }
        }
    }
}
