//! KV.Range, served apart from the rest of the KV service for one reason: a large response can
//! come already encoded, in pieces. A Range of a million keys as a `RangeResponse` holds every
//! `KeyValue` (each with its own key and value buffers) and then the encoded message beside
//! them; as encoded pieces read a chunk at a time, it holds about the encoded message only.
//!
//! Served on its own route (`/etcdserverpb.KV/Range`), which takes precedence over the KV
//! service's, so the generated service keeps the other methods.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use keel_proto::pb;
use keel_proto::prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use keel_proto::prost::Message;
use tonic::{Request, Response, Status};

use crate::backend::Backend;
use crate::service::check_size;
use crate::validate;

pub const PATH: &str = "/etcdserverpb.KV/Range";

/// One Range response: a message, or its parts with the key-values already encoded, written
/// out byte for byte as prost writes the `RangeResponse` (fields in tag order, defaults left
/// out).
#[derive(Debug, Clone)]
pub enum RangeOut {
    Message(pb::RangeResponse),
    Parts {
        /// The header; cluster and member IDs and term are filled at the edge.
        header: pb::ResponseHeader,
        /// The key-values in order, each framed as field 2 (`kvs`), concatenated a chunk at
        /// a time.
        kvs: Vec<Bytes>,
        more: bool,
        count: i64,
    },
}

/// Appends `kv` framed as one of a `RangeResponse`'s key-values.
pub fn frame_kv(kv: &keel_proto::mvccpb::KeyValue, buf: &mut impl BufMut) {
    keel_proto::prost::encoding::message::encode(2, kv, buf);
}

/// What `kv` takes framed as one of a `RangeResponse`'s key-values.
pub fn framed_kv_len(kv: &keel_proto::mvccpb::KeyValue) -> usize {
    let n = kv.encoded_len();
    1 + encoded_len_varint(n as u64) + n
}

impl crate::written::Written for RangeOut {
    fn encoded_len(&self) -> usize {
        RangeOut::encoded_len(self)
    }

    /// Writes the response; the encoded pieces are let go as they are copied.
    fn write_to(self, buf: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Status> {
        self.write(buf)
    }
}

impl RangeOut {
    /// The response's header revision.
    fn revision(&self) -> i64 {
        match self {
            RangeOut::Message(m) => m.header.as_ref().map_or(0, |h| h.revision),
            RangeOut::Parts { header, .. } => header.revision,
        }
    }

    fn set_header(&mut self, h: pb::ResponseHeader) {
        match self {
            RangeOut::Message(m) => m.header = Some(h),
            RangeOut::Parts { header, .. } => *header = h,
        }
    }

    pub fn encoded_len(&self) -> usize {
        match self {
            RangeOut::Message(m) => m.encoded_len(),
            RangeOut::Parts {
                header,
                kvs,
                more,
                count,
            } => {
                let h = header.encoded_len();
                1 + encoded_len_varint(h as u64)
                    + h
                    + kvs.iter().map(Bytes::len).sum::<usize>()
                    + 2 * usize::from(*more)
                    + if *count != 0 {
                        1 + encoded_len_varint(*count as u64)
                    } else {
                        0
                    }
            }
        }
    }

    /// Writes the response; the encoded pieces are let go as they are copied.
    fn write(self, buf: &mut impl BufMut) -> Result<(), Status> {
        match self {
            RangeOut::Message(m) => m.encode(buf).map_err(|e| Status::internal(e.to_string())),
            RangeOut::Parts {
                header,
                kvs,
                more,
                count,
            } => {
                keel_proto::prost::encoding::message::encode(1, &header, buf);
                for piece in kvs {
                    buf.put_slice(&piece);
                }
                if more {
                    encode_key(3, WireType::Varint, buf);
                    encode_varint(1, buf);
                }
                if count != 0 {
                    encode_key(4, WireType::Varint, buf);
                    encode_varint(count as u64, buf);
                }
                Ok(())
            }
        }
    }

    /// The response encoded (as the codec writes it).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.clone().write(&mut v).expect("a vec grows");
        v
    }

    /// The response as a message (decoding an encoded one: for tests and tools).
    pub fn into_message(self) -> pb::RangeResponse {
        match self {
            RangeOut::Message(m) => m,
            parts => pb::RangeResponse::decode(&parts.to_vec()[..])
                .expect("an encoded range response decodes"),
        }
    }
}

/// The `etcdserverpb.KV/Range` method.
pub struct RangeServer<B> {
    backend: Arc<B>,
    max_decoding_message_size: usize,
}

impl<B> Clone for RangeServer<B> {
    fn clone(&self) -> Self {
        RangeServer {
            backend: self.backend.clone(),
            max_decoding_message_size: self.max_decoding_message_size,
        }
    }
}

impl<B> RangeServer<B> {
    pub fn new(backend: Arc<B>, max_decoding_message_size: usize) -> Self {
        RangeServer {
            backend,
            max_decoding_message_size,
        }
    }
}

/// The method, as tonic's `UnaryService`.
struct RangeCall<B>(Arc<B>);

impl<B: Backend> tonic::server::UnaryService<pb::RangeRequest> for RangeCall<B> {
    type Response = RangeOut;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Response<RangeOut>, Status>> + Send>>;

    fn call(&mut self, req: Request<pb::RangeRequest>) -> Self::Future {
        let backend = self.0.clone();
        Box::pin(async move {
            let r = req.into_inner();
            check_size(&r, backend.limits())?;
            validate::check_range(&r)?;
            let mut out = backend.range_out(r).await?;
            out.set_header(backend.header(out.revision()));
            Ok(Response::new(out))
        })
    }
}

/// Taken as the router hands requests over (tonic's routes convert them the same way).
impl<B: Backend> tonic::codegen::Service<http::Request<axum::body::Body>> for RangeServer<B> {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<axum::body::Body>) -> Self::Future {
        let req = req.map(tonic::body::Body::new);
        let call = RangeCall(self.backend.clone());
        let limit = self.max_decoding_message_size;
        Box::pin(async move {
            let mut grpc = crate::written::grpc::<RangeOut, pb::RangeRequest>(limit);
            Ok(grpc.unary(call, req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::mvccpb::KeyValue;

    /// What the codec writes for the parts is what prost writes for the message.
    #[test]
    fn parts_go_out_as_prost_writes_the_message() {
        let header = pb::ResponseHeader {
            cluster_id: u64::MAX - 7,
            member_id: 9,
            revision: 1 << 40,
            raft_term: 3,
        };
        let kv = |i: usize| KeyValue {
            key: Bytes::from(format!("key/{i}")),
            value: Bytes::from(vec![b'v'; i * 37 % 300]),
            create_revision: i as i64 + 1,
            mod_revision: i as i64 * 3 + 1,
            version: (i % 4) as i64,
            lease: if i.is_multiple_of(3) {
                0
            } else {
                i as i64 * 1000
            },
        };
        let kvs: Vec<KeyValue> = (0..50).map(kv).collect();
        for n in [0, 1, 7, 50] {
            for more in [false, true] {
                for count in [0, 1, n as i64, 1 << 33] {
                    let m = pb::RangeResponse {
                        header: Some(header),
                        kvs: kvs[..n].to_vec(),
                        more,
                        count,
                    };
                    // Pieces of uneven sizes, as chunks come.
                    let mut pieces = Vec::new();
                    let mut at = 0;
                    let mut size = 1;
                    while at < n {
                        let end = (at + size).min(n);
                        let mut b = Vec::new();
                        for kv in &kvs[at..end] {
                            frame_kv(kv, &mut b);
                            assert_eq!(framed_kv_len(kv), {
                                let mut one = Vec::new();
                                frame_kv(kv, &mut one);
                                one.len()
                            });
                        }
                        pieces.push(Bytes::from(b));
                        at = end;
                        size *= 2;
                    }
                    let parts = RangeOut::Parts {
                        header,
                        kvs: pieces,
                        more,
                        count,
                    };
                    assert_eq!(
                        parts.to_vec(),
                        m.encode_to_vec(),
                        "{n} kvs, {more}, {count}"
                    );
                    assert_eq!(parts.encoded_len(), m.encoded_len());
                    assert_eq!(RangeOut::Message(m.clone()).to_vec(), m.encode_to_vec());
                    assert_eq!(parts.into_message(), m);
                }
            }
        }
    }
}
