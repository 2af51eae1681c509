//! The Lock and Election services (etcd's `v3lock` and `v3election`), with the semantics of
//! etcd's client concurrency package that etcd runs them on: a lock or a candidacy is a key
//! `name/<lease in hex>` attached to the caller's lease; waiters queue by create revision under
//! `name/`, and each waits for the deletion of the key just before its own.
//!
//! One change from etcd (Jepsen's finding on etcd's lock): after waiting, a lock or a won
//! election is reported only if its key still exists *and* its lease is still alive.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_net::{ApiError, Backend, WriteRequest, WriteResponse};
use keel_proto::mvccpb::KeyValue;
use keel_proto::pb;
use keel_proto::pb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_proto::pb::range_request::{SortOrder, SortTarget};
use keel_proto::pb::request_op::Request;
use keel_proto::pb::response_op::Response;
use keel_proto::{v3electionpb as epb, v3lockpb as lpb};
use keel_storage::mvcc::KeyRange;
use tokio::sync::{broadcast, mpsc};

use crate::backend::NodeBackend;
use crate::watch::WatchContext;

const SESSION_EXPIRED: &str = "mutex: session is expired";
const NO_LEADER: &str = "election: no leader";
const NOT_LEADER: &str = "election: not leader";
const MISSING_LEADER_KEY: &str = "\"leader\" field must be provided";

/// `prefix` followed by the lease in lowercase hex, as Go's `%x`.
fn session_key(prefix: &[u8], lease: i64) -> Bytes {
    let mut k = prefix.to_vec();
    k.extend_from_slice(format!("{lease:x}").as_bytes());
    Bytes::from(k)
}

/// `name` + "/".
fn prefix_of(name: &[u8]) -> Vec<u8> {
    let mut p = name.to_vec();
    p.push(b'/');
    p
}

/// The end of the range of keys starting with `p` (etcd's GetPrefixRangeEnd).
fn prefix_end(p: &[u8]) -> Bytes {
    let mut end = p.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    Bytes::from_static(b"\0")
}

fn op(r: Request) -> pb::RequestOp {
    pb::RequestOp { request: Some(r) }
}

fn get(key: &[u8]) -> pb::RangeRequest {
    pb::RangeRequest {
        key: Bytes::copy_from_slice(key),
        ..Default::default()
    }
}

/// The first (or last) key under `prefix` by create revision, at most `max_create` if given.
fn by_create(prefix: &[u8], order: SortOrder, max_create: i64) -> pb::RangeRequest {
    pb::RangeRequest {
        key: Bytes::copy_from_slice(prefix),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_order: order as i32,
        sort_target: SortTarget::Create as i32,
        max_create_revision: max_create,
        ..Default::default()
    }
}

fn create_rev_is(key: &[u8], rev: i64) -> pb::Compare {
    pb::Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: Bytes::copy_from_slice(key),
        target_union: Some(TargetUnion::CreateRevision(rev)),
        ..Default::default()
    }
}

fn range_kvs(r: &pb::ResponseOp) -> &[KeyValue] {
    match &r.response {
        Some(Response::ResponseRange(rr)) => &rr.kvs,
        _ => &[],
    }
}

impl NodeBackend {
    async fn txn(&self, t: pb::TxnRequest) -> Result<pb::TxnResponse, ApiError> {
        match self.write(WriteRequest::Txn(t)).await? {
            WriteResponse::Txn(mut r) => {
                r.header = Some(self.header(r.header.map_or(0, |h| h.revision)));
                Ok(r)
            }
            _ => Err(ApiError::Internal("keel: unexpected txn response".into())),
        }
    }

    fn get_now(&self, r: &pb::RangeRequest) -> Result<pb::RangeResponse, ApiError> {
        let mut resp = crate::apply::range(&*self.mvcc, r)?;
        resp.header = Some(self.header(resp.header.map_or(0, |h| h.revision)));
        Ok(resp)
    }

    async fn delete(&self, key: &[u8]) -> Result<pb::ResponseHeader, ApiError> {
        let d = pb::DeleteRangeRequest {
            key: Bytes::copy_from_slice(key),
            ..Default::default()
        };
        match self.write(WriteRequest::DeleteRange(d)).await? {
            WriteResponse::DeleteRange(r) => Ok(self.header(r.header.map_or(0, |h| h.revision))),
            _ => Err(ApiError::Internal(
                "keel: unexpected delete response".into(),
            )),
        }
    }

    /// Waits until `key` is deleted at or after revision `from`.
    async fn wait_delete(&self, key: &[u8], from: i64) -> Result<(), ApiError> {
        let mut ring = self.watch.hub.subscribe();
        let deleted = |kv: &KeyValue| kv.version == 0;
        first_change(&self.watch, &mut ring, KeyRange::Single(key), from, deleted).await?;
        Ok(())
    }

    /// etcd's waitDeletes: until no key under `prefix` has a create revision at or below
    /// `max_create`.
    async fn wait_deletes(&self, prefix: &[u8], max_create: i64) -> Result<(), ApiError> {
        loop {
            let r = self.get_now(&by_create(prefix, SortOrder::Descend, max_create))?;
            let Some(last) = r.kvs.first() else {
                return Ok(());
            };
            let rev = r.header.map_or(0, |h| h.revision);
            self.wait_delete(&last.key, rev).await?;
        }
    }

    /// Waits for every earlier key under `prefix`, then checks that `key` is still the one
    /// queued (same create revision) and its lease has not expired. A wait cut short (the
    /// caller went away) gives up the key.
    async fn queue(
        &self,
        prefix: &[u8],
        key: &Bytes,
        lease: i64,
        my_rev: i64,
    ) -> Result<pb::ResponseHeader, ApiError> {
        let mut give_up = GiveUp {
            backend: self,
            key: key.clone(),
            rev: my_rev,
            armed: true,
        };
        self.wait_deletes(prefix, my_rev - 1).await?;
        give_up.armed = false;
        let r = self.get_now(&get(key))?;
        let ours = r.kvs.first().is_some_and(|kv| kv.create_revision == my_rev);
        if !ours || !self.leases.alive(lease) {
            return Err(ApiError::Internal(SESSION_EXPIRED.into()));
        }
        Ok(r.header.unwrap_or_default())
    }

    /// A caller without a lease gets one of etcd's default session TTL (60 s), which nobody
    /// keeps alive (etcd's server does the same).
    async fn lease_or_grant(&self, lease: i64) -> Result<i64, ApiError> {
        if lease != 0 {
            return Ok(lease);
        }
        let g = pb::LeaseGrantRequest { id: 0, ttl: 60 };
        match self.write(WriteRequest::LeaseGrant(g)).await? {
            WriteResponse::LeaseGrant(r) => Ok(r.id),
            _ => Err(ApiError::Internal("keel: unexpected lease response".into())),
        }
    }

    pub async fn v3_lock(&self, mut r: lpb::LockRequest) -> Result<lpb::LockResponse, ApiError> {
        r.lease = self.lease_or_grant(r.lease).await?;
        let prefix = prefix_of(&r.name);
        let key = session_key(&prefix, r.lease);
        let owner = by_create(&prefix, SortOrder::Ascend, 0);
        let t = pb::TxnRequest {
            compare: vec![create_rev_is(&key, 0)],
            success: vec![
                op(Request::RequestPut(pb::PutRequest {
                    key: key.clone(),
                    lease: r.lease,
                    ..Default::default()
                })),
                op(Request::RequestRange(owner.clone())),
            ],
            failure: vec![
                op(Request::RequestRange(get(&key))),
                op(Request::RequestRange(owner)),
            ],
        };
        let resp = self.txn(t).await?;
        let header = resp.header.unwrap_or_default();
        let my_rev = if resp.succeeded {
            header.revision
        } else {
            range_kvs(&resp.responses[0])
                .first()
                .map_or(0, |kv| kv.create_revision)
        };
        let holder = range_kvs(&resp.responses[1]).first();
        let header = match holder {
            Some(h) if h.create_revision != my_rev => {
                self.queue(&prefix, &key, r.lease, my_rev).await?
            }
            _ => header,
        };
        Ok(lpb::LockResponse {
            header: Some(header),
            key: key.to_vec().into(),
        })
    }

    pub async fn v3_unlock(&self, r: lpb::UnlockRequest) -> Result<lpb::UnlockResponse, ApiError> {
        // etcd's server deletes the key through its client, which the KV service checks.
        if r.key.is_empty() {
            return Err(ApiError::EmptyKey);
        }
        Ok(lpb::UnlockResponse {
            header: Some(self.delete(&r.key).await?),
        })
    }

    pub async fn v3_campaign(
        &self,
        mut r: epb::CampaignRequest,
    ) -> Result<epb::CampaignResponse, ApiError> {
        r.lease = self.lease_or_grant(r.lease).await?;
        let prefix = prefix_of(&r.name);
        let key = session_key(&prefix, r.lease);
        let t = pb::TxnRequest {
            compare: vec![create_rev_is(&key, 0)],
            success: vec![op(Request::RequestPut(pb::PutRequest {
                key: key.clone(),
                value: r.value.clone(),
                lease: r.lease,
                ..Default::default()
            }))],
            failure: vec![op(Request::RequestRange(get(&key)))],
        };
        let resp = self.txn(t).await?;
        let header = resp.header.unwrap_or_default();
        let mut leader = epb::LeaderKey {
            name: r.name.clone(),
            key: key.to_vec().into(),
            rev: header.revision,
            lease: r.lease,
        };
        if !resp.succeeded {
            let kv = range_kvs(&resp.responses[0]).first().cloned();
            let kv = kv.ok_or_else(|| ApiError::Internal(SESSION_EXPIRED.into()))?;
            leader.rev = kv.create_revision;
            if kv.value != r.value {
                if let Err(e) = self.proclaim_as(&leader, r.value.clone()).await {
                    let _ = self.resign_as(&leader).await;
                    return Err(e);
                }
            }
        }
        self.queue(&prefix, &key, r.lease, leader.rev).await?;
        // etcd answers with the campaign's own header (before a proclaim, before the wait).
        Ok(epb::CampaignResponse {
            header: Some(header),
            leader: Some(leader),
        })
    }

    async fn proclaim_as(
        &self,
        l: &epb::LeaderKey,
        value: Bytes,
    ) -> Result<pb::ResponseHeader, ApiError> {
        let t = pb::TxnRequest {
            compare: vec![create_rev_is(&l.key, l.rev)],
            success: vec![op(Request::RequestPut(pb::PutRequest {
                key: l.key.clone(),
                value,
                ignore_lease: true,
                ..Default::default()
            }))],
            failure: vec![],
        };
        let resp = self.txn(t).await?;
        if !resp.succeeded {
            return Err(ApiError::Internal(NOT_LEADER.into()));
        }
        Ok(resp.header.unwrap_or_default())
    }

    async fn resign_as(&self, l: &epb::LeaderKey) -> Result<pb::ResponseHeader, ApiError> {
        let t = pb::TxnRequest {
            compare: vec![create_rev_is(&l.key, l.rev)],
            success: vec![op(Request::RequestDeleteRange(pb::DeleteRangeRequest {
                key: l.key.clone(),
                ..Default::default()
            }))],
            failure: vec![],
        };
        Ok(self.txn(t).await?.header.unwrap_or_default())
    }

    pub async fn v3_proclaim(
        &self,
        r: epb::ProclaimRequest,
    ) -> Result<epb::ProclaimResponse, ApiError> {
        let l = r
            .leader
            .ok_or_else(|| ApiError::Internal(MISSING_LEADER_KEY.into()))?;
        Ok(epb::ProclaimResponse {
            header: Some(self.proclaim_as(&l, r.value).await?),
        })
    }

    pub async fn v3_resign(&self, r: epb::ResignRequest) -> Result<epb::ResignResponse, ApiError> {
        let l = r
            .leader
            .ok_or_else(|| ApiError::Internal(MISSING_LEADER_KEY.into()))?;
        Ok(epb::ResignResponse {
            header: Some(self.resign_as(&l).await?),
        })
    }

    /// The election's leader, read linearizably (etcd's Election.Leader is a client Get): a
    /// campaign won through another member is seen here once it has returned.
    pub async fn v3_leader(&self, r: epb::LeaderRequest) -> Result<epb::LeaderResponse, ApiError> {
        // (A learner never gets here: it serves only Status and serializable Range.)
        self.linearize().await?;
        let resp = self.get_now(&by_create(&prefix_of(&r.name), SortOrder::Ascend, 0))?;
        let kv = resp
            .kvs
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::Internal(NO_LEADER.into()))?;
        Ok(epb::LeaderResponse {
            header: resp.header,
            kv: Some(kv),
        })
    }
}

/// Deletes a queued key if its wait is dropped unfinished (the client went away), as etcd's
/// Mutex.Lock unlocks when its wait fails. The delete is proposed without waiting for it.
struct GiveUp<'a> {
    backend: &'a NodeBackend,
    key: Bytes,
    /// The key's create revision: only that incarnation of it is deleted (as etcd's Resign
    /// compares), never one a later call of the same lease queued again.
    rev: i64,
    armed: bool,
}

impl Drop for GiveUp<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Waits for room in the proposal queue (the raft core drains it constantly): a
            // dropped give-up would leave a key that blocks the lock for its lease's life.
            let delete = WriteRequest::Txn(pb::TxnRequest {
                compare: vec![create_rev_is(&self.key, self.rev)],
                success: vec![op(Request::RequestDeleteRange(pb::DeleteRangeRequest {
                    key: self.key.clone(),
                    ..Default::default()
                }))],
                failure: vec![],
            });
            if !self
                .backend
                .propose_detached(delete, Duration::from_secs(1))
            {
                tracing::warn!("could not propose a lock give-up: the proposal queue stayed full");
            }
        }
    }
}

/// Election.Observe: the leader now, then every change of its value, and each next leader
/// when it goes (etcd's Election.Observe).
/// `ready`: the member has applied all that was committed when the call came (a linearizable
/// read, as etcd's observer starts with a client Get), so the first leader it answers is the
/// current one, not what a lagging member last applied.
pub fn observe(
    ctx: Arc<WatchContext>,
    r: epb::LeaderRequest,
    ready: impl std::future::Future<Output = Result<(), ApiError>> + Send + 'static,
) -> keel_net::ObserveResponses {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        // etcd's observer ends its stream cleanly when its read fails.
        if ready.await.is_err() {
            return;
        }
        let prefix = prefix_of(&r.name);
        let mut ring = ctx.hub.subscribe();
        loop {
            // The leader: the oldest key under the prefix, or the first put there.
            let first =
                match crate::apply::range(&*ctx.mvcc, &by_create(&prefix, SortOrder::Ascend, 0)) {
                    Ok(r) => r,
                    // etcd's observer ends its stream cleanly when a read or watch fails.
                    Err(_) => return,
                };
            let (mut seen, leader) = match first.kvs.into_iter().next() {
                Some(kv) => (first.header.map_or(0, |h| h.revision), kv),
                None => {
                    let from = first.header.map_or(0, |h| h.revision);
                    let span = prefix_end(&prefix);
                    let put = |kv: &KeyValue| kv.version != 0;
                    let first_put = tokio::select! {
                        r = first_change(&ctx, &mut ring, KeyRange::Span(&prefix, &span), from, put) => r,
                        // The observer went away while nobody campaigned.
                        _ = tx.closed() => return,
                    };
                    match first_put {
                        Ok(kv) => (kv.mod_revision, kv),
                        Err(_) => return,
                    }
                }
            };
            let answer = |kv: KeyValue, rev: i64| epb::LeaderResponse {
                header: Some(ctx.header(rev)),
                kv: Some(kv),
            };
            if tx.send(Ok(answer(leader.clone(), seen))).await.is_err() {
                return;
            }
            // Follow the leader's key until it is deleted.
            loop {
                let now = ctx.mvcc.current_rev();
                if seen < now {
                    let got = ctx
                        .mvcc
                        .changes(KeyRange::Single(&leader.key), seen + 1, now, 1000)
                        .map_err(crate::apply::storage_err);
                    let (changes, last) = match got {
                        Ok(c) => c,
                        Err(_) => return,
                    };
                    seen = last;
                    let mut deleted = false;
                    for (_, kv) in changes {
                        if kv.version == 0 {
                            deleted = true;
                            break;
                        }
                        let rev = kv.mod_revision;
                        if tx.send(Ok(answer(kv, rev))).await.is_err() {
                            return;
                        }
                    }
                    if deleted {
                        break;
                    }
                    continue;
                }
                tokio::select! {
                    m = ring.recv() => {
                        if let Err(broadcast::error::RecvError::Closed) = m {
                            return;
                        }
                    }
                    _ = tx.closed() => return,
                }
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// The first change in `range` at or after revision `from` that `want` accepts: read from the
/// store up to now, then again whenever the hub says something was committed.
async fn first_change(
    ctx: &WatchContext,
    ring: &mut broadcast::Receiver<Arc<crate::watch::Revision>>,
    range: KeyRange<'_>,
    mut from: i64,
    want: impl Fn(&KeyValue) -> bool,
) -> Result<KeyValue, ApiError> {
    loop {
        let now = ctx.mvcc.current_rev();
        while from <= now {
            let (changes, last) = ctx
                .mvcc
                .changes(range, from, now, 1000)
                .map_err(crate::apply::storage_err)?;
            if let Some((_, kv)) = changes.into_iter().find(|(_, kv)| want(kv)) {
                return Ok(kv);
            }
            from = last + 1;
        }
        // A lag only means more to read from the store.
        if let Err(broadcast::error::RecvError::Closed) = ring.recv().await {
            return Err(ApiError::Stopped);
        }
    }
}
