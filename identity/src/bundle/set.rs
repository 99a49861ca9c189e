//! [`BundleSet`]: trust bundles by trust domain (the local one and federated peers').

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::TrustBundle;
use crate::id::TrustDomain;

type Map = HashMap<TrustDomain, Arc<TrustBundle>>;

/// Bundles by trust domain. Cheap to clone (clones share the same set) and updatable at
/// runtime: federation swaps bundles in, removing a link removes its bundle at once. Readers
/// (every handshake) take a lock-free snapshot; writers copy the small map and swap it.
#[derive(Clone, Default)]
pub struct BundleSet {
    inner: Arc<ArcSwap<Map>>,
}

impl BundleSet {
    /// An empty set: trusts nobody.
    pub fn new() -> Self {
        Self::default()
    }

    /// A set holding these bundles.
    pub fn from_bundles(bundles: impl IntoIterator<Item = TrustBundle>) -> Self {
        let set = Self::new();
        for b in bundles {
            set.insert(b);
        }
        set
    }

    /// Adds or replaces the bundle of its trust domain.
    pub fn insert(&self, bundle: TrustBundle) {
        let bundle = Arc::new(bundle);
        self.inner.rcu(|map| {
            let mut map = Map::clone(map);
            map.insert(bundle.trust_domain().clone(), bundle.clone());
            map
        });
    }

    /// Removes a trust domain's bundle; its peers are distrusted from the next handshake.
    /// Returns whether one was held.
    pub fn remove(&self, td: &TrustDomain) -> bool {
        let mut removed = false;
        self.inner.rcu(|map| {
            let mut map = Map::clone(map);
            removed = map.remove(td).is_some();
            map
        });
        removed
    }

    /// The bundle of `td`, if held.
    pub fn get(&self, td: &TrustDomain) -> Option<Arc<TrustBundle>> {
        self.inner.load().get(td).cloned()
    }

    /// The trust domains held, sorted.
    pub fn trust_domains(&self) -> Vec<TrustDomain> {
        let mut tds: Vec<_> = self.inner.load().keys().cloned().collect();
        tds.sort();
        tds
    }
}

impl fmt::Debug for BundleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BundleSet")
            .field("trust_domains", &self.trust_domains())
            .finish()
    }
}
