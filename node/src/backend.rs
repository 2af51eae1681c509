//! The node side of `keel_net::Backend`: reads straight from the published MVCC state on the
//! calling net core; writes go to the raft core over the bounded proposal channel and the
//! caller awaits its oneshot. A full channel answers etcd's "too many requests".

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::TrySendError;
use keel_net::{ApiError, Backend, Limits, WriteRequest, WriteResponse};
use keel_proto::keelpb::InternalRequest;
use keel_proto::pb;
use keel_proto::prost::Message;
use keel_proto::{v3electionpb as epb, v3lockpb as lpb};
use keel_storage::mvcc::Mvcc;
use keel_storage::store::StoreHandle;
use tokio::sync::oneshot;

use crate::apply;
use crate::config::{Config, ETCD_API_VERSION};
use crate::raft_core::{Proposal, RaftStatus};

thread_local! {
    /// Requests this (net core) thread has served: its idle memory collection watches it.
    static SERVED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn served_one() {
    SERVED.with(|s| s.set(s.get() + 1));
}

/// Requests served on the calling thread so far.
pub fn requests_served() -> u64 {
    SERVED.with(|s| s.get())
}

/// How long a write may wait for raft before "request timed out" (etcd: 7 s by default).
const WRITE_TIMEOUT: Duration = Duration::from_secs(7);
/// etcd's quota estimate of what a lease grant adds (`leaseOverhead`).
const LEASE_OVERHEAD_BYTES: usize = 64;

/// The raft core's answer to `rx`, waited for up to `WRITE_TIMEOUT` (etcd's request timeout).
pub async fn answer<T>(rx: oneshot::Receiver<Result<T, ApiError>>) -> Result<T, ApiError> {
    let _waiting = crate::raft_core::Waiting::start();
    match tokio::time::timeout(WRITE_TIMEOUT, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(ApiError::Stopped),
        Err(_) => Err(ApiError::Timeout),
    }
}

/// etcd's answers when a request cannot be handed to the raft core: its queue is full ("too
/// many requests"), or the core is gone (stopping).
pub fn refused<T>(e: TrySendError<T>) -> ApiError {
    match e {
        TrySendError::Full(_) => ApiError::TooManyRequests,
        TrySendError::Disconnected(_) => ApiError::Stopped,
    }
}

/// etcd's check of a member's peer URLs: at least one, each a URL with a host and port.
fn bad_peer_urls(urls: &[String]) -> bool {
    urls.is_empty()
        || urls
            .iter()
            .any(|u| crate::config::listen_addr(u).is_err() && !u.starts_with("https://"))
}

pub struct NodeBackend {
    pub control: crate::bell::Tx<crate::raft_core::Control>,
    pub membership: Arc<crate::cluster::Membership>,
    pub forwarder: Arc<crate::cluster::LeaseForwarder>,
    pub mvcc: Arc<Mvcc>,
    pub watch: Arc<crate::watch::WatchContext>,
    pub leases: Arc<crate::lease::Leases>,
    pub status: Arc<RaftStatus>,
    pub proposals: crate::bell::Tx<Proposal>,
    pub member_id: u64,
    pub cfg: Arc<Config>,
    pub store: StoreHandle,
}

/// How long a peer must have been connected to count as active (etcd's HealthInterval).
const HEALTH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

impl NodeBackend {
    /// Waits until this member has applied everything committed now (a ReadIndex round,
    /// shared with every read waiting at the same moment): what it then reads is
    /// linearizable. A lone voter has nothing to wait for: every acknowledged write is
    /// applied and published before its client hears back.
    pub fn linearize(&self) -> impl std::future::Future<Output = Result<(), ApiError>> + Send {
        let asked = self
            .multi()
            .then(|| crate::read_gate::join(Arc::as_ptr(&self.status) as usize, &self.control));
        async move {
            let Some(asked) = asked else { return Ok(()) };
            // Each read waits at most the request timeout, whichever round it is in.
            answer(asked?).await
        }
    }

    /// What a read waits for before it reads (Range, RangeStream): nothing if serializable;
    /// if linearizable, a learner refuses it, and in a cluster it waits for a ReadIndex round.
    fn read_ready(
        &self,
        serializable: bool,
    ) -> impl std::future::Future<Output = Result<(), ApiError>> + Send {
        use futures::future::Either;
        if serializable {
            Either::Left(std::future::ready(Ok(())))
        } else if self.learner() {
            Either::Left(std::future::ready(Err(ApiError::NotSupportedForLearner)))
        } else {
            Either::Right(self.linearize())
        }
    }

    /// More than one member: linearizable reads need a ReadIndex round, lease calls go to
    /// the leader.
    fn multi(&self) -> bool {
        self.status.multi.load(Ordering::Acquire)
    }

    fn learner(&self) -> bool {
        self.status.learner.load(Ordering::Acquire)
    }

    /// Hands a request to the raft core's control channel and waits for its answer.
    fn control_call(
        &self,
        make: impl FnOnce(crate::raft_core::Responder) -> crate::raft_core::Control,
    ) -> impl std::future::Future<Output = Result<WriteResponse, ApiError>> + Send {
        let (tx, rx) = oneshot::channel();
        let sent = self.control.try_send(make(tx)).map_err(refused);
        async move {
            sent?;
            answer(rx).await
        }
    }

    /// Whether this member leads, as its raft core last published.
    pub fn is_leader(&self) -> bool {
        self.status.leader_id.load(Ordering::Acquire) == self.member_id
    }

    /// Before stopping: a leader hands leadership over (see `Control::StepDown`).
    pub fn step_down(&self) -> impl std::future::Future<Output = Result<(), ApiError>> + Send {
        let call = self.control_call(crate::raft_core::Control::StepDown);
        async move { call.await.map(|_| ()) }
    }

    /// etcd's --strict-reconfig-check (default on): the checks below guard membership changes.
    fn strict(&self) -> bool {
        self.cfg.strict_reconfig_check
    }

    /// etcd's strict reconfiguration check: a voter may join only if the members that have
    /// started (published themselves) would still be a quorum.
    fn ready_to_add_voter(&self) -> bool {
        let (voters, started) = crate::cluster::started_voters(&self.membership.get(), None);
        let n = voters + 1;
        (started == 1 && n == 2) || started > n / 2
    }

    /// ... and a voter may go only if the started members left are a quorum of those left.
    fn ready_to_remove_voter(&self, id: u64) -> bool {
        let (left, started) = crate::cluster::started_voters(&self.membership.get(), Some(id));
        started > left / 2
    }

    /// etcd's isConnectedSince: `peer` is this member, or this member has heard from it
    /// continuously for at least `HEALTH_INTERVAL`.
    fn connected_long_enough(&self, peers: &keel_net::peer::Peers, peer: u64) -> bool {
        let since = std::time::Instant::now().checked_sub(HEALTH_INTERVAL);
        peer == self.member_id
            || matches!((peers.active_since(peer), since), (Some(t), Some(s)) if t <= s)
    }

    /// etcd's second check before adding a member, learners too (mayAddMember,
    /// isConnectedFullySince): this member has heard from every voter continuously for at
    /// least `HEALTH_INTERVAL`. A voter that is down, or was added and never started, makes
    /// the cluster too fragile to grow.
    fn connected_to_every_voter(&self) -> bool {
        let Some(peers) = self.forwarder.peers.get() else {
            return true; // a lone member: no peers to count
        };
        let members = self.membership.get();
        let missing: Vec<String> = members
            .iter()
            .filter(|m| !m.is_learner && !self.connected_long_enough(peers, m.id))
            .map(|m| format!("{:x}", m.id))
            .collect();
        if !missing.is_empty() {
            tracing::warn!(
                not_connected = ?missing,
                "rejecting member add request; local member has not been connected to all \
                 peers, reconfigure breaks active quorum"
            );
        }
        missing.is_empty()
    }

    /// etcd's second check before removing a voter (mayRemoveMember): a member not heard
    /// from may always go; otherwise the voters heard from continuously for at least
    /// `HEALTH_INTERVAL` (this one included) must stay a quorum without the one removed.
    fn removal_keeps_active_quorum(&self, id: u64) -> bool {
        let Some(peers) = self.forwarder.peers.get() else {
            return true; // a lone member: no peers to count
        };
        if id != self.member_id && peers.active_since(id).is_none() {
            return true;
        }
        let members = self.membership.get();
        let voters: Vec<u64> = members
            .iter()
            .filter(|m| !m.is_learner)
            .map(|m| m.id)
            .collect();
        let active = voters
            .iter()
            .filter(|&&v| self.connected_long_enough(peers, v))
            .count();
        let ok = active > voters.len().saturating_sub(1) / 2 + 1;
        if !ok {
            let heard: Vec<String> = voters
                .iter()
                .map(|v| match peers.active_since(*v) {
                    Some(t) => format!("{v:x}: {} ms", t.elapsed().as_millis()),
                    None => format!("{v:x}: -"),
                })
                .collect();
            tracing::warn!(
                member_id = format!("{id:x}"),
                active,
                voters = voters.len(),
                heard = ?heard,
                "rejecting member remove request; local member has not been connected to all \
                 peers, reconfigure breaks active quorum"
            );
        }
        ok
    }

    /// The leader to forward a lease call to, if it is another member.
    fn lease_leader(&self) -> Result<Option<u64>, ApiError> {
        if !self.multi() {
            return Ok(None);
        }
        match self.status.leader_id.load(Ordering::Acquire) {
            0 => Err(ApiError::NoLeader),
            l if l == self.member_id => Ok(None),
            l => Ok(Some(l)),
        }
    }

    fn encode(&self, req: WriteRequest) -> Result<Vec<u8>, ApiError> {
        let mut ir = InternalRequest::default();
        match req {
            WriteRequest::Put(p) => ir.put = Some(p),
            WriteRequest::DeleteRange(d) => ir.delete_range = Some(d),
            WriteRequest::Txn(t) => ir.txn = Some(t),
            WriteRequest::Compact(c) => ir.compaction = Some(c),
            WriteRequest::Alarm(a) => ir.alarm = Some(a),
            WriteRequest::LeaseGrant(mut g) => {
                // No ID given: the server picks one (etcd's reqIDGen, positive).
                if g.id == 0 {
                    g.id = self.leases.generate_id();
                }
                ir.lease_grant = Some(g)
            }
            WriteRequest::LeaseRevoke(r) => ir.lease_revoke = Some(r),
        }
        let data = ir.encode_to_vec();
        if data.len() > self.cfg.max_request_bytes {
            return Err(ApiError::RequestTooLarge);
        }
        Ok(data)
    }

    /// Proposes a write nobody waits for, waiting up to `wait` for room in the proposal
    /// queue (zero: only if there is room now); whether it went in.
    pub fn propose_detached(&self, req: WriteRequest, wait: Duration) -> bool {
        let Ok(data) = self.encode(req) else {
            return false;
        };
        let (tx, _) = oneshot::channel();
        self.proposals
            .send_timeout(Proposal { data, tx }, wait)
            .is_ok()
    }

    /// etcd's quota check at the edge: a write that would take the backend to its quota
    /// raises NOSPACE (through raft, without waiting) and is refused.
    fn check_quota(&self, req: &WriteRequest) -> Result<(), ApiError> {
        let cost = match req {
            WriteRequest::Put(p) => apply::put_cost_bytes(p),
            WriteRequest::Txn(t) => apply::txn_cost_bytes(t),
            WriteRequest::LeaseGrant(_) => LEASE_OVERHEAD_BYTES,
            _ => return Ok(()),
        };
        let Some(quota) = self.cfg.quota_backend_bytes else {
            return Ok(());
        };
        let size = self.store.quota_bytes();
        if cost == 0 || size + (cost as u64) < quota {
            return Ok(());
        }
        let raise = WriteRequest::Alarm(pb::AlarmRequest {
            action: pb::alarm_request::AlarmAction::Activate as i32,
            member_id: self.member_id,
            alarm: apply::NOSPACE,
        });
        self.propose_detached(raise, Duration::ZERO);
        Err(ApiError::NoSpace)
    }

    /// Runs `f` (a store operation that waits for the backend) off the net core's runtime,
    /// with everything applied so far as its `applied` index.
    fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&StoreHandle, u64) -> keel_storage::Result<T> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, ApiError>> + Send {
        let store = self.store.clone();
        let applied = self.status.applied_index.load(Ordering::Acquire);
        async move {
            tokio::task::spawn_blocking(move || f(&store, applied))
                .await
                .map_err(|e| ApiError::Internal(format!("{what}: {e}")))?
                .map_err(apply::storage_err)
        }
    }
}

impl Backend for NodeBackend {
    fn limits(&self) -> Limits {
        Limits {
            max_request_bytes: self.cfg.max_request_bytes,
            max_txn_ops: self.cfg.max_txn_ops,
        }
    }

    fn header(&self, revision: i64) -> pb::ResponseHeader {
        let revision = if revision == 0 {
            self.mvcc.current_rev()
        } else {
            revision
        };
        self.watch.header(revision)
    }

    fn range(
        &self,
        req: pb::RangeRequest,
    ) -> impl std::future::Future<Output = Result<pb::RangeResponse, ApiError>> + Send {
        fail::fail_point!("backend-range");
        served_one();
        // A lone member's linearizable read needs no round: answered right here.
        if req.serializable || !(self.multi() || self.learner()) {
            return futures::future::Either::Left(std::future::ready(apply::range(
                &*self.mvcc,
                &req,
            )));
        }
        let ready = self.read_ready(req.serializable);
        let mvcc = self.mvcc.clone();
        futures::future::Either::Right(async move {
            ready.await?;
            apply::range(&*mvcc, &req)
        })
    }

    fn range_out(
        &self,
        req: pb::RangeRequest,
    ) -> impl std::future::Future<Output = Result<keel_net::RangeOut, ApiError>> + Send {
        use futures::future::Either;
        if !crate::range_stream::encodes(&req) {
            let response = self.range(req);
            return Either::Left(async move { response.await.map(keel_net::RangeOut::Message) });
        }
        fail::fail_point!("backend-range");
        served_one();
        let ready = self.read_ready(req.serializable);
        let ctx = self.watch.clone();
        Either::Right(async move {
            ready.await?;
            crate::range_stream::encoded(&ctx, req)
        })
    }

    fn write(
        &self,
        req: WriteRequest,
    ) -> impl std::future::Future<Output = Result<WriteResponse, ApiError>> + Send {
        served_one();
        // A read-only txn never goes through the log (etcd's isTxnReadonly): once this member
        // has applied everything committed (unless every range in it is serializable), it is
        // answered from the published state.
        if let WriteRequest::Txn(t) = &req {
            if apply::txn_is_read_only(t) {
                let serializable = apply::txn_is_serializable(t);
                let refused = self.learner() && !serializable;
                let ready = (!serializable).then(|| self.linearize());
                let (mvcc, t) = (self.mvcc.clone(), t.clone());
                return futures::future::Either::Left(async move {
                    if refused {
                        return Err(ApiError::NotSupportedForLearner);
                    }
                    if let Some(ready) = ready {
                        ready.await?;
                    }
                    apply::txn_read_only(&*mvcc, &t).map(WriteResponse::Txn)
                });
            }
        }
        // etcd answers a physical compaction once it is carried out.
        let physical = match &req {
            WriteRequest::Compact(c) if c.physical => Some(c.revision),
            _ => None,
        };
        let store = self.store.clone();
        let (tx, rx) = oneshot::channel();
        let learner = if self.learner() {
            Err(ApiError::NotSupportedForLearner)
        } else {
            Ok(())
        };
        let sent = learner
            .and_then(|()| self.check_quota(&req))
            .and_then(|()| self.encode(req))
            .and_then(|data| {
                self.proposals
                    .try_send(Proposal { data, tx })
                    .map_err(refused)
            });
        futures::future::Either::Right(async move {
            sent?;
            let result = answer(rx).await;
            if let (Ok(_), Some(rev)) = (&result, physical) {
                while store.finished_compact_rev() < rev {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            result
        })
    }

    fn status(&self) -> pb::StatusResponse {
        // The backend file's size, as etcd reports its bbolt file, and the part in use.
        let space = self.store.space();
        let (db_bytes, db_bytes_in_use) = (space.bytes() as i64, space.bytes_in_use() as i64);
        let leader = self.status.leader_id.load(Ordering::Acquire);
        // etcd says first that it has no leader, then lists active alarms (protobuf's text).
        let no_leader = (leader == 0).then(|| ApiError::NoLeader.to_string());
        let alarms = self.alarms().into_iter().map(|a| {
            let name = pb::AlarmType::try_from(a.alarm)
                .map(|t| t.as_str_name())
                .unwrap_or("NONE");
            format!("memberID:{} alarm:{name} ", a.member_id)
        });
        pb::StatusResponse {
            header: Some(self.header(0)),
            version: ETCD_API_VERSION.to_string(),
            db_size: db_bytes,
            leader,
            raft_index: self.status.commit_index.load(Ordering::Acquire),
            raft_term: self.status.term.load(Ordering::Acquire),
            raft_applied_index: self.status.applied_index.load(Ordering::Acquire),
            errors: no_leader.into_iter().chain(alarms).collect(),
            db_size_in_use: db_bytes_in_use,
            is_learner: self.learner(),
            // etcd 3.6 reports its db file's version once the cluster runs 3.6: Keel's is
            // always the version it serves.
            storage_version: ETCD_API_VERSION.to_string(),
            db_size_quota: self.cfg.quota_backend_bytes.unwrap_or(0) as i64,
            // etcd 3.6 always reports one (no downgrade in progress).
            downgrade_info: Some(Default::default()),
        }
    }

    fn members(&self) -> Vec<pb::Member> {
        self.membership.list()
    }

    fn read_barrier(&self) -> impl std::future::Future<Output = Result<(), ApiError>> + Send {
        self.linearize()
    }

    fn is_learner(&self) -> bool {
        self.learner()
    }

    fn has_leader(&self) -> bool {
        self.status.leader_id.load(Ordering::Acquire) != 0
    }

    fn election_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.cfg.election_ms)
    }

    fn member_add(
        &self,
        mut peer_urls: Vec<String>,
        is_learner: bool,
    ) -> impl std::future::Future<Output = Result<pb::Member, ApiError>> + Send {
        // etcd keeps a member's URLs sorted (types.NewURLs).
        peer_urls.sort();
        let checked = (|| {
            if bad_peer_urls(&peer_urls) {
                return Err(ApiError::MemberBadUrls);
            }
            if self.strict() && !is_learner && !self.ready_to_add_voter() {
                return Err(ApiError::MemberNotEnoughStarted);
            }
            if self.strict() && !self.connected_to_every_voter() {
                return Err(ApiError::Unhealthy);
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            Ok(keel_proto::keelpb::Member {
                id: crate::ids::added_member_id(&peer_urls, now),
                name: String::new(),
                peer_urls: peer_urls.clone(),
                client_urls: Vec::new(),
                is_learner,
            })
        })();
        let call = checked.clone().map(|m| {
            let cc = raft::eraftpb::ConfChange {
                change_type: if is_learner {
                    raft::eraftpb::ConfChangeType::AddLearnerNode
                } else {
                    raft::eraftpb::ConfChangeType::AddNode
                },
                node_id: m.id,
                context: m.encode_to_vec().into(),
                ..Default::default()
            };
            self.control_call(|tx| crate::raft_core::Control::ProposeConf(Box::new(cc), tx))
        });
        async move {
            let m = checked?;
            call?.await?;
            Ok(pb::Member {
                id: m.id,
                name: m.name,
                peer_ur_ls: m.peer_urls,
                client_ur_ls: m.client_urls,
                is_learner: m.is_learner,
            })
        }
    }

    fn member_remove(
        &self,
        id: u64,
    ) -> impl std::future::Future<Output = Result<(), ApiError>> + Send {
        let members = self.membership.get();
        let checked = match members.iter().find(|m| m.id == id) {
            None => Err(ApiError::MemberNotFound),
            Some(m) if self.strict() && !m.is_learner && !self.ready_to_remove_voter(id) => {
                Err(ApiError::MemberNotEnoughStarted)
            }
            Some(m) if self.strict() && !m.is_learner && !self.removal_keeps_active_quorum(id) => {
                Err(ApiError::Unhealthy)
            }
            Some(_) => Ok(()),
        };
        let call = checked.map(|()| {
            let cc = raft::eraftpb::ConfChange {
                change_type: raft::eraftpb::ConfChangeType::RemoveNode,
                node_id: id,
                ..Default::default()
            };
            self.control_call(|tx| crate::raft_core::Control::ProposeConf(Box::new(cc), tx))
        });
        async move { call?.await.map(|_| ()) }
    }

    fn member_update(
        &self,
        id: u64,
        mut peer_urls: Vec<String>,
    ) -> impl std::future::Future<Output = Result<(), ApiError>> + Send {
        peer_urls.sort();
        let bad = bad_peer_urls(&peer_urls);
        let req = InternalRequest {
            member_update: Some(keel_proto::keelpb::MemberUpdate { id, peer_urls }),
            ..Default::default()
        };
        let call = (!bad).then(|| {
            let data = req.encode_to_vec();
            let (tx, rx) = oneshot::channel();
            let sent = self
                .proposals
                .try_send(Proposal { data, tx })
                .map_err(|_| ApiError::TooManyRequests);
            (sent, rx)
        });
        async move {
            let (sent, rx) = call.ok_or(ApiError::MemberBadUrls)?;
            sent?;
            answer(rx).await.map(|_| ())
        }
    }

    fn move_leader(
        &self,
        target: u64,
    ) -> impl std::future::Future<Output = Result<(), ApiError>> + Send {
        let call = self.control_call(move |tx| crate::raft_core::Control::MoveLeader(target, tx));
        async move { call.await.map(|_| ()) }
    }

    fn member_promote(
        &self,
        id: u64,
    ) -> impl std::future::Future<Output = Result<(), ApiError>> + Send {
        let leader = self.status.leader_id.load(Ordering::Acquire);
        let local = (leader == self.member_id)
            .then(|| self.control_call(move |tx| crate::raft_core::Control::Promote(id, tx)));
        let forwarder = self.forwarder.clone();
        async move {
            match (leader, local) {
                (0, _) => Err(ApiError::NoLeader),
                (_, Some(call)) => call.await.map(|_| ()),
                (leader, None) => forwarder.promote(leader, id).await,
            }
        }
    }

    fn alarms(&self) -> Vec<pb::AlarmMember> {
        self.status
            .alarms
            .lock()
            .expect("alarms lock")
            .iter()
            .map(|(member_id, alarm)| pb::AlarmMember {
                member_id: *member_id,
                alarm: *alarm,
            })
            .collect()
    }

    fn defragment(&self) -> impl std::future::Future<Output = Result<(), ApiError>> + Send {
        let run = self.blocking("defragment", |store, applied| store.defragment(applied));
        async move {
            let started = std::time::Instant::now();
            run.await?;
            tracing::info!(
                took_ms = started.elapsed().as_millis() as u64,
                "defragmented"
            );
            Ok(())
        }
    }

    fn snapshot(&self) -> keel_net::SnapshotChunks {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let store = self.store.clone();
        let applied = self.status.applied_index.load(Ordering::Acquire);
        let (members, removed) = (self.membership.get(), self.membership.removed());
        let spawned = std::thread::Builder::new()
            .name("keel-snapshot".into())
            .spawn(move || crate::snapshot::serve(store, applied, members, removed, tx));
        if let Err(e) = spawned {
            return Box::pin(futures::stream::once(async move {
                Err(ApiError::Internal(format!("snapshot: {e}")))
            }));
        }
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    fn hash(&self) -> impl std::future::Future<Output = Result<u32, ApiError>> + Send {
        self.blocking("hash", |store, applied| store.hash(applied))
    }

    fn hash_kv(&self, revision: i64) -> Result<pb::HashKvResponse, ApiError> {
        let (hash, compact_revision, hash_revision) =
            self.mvcc.hash_kv(revision).map_err(apply::storage_err)?;
        Ok(pb::HashKvResponse {
            header: Some(self.header(0)),
            hash,
            compact_revision,
            hash_revision,
        })
    }

    fn range_stream(&self, req: pb::RangeRequest) -> keel_net::RangeChunks {
        // As Range: its revision is at least every write acknowledged before it was asked.
        let ready = self.read_ready(req.serializable);
        crate::range_stream::serve(self.watch.clone(), req, ready)
    }

    fn watch(&self, requests: keel_net::WatchRequests) -> keel_net::WatchResponses {
        crate::watch::serve(self.watch.clone(), requests)
    }

    fn lease_keep_alive(
        &self,
        id: i64,
    ) -> impl std::future::Future<Output = Result<pb::LeaseKeepAliveResponse, ApiError>> + Send
    {
        served_one();
        let header = Some(self.header(0));
        // Renewed here (this member leads), or the leader to ask.
        let route = self.lease_leader().map(|leader| match leader {
            None => Ok(self.leases.renew(id)),
            Some(l) => Err(l),
        });
        let forwarder = self.forwarder.clone();
        async move {
            let ttl = match route? {
                Ok(ttl) => ttl,
                Err(leader) => forwarder.call(leader, id, false).await?.ttl,
            };
            Ok(pb::LeaseKeepAliveResponse { header, id, ttl })
        }
    }

    fn lease_time_to_live(
        &self,
        req: pb::LeaseTimeToLiveRequest,
    ) -> impl std::future::Future<Output = Result<pb::LeaseTimeToLiveResponse, ApiError>> + Send
    {
        let header = Some(self.header(0));
        let leader = self.lease_leader();
        let local = self.leases.remaining(req.id);
        let forwarder = self.forwarder.clone();
        async move {
            // The keys are state-machine state (the same on every member); the time left is
            // the leader's.
            let (ttl, granted) = match leader? {
                None => match &local {
                    Some((lease, left)) => (*left, lease.ttl),
                    None => (-1, 0),
                },
                Some(leader) => {
                    let r = forwarder.call(leader, req.id, true).await?;
                    (r.ttl, r.granted_ttl)
                }
            };
            Ok(match local {
                // etcd answers an unknown lease with TTL -1, not an error.
                Some((lease, _)) if ttl >= 0 => pb::LeaseTimeToLiveResponse {
                    header,
                    id: req.id,
                    ttl,
                    granted_ttl: granted,
                    keys: if req.keys { lease.keys() } else { Vec::new() },
                },
                _ => pb::LeaseTimeToLiveResponse {
                    header,
                    id: req.id,
                    ttl: -1,
                    ..Default::default()
                },
            })
        }
    }

    fn lock(
        &self,
        req: lpb::LockRequest,
    ) -> impl std::future::Future<Output = Result<lpb::LockResponse, ApiError>> + Send {
        self.v3_lock(req)
    }

    fn unlock(
        &self,
        req: lpb::UnlockRequest,
    ) -> impl std::future::Future<Output = Result<lpb::UnlockResponse, ApiError>> + Send {
        self.v3_unlock(req)
    }

    fn campaign(
        &self,
        req: epb::CampaignRequest,
    ) -> impl std::future::Future<Output = Result<epb::CampaignResponse, ApiError>> + Send {
        self.v3_campaign(req)
    }

    fn proclaim(
        &self,
        req: epb::ProclaimRequest,
    ) -> impl std::future::Future<Output = Result<epb::ProclaimResponse, ApiError>> + Send {
        self.v3_proclaim(req)
    }

    fn resign(
        &self,
        req: epb::ResignRequest,
    ) -> impl std::future::Future<Output = Result<epb::ResignResponse, ApiError>> + Send {
        self.v3_resign(req)
    }

    fn leader(
        &self,
        req: epb::LeaderRequest,
    ) -> impl std::future::Future<Output = Result<epb::LeaderResponse, ApiError>> + Send {
        self.v3_leader(req)
    }

    fn observe(&self, req: epb::LeaderRequest) -> keel_net::ObserveResponses {
        crate::concurrency::observe(self.watch.clone(), req, self.linearize())
    }

    fn lease_leases(&self) -> pb::LeaseLeasesResponse {
        pb::LeaseLeasesResponse {
            header: Some(self.header(0)),
            leases: self
                .leases
                .list()
                .into_iter()
                .map(|id| pb::LeaseStatus { id })
                .collect(),
        }
    }
}
