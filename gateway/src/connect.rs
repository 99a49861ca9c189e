//! Raw TCP through the mesh (`CONNECT`): authorized once per connection with the `connect`
//! action, then bytes flow both ways as the HTTP/3 stream's body.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::body::{self, GatewayBody};
use crate::respond;
use crate::upstream::LocalService;

const CHUNK: usize = 16 * 1024;

/// Destination side: connects to one upstream endpoint and relays `from_peer` into it; the
/// response body carries the upstream's bytes back.
pub(crate) async fn inbound(
    upstream: &LocalService,
    from_peer: GatewayBody,
) -> Response<GatewayBody> {
    let tcp = match upstream.connect_tcp().await {
        Ok(tcp) => tcp,
        Err(e) => {
            return respond::error(
                StatusCode::BAD_GATEWAY,
                &format!("meshgate: cannot connect upstream: {e}"),
            );
        }
    };
    let (tx, to_peer) = body::channel();
    tokio::spawn(relay(tcp, from_peer, tx));
    Response::new(to_peer)
}

/// Relays between a byte stream and a (body in, channel out) pair until both directions end.
pub(crate) async fn relay<S>(io: S, mut incoming: GatewayBody, out: body::BodySender)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let upload = async move {
        while let Some(Ok(frame)) = incoming.frame().await {
            if let Ok(data) = frame.into_data()
                && wr.write_all(&data).await.is_err()
            {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    let download = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out
                        .send(Ok(Frame::data(Bytes::copy_from_slice(&buf[..n]))))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    tokio::join!(upload, download);
}
