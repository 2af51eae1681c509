//! A member among members: the membership every member agrees on (through raft), what goes
//! over the peer transport and what comes back from it.
//!
//! A peer frame starts with one kind byte:
//! - `FRAME_RAFT`: a raft-rs `eraftpb.Message` (protobuf), for the raft core;
//! - `FRAME_KEEL`: a `keelpb.PeerMessage` (a lease call a follower forwards to the leader, and
//!   its answer), answered on the transport's thread without involving the raft core.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use keel_net::peer::{Adopted, Inbound, Peers};
use keel_net::ApiError;
use keel_proto::keelpb;
use keel_proto::pb;
use keel_proto::prost::Message as _;
use protobuf::Message as _;
use tokio::sync::oneshot;

use crate::lease::Leases;
use crate::raft_core::{Control, RaftStatus};

pub const FRAME_RAFT: u8 = 1;
pub const FRAME_KEEL: u8 = 2;

/// How long a forwarded lease call waits for the leader's answer.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// The members a new cluster starts with, from `--initial-cluster` (every member's name and
/// peer URLs; client URLs come when each publishes them), and member `name`'s meta. IDs are
/// etcd's: a member's from its peer URLs and `token`, the cluster's from the members'.
pub fn bootstrap(
    initial_cluster: &[(String, Vec<String>)],
    token: &str,
    name: &str,
) -> (Vec<keelpb::Member>, keel_storage::raftlog::MemberMeta) {
    let members: Vec<keelpb::Member> = initial_cluster
        .iter()
        .map(|(name, urls)| keelpb::Member {
            id: crate::ids::member_id(urls, token),
            name: name.clone(),
            // etcd keeps a member's URLs sorted (types.NewURLsMap).
            peer_urls: {
                let mut u = urls.clone();
                u.sort();
                u
            },
            client_urls: Vec::new(),
            is_learner: false,
        })
        .collect();
    let voters: Vec<u64> = members.iter().map(|m| m.id).collect();
    let member_id = members
        .iter()
        .find(|m| m.name == name)
        .map(|m| m.id)
        .expect("the initial cluster was checked to name this member");
    let meta = keel_storage::raftlog::MemberMeta {
        member_id,
        cluster_id: crate::ids::cluster_id(&voters),
        voters,
        name: name.to_string(),
    };
    (members, meta)
}

/// What a member removed from the cluster says as it stops (etcd's words).
pub const REMOVED: &str = "the member has been permanently removed from the cluster; the \
     data-dir used by this member must be removed";

/// The voters other than `except`: how many, and how many of them have started (published
/// their name), for etcd's strict reconfiguration checks.
pub fn started_voters(members: &[keelpb::Member], except: Option<u64>) -> (usize, usize) {
    members
        .iter()
        .filter(|m| !m.is_learner && Some(m.id) != except)
        .fold((0, 0), |(n, s), m| {
            (n + 1, s + usize::from(!m.name.is_empty()))
        })
}

/// The membership as applied, readable from every core: the members, and the IDs of those
/// removed (etcd's removed members, refused for good).
pub struct Membership {
    members: ArcSwap<Vec<keelpb::Member>>,
    removed: ArcSwap<Vec<u64>>,
}

impl Membership {
    pub fn new(members: Vec<keelpb::Member>, removed: Vec<u64>) -> Membership {
        Membership {
            members: ArcSwap::from_pointee(members),
            removed: ArcSwap::from_pointee(removed),
        }
    }

    pub fn decode(b: &[u8]) -> anyhow::Result<Vec<keelpb::Member>> {
        Ok(keelpb::Members::decode(b)?.members)
    }

    /// A stored membership whole: its members and the IDs removed.
    pub fn decode_with_removed(b: &[u8]) -> anyhow::Result<(Vec<keelpb::Member>, Vec<u64>)> {
        let m = keelpb::Members::decode(b)?;
        Ok((m.members, m.removed))
    }

    pub fn encode(members: &[keelpb::Member], removed: &[u64]) -> Vec<u8> {
        keelpb::Members {
            members: members.to_vec(),
            removed: removed.to_vec(),
        }
        .encode_to_vec()
    }

    pub fn removed(&self) -> Arc<Vec<u64>> {
        self.removed.load_full()
    }

    pub fn is_removed(&self, id: u64) -> bool {
        self.removed.load().contains(&id)
    }

    /// Notes `id` as removed for good.
    pub fn remove(&self, id: u64) {
        let mut r = self.removed().to_vec();
        if !r.contains(&id) {
            r.push(id);
            r.sort_unstable();
            self.removed.store(Arc::new(r));
        }
    }

    pub fn get(&self) -> Arc<Vec<keelpb::Member>> {
        self.members.load_full()
    }

    pub fn set(&self, members: Vec<keelpb::Member>) {
        self.members.store(Arc::new(members));
    }

    /// etcd's MemberList entries, in ID order as etcd lists them.
    pub fn list(&self) -> Vec<pb::Member> {
        let mut out: Vec<pb::Member> = self
            .get()
            .iter()
            .map(|m| pb::Member {
                id: m.id,
                name: m.name.clone(),
                peer_ur_ls: m.peer_urls.clone(),
                client_ur_ls: m.client_urls.clone(),
                is_learner: m.is_learner,
            })
            .collect();
        out.sort_by_key(|m| m.id);
        out
    }
}

/// Applies a member's published attributes; whether anything changed.
pub fn set_attributes(members: &mut [keelpb::Member], a: &keelpb::MemberAttributes) -> bool {
    match members.iter_mut().find(|m| m.id == a.member_id) {
        Some(m) if m.name != a.name || m.client_urls != a.client_urls => {
            m.name = a.name.clone();
            m.client_urls = a.client_urls.clone();
            true
        }
        _ => false,
    }
}

/// Raft's configuration for a membership: voters and learners.
pub fn conf_state(members: &[keelpb::Member]) -> raft::eraftpb::ConfState {
    raft::eraftpb::ConfState {
        voters: members
            .iter()
            .filter(|m| !m.is_learner)
            .map(|m| m.id)
            .collect(),
        learners: members
            .iter()
            .filter(|m| m.is_learner)
            .map(|m| m.id)
            .collect(),
        ..Default::default()
    }
}

/// Encodes a raft message as a peer frame.
pub fn raft_frame(m: &raft::eraftpb::Message) -> Bytes {
    let mut v = Vec::with_capacity(1 + m.compute_size() as usize);
    v.push(FRAME_RAFT);
    m.write_to_vec(&mut v).expect("a raft message encodes");
    Bytes::from(v)
}

/// The raft message in a `FRAME_RAFT` frame from `from`; a bad one is logged and dropped.
pub fn parse_raft_frame(from: u64, frame: &[u8]) -> Option<raft::eraftpb::Message> {
    match raft::eraftpb::Message::parse_from_bytes(frame.get(1..)?) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(from = format!("{from:x}"), error = %e, "bad raft frame");
            None
        }
    }
}

fn keel_frame(m: &keelpb::PeerMessage) -> Bytes {
    let mut v = Vec::with_capacity(1 + m.encoded_len());
    v.push(FRAME_KEEL);
    m.encode(&mut v).expect("a vec grows");
    Bytes::from(v)
}

/// What a member receives from its peers.
pub struct PeerInbound {
    pub control: crate::bell::Tx<Control>,
    pub leases: Arc<Leases>,
    pub status: Arc<RaftStatus>,
    pub member_id: u64,
    pub forwarder: Arc<LeaseForwarder>,
    pub peers: OnceLock<Arc<Peers>>,
    /// The backend file (a received state is written beside it).
    pub db_path: std::path::PathBuf,
    /// Held while a state is being received (one at a time).
    pub receiving: Mutex<()>,
    pub membership: Arc<Membership>,
    pub cluster_id: u64,
}

impl Inbound for PeerInbound {
    fn frame(&self, from: u64, frame: Bytes) {
        match frame.first() {
            Some(&FRAME_RAFT) => {
                if let Some(m) = parse_raft_frame(from, &frame) {
                    // A full queue drops the message: raft resends.
                    let _ = self.control.try_send(Control::Step(Box::new(m)));
                }
            }
            Some(&FRAME_KEEL) => match keelpb::PeerMessage::decode(&frame[1..]) {
                Ok(m) => self.keel_message(from, m),
                Err(e) => tracing::warn!(from = format!("{from:x}"), error = %e, "bad peer frame"),
            },
            _ => tracing::warn!(from = format!("{from:x}"), "unknown peer frame"),
        }
    }

    fn unreachable(&self, peer: u64) {
        let _ = self.control.try_send(Control::Unreachable(peer));
    }

    fn is_removed(&self, peer: u64) -> bool {
        self.membership.is_removed(peer)
    }

    /// A peer says this member was removed (it was down or cut off when that was decided):
    /// stop, as etcd's does when its peers answer it 410 Gone.
    fn removed(&self) {
        crate::fatal(0, REMOVED);
    }

    /// The raft core reads its peers' frames itself (one thread crossing less each way).
    fn adopts(&self) -> bool {
        true
    }

    /// A full control queue drops the link: the peer dials again.
    fn adopt(&self, link: Adopted) {
        let _ = self.control.try_send(Control::Adopt(Box::new(link)));
    }

    fn query(&self) -> Bytes {
        Bytes::from(
            keelpb::ClusterInfo {
                cluster_id: self.cluster_id,
                members: self.membership.get().to_vec(),
            }
            .encode_to_vec(),
        )
    }

    fn receive_stream(&self, from: u64, next: &mut dyn FnMut() -> Option<Bytes>) -> bool {
        let Ok(_one) = self.receiving.try_lock() else {
            tracing::warn!(
                from = format!("{from:x}"),
                "refused a state: already receiving one"
            );
            return false;
        };
        match self.receive_state(next) {
            Ok((m, path)) => {
                // Raft decides whether to install it; the raft core then switches to it.
                self.control
                    .send(Control::Snapshot(Box::new((m, path))))
                    .is_ok()
            }
            Err(e) => {
                tracing::warn!(from = format!("{from:x}"), "refused a state: {e:#}");
                false
            }
        }
    }
}

impl PeerInbound {
    /// Writes a state the leader streams to the incoming backend file, checked whole; its
    /// raft message.
    fn receive_state(
        &self,
        next: &mut dyn FnMut() -> Option<Bytes>,
    ) -> anyhow::Result<(raft::eraftpb::Message, std::path::PathBuf)> {
        let first = next().ok_or_else(|| anyhow::anyhow!("an empty stream"))?;
        anyhow::ensure!(first.first() == Some(&FRAME_RAFT), "no raft message first");
        let m = raft::eraftpb::Message::parse_from_bytes(&first[1..])?;
        anyhow::ensure!(
            m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot,
            "not a snapshot message"
        );
        let meta = m.get_snapshot().get_metadata();
        let paths = crate::install::Paths::new(&self.db_path);
        tracing::info!(
            index = meta.index,
            term = meta.term,
            "receiving the leader's state"
        );
        let path = paths.incoming((meta.index, meta.term));
        let mut inc = keel_storage::transfer::Incoming::create(&path)?;
        while let Some(f) = next() {
            inc.frame(&f)?;
        }
        let point = inc.finish()?;
        anyhow::ensure!(
            point == (meta.index, meta.term),
            "the state ends at {point:?}, its message says ({}, {})",
            meta.index,
            meta.term
        );
        Ok((m, path))
    }
}

impl PeerInbound {
    fn keel_message(&self, from: u64, m: keelpb::PeerMessage) {
        // An answer to one of this member's calls to the leader.
        let answered = (m.lease_reply.as_ref().map(|r| r.request))
            .or(m.promote_reply.as_ref().map(|r| r.request));
        if let Some(request) = answered {
            self.forwarder.answer(request, m);
            return;
        }
        if let Some(call) = m.lease {
            // A follower forwards its clients' keep-alives: only the leader's lessor counts.
            let leader = self.status.leader_id.load(Ordering::Acquire) == self.member_id;
            let mut reply = keelpb::LeaseForwardReply {
                request: call.request,
                not_leader: !leader,
                ..Default::default()
            };
            if leader {
                if call.peek {
                    match self.leases.remaining(call.id) {
                        Some((l, left)) => {
                            reply.ttl = left;
                            reply.granted_ttl = l.ttl;
                        }
                        None => reply.ttl = -1,
                    }
                } else {
                    reply.ttl = self.leases.renew(call.id);
                }
            }
            if let Some(p) = self.peers.get() {
                let frame = keel_frame(&keelpb::PeerMessage {
                    lease_reply: Some(reply),
                    ..Default::default()
                });
                p.send(from, frame);
            }
        }

        if let Some(call) = m.promote {
            let (tx, rx) = oneshot::channel();
            let sent = self.control.try_send(Control::Promote(call.id, tx)).is_ok();
            let peers = self.peers.get().cloned();
            tokio::spawn(async move {
                let error = match (sent, rx.await) {
                    (true, Ok(Ok(_))) => String::new(),
                    (true, Ok(Err(e))) => e.to_string(),
                    _ => ApiError::Stopped.to_string(),
                };
                let reply = keelpb::PeerMessage {
                    promote_reply: Some(keelpb::PromoteForwardReply {
                        request: call.request,
                        error,
                    }),
                    ..Default::default()
                };
                if let Some(p) = peers {
                    p.send(from, keel_frame(&reply));
                }
            });
        }
    }
}

/// A follower's calls to the leader over the peer transport (lease keep-alives and
/// time-to-live, MemberPromote), each matched to its answer by a request number.
pub struct LeaseForwarder {
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<keelpb::PeerMessage>>>,
    pub peers: OnceLock<Arc<Peers>>,
}

impl LeaseForwarder {
    pub fn new() -> LeaseForwarder {
        LeaseForwarder {
            next: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
            peers: OnceLock::new(),
        }
    }

    /// Hands the leader's answer to request `request` to whoever waits for it.
    fn answer(&self, request: u64, reply: keelpb::PeerMessage) {
        let tx = self.waiting.lock().expect("leader calls").remove(&request);
        if let Some(tx) = tx {
            let _ = tx.send(reply);
        }
    }

    /// Sends `ask(request)` to `leader` and waits up to `limit` for its answer (None: not
    /// sent, or no answer in time).
    async fn call_leader(
        &self,
        leader: u64,
        limit: Duration,
        ask: impl FnOnce(u64) -> keelpb::PeerMessage,
    ) -> Result<Option<keelpb::PeerMessage>, ApiError> {
        let peers = self.peers.get().ok_or(ApiError::NoLeader)?;
        let request = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .expect("leader calls")
            .insert(request, tx);
        let got = if peers.send(leader, keel_frame(&ask(request))) {
            tokio::time::timeout(limit, rx)
                .await
                .ok()
                .and_then(Result::ok)
        } else {
            None
        };
        self.waiting.lock().expect("leader calls").remove(&request);
        Ok(got)
    }

    /// Asks `leader` to promote learner `id` (it alone knows how far the learner is).
    pub async fn promote(&self, leader: u64, id: u64) -> Result<(), ApiError> {
        let got = self
            .call_leader(leader, Duration::from_secs(7), |request| {
                keelpb::PeerMessage {
                    promote: Some(keelpb::PromoteForward { request, id }),
                    ..Default::default()
                }
            })
            .await?;
        match got.and_then(|m| m.promote_reply) {
            Some(r) if r.error.is_empty() => Ok(()),
            Some(r) => Err(api_error(&r.error)),
            None => Err(ApiError::Timeout),
        }
    }

    /// Asks `leader` to renew lease `id` (or, `peek`, for its remaining TTL).
    pub async fn call(
        &self,
        leader: u64,
        id: i64,
        peek: bool,
    ) -> Result<keelpb::LeaseForwardReply, ApiError> {
        let got = self
            .call_leader(leader, FORWARD_TIMEOUT, |request| keelpb::PeerMessage {
                lease: Some(keelpb::LeaseForward { request, id, peek }),
                ..Default::default()
            })
            .await?;
        match got.and_then(|m| m.lease_reply) {
            Some(r) if !r.not_leader => Ok(r),
            Some(_) => Err(ApiError::LeaderChanged),
            None => Err(ApiError::Timeout),
        }
    }
}

/// The errors a forwarded membership change can come back with.
fn forwarded_errors() -> [ApiError; 18] {
    [
        ApiError::MemberNotFound,
        ApiError::MemberNotLearner,
        ApiError::LearnerNotReady,
        ApiError::NoLeader,
        ApiError::LeaderChanged,
        ApiError::Timeout,
        ApiError::Stopped,
        ApiError::MemberExists,
        ApiError::PeerUrlExists,
        ApiError::MemberBadUrls,
        ApiError::TooManyLearners,
        ApiError::MemberNotEnoughStarted,
        ApiError::TimeoutDueToLeaderFail,
        ApiError::NotLeader,
        ApiError::BadLeaderTransferee,
        ApiError::LeaderTransferTimeout,
        ApiError::Unhealthy,
        ApiError::NotCapable,
    ]
}

/// An error a peer answered with, back to its kind (by etcd's text), so the client gets
/// etcd's code for it as if the leader had answered.
fn api_error(text: &str) -> ApiError {
    forwarded_errors()
        .into_iter()
        .find(|e| e.to_string() == text)
        .unwrap_or_else(|| ApiError::Internal(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_errors_come_back_as_themselves() {
        for e in forwarded_errors() {
            assert_eq!(api_error(&e.to_string()), e);
        }
        // etcd's codes, not Unknown, for what a leader refuses a promotion with.
        for e in [ApiError::TooManyLearners, ApiError::MemberNotEnoughStarted] {
            let code = tonic::Status::from(api_error(&e.to_string())).code();
            assert_eq!(code, tonic::Code::FailedPrecondition, "{e}");
        }
        assert_eq!(
            api_error("something else"),
            ApiError::Internal("something else".into())
        );
    }
}
