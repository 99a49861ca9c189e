//! The read-only web console (`listeners.console`): the decision log, the service graph,
//! the log's integrity, the policy sets and the federation links of one running gateway,
//! as HTML pages (no script, no external asset: everything is served from the binary) and
//! as JSON for machines.
//!
//! It lives in the root crate because it reads every part (policy, federation, identity)
//! and belongs to none. It runs on its own listener and tasks; pages that read the log run
//! on blocking threads, at most [`READERS`] at once, and read the segment files without the
//! writer's lock (like `meshgate audit query` beside a running gateway), so viewing never
//! stalls the request path's appends.
//!
//! Each request: method (GET/HEAD) → viewer (see [`access`]) → route → console policy
//! (mTLS) → the view is recorded as an admin event in the decision log, through the
//! gateway's own handle (fail closed: a view that cannot be recorded is refused) → data →
//! page.
//!
//! | page | HTML | JSON |
//! |---|---|---|
//! | decisions | `/decisions?caller=&service=&decision=&policy=&since=&until=&limit=&before=` | `/api/decisions?…` |
//! | one decision | `/decisions/<id>` | `/api/decisions/<id>` |
//! | export | `/export/decisions.jsonl?…`, `/export/decisions.csv?…` (the same search) | |
//! | graph | `/graph?since=&until=&by=workload\|namespace` | `/api/graph?…` |
//! | integrity | `/integrity` | `/api/integrity` |
//! | policies | `/policies` | `/api/policies` |
//! | mesh | `/mesh` | `/api/mesh` |

mod access;
mod data;
mod export;
mod html;
mod pages;
mod query;
mod svg;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use meshgate_federation::Federation;
use meshgate_gateway::{ConsoleAccess, GatewayConfig};
use meshgate_identity::{BundleSet, Issuer};
use meshgate_policy::{ConsolePolicy, ConsoleRequest, DecisionLog, PolicyEngine};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;

use self::access::Viewer;
use self::data::Sources;
use self::export::Format;
use self::html::Frame;
use self::query::{GraphQuery, Query, Search};
use crate::exit::{CliError, CliResult, ResultExt};

/// Pages reading the decision log at once; more wait (up to [`BUSY_WAIT`]).
pub const READERS: usize = 2;
/// How long a request waits for a reader before it is answered 503.
const BUSY_WAIT: Duration = Duration::from_secs(30);
/// Connections served at once; more are dropped at accept.
const MAX_CONNECTIONS: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest request target recorded in an admin event.
const MAX_RECORDED: usize = 512;

/// What the console is built from: the running gateway's parts.
#[derive(Debug)]
pub struct ConsoleParts {
    pub config: GatewayConfig,
    pub issuer: Arc<Issuer>,
    pub bundles: BundleSet,
    pub log: Arc<DecisionLog>,
    pub policy: Arc<PolicyEngine>,
    pub federation: Arc<Federation>,
}

/// A serving console.
#[derive(Debug)]
pub struct Console {
    url: String,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

struct Shared {
    src: Sources,
    mtls: bool,
    readers: Arc<Semaphore>,
}

impl Console {
    /// Loads the console policy (mTLS mode), binds `addr` and starts serving.
    pub async fn start(parts: ConsoleParts, addr: SocketAddr) -> CliResult<Console> {
        let config = parts.config;
        config
            .check_console()
            .map_err(|e| CliError::input(anyhow::anyhow!(e)))?;
        let mtls = config.console.access == ConsoleAccess::Mtls;
        let console_policy = if mtls {
            let loaded = match &config.console.policy {
                Some(path) => ConsolePolicy::load(path),
                None => ConsolePolicy::default_for(&config.trust_domain),
            };
            Some(loaded.map_err(|e| CliError::input(anyhow::anyhow!("`console.policy`: {e}")))?)
        } else {
            None
        };
        let listener = TcpListener::bind(addr)
            .await
            .internal_ctx(|| format!("cannot listen on `{addr}` (console)"))?;
        let bound = listener.local_addr().internal_err()?;
        let tls = if mtls {
            Some(access::tls(
                &parts.issuer,
                parts.bundles,
                config.listeners.dns_names.clone(),
                config.listeners.ip_addrs.clone(),
                config.identity.svid_ttl,
            )?)
        } else {
            None
        };
        let url = url(bound, mtls);
        let shared = Arc::new(Shared {
            src: Sources {
                config,
                log: parts.log,
                policy: parts.policy,
                federation: parts.federation,
                console_policy,
            },
            mtls,
            readers: Arc::new(Semaphore::new(READERS)),
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, tls, shared, stop_rx));
        tracing::info!(%url, mtls, "console listening");
        Ok(Console {
            url,
            stop,
            task: Some(task),
        })
    }

    /// The console's address as a URL (`https://…/` in mTLS mode).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops accepting (requests in flight finish on their own tasks).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn url(bound: SocketAddr, mtls: bool) -> String {
    let scheme = if mtls { "https" } else { "http" };
    let host = match bound.ip() {
        ip if ip.is_unspecified() || ip.is_loopback() => {
            if ip.is_ipv6() && !ip.is_unspecified() {
                "[::1]".to_owned()
            } else {
                "127.0.0.1".to_owned()
            }
        }
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    format!("{scheme}://{host}:{}/", bound.port())
}

async fn serve(
    listener: TcpListener,
    tls: Option<access::Tls>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let (acceptor, renewal) = match tls {
        Some(t) => (Some(t.acceptor), Some(t.renewal)),
        None => (None, None),
    };
    if let Some(renewal) = renewal {
        let mut stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = renewal => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff: Option<Duration> = None;
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => {
                backoff = None;
                a
            }
            Err(e) => {
                // Out of file descriptors and the like: back off, 10 ms doubling to 1 s.
                let pause = backoff.map_or(Duration::from_millis(10), |p| {
                    (p * 2).min(Duration::from_secs(1))
                });
                if backoff.is_none() {
                    tracing::warn!(error = %e, "console accept failed; backing off");
                }
                backoff = Some(pause);
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "console: too many connections; dropping one");
            continue;
        };
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let local = tcp.local_addr().ok();
            match acceptor {
                Some(acceptor) => {
                    let tls =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::info!(%peer, error = %e, "console: TLS handshake refused");
                                return;
                            }
                            Err(_) => {
                                tracing::info!(%peer, "console: TLS handshake timed out");
                                return;
                            }
                        };
                    let viewer = match tls.get_ref().1.peer_certificates() {
                        Some(certs) => match meshgate_identity::peer_spiffe_id(certs) {
                            Ok(id) => Viewer::Svid(id),
                            Err(_) => Viewer::Anonymous,
                        },
                        None => Viewer::Anonymous,
                    };
                    connection(tls, viewer, shared).await;
                }
                None => {
                    // Reads `/proc/net/tcp`: off the async workers.
                    let viewer = match local {
                        Some(local) => tokio::task::spawn_blocking(move || {
                            access::loopback_viewer(peer, local)
                        })
                        .await
                        .unwrap_or_else(|_| Viewer::Loopback(format!("loopback {peer}"))),
                        None => Viewer::Loopback(format!("loopback {peer}")),
                    };
                    connection(tcp, viewer, shared).await;
                }
            }
        });
    }
}

async fn connection<IO>(io: IO, viewer: Viewer, shared: Arc<Shared>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let viewer = Arc::new(viewer);
    let service = hyper::service::service_fn(move |req| {
        let (viewer, shared) = (viewer.clone(), shared.clone());
        async move { Ok::<_, Infallible>(handle(req, &viewer, &shared).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "console connection ended");
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// A console route; `api` for the JSON form.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Home,
    Decisions { api: bool },
    Decision { id: String, api: bool },
    Export(Format),
    Graph { api: bool },
    Integrity { api: bool },
    Policies { api: bool },
    Mesh { api: bool },
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        let (api, rest) = match path.strip_prefix("/api") {
            Some(rest) if rest.starts_with('/') => (true, rest),
            _ => (false, path),
        };
        Some(match rest {
            "/" if !api => Route::Home,
            "/decisions" => Route::Decisions { api },
            "/graph" => Route::Graph { api },
            "/integrity" => Route::Integrity { api },
            "/policies" => Route::Policies { api },
            "/mesh" => Route::Mesh { api },
            "/export/decisions.jsonl" if !api => Route::Export(Format::Jsonl),
            "/export/decisions.csv" if !api => Route::Export(Format::Csv),
            other => {
                let id = other.strip_prefix("/decisions/")?;
                if !data::valid_id(id) {
                    return None;
                }
                Route::Decision {
                    id: id.to_ascii_lowercase(),
                    api,
                }
            }
        })
    }

    /// The page's name in the console policy's `context.page`.
    fn page(&self) -> &'static str {
        match self {
            Self::Home | Self::Decisions { .. } => "decisions",
            Self::Decision { .. } => "decision",
            Self::Export(_) => "export",
            Self::Graph { .. } => "graph",
            Self::Integrity { .. } => "integrity",
            Self::Policies { .. } => "policies",
            Self::Mesh { .. } => "mesh",
        }
    }
}

async fn handle(req: Request<Incoming>, viewer: &Viewer, shared: &Arc<Shared>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let json = path.starts_with("/api/") || path.starts_with("/export/");
    let fail = |status: StatusCode, text: String| refusal(status, &text, json);
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = fail(
            StatusCode::METHOD_NOT_ALLOWED,
            "the console is read-only: only GET and HEAD".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    // A page on another site may point a browser here (an image, a form): the browser's
    // certificate or the loopback address would make it a view. Only the console's own
    // links and addresses typed or bookmarked are answered, before anything is read or
    // recorded. (Clients that are not browsers send no `Sec-Fetch-Site`.)
    if let Some(site) = req
        .headers()
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return fail(
            StatusCode::FORBIDDEN,
            format!(
                "the console answers its own pages and addresses typed or bookmarked, not a request from another site (`Sec-Fetch-Site: {}`)",
                cut(site, 32)
            ),
        );
    }
    if !shared.mtls {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        if !access::loopback_host(host) {
            return fail(
                StatusCode::FORBIDDEN,
                "this console answers only requests addressed to localhost or a loopback address"
                    .into(),
            );
        }
    }
    let Some(route) = Route::parse(&path) else {
        return fail(
            StatusCode::NOT_FOUND,
            format!("no console page at `{}`", cut(&path, 200)),
        );
    };
    let target = cut(
        req.uri()
            .path_and_query()
            .map_or(path.as_str(), |p| p.as_str()),
        MAX_RECORDED,
    );
    let who = viewer.who();
    if let (Viewer::Svid(id), Some(policy)) = (viewer, &shared.src.console_policy) {
        let cfg = &shared.src.config;
        let decision = policy.authorize(&ConsoleRequest {
            caller: id.as_str(),
            cluster: &cfg.cluster,
            trust_domain: &cfg.trust_domain,
            page: route.page(),
            time: SystemTime::now(),
        });
        if !decision.allowed {
            let what = format!("console view refused by the console policy: {target}");
            if let Err(e) = record(shared, &who, what).await {
                return fail(StatusCode::SERVICE_UNAVAILABLE, e);
            }
            tracing::warn!(viewer = %id, page = route.page(), errors = ?decision.errors, "console view refused");
            return fail(
                StatusCode::FORBIDDEN,
                format!(
                    "no console policy allows `{id}` to view the `{}` page of this gateway; the refusal is recorded",
                    route.page()
                ),
            );
        }
    } else if !matches!(viewer, Viewer::Loopback(_)) {
        // mTLS without a client certificate (or one without a SPIFFE ID): nothing is shown.
        return fail(
            StatusCode::UNAUTHORIZED,
            "this console needs a client certificate: an X.509-SVID of a trust domain this gateway trusts (for example `curl --cert svid.pem --key key.pem --cacert bundle.pem`)".into(),
        );
    }
    if route == Route::Home {
        return redirect("/decisions");
    }
    if let Err(e) = record(shared, &who, format!("console view {target}")).await {
        return fail(StatusCode::SERVICE_UNAVAILABLE, e);
    }
    match serve_route(route, req.uri().query(), &who, shared).await {
        Ok(resp) => resp,
        Err((status, text)) => fail(status, text),
    }
}

/// Records a view (or a refused one) as an admin event through the gateway's log handle.
async fn record(shared: &Arc<Shared>, who: &str, what: String) -> Result<(), String> {
    let log = shared.src.log.clone();
    let who = who.to_owned();
    let written =
        tokio::task::spawn_blocking(move || log.append_view_event(&who, &what, SystemTime::now()))
            .await;
    match written {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "console: cannot record a page view; refusing it");
            Err(format!(
                "the page view cannot be recorded in the decision log, so it is refused: {e}"
            ))
        }
        Err(e) => Err(format!("the page view cannot be recorded: {e}")),
    }
}

type Failure = (StatusCode, String);
/// A page's work on a blocking thread: the data, then its HTML or JSON.
type Render = Box<dyn FnOnce(&Sources, &Frame<'_>) -> Result<Response<Body>, Failure> + Send>;

async fn serve_route(
    route: Route,
    raw_query: Option<&str>,
    who: &str,
    shared: &Arc<Shared>,
) -> Result<Response<Body>, Failure> {
    let bad = |e: String| (StatusCode::BAD_REQUEST, e);
    let q = Query::parse(raw_query).map_err(bad)?;
    let now = SystemTime::now();
    let cfg = &shared.src.config;
    if let Route::Export(format) = route {
        let search = Search::parse(&q, now).map_err(bad)?;
        let permit = reader(shared).await?;
        let body = export::stream(shared.src.log.clone(), search.filter(), format, permit);
        let mut resp = respond(StatusCode::OK, format.content_type(), body.boxed());
        let disposition = format!("attachment; filename=\"{}\"", format.file_name());
        if let Ok(v) = HeaderValue::from_str(&disposition) {
            resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
        }
        return Ok(resp);
    }
    let viewer = who.to_owned();
    let permit = reader(shared).await?;
    let run = |f: Render| {
        let shared = shared.clone();
        let (cluster, td) = (cfg.cluster.clone(), cfg.trust_domain.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let frame = Frame {
                    cluster: &cluster,
                    trust_domain: &td,
                    viewer: &viewer,
                };
                f(&shared.src, &frame)
            })
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        }
    };
    match route {
        Route::Home | Route::Export(_) => Ok(redirect("/decisions")),
        Route::Decisions { api } => {
            let search = Search::parse(&q, now).map_err(bad)?;
            run(Box::new(move |src: &Sources, frame: &Frame<'_>| {
                let page = data::search(&src.log, &search).map_err(log_err)?;
                Ok(if api {
                    json(&page)
                } else {
                    html(pages::decisions(frame, &page))
                })
            }))
            .await
        }
        Route::Decision { id, api } => {
            q.only(&[]).map_err(bad)?;
            run(Box::new(
                move |src: &Sources, frame: &Frame<'_>| match data::detail(src, &id)
                    .map_err(log_err)?
                {
                    Some(d) => Ok(if api {
                        json(&d)
                    } else {
                        html(pages::decision(frame, &d))
                    }),
                    None => Err((
                        StatusCode::NOT_FOUND,
                        format!("no decision with id `{id}` in this gateway's log"),
                    )),
                },
            ))
            .await
        }
        Route::Graph { api } => {
            let gq = GraphQuery::parse(&q, now).map_err(bad)?;
            run(Box::new(move |src: &Sources, frame: &Frame<'_>| {
                let view = data::graph(&src.log, &gq).map_err(log_err)?;
                Ok(if api {
                    json(&view)
                } else {
                    html(pages::graph(frame, &view))
                })
            }))
            .await
        }
        Route::Integrity { api } => {
            q.only(&[]).map_err(bad)?;
            run(Box::new(move |src: &Sources, frame: &Frame<'_>| {
                let i = data::integrity(src, SystemTime::now()).map_err(log_err)?;
                Ok(if api {
                    json(&i)
                } else {
                    html(pages::integrity(frame, &i))
                })
            }))
            .await
        }
        Route::Policies { api } => {
            q.only(&[]).map_err(bad)?;
            run(Box::new(move |src: &Sources, frame: &Frame<'_>| {
                let p = data::policies(src).map_err(log_err)?;
                Ok(if api {
                    json(&p)
                } else {
                    html(pages::policies(frame, &p))
                })
            }))
            .await
        }
        Route::Mesh { api } => {
            q.only(&[]).map_err(bad)?;
            run(Box::new(move |src: &Sources, frame: &Frame<'_>| {
                let m = data::mesh(src, SystemTime::now());
                Ok(if api {
                    json(&m)
                } else {
                    html(pages::mesh(frame, &m))
                })
            }))
            .await
        }
    }
}

/// A share of the console's log-reading capacity, or 503 after [`BUSY_WAIT`].
async fn reader(shared: &Arc<Shared>) -> Result<OwnedSemaphorePermit, Failure> {
    match tokio::time::timeout(BUSY_WAIT, shared.readers.clone().acquire_owned()).await {
        Ok(Ok(p)) => Ok(p),
        _ => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "the console is busy reading the decision log for other views; try again".into(),
        )),
    }
}

fn log_err(e: meshgate_policy::LogError) -> Failure {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("cannot read the decision log: {e}"),
    )
}

fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn respond(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    r
}

fn html(page: String) -> Response<Body> {
    respond(
        StatusCode::OK,
        "text/html; charset=utf-8",
        Full::new(Bytes::from(page)).boxed(),
    )
}

fn json<T: Serialize>(value: &T) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            respond(
                StatusCode::OK,
                "application/json",
                Full::new(Bytes::from(bytes)).boxed(),
            )
        }
        Err(e) => refusal(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), true),
    }
}

fn redirect(to: &'static str) -> Response<Body> {
    let mut r = respond(
        StatusCode::SEE_OTHER,
        "text/plain; charset=utf-8",
        Full::new(Bytes::new()).boxed(),
    );
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    r
}

/// An error answer: `{"error": "…"}` for the JSON routes, a short page otherwise.
fn refusal(status: StatusCode, text: &str, json: bool) -> Response<Body> {
    if json {
        let body = serde_json::json!({ "error": text }).to_string() + "\n";
        respond(
            status,
            "application/json",
            Full::new(Bytes::from(body)).boxed(),
        )
    } else {
        let title = status.canonical_reason().unwrap_or("error");
        let page = html::message(status.as_u16(), title, text);
        respond(
            status,
            "text/html; charset=utf-8",
            Full::new(Bytes::from(page)).boxed(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_strictly() {
        assert_eq!(Route::parse("/"), Some(Route::Home));
        assert_eq!(Route::parse("/api/graph"), Some(Route::Graph { api: true }));
        assert_eq!(
            Route::parse("/decisions/ABCdef01"),
            Some(Route::Decision {
                id: "abcdef01".into(),
                api: false
            })
        );
        for bad in [
            "/api",
            "/api/",
            "/decisions/<x>",
            "/decisions/",
            "/graph/",
            "/apigraph",
            "/api/export/decisions.csv",
            "/x",
        ] {
            assert_eq!(Route::parse(bad), None, "{bad}");
        }
        assert_eq!(
            Route::parse("/export/decisions.csv"),
            Some(Route::Export(Format::Csv))
        );
        assert_eq!(
            Route::parse("/decisions/aa").map(|r| r.page()),
            Some("decision")
        );
    }

    #[test]
    fn urls_name_a_reachable_host() {
        assert_eq!(
            url("0.0.0.0:8443".parse().unwrap(), true),
            "https://127.0.0.1:8443/"
        );
        assert_eq!(url("[::1]:80".parse().unwrap(), false), "http://[::1]:80/");
        assert_eq!(
            url("10.1.2.3:9".parse().unwrap(), true),
            "https://10.1.2.3:9/"
        );
        assert_eq!(cut("ééé", 3), "é…");
    }
}
