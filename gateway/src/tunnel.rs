//! The QUIC tunnel between gateways: one quinn endpoint both accepts peer connections and
//! dials peers; one connection per peer gateway address, reused and multiplexed, HTTP/3 on top.
//!
//! All HTTP/3 framing goes through this module and `inbound`/`body` (h3 0.0.8 is pinned and
//! calls itself experimental; keeping it in few places keeps it replaceable).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use meshgate_identity::{SpiffeId, TrustDomain};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::caller::SentRefs;
use crate::metrics::Metrics;

/// The server name a dialing gateway hands quinn. Peer identity is checked by the SPIFFE
/// verifier against `spiffe://<td>/meshgate/gateway`, not against this name.
const PLACEHOLDER_SERVER_NAME: &str = "gateway.meshgate.invalid";
/// Time allowed for a QUIC + TLS handshake with a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed dial, calls to that peer fail at once (and fail over) for a while: this
/// long after the first failure, doubling with each further one up to [`DIAL_BACKOFF_MAX`].
/// Short, so a peer back from a restart is dialed again within a fraction of a second.
const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait between dials of a peer that keeps failing.
const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Failed dials of one peer: when the last one failed and how many failed in a row.
#[derive(Debug, Clone, Copy)]
struct DialFailures {
    last: std::time::Instant,
    in_a_row: u32,
}

impl DialFailures {
    /// How long after the last failure calls fail at once.
    fn backoff(&self) -> Duration {
        let doublings = self.in_a_row.saturating_sub(1).min(16);
        DIAL_BACKOFF_MIN
            .saturating_mul(1 << doublings)
            .min(DIAL_BACKOFF_MAX)
    }
}

/// The secret keying a gateway's QUIC stateless resets (see [`Tunnel::bind`]). Its `Debug`
/// does not show it.
#[derive(Clone)]
pub struct ResetSecret(pub [u8; 32]);

impl ResetSecret {
    /// An HMAC-SHA256 key for one use of the secret, named by `label`.
    fn derive_key(&self, label: &[u8]) -> aws_lc_rs::hmac::Key {
        let root = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &self.0);
        let derived = aws_lc_rs::hmac::sign(&root, label);
        aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, derived.as_ref())
    }
}

impl std::fmt::Debug for ResetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetSecret(..)")
    }
}

/// h3 request sender over one peer connection.
pub(crate) type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;
/// An h3 client request stream.
pub(crate) type ClientStream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// Why a request could not be put on the tunnel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// The QUIC connection could not be set up.
    #[error("cannot connect to peer gateway `{addr}`: {reason}")]
    Connect {
        /// The peer address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The HTTP/3 layer failed.
    #[error("HTTP/3 error with peer gateway `{addr}`: {reason}")]
    H3 {
        /// The peer address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The client TLS configuration for the peer could not be built.
    #[error("cannot build TLS settings for peer `{0}`: {1}")]
    Tls(TrustDomain, String),
}

type OpenConnections = HashMap<usize, (TrustDomain, quinn::Connection)>;

/// Builds the rustls client config used to dial the gateways of one trust domain.
pub(crate) type ClientTlsFactory =
    Box<dyn Fn(&TrustDomain) -> Result<rustls::ClientConfig, String> + Send + Sync>;

/// One peer gateway (address and trust domain): its live connection, and a lock only dials
/// take, so that concurrent requests to a peer without a connection share one dial.
#[derive(Default)]
struct Slot {
    link: Mutex<Option<Arc<PeerLink>>>,
    dialing: tokio::sync::Mutex<()>,
}

/// A connection to a peer gateway with its HTTP/3 request sender and the caller references
/// sent on it.
pub(crate) struct PeerLink {
    conn: quinn::Connection,
    send: SendRequest,
    /// Caller tokens bound to reference numbers on this connection (see `caller`).
    pub refs: SentRefs,
}

impl std::fmt::Debug for PeerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerLink")
            .field("peer", &self.conn.remote_address())
            .finish_non_exhaustive()
    }
}

impl PeerLink {
    fn usable(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// Opens a request stream on this connection (no lock is held: the sender is cloned).
    pub(crate) async fn send_request(
        &self,
        request: http::Request<()>,
    ) -> Result<ClientStream, h3::error::StreamError> {
        let mut send = self.send.clone();
        send.send_request(request).await
    }
}

/// The gateway's QUIC endpoint and its peer connections.
pub struct Tunnel {
    endpoint: quinn::Endpoint,
    client_tls: ClientTlsFactory,
    max_streams: u32,
    dead_after: Duration,
    slots: Mutex<HashMap<(SocketAddr, TrustDomain), Arc<Slot>>>,
    /// When a dial to a peer last failed: calls fail fast (and fail over) instead of each
    /// waiting out a handshake timeout against a dead peer. Keyed by the peer (address and
    /// trust domain), so a peer advertising another's address cannot black-hole it.
    unreachable: Mutex<HashMap<(SocketAddr, TrustDomain), DialFailures>>,
    /// Every open connection, dialed or accepted, with the peer's trust domain.
    open: Arc<Mutex<OpenConnections>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("local", &self.endpoint.local_addr().ok())
            .finish()
    }
}

impl Tunnel {
    /// Binds the QUIC endpoint at `addr` with the server-side TLS config (peer gateways must
    /// present a gateway SVID) and the factory for dialing peers.
    ///
    /// `reset_secret` keys the stateless resets: with the same secret across restarts, a
    /// restarted gateway answers packets of its previous instance's connections with a reset
    /// the peer can authenticate, so the peer drops the stale connection at once instead of
    /// waiting out the idle timeout. `None` draws a random key (resets then only reach
    /// peers of this instance).
    pub(crate) fn bind(
        addr: SocketAddr,
        server_tls: rustls::ServerConfig,
        client_tls: ClientTlsFactory,
        reset_secret: Option<&ResetSecret>,
        limits: (u32, Duration),
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (max_streams, dead_after) = limits;
        let crypto = QuicServerConfig::try_from(server_tls)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport(max_streams, dead_after));
        let mut config = quinn::EndpointConfig::default();
        if let Some(secret) = reset_secret {
            config.reset_key(Arc::new(
                secret.derive_key(b"meshgate quic stateless reset"),
            ));
            // A reset is only sent for a packet whose connection ID this endpoint could have
            // issued (quinn checks a keyed hash in it), so the ID key persists too.
            let tag =
                aws_lc_rs::hmac::sign(&secret.derive_key(b"meshgate quic connection id"), b"");
            let mut cid_key = [0u8; 8];
            cid_key.copy_from_slice(&tag.as_ref()[..8]);
            let cid_key = u64::from_le_bytes(cid_key);
            config.cid_generator(move || {
                Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            });
        }
        let runtime = quinn::default_runtime()
            .ok_or_else(|| std::io::Error::other("no async runtime for the QUIC endpoint"))?;
        let socket = std::net::UdpSocket::bind(addr)?;
        let endpoint = quinn::Endpoint::new(config, Some(server), socket, runtime)?;
        Ok(Self {
            endpoint,
            client_tls,
            max_streams,
            dead_after,
            slots: Mutex::new(HashMap::new()),
            unreachable: Mutex::new(HashMap::new()),
            open: Arc::new(Mutex::new(HashMap::new())),
            metrics,
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    pub(crate) fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    fn slot(&self, addr: SocketAddr, td: &TrustDomain) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry((addr, td.clone())).or_default().clone()
    }

    /// The live connection to the gateway at `addr` of trust domain `td`, dialed if there is
    /// none. Requests on a live connection take no lock across an await; only dials wait for
    /// each other. A peer whose dials just failed fails at once for a short, growing back-off
    /// (unless `probe`, for control traffic, which always dials).
    pub(crate) async fn link(
        &self,
        addr: SocketAddr,
        td: &TrustDomain,
        probe: bool,
    ) -> Result<Arc<PeerLink>, TunnelError> {
        let slot = self.slot(addr, td);
        if let Some(link) = current(&slot) {
            return Ok(link);
        }
        let _dialing = slot.dialing.lock().await;
        // Someone else may have dialed while this call waited.
        if let Some(link) = current(&slot) {
            return Ok(link);
        }
        if !probe {
            self.check_reachable(addr, td)?;
        }
        match self.dial(addr, td).await {
            Ok(link) => {
                let link = Arc::new(link);
                if let Ok(mut u) = self.unreachable.lock() {
                    u.remove(&(addr, td.clone()));
                }
                *slot.link.lock().unwrap_or_else(|e| e.into_inner()) = Some(link.clone());
                Ok(link)
            }
            Err(e) => {
                if !probe && let Ok(mut u) = self.unreachable.lock() {
                    let failures = u.entry((addr, td.clone())).or_insert(DialFailures {
                        last: std::time::Instant::now(),
                        in_a_row: 0,
                    });
                    failures.last = std::time::Instant::now();
                    failures.in_a_row = failures.in_a_row.saturating_add(1);
                }
                Err(e)
            }
        }
    }

    /// Forgets `link` if it is still the peer's current one (it failed to open a stream), so
    /// the next request dials afresh.
    pub(crate) fn discard(&self, addr: SocketAddr, td: &TrustDomain, link: &Arc<PeerLink>) {
        let slot = self.slot(addr, td);
        let mut current = slot.link.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, link)) {
            *current = None;
        }
    }

    fn check_reachable(&self, addr: SocketAddr, td: &TrustDomain) -> Result<(), TunnelError> {
        let failures = self
            .unreachable
            .lock()
            .ok()
            .and_then(|u| u.get(&(addr, td.clone())).copied());
        match failures {
            Some(f) if f.last.elapsed() < f.backoff() => Err(TunnelError::Connect {
                addr,
                reason: format!(
                    "unreachable: {} dial(s) failed in a row, the last {:?} ago",
                    f.in_a_row,
                    f.last.elapsed()
                ),
            }),
            _ => Ok(()),
        }
    }

    async fn dial(&self, addr: SocketAddr, td: &TrustDomain) -> Result<PeerLink, TunnelError> {
        let tls = (self.client_tls)(td).map_err(|e| TunnelError::Tls(td.clone(), e))?;
        let crypto = QuicClientConfig::try_from(tls)
            .map_err(|e| TunnelError::Tls(td.clone(), e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport(self.max_streams, self.dead_after));
        let connecting = self
            .endpoint
            .connect_with(config, addr, PLACEHOLDER_SERVER_NAME)
            .map_err(|e| TunnelError::Connect {
                addr,
                reason: e.to_string(),
            })?;
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                self.metrics.handshake_failed("tunnel_dial", reason_of(&e));
                return Err(TunnelError::Connect {
                    addr,
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                self.metrics.handshake_failed("tunnel_dial", "timeout");
                return Err(TunnelError::Connect {
                    addr,
                    reason: format!("no handshake within {CONNECT_TIMEOUT:?}"),
                });
            }
        };
        self.track(td.clone(), conn.clone());
        let (mut driver, send) = h3::client::builder()
            .max_field_section_size(64 * 1024)
            .build::<_, _, Bytes>(h3_quinn::Connection::new(conn.clone()))
            .await
            .map_err(|e| TunnelError::H3 {
                addr,
                reason: e.to_string(),
            })?;
        tokio::spawn(async move {
            let reason = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            tracing::debug!(peer = %addr, %reason, "peer connection closed");
        });
        tracing::info!(peer = %addr, trust_domain = %td, "connected to peer gateway");
        Ok(PeerLink {
            conn,
            send,
            refs: SentRefs::default(),
        })
    }

    /// Records an open connection (dialed or accepted) so link removal can close it.
    pub(crate) fn track(&self, td: TrustDomain, conn: quinn::Connection) {
        let id = conn.stable_id();
        if let Ok(mut open) = self.open.lock() {
            open.insert(id, (td, conn.clone()));
            self.metrics.quic_connections.set(open.len() as i64);
        }
        let metrics = Arc::downgrade(&self.metrics);
        let open = Arc::downgrade(&self.open);
        tokio::spawn(async move {
            conn.closed().await;
            if let (Some(metrics), Some(open)) = (metrics.upgrade(), open.upgrade())
                && let Ok(mut open) = open.lock()
            {
                open.remove(&id);
                metrics.quic_connections.set(open.len() as i64);
            }
        });
    }

    /// Closes every connection with gateways of `td` (a removed federation link).
    pub fn close_trust_domain(&self, td: &TrustDomain) {
        let Ok(mut open) = self.open.lock() else {
            return;
        };
        open.retain(|_, (peer_td, conn)| {
            if peer_td == td {
                conn.close(quinn::VarInt::from_u32(0x100), b"federation link removed");
                false
            } else {
                true
            }
        });
        self.metrics.quic_connections.set(open.len() as i64);
        if let Ok(mut slots) = self.slots.lock() {
            slots.retain(|(_, peer_td), _| peer_td != td);
        }
    }

    /// Closes the endpoint (graceful shutdown: peers see an orderly close).
    pub fn close(&self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"gateway shutting down");
    }
}

/// The slot's connection, if it is still open.
fn current(slot: &Slot) -> Option<Arc<PeerLink>> {
    slot.link
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .filter(|l| l.usable())
        .cloned()
}

/// QUIC settings: keep-alives every quarter of `dead_after` keep NAT bindings open and let
/// a silent peer be declared dead after `dead_after` (the negotiated idle timeout).
fn transport(max_streams: u32, dead_after: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(max_streams.into());
    t.max_concurrent_uni_streams(16u32.into());
    t.keep_alive_interval(Some(dead_after / 4));
    if let Ok(idle) = quinn::IdleTimeout::try_from(dead_after) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

/// A short, bounded-cardinality reason for a failed handshake (a metrics label).
pub(crate) fn reason_of(e: &quinn::ConnectionError) -> &'static str {
    match e {
        quinn::ConnectionError::TransportError(t)
            if t.code.to_string().contains("crypto") || t.reason.contains("certificate") =>
        {
            "certificate"
        }
        quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code.to_string().contains("crypto") =>
        {
            "certificate_rejected_by_peer"
        }
        quinn::ConnectionError::TimedOut => "timeout",
        quinn::ConnectionError::VersionMismatch => "version",
        quinn::ConnectionError::Reset => "reset",
        quinn::ConnectionError::ApplicationClosed(_) => "closed",
        _ => "other",
    }
}

/// The SPIFFE ID a peer presented on an accepted connection.
pub(crate) fn peer_id(conn: &quinn::Connection) -> Option<SpiffeId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    meshgate_identity::peer_spiffe_id(&certs).ok()
}

/// Largest control response accepted from a peer.
const MAX_CONTROL_RESPONSE: usize = 4 * 1024 * 1024;

/// Sends control requests (`/.meshgate/…`) to peer gateways over the tunnel: the handle
/// federation uses for bundle, catalog and checkpoint exchange. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ControlClient {
    tunnel: Arc<Tunnel>,
}

impl ControlClient {
    pub(crate) fn new(tunnel: Arc<Tunnel>) -> Self {
        Self { tunnel }
    }

    /// Sends `request` (its path must start with `/.meshgate/`) to the gateway at `addr`,
    /// which must present `spiffe://<td>/meshgate/gateway`, and returns the whole response.
    pub async fn send(
        &self,
        addr: SocketAddr,
        td: &TrustDomain,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, TunnelError> {
        if !request.uri().path().starts_with("/.meshgate/") {
            return Err(TunnelError::H3 {
                addr,
                reason: format!("`{}` is not a control path", request.uri().path()),
            });
        }
        let (mut parts, body) = request.into_parts();
        // HTTP/3 needs a full URI; a path-only one would make h3 fail the whole connection.
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        parts.uri = format!("https://{td}{path}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| TunnelError::H3 {
                addr,
                reason: e.to_string(),
            })?;
        let request = http::Request::from_parts(parts, ());
        let link = self.tunnel.link(addr, td, true).await?;
        let stream = match link.send_request(request.clone()).await {
            Ok(stream) => stream,
            Err(_) => {
                // A stale connection: dial once more.
                self.tunnel.discard(addr, td, &link);
                let link = self.tunnel.link(addr, td, true).await?;
                link.send_request(request)
                    .await
                    .map_err(|e| TunnelError::H3 {
                        addr,
                        reason: e.to_string(),
                    })?
            }
        };
        let (mut send, mut recv) = stream.split();
        let h3 = |e: h3::error::StreamError| TunnelError::H3 {
            addr,
            reason: e.to_string(),
        };
        if !body.is_empty() {
            send.send_data(body).await.map_err(h3)?;
        }
        send.finish().await.map_err(h3)?;
        let head = recv.recv_response().await.map_err(h3)?;
        let mut out = Vec::new();
        while let Some(mut chunk) = recv.recv_data().await.map_err(h3)? {
            use bytes::Buf;
            if out.len() + chunk.remaining() > MAX_CONTROL_RESPONSE {
                return Err(TunnelError::H3 {
                    addr,
                    reason: "control response too large".to_owned(),
                });
            }
            out.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        let (parts, ()) = head.into_parts();
        Ok(http::Response::from_parts(parts, Bytes::from(out)))
    }

    /// Closes every connection with `td`'s gateways (a removed link).
    pub fn disconnect(&self, td: &TrustDomain) {
        self.tunnel.close_trust_domain(td);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_backoff_starts_short_and_doubles_to_a_cap() {
        let after = |in_a_row| {
            DialFailures {
                last: std::time::Instant::now(),
                in_a_row,
            }
            .backoff()
        };
        assert_eq!(after(1), DIAL_BACKOFF_MIN);
        assert_eq!(after(2), DIAL_BACKOFF_MIN * 2);
        assert_eq!(after(4), DIAL_BACKOFF_MIN * 8);
        assert_eq!(after(6), DIAL_BACKOFF_MAX);
        assert_eq!(after(u32::MAX), DIAL_BACKOFF_MAX);
    }

    #[test]
    fn derived_keys_depend_on_secret_and_label() {
        let tag = |secret: [u8; 32], label: &[u8]| {
            aws_lc_rs::hmac::sign(&ResetSecret(secret).derive_key(label), b"x")
                .as_ref()
                .to_vec()
        };
        assert_eq!(tag([1; 32], b"a"), tag([1; 32], b"a"));
        assert_ne!(tag([1; 32], b"a"), tag([2; 32], b"a"));
        assert_ne!(tag([1; 32], b"a"), tag([1; 32], b"b"));
        assert_eq!(format!("{:?}", ResetSecret([7; 32])), "ResetSecret(..)");
    }
}
