//! The Watch service: one bidirectional stream per call, handed whole to the node (which owns
//! the watch hub and etcd's watch semantics).

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use keel_proto::pb;
use tonic::{Request, Response, Status, Streaming};

use crate::backend::Backend;

pub struct WatchService<B> {
    backend: Arc<B>,
}

impl<B> WatchService<B> {
    pub fn new(backend: Arc<B>) -> Self {
        WatchService { backend }
    }
}

type Responses = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<B: Backend> pb::watch_server::Watch for WatchService<B> {
    type WatchStream = Responses;

    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Responses>, Status> {
        // A receive error (the client reset its side) ends the requests; the responses go on
        // until the call itself ends, as etcd's.
        let requests = req
            .into_inner()
            .take_while(|r| futures::future::ready(r.is_ok()))
            .filter_map(|r| futures::future::ready(r.ok()));
        let responses = self
            .backend
            .watch(Box::pin(requests))
            .map(|r| r.map_err(Status::from));
        Ok(Response::new(Box::pin(responses)))
    }
}
