//! One cluster's runtime: everything `meshgate gateway` runs, built from a config — the
//! state, issuer, policy engine, decision log, federation, gateway, issuer API, admin socket,
//! mesh DNS. The decision log signs its own checkpoints (one per flush batch). `meshgate gateway` runs one; `meshgate demo` runs three
//! in one process.

use std::sync::Arc;
use std::time::SystemTime;

use meshgate_federation::{Federation, MeshDns};
use meshgate_gateway::{BoundAddrs, Gateway, GatewayConfig, GatewayParts, ResetSecret};
use meshgate_identity::{BundleSet, Issuer, ListenerCert, SpiffeId, SvidCertResolver};
use meshgate_policy::{DecisionLog, PolicyEngine, QuotaLimiter, QuotaSpec};

use crate::admin::{self, AdminContext, AdminServer, Registry};
use crate::cli::audit::checkpoint_signer;
use crate::cli::federation_wiring::{self, FederatedCatalog, FederationMetrics};
use crate::console::{Console, ConsoleParts};
use crate::exit::{CliError, CliResult, ResultExt};
use crate::state::State;

/// The secret keying the tunnel's QUIC stateless resets, in the state's `keys/`.
const QUIC_RESET_KEY_FILE: &str = "quic-reset.key";

/// A cluster opened from its config, not yet serving (`meshgate gateway --check` stops here).
pub struct Prepared {
    config: GatewayConfig,
    /// The file the config was read from: `routes reload` reads its routes again.
    config_file: Option<std::path::PathBuf>,
    _state: State,
    admin_socket: std::path::PathBuf,
    pub issuer: Arc<Issuer>,
    pub policy: Arc<PolicyEngine>,
    pub log: Arc<DecisionLog>,
    pub federation: Arc<Federation>,
    bundles: BundleSet,
    default_quota: Option<QuotaSpec>,
}

/// A serving cluster.
pub struct Running {
    pub gateway: Gateway,
    pub issuer: Arc<Issuer>,
    pub log: Arc<DecisionLog>,
    pub federation: Arc<Federation>,
    pub config: GatewayConfig,
    admin: AdminServer,
    mesh_dns: Option<MeshDns>,
    issuer_api: Option<std::net::SocketAddr>,
    console: Option<Console>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Prepared {
    /// Opens the state the config names and loads policies; refuses bad input clearly.
    pub fn open(config: GatewayConfig) -> CliResult<Prepared> {
        let state = State::open(&config.state_dir).internal_err()?;
        let issuer = Arc::new(
            Issuer::open(state.db(), &state.keys_dir()).internal_ctx(|| {
                format!("cannot open the issuer in `{}`", config.state_dir.display())
            })?,
        );
        let mut policy = PolicyEngine::load(&config.policy.dir, config.policy.schema.as_deref())
            .map_err(|e| CliError::input(anyhow::anyhow!("{e}")))?
            .with_path_rules(config.paths.rules());
        if let Some(shadow) = &config.policy.shadow_dir {
            policy = policy
                .with_shadow(shadow)
                .map_err(|e| CliError::input(anyhow::anyhow!("shadow policies: {e}")))?;
        }
        let default_quota = match &config.policy.default_quota {
            Some(q) => Some(
                q.parse()
                    .input_ctx(|| format!("`policy.default_quota = \"{q}\"`"))?,
            ),
            None => None,
        };
        if meshgate_policy::sled_log_present(state.db()).internal_err()? {
            return Err(CliError::internal(anyhow::anyhow!(
                "`{}` holds a decision log in the old format (inside `db/`); stop here and run `meshgate audit migrate {}` once, then start the gateway again",
                config.state_dir.display(),
                config.state_dir.display()
            )));
        }
        let signer = checkpoint_signer(&state).internal_err()?;
        let log = Arc::new(
            DecisionLog::open(&state.audit_dir(), Some(signer), config.audit.log_options())
                .internal_ctx(|| {
                    format!(
                        "cannot open the decision log in `{}`",
                        state.audit_dir().display()
                    )
                })?,
        );
        let bundles = BundleSet::new();
        let links = federation_wiring::links_from_config(&config)?;
        let federation =
            federation_wiring::open(state.db(), &config, &issuer, &log, &bundles, &links)?;
        Ok(Prepared {
            config_file: None,
            admin_socket: state.admin_socket(),
            _state: state,
            config,
            issuer,
            policy: Arc::new(policy),
            log,
            federation,
            bundles,
            default_quota,
        })
    }

    /// Names the file the config came from, so `meshgate routes reload` can read it again.
    pub fn with_config_file(mut self, path: &std::path::Path) -> Prepared {
        self.config_file = Some(path.to_path_buf());
        self
    }

    /// The effective config.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// Binds every listener and starts serving.
    pub async fn start(self) -> CliResult<Running> {
        let Prepared {
            config,
            config_file,
            _state,
            admin_socket,
            issuer,
            policy,
            log,
            federation,
            bundles,
            default_quota,
        } = self;
        let mut registry = Registry::new();
        admin::builtin(
            &mut registry,
            &AdminContext {
                issuer: issuer.clone(),
                log: log.clone(),
                policy: policy.clone(),
            },
        );
        crate::cli::federation::register_admin(&mut registry, &federation);
        let console_bundles = bundles.clone();
        let quic_reset_secret = _state
            .secret(QUIC_RESET_KEY_FILE)
            .map_err(CliError::internal)?;
        let gateway = Gateway::start(GatewayParts {
            config: config.clone(),
            issuer: issuer.clone(),
            bundles,
            policy: policy.clone(),
            quotas: QuotaLimiter::new(default_quota, 1_000_000),
            log: log.clone(),
            catalog: Arc::new(FederatedCatalog(federation.clone())),
            control: Some(Arc::new(FederatedCatalog(federation.clone()))),
            collectors: vec![Box::new(FederationMetrics::new(&federation))],
            quic_reset_secret: Some(ResetSecret(quic_reset_secret)),
        })
        .await
        .map_err(|e| CliError::internal(anyhow::anyhow!(e)))?;
        crate::cli::routes::register_admin(&mut registry, gateway.routes(), config_file);
        let mesh_dns = federation_wiring::start(&federation, &gateway, &config).await?;
        if config.audit.witness_check == meshgate_gateway::WitnessCheck::Strict
            && let Err(e) = federation_wiring::check_witnesses(&federation).await
        {
            gateway.shutdown().await;
            return Err(e);
        }
        let admin = AdminServer::bind(&admin_socket, registry, log.clone())
            .await
            .internal_err()?;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let issuer_api = match config.listeners.issuer {
            Some(addr) => Some(serve_issuer(&issuer, &config, addr, stop_rx).await?),
            None => None,
        };
        let console = match config.listeners.console {
            Some(addr) => Some(
                Console::start(
                    ConsoleParts {
                        config: config.clone(),
                        issuer: issuer.clone(),
                        bundles: console_bundles,
                        log: log.clone(),
                        policy: policy.clone(),
                        federation: federation.clone(),
                    },
                    addr,
                )
                .await?,
            ),
            None => None,
        };
        Ok(Running {
            gateway,
            issuer,
            log,
            federation,
            config,
            admin,
            mesh_dns,
            issuer_api,
            console,
            stop,
        })
    }
}

async fn serve_issuer(
    issuer: &Arc<Issuer>,
    config: &GatewayConfig,
    addr: std::net::SocketAddr,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> CliResult<std::net::SocketAddr> {
    // The listener certificate lives and is renewed like the gateway's own SVID.
    let cert = ListenerCert {
        id: SpiffeId::gateway(issuer.trust_domain()),
        dns_names: config.listeners.dns_names.clone(),
        ips: config.listeners.ip_addrs.clone(),
        ttl: config.identity.svid_ttl,
    };
    let svid = cert.issue(issuer, SystemTime::now()).internal_err()?;
    let resolver = Arc::new(SvidCertResolver::new(&svid).internal_err()?);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .internal_ctx(|| format!("cannot listen on `{addr}` (issuer)"))?;
    let bound = listener.local_addr().internal_err()?;
    let renewal = cert.keep_renewed(issuer.clone(), resolver.clone());
    let mut renewal_stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = renewal => {}
            _ = renewal_stop.wait_for(|s| *s) => {}
        }
    });
    tokio::spawn(meshgate_identity::serve_issuer_api(
        listener,
        issuer.clone(),
        resolver,
        async move {
            let _ = stop.wait_for(|s| *s).await;
        },
    ));
    Ok(bound)
}

impl Running {
    /// Where the gateway listens.
    pub fn addrs(&self) -> BoundAddrs {
        self.gateway.addrs()
    }

    /// The lines `meshgate gateway` prints at start.
    pub fn describe(&self) -> String {
        let addrs = self.addrs();
        let mut out = format!("gateway {} listening\n", self.gateway.id());
        out += &format!("  workload (mTLS)   https://{}\n", addrs.workload);
        if let Some(local) = addrs.workload_local {
            out += &format!("  workload (local)  http://{local}\n");
        }
        out += &format!("  tunnel (QUIC)     {}\n", addrs.tunnel);
        out += &format!("  admin             http://{}/metrics\n", addrs.admin);
        if let Some(dns) = &self.mesh_dns {
            out += &format!("  mesh DNS          {} (udp, tcp)\n", dns.local_addr());
        }
        out += &format!("  admin socket      {}\n", self.admin.path().display());
        if let Some(api) = self.issuer_api {
            out += &format!("  issuer API        https://{api}\n");
        }
        if let Some(console) = &self.console {
            out += &format!("  console           {}\n", console.url());
        }
        out
    }

    /// The console's URL, when it runs.
    pub fn console_url(&self) -> Option<&str> {
        self.console.as_ref().map(Console::url)
    }

    /// Graceful shutdown: stop the issuer API and the admin socket, drain the gateway, sign
    /// a last checkpoint and push it to the peers (so every answered decision is witnessed),
    /// then close the tunnel.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Some(console) = self.console {
            console.shutdown().await;
        }
        self.admin.shutdown().await;
        self.gateway.drain().await;
        match self.log.checkpoint(SystemTime::now()) {
            Ok(head) => {
                let pushed = tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    self.federation.push_head(&head),
                )
                .await;
                tracing::info!(seq = head.seq, peers = ?pushed.ok(), "final checkpoint signed and pushed");
            }
            Err(e) => tracing::warn!(error = %e, "cannot sign the final checkpoint"),
        }
        self.gateway.close().await;
    }
}
