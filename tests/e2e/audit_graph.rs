//! `meshgate audit graph` over two real clusters' logs: an allowed edge across the tunnel, a
//! denied one, callers grouped by namespace, a time window, and DOT with the refused edge in
//! red, read beside the running gateways.

use crate::pair::{Cluster, EAST_WEB, Pair, WEB, call, issue, wait_for};
use crate::procs::{arg, interrupt, meshgate, run};

const EAST_API: &str = "spiffe://east.example/ns/shop/sa/api";
const ORDERS: &str = "orders.shop.west";

fn graph(states: &[&Cluster], extra: &[&str]) -> String {
    let dirs: Vec<String> = states.iter().map(|c| arg(&c.state())).collect();
    let mut args = vec!["audit", "graph"];
    args.extend(dirs.iter().map(String::as_str));
    args.extend(extra);
    String::from_utf8(meshgate(&args).stdout).unwrap()
}

fn edge<'a>(g: &'a serde_json::Value, from: &str, to: &str) -> &'a serde_json::Value {
    g["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["from"] == from && e["to"] == to)
        .unwrap_or_else(|| panic!("no edge {from} -> {to} in {g}"))
}

#[test]
fn the_graph_shows_who_called_whom_across_clusters() {
    let Pair {
        runtime: _runtime,
        tmp,
        west,
        east,
        ..
    } = Pair::new();
    let (east_web, east_api, west_web) = (
        tmp.path().join("east-web"),
        tmp.path().join("east-api"),
        tmp.path().join("west-web"),
    );
    issue(&east, EAST_WEB, &east_web);
    issue(&east, EAST_API, &east_api);
    issue(&west, WEB, &west_web);
    let mut east_gw = east.start();
    let mut west_gw = west.start();
    let host = "orders.shop.west.mesh";
    wait_for("east to route to west's orders", || {
        call(&east, &east_web, host) == "200"
    });
    for _ in 0..2 {
        assert_eq!(call(&east, &east_web, host), "200");
    }
    assert_eq!(call(&east, &east_api, host), "403");
    assert_eq!(call(&west, &west_web, host), "200");

    // Both logs, read beside the running gateways.
    let g: serde_json::Value = serde_json::from_str(&graph(&[&west, &east], &[])).unwrap();
    // Each call once: the first that answered 200 while waiting, then two more.
    let web = edge(&g, EAST_WEB, ORDERS);
    assert_eq!(web["allow"], 3, "{web}");
    assert_eq!(web["deny"], 0, "{web}");
    let api = edge(&g, EAST_API, ORDERS);
    assert_eq!(
        (api["allow"].as_u64(), api["deny"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(edge(&g, WEB, ORDERS)["allow"], 1);
    let node = g["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == ORDERS)
        .unwrap();
    assert_eq!(
        (node["kind"].as_str(), node["domain"].as_str()),
        (Some("service"), Some("west"))
    );

    // By namespace: east's two workloads are one caller with both outcomes.
    let g: serde_json::Value =
        serde_json::from_str(&graph(&[&west, &east], &["--by", "namespace"])).unwrap();
    let shop = edge(&g, "spiffe://east.example/ns/shop", ORDERS);
    assert_eq!(shop["deny"], 1, "{shop}");
    assert_eq!(shop["allow"], 3, "{shop}");

    // A window that ends an hour ago holds nothing.
    let g: serde_json::Value =
        serde_json::from_str(&graph(&[&west, &east], &["--until", "1h"])).unwrap();
    assert_eq!(g["edges"].as_array().unwrap().len(), 0, "{g}");

    // DOT: the refused edge is red and dashed, the allowed one green.
    let dot = graph(&[&west], &["--format", "dot"]);
    assert!(
        dot.contains(&format!(
            "\"{EAST_API}\" -> \"{ORDERS}\" [label=\"allow 0, deny 1\", color=red, style=dashed"
        )),
        "{dot}"
    );
    assert!(dot.contains("color=darkgreen"), "{dot}");

    // A state that is not one is a clear error, exit 3.
    let bad = run(&["audit", "graph", &arg(&tmp.path().join("nowhere"))]);
    assert_eq!(bad.status.code(), Some(3));
    assert!(!bad.stderr.is_empty());
    assert!(interrupt(&mut west_gw.0).success());
    assert!(interrupt(&mut east_gw.0).success());
}
