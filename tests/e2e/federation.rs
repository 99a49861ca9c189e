//! Three clusters with independent roots, federated on 127.0.0.1: calls across with the
//! caller identity intact, exports per peer, CA rotation propagating before activation,
//! link removal cutting trust at once, failover when a gateway stops, restarts during a
//! partition on cached state, witnessed decision logs.

use std::time::{Duration, SystemTime};

use http::StatusCode;
use meshgate_federation::witness;
use meshgate_policy::{CheckpointSigner, DecisionKind, DecisionLog, DecisionRecordInput, Filter};

use crate::federation_support::{Member, MemberSpec, eventually, fast_options, link_pair};
use crate::support::{echo_upstream, find_record, service};

/// `a` (callers), `b` and `c`; c exports `orders.shop` to a and `secret.shop` to b only;
/// b exports `orders.shop` to a. Every pair linked; nothing synced yet.
async fn three(autostart: bool) -> (Member, Member, Member) {
    let up = echo_upstream().await;
    let mut a = MemberSpec::new("a", vec![service("ledger", "shop", up, &["b"])]);
    a.autostart = autostart;
    let mut b = MemberSpec::new("b", vec![service("orders", "shop", up, &["a"])]);
    b.autostart = autostart;
    let mut c = MemberSpec::new(
        "c",
        vec![
            service("orders", "shop", up, &["a"]),
            service("secret", "shop", up, &["b"]),
        ],
    );
    c.autostart = autostart;
    let (a, b, c) = (
        Member::start(a).await,
        Member::start(b).await,
        Member::start(c).await,
    );
    link_pair(&a, 0, &b, 0);
    link_pair(&a, 0, &c, 1);
    link_pair(&b, 0, &c, 0);
    // `a` lets both serve the unpinned `orders.shop.mesh` (its choice, not theirs).
    for (peer, priority) in [(&b, 0), (&c, 1)] {
        let mut link = peer.link(priority);
        link.shared = vec!["orders.shop".into()];
        a.fed.add_link(link, SystemTime::now()).unwrap();
    }
    (a, b, c)
}

async fn sync_all(members: &[&Member]) {
    for m in members {
        for other in members.iter().filter(|o| o.td != m.td) {
            m.fed.sync_now(&other.td).await.unwrap();
        }
    }
}

#[tokio::test]
async fn call_across_three_clusters_with_caller_identity_and_exports_enforced() {
    let (a, b, c) = three(false).await;
    // Before any sync, `a` is told (wrongly, by a stale seed) that c serves `secret.shop`.
    let mut seeded = c.link(1);
    seeded.services = vec!["secret.shop".into()];
    a.fed.add_link(seeded, SystemTime::now()).unwrap();
    let web = a.client("/ns/shop/sa/web");
    let refused = web.get("secret.shop.c.mesh", "/").await.unwrap();
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text());
    let record = find_record(&c.log, &refused.decision_id()).expect("refusal recorded at c");
    assert_ne!(record.decision, DecisionKind::Allow);
    assert!(
        record.errors.iter().any(|r| r.contains("not exported")),
        "{:?}",
        record.errors
    );

    sync_all(&[&a, &b, &c]).await;
    let reply = web.get("orders.shop.c.mesh", "/v1/orders/7").await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["caller"], "spiffe://a.example/ns/shop/sa/web");
    assert!(find_record(&c.log, &reply.decision_id()).is_some());
    // After the sync, `a` knows c does not export `secret.shop` to it: no route at all.
    let unknown = web.get("secret.shop.c.mesh", "/").await.unwrap();
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.text());

    let status = a.fed.status(SystemTime::now());
    let to_c = status.iter().find(|s| s.cluster == "c").unwrap();
    assert_eq!(to_c.state, "synced");
    assert_eq!(to_c.imported, ["orders.shop"]);
    assert_eq!(to_c.bundle_sequence, c.issuer.bundle_sequence());
    let at_b = b.fed.status(SystemTime::now());
    assert_eq!(
        at_b.iter().find(|s| s.cluster == "c").unwrap().imported,
        ["secret.shop"]
    );
    let c_status = c.fed.status(SystemTime::now());
    assert_eq!(
        c_status.iter().find(|s| s.cluster == "a").unwrap().exported,
        ["orders.shop"]
    );
}

#[tokio::test]
async fn ca_rotation_reaches_peers_before_the_new_root_signs() {
    let (a, b, c) = three(true).await;
    eventually("initial sync", || {
        a.fed.routes("orders", "shop", Some("b")).len() == 1
            && b.fed.routes("ledger", "shop", Some("a")).len() == 1
    })
    .await;
    let prepared = b.issuer.rotate_prepare(SystemTime::now()).unwrap();
    // The watcher pushes b's bundle; a and c take it (higher sequence, b's own trust domain).
    eventually("a and c hold b's prepared bundle", || {
        [&a, &c].iter().all(|m| {
            m.bundles
                .get(&b.td)
                .is_some_and(|bundle| bundle.sequence() == prepared.sequence)
        })
    })
    .await;
    eventually("b sees both acknowledgements", || {
        b.fed
            .status(SystemTime::now())
            .iter()
            .all(|s| s.our_sequence_at_peer == Some(prepared.sequence))
    })
    .await;
    b.issuer.rotate_activate(SystemTime::now()).unwrap();
    // A workload of b with a fresh SVID (new root) calls a; b mints its JWT with the new key,
    // which a learned before activation.
    let reply = b
        .client("/ns/shop/sa/after-rotation")
        .get("ledger.shop.a.mesh", "/v1/ledger")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.json()["caller"],
        "spiffe://b.example/ns/shop/sa/after-rotation"
    );
    let back = a
        .client("/ns/shop/sa/web")
        .get("orders.shop.b.mesh", "/")
        .await
        .unwrap();
    assert_eq!(back.status, StatusCode::OK, "{}", back.text());
}

#[tokio::test]
async fn removing_a_link_cuts_trust_at_once() {
    let (a, b, c) = three(false).await;
    sync_all(&[&a, &b, &c]).await;
    let web = a.client("/ns/shop/sa/web");
    assert_eq!(
        web.get("orders.shop.b.mesh", "/").await.unwrap().status,
        StatusCode::OK
    );
    let from_b = b.client("/ns/shop/sa/web");
    assert_eq!(
        from_b.get("ledger.shop.a.mesh", "/").await.unwrap().status,
        StatusCode::OK
    );

    assert!(a.fed.remove_link(&b.td).unwrap());
    assert!(a.bundles.get(&b.td).is_none());
    // a no longer routes to b ...
    let gone = web.get("orders.shop.b.mesh", "/").await.unwrap();
    assert_eq!(gone.status, StatusCode::NOT_FOUND, "{}", gone.text());
    // ... and b's connection was closed; its new handshakes are refused.
    let refused = from_b.get("ledger.shop.a.mesh", "/").await.unwrap();
    assert!(refused.status.is_server_error(), "{}", refused.text());
    assert!(
        refused.text().contains("UnknownTrustDomain"),
        "{}",
        refused.text()
    );
    assert!(b.fed.sync_now(&a.td).await.is_err());
    // Other links are untouched.
    assert_eq!(
        web.get("orders.shop.c.mesh", "/").await.unwrap().status,
        StatusCode::OK
    );
    assert!(
        a.fed
            .status(SystemTime::now())
            .iter()
            .all(|s| s.cluster != "b")
    );
}

#[tokio::test]
async fn calls_fail_over_when_a_peer_gateway_stops() {
    let (a, b, c) = three(true).await;
    eventually("a imports orders.shop from b and c", || {
        a.fed.routes("orders", "shop", None).len() == 2
    })
    .await;
    let web = a.client("/ns/shop/sa/web");
    let first = web.get("orders.shop.mesh", "/").await.unwrap();
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    assert!(
        find_record(&b.log, &first.decision_id()).is_some(),
        "b (priority 0) serves first"
    );

    let traffic = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for _ in 0..20 {
            let r = web.get("orders.shop.mesh", "/").await.unwrap();
            statuses.push((r.status, r.decision_id()));
        }
        statuses
    });
    let b_log = b.log.clone();
    // Keep b's state directory: its log is read below.
    let _b_state = b.stop().await;
    let statuses = traffic.await.unwrap();
    assert!(
        statuses.iter().all(|(s, _)| *s == StatusCode::OK),
        "{statuses:?}"
    );
    let (_, last) = statuses.last().unwrap();
    assert!(
        find_record(&c.log, last).is_some(),
        "c serves once b is gone"
    );
    assert!(find_record(&b_log, last).is_none());
    eventually("b ranked unhealthy", || {
        a.fed
            .status(SystemTime::now())
            .iter()
            .any(|s| s.cluster == "b" && s.state == "unhealthy")
    })
    .await;
}

#[tokio::test]
async fn restart_during_partition_serves_cached_state_until_it_expires() {
    let (a, b, c) = three(false).await;
    sync_all(&[&a, &b, &c]).await;
    let metrics = a.gateway.metrics().encode();
    assert!(
        metrics.contains(r#"meshgate_federation_link_up{peer="b"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"meshgate_federation_peer_bundle_sequence{peer="b"} "#),
        "{metrics}"
    );
    let b_td = b.td.clone();
    let b_stopped = b.stop().await; // the partition
    let a_stopped = a.stop().await;
    let a = a_stopped.restart(fast_options(), false).await;
    // Nothing synced since the restart, and b is unreachable: all from cache.
    assert!(a.fed.sync_now(&b_td).await.is_err());
    assert!(
        a.bundles.get(&b_td).is_some(),
        "b's cached bundle is trusted"
    );
    assert_eq!(a.fed.routes("orders", "shop", Some("b")).len(), 1);
    let status = a.fed.status(SystemTime::now());
    let to_b = status.iter().find(|s| s.cluster == "b").unwrap();
    assert_eq!(to_b.imported, ["orders.shop"]);
    assert!(to_b.last_error.is_some());
    // b comes back on the same ports: traffic flows on a's cached state.
    let b = b_stopped.restart(fast_options(), false).await;
    let reply = a
        .client("/ns/shop/sa/web")
        .get("orders.shop.b.mesh", "/")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(find_record(&b.log, &reply.decision_id()).is_some());

    // Restarted with a maximum staleness already passed: a fails closed for every peer.
    let b_stopped = b.stop().await;
    let mut strict = fast_options();
    strict.max_stale = Duration::ZERO;
    let a = a.stop().await.restart(strict, false).await;
    assert!(a.bundles.get(&b_td).is_none(), "expired peer distrusted");
    assert!(a.fed.routes("orders", "shop", None).is_empty());
    let status = a.fed.status(SystemTime::now());
    assert!(status.iter().all(|s| s.state == "expired"), "{status:?}");
    // …and says so in metrics.
    let metrics = a.gateway.metrics().encode();
    assert!(
        metrics.contains(r#"meshgate_federation_link_expired{peer="b"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"meshgate_federation_link_up{peer="b"} 0"#),
        "{metrics}"
    );
    let reply = a
        .client("/ns/shop/sa/web")
        .get("orders.shop.c.mesh", "/")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
    drop((b_stopped, c));
}

#[tokio::test]
async fn peers_witness_decision_logs_and_a_rewrite_is_detected() {
    let (a, b, c) = three(false).await;
    sync_all(&[&a, &b, &c]).await;
    for path in ["/1", "/2", "/3"] {
        let r = a
            .client("/ns/shop/sa/web")
            .get("orders.shop.b.mesh", path)
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
    }
    // b's log records those calls; b signs a checkpoint; a fetches it as b's witness.
    let head = b.log.checkpoint(SystemTime::now()).unwrap();
    a.fed.sync_now(&b.td).await.unwrap();
    let held = a.fed.witnessed(b.td.as_str()).unwrap();
    assert_eq!(held.last(), Some(&head));
    // Over the link, b asks a for the heads a holds of b's log, and checks its own log.
    let doc = b.fed.fetch_witnessed(&a.td).await.unwrap();
    assert_eq!(doc.checkpoints, held);
    let report = witness::verify_against(&b.log, &doc.checkpoints).unwrap();
    assert!(report.is_ok() && report.matched >= 1, "{report:?}");

    // Root on b rewrites history with b's own key: a whole new chain, re-signed. Its own
    // verification passes; the witnessed heads expose it.
    let forged_dir = tempfile::tempdir().unwrap();
    let signer = CheckpointSigner::from_pkcs8_der(&b.signer_der).unwrap();
    let forged = DecisionLog::open(forged_dir.path(), Some(signer), Default::default()).unwrap();
    let records = b.log.query(&Filter::default()).unwrap();
    for (i, _) in records.iter().enumerate() {
        let what = if i == 1 {
            "nothing happened here"
        } else {
            "copied"
        };
        forged
            .append(DecisionRecordInput::admin("root", what, SystemTime::now()))
            .unwrap();
    }
    forged.checkpoint(SystemTime::now()).unwrap();
    assert!(
        forged.verify().unwrap().is_ok(),
        "the forged chain is self-consistent"
    );
    let report = witness::verify_against(&forged, &doc.checkpoints).unwrap();
    assert!(!report.is_ok(), "{report:?}");
    assert!(report.problems[0].contains("rewritten"), "{report:?}");
    // The forged head, offered to a as b's new checkpoint, contradicts what a witnessed.
    let admitted = witness::admit(
        &held,
        Some(&held[0].public_key),
        &forged.checkpoints().unwrap(),
    );
    assert!(admitted.new.is_empty(), "{admitted:?}");
    assert!(admitted.conflicts[0].contains("rewritten"), "{admitted:?}");
    // And a head signed by another key is refused outright.
    let (other, _) = CheckpointSigner::generate().unwrap();
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger = DecisionLog::open(stranger_dir.path(), Some(other), Default::default()).unwrap();
    let alien = stranger.checkpoint(SystemTime::now()).unwrap();
    let admitted = witness::admit(&held, Some(&held[0].public_key), &[alien]);
    assert!(
        admitted.new.is_empty() && !admitted.refused.is_empty(),
        "{admitted:?}"
    );
}
