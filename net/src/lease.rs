//! The Lease service. Grant and revoke go through raft (the node's write path); keep-alives,
//! time-to-live and the list are answered by the node at once, as etcd's leader does.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use keel_proto::pb;
use tonic::{Request, Response, Status, Streaming};

use crate::backend::{Backend, WriteRequest, WriteResponse};

type Reply<T> = Result<Response<T>, Status>;
type KeepAlives = Pin<Box<dyn Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

pub struct LeaseService<B> {
    backend: Arc<B>,
}

impl<B> LeaseService<B> {
    pub fn new(backend: Arc<B>) -> Self {
        LeaseService { backend }
    }
}

fn unexpected(what: &str) -> Status {
    Status::internal(format!("keel: unexpected response kind for {what}"))
}

#[tonic::async_trait]
impl<B: Backend> pb::lease_server::Lease for LeaseService<B> {
    async fn lease_grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Reply<pb::LeaseGrantResponse> {
        match self
            .backend
            .write(WriteRequest::LeaseGrant(req.into_inner()))
            .await?
        {
            WriteResponse::LeaseGrant(mut r) => {
                r.header = Some(self.backend.header(r.header.map_or(0, |h| h.revision)));
                Ok(Response::new(r))
            }
            _ => Err(unexpected("lease grant")),
        }
    }

    async fn lease_revoke(
        &self,
        req: Request<pb::LeaseRevokeRequest>,
    ) -> Reply<pb::LeaseRevokeResponse> {
        match self
            .backend
            .write(WriteRequest::LeaseRevoke(req.into_inner()))
            .await?
        {
            WriteResponse::LeaseRevoke(mut r) => {
                r.header = Some(self.backend.header(r.header.map_or(0, |h| h.revision)));
                Ok(Response::new(r))
            }
            _ => Err(unexpected("lease revoke")),
        }
    }

    type LeaseKeepAliveStream = KeepAlives;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Reply<KeepAlives> {
        let backend = self.backend.clone();
        // One answer per request, in order; a receive error ends the stream.
        let answers = req
            .into_inner()
            .take_while(|r| futures::future::ready(r.is_ok()))
            .filter_map(|r| futures::future::ready(r.ok()))
            .then(move |r| {
                let backend = backend.clone();
                async move { backend.lease_keep_alive(r.id).await.map_err(Status::from) }
            })
            // An error ends the stream (etcd returns it from the handler).
            .scan(false, |failed, r| {
                let item = (!*failed).then_some(r);
                *failed = item.as_ref().is_some_and(|r| r.is_err());
                futures::future::ready(item)
            });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Reply<pb::LeaseTimeToLiveResponse> {
        Ok(Response::new(
            self.backend.lease_time_to_live(req.into_inner()).await?,
        ))
    }

    async fn lease_leases(
        &self,
        _req: Request<pb::LeaseLeasesRequest>,
    ) -> Reply<pb::LeaseLeasesResponse> {
        Ok(Response::new(self.backend.lease_leases()))
    }
}
