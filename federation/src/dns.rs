//! The mesh DNS: an authoritative zone (default `mesh.`) served by hickory-server, built
//! from the federated catalog and rebuilt whenever it changes (no restart).
//!
//! For every service visible to this cluster — local ones, and those peers export to it —
//! `<service>.<namespace>.<cluster>.<zone>` and `<service>.<namespace>.<zone>` answer:
//! - A or AAAA: the local gateway's workload listener address;
//! - SRV `0 0 <port> gateway.<zone>`: the listener's port (at the same owner name);
//!
//! `gateway.<zone>` answers the listener's address. Every other name is NXDOMAIN, with the
//! zone's SOA (negative TTL 5 s, so catalog changes show quickly).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hickory_server::Server;
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::proto::rr::rdata::{A, AAAA, NS, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

use crate::error::FederationError;
use crate::federation::Federation;

/// TTL of mesh answers, seconds: short, since the catalog follows the federation.
pub const MESH_TTL: u32 = 5;

type Zone = InMemoryZoneHandler<TokioRuntimeProvider>;

/// A running mesh DNS server (UDP and TCP on the same port). Stops when dropped.
#[derive(Debug)]
pub struct MeshDns {
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl MeshDns {
    /// Serves the zone `zone` (e.g. `mesh`) on `bind` (port 0 picks one), pointing at
    /// `target`, the local gateway's workload listener.
    pub async fn start(
        fed: Arc<Federation>,
        bind: SocketAddr,
        zone: &str,
        target: SocketAddr,
    ) -> Result<MeshDns, FederationError> {
        let dns = |e: &dyn std::fmt::Display| FederationError::Dns(e.to_string());
        let origin = Name::from_ascii(format!("{}.", zone.trim_end_matches('.')))
            .map_err(|e| dns(&format!("zone `{zone}`: {e}")))?;
        let (udp, tcp, addr) = bind_both(bind).await?;

        let live = Arc::new(Zone::empty(
            origin.clone(),
            ZoneType::Primary,
            AxfrPolicy::Deny,
        ));
        let mut serial = 1u32;
        rebuild(&live, &origin, &fed.visible_names(), target, serial).await?;
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::new(&origin), vec![live.clone()]);
        let mut server = Server::new(catalog);
        server.register_socket(udp);
        server.register_listener(tcp, std::time::Duration::from_secs(10), 64);
        let serve = tokio::spawn(async move {
            if let Err(e) = server.block_until_done().await {
                tracing::error!(error = %e, "mesh DNS server stopped");
            }
        });
        let zone_name = origin.to_ascii();
        let mut changes = fed.subscribe();
        let weak = Arc::downgrade(&fed);
        drop(fed);
        let follow = tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let Some(fed) = weak.upgrade() else { return };
                serial = serial.wrapping_add(1);
                if let Err(e) = rebuild(&live, &origin, &fed.visible_names(), target, serial).await
                {
                    tracing::error!(error = %e, "cannot rebuild the mesh DNS zone");
                }
            }
        });
        tracing::info!(%addr, zone = %zone_name, "mesh DNS listening");
        Ok(MeshDns {
            addr,
            tasks: vec![serve, follow],
        })
    }

    /// The bound address (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MeshDns {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// UDP and TCP sockets on the same port. With port 0 the UDP socket picks the port, and
/// another process may hold that port for TCP: then another port is tried.
async fn bind_both(
    bind: SocketAddr,
) -> Result<(UdpSocket, TcpListener, SocketAddr), FederationError> {
    let dns = |e: String| FederationError::Dns(e);
    let attempts = if bind.port() == 0 { 16 } else { 1 };
    let mut last = String::new();
    for _ in 0..attempts {
        let udp = UdpSocket::bind(bind)
            .await
            .map_err(|e| dns(format!("cannot listen on `{bind}` (udp): {e}")))?;
        let addr = udp.local_addr().map_err(|e| dns(e.to_string()))?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp, addr)),
            Err(e) => last = format!("cannot listen on `{addr}` (tcp): {e}"),
        }
    }
    Err(dns(last))
}

/// Replaces the zone's records with those of `names`, atomically for readers.
async fn rebuild(
    live: &Zone,
    origin: &Name,
    names: &BTreeSet<String>,
    target: SocketAddr,
    serial: u32,
) -> Result<(), FederationError> {
    let mut fresh = Zone::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    for record in zone_records(origin, names, target, serial)? {
        fresh.upsert_mut(record, serial);
    }
    let records = std::mem::take(fresh.records_get_mut());
    *live.records_mut().await = records;
    Ok(())
}

/// The records of the zone (pure: names in, records out).
pub fn zone_records(
    origin: &Name,
    names: &BTreeSet<String>,
    target: SocketAddr,
    serial: u32,
) -> Result<Vec<Record>, FederationError> {
    let name = |rel: &str| {
        Name::from_ascii(rel)
            .and_then(|n| n.append_domain(origin))
            .map_err(|e| FederationError::Dns(format!("name `{rel}`: {e}")))
    };
    let address = match target.ip() {
        IpAddr::V4(ip) => RData::A(A(ip)),
        IpAddr::V6(ip) => RData::AAAA(AAAA(ip)),
    };
    let ns = name("ns")?;
    let gateway = name("gateway")?;
    let soa = SOA::new(
        ns.clone(),
        name("hostmaster")?,
        serial,
        60,
        10,
        3600,
        MESH_TTL,
    );
    let mut out = vec![
        Record::from_rdata(origin.clone(), MESH_TTL, RData::SOA(soa)),
        Record::from_rdata(origin.clone(), MESH_TTL, RData::NS(NS(ns.clone()))),
        Record::from_rdata(ns, MESH_TTL, address.clone()),
        Record::from_rdata(gateway.clone(), MESH_TTL, address.clone()),
    ];
    for rel in names {
        // Names are checked where they enter; one that still cannot be a DNS name is left
        // out, never the whole zone.
        let owner = match name(rel) {
            Ok(owner) => owner,
            Err(e) => {
                tracing::warn!(error = %e, "service name left out of the mesh DNS zone");
                continue;
            }
        };
        out.push(Record::from_rdata(owner.clone(), MESH_TTL, address.clone()));
        out.push(Record::from_rdata(
            owner,
            MESH_TTL,
            RData::SRV(SRV::new(0, 0, target.port(), gateway.clone())),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_cover_each_name_with_address_and_srv() {
        let origin = Name::from_ascii("mesh.").unwrap();
        let names: BTreeSet<String> = ["orders.shop", "orders.shop.west"]
            .into_iter()
            .map(String::from)
            .collect();
        let records = zone_records(&origin, &names, "127.0.0.1:15001".parse().unwrap(), 7).unwrap();
        let find = |n: &str, t: &str| {
            records
                .iter()
                .filter(|r| r.name.to_ascii() == n && r.record_type().to_string() == t)
                .count()
        };
        assert_eq!(find("orders.shop.west.mesh.", "A"), 1);
        assert_eq!(find("orders.shop.west.mesh.", "SRV"), 1);
        assert_eq!(find("orders.shop.mesh.", "SRV"), 1);
        assert_eq!(find("mesh.", "SOA"), 1);
        assert_eq!(find("gateway.mesh.", "A"), 1);
        let v6 = zone_records(&origin, &names, "[::1]:15001".parse().unwrap(), 7).unwrap();
        assert!(v6.iter().any(|r| matches!(r.data, RData::AAAA(_))));
        // A name that cannot be a DNS name is left out; the others are served.
        let bad: BTreeSet<String> = ["bad name!".to_owned(), "orders.shop".to_owned()].into();
        let records = zone_records(&origin, &bad, "127.0.0.1:1".parse().unwrap(), 1).unwrap();
        assert!(
            records
                .iter()
                .any(|r| r.name.to_ascii() == "orders.shop.mesh.")
        );
        assert_eq!(records.len(), 4 + 2);
    }
}
