//! The Watch service: one bidirectional stream per call, handed whole to the node (which owns
//! the watch hub and etcd's watch semantics).
//!
//! Written out instead of tonic's generated server for one reason: a response can come
//! already encoded. A revision fanned out to a thousand watchers is one event encoded once,
//! shared, and framed with each watcher's header and ID only as it is written out, not a
//! thousand messages to clone, encode and drop.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use futures::{Stream, StreamExt};
use keel_proto::pb;
use keel_proto::prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::backend::Backend;

/// One Watch response: a message, or a watcher's events response from encoded parts, framed
/// as it is written, byte for byte what prost writes for the `WatchResponse` with that header,
/// watch ID, fragment flag and events (fields in tag order, defaults left out).
#[derive(Debug, Clone)]
pub enum WatchOut {
    Message(pb::WatchResponse),
    Events {
        /// The header field whole: its key, its length, the encoded `ResponseHeader`.
        header: Bytes,
        watch_id: i64,
        fragment: bool,
        /// Each an encoded `Event`, shared by every watcher that gets it.
        events: Vec<Bytes>,
    },
}

/// What `event` takes framed as one of a `WatchResponse`'s events.
pub fn framed_event_len(event: &[u8]) -> usize {
    use keel_proto::prost::encoding::encoded_len_varint;
    1 + encoded_len_varint(event.len() as u64) + event.len()
}

/// The header field of a `WatchResponse` (field 1), encoded.
pub fn header_field(h: &pb::ResponseHeader) -> Bytes {
    let mut b = Vec::with_capacity(2 + h.encoded_len());
    keel_proto::prost::encoding::message::encode(1, h, &mut b);
    Bytes::from(b)
}

impl From<pb::WatchResponse> for WatchOut {
    fn from(r: pb::WatchResponse) -> Self {
        WatchOut::Message(r)
    }
}

impl crate::written::Written for WatchOut {
    fn encoded_len(&self) -> usize {
        WatchOut::encoded_len(self)
    }

    fn write_to(self, buf: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Status> {
        self.write(buf)
    }
}

impl WatchOut {
    /// What the response takes encoded.
    pub fn encoded_len(&self) -> usize {
        use keel_proto::prost::encoding::encoded_len_varint;
        match self {
            WatchOut::Message(m) => m.encoded_len(),
            WatchOut::Events {
                header,
                watch_id,
                fragment,
                events,
            } => {
                let id = if *watch_id == 0 {
                    0
                } else {
                    1 + encoded_len_varint(*watch_id as u64)
                };
                header.len()
                    + id
                    + 2 * usize::from(*fragment)
                    + events.iter().map(|e| framed_event_len(e)).sum::<usize>()
            }
        }
    }

    fn write(&self, buf: &mut impl BufMut) -> Result<(), Status> {
        use keel_proto::prost::encoding::{encode_key, encode_varint, WireType};
        match self {
            WatchOut::Message(m) => m.encode(buf).map_err(|e| Status::internal(e.to_string())),
            WatchOut::Events {
                header,
                watch_id,
                fragment,
                events,
            } => {
                buf.put_slice(header);
                if *watch_id != 0 {
                    encode_key(2, WireType::Varint, buf);
                    encode_varint(*watch_id as u64, buf);
                }
                if *fragment {
                    encode_key(7, WireType::Varint, buf);
                    encode_varint(1, buf);
                }
                for e in events {
                    encode_key(11, WireType::LengthDelimited, buf);
                    encode_varint(e.len() as u64, buf);
                    buf.put_slice(e);
                }
                Ok(())
            }
        }
    }

    /// The response encoded (as the codec writes it).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.write(&mut v).expect("a vec grows");
        v
    }

    /// The response as a message (decoding an encoded one: for tests and tools).
    pub fn into_message(self) -> pb::WatchResponse {
        match self {
            WatchOut::Message(m) => m,
            parts => pb::WatchResponse::decode(&parts.to_vec()[..])
                .expect("an encoded watch response decodes"),
        }
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
            let mut grpc = crate::written::grpc::<WatchOut, pb::WatchRequest>(limit);
            Ok(grpc.streaming(call, req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the codec writes for either form is what prost writes for the message.
    #[test]
    fn events_from_parts_go_out_as_prost_writes_the_message() {
        let header = pb::ResponseHeader {
            cluster_id: u64::MAX - 7,
            member_id: 9,
            revision: 1 << 40,
            raft_term: 3,
        };
        let event = |key: &[u8], n: usize| keel_proto::mvccpb::Event {
            r#type: 0,
            kv: Some(keel_proto::mvccpb::KeyValue {
                key: Bytes::copy_from_slice(key),
                value: Bytes::from(vec![b'v'; n]),
                create_revision: 2,
                mod_revision: 5,
                version: 4,
                lease: 0,
            }),
            prev_kv: None,
        };
        let events = [event(b"a", 0), event(b"bb", 200), event(b"c", 70_000)];
        for watch_id in [0, 1, 300, -1, i64::MAX] {
            for fragment in [false, true] {
                for n in 0..=events.len() {
                    let m = pb::WatchResponse {
                        header: Some(header),
                        watch_id,
                        fragment,
                        events: events[..n].to_vec(),
                        ..Default::default()
                    };
                    let parts = WatchOut::Events {
                        header: header_field(&header),
                        watch_id,
                        fragment,
                        events: events[..n]
                            .iter()
                            .map(|e| Bytes::from(e.encode_to_vec()))
                            .collect(),
                    };
                    assert_eq!(parts.to_vec(), m.encode_to_vec(), "id {watch_id}, {n}");
                    assert_eq!(parts.encoded_len(), m.encoded_len());
                    assert_eq!(WatchOut::from(m.clone()).to_vec(), m.encode_to_vec());
                    assert_eq!(parts.into_message(), m);
                }
            }
        }
    }
}
