//! Network faults between two gateways, through the fault-injecting relay: delay, loss,
//! reordering, a blackout that heals. Calls succeed within their timeouts, the QUIC
//! connection survives or comes back, and nothing is answered without a decision record.

use std::time::{Duration, Instant};

use http::StatusCode;

use crate::gateway::{EAST_POLICIES, WEST_POLICIES};
use crate::relay::{Faults, Relay};
use crate::support::{Client, Cluster, Spec, echo_upstream, find_record, service};

/// East and West with every datagram between them going through a relay.
async fn relayed(tunnel_timeout: Duration) -> (Cluster, Cluster, Relay) {
    let orders = echo_upstream().await;
    let west = Cluster::start(Spec {
        name: "west",
        policies: WEST_POLICIES,
        services: vec![service("orders", "shop", orders, &["east"])],
        default_quota: None,
    })
    .await;
    let east = Cluster::start_with(
        Spec {
            name: "east",
            policies: EAST_POLICIES,
            services: vec![],
            default_quota: None,
        },
        |c| c.limits.tunnel_timeout = tunnel_timeout,
    )
    .await;
    west.link(&east, &["orders.shop"]);
    east.link(&west, &[]);
    let relay = Relay::start(west.gateway.addrs().tunnel).await;
    for peer in east.catalog.peers.lock().unwrap().iter_mut() {
        if peer.0 == "west" {
            peer.2 = vec![relay.addr()];
        }
    }
    (east, west, relay)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_succeed_under_delay_loss_and_reordering() {
    let (east, west, relay) = relayed(Duration::from_secs(30)).await;
    relay.set(Faults {
        delay: Duration::from_millis(50),
        loss: 0.02,
        reorder: 0.05,
        blackout: false,
    });
    let client = Client::new(&east, Some(&east.svid("/ns/shop/sa/web")), &[b"http/1.1"]);
    let started = Instant::now();
    for i in 0..20 {
        let reply = client
            .get("orders.shop.west.mesh", &format!("/v1/orders/{i}"))
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::OK, "call {i}: {}", reply.text());
        assert!(
            find_record(&west.log, &reply.decision_id()).is_some(),
            "call {i} has no decision record"
        );
    }
    // 50 ms each way: every call paid the delay, and the relay really did drop datagrams
    // only if loss was drawn; it forwarded in any case.
    assert!(started.elapsed() >= Duration::from_millis(20 * 100));
    assert!(relay.stats().forwarded > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackout_fails_calls_fast_and_the_path_heals() {
    let (east, west, relay) = relayed(Duration::from_secs(2)).await;
    let client = Client::new(&east, Some(&east.svid("/ns/shop/sa/web")), &[b"http/1.1"]);
    assert_eq!(
        client
            .get("orders.shop.west.mesh", "/v1/orders")
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    relay.set(Faults {
        blackout: true,
        ..Faults::default()
    });
    let before = west
        .log
        .query(&meshgate_policy::Filter::default())
        .unwrap()
        .len();
    let started = Instant::now();
    let reply = client
        .get("orders.shop.west.mesh", "/v1/orders")
        .await
        .unwrap();
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        reply.text()
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // Nothing reached West during the blackout.
    assert_eq!(
        west.log
            .query(&meshgate_policy::Filter::default())
            .unwrap()
            .len(),
        before
    );
    assert!(relay.stats().dropped > 0);
    // Heal: calls succeed again (on the surviving connection or a new one).
    relay.set(Faults::default());
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let reply = client
            .get("orders.shop.west.mesh", "/v1/orders")
            .await
            .unwrap();
        if reply.status == StatusCode::OK {
            assert!(find_record(&west.log, &reply.decision_id()).is_some());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the path never healed: {} {}",
            reply.status,
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
