//! The protobuf codec of `idempotency.v1`: prost's, except that bytes that are not a valid
//! message (a wrong wire type, a truncated field, invalid UTF-8 in a string) are bad input like
//! any other, answered with INVALID_ARGUMENT and the reason [`Reason::InvalidMessage`] instead of
//! prost's bare INTERNAL. The generated code (see `build.rs`) names this codec.
//!
//! The generated client decodes replies with it too, where a reply that is not valid protobuf
//! also reads as INVALID_MESSAGE: not retryable, which is right for a reply that would come out
//! the same on every retry.

use std::collections::HashMap;
use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

use crate::Reason;

/// The codec the generated service and client use.
#[derive(Debug, Clone)]
pub struct Codec<T, U> {
    _messages: PhantomData<(T, U)>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec { _messages: PhantomData }
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = MessageDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder { _message: PhantomData }
    }
}

/// Decodes one message, answering INVALID_MESSAGE for bytes that are not one.
#[derive(Debug, Clone)]
pub struct MessageDecoder<U> {
    _message: PhantomData<U>,
}

impl<U: Message + Default> Decoder for MessageDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|error| {
            Reason::InvalidMessage.status(format!("the message is not valid protobuf: {error}"), HashMap::new())
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
