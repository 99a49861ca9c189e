//! [`Federation`]: the links of one cluster, the last known state of every peer, and the
//! federated catalog the gateway routes by.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use meshgate_identity::{BundleSet, Issuer, SpiffeId, TrustBundle, TrustDomain};
use meshgate_policy::DecisionLog;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::control::{BundleAck, ServicesDoc};
use crate::error::FederationError;
use crate::link::{Link, PeerState, from_unix, unix};
use crate::rules::{self, Candidate, Freshness, Timing};
use crate::store::Store;

/// Sends control requests to a peer gateway over the tunnel and closes connections with a
/// trust domain. The root crate implements it over the gateway's `ControlClient`.
pub trait ControlTransport: Send + Sync + std::fmt::Debug {
    /// Sends `request` to the gateway at `addr`, which must present
    /// `spiffe://<td>/meshgate/gateway`; returns the whole response.
    fn send(
        &self,
        addr: SocketAddr,
        td: &TrustDomain,
        request: http::Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<http::Response<Bytes>, String>> + Send + '_>>;

    /// Closes every open connection with `td`'s gateways.
    fn disconnect(&self, td: &TrustDomain);
}

/// This cluster, as federation sees it.
#[derive(Debug, Clone)]
pub struct LocalCluster {
    /// The cluster name.
    pub cluster: String,
    /// Its trust domain.
    pub trust_domain: TrustDomain,
    /// Local services (`service.namespace`) and the peer clusters each is exported to
    /// (`"*"` for every peer).
    pub services: BTreeMap<String, Vec<String>>,
}

/// Tuning of refresh, staleness and discovery.
#[derive(Debug, Clone)]
pub struct FederationOptions {
    /// Refresh window and backoff.
    pub timing: Timing,
    /// Cached state not confirmed for this long is reported stale (still served).
    pub stale_after: Duration,
    /// Cached state not confirmed for this long is expired: the peer fails closed.
    pub max_stale: Duration,
    /// How often the local bundle is checked for changes (CA rotation) and freshness judged.
    pub local_poll: Duration,
    /// Name servers for gateway discovery; the system's resolvers when empty.
    pub nameservers: Vec<SocketAddr>,
}

impl Default for FederationOptions {
    fn default() -> Self {
        Self {
            timing: Timing {
                min_refresh: Duration::from_secs(5),
                max_refresh: Duration::from_secs(60),
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(60),
            },
            stale_after: Duration::from_secs(180),
            max_stale: Duration::from_secs(7 * 24 * 3600),
            local_poll: Duration::from_secs(1),
            nameservers: Vec::new(),
        }
    }
}

/// A route for a destination, best first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This cluster's own upstreams.
    Local,
    /// A peer cluster's gateways.
    Peer {
        /// The peer's cluster name.
        cluster: String,
        /// The peer's trust domain.
        trust_domain: TrustDomain,
        /// Its gateway addresses, preferred first.
        gateways: Vec<SocketAddr>,
        /// Whether the caller's credentials (`Authorization`, `Cookie`) go to it.
        credentials: bool,
    },
}

/// What a federation is opened with.
#[derive(Debug)]
pub struct FederationParts {
    /// This cluster.
    pub local: LocalCluster,
    /// The local issuer (our bundle, CA rotation).
    pub issuer: Arc<Issuer>,
    /// The local decision log, whose checkpoints peers witness.
    pub log: Option<Arc<DecisionLog>>,
    /// The bundle set shared with the gateway's verifiers.
    pub bundles: BundleSet,
    /// Links from the config file (re-asserted at every start).
    pub links: Vec<Link>,
    /// Tuning.
    pub options: FederationOptions,
}

/// Runtime state of one peer.
#[derive(Debug)]
pub(crate) struct Peer {
    pub link: Link,
    pub state: PeerState,
    pub healthy: bool,
    pub rtt: Option<Duration>,
    pub failures: u32,
    /// The cached bundle expired: the peer is distrusted until the link is added again.
    pub closed: bool,
    pub discovered: Vec<SocketAddr>,
    pub wake: Arc<Notify>,
    pub task: Option<JoinHandle<()>>,
    /// The last comparison of our log with the heads this peer holds of it.
    pub self_check: crate::witnessing::SelfCheck,
}

/// The federation of one cluster: links, peer state, catalog, control protocol.
#[derive(Debug)]
pub struct Federation {
    local: LocalCluster,
    issuer: Arc<Issuer>,
    log: Option<Arc<DecisionLog>>,
    bundles: BundleSet,
    store: Store,
    options: FederationOptions,
    peers: RwLock<BTreeMap<TrustDomain, Peer>>,
    pub(crate) transport: OnceLock<Arc<dyn ControlTransport>>,
    advertised: RwLock<Vec<SocketAddr>>,
    changes: watch::Sender<u64>,
    pub(crate) runtime: OnceLock<tokio::runtime::Handle>,
    pub(crate) tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Federation {
    /// Opens the federation over the state's sled database: stores the links given by the
    /// config (they are re-asserted at every start), loads every link and the last known
    /// peer state, and puts each peer's bundle (the cached one, or the bootstrap one when it
    /// is newer) into `bundles` — unless the cached state has expired, then the peer fails
    /// closed from the start.
    pub fn open(
        db: &sled::Db,
        parts: FederationParts,
        now: SystemTime,
    ) -> Result<Arc<Self>, FederationError> {
        let FederationParts {
            local,
            issuer,
            log,
            bundles,
            links: config_links,
            options,
        } = parts;
        let store = Store::open(db)?;
        // A config link that is new or differs from the stored one is the operator speaking,
        // as with `federation add`: its bundle is authoritative over what was cached.
        let mut from_config = BTreeSet::new();
        let mut named = BTreeSet::new();
        for link in &config_links {
            let mut link = link.clone();
            let (td, _) = link.normalize()?;
            if td == local.trust_domain {
                return Err(FederationError::SelfLink(link.trust_domain.clone()));
            }
            named.insert(link.trust_domain.clone());
            if store.links()?.get(&link.trust_domain) != Some(&link) {
                store.put_link(&link)?;
                from_config.insert(link.trust_domain.clone());
            }
        }
        // The config file is the truth for the links it names: one it named at the last
        // start and names no more is gone (a `[[peers]]` block deleted stays deleted).
        let mut dropped = Vec::new();
        for td in store.config_links()? {
            if !named.contains(&td) && store.remove_link(&td)? {
                tracing::info!(trust_domain = %td, "federation link removed: no longer in the config file");
                dropped.push(td);
            }
        }
        store.set_config_links(&named)?;
        bundles.insert(issuer.bundle());
        let fed = Arc::new(Self {
            local,
            issuer,
            log,
            bundles,
            store,
            options,
            peers: RwLock::new(BTreeMap::new()),
            transport: OnceLock::new(),
            advertised: RwLock::new(Vec::new()),
            changes: watch::Sender::new(0),
            runtime: OnceLock::new(),
            tasks: Mutex::new(Vec::new()),
        });
        for td in dropped {
            fed.audit(
                "config file",
                &format!("federation link `{td}` removed: no longer in the config file"),
                now,
            );
        }
        let states = fed.store.peers()?;
        for (td, link) in fed.store.links()? {
            let state = states.get(&td).cloned().unwrap_or_default();
            let operator = from_config.contains(&td);
            let cluster = link.cluster.clone();
            let installed = fed.install(link, state, now, operator)?;
            if operator {
                fed.audit(
                    "config file",
                    &format!("federation link `{installed}` (cluster `{cluster}`) set from the config file, its bundle taken as given"),
                    now,
                );
            }
        }
        Ok(fed)
    }

    /// Adds (or replaces) a link at run time; a replaced link keeps its learned state but
    /// takes a newer bootstrap bundle, and a peer that failed closed is trusted again.
    pub fn add_link(
        self: &Arc<Self>,
        mut link: Link,
        now: SystemTime,
    ) -> Result<(), FederationError> {
        let (td, _) = link.normalize()?;
        if td == self.local.trust_domain {
            return Err(FederationError::SelfLink(link.trust_domain));
        }
        if self
            .read()
            .iter()
            .any(|(td, p)| p.link.cluster == link.cluster && td.as_str() != link.trust_domain)
        {
            return Err(FederationError::Link {
                cluster: link.cluster,
                reason: "another link already uses this cluster name".into(),
            });
        }
        self.store.put_link(&link)?;
        let mut state = self
            .store
            .peers()?
            .remove(&link.trust_domain)
            .unwrap_or_default();
        // An operator adding the link again vouches for the bundle it names: it replaces
        // whatever was cached, even with a higher sequence (a compromised peer's push).
        state.confirmed_at = Some(unix(now));
        let td = self.install(link, state, now, true)?;
        // Connections made under the trust being replaced (a compromised peer's rogue root)
        // must not outlive it: close them all; the genuine peer redials under the new bundle.
        if let Some(t) = self.transport.get() {
            t.disconnect(&td);
        }
        if self.runtime.get().is_some() {
            self.spawn_peer(&td);
        }
        tracing::info!(trust_domain = %td, "federation link added");
        Ok(())
    }

    /// Removes a link: the peer's bundle leaves the trust set (new handshakes fail), open
    /// connections with it are closed, its catalog entries and cached state are forgotten.
    pub fn remove_link(&self, td: &TrustDomain) -> Result<bool, FederationError> {
        self.bundles.remove(td);
        if let Some(t) = self.transport.get() {
            t.disconnect(td);
        }
        let removed = self.write().remove(td);
        if let Some(task) = removed.as_ref().and_then(|p| p.task.as_ref()) {
            task.abort();
        }
        let existed = self.store.remove_link(td.as_str())? || removed.is_some();
        if self.store.config_links()?.contains(td.as_str()) {
            tracing::warn!(trust_domain = %td, "the link is named in the config file: it comes back at the next start unless its [[peers]] entry is removed");
        }
        self.changed();
        tracing::info!(trust_domain = %td, "federation link removed; peer distrusted");
        Ok(existed)
    }

    /// Puts a link and its state in place; returns its trust domain. With `operator` (the
    /// operator just gave the link: `federation add`, or a changed config entry) its bundle
    /// replaces the cached one; otherwise the cached one is kept while it is at least as new.
    fn install(
        &self,
        link: Link,
        mut state: PeerState,
        now: SystemTime,
        operator: bool,
    ) -> Result<TrustDomain, FederationError> {
        let (td, bootstrap) = link.validate()?;
        let cached = state.cached_bundle(&td);
        let bundle = match cached {
            Some(c) if !operator && c.sequence() >= bootstrap.sequence() => c,
            _ => {
                state.set_bundle(&bootstrap, now);
                bootstrap
            }
        };
        if state.last_sync.is_none() && state.imported.is_empty() {
            state.imported = link.services.clone();
        }
        // Cached state may predate the check where names enter (or the sled file was
        // edited): what cannot be served is dropped here too, never failing the start.
        state.imported = crate::sync::imported_services(&td, std::mem::take(&mut state.imported));
        let closed = self.judge(&state, now) == Freshness::Expired;
        if closed {
            self.bundles.remove(&td);
            tracing::error!(trust_domain = %td, "cached bundle of the peer expired; failing closed for it (add the link again with a fresh bundle)");
        } else {
            self.bundles.insert(bundle);
        }
        self.store.put_peer(td.as_str(), &state)?;
        let mut peers = self.write();
        let old = peers.remove(&td);
        if let Some(task) = old.as_ref().and_then(|p| p.task.as_ref()) {
            task.abort();
        }
        peers.insert(
            td.clone(),
            Peer {
                link,
                state,
                healthy: !closed,
                rtt: None,
                failures: 0,
                closed,
                discovered: Vec::new(),
                wake: Arc::new(Notify::new()),
                task: None,
                self_check: Default::default(),
            },
        );
        drop(peers);
        self.changed();
        Ok(td)
    }

    /// Routes for `service.namespace` (pinned to `cluster` when given), best first: the local
    /// cluster if it has the service, then usable peers that export it to us, ranked. An
    /// unpinned name is served only by peers this side shares it with (`Link::shared`): a
    /// peer exporting a name cannot take its traffic by saying so.
    pub fn routes(&self, service: &str, namespace: &str, cluster: Option<&str>) -> Vec<Route> {
        let short = format!("{service}.{namespace}");
        let wants = |c: &str| cluster.is_none_or(|w| w == c);
        let mut routes = Vec::new();
        if wants(&self.local.cluster) && self.local.services.contains_key(&short) {
            routes.push(Route::Local);
        }
        let peers = self.read();
        let serving: Vec<(&TrustDomain, &Peer)> = peers
            .iter()
            .filter(|(_, p)| {
                !p.closed
                    && wants(&p.link.cluster)
                    && (cluster.is_some() || p.link.shared.contains(&short))
                    && p.state.imported.contains(&short)
            })
            .collect();
        let candidates: Vec<Candidate> = serving
            .iter()
            .map(|(_, p)| Candidate {
                cluster: p.link.cluster.clone(),
                priority: p.link.priority,
                healthy: p.healthy,
                rtt: p.rtt,
            })
            .collect();
        for i in rules::rank(&candidates) {
            let (td, p) = serving[i];
            routes.push(Route::Peer {
                cluster: p.link.cluster.clone(),
                trust_domain: td.clone(),
                gateways: p.addresses(),
                credentials: p.link.credentials.contains(&short),
            });
        }
        routes
    }

    /// Whether local `service.namespace` is exported to the peer `td` (linked, not closed).
    pub fn exported_to(&self, service: &str, namespace: &str, td: &TrustDomain) -> bool {
        let peers = self.read();
        let Some(peer) = peers.get(td).filter(|p| !p.closed) else {
            return false;
        };
        self.local
            .services
            .get(&format!("{service}.{namespace}"))
            .is_some_and(|to| to.iter().any(|c| c == "*" || *c == peer.link.cluster))
    }

    /// The cluster name of a linked trust domain.
    pub fn cluster_of(&self, td: &TrustDomain) -> Option<String> {
        self.read().get(td).map(|p| p.link.cluster.clone())
    }

    /// Mesh names served to local workloads, relative to the zone: `svc.ns.cluster` for
    /// each local and imported service, and `svc.ns` wherever it is served.
    pub fn visible_names(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for short in self.local.services.keys() {
            names.insert(format!("{short}.{}", self.local.cluster));
            names.insert(short.clone());
        }
        for p in self.read().values().filter(|p| !p.closed) {
            for short in &p.state.imported {
                names.insert(format!("{short}.{}", p.link.cluster));
                if p.link.shared.contains(short) {
                    names.insert(short.clone());
                }
            }
        }
        names
    }

    /// The checkpoint heads of `td`'s decision log held here as its witness.
    pub fn witnessed(&self, td: &str) -> Result<Vec<meshgate_policy::Checkpoint>, FederationError> {
        self.store.witnessed(td)
    }

    /// The latest `n` checkpoint heads of `td`'s decision log held here, oldest first
    /// (without reading the whole history).
    pub fn witnessed_recent(
        &self,
        td: &str,
        n: usize,
    ) -> Result<Vec<meshgate_policy::Checkpoint>, FederationError> {
        self.store.witnessed_recent(td, n)
    }

    /// Notified (the counter grows) whenever the catalog changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether `td` has a usable link.
    pub fn is_linked(&self, td: &TrustDomain) -> bool {
        self.read().get(td).is_some_and(|p| !p.closed)
    }

    /// This cluster.
    pub fn local(&self) -> &LocalCluster {
        &self.local
    }

    /// The local trust domain's current bundle.
    pub fn local_bundle(&self) -> TrustBundle {
        self.issuer.bundle()
    }

    /// The bundles held (shared with the gateway's verifiers).
    pub fn bundles(&self) -> &BundleSet {
        &self.bundles
    }

    /// Our gateway addresses, as told to peers.
    pub fn advertised(&self) -> Vec<SocketAddr> {
        self.advertised
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sets the transport (after the gateway started) and the addresses peers are told.
    pub fn attach(&self, transport: Arc<dyn ControlTransport>, advertised: Vec<SocketAddr>) {
        let _ = self.transport.set(transport);
        *self
            .advertised
            .write()
            .unwrap_or_else(PoisonError::into_inner) = advertised;
    }

    /// What we export to the peer `td`, recorded in its state for `federation status`.
    pub(crate) fn services_for(&self, td: &TrustDomain) -> ServicesDoc {
        let services: Vec<String> = self
            .local
            .services
            .keys()
            .filter(|s| {
                let (svc, ns) = s.split_once('.').unwrap_or((s.as_str(), ""));
                self.exported_to(svc, ns, td)
            })
            .cloned()
            .collect();
        let mut peers = self.write();
        if let Some(p) = peers.get_mut(td)
            && p.state.exported != services
        {
            p.state.exported = services.clone();
            if let Err(e) = self.store.put_peer(td.as_str(), &p.state) {
                tracing::warn!(trust_domain = %td, error = %e, "cannot persist peer state");
            }
        }
        ServicesDoc {
            cluster: self.local.cluster.clone(),
            services,
        }
    }

    /// A bundle from the authenticated gateway of `td` (pushed or fetched): taken only under
    /// [`rules::accept_bundle`]; a bundle equal to the held one confirms it.
    pub(crate) fn offer_bundle(
        &self,
        td: &TrustDomain,
        bundle: TrustBundle,
        now: SystemTime,
    ) -> BundleAck {
        let mut peers = self.write();
        let Some(peer) = peers.get_mut(td).filter(|p| !p.closed) else {
            return BundleAck {
                accepted: false,
                sequence: 0,
                reason: Some(format!("`{td}` is not linked")),
            };
        };
        let held = self.bundles.get(td);
        let mut event = None;
        let ack = match rules::accept_bundle(td, held.as_deref(), &bundle) {
            Ok(()) => {
                tracing::info!(trust_domain = %td, sequence = bundle.sequence(), "peer bundle updated");
                event = Some(format!(
                    "federation bundle of `{td}` accepted: sequence {} (held {})",
                    bundle.sequence(),
                    held.as_ref().map_or(0, |h| h.sequence()),
                ));
                peer.state.set_bundle(&bundle, now);
                self.bundles.insert(bundle);
                BundleAck {
                    accepted: true,
                    sequence: peer.state.bundle_sequence,
                    reason: None,
                }
            }
            Err(refusal) => {
                if held
                    .as_ref()
                    .is_some_and(|h| h.sequence() == bundle.sequence())
                {
                    peer.state.confirmed_at = Some(unix(now));
                } else {
                    tracing::warn!(trust_domain = %td, reason = %refusal, "peer bundle refused");
                }
                BundleAck {
                    accepted: false,
                    sequence: held.map_or(0, |h| h.sequence()),
                    reason: Some(refusal.to_string()),
                }
            }
        };
        if let Err(e) = self.store.put_peer(td.as_str(), &peer.state) {
            tracing::warn!(trust_domain = %td, error = %e, "cannot persist peer state");
        }
        drop(peers);
        if let Some(what) = event {
            self.audit(SpiffeId::gateway(td).as_str(), &what, now);
        }
        ack
    }

    /// Records a change of who is trusted as an admin event in the decision log (who, what,
    /// when). A failure to record is logged; the change itself has happened.
    pub(crate) fn audit(&self, who: &str, what: &str, now: SystemTime) {
        if let Some(log) = &self.log
            && let Err(e) = log.append_admin_event(who, what, now)
        {
            tracing::error!(error = %e, what, "cannot record a federation change in the decision log");
        }
    }

    /// Judges every peer's cached state at `now`; expired peers fail closed (their bundle
    /// leaves the trust set, their connections close). Returns the peers closed now.
    pub fn enforce_freshness(&self, now: SystemTime) -> Vec<TrustDomain> {
        let mut closed = Vec::new();
        let mut peers = self.write();
        for (td, p) in peers.iter_mut().filter(|(_, p)| !p.closed) {
            if self.judge(&p.state, now) == Freshness::Expired {
                p.closed = true;
                p.healthy = false;
                closed.push(td.clone());
            }
        }
        drop(peers);
        for td in &closed {
            self.bundles.remove(td);
            if let Some(t) = self.transport.get() {
                t.disconnect(td);
            }
            tracing::error!(trust_domain = %td, "cached bundle of the peer expired while it was unreachable; failing closed for it");
            self.audit(
                "meshgate",
                &format!("federation link `{td}` failed closed: its cached bundle expired"),
                now,
            );
        }
        if !closed.is_empty() {
            self.changed();
        }
        closed
    }

    pub(crate) fn judge(&self, state: &PeerState, now: SystemTime) -> Freshness {
        rules::freshness(
            now,
            state.confirmed_at.map_or(now, from_unix),
            state.bundle_not_after.map(from_unix),
            self.options.stale_after,
            self.options.max_stale,
        )
    }

    pub(crate) fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, BTreeMap<TrustDomain, Peer>> {
        self.peers.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<TrustDomain, Peer>> {
        self.peers.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    pub(crate) fn log(&self) -> Option<&Arc<DecisionLog>> {
        self.log.as_ref()
    }

    pub(crate) fn options(&self) -> &FederationOptions {
        &self.options
    }
}

impl Peer {
    /// Gateway addresses to try: configured, then discovered, then advertised by the peer.
    pub(crate) fn addresses(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for a in self
            .link
            .gateways
            .iter()
            .chain(&self.discovered)
            .chain(&self.state.endpoints)
        {
            if !out.contains(a) && !a.ip().is_unspecified() {
                out.push(*a);
            }
        }
        out
    }
}

impl Drop for Federation {
    fn drop(&mut self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            task.abort();
        }
        for p in self
            .peers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            if let Some(t) = &p.task {
                t.abort();
            }
        }
    }
}

#[cfg(test)]
#[path = "federation_tests.rs"]
mod tests;
