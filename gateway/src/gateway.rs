//! One running gateway: its listeners, tunnel, enforcement and the tasks that keep its
//! identity fresh. Built from parts the root crate opens (issuer, bundles, policy, log,
//! catalog), so tests run whole gateways in-process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshgate_identity::{BundleSet, Issuer, SpiffeId, TrustDomain};
use meshgate_policy::{DecisionLog, PolicyEngine, QuotaLimiter};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admission::Admission;
use crate::caller::{CallerTokens, VerifiedCallers};
use crate::catalog::{Catalog, ControlHandler};
use crate::config::GatewayConfig;
use crate::dest::Resolver;
use crate::forward::Forwarder;
use crate::inbound::Inbound;
use crate::metrics::Metrics;
use crate::source::Source;
use crate::svid::{SvidError, SvidStore};
use crate::telemetry::Telemetry;
use crate::traffic::config::RouteConfig;
use crate::traffic::{RouteTable, Traffic};
use crate::tunnel::{ResetSecret, Tunnel};
use crate::upstream::{LocalService, LocalServices, UpstreamConfigError};
use crate::{admin, inbound, source, tls};

/// How long a closing gateway waits for its connection closes to reach its peers.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// How often the gateway checks whether its SVID needs renewal and refreshes its own bundle.
const IDENTITY_TICK: Duration = Duration::from_secs(5);

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// A listener could not be bound.
    #[error("cannot listen on `{addr}` ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A config value is invalid.
    #[error("invalid config: {0}")]
    Config(String),
    /// The gateway's SVID could not be issued.
    #[error(transparent)]
    Svid(#[from] SvidError),
    /// A TLS setting was refused.
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    /// A service's upstream settings were refused.
    #[error(transparent)]
    Upstream(#[from] UpstreamConfigError),
}

/// What a gateway is built from.
#[derive(Debug)]
pub struct GatewayParts {
    /// The configuration.
    pub config: GatewayConfig,
    /// The trust domain's issuer.
    pub issuer: Arc<Issuer>,
    /// Bundles of the local and every federated trust domain (federation updates them).
    pub bundles: BundleSet,
    /// The policy engine.
    pub policy: Arc<PolicyEngine>,
    /// Rate quotas.
    pub quotas: QuotaLimiter,
    /// The decision log.
    pub log: Arc<DecisionLog>,
    /// The service catalog.
    pub catalog: Arc<dyn Catalog>,
    /// The `/.meshgate/` control handler (federation).
    pub control: Option<Arc<dyn ControlHandler>>,
    /// More metrics for `/metrics`, collected at each scrape (e.g. federation link state).
    pub collectors: Vec<Box<dyn prometheus_client::collector::Collector>>,
    /// The secret keying QUIC stateless resets, the same across restarts (from the state's
    /// `keys/`), so peers learn at once that this gateway restarted. `None`: a random key.
    pub quic_reset_secret: Option<ResetSecret>,
}

/// Requests in flight, counted so graceful shutdown can wait for them.
#[derive(Debug, Default)]
pub(crate) struct InFlight(AtomicUsize);

impl InFlight {
    /// Counts a request in flight until the guard drops.
    pub(crate) fn begin(&self) -> InFlightRequest<'_> {
        self.0.fetch_add(1, Ordering::AcqRel);
        InFlightRequest(&self.0)
    }

    fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// A request in flight.
pub(crate) struct InFlightRequest<'a>(&'a AtomicUsize);

impl Drop for InFlightRequest<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Addresses a started gateway listens on.
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    /// The mTLS workload listener.
    pub workload: SocketAddr,
    /// The loopback plaintext listener, if configured.
    pub workload_local: Option<SocketAddr>,
    /// The QUIC tunnel.
    pub tunnel: SocketAddr,
    /// Metrics and health.
    pub admin: SocketAddr,
}

/// What a reload of the traffic routes did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutesReport {
    /// Routes now in use.
    pub routes: usize,
    /// Backends that cannot serve now.
    pub warnings: Vec<String>,
}

/// Replaces a running gateway's traffic routes.
#[derive(Debug, Clone)]
pub struct Routes(Arc<Source>);

impl Routes {
    /// Replaces the traffic routes, all or nothing: an invalid set is refused with every
    /// problem (each naming its route and key) and the routes in use keep serving. The
    /// report warns of backends that cannot serve now (an unlinked cluster, a missing
    /// subset): they are accepted, since links come and go, and skipped until they can.
    pub fn reload(&self, routes: &[RouteConfig]) -> Result<RoutesReport, Vec<String>> {
        let table = RouteTable::compile(routes)?;
        let warnings = self.0.route_warnings(&table);
        let routes = table.routes().len();
        self.0.traffic.replace(table);
        tracing::info!(routes, warnings = warnings.len(), "traffic routes reloaded");
        Ok(RoutesReport { routes, warnings })
    }

    /// How many routes serve now.
    pub fn count(&self) -> usize {
        self.0.traffic.table().routes().len()
    }
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    id: SpiffeId,
    source: Arc<Source>,
    telemetry: Option<Arc<Telemetry>>,
    cluster: String,
    metrics: Arc<Metrics>,
    tunnel: Arc<Tunnel>,
    in_flight: Arc<InFlight>,
    svid: Arc<SvidStore>,
    addrs: BoundAddrs,
    accept_tasks: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    drain_timeout: Duration,
}

impl Gateway {
    /// Binds every listener and starts serving.
    pub async fn start(parts: GatewayParts) -> Result<Gateway, GatewayError> {
        let GatewayParts {
            config,
            issuer,
            bundles,
            policy,
            quotas,
            log,
            catalog,
            control,
            collectors,
            quic_reset_secret,
        } = parts;
        let td = issuer.trust_domain().clone();
        if config.trust_domain != td.as_str() {
            return Err(GatewayError::Config(format!(
                "`trust_domain = \"{}\"` but the state directory holds trust domain `{td}`",
                config.trust_domain
            )));
        }
        if let Some(addr) = config.listeners.workload_local
            && !addr.ip().is_loopback()
        {
            return Err(GatewayError::Config(format!(
                "`listeners.workload_local = \"{addr}\"` must be a loopback address (it accepts bearer tokens over plaintext)"
            )));
        }
        let id = SpiffeId::gateway(&td);
        let now = SystemTime::now();
        bundles.insert(issuer.bundle());
        let local_bundles = BundleSet::new();
        local_bundles.insert(issuer.bundle());
        let svid = Arc::new(SvidStore::issue(
            &issuer,
            id.clone(),
            config.identity.svid_ttl,
            config.listeners.dns_names.clone(),
            config.listeners.ip_addrs.clone(),
            now,
        )?);
        let audit_disk: Box<dyn prometheus_client::collector::Collector> =
            Box::new(crate::metrics::AuditDisk::new(&log));
        let metrics = Arc::new(Metrics::with_collectors(
            collectors.into_iter().chain([audit_disk]).collect(),
        ));
        metrics.svid_expiry.set(unix(svid.not_after()));

        let mut services = LocalServices::default();
        for service in &config.services {
            let tls = match &service.upstream_spiffe_id {
                Some(expected) => {
                    let expected: SpiffeId = expected.parse().map_err(|e| {
                        GatewayError::Config(format!(
                            "service `{}.{}`: `upstream_spiffe_id`: {e}",
                            service.name, service.namespace
                        ))
                    })?;
                    Some(tls::upstream_client(
                        expected,
                        bundles.clone(),
                        svid.clone(),
                    )?)
                }
                None => None,
            };
            services.insert(LocalService::new(service, tls)?);
        }
        let services = Arc::new(services);

        let workload_tls = Arc::new(tls::workload_server(&td, bundles.clone(), svid.clone())?);
        let tunnel_server = tls::tunnel_server(bundles.clone(), svid.clone())?;
        let client_bundles = bundles.clone();
        let client_svid = svid.clone();
        let tunnel = Tunnel::bind(
            config.listeners.tunnel,
            tunnel_server,
            Box::new(move |peer| {
                tls::tunnel_client(peer, client_bundles.clone(), client_svid.clone())
                    .map_err(|e| e.to_string())
            }),
            quic_reset_secret.as_ref(),
            (
                config.limits.max_concurrent_streams,
                config.limits.peer_dead_after,
            ),
            metrics.clone(),
        )
        .map_err(|source| GatewayError::Bind {
            what: "tunnel",
            addr: config.listeners.tunnel,
            source,
        })?;
        let tunnel = Arc::new(tunnel);

        let bind = |what: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| GatewayError::Bind { what, addr, source })
        };
        let workload = bind("workload", config.listeners.workload).await?;
        let local = match config.listeners.workload_local {
            Some(addr) => Some(bind("workload_local", addr).await?),
            None => None,
        };
        let admin_listener = bind("admin", config.listeners.admin).await?;
        let local_addr = |l: &TcpListener, what, addr| {
            l.local_addr()
                .map_err(|source| GatewayError::Bind { what, addr, source })
        };
        let addrs = BoundAddrs {
            workload: local_addr(&workload, "workload", config.listeners.workload)?,
            workload_local: match &local {
                Some(l) => Some(local_addr(l, "workload_local", config.listeners.workload)?),
                None => None,
            },
            tunnel: tunnel.local_addr().map_err(|source| GatewayError::Bind {
                what: "tunnel",
                addr: config.listeners.tunnel,
                source,
            })?,
            admin: local_addr(&admin_listener, "admin", config.listeners.admin)?,
        };

        let in_flight = Arc::new(InFlight::default());
        let admission = Arc::new(Admission::new(
            id.clone(),
            config.cluster.clone(),
            policy,
            quotas,
            log,
            metrics.clone(),
        ));
        let forwarder = Arc::new(Forwarder::new(
            tunnel.clone(),
            CallerTokens::new(issuer.clone(), config.identity.caller_jwt_ttl),
            config.limits.remote_retries,
            config.limits.tunnel_timeout,
            metrics.clone(),
        ));
        let telemetry = Telemetry::start(&config.telemetry, &config.cluster, id.as_str())
            .map_err(GatewayError::Config)?;
        let traffic = Arc::new(Traffic::new(
            RouteTable::compile(&config.routes)
                .map_err(|errors| GatewayError::Config(errors.join("; ")))?,
        ));
        let source = Arc::new(Source {
            cluster: config.cluster.clone(),
            trust_domain: td.clone(),
            id: id.clone(),
            admission: admission.clone(),
            forwarder: forwarder.clone(),
            resolver: Resolver::new(&config.mesh_suffix, config.aliases.clone()),
            catalog: catalog.clone(),
            services: services.clone(),
            local_bundles: local_bundles.clone(),
            jwt_leeway: config.identity.jwt_leeway,
            metrics: metrics.clone(),
            limits: config.limits.clone(),
            in_flight: in_flight.clone(),
            traffic: traffic.clone(),
            mirrors: Arc::new(tokio::sync::Semaphore::new(crate::traffic::MAX_MIRRORS)),
            telemetry: telemetry.clone(),
        });
        let inbound = Arc::new(Inbound {
            cluster: config.cluster.clone(),
            trust_domain: td.clone(),
            admission: admission.clone(),
            forwarder,
            services,
            catalog,
            control,
            callers: VerifiedCallers::new(
                bundles.clone(),
                config.identity.caller_jwt_ttl,
                config.identity.jwt_leeway,
            ),
            metrics: metrics.clone(),
            limits: config.limits.clone(),
            in_flight: in_flight.clone(),
            control_slots: Default::default(),
            telemetry: telemetry.clone(),
        });

        let mut accept_tasks = vec![
            tokio::spawn(source::serve_tls(source.clone(), workload, workload_tls)),
            tokio::spawn(inbound::serve(inbound)),
        ];
        for warning in source.route_warnings(&traffic.table()) {
            tracing::warn!(%warning, "traffic route");
        }
        if let Some(local) = local {
            accept_tasks.push(tokio::spawn(source::serve_local(source.clone(), local)));
        }
        let background = vec![
            tokio::spawn(admin::serve(
                Arc::new(admin::AdminParts {
                    metrics: metrics.clone(),
                    admission,
                    limits: config.limits.clone(),
                }),
                admin_listener,
            )),
            tokio::spawn(keep_identity_fresh(
                issuer,
                svid.clone(),
                bundles,
                local_bundles,
                metrics.clone(),
                IDENTITY_TICK.min(config.identity.svid_ttl / 8),
            )),
        ];
        tracing::info!(
            cluster = %config.cluster,
            trust_domain = %td,
            workload = %addrs.workload,
            tunnel = %addrs.tunnel,
            admin = %addrs.admin,
            "gateway started"
        );
        Ok(Gateway {
            id,
            source,
            telemetry,
            cluster: config.cluster.clone(),
            metrics,
            tunnel,
            in_flight,
            svid,
            addrs,
            accept_tasks,
            background,
            drain_timeout: config.limits.drain_timeout,
        })
    }

    /// Where the gateway listens.
    pub fn addrs(&self) -> BoundAddrs {
        self.addrs
    }

    /// The gateway's SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The handle that replaces the gateway's traffic routes at run time.
    pub fn routes(&self) -> Routes {
        Routes(self.source.clone())
    }

    /// When the gateway's current SVID expires.
    pub fn svid_not_after(&self) -> SystemTime {
        self.svid.not_after()
    }

    /// A handle for control requests to peer gateways (federation).
    pub fn control_client(&self) -> crate::tunnel::ControlClient {
        crate::tunnel::ControlClient::new(self.tunnel.clone())
    }

    /// Closes every tunnel connection with `td`'s gateways (a removed federation link; the
    /// caller also removes the bundle, so new handshakes fail).
    pub fn disconnect_trust_domain(&self, td: &TrustDomain) {
        self.tunnel.close_trust_domain(td);
    }

    /// Graceful shutdown: [`Gateway::drain`], then [`Gateway::close`].
    pub async fn shutdown(self) {
        self.drain().await;
        self.close().await;
    }

    /// Stops accepting new requests and waits for those in flight (up to the drain timeout).
    /// The tunnel stays open, so the last words to peers (a final checkpoint) can still go.
    pub async fn drain(&self) {
        for task in &self.accept_tasks {
            task.abort();
        }
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        while self.in_flight.count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Closes every tunnel connection with an application close (peers drop the connection
    /// at once instead of waiting for it to time out) and waits, briefly, for the close to
    /// leave; then stops the background tasks.
    pub async fn close(self) {
        self.tunnel.close();
        let _ = tokio::time::timeout(CLOSE_WAIT, self.tunnel.endpoint().wait_idle()).await;
        for task in &self.background {
            task.abort();
        }
        if let Some(telemetry) = self.telemetry.clone() {
            telemetry.shutdown().await;
        }
        tracing::info!(cluster = %self.cluster, "gateway stopped");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for task in self.accept_tasks.iter().chain(&self.background) {
            task.abort();
        }
    }
}

/// Renews the gateway SVID at half its lifetime and keeps the local bundle current (CA
/// rotation adds roots that peers and local verification must see).
async fn keep_identity_fresh(
    issuer: Arc<Issuer>,
    svid: Arc<SvidStore>,
    bundles: BundleSet,
    local: BundleSet,
    metrics: Arc<Metrics>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    loop {
        tick.tick().await;
        let now = SystemTime::now();
        let bundle = issuer.bundle();
        let changed = bundles
            .get(issuer.trust_domain())
            .is_none_or(|b| b.sequence() != bundle.sequence());
        if changed {
            bundles.insert(bundle.clone());
            local.insert(bundle);
        }
        if svid.needs_renewal(now) {
            match svid.renew(&issuer, now) {
                Ok(()) => {
                    metrics.svid_expiry.set(unix(svid.not_after()));
                    tracing::info!(id = %svid.id(), "gateway SVID renewed");
                }
                Err(e) => tracing::error!(error = %e, "gateway SVID renewal failed; retrying"),
            }
        }
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
