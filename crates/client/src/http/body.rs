//! The layer's response body: a buffered one (a replay, a problem, a stored response), the inner
//! service's own (requests the layer passes through), or a buffered prefix followed by the rest
//! of the inner body (a response too large to store, delivered whole to its first caller).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// The body of every response that passes through the layer.
#[derive(Debug)]
pub enum ResponseBody<B> {
    /// Bytes in memory.
    Buffered(Option<Bytes>),
    /// The inner service's body, untouched.
    Inner(B),
    /// What was buffered of the inner body, then the rest of it.
    Prefixed {
        /// The buffered start, sent first.
        prefix: Option<Bytes>,
        /// The rest of the inner body.
        rest: B,
    },
}

impl<B> ResponseBody<B> {
    pub(crate) fn buffered(bytes: Bytes) -> Self {
        ResponseBody::Buffered(Some(bytes))
    }
}

impl<B> From<Bytes> for ResponseBody<B> {
    fn from(bytes: Bytes) -> Self {
        ResponseBody::buffered(bytes)
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.get_mut() {
            ResponseBody::Buffered(bytes) => Poll::Ready(bytes.take().map(|bytes| Ok(Frame::data(bytes)))),
            ResponseBody::Inner(body) => Pin::new(body).poll_frame(cx),
            ResponseBody::Prefixed { prefix, rest } => match prefix.take() {
                Some(prefix) => Poll::Ready(Some(Ok(Frame::data(prefix)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Buffered(bytes) => bytes.is_none(),
            ResponseBody::Inner(body) => body.is_end_stream(),
            ResponseBody::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Buffered(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Inner(body) => body.size_hint(),
            ResponseBody::Prefixed { prefix, rest } => {
                let extra = prefix.as_ref().map_or(0, |b| b.len() as u64);
                let hint = rest.size_hint();
                let mut sum = SizeHint::new();
                sum.set_lower(hint.lower() + extra);
                if let Some(upper) = hint.upper() {
                    sum.set_upper(upper + extra);
                }
                sum
            }
        }
    }
}
