//! Body types: an HTTP/3 stream's body read as it is polled, a hyper body written down an
//! HTTP/3 stream, and a channel body for raw TCP relays.
//!
//! Every hop streams: bodies move frame by frame under QUIC and TCP flow control, so a
//! gateway's memory per request stays bounded whatever the body size.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame};
use tokio::sync::mpsc;

/// Errors carried inside bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response the gateway produces.
pub type GatewayBody = BoxBody<Bytes, BoxError>;

/// Frames in flight per streamed body; with QUIC/TCP windows this bounds memory per request.
const CHANNEL_FRAMES: usize = 8;

/// A body with a fixed payload.
pub fn full(bytes: impl Into<Bytes>) -> GatewayBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> GatewayBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body fed frame by frame from another task through a bounded channel.
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
}

/// The sending half of a [`ChannelBody`].
pub type BodySender = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

/// A streamed body and the sender that feeds it.
pub fn channel() -> (BodySender, GatewayBody) {
    let (tx, rx) = mpsc::channel(CHANNEL_FRAMES);
    (tx, ChannelBody { rx }.boxed())
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx)
    }
}

/// The sending half of an HTTP/3 stream, client or server side.
pub(crate) trait H3Send: Send {
    fn send_data(
        &mut self,
        data: Bytes,
    ) -> impl Future<Output = Result<(), h3::error::StreamError>> + Send;
    fn send_trailers(
        &mut self,
        trailers: HeaderMap,
    ) -> impl Future<Output = Result<(), h3::error::StreamError>> + Send;
    fn finish(&mut self) -> impl Future<Output = Result<(), h3::error::StreamError>> + Send;
}

/// The receiving half of an HTTP/3 stream, client or server side, polled.
pub(crate) trait H3Recv: Send + Unpin {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, BoxError>>;
    fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, BoxError>>;
}

macro_rules! impl_h3_halves {
    ($send:ty, $recv:ty) => {
        impl H3Send for $send {
            async fn send_data(&mut self, data: Bytes) -> Result<(), h3::error::StreamError> {
                <$send>::send_data(self, data).await
            }
            async fn send_trailers(
                &mut self,
                trailers: HeaderMap,
            ) -> Result<(), h3::error::StreamError> {
                <$send>::send_trailers(self, trailers).await
            }
            async fn finish(&mut self) -> Result<(), h3::error::StreamError> {
                <$send>::finish(self).await
            }
        }
        impl H3Recv for $recv {
            fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, BoxError>> {
                match self.poll_recv_data(cx) {
                    Poll::Ready(Ok(Some(mut buf))) => {
                        Poll::Ready(Ok(Some(buf.copy_to_bytes(buf.remaining()))))
                    }
                    Poll::Ready(Ok(None)) => Poll::Ready(Ok(None)),
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
                    Poll::Pending => Poll::Pending,
                }
            }
            fn poll_trailers(
                &mut self,
                cx: &mut Context<'_>,
            ) -> Poll<Result<Option<HeaderMap>, BoxError>> {
                self.poll_recv_trailers(cx).map_err(Into::into)
            }
        }
    };
}

impl_h3_halves!(
    h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>,
    h3::server::RequestStream<h3_quinn::RecvStream, Bytes>
);
impl_h3_halves!(
    h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>,
    h3::client::RequestStream<h3_quinn::RecvStream, Bytes>
);

/// The body of an HTTP/3 stream, read as it is polled (no task, no channel): data frames,
/// then trailers.
#[derive(Debug)]
pub(crate) struct H3Body<R> {
    recv: R,
    state: H3State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum H3State {
    Data,
    Trailers,
    Done,
}

impl<R: H3Recv> H3Body<R> {
    pub(crate) fn new(recv: R) -> Self {
        Self {
            recv,
            state: H3State::Data,
        }
    }
}

impl<R: H3Recv + 'static> Body for H3Body<R> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match this.state {
                H3State::Data => match this.recv.poll_data(cx) {
                    Poll::Ready(Ok(Some(data))) if data.is_empty() => continue,
                    Poll::Ready(Ok(Some(data))) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Poll::Ready(Ok(None)) => this.state = H3State::Trailers,
                    Poll::Ready(Err(e)) => {
                        this.state = H3State::Done;
                        return Poll::Ready(Some(Err(e)));
                    }
                    Poll::Pending => return Poll::Pending,
                },
                H3State::Trailers => {
                    let polled = this.recv.poll_trailers(cx);
                    if polled.is_ready() {
                        this.state = H3State::Done;
                    }
                    return match polled {
                        Poll::Ready(Ok(Some(t))) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
                        Poll::Ready(Ok(None)) => Poll::Ready(None),
                        Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
                        Poll::Pending => Poll::Pending,
                    };
                }
                H3State::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == H3State::Done
    }
}

/// Sends a hyper body down an HTTP/3 stream: data frames, then trailers or a clean finish.
pub(crate) async fn body_to_h3<B, S>(mut body: B, send: &mut S) -> Result<(), BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    S: H3Send,
{
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Into::into)?;
        match frame.into_data() {
            Ok(data) => {
                if !data.is_empty() {
                    send.send_data(data).await?;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    // send_trailers finishes the stream.
                    send.send_trailers(trailers).await?;
                    return Ok(());
                }
            }
        }
    }
    send.finish().await?;
    Ok(())
}
