//! The codec of the methods whose responses may come already encoded (Watch, Range):
//! requests decoded by prost, responses written by the response type itself.

use std::marker::PhantomData;

use keel_proto::prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// A response that writes itself: byte for byte what prost writes for its message.
pub trait Written: Send + 'static {
    fn encoded_len(&self) -> usize;
    fn write_to(self, buf: &mut EncodeBuf<'_>) -> Result<(), Status>;
}

pub struct WrittenCodec<O, I>(PhantomData<fn(I) -> O>);

/// A method's gRPC handler with this codec and the limits the generated services get:
/// requests up to `max_decoding_message_size`, responses of any size.
pub fn grpc<O: Written, I: Message + Default + Send + 'static>(
    max_decoding_message_size: usize,
) -> tonic::server::Grpc<WrittenCodec<O, I>> {
    tonic::server::Grpc::new(WrittenCodec::default())
        .apply_max_message_size_config(Some(max_decoding_message_size), Some(usize::MAX))
}

impl<O, I> Default for WrittenCodec<O, I> {
    fn default() -> Self {
        WrittenCodec(PhantomData)
    }
}

impl<O: Written, I: Message + Default + Send + 'static> Codec for WrittenCodec<O, I> {
    type Encode = O;
    type Decode = I;
    type Encoder = WrittenCodec<O, I>;
    type Decoder = WrittenCodec<O, I>;

    fn encoder(&mut self) -> Self::Encoder {
        WrittenCodec::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        WrittenCodec::default()
    }
}

impl<O: Written, I> Encoder for WrittenCodec<O, I> {
    type Item = O;
    type Error = Status;

    fn encode(&mut self, item: O, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // One buffer of the response's size, not one doubled as it is written.
        buf.reserve(item.encoded_len());
        item.write_to(buf)
    }
}

impl<O, I: Message + Default> Decoder for WrittenCodec<O, I> {
    type Item = I;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<I>, Status> {
        keel_proto::codec::decode_message(buf)
    }
}
