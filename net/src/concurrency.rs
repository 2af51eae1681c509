//! The Lock and Election services (etcd's v3lock and v3election gRPC gateways to its
//! concurrency package); the node carries them out.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use keel_proto::{v3electionpb as epb, v3lockpb as lpb};
use tonic::{Code, Request, Response, Status};

use crate::backend::Backend;
use crate::service::check_size;
use crate::ApiError;

type Reply<T> = Result<Response<T>, Status>;

/// etcd serves Lock and Election through its own client and hands the client's error back as
/// a plain error, which gRPC sends as Unknown with the same text (whatever its KV code).
fn relayed(e: ApiError) -> Status {
    Status::new(Code::Unknown, e.to_string())
}

/// A request over grpc's receive limit is refused by grpc itself in etcd (ResourceExhausted),
/// before the service sees it.
fn received<M: keel_proto::prost::Message, B: Backend>(
    req: Request<M>,
    backend: &B,
) -> Result<M, Status> {
    let m = req.into_inner();
    check_size(&m, backend.limits())?;
    Ok(m)
}

pub struct LockService<B> {
    backend: Arc<B>,
}

impl<B> LockService<B> {
    pub fn new(backend: Arc<B>) -> Self {
        LockService { backend }
    }
}

#[tonic::async_trait]
impl<B: Backend> lpb::lock_server::Lock for LockService<B> {
    async fn lock(&self, req: Request<lpb::LockRequest>) -> Reply<lpb::LockResponse> {
        let r = self.backend.lock(received(req, &*self.backend)?).await;
        Ok(Response::new(r.map_err(relayed)?))
    }

    async fn unlock(&self, req: Request<lpb::UnlockRequest>) -> Reply<lpb::UnlockResponse> {
        let r = self.backend.unlock(received(req, &*self.backend)?).await;
        Ok(Response::new(r.map_err(relayed)?))
    }
}

pub struct ElectionService<B> {
    backend: Arc<B>,
}

impl<B> ElectionService<B> {
    pub fn new(backend: Arc<B>) -> Self {
        ElectionService { backend }
    }
}

type Observed = Pin<Box<dyn Stream<Item = Result<epb::LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<B: Backend> epb::election_server::Election for ElectionService<B> {
    async fn campaign(&self, req: Request<epb::CampaignRequest>) -> Reply<epb::CampaignResponse> {
        let r = self.backend.campaign(received(req, &*self.backend)?).await;
        Ok(Response::new(r.map_err(relayed)?))
    }

    async fn proclaim(&self, req: Request<epb::ProclaimRequest>) -> Reply<epb::ProclaimResponse> {
        let r = self.backend.proclaim(received(req, &*self.backend)?).await;
        Ok(Response::new(r.map_err(relayed)?))
    }

    async fn leader(&self, req: Request<epb::LeaderRequest>) -> Reply<epb::LeaderResponse> {
        let r = self.backend.leader(received(req, &*self.backend)?).await;
        Ok(Response::new(r.map_err(relayed)?))
    }

    type ObserveStream = Observed;

    async fn observe(&self, req: Request<epb::LeaderRequest>) -> Reply<Observed> {
        let out = self
            .backend
            .observe(received(req, &*self.backend)?)
            .map(|r| r.map_err(relayed));
        Ok(Response::new(Box::pin(out)))
    }

    async fn resign(&self, req: Request<epb::ResignRequest>) -> Reply<epb::ResignResponse> {
        let r = self.backend.resign(received(req, &*self.backend)?).await;
        Ok(Response::new(r.map_err(relayed)?))
    }
}
