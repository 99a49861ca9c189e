//! Where a request is going: mesh names parsed from an authority.
//!
//! CONTRACTS.md: `<service>.<namespace>.<cluster>.mesh` pins one cluster,
//! `<service>.<namespace>.mesh` means wherever the service is exported. Between gateways the
//! authority is the canonical `<service>.<namespace>.<cluster>`.

use std::collections::BTreeMap;
use std::fmt;

/// A parsed destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    /// Service name.
    pub service: String,
    /// Namespace.
    pub namespace: String,
    /// The cluster, when the name pins one.
    pub cluster: Option<String>,
}

impl Destination {
    /// `<service>.<namespace>.<cluster>` for a given cluster: the Cedar resource id.
    pub fn in_cluster(&self, cluster: &str) -> String {
        format!("{}.{}.{}", self.service, self.namespace, cluster)
    }

    /// `<service>.<namespace>`.
    pub fn short(&self) -> String {
        format!("{}.{}", self.service, self.namespace)
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cluster {
            Some(c) => write!(f, "{}.{}.{}", self.service, self.namespace, c),
            None => write!(f, "{}.{}", self.service, self.namespace),
        }
    }
}

/// Why an authority names no mesh destination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DestinationError {
    /// The request carried no authority (`Host`, `:authority` or absolute URI).
    #[error("the request names no destination (no `Host`, `:authority` or absolute URI)")]
    Missing,
    /// The authority is not a mesh name and no route matches it.
    #[error(
        "`{0}` is not a mesh name (`<service>.<namespace>[.<cluster>].{1}`) and no route matches it"
    )]
    NotMesh(String, String),
}

/// Parses authorities into destinations.
#[derive(Debug, Clone)]
pub struct Resolver {
    suffix: String,
    routes: BTreeMap<String, String>,
}

impl Resolver {
    /// A resolver for names under `suffix` (e.g. `mesh`) plus explicit routes.
    pub fn new(suffix: &str, routes: BTreeMap<String, String>) -> Self {
        let routes = routes
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        Self {
            suffix: suffix.trim_matches('.').to_ascii_lowercase(),
            routes,
        }
    }

    /// Parses a workload-supplied authority (`host[:port]`).
    pub fn resolve(&self, authority: Option<&str>) -> Result<Destination, DestinationError> {
        let authority = authority
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .ok_or(DestinationError::Missing)?;
        let host = strip_port(authority)
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if let Some(target) = self
            .routes
            .get(&host)
            .or_else(|| self.routes.get(&authority.to_ascii_lowercase()))
        {
            let target = target.to_ascii_lowercase();
            let target = target
                .strip_suffix(&format!(".{}", self.suffix))
                .unwrap_or(&target);
            return parse_labels(target).ok_or_else(|| self.not_mesh(authority));
        }
        let Some(name) = host.strip_suffix(&format!(".{}", self.suffix)) else {
            return Err(self.not_mesh(authority));
        };
        parse_labels(name).ok_or_else(|| self.not_mesh(authority))
    }

    /// Parses the canonical `<service>.<namespace>.<cluster>` used between gateways.
    pub fn canonical(authority: &str) -> Option<Destination> {
        let host = strip_port(authority).to_ascii_lowercase();
        parse_labels(&host).filter(|d| d.cluster.is_some())
    }

    fn not_mesh(&self, authority: &str) -> DestinationError {
        DestinationError::NotMesh(authority.to_owned(), self.suffix.clone())
    }
}

fn strip_port(authority: &str) -> &str {
    // Mesh names are never IPv6 literals; a bracketed literal is returned whole (and fails).
    if authority.starts_with('[') {
        return authority;
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

fn parse_labels(name: &str) -> Option<Destination> {
    let labels: Vec<&str> = name.split('.').collect();
    if !labels.iter().all(|l| valid_label(l)) {
        return None;
    }
    match labels.as_slice() {
        [service, namespace] => Some(Destination {
            service: (*service).to_owned(),
            namespace: (*namespace).to_owned(),
            cluster: None,
        }),
        [service, namespace, cluster] => Some(Destination {
            service: (*service).to_owned(),
            namespace: (*namespace).to_owned(),
            cluster: Some((*cluster).to_owned()),
        }),
        _ => None,
    }
}

/// DNS label rules (RFC 1123): 1–63 of `a-z0-9-`, not starting or ending with `-`.
pub(crate) fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver() -> Resolver {
        let mut routes = BTreeMap::new();
        routes.insert(
            "legacy-orders.internal".to_owned(),
            "orders.shop.west".to_owned(),
        );
        Resolver::new("mesh", routes)
    }

    #[test]
    fn pinned_and_unpinned_names() {
        let r = resolver();
        let d = r.resolve(Some("orders.shop.west.mesh")).unwrap();
        assert_eq!(d.cluster.as_deref(), Some("west"));
        assert_eq!(d.in_cluster("west"), "orders.shop.west");
        let d = r.resolve(Some("Orders.Shop.mesh:443")).unwrap();
        assert_eq!(
            (d.service.as_str(), d.namespace.as_str(), d.cluster),
            ("orders", "shop", None)
        );
        let d = r.resolve(Some("orders.shop.west.mesh.")).unwrap();
        assert_eq!(d.cluster.as_deref(), Some("west"));
    }

    #[test]
    fn explicit_routes() {
        let d = resolver()
            .resolve(Some("legacy-orders.internal:8080"))
            .unwrap();
        assert_eq!(d.to_string(), "orders.shop.west");
    }

    #[test]
    fn rejects_non_mesh_names() {
        let r = resolver();
        assert_eq!(r.resolve(None), Err(DestinationError::Missing));
        assert_eq!(r.resolve(Some("  ")), Err(DestinationError::Missing));
        for bad in [
            "example.com",
            "a.b.c.d.mesh",
            "orders.mesh",
            "-x.shop.mesh",
            "or ders.shop.mesh",
            "[::1]:80",
            "x..mesh",
        ] {
            assert!(
                matches!(r.resolve(Some(bad)), Err(DestinationError::NotMesh(..))),
                "{bad}"
            );
        }
    }

    #[test]
    fn canonical_names_need_a_cluster() {
        assert!(Resolver::canonical("orders.shop.west").is_some());
        assert!(Resolver::canonical("orders.shop").is_none());
    }
}
