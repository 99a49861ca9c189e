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

/// PROXY protocol v2 TLV types (custom range) for what the upstream may want to know.
pub const PP2_TYPE_SPIFFE_ID: u8 = 0xE1;
/// The decision id of the connection.
pub const PP2_TYPE_DECISION_ID: u8 = 0xE2;

/// Destination side: connects to one upstream endpoint and relays `from_peer` into it; the
/// response body carries the upstream's bytes back. With `proxy_protocol`, the connection
/// first carries a PROXY v2 header naming the verified caller and the decision.
pub(crate) async fn inbound(
    upstream: &LocalService,
    from_peer: GatewayBody,
    caller: &str,
    decision_id: &str,
) -> Response<GatewayBody> {
    let mut tcp = match upstream.connect_tcp().await {
        Ok(tcp) => tcp,
        Err(e) => {
            return respond::error(
                StatusCode::BAD_GATEWAY,
                &format!("meshgate: cannot connect upstream: {e}"),
            );
        }
    };
    if upstream.proxy_protocol()
        && let Err(e) = tcp.write_all(&proxy_v2_header(caller, decision_id)).await
    {
        return respond::error(
            StatusCode::BAD_GATEWAY,
            &format!("meshgate: cannot write the PROXY header upstream: {e}"),
        );
    }
    let (tx, to_peer) = body::channel();
    tokio::spawn(relay(tcp, from_peer, tx));
    Response::new(to_peer)
}

/// A PROXY protocol v2 header (`PROXY` command, address family `UNSPEC`: the real peer is
/// across the mesh) with the caller's SPIFFE ID and the decision id as TLVs.
pub(crate) fn proxy_v2_header(caller: &str, decision_id: &str) -> Vec<u8> {
    const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    let mut tlvs = Vec::new();
    for (kind, value) in [
        (PP2_TYPE_SPIFFE_ID, caller.as_bytes()),
        (PP2_TYPE_DECISION_ID, decision_id.as_bytes()),
    ] {
        // SPIFFE IDs are at most 2 KiB and decision ids 32 bytes: both fit a u16 length.
        let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
        tlvs.push(kind);
        tlvs.extend_from_slice(&len.to_be_bytes());
        tlvs.extend_from_slice(&value[..usize::from(len)]);
    }
    let mut out = Vec::with_capacity(16 + tlvs.len());
    out.extend_from_slice(SIGNATURE);
    out.push(0x21); // version 2, PROXY
    out.push(0x00); // AF_UNSPEC, UNSPEC
    out.extend_from_slice(&u16::try_from(tlvs.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(&tlvs);
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_v2_header_names_the_caller_and_the_decision() {
        let h = proxy_v2_header("spiffe://east.example/ns/shop/sa/web", "abc");
        assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!((h[12], h[13]), (0x21, 0x00));
        let len = usize::from(u16::from_be_bytes([h[14], h[15]]));
        assert_eq!(len, h.len() - 16);
        let tlvs = &h[16..];
        assert_eq!(tlvs[0], PP2_TYPE_SPIFFE_ID);
        let n = usize::from(u16::from_be_bytes([tlvs[1], tlvs[2]]));
        assert_eq!(&tlvs[3..3 + n], b"spiffe://east.example/ns/shop/sa/web");
        let rest = &tlvs[3 + n..];
        assert_eq!((rest[0], &rest[3..]), (PP2_TYPE_DECISION_ID, &b"abc"[..]));
    }
}
