//! The gRPC codec of every generated service and client: prost's, except that a response is
//! encoded into a buffer reserved at its exact size. tonic's prost codec lets the buffer grow
//! by doubling as it writes, so a 150 MB Range response took a 256 MB buffer, plus the 128 MB
//! one it was copied out of, at its peak.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// A request decoded as tonic's prost codec decodes it: one that does not parse is Internal.
pub fn decode_message<U: Message + Default>(buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
    U::decode(buf)
        .map(Some)
        .map_err(|e| Status::internal(e.to_string()))
}

pub struct SizedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SizedCodec<T, U> {
    fn default() -> Self {
        SizedCodec(PhantomData)
    }
}

impl<T, U> Codec for SizedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SizedEncoder<T>;
    type Decoder = SizedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SizedEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        SizedDecoder(PhantomData)
    }
}

pub struct SizedEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for SizedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|e| Status::internal(e.to_string()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

pub struct SizedDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for SizedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        decode_message(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
