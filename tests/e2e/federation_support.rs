//! Fixtures for federated clusters: a whole cluster (issuer, policies, decision log with a
//! checkpoint signer, federation, gateway) in-process on 127.0.0.1, wired exactly as the
//! `meshgate gateway` command wires it (the production adapters are included below), and
//! restartable on the same state directory and ports.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshgate_federation::{
    Federation, FederationOptions, FederationParts, Link, LocalCluster, MeshDns, rules::Timing,
};
use meshgate_gateway::{
    Gateway, GatewayConfig, GatewayError, GatewayParts, Limits, Listeners, PolicyConfig,
    ServiceConfig,
};
use meshgate_identity::{BundleSet, Issuer, SpiffeId, TrustDomain, X509Svid};
use meshgate_policy::{CheckpointSigner, DecisionLog, PolicyEngine, QuotaLimiter};
use tempfile::TempDir;

use crate::support::{Client, trust_domain};

#[path = "../../src/cli/federation_adapters.rs"]
mod adapters;
use adapters::{FederatedCatalog, FederationMetrics, TunnelTransport};

pub const PERMIT_ALL: &str = r#"
@id("mesh-open")
permit (principal, action, resource);
"#;

/// Fast refresh and backoff for tests; `local_poll` drives bundle pushes.
pub fn fast_options() -> FederationOptions {
    FederationOptions {
        timing: Timing {
            min_refresh: Duration::from_millis(200),
            max_refresh: Duration::from_millis(500),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        },
        local_poll: Duration::from_millis(100),
        ..FederationOptions::default()
    }
}

/// One federated cluster.
pub struct Member {
    pub name: String,
    pub td: TrustDomain,
    pub dir: Arc<TempDir>,
    pub issuer: Arc<Issuer>,
    pub bundles: BundleSet,
    pub log: Arc<DecisionLog>,
    pub fed: Arc<Federation>,
    pub gateway: Gateway,
    pub dns: Option<MeshDns>,
    config: GatewayConfig,
    pub signer_der: Vec<u8>,
    db: sled::Db,
}

/// What a member is made of.
pub struct MemberSpec {
    pub name: &'static str,
    pub services: Vec<ServiceConfig>,
    /// Start refresh loops and pushes (else tests drive `sync_now`).
    pub autostart: bool,
    pub dns: bool,
    pub options: FederationOptions,
    pub limits: Limits,
}

impl MemberSpec {
    pub fn new(name: &'static str, services: Vec<ServiceConfig>) -> Self {
        Self {
            name,
            services,
            autostart: false,
            dns: false,
            options: fast_options(),
            limits: Limits {
                drain_timeout: Duration::from_secs(2),
                ..Limits::default()
            },
        }
    }
}

fn open_db(dir: &Path) -> sled::Db {
    let config = sled::Config::new()
        .path(dir.join("db"))
        .cache_capacity(4 << 20);
    config.open().unwrap()
}

/// Opens the decision log; after a stop, tasks of the stopped gateway may hold it (and its
/// lock) for a moment, so wait until it is released.
async fn open_log(dir: &Path, signer_der: &[u8]) -> DecisionLog {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let signer = CheckpointSigner::from_pkcs8_der(signer_der).unwrap();
        match DecisionLog::open(&dir.join("audit"), Some(signer), Default::default()) {
            Ok(log) => return log,
            Err(meshgate_policy::LogError::Locked(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("decision log not released: {e}"),
        }
    }
}

/// Reopens a state database after a stop: tasks of the stopped gateway may still hold it for
/// a moment (sled allows one opener), so wait until it is released.
pub async fn reopen_db(dir: &Path) -> sled::Db {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let config = sled::Config::new()
            .path(dir.join("db"))
            .cache_capacity(4 << 20);
        match config.open() {
            Ok(db) => return db,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("state database not released: {e}"),
        }
    }
}

impl Member {
    pub async fn start(spec: MemberSpec) -> Member {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let td = trust_domain(spec.name);
        let db = open_db(dir.path());
        std::fs::create_dir_all(dir.path().join("keys")).unwrap();
        Issuer::init(&db, &dir.path().join("keys"), td.clone(), SystemTime::now()).unwrap();
        let policy_dir = dir.path().join("policies");
        std::fs::create_dir_all(&policy_dir).unwrap();
        std::fs::write(policy_dir.join("policy.cedar"), PERMIT_ALL).unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let config = GatewayConfig {
            cluster: spec.name.to_owned(),
            trust_domain: td.to_string(),
            state_dir: dir.path().to_path_buf(),
            mesh_suffix: "mesh".into(),
            listeners: Listeners {
                workload: any,
                workload_local: None,
                tunnel: any,
                admin: any,
                issuer: None,
                dns_names: vec!["localhost".into()],
                ip_addrs: vec!["127.0.0.1".parse().unwrap()],
                dns: spec.dns.then_some(any),
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
            limits: spec.limits,
            identity: Default::default(),
            audit: Default::default(),
            runtime: Default::default(),
            paths: Default::default(),
            telemetry: Default::default(),
            console: Default::default(),
        };
        let (_, der) = CheckpointSigner::generate().unwrap();
        Self::boot(dir, db, config, der, spec.options, spec.autostart).await
    }

    async fn boot(
        dir: Arc<TempDir>,
        db: sled::Db,
        config: GatewayConfig,
        signer_der: Vec<u8>,
        options: FederationOptions,
        autostart: bool,
    ) -> Member {
        let issuer = Arc::new(Issuer::open(&db, &dir.path().join("keys")).unwrap());
        let td = issuer.trust_domain().clone();
        let policy = Arc::new(PolicyEngine::load(&config.policy.dir, None).unwrap());
        let log = Arc::new(open_log(dir.path(), &signer_der).await);
        let bundles = BundleSet::new();
        let local = LocalCluster {
            cluster: config.cluster.clone(),
            trust_domain: td.clone(),
            services: config
                .services
                .iter()
                .map(|s| (format!("{}.{}", s.name, s.namespace), s.export_to.clone()))
                .collect(),
        };
        let fed = Federation::open(
            &db,
            FederationParts {
                local,
                issuer: issuer.clone(),
                log: Some(log.clone()),
                bundles: bundles.clone(),
                links: vec![],
                options,
            },
            SystemTime::now(),
        )
        .unwrap();
        // A restart reuses the ports; the stopped endpoint releases its UDP socket only once
        // its connections have drained, so wait for it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let gateway = loop {
            let started = Gateway::start(GatewayParts {
                config: config.clone(),
                issuer: issuer.clone(),
                bundles: bundles.clone(),
                policy: policy.clone(),
                quotas: QuotaLimiter::new(None, 100_000),
                log: log.clone(),
                catalog: Arc::new(FederatedCatalog(fed.clone())),
                control: Some(Arc::new(FederatedCatalog(fed.clone()))),
                collectors: vec![Box::new(FederationMetrics::new(&fed))],
                quic_reset_secret: None,
            })
            .await;
            match started {
                Ok(g) => break g,
                Err(GatewayError::Bind { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("gateway did not start: {e}"),
            }
        };
        let addrs = gateway.addrs();
        fed.attach(
            Arc::new(TunnelTransport(gateway.control_client())),
            vec![addrs.tunnel],
        );
        if autostart {
            fed.start();
        }
        let dns = match config.listeners.dns {
            Some(bind) => Some(
                MeshDns::start(fed.clone(), bind, "mesh", addrs.workload)
                    .await
                    .unwrap(),
            ),
            None => None,
        };
        Member {
            name: config.cluster.clone(),
            td,
            dir,
            issuer,
            bundles,
            log,
            fed,
            gateway,
            dns,
            config,
            signer_der,
            db,
        }
    }

    /// Stops the gateway and closes the state (the directory stays).
    pub async fn stop(self) -> Stopped {
        let addrs = self.gateway.addrs();
        let mut config = self.config.clone();
        config.listeners.workload = addrs.workload;
        config.listeners.tunnel = addrs.tunnel;
        config.listeners.admin = addrs.admin;
        self.gateway.shutdown().await;
        drop(self.fed);
        drop(self.dns);
        drop(self.log);
        drop(self.issuer);
        drop(self.db);
        Stopped {
            dir: self.dir,
            config,
            signer_der: self.signer_der,
        }
    }

    /// This cluster's link as a peer sees it: its gateway and current bundle.
    pub fn link(&self, priority: u32) -> Link {
        Link {
            cluster: self.name.clone(),
            trust_domain: self.td.to_string(),
            gateways: vec![self.gateway.addrs().tunnel],
            dns: None,
            priority,
            bootstrap_bundle: self.issuer.bundle().to_spiffe_json(),
            services: vec![],
            shared: vec![],
            credentials: vec![],
        }
    }

    pub fn svid(&self, path: &str) -> X509Svid {
        let id = SpiffeId::new(&self.td, path).unwrap();
        self.issuer
            .issue_x509_svid(&id, Duration::from_secs(600), &[], &[], SystemTime::now())
            .unwrap()
    }

    pub fn client(&self, path: &str) -> Client {
        Client::for_gateway(
            &self.issuer,
            self.gateway.addrs().workload,
            Some(&self.svid(path)),
            &[b"http/1.1"],
        )
    }
}

/// A stopped member: its state directory, config (with the ports it had) and log key.
pub struct Stopped {
    pub dir: Arc<TempDir>,
    config: GatewayConfig,
    signer_der: Vec<u8>,
}

impl Stopped {
    /// Starts it again on the same state and ports.
    pub async fn restart(self, options: FederationOptions, autostart: bool) -> Member {
        let db = reopen_db(self.dir.path()).await;
        Member::boot(
            self.dir,
            db,
            self.config,
            self.signer_der,
            options,
            autostart,
        )
        .await
    }
}

/// Links `a` and `b` both ways (each side adds the other's link, with priorities).
pub fn link_pair(a: &Member, a_priority_at_b: u32, b: &Member, b_priority_at_a: u32) {
    let now = SystemTime::now();
    a.fed.add_link(b.link(b_priority_at_a), now).unwrap();
    b.fed.add_link(a.link(a_priority_at_b), now).unwrap();
}

/// Polls `check` until it holds (or fails after a generous deadline).
pub async fn eventually<F: FnMut() -> bool>(what: &str, mut check: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
