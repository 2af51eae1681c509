//! What the net cores need from the node. `net` sees the node only through this trait, so
//! gRPC concerns stay here and the node's raft, apply and storage stay out.

use std::future::Future;
use std::pin::Pin;

use futures::Stream;

use keel_proto::pb;
use keel_proto::{v3electionpb as epb, v3lockpb as lpb};

use crate::error::ApiError;

/// Request limits, checked at the edge (etcd's --max-request-bytes and --max-txn-ops).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
}

/// etcd's gRPC receive limit is the request limit plus this overhead.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// A request that changes the store, so goes through raft.
#[derive(Debug, Clone)]
pub enum WriteRequest {
    Put(pb::PutRequest),
    DeleteRange(pb::DeleteRangeRequest),
    Txn(pb::TxnRequest),
    Compact(pb::CompactionRequest),
    /// Alarm activate/deactivate (they go through raft, as in etcd).
    Alarm(pb::AlarmRequest),
    LeaseGrant(pb::LeaseGrantRequest),
    LeaseRevoke(pb::LeaseRevokeRequest),
}

#[derive(Debug, Clone)]
pub enum WriteResponse {
    Put(pb::PutResponse),
    DeleteRange(pb::DeleteRangeResponse),
    Txn(pb::TxnResponse),
    Compact(pb::CompactionResponse),
    Alarm(pb::AlarmResponse),
    LeaseGrant(pb::LeaseGrantResponse),
    LeaseRevoke(pb::LeaseRevokeResponse),
}

/// A Watch stream's requests, as the client sends them (ends when the client stops sending).
pub type WatchRequests = Pin<Box<dyn Stream<Item = pb::WatchRequest> + Send>>;
/// A Watch stream's responses; an error ends the stream with that status.
pub type WatchResponses =
    Pin<Box<dyn Stream<Item = Result<crate::watch::WatchOut, ApiError>> + Send>>;

/// RangeStream's chunks.
pub type RangeChunks =
    Pin<Box<dyn Stream<Item = Result<pb::RangeStreamResponse, ApiError>> + Send>>;

/// Maintenance.Snapshot's pieces: the etcd backend file, then its sha256.
pub type SnapshotChunks =
    Pin<Box<dyn Stream<Item = Result<pb::SnapshotResponse, ApiError>> + Send>>;

/// Election.Observe's responses.
pub type ObserveResponses =
    Pin<Box<dyn Stream<Item = Result<keel_proto::v3electionpb::LeaderResponse, ApiError>> + Send>>;

pub trait Backend: Send + Sync + 'static {
    fn limits(&self) -> Limits;

    /// A header with this member's cluster_id, member_id and raft_term, and `revision` (the
    /// current revision when 0, as etcd fills it).
    fn header(&self, revision: i64) -> pb::ResponseHeader;

    fn range(
        &self,
        req: pb::RangeRequest,
    ) -> impl Future<Output = Result<pb::RangeResponse, ApiError>> + Send;

    /// Range as the Range method answers it: a large response may come as encoded parts
    /// (see `crate::range`). The header's IDs and term are filled at the edge.
    fn range_out(
        &self,
        req: pb::RangeRequest,
    ) -> impl Future<Output = Result<crate::range::RangeOut, ApiError>> + Send {
        let response = self.range(req);
        async move { response.await.map(crate::range::RangeOut::Message) }
    }

    /// etcd 3.7's RangeStream: the range in chunks, all at one revision, in bounded memory.
    fn range_stream(&self, req: pb::RangeRequest) -> RangeChunks;

    fn write(
        &self,
        req: WriteRequest,
    ) -> impl Future<Output = Result<WriteResponse, ApiError>> + Send;

    fn status(&self) -> pb::StatusResponse;

    fn members(&self) -> Vec<pb::Member>;

    /// Resolves once this member has applied everything committed when it was called (a
    /// ReadIndex round with the leader), as a linearizable read waits.
    fn read_barrier(&self) -> impl Future<Output = Result<(), ApiError>> + Send {
        std::future::ready(Ok(()))
    }

    /// This member is a learner: it serves only Status and serializable ranges.
    fn is_learner(&self) -> bool {
        false
    }

    /// This member knows a leader (a lone member always does).
    fn has_leader(&self) -> bool {
        true
    }

    /// The election timeout (`--election-timeout`).
    fn election_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(1000)
    }

    /// Cluster.MemberAdd: the new member, once the change applied here.
    fn member_add(
        &self,
        peer_urls: Vec<String>,
        is_learner: bool,
    ) -> impl Future<Output = Result<pb::Member, ApiError>> + Send;

    fn member_remove(&self, id: u64) -> impl Future<Output = Result<(), ApiError>> + Send;

    fn member_update(
        &self,
        id: u64,
        peer_urls: Vec<String>,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;

    fn member_promote(&self, id: u64) -> impl Future<Output = Result<(), ApiError>> + Send;

    /// Maintenance.MoveLeader: hands leadership to `target` (asked of the leader).
    fn move_leader(&self, target: u64) -> impl Future<Output = Result<(), ApiError>> + Send;

    fn alarms(&self) -> Vec<pb::AlarmMember>;

    /// Rewrites this member's backend compactly (etcd's defrag; not through raft).
    fn defragment(&self) -> impl Future<Output = Result<(), ApiError>> + Send;

    /// Maintenance.Snapshot: this member's state as an etcd backend file (bbolt), streamed,
    /// then its sha256.
    fn snapshot(&self) -> SnapshotChunks;

    /// etcd's Hash (of this member's whole backend).
    fn hash(&self) -> impl Future<Output = Result<u32, ApiError>> + Send;

    /// etcd's HashKV at `revision` (0: the current one).
    fn hash_kv(&self, revision: i64) -> Result<pb::HashKvResponse, ApiError>;

    /// Serves one Watch stream (etcd's semantics live in the node's watch hub).
    fn watch(&self, requests: WatchRequests) -> WatchResponses;

    /// One keep-alive of a lease (no raft round, as etcd's: the leader renews it; a follower
    /// forwards it to the leader).
    fn lease_keep_alive(
        &self,
        id: i64,
    ) -> impl Future<Output = Result<pb::LeaseKeepAliveResponse, ApiError>> + Send;

    fn lease_time_to_live(
        &self,
        req: pb::LeaseTimeToLiveRequest,
    ) -> impl Future<Output = Result<pb::LeaseTimeToLiveResponse, ApiError>> + Send;

    fn lease_leases(&self) -> pb::LeaseLeasesResponse;

    fn lock(
        &self,
        req: lpb::LockRequest,
    ) -> impl Future<Output = Result<lpb::LockResponse, ApiError>> + Send;

    fn unlock(
        &self,
        req: lpb::UnlockRequest,
    ) -> impl Future<Output = Result<lpb::UnlockResponse, ApiError>> + Send;

    fn campaign(
        &self,
        req: epb::CampaignRequest,
    ) -> impl Future<Output = Result<epb::CampaignResponse, ApiError>> + Send;

    fn proclaim(
        &self,
        req: epb::ProclaimRequest,
    ) -> impl Future<Output = Result<epb::ProclaimResponse, ApiError>> + Send;

    fn resign(
        &self,
        req: epb::ResignRequest,
    ) -> impl Future<Output = Result<epb::ResignResponse, ApiError>> + Send;

    fn leader(
        &self,
        req: epb::LeaderRequest,
    ) -> impl Future<Output = Result<epb::LeaderResponse, ApiError>> + Send;

    fn observe(&self, req: epb::LeaderRequest) -> ObserveResponses;
}
