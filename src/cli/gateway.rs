//! `meshgate gateway --config FILE`: one cluster's gateway with its issuer API, policy
//! engine, decision log and static peers, until Ctrl-C (graceful drain).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Args;
use meshgate_gateway::{Gateway, GatewayConfig, GatewayParts};
use meshgate_identity::{BundleSet, Issuer, SpiffeId, SvidCertResolver, TrustDomain};
use meshgate_policy::{DecisionLog, PolicyEngine, QuotaLimiter};

use crate::admin::{self, AdminContext, AdminServer, Registry};
use crate::cli::audit::checkpoint_signer;
use crate::cli::federation_wiring::{self, FederatedCatalog};
use crate::exit::{CliError, CliResult, Outcome, ResultExt};
use crate::state::State;

/// How often the running gateway signs a checkpoint of its decision log.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(60);

/// Start a cluster's gateway from a TOML config file.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// The gateway config (TOML). Relative paths inside it are relative to the file.
    #[arg(long)]
    config: PathBuf,
    /// Validate the config and the state it names, print the effective config, and exit.
    #[arg(long)]
    check: bool,
}

impl GatewayArgs {
    pub fn run(self) -> CliResult<Outcome> {
        let config = load_config(&self.config)?;
        tracing::info!(config = ?config, "effective config");
        let state = State::open(&config.state_dir).internal_err()?;
        let issuer = Arc::new(
            Issuer::open(state.db(), &state.keys_dir()).internal_ctx(|| {
                format!("cannot open the issuer in `{}`", config.state_dir.display())
            })?,
        );
        let mut policy = PolicyEngine::load(&config.policy.dir, config.policy.schema.as_deref())
            .map_err(|e| CliError::input(anyhow::anyhow!("{e}")))?;
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
        let signer = checkpoint_signer(&state).internal_err()?;
        let log = Arc::new(DecisionLog::open(state.db(), Some(signer)).internal_err()?);
        let bundles = BundleSet::new();
        let links = federation_wiring::links_from_config(&config)?;
        if self.check {
            println!("{}", toml::to_string_pretty(&config).internal_err()?);
            return Ok(Outcome::Yes);
        }
        let federation =
            federation_wiring::open(state.db(), &config, &issuer, &log, &bundles, &links)?;
        let policy = Arc::new(policy);
        let mut admin = Registry::new();
        admin::builtin(
            &mut admin,
            &AdminContext {
                issuer: issuer.clone(),
                log: log.clone(),
                policy: policy.clone(),
            },
        );
        crate::cli::federation::register_admin(&mut admin, &federation);
        let admin_socket = state.admin_socket();
        let wiring_config = config.clone();
        let issuer_addr = config.listeners.issuer;
        let dns_names = config.listeners.dns_names.clone();
        let ip_addrs = config.listeners.ip_addrs.clone();
        crate::cli::block_on(async move {
            let gateway = Gateway::start(GatewayParts {
                config,
                issuer: issuer.clone(),
                bundles,
                policy,
                quotas: QuotaLimiter::new(default_quota, 1_000_000),
                log: log.clone(),
                catalog: Arc::new(FederatedCatalog(federation.clone())),
                control: Some(Arc::new(FederatedCatalog(federation.clone()))),
            })
            .await
            .map_err(|e| CliError::internal(anyhow::anyhow!(e)))?;
            let addrs = gateway.addrs();
            println!("gateway {} listening", gateway.id());
            println!("  workload (mTLS)   https://{}", addrs.workload);
            if let Some(local) = addrs.workload_local {
                println!("  workload (local)  http://{local}");
            }
            println!("  tunnel (QUIC)     {}", addrs.tunnel);
            println!("  admin             http://{}/metrics", addrs.admin);
            let mesh_dns = federation_wiring::start(&federation, &gateway, &wiring_config).await?;
            if let Some(dns) = &mesh_dns {
                println!("  mesh DNS          {} (udp, tcp)", dns.local_addr());
            }
            let admin = AdminServer::bind(&admin_socket, admin, log.clone())
                .await
                .internal_err()?;
            println!("  admin socket      {}", admin.path().display());
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            if let Some(addr) = issuer_addr {
                let svid = issuer
                    .issue_x509_svid(
                        &SpiffeId::gateway(issuer.trust_domain()),
                        Duration::from_secs(24 * 3600),
                        &dns_names,
                        &ip_addrs,
                        SystemTime::now(),
                    )
                    .internal_err()?;
                let resolver = Arc::new(SvidCertResolver::new(&svid).internal_err()?);
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .internal_ctx(|| format!("cannot listen on `{addr}` (issuer)"))?;
                println!(
                    "  issuer API        https://{}",
                    listener.local_addr().internal_err()?
                );
                let mut stop = stop_rx.clone();
                tokio::spawn(meshgate_identity::serve_issuer_api(
                    listener,
                    issuer.clone(),
                    resolver,
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                ));
            }
            let checkpoints = tokio::spawn(async move {
                let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    if let Err(e) = log.checkpoint(SystemTime::now()) {
                        tracing::error!(error = %e, "cannot sign a decision-log checkpoint");
                    }
                }
            });
            tokio::signal::ctrl_c().await.internal_err()?;
            eprintln!("shutting down: draining requests in flight");
            let _ = stop_tx.send(true);
            checkpoints.abort();
            admin.shutdown().await;
            gateway.shutdown().await;
            Ok::<_, CliError>(Outcome::Yes)
        })?
    }
}

/// Reads and validates a config file; errors name the file, the line and the key.
pub fn load_config(path: &Path) -> CliResult<GatewayConfig> {
    let text = std::fs::read_to_string(path)
        .input_ctx(|| format!("cannot read config `{}`", path.display()))?;
    let mut config: GatewayConfig = toml::from_str(&text).map_err(|e| {
        CliError::input(anyhow::anyhow!("invalid config `{}`: {e}", path.display()))
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let rel = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    rel(&mut config.state_dir);
    rel(&mut config.policy.dir);
    if let Some(p) = config.policy.shadow_dir.as_mut() {
        rel(p);
    }
    if let Some(p) = config.policy.schema.as_mut() {
        rel(p);
    }
    for peer in &mut config.peers {
        rel(&mut peer.bundle);
    }
    config
        .trust_domain
        .parse::<TrustDomain>()
        .input_ctx(|| format!("`{}`: `trust_domain`", path.display()))?;
    Ok(config)
}
