//! Body types and the pumps that move streamed bodies between hyper and HTTP/3 streams.
//!
//! Every hop streams: bodies move frame by frame through bounded channels and QUIC flow
//! control, so a gateway's memory per request stays bounded whatever the body size.

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

/// The receiving half of an HTTP/3 stream, client or server side.
pub(crate) trait H3Recv: Send {
    fn recv_data(
        &mut self,
    ) -> impl Future<Output = Result<Option<Bytes>, h3::error::StreamError>> + Send;
    fn recv_trailers(
        &mut self,
    ) -> impl Future<Output = Result<Option<HeaderMap>, h3::error::StreamError>> + Send;
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
            async fn recv_data(&mut self) -> Result<Option<Bytes>, h3::error::StreamError> {
                Ok(<$recv>::recv_data(self)
                    .await?
                    .map(|mut buf| buf.copy_to_bytes(buf.remaining())))
            }
            async fn recv_trailers(&mut self) -> Result<Option<HeaderMap>, h3::error::StreamError> {
                <$recv>::recv_trailers(self).await
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

/// Feeds an HTTP/3 stream's body (and trailers) into a [`ChannelBody`] sender. Stops early,
/// without error, when the receiving side of the channel is gone.
pub(crate) async fn h3_to_channel<R: H3Recv>(mut recv: R, tx: BodySender) {
    let result: Result<(), BoxError> = async {
        while let Some(data) = recv.recv_data().await? {
            if tx.send(Ok(Frame::data(data))).await.is_err() {
                return Ok(());
            }
        }
        if let Some(trailers) = recv.recv_trailers().await? {
            let _ = tx.send(Ok(Frame::trailers(trailers))).await;
        }
        Ok(())
    }
    .await;
    if let Err(error) = result {
        let _ = tx.send(Err(error)).await;
    }
}
