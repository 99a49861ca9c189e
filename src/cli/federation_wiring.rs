//! Wiring federation into the gateway: links from the config, opening the federation over
//! the state, and starting its tasks and the mesh DNS once the gateway runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use meshgate_federation::{
    Federation, FederationOptions, FederationParts, Link, LocalCluster, MeshDns,
};
use meshgate_gateway::{Gateway, GatewayConfig};
use meshgate_identity::{BundleSet, Issuer, TrustDomain};
use meshgate_policy::DecisionLog;

use crate::exit::{CliResult, ResultExt};

#[path = "federation_adapters.rs"]
mod adapters;
pub use adapters::{FederatedCatalog, FederationMetrics, TunnelTransport};

/// The links a gateway config declares (`[[peers]]`), bootstrap bundles read from their files.
pub fn links_from_config(config: &GatewayConfig) -> CliResult<Vec<Link>> {
    config
        .peers
        .iter()
        .map(|peer| {
            let bundle = std::fs::read_to_string(&peer.bundle).input_ctx(|| {
                format!(
                    "peer `{}`: cannot read bundle `{}`",
                    peer.cluster,
                    peer.bundle.display()
                )
            })?;
            let link = Link {
                cluster: peer.cluster.clone(),
                trust_domain: peer.trust_domain.clone(),
                gateways: peer.gateways.clone(),
                dns: peer.dns.clone(),
                priority: peer.priority,
                bootstrap_bundle: bundle,
                services: peer.services.clone(),
                shared: peer.shared.clone(),
                credentials: peer.credentials.clone(),
            };
            link.validate()
                .input_ctx(|| format!("peer `{}`", peer.cluster))?;
            Ok(link)
        })
        .collect()
}

/// This cluster as federation sees it: its services and whom each is exported to.
pub fn local_cluster(config: &GatewayConfig, td: &TrustDomain) -> LocalCluster {
    LocalCluster {
        cluster: config.cluster.clone(),
        trust_domain: td.clone(),
        services: config
            .services
            .iter()
            .map(|s| (format!("{}.{}", s.name, s.namespace), s.export_to.clone()))
            .collect(),
    }
}

/// Opens the federation over the state's database (before the gateway starts).
pub fn open(
    db: &sled::Db,
    config: &GatewayConfig,
    issuer: &Arc<Issuer>,
    log: &Arc<DecisionLog>,
    bundles: &BundleSet,
    links: &[Link],
) -> CliResult<Arc<Federation>> {
    Federation::open(
        db,
        FederationParts {
            local: local_cluster(config, issuer.trust_domain()),
            issuer: issuer.clone(),
            log: Some(log.clone()),
            bundles: bundles.clone(),
            links: links.to_vec(),
            options: FederationOptions::default(),
        },
        SystemTime::now(),
    )
    .input_ctx(|| "federation links")
}

/// After the gateway started: hands federation the tunnel, starts its refresh tasks and,
/// when `listeners.dns` is set, the mesh DNS.
pub async fn start(
    fed: &Arc<Federation>,
    gateway: &Gateway,
    config: &GatewayConfig,
) -> CliResult<Option<MeshDns>> {
    let addrs = gateway.addrs();
    let advertise = |a: SocketAddr| match config.listeners.ip_addrs.first() {
        Some(ip) if a.ip().is_unspecified() => SocketAddr::new(*ip, a.port()),
        _ => a,
    };
    fed.attach(
        Arc::new(TunnelTransport(gateway.control_client())),
        vec![advertise(addrs.tunnel)],
    );
    fed.start();
    match config.listeners.dns {
        Some(bind) => {
            let dns = MeshDns::start(
                fed.clone(),
                bind,
                &config.mesh_suffix,
                advertise(addrs.workload),
            )
            .await
            .internal_err()?;
            Ok(Some(dns))
        }
        None => Ok(None),
    }
}

/// `[audit] witness_check = "strict"`: right after the listeners open (the peers are asked
/// over the gateway's own tunnel), each peer that answers is asked for the heads it holds of
/// our log; a disagreement stops the gateway with an error (a peer that cannot be reached is
/// only logged: the periodic self-check will ask again).
pub async fn check_witnesses(fed: &Arc<Federation>) -> CliResult<()> {
    let peers: Vec<TrustDomain> = fed
        .status(SystemTime::now())
        .iter()
        .filter_map(|s| s.trust_domain.parse().ok())
        .collect();
    // All peers at once, under one bound: a slow peer delays the verdict by 10 s at most.
    let mut checks = tokio::task::JoinSet::new();
    for td in peers {
        let fed = fed.clone();
        checks.spawn(async move {
            let checked = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                fed.sync_now(&td).await?;
                fed.check_witness(&td).await
            })
            .await;
            (td, checked)
        });
    }
    while let Some(joined) = checks.join_next().await {
        let Ok((td, checked)) = joined else { continue };
        match checked {
            Ok(Ok(report)) if !report.is_ok() => {
                return Err(crate::exit::CliError::internal(anyhow::anyhow!(
                    "refusing to start (`audit.witness_check = \"strict\"`): the heads `{td}` witnessed of this log disagree with it: {}",
                    report.problems.join("; ")
                )));
            }
            Ok(Ok(_)) => tracing::info!(peer = %td, "witnessed heads agree with the decision log"),
            Ok(Err(e)) => {
                tracing::warn!(peer = %td, error = %e, "witness check at start could not run")
            }
            Err(_) => tracing::warn!(peer = %td, "witness check at start timed out"),
        }
    }
    Ok(())
}
