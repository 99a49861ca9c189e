//! Rolling a gateway: `west` restarts on the same addresses, gracefully and after `kill -9`,
//! and `east`'s workloads reach it again at once. A graceful stop closes every QUIC connection
//! with a CONNECTION_CLOSE; after a kill, the restarted `west` answers packets of its previous
//! instance's connections with a stateless reset keyed by the secret in its state, so `east`
//! drops the stale connection and redials instead of waiting out the idle timeout. The time
//! to the first answered call after `west` is ready is printed (not asserted: it measures the
//! machine as much as the code).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::pair::{Cluster, EAST_WEB, Pair, call, issue, wait_for};
use crate::procs::{READY_TIMEOUT, interrupt};

const ORDERS_WEST: &str = "orders.shop.west.mesh";

/// Calls west's `orders` through `east` until one is answered 200: how long it took and how
/// many calls failed before.
fn until_served(east: &Cluster, web: &Path) -> (Duration, usize) {
    let start = Instant::now();
    let mut failed = 0;
    loop {
        if call(east, web, ORDERS_WEST) == "200" {
            return (start.elapsed(), failed);
        }
        failed += 1;
        assert!(
            start.elapsed() < READY_TIMEOUT,
            "east did not reach the restarted west"
        );
    }
}

#[test]
fn a_restarted_peer_is_reached_again_at_once() {
    let Pair {
        runtime: _runtime,
        tmp,
        west,
        east,
        ..
    } = Pair::new();
    let web = tmp.path().join("east-web");
    issue(&east, EAST_WEB, &web);

    let _east_gw = east.start();
    let mut west_gw = west.start();
    wait_for("east to route to west's orders", || {
        call(&east, &web, ORDERS_WEST) == "200"
    });

    // Graceful: west's CONNECTION_CLOSE reaches east before the process exits.
    assert!(interrupt(&mut west_gw.0).success());
    let mut west_gw = west.start();
    let (graceful, graceful_failed) = until_served(&east, &web);

    // kill -9: nothing is closed; east learns of the restart from west's stateless reset.
    west_gw.0.kill().unwrap();
    west_gw.0.wait().unwrap();
    let mut west_gw = west.start();
    let (killed, killed_failed) = until_served(&east, &web);
    eprintln!(
        "reconnect: serving again {graceful:?} after a graceful restart was ready \
         ({graceful_failed} calls failed), {killed:?} after kill -9 and restart \
         ({killed_failed} calls failed)"
    );
    // West keeps serving east without a failure on the new connections.
    for _ in 0..3 {
        assert_eq!(call(&east, &web, ORDERS_WEST), "200");
    }
    assert!(interrupt(&mut west_gw.0).success());
}
