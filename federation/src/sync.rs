//! The client side of the control protocol: per-peer refresh loops (bundle, services,
//! endpoints, checkpoint heads), bundle pushes on local change, freshness enforcement.

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use meshgate_identity::{TrustBundle, TrustDomain};
use serde::de::DeserializeOwned;

use crate::control::{
    BUNDLE_PATH, BundleAck, CHECKPOINTS_PATH, CheckpointsDoc, ENDPOINTS_PATH, EndpointsDoc,
    SERVICES_PATH, ServicesDoc, WITNESSED_PATH,
};
use crate::federation::{ControlTransport, Federation};
use crate::link::unix;
use crate::rules;

/// What one successful exchange with a peer gateway brought.
struct Fetched {
    bundle: TrustBundle,
    services: ServicesDoc,
    endpoints: EndpointsDoc,
    checkpoints: CheckpointsDoc,
    rtt: Duration,
}

impl Federation {
    /// Starts the refresh loop of every peer and the local watcher (bundle pushes on CA
    /// rotation, freshness). Call once, after [`Federation::attach`].
    pub fn start(self: &Arc<Self>) {
        if self.runtime.set(tokio::runtime::Handle::current()).is_err() {
            return;
        }
        let tds: Vec<TrustDomain> = self.read().keys().cloned().collect();
        for td in tds {
            self.spawn_peer(&td);
        }
        let weak = Arc::downgrade(self);
        let poll = self.options().local_poll;
        let task = tokio::spawn(watch_local(weak.clone(), poll));
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        tasks.push(task);
        if let Some(heads) = self.log().and_then(|log| log.subscribe_checkpoints()) {
            tasks.push(tokio::spawn(crate::witnessing::push_loop(weak, heads)));
        }
    }

    pub(crate) fn spawn_peer(self: &Arc<Self>, td: &TrustDomain) {
        let mut peers = self.write();
        let (Some(peer), Some(runtime)) = (peers.get_mut(td), self.runtime.get()) else {
            return;
        };
        if let Some(t) = peer.task.take() {
            t.abort();
        }
        let wake = peer.wake.clone();
        peer.task = Some(runtime.spawn(refresh_loop(Arc::downgrade(self), td.clone(), wake)));
    }

    /// Syncs with the peer `td` now: fetches its bundle, exported services, endpoints and
    /// checkpoint heads from the first gateway that answers. Failures are recorded in the
    /// peer's state (and make it rank after healthy peers).
    pub async fn sync_now(&self, td: &TrustDomain) -> Result<(), String> {
        let result = self.try_sync(td).await;
        let now = SystemTime::now();
        let mut peers = self.write();
        let Some(peer) = peers.get_mut(td) else {
            return Err(format!("no link for `{td}`"));
        };
        match &result {
            Ok(()) => {}
            Err(e) => {
                peer.failures = peer.failures.saturating_add(1);
                if peer.healthy {
                    tracing::warn!(trust_domain = %td, error = %e, "federation sync failed; peer marked unhealthy");
                }
                peer.healthy = false;
                peer.state.last_error = Some(e.clone());
                let _ = self.store().put_peer(td.as_str(), &peer.state);
            }
        }
        drop(peers);
        if result.is_err() {
            self.changed();
            self.enforce_freshness(now);
        }
        result
    }

    async fn try_sync(&self, td: &TrustDomain) -> Result<(), String> {
        let transport = self
            .transport
            .get()
            .cloned()
            .ok_or("not attached to a gateway")?;
        let (link, closed, known) = {
            let peers = self.read();
            let p = peers.get(td).ok_or_else(|| format!("no link for `{td}`"))?;
            (p.link.clone(), p.closed, p.addresses())
        };
        if closed {
            return Err("the peer's cached bundle expired; the link is failed closed".into());
        }
        let mut addrs = known;
        if let Some(name) = &link.dns {
            match crate::discovery::resolve(name, &self.options().nameservers).await {
                Ok(found) => {
                    if let Some(p) = self.write().get_mut(td) {
                        p.discovered = found.clone();
                    }
                    for a in found {
                        if !addrs.contains(&a) {
                            addrs.insert(0, a);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(trust_domain = %td, error = %e, "gateway discovery failed")
                }
            }
        }
        if addrs.is_empty() {
            return Err("no gateway address known".into());
        }
        let mut last = String::new();
        for addr in addrs {
            match fetch(transport.as_ref(), addr, td).await {
                Ok(f) => {
                    self.apply(td, f, SystemTime::now());
                    return Ok(());
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(last)
    }

    fn apply(&self, td: &TrustDomain, f: Fetched, now: SystemTime) {
        let ack = self.offer_bundle(td, f.bundle, now);
        if let Some(reason) = ack.reason.filter(|_| !ack.accepted) {
            tracing::debug!(trust_domain = %td, %reason, "fetched bundle not taken");
        }
        self.witness_heads(td, &f.checkpoints.checkpoints);
        let mut peers = self.write();
        let Some(p) = peers.get_mut(td) else { return };
        let services = imported_services(td, f.services.services);
        let catalog_changed = p.state.imported != services || !p.healthy;
        p.state.imported = services;
        p.state.endpoints = peer_endpoints(td, f.endpoints.gateways);
        p.state.last_sync = Some(unix(now));
        p.state.last_error = None;
        p.healthy = true;
        p.failures = 0;
        p.rtt = Some(rules::smooth_rtt(p.rtt, f.rtt));
        if let Err(e) = self.store().put_peer(td.as_str(), &p.state) {
            tracing::warn!(trust_domain = %td, error = %e, "cannot persist peer state");
        }
        drop(peers);
        if catalog_changed {
            self.changed();
        }
    }

    /// Pushes our current bundle to every peer that has not acknowledged its sequence.
    /// Returns how many peers now hold it.
    pub async fn push_bundle(&self) -> usize {
        let Some(transport) = self.transport.get().cloned() else {
            return 0;
        };
        let bundle = self.local_bundle();
        self.bundles().insert(bundle.clone());
        let body = Bytes::from(bundle.to_spiffe_json());
        let targets: Vec<(TrustDomain, Vec<SocketAddr>, Option<u64>)> = self
            .read()
            .iter()
            .filter(|(_, p)| !p.closed)
            .map(|(td, p)| (td.clone(), p.addresses(), p.state.acked_sequence))
            .collect();
        let mut holding = 0;
        for (td, addrs, acked) in targets {
            if acked == Some(bundle.sequence()) {
                holding += 1;
                continue;
            }
            for addr in addrs {
                let req = request(&td, Method::POST, BUNDLE_PATH, body.clone());
                let ack: Result<BundleAck, String> = match transport.send(addr, &td, req).await {
                    Ok(resp) => serde_json::from_slice(resp.body()).map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                };
                match ack {
                    Ok(ack) if ack.sequence >= bundle.sequence() => {
                        tracing::info!(trust_domain = %td, sequence = ack.sequence, "peer holds our bundle");
                        if let Some(p) = self.write().get_mut(&td) {
                            p.state.acked_sequence = Some(ack.sequence);
                            let _ = self.store().put_peer(td.as_str(), &p.state);
                        }
                        holding += 1;
                        break;
                    }
                    Ok(ack) => {
                        tracing::warn!(trust_domain = %td, reason = ?ack.reason, "peer did not take our bundle");
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(trust_domain = %td, %addr, error = %e, "bundle push failed")
                    }
                }
            }
        }
        holding
    }

    /// Fetches the heads of our own log that the peer `td` holds as witness.
    pub async fn fetch_witnessed(&self, td: &TrustDomain) -> Result<CheckpointsDoc, String> {
        let transport = self
            .transport
            .get()
            .cloned()
            .ok_or("not attached to a gateway")?;
        let addrs = self
            .read()
            .get(td)
            .map(|p| p.addresses())
            .unwrap_or_default();
        let mut last = format!("no gateway address known for `{td}`");
        for addr in addrs {
            match get_json(transport.as_ref(), addr, td, WITNESSED_PATH).await {
                Ok(doc) => return Ok(doc),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn next_delay(&self, td: &TrustDomain) -> Duration {
        let peers = self.read();
        let (failures, hint) = peers.get(td).map_or((1, None), |p| {
            (
                p.failures,
                self.bundles().get(td).and_then(|b| b.refresh_hint()),
            )
        });
        rules::next_delay(
            &self.options().timing,
            failures,
            hint,
            rand::random::<f64>(),
        )
    }
}

async fn refresh_loop(fed: Weak<Federation>, td: TrustDomain, wake: Arc<tokio::sync::Notify>) {
    loop {
        let Some(f) = fed.upgrade() else { return };
        // After a sync, now and then: do the heads this peer holds of our log agree with it?
        if f.sync_now(&td).await.is_ok()
            && f.self_check_due(&td)
            && let Err(e) = f.check_witness(&td).await
        {
            tracing::debug!(peer = %td, error = %e, "witness self-check could not run");
        }
        let delay = f.next_delay(&td);
        drop(f);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = wake.notified() => {}
        }
    }
}

/// Unacknowledged pushes are retried every this many polls.
const RETRY_PUSH_EVERY: u64 = 10;

/// Watches the local bundle (CA rotation: push before the new root signs) and judges peers'
/// freshness.
async fn watch_local(fed: Weak<Federation>, poll: Duration) {
    let mut pushed = None;
    let mut ticks = 0u64;
    let mut tick = tokio::time::interval(poll);
    loop {
        tick.tick().await;
        ticks += 1;
        let Some(f) = fed.upgrade() else { return };
        let seq = f.local_bundle().sequence();
        let all_acked = f
            .read()
            .values()
            .filter(|p| !p.closed)
            .all(|p| p.state.acked_sequence == Some(seq));
        if pushed != Some(seq) || (!all_acked && ticks.is_multiple_of(RETRY_PUSH_EVERY)) {
            let holding = f.push_bundle().await;
            if pushed != Some(seq) {
                tracing::info!(
                    sequence = seq,
                    peers = holding,
                    "local bundle pushed to peers"
                );
            }
            pushed = Some(seq);
        }
        f.enforce_freshness(SystemTime::now());
    }
}

/// A control request to the gateway of `td` (HTTP/3 needs an absolute URI; the authority
/// names the peer's trust domain).
pub(crate) fn request(td: &TrustDomain, method: Method, path: &str, body: Bytes) -> Request<Bytes> {
    let mut req = Request::new(body);
    *req.method_mut() = method;
    if let Ok(uri) = format!("https://{td}{path}").parse() {
        *req.uri_mut() = uri;
    }
    req
}

async fn get_json<T: DeserializeOwned>(
    t: &dyn ControlTransport,
    addr: SocketAddr,
    td: &TrustDomain,
    path: &str,
) -> Result<T, String> {
    let resp = t
        .send(addr, td, request(td, Method::GET, path, Bytes::new()))
        .await?;
    if resp.status() != StatusCode::OK {
        return Err(format!(
            "`{path}` answered {}: {}",
            resp.status(),
            String::from_utf8_lossy(resp.body())
        ));
    }
    serde_json::from_slice(resp.body()).map_err(|e| format!("`{path}`: {e}"))
}

async fn fetch(
    t: &dyn ControlTransport,
    addr: SocketAddr,
    td: &TrustDomain,
) -> Result<Fetched, String> {
    let started = Instant::now();
    let resp = t
        .send(
            addr,
            td,
            request(td, Method::GET, BUNDLE_PATH, Bytes::new()),
        )
        .await?;
    let rtt = started.elapsed();
    if resp.status() != StatusCode::OK {
        return Err(format!("`{BUNDLE_PATH}` answered {}", resp.status()));
    }
    let text = std::str::from_utf8(resp.body()).map_err(|_| "bundle is not UTF-8".to_owned())?;
    let bundle = TrustBundle::from_spiffe_json(text, td).map_err(|e| e.to_string())?;
    Ok(Fetched {
        bundle,
        services: get_json(t, addr, td, SERVICES_PATH).await?,
        endpoints: get_json(t, addr, td, ENDPOINTS_PATH).await?,
        checkpoints: get_json(t, addr, td, CHECKPOINTS_PATH).await?,
        rtt,
    })
}
/// The services a peer's catalog brings in that can be served; each name skipped is logged
/// (a bad name must never break the mesh DNS zone or the next start).
pub(crate) fn imported_services(td: &TrustDomain, names: Vec<String>) -> Vec<String> {
    let (good, bad) = crate::rules::servable_services(names);
    for name in bad.iter().take(16) {
        tracing::warn!(trust_domain = %td, service = %name.escape_debug(), "peer's service name skipped: not a servable `<service>.<namespace>` or over the limit");
    }
    if bad.len() > 16 {
        tracing::warn!(trust_domain = %td, skipped = bad.len(), "more service names of the peer skipped");
    }
    good
}

/// Most gateway addresses taken from one peer's endpoints document (a peer is a few
/// gateways; a longer list only costs every request to it).
pub(crate) const MAX_PEER_ENDPOINTS: usize = 64;

/// The addresses a peer advertises for its gateways, as used: unspecified addresses and
/// repeats dropped, at most [`MAX_PEER_ENDPOINTS`] kept (the rest logged).
fn peer_endpoints(
    td: &TrustDomain,
    advertised: Vec<std::net::SocketAddr>,
) -> Vec<std::net::SocketAddr> {
    let mut seen = std::collections::HashSet::new();
    let total = advertised.len();
    let kept: Vec<_> = advertised
        .into_iter()
        .filter(|a| !a.ip().is_unspecified() && a.port() != 0 && seen.insert(*a))
        .take(MAX_PEER_ENDPOINTS)
        .collect();
    if kept.len() < total {
        tracing::warn!(trust_domain = %td, advertised = total, kept = kept.len(), "peer advertised unusable, repeated or too many gateway addresses; the rest are ignored");
    }
    kept
}

#[cfg(test)]
mod endpoint_tests {
    use super::*;

    #[test]
    fn a_peer_cannot_advertise_endless_gateways() {
        let td: TrustDomain = "b.example".parse().unwrap();
        let many: Vec<std::net::SocketAddr> = (0..10_000u32)
            .map(|i| std::net::SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 443)))
            .chain([
                "0.0.0.0:443".parse().unwrap(),
                "10.0.0.0:443".parse().unwrap(),
            ])
            .collect();
        let kept = peer_endpoints(&td, many);
        assert_eq!(kept.len(), MAX_PEER_ENDPOINTS);
        assert_eq!(kept[0], "10.0.0.0:443".parse().unwrap());
        let odd = vec![
            "0.0.0.0:443".parse().unwrap(),
            "10.0.0.1:0".parse().unwrap(),
            "10.0.0.1:443".parse().unwrap(),
            "10.0.0.1:443".parse().unwrap(),
        ];
        assert_eq!(
            peer_endpoints(&td, odd),
            vec!["10.0.0.1:443".parse().unwrap()]
        );
    }
}
