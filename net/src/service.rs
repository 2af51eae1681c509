//! The etcd gRPC services over a `Backend`: decode, validate at the edge, hand to the node,
//! fill the response header as etcd does (cluster_id, member_id, raft_term; revision if 0).

use std::sync::Arc;

use futures::StreamExt;
use keel_proto::pb;
use keel_proto::prost::Message;
use tonic::{Request, Response, Status};

use crate::backend::{Backend, Limits, WriteRequest, WriteResponse, GRPC_OVERHEAD_BYTES};
use crate::error::ApiError;
use crate::validate;

type Reply<T> = Result<Response<T>, Status>;
type RangeChunks =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::RangeStreamResponse, Status>> + Send>>;

/// The gRPC decode limit we give tonic: above etcd's, so that a message between etcd's limit
/// and this one gets etcd's own answer from `check_size` rather than tonic's.
pub fn decode_limit_bytes(limits: Limits) -> usize {
    (limits.max_request_bytes + GRPC_OVERHEAD_BYTES) * 2
}

/// etcd's gRPC server refuses messages over max-request-bytes + 512 KiB with grpc-go's text.
pub(crate) fn check_size<M: Message>(m: &M, limits: Limits) -> Result<(), ApiError> {
    let got = m.encoded_len();
    let max = limits.max_request_bytes + GRPC_OVERHEAD_BYTES;
    if got > max {
        return Err(ApiError::MessageTooLarge { got, max });
    }
    Ok(())
}

fn unexpected(what: &str) -> Status {
    Status::internal(format!("keel: unexpected response kind for {what}"))
}

pub struct KvService<B> {
    backend: Arc<B>,
}

impl<B> KvService<B> {
    pub fn new(backend: Arc<B>) -> Self {
        KvService { backend }
    }
}

impl<B: Backend> KvService<B> {
    async fn write(&self, req: WriteRequest) -> Result<WriteResponse, Status> {
        Ok(self.backend.write(req).await?)
    }

    fn header(&self, h: &Option<pb::ResponseHeader>) -> Option<pb::ResponseHeader> {
        Some(self.backend.header(h.as_ref().map_or(0, |h| h.revision)))
    }
}

#[tonic::async_trait]
impl<B: Backend> pb::kv_server::Kv for KvService<B> {
    async fn range(&self, req: Request<pb::RangeRequest>) -> Reply<pb::RangeResponse> {
        let r = req.into_inner();
        check_size(&r, self.backend.limits())?;
        validate::check_range(&r)?;
        let mut resp = self.backend.range(r).await?;
        resp.header = self.header(&resp.header);
        Ok(Response::new(resp))
    }

    type RangeStreamStream = RangeChunks;

    async fn range_stream(&self, req: Request<pb::RangeRequest>) -> Reply<RangeChunks> {
        use pb::range_request::{SortOrder, SortTarget};
        let r = req.into_inner();
        check_size(&r, self.backend.limits())?;
        validate::check_range(&r)?;
        // etcd 3.7's checkRangeStreamRequest: only key order streams (NONE, whatever the
        // target, or ASCEND by key), and no revision filters; clients fall back to Range.
        let order = r.sort_order;
        let natural = order == SortOrder::None as i32
            || (order == SortOrder::Ascend as i32 && r.sort_target == SortTarget::Key as i32);
        if !natural {
            let msg = "RangeStream does not support custom sort orders";
            return Err(Status::unimplemented(msg));
        }
        if validate::has_revision_filters(&r) {
            let msg = "RangeStream does not support revision filters";
            return Err(Status::unimplemented(msg));
        }
        let chunks = self
            .backend
            .range_stream(r)
            .map(|c| c.map_err(Status::from));
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Reply<pb::PutResponse> {
        let r = req.into_inner();
        check_size(&r, self.backend.limits())?;
        validate::check_put(&r)?;
        match self.write(WriteRequest::Put(r)).await? {
            WriteResponse::Put(mut resp) => {
                resp.header = self.header(&resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("put")),
        }
    }

    async fn delete_range(
        &self,
        req: Request<pb::DeleteRangeRequest>,
    ) -> Reply<pb::DeleteRangeResponse> {
        let r = req.into_inner();
        check_size(&r, self.backend.limits())?;
        validate::check_delete(&r)?;
        match self.write(WriteRequest::DeleteRange(r)).await? {
            WriteResponse::DeleteRange(mut resp) => {
                resp.header = self.header(&resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("delete range")),
        }
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Reply<pb::TxnResponse> {
        let r = req.into_inner();
        let limits = self.backend.limits();
        check_size(&r, limits)?;
        validate::check_txn_all(&r, limits.max_txn_ops)?;
        match self.write(WriteRequest::Txn(r)).await? {
            WriteResponse::Txn(mut resp) => {
                resp.header = self.header(&resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("txn")),
        }
    }

    async fn compact(&self, req: Request<pb::CompactionRequest>) -> Reply<pb::CompactionResponse> {
        let r = req.into_inner();
        match self.write(WriteRequest::Compact(r)).await? {
            WriteResponse::Compact(mut resp) => {
                resp.header = self.header(&resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("compact")),
        }
    }
}

pub struct MaintenanceService<B> {
    backend: Arc<B>,
}

impl<B> MaintenanceService<B> {
    pub fn new(backend: Arc<B>) -> Self {
        MaintenanceService { backend }
    }
}

fn not_yet(what: &str) -> Status {
    Status::unimplemented(format!("keel: {what} is not implemented yet"))
}

#[tonic::async_trait]
impl<B: Backend> pb::maintenance_server::Maintenance for MaintenanceService<B> {
    async fn alarm(&self, req: Request<pb::AlarmRequest>) -> Reply<pb::AlarmResponse> {
        let r = req.into_inner();
        pb::alarm_request::AlarmAction::try_from(r.action)
            .map_err(|_| Status::invalid_argument("etcdserver: unknown alarm action"))?;
        // Every action goes through the log, a get too (etcd's), so a member cut off from
        // a quorum does not answer it.
        match self.backend.write(WriteRequest::Alarm(r)).await? {
            WriteResponse::Alarm(mut resp) => {
                resp.header = Some(self.backend.header(0));
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("alarm")),
        }
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Reply<pb::StatusResponse> {
        Ok(Response::new(self.backend.status()))
    }

    async fn defragment(
        &self,
        _req: Request<pb::DefragmentRequest>,
    ) -> Reply<pb::DefragmentResponse> {
        self.backend.defragment().await?;
        // etcd answers Defragment and MoveLeader with an empty message, no header.
        Ok(Response::new(pb::DefragmentResponse { header: None }))
    }

    async fn hash(&self, _req: Request<pb::HashRequest>) -> Reply<pb::HashResponse> {
        let hash = self.backend.hash().await?;
        Ok(Response::new(pb::HashResponse {
            header: Some(self.backend.header(0)),
            hash,
        }))
    }

    async fn hash_kv(&self, req: Request<pb::HashKvRequest>) -> Reply<pb::HashKvResponse> {
        Ok(Response::new(
            self.backend.hash_kv(req.into_inner().revision)?,
        ))
    }

    type SnapshotStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::SnapshotResponse, Status>> + Send>>;

    async fn snapshot(&self, _req: Request<pb::SnapshotRequest>) -> Reply<Self::SnapshotStream> {
        let chunks = self.backend.snapshot().map(|c| c.map_err(Status::from));
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn move_leader(
        &self,
        req: Request<pb::MoveLeaderRequest>,
    ) -> Reply<pb::MoveLeaderResponse> {
        self.backend.move_leader(req.into_inner().target_id).await?;
        Ok(Response::new(pb::MoveLeaderResponse { header: None }))
    }

    async fn downgrade(&self, _req: Request<pb::DowngradeRequest>) -> Reply<pb::DowngradeResponse> {
        Err(not_yet("Downgrade"))
    }
}

pub struct ClusterService<B> {
    backend: Arc<B>,
}

impl<B> ClusterService<B> {
    pub fn new(backend: Arc<B>) -> Self {
        ClusterService { backend }
    }
}

impl<B: Backend> ClusterService<B> {
    /// etcd's cluster server header: cluster, member and term, no revision.
    fn header(&self) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            revision: 0,
            ..self.backend.header(0)
        })
    }
}

#[tonic::async_trait]
impl<B: Backend> pb::cluster_server::Cluster for ClusterService<B> {
    async fn member_add(&self, req: Request<pb::MemberAddRequest>) -> Reply<pb::MemberAddResponse> {
        let req = req.into_inner();
        let member = self
            .backend
            .member_add(req.peer_ur_ls, req.is_learner)
            .await?;
        Ok(Response::new(pb::MemberAddResponse {
            header: self.header(),
            member: Some(member),
            members: self.backend.members(),
        }))
    }

    async fn member_remove(
        &self,
        req: Request<pb::MemberRemoveRequest>,
    ) -> Reply<pb::MemberRemoveResponse> {
        self.backend.member_remove(req.into_inner().id).await?;
        Ok(Response::new(pb::MemberRemoveResponse {
            header: self.header(),
            members: self.backend.members(),
        }))
    }

    async fn member_update(
        &self,
        req: Request<pb::MemberUpdateRequest>,
    ) -> Reply<pb::MemberUpdateResponse> {
        let req = req.into_inner();
        self.backend.member_update(req.id, req.peer_ur_ls).await?;
        Ok(Response::new(pb::MemberUpdateResponse {
            header: self.header(),
            members: self.backend.members(),
        }))
    }

    async fn member_list(
        &self,
        req: Request<pb::MemberListRequest>,
    ) -> Reply<pb::MemberListResponse> {
        // etcd 3.5+: a linearizable list (etcdctl 3.6's default) first waits for a ReadIndex
        // round, so it fails where the member is cut off and never shows a stale membership.
        if req.into_inner().linearizable {
            self.backend.read_barrier().await?;
        }
        Ok(Response::new(pb::MemberListResponse {
            header: self.header(),
            members: self.backend.members(),
        }))
    }

    async fn member_promote(
        &self,
        req: Request<pb::MemberPromoteRequest>,
    ) -> Reply<pb::MemberPromoteResponse> {
        self.backend.member_promote(req.into_inner().id).await?;
        Ok(Response::new(pb::MemberPromoteResponse {
            header: self.header(),
            members: self.backend.members(),
        }))
    }
}
