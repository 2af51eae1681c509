//! The Watch service: one bidirectional stream per call, handed whole to the node (which owns
//! the watch hub and etcd's watch semantics).
//!
//! Written out instead of tonic's generated server for one reason: a response can come
//! already encoded. A revision fanned out to a thousand watchers is one event encoded once
//! and a thousand small frames around it (header, watch ID), not a thousand messages to
//! clone, encode and drop.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use futures::{Stream, StreamExt};
use keel_proto::pb;
use keel_proto::prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Request, Response, Status, Streaming};

use crate::backend::Backend;

/// One Watch response: a message, or one already encoded as a `WatchResponse`.
#[derive(Debug, Clone)]
pub enum WatchOut {
    Message(pb::WatchResponse),
    Encoded(Bytes),
}

impl From<pb::WatchResponse> for WatchOut {
    fn from(r: pb::WatchResponse) -> Self {
        WatchOut::Message(r)
    }
}

impl WatchOut {
    fn write(&self, buf: &mut impl BufMut) -> Result<(), Status> {
        match self {
            WatchOut::Message(m) => m.encode(buf).map_err(|e| Status::internal(e.to_string())),
            WatchOut::Encoded(b) => {
                buf.put_slice(b);
                Ok(())
            }
        }
    }

    /// The response as a message (decoding an encoded one: for tests and tools).
    pub fn into_message(self) -> pb::WatchResponse {
        match self {
            WatchOut::Message(m) => m,
            WatchOut::Encoded(b) => {
                pb::WatchResponse::decode(b).expect("an encoded watch response decodes")
            }
        }
    }
}

/// The Watch call's codec: requests decoded by prost, responses encoded by prost or copied.
#[derive(Default)]
struct WatchCodec;

impl Codec for WatchCodec {
    type Encode = WatchOut;
    type Decode = pb::WatchRequest;
    type Encoder = WatchCodec;
    type Decoder = WatchCodec;

    fn encoder(&mut self) -> WatchCodec {
        WatchCodec
    }

    fn decoder(&mut self) -> WatchCodec {
        WatchCodec
    }
}

impl Encoder for WatchCodec {
    type Item = WatchOut;
    type Error = Status;

    fn encode(&mut self, item: WatchOut, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.write(buf)
    }
}

impl Decoder for WatchCodec {
    type Item = pb::WatchRequest;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<pb::WatchRequest>, Status> {
        // As tonic's prost codec: a message that does not parse is Internal.
        pb::WatchRequest::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

type Responses = Pin<Box<dyn Stream<Item = Result<WatchOut, Status>> + Send>>;

/// The `etcdserverpb.Watch` service.
pub struct WatchServer<B> {
    backend: Arc<B>,
    max_decoding_message_size: usize,
}

impl<B> Clone for WatchServer<B> {
    fn clone(&self) -> Self {
        WatchServer {
            backend: self.backend.clone(),
            max_decoding_message_size: self.max_decoding_message_size,
        }
    }
}

impl<B> WatchServer<B> {
    pub fn new(backend: Arc<B>, max_decoding_message_size: usize) -> Self {
        WatchServer {
            backend,
            max_decoding_message_size,
        }
    }
}

impl<B> tonic::server::NamedService for WatchServer<B> {
    const NAME: &'static str = "etcdserverpb.Watch";
}

/// The one method, as tonic's `StreamingService`.
struct WatchCall<B>(Arc<B>);

impl<B: Backend> tonic::codegen::Service<Request<Streaming<pb::WatchRequest>>> for WatchCall<B> {
    type Response = Response<Responses>;
    type Error = Status;
    type Future = futures::future::Ready<Result<Response<Responses>, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Streaming<pb::WatchRequest>>) -> Self::Future {
        // A receive error (the client reset its side) ends the requests; the responses go on
        // until the call itself ends, as etcd's.
        let requests = req
            .into_inner()
            .take_while(|r| futures::future::ready(r.is_ok()))
            .filter_map(|r| futures::future::ready(r.ok()));
        let responses = self
            .0
            .watch(Box::pin(requests))
            .map(|r| r.map_err(Status::from));
        futures::future::ready(Ok(Response::new(Box::pin(responses))))
    }
}

impl<B: Backend> tonic::codegen::Service<http::Request<tonic::body::Body>> for WatchServer<B> {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path() != "/etcdserverpb.Watch/Watch" {
            // As tonic's generated routers: Unimplemented (the unserved layer adds the text).
            return Box::pin(async {
                let mut r = http::Response::new(tonic::body::Body::default());
                let headers = r.headers_mut();
                headers.insert(
                    Status::GRPC_STATUS,
                    (tonic::Code::Unimplemented as i32).into(),
                );
                headers.insert(
                    http::header::CONTENT_TYPE,
                    tonic::metadata::GRPC_CONTENT_TYPE,
                );
                Ok(r)
            });
        }
        let call = WatchCall(self.backend.clone());
        let limit = self.max_decoding_message_size;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(WatchCodec)
                .apply_max_message_size_config(Some(limit), Some(usize::MAX));
            Ok(grpc.streaming(call, req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the codec writes for either form is what prost writes for the message.
    #[test]
    fn an_encoded_response_goes_out_as_is() {
        let m = pb::WatchResponse {
            header: Some(pb::ResponseHeader {
                cluster_id: 7,
                member_id: 9,
                revision: 42,
                raft_term: 3,
            }),
            watch_id: 5,
            created: true,
            ..Default::default()
        };
        let mut out = Vec::new();
        for item in [
            WatchOut::from(m.clone()),
            WatchOut::Encoded(m.encode_to_vec().into()),
        ] {
            let mut buf = Vec::new();
            item.write(&mut buf).unwrap();
            out.push(buf);
            assert_eq!(item.into_message(), m);
        }
        assert_eq!(out[0], m.encode_to_vec());
        assert_eq!(out[0], out[1]);
    }
}
