//! Shared fixtures: whole clusters (issuer, policies, decision log, gateway) in-process on
//! 127.0.0.1 with port 0, an upstream echo service, a TCP echo server, and an HTTPS client
//! that presents a workload SVID. Everything is real: certificates from our issuer, QUIC,
//! Cedar, sled in a temp dir.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate_gateway::{
    Catalog, Destination, Gateway, GatewayConfig, GatewayParts, Limits, Listeners, PeerRoute,
    PolicyConfig, Route, ServiceConfig,
};
use meshgate_identity::{BundleSet, Issuer, SpiffeId, TrustDomain, X509Svid};
use meshgate_policy::{DecisionLog, PolicyEngine, QuotaLimiter};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A peer: cluster, trust domain, gateway addresses, services it exports to us.
pub type PeerEntry = (String, TrustDomain, Vec<SocketAddr>, Vec<String>);

/// A catalog the tests fill in after the gateways have bound their ports.
#[derive(Debug, Default)]
pub struct TestCatalog {
    pub cluster: String,
    pub local: Mutex<BTreeMap<String, Vec<String>>>,
    pub peers: Mutex<Vec<PeerEntry>>,
}

impl Catalog for TestCatalog {
    fn routes(&self, dest: &Destination) -> Vec<Route> {
        let short = dest.short();
        let wants = |c: &str| dest.cluster.as_deref().is_none_or(|d| d == c);
        let mut routes = Vec::new();
        if wants(&self.cluster) && self.local.lock().unwrap().contains_key(&short) {
            routes.push(Route::Local);
        }
        for (cluster, td, gateways, services) in self.peers.lock().unwrap().iter() {
            if wants(cluster) && services.contains(&short) {
                routes.push(Route::Peer(PeerRoute {
                    cluster: cluster.clone(),
                    trust_domain: td.clone(),
                    gateways: gateways.clone(),
                    credentials: false,
                }));
            }
        }
        routes
    }

    fn exported_to(&self, service: &str, namespace: &str, peer: &TrustDomain) -> bool {
        let Some(cluster) = self.cluster_of(peer) else {
            return false;
        };
        self.local
            .lock()
            .unwrap()
            .get(&format!("{service}.{namespace}"))
            .is_some_and(|to| to.iter().any(|c| c == "*" || *c == cluster))
    }

    fn cluster_of(&self, td: &TrustDomain) -> Option<String> {
        self.peers
            .lock()
            .unwrap()
            .iter()
            .find(|(_, t, _, _)| t == td)
            .map(|(c, ..)| c.clone())
    }
}

/// One cluster: its state, issuer, log and running gateway.
pub struct Cluster {
    pub name: String,
    pub td: TrustDomain,
    /// Holds the state directory until the cluster is dropped.
    pub _dir: TempDir,
    pub issuer: Arc<Issuer>,
    pub bundles: BundleSet,
    pub log: Arc<DecisionLog>,
    pub catalog: Arc<TestCatalog>,
    pub gateway: Gateway,
}

/// What a test cluster is made of.
pub struct Spec<'a> {
    pub name: &'a str,
    pub policies: &'a str,
    pub services: Vec<ServiceConfig>,
    pub default_quota: Option<&'a str>,
}

pub fn service(
    name: &str,
    namespace: &str,
    endpoint: SocketAddr,
    export_to: &[&str],
) -> ServiceConfig {
    ServiceConfig {
        name: name.into(),
        namespace: namespace.into(),
        endpoints: vec![endpoint.to_string()],
        upstream_spiffe_id: None,
        insecure_plaintext: false,
        export_to: export_to.iter().map(|s| s.to_string()).collect(),
        labels: BTreeMap::new(),
        timeout: Duration::from_secs(10),
        retries: 1,
        protocol: Default::default(),
        proxy_protocol: false,
        subsets: Vec::new(),
    }
}

/// A service reached with `CONNECT` (raw TCP).
pub fn tcp_service(
    name: &str,
    namespace: &str,
    endpoint: SocketAddr,
    export_to: &[&str],
) -> ServiceConfig {
    ServiceConfig {
        protocol: meshgate_gateway::ServiceProtocol::Tcp,
        ..service(name, namespace, endpoint, export_to)
    }
}

pub fn trust_domain(cluster: &str) -> TrustDomain {
    format!("{cluster}.example").parse().unwrap()
}

impl Cluster {
    pub async fn start(spec: Spec<'_>) -> Cluster {
        Self::start_with(spec, |_| {}).await
    }

    /// Starts a cluster after `adjust` has changed its gateway config (limits, TTLs, …).
    pub async fn start_with(spec: Spec<'_>, adjust: impl FnOnce(&mut GatewayConfig)) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let td = trust_domain(spec.name);
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .cache_capacity(4 << 20)
            .open()
            .unwrap();
        std::fs::create_dir_all(dir.path().join("keys")).unwrap();
        let issuer = Arc::new(
            Issuer::init(&db, &dir.path().join("keys"), td.clone(), SystemTime::now()).unwrap(),
        );
        let policy_dir = dir.path().join("policies");
        std::fs::create_dir_all(&policy_dir).unwrap();
        std::fs::write(policy_dir.join("policy.cedar"), spec.policies).unwrap();
        let default_quota = spec.default_quota.map(|q| q.parse().unwrap());
        let catalog = Arc::new(TestCatalog {
            cluster: spec.name.to_owned(),
            ..Default::default()
        });
        for s in &spec.services {
            catalog
                .local
                .lock()
                .unwrap()
                .insert(format!("{}.{}", s.name, s.namespace), s.export_to.clone());
        }
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let config = GatewayConfig {
            cluster: spec.name.to_owned(),
            trust_domain: td.to_string(),
            state_dir: dir.path().to_path_buf(),
            mesh_suffix: "mesh".into(),
            listeners: Listeners {
                workload: any,
                workload_local: Some(any),
                tunnel: any,
                admin: any,
                issuer: None,
                dns_names: vec!["localhost".into()],
                ip_addrs: vec!["127.0.0.1".parse().unwrap()],
                dns: None,
                console: None,
            },
            policy: PolicyConfig {
                dir: policy_dir,
                shadow_dir: None,
                schema: None,
                default_quota: None,
            },
            services: spec.services,
            peers: vec![],
            aliases: BTreeMap::new(),
            routes: Vec::new(),
            limits: Limits::default(),
            identity: Default::default(),
            audit: Default::default(),
            runtime: Default::default(),
            paths: Default::default(),
            telemetry: Default::default(),
            console: Default::default(),
        };
        let mut config = config;
        adjust(&mut config);
        let policy = Arc::new(
            PolicyEngine::load(&config.policy.dir, None)
                .unwrap()
                .with_path_rules(config.paths.rules()),
        );
        let log = Arc::new(
            DecisionLog::open(&dir.path().join("audit"), None, config.audit.log_options()).unwrap(),
        );
        let bundles = BundleSet::new();
        let gateway = Gateway::start(GatewayParts {
            config,
            issuer: issuer.clone(),
            bundles: bundles.clone(),
            policy,
            quotas: QuotaLimiter::new(default_quota, 100_000),
            log: log.clone(),
            catalog: catalog.clone(),
            control: None,
            collectors: Vec::new(),
            quic_reset_secret: None,
        })
        .await
        .unwrap();
        Cluster {
            name: spec.name.to_owned(),
            td,
            _dir: dir,
            issuer,
            bundles,
            log,
            catalog,
            gateway,
        }
    }

    /// Issues a workload SVID of this cluster.
    pub fn svid(&self, path: &str) -> X509Svid {
        let id = SpiffeId::new(&self.td, path).unwrap();
        self.issuer
            .issue_x509_svid(&id, Duration::from_secs(600), &[], &[], SystemTime::now())
            .unwrap()
    }

    /// Writes `svid.pem`, `key.pem`, `bundle.pem` for curl into a fresh directory.
    pub fn svid_files(&self, path: &str) -> TempDir {
        let svid = self.svid(path);
        let out = tempfile::tempdir().unwrap();
        std::fs::write(out.path().join("svid.pem"), svid.cert_chain_pem()).unwrap();
        std::fs::write(out.path().join("key.pem"), svid.private_key_pem().unwrap()).unwrap();
        std::fs::write(out.path().join("bundle.pem"), self.issuer.bundle().to_pem()).unwrap();
        out
    }

    /// Exports `services` from `self` to `other` and lets `other` reach them.
    pub fn link(&self, other: &Cluster, services: &[&str]) {
        other.bundles.insert(self.issuer.bundle());
        self.bundles.insert(other.issuer.bundle());
        let mut peers = other.catalog.peers.lock().unwrap();
        peers.retain(|(c, ..)| c != &self.name);
        peers.push((
            self.name.clone(),
            self.td.clone(),
            vec![self.gateway.addrs().tunnel],
            services.iter().map(|s| s.to_string()).collect(),
        ));
        drop(peers);
        let mut mine = self.catalog.peers.lock().unwrap();
        if !mine.iter().any(|(c, ..)| c == &other.name) {
            mine.push((
                other.name.clone(),
                other.td.clone(),
                vec![other.gateway.addrs().tunnel],
                vec![],
            ));
        }
    }
}

/// An HTTPS client of a gateway's workload listener: verifies the listener against the
/// cluster's bundle (by IP SAN), presents `svid` when given.
pub struct Client {
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub trailers: Option<http::HeaderMap>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn decision_id(&self) -> String {
        self.headers
            .get("x-meshgate-decision-id")
            .expect("x-meshgate-decision-id")
            .to_str()
            .unwrap()
            .to_owned()
    }
}

impl Client {
    pub fn new(cluster: &Cluster, svid: Option<&X509Svid>, alpn: &[&[u8]]) -> Client {
        Client::for_gateway(
            &cluster.issuer,
            cluster.gateway.addrs().workload,
            svid,
            alpn,
        )
    }

    /// A client of the workload listener at `addr` of `issuer`'s cluster.
    pub fn for_gateway(
        issuer: &Issuer,
        addr: SocketAddr,
        svid: Option<&X509Svid>,
        alpn: &[&[u8]],
    ) -> Client {
        Client::with_roots(issuer.bundle().x509_roots(), addr, svid, alpn)
    }

    /// A client from files as `meshgate identity issue` writes them (`svid.pem`, `key.pem`,
    /// `bundle.pem`), for gateways running as processes.
    pub fn from_files(dir: &std::path::Path, addr: SocketAddr) -> Client {
        let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
        let svid = X509Svid::from_pem(&read("svid.pem"), Some(&read("key.pem"))).unwrap();
        let bundle = meshgate_identity::TrustBundle::from_pem(
            &read("bundle.pem"),
            "east.example".parse().unwrap(),
        )
        .unwrap();
        Client::with_roots(bundle.x509_roots(), addr, Some(&svid), &[b"http/1.1"])
    }

    fn with_roots(
        roots_der: &[rustls_pki_types::CertificateDer<'static>],
        addr: SocketAddr,
        svid: Option<&X509Svid>,
        alpn: &[&[u8]],
    ) -> Client {
        let mut roots = rustls::RootCertStore::empty();
        for root in roots_der {
            roots.add(root.clone()).unwrap();
        }
        let builder =
            rustls::ClientConfig::builder_with_provider(meshgate_identity::crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots);
        let mut config = match svid {
            Some(svid) => builder
                .with_client_auth_cert(
                    svid.cert_chain().to_vec(),
                    svid.private_key().unwrap().clone_key(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Client {
            config: Arc::new(config),
            addr,
        }
    }

    async fn connect(&self) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1")
            .unwrap()
            .to_owned();
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
    }

    /// Sends one request over a fresh HTTP/1.1 (or HTTP/2 with `h2`) connection.
    pub async fn send<B>(&self, req: Request<B>) -> Result<Reply, String>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let resp = self.open(req).await?;
        let (parts, body) = resp.into_parts();
        let collected = body.collect().await.map_err(|e| e.to_string())?;
        let trailers = collected.trailers().cloned();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: collected.to_bytes(),
            trailers,
        })
    }

    /// Sends one request and returns the response with its body still streaming.
    pub async fn open<B>(&self, req: Request<B>) -> Result<Response<Incoming>, String>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tls = self.connect().await.map_err(|e| e.to_string())?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        let resp: Response<Incoming> = if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            sender.send_request(req).await.map_err(|e| e.to_string())?
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn.with_upgrades());
            sender.send_request(req).await.map_err(|e| e.to_string())?
        };
        Ok(resp)
    }

    /// One HTTP/1.1 connection for many requests in a row (keep-alive).
    pub async fn session(&self) -> Session {
        let tls = self.connect().await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        Session(sender)
    }

    pub async fn get(&self, authority: &str, path: &str) -> Result<Reply, String> {
        let req = Request::get(path)
            .header("host", authority)
            .body(Full::new(Bytes::new()))
            .unwrap();
        self.send(req).await
    }

    /// `CONNECT authority` then raw bytes: returns the upgraded stream after a 200.
    pub async fn connect_tunnel(
        &self,
        authority: &str,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, String> {
        let tls = self.connect().await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn.with_upgrades());
        let req = Request::connect(authority)
            .header("host", authority)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        if resp.status() != StatusCode::OK {
            return Err(format!("CONNECT answered {}", resp.status()));
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(|e| e.to_string())?;
        Ok(TokioIo::new(upgraded))
    }
}

/// Requests one after another on one connection of a [`Client`].
pub struct Session(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

impl Session {
    /// `GET path` with `host: authority` and `headers`.
    pub async fn get(&mut self, authority: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = Request::get(path).header("host", authority);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.0.ready().await.unwrap();
        let resp = self
            .0
            .send_request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        let collected = body.collect().await.unwrap();
        Reply {
            status: parts.status,
            headers: parts.headers,
            trailers: collected.trailers().cloned(),
            body: collected.to_bytes(),
        }
    }
}

/// An upstream HTTP service (HTTP/1.1 and h2c) that echoes what reached it as JSON:
/// `caller` (the `x-meshgate-caller` header), `method`, `path`, `headers`, `body_len`.
/// `/bytes/N` streams N bytes back; `/grpc` answers with gRPC-style trailers;
/// `/status/N` answers status N.
pub async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(echo);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

type EchoBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

async fn echo(req: Request<Incoming>) -> Result<Response<EchoBody>, std::convert::Infallible> {
    let path = req.uri().path().to_owned();
    if let Some(n) = path.strip_prefix("/bytes/") {
        let n: usize = n.parse().unwrap_or(0);
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let frames = (0..n.div_ceil(chunk.len())).map(move |i| {
            let len = chunk.len().min(n - i * chunk.len());
            Ok::<_, std::convert::Infallible>(Frame::data(chunk.slice(..len)))
        });
        let body = StreamBody::new(futures_stream(frames));
        return Ok(Response::new(body.boxed()));
    }
    if path == "/stream-echo" {
        // Answers at once and sends back every chunk as it arrives.
        return Ok(Response::new(Mirror(req.into_body()).boxed()));
    }
    if let Some(ms) = path.strip_prefix("/delay/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        return Ok(Response::new(
            Full::new(Bytes::from_static(b"slow\n")).boxed(),
        ));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"status\n")).boxed());
        *resp.status_mut() = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
        return Ok(resp);
    }
    let caller = req
        .headers()
        .get("x-meshgate-caller")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let method = req.method().to_string();
    let raw = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    let mut body = req.into_body();
    let mut len = 0usize;
    let mut request_trailers = None;
    while let Some(Ok(frame)) = body.frame().await {
        match frame.into_data() {
            Ok(d) => len += d.len(),
            Err(f) => request_trailers = f.into_trailers().ok(),
        }
    }
    let json = serde_json::json!({
        "caller": caller,
        "method": method,
        "path": raw,
        "headers": headers,
        "body_len": len,
        "request_trailers": request_trailers.map(|t| t.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned())).collect::<BTreeMap<_, _>>()),
    });
    let bytes = Bytes::from(serde_json::to_vec(&json).unwrap());
    if path == "/grpc" || path == "/grpc-forge" {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("grpc-message", "ok".parse().unwrap());
        if path == "/grpc-forge" {
            // An upstream claiming a decision and an identity in its trailers.
            trailers.insert("x-meshgate-decision-id", "forged".parse().unwrap());
            trailers.insert("x-meshgate-caller", "spiffe://x/forged".parse().unwrap());
        }
        let frames = vec![Ok(Frame::data(bytes)), Ok(Frame::trailers(trailers))];
        let mut resp = Response::new(StreamBody::new(futures_stream(frames.into_iter())).boxed());
        resp.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        return Ok(resp);
    }
    Ok(Response::new(Full::new(bytes).boxed()))
}

/// A `Stream` over an iterator (no futures crate needed).
pub fn futures_stream<I: Iterator + Unpin>(iter: I) -> IterStream<I> {
    IterStream(iter)
}

pub struct IterStream<I>(I);

impl<I: Iterator + Unpin> futures_core::Stream for IterStream<I> {
    type Item = I::Item;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<I::Item>> {
        std::task::Poll::Ready(self.0.next())
    }
}

/// A `Stream` over a channel's receiver.
pub struct ChannelStream<T>(pub tokio::sync::mpsc::Receiver<T>);

impl<T> futures_core::Stream for ChannelStream<T> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

/// A body that mirrors a request's body (data and trailers) as it arrives; an error ends it.
struct Mirror(Incoming);

impl hyper::body::Body for Mirror {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match std::pin::Pin::new(&mut self.0).poll_frame(cx) {
            std::task::Poll::Ready(Some(Ok(frame))) => std::task::Poll::Ready(Some(Ok(frame))),
            std::task::Poll::Ready(_) => std::task::Poll::Ready(None),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

/// A TCP echo server.
pub async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tcp.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// The decision record with id `id`, if any.
pub fn find_record(log: &DecisionLog, id: &str) -> Option<meshgate_policy::DecisionRecord> {
    log.query(&meshgate_policy::Filter::default())
        .unwrap()
        .into_iter()
        .find(|r| r.id == id)
}

/// Rewrites the body of record `seq` in a state's decision log (segment files under
/// `STATE/audit/`) with `edit`, keeping its stored hash: what someone with write access to the
/// disk, but not the checkpoint key, can do. Frames: `u32 LE length | kind | payload`, a
/// record's payload `hash (32) || body`, after a 16-byte segment header.
pub fn edit_record(state: &std::path::Path, seq: u64, edit: impl Fn(String) -> String) {
    let mut segments: Vec<_> = std::fs::read_dir(state.join("audit"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("seg-"))
        .collect();
    segments.sort();
    for path in segments {
        let bytes = std::fs::read(&path).unwrap();
        let mut out = bytes[..16].to_vec();
        let mut at = 16;
        let mut found = false;
        while at + 5 <= bytes.len() {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let kind = bytes[at + 4];
            let payload = &bytes[at + 5..at + 5 + len];
            let body = &payload[32.min(payload.len())..];
            let prefix = format!("{{\"seq\":{seq},");
            if kind == 1 && body.starts_with(prefix.as_bytes()) {
                let new = edit(String::from_utf8(body.to_vec()).unwrap());
                let mut p = payload[..32].to_vec();
                p.extend_from_slice(new.as_bytes());
                out.extend_from_slice(&(p.len() as u32).to_le_bytes());
                out.push(kind);
                out.extend_from_slice(&p);
                found = true;
            } else {
                out.extend_from_slice(&bytes[at..at + 5 + len]);
            }
            at += 5 + len;
        }
        if found {
            std::fs::write(&path, out).unwrap();
            return;
        }
    }
    panic!("record {seq} not found in {}", state.display());
}
