//! The mesh DNS of a federated cluster, queried with hickory-resolver and with `dig`:
//! A and SRV answers for local and imported services, NXDOMAIN for names not exported to
//! this cluster, and a zone that follows the catalog without a restart.

use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};

use crate::federation_support::{Member, MemberSpec, eventually, link_pair};
use crate::support::{echo_upstream, service};

fn resolver(server: SocketAddr) -> TokioResolver {
    let mut ns = NameServerConfig::udp(server.ip());
    for c in &mut ns.connections {
        c.port = server.port();
    }
    Resolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    )
    .build()
    .unwrap()
}

fn dig(server: SocketAddr, name: &str, rtype: &str) -> String {
    let out = crate::procs::tool("dig")
        .args([
            &format!("@{}", server.ip()),
            "-p",
            &server.port().to_string(),
            "+tries=1",
            "+time=5",
            name,
            rtype,
        ])
        .output()
        .expect("`dig` runs (install bind9-dnsutils: scripts/install-test-tools.sh)");
    assert!(out.status.success(), "dig failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn linked() -> (Member, Member) {
    let up = echo_upstream().await;
    let mut a = MemberSpec::new("a", vec![service("ledger", "shop", up, &[])]);
    a.dns = true;
    let b = MemberSpec::new(
        "b",
        vec![
            service("orders", "shop", up, &["a"]),
            service("secret", "shop", up, &[]),
        ],
    );
    let (a, b) = (Member::start(a).await, Member::start(b).await);
    link_pair(&a, 0, &b, 0);
    // `a` lets `b` serve the unpinned `orders.shop.mesh`.
    let mut shared = b.link(0);
    shared.shared = vec!["orders.shop".into()];
    a.fed.add_link(shared, SystemTime::now()).unwrap();
    a.fed.sync_now(&b.td).await.unwrap();
    (a, b)
}

#[tokio::test]
async fn mesh_dns_answers_with_hickory_resolver() {
    let (a, b) = linked().await;
    let server = a.dns.as_ref().unwrap().local_addr();
    let workload = a.gateway.addrs().workload;
    let r = resolver(server);
    for name in [
        "orders.shop.b.mesh.",
        "orders.shop.mesh.",
        "ledger.shop.a.mesh.",
        "ledger.shop.mesh.",
    ] {
        let ips: Vec<IpAddr> = r.lookup_ip(name).await.unwrap().iter().collect();
        assert_eq!(ips, [workload.ip()], "{name}");
    }
    let srv = r
        .lookup("orders.shop.b.mesh.", RecordType::SRV)
        .await
        .unwrap();
    let answers: Vec<(u16, String)> = srv
        .answers()
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::SRV(s) => Some((s.port, s.target.to_ascii())),
            _ => None,
        })
        .collect();
    assert_eq!(answers, [(workload.port(), "gateway.mesh.".to_owned())]);
    // Not exported to this cluster, or not a service at all: NXDOMAIN.
    for name in [
        "secret.shop.b.mesh.",
        "secret.shop.mesh.",
        "nope.shop.mesh.",
    ] {
        let err = r.lookup_ip(name).await.unwrap_err();
        assert!(err.is_nx_domain(), "{name}: {err}");
    }
    // Gateway discovery (SRV first, then A) resolves against a real hickory server.
    let found = meshgate_federation::discovery::resolve("orders.shop.b.mesh", &[server])
        .await
        .unwrap();
    assert_eq!(found, [workload]);
    drop(b);
}

// `dig` blocks its thread: the server runs on the other worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_dns_answers_dig_and_follows_the_catalog() {
    let (a, b) = linked().await;
    let server = a.dns.as_ref().unwrap().local_addr();
    let port = a.gateway.addrs().workload.port();
    let srv = dig(server, "orders.shop.b.mesh", "SRV");
    assert!(srv.contains("status: NOERROR"), "{srv}");
    assert!(
        srv.contains(&format!("SRV\t0 0 {port} gateway.mesh.")),
        "{srv}"
    );
    assert!(srv.contains(" aa "), "authoritative answer: {srv}");
    let a_rec = dig(server, "orders.shop.mesh", "A");
    assert!(a_rec.contains("A\t127.0.0.1"), "{a_rec}");
    let nx = dig(server, "secret.shop.b.mesh", "A");
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");

    // Removing the link takes b's names out of the zone, without a restart.
    a.fed.remove_link(&b.td).unwrap();
    eventually("b's names gone from the zone", || {
        dig(server, "orders.shop.b.mesh", "A").contains("status: NXDOMAIN")
    })
    .await;
    let still = dig(server, "ledger.shop.a.mesh", "A");
    assert!(still.contains("status: NOERROR"), "{still}");
    // Adding it back and syncing brings them back.
    a.fed.add_link(b.link(0), SystemTime::now()).unwrap();
    a.fed.sync_now(&b.td).await.unwrap();
    eventually("b's names back in the zone", || {
        dig(server, "orders.shop.b.mesh", "A").contains("status: NOERROR")
    })
    .await;
}
