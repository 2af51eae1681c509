//! The Lock and Election services (etcd's v3lock and v3election gRPC gateways to its
//! concurrency package); the node carries them out.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use keel_proto::{v3electionpb as epb, v3lockpb as lpb};
use tonic::{Request, Response, Status};

use crate::backend::Backend;

type Reply<T> = Result<Response<T>, Status>;

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
        Ok(Response::new(self.backend.lock(req.into_inner()).await?))
    }

    async fn unlock(&self, req: Request<lpb::UnlockRequest>) -> Reply<lpb::UnlockResponse> {
        Ok(Response::new(self.backend.unlock(req.into_inner()).await?))
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
        Ok(Response::new(
            self.backend.campaign(req.into_inner()).await?,
        ))
    }

    async fn proclaim(&self, req: Request<epb::ProclaimRequest>) -> Reply<epb::ProclaimResponse> {
        Ok(Response::new(
            self.backend.proclaim(req.into_inner()).await?,
        ))
    }

    async fn leader(&self, req: Request<epb::LeaderRequest>) -> Reply<epb::LeaderResponse> {
        Ok(Response::new(self.backend.leader(req.into_inner())?))
    }

    type ObserveStream = Observed;

    async fn observe(&self, req: Request<epb::LeaderRequest>) -> Reply<Observed> {
        let out = self
            .backend
            .observe(req.into_inner())
            .map(|r| r.map_err(Status::from));
        Ok(Response::new(Box::pin(out)))
    }

    async fn resign(&self, req: Request<epb::ResignRequest>) -> Reply<epb::ResignResponse> {
        Ok(Response::new(self.backend.resign(req.into_inner()).await?))
    }
}
