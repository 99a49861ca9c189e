//! Peer gateway discovery with hickory-resolver: SRV first (`priority`, then `weight`), then
//! A/AAAA. A name written `host:port` gives the port for A/AAAA answers; SRV answers carry
//! their own.

use std::net::SocketAddr;

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};

use crate::error::FederationError;

/// The QUIC port assumed for A/AAAA answers when the name gives none.
pub const DEFAULT_TUNNEL_PORT: u16 = 15443;

/// Resolves a peer's gateway name to addresses, using `nameservers` (the system resolvers
/// when empty).
pub async fn resolve(
    name: &str,
    nameservers: &[SocketAddr],
) -> Result<Vec<SocketAddr>, FederationError> {
    let err = |reason: String| FederationError::Discovery {
        name: name.to_owned(),
        reason,
    };
    let (host, port) = split_port(name).map_err(err)?;
    let resolver = resolver(nameservers).map_err(|e| err(e.to_string()))?;
    let fqdn = if host.ends_with('.') {
        host.to_owned()
    } else {
        format!("{host}.")
    };
    let mut out = Vec::new();
    if let Ok(srv) = resolver.lookup(fqdn.as_str(), RecordType::SRV).await {
        let mut targets: Vec<(u16, std::cmp::Reverse<u16>, String, u16)> = srv
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some((
                    s.priority,
                    std::cmp::Reverse(s.weight),
                    s.target.to_ascii(),
                    s.port,
                )),
                _ => None,
            })
            .collect();
        targets.sort();
        for (_, _, target, port) in targets {
            if let Ok(ips) = resolver.lookup_ip(target.as_str()).await {
                out.extend(ips.iter().map(|ip| SocketAddr::new(ip, port)));
            }
        }
    }
    if out.is_empty() {
        let ips = resolver
            .lookup_ip(fqdn.as_str())
            .await
            .map_err(|e| err(e.to_string()))?;
        out.extend(
            ips.iter()
                .map(|ip| SocketAddr::new(ip, port.unwrap_or(DEFAULT_TUNNEL_PORT))),
        );
    }
    out.dedup();
    if out.is_empty() {
        return Err(err("no SRV, A or AAAA records".into()));
    }
    Ok(out)
}

fn split_port(name: &str) -> Result<(&str, Option<u16>), String> {
    match name.rsplit_once(':') {
        Some((host, port)) => port
            .parse()
            .map(|p| (host, Some(p)))
            .map_err(|_| format!("`{port}` is not a port number")),
        None => Ok((name, None)),
    }
}

fn resolver(nameservers: &[SocketAddr]) -> Result<TokioResolver, hickory_resolver::net::NetError> {
    if nameservers.is_empty() {
        return Resolver::builder_tokio()?.build();
    }
    let servers = nameservers
        .iter()
        .map(|ns| {
            let mut config = NameServerConfig::udp_and_tcp(ns.ip());
            for c in &mut config.connections {
                c.port = ns.port();
            }
            config
        })
        .collect();
    Resolver::builder_with_config(
        ResolverConfig::from_name_servers(servers),
        TokioRuntimeProvider::default(),
    )
    .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_split_from_names() {
        assert_eq!(split_port("gw.west.example"), Ok(("gw.west.example", None)));
        assert_eq!(
            split_port("gw.west.example:4433"),
            Ok(("gw.west.example", Some(4433)))
        );
        assert!(split_port("gw:x").unwrap_err().contains("`x`"));
    }
}
