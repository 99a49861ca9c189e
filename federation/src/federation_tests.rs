//! The link's source of truth at start: real issuers, real sled, a real decision log.

use super::*;

struct Side {
    _dir: tempfile::TempDir,
    db: sled::Db,
    issuer: Arc<Issuer>,
}

fn side(td: &str) -> Side {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("db"))
        .cache_capacity(1 << 20)
        .open()
        .unwrap();
    std::fs::create_dir_all(dir.path().join("keys")).unwrap();
    let issuer = Arc::new(
        Issuer::init(
            &db,
            &dir.path().join("keys"),
            td.parse().unwrap(),
            SystemTime::now(),
        )
        .unwrap(),
    );
    Side {
        _dir: dir,
        db,
        issuer,
    }
}

fn link_to(peer: &Side, bundle: &TrustBundle) -> Link {
    Link {
        cluster: "b".into(),
        trust_domain: peer.issuer.trust_domain().to_string(),
        gateways: vec!["127.0.0.1:1".parse().unwrap()],
        dns: None,
        priority: 0,
        bootstrap_bundle: bundle.to_spiffe_json(),
        services: vec![],
        shared: vec![],
        credentials: vec![],
    }
}

fn open(a: &Side, log: &Arc<DecisionLog>, links: Vec<Link>) -> Arc<Federation> {
    Federation::open(
        &a.db,
        FederationParts {
            local: LocalCluster {
                cluster: "a".into(),
                trust_domain: a.issuer.trust_domain().clone(),
                services: BTreeMap::new(),
            },
            issuer: a.issuer.clone(),
            log: Some(log.clone()),
            bundles: BundleSet::new(),
            links,
            options: FederationOptions::default(),
        },
        SystemTime::now(),
    )
    .unwrap()
}

#[test]
fn a_changed_config_bundle_is_authoritative_at_start() {
    let (a, b) = (side("a.example"), side("b.example"));
    let log_dir = tempfile::tempdir().unwrap();
    let log = Arc::new(DecisionLog::open(log_dir.path(), None, Default::default()).unwrap());
    let td = b.issuer.trust_domain().clone();
    let config = link_to(&b, &b.issuer.bundle());
    let start = b.issuer.bundle().sequence();

    // b's compromised gateway pushes a bundle with a root of its own, within the bound.
    let rogue = side("b.example");
    let genuine = b.issuer.bundle();
    let forged = TrustBundle::new(
        td.clone(),
        [genuine.x509_roots(), rogue.issuer.bundle().x509_roots()].concat(),
        genuine.jwt_keys().clone(),
        start + 10,
        None,
    )
    .unwrap();
    let fed = open(&a, &log, vec![config.clone()]);
    assert!(fed.offer_bundle(&td, forged, SystemTime::now()).accepted);
    drop(fed);

    // The same config at the next start: what was learned from the peer is kept (a peer's
    // genuine rotations must survive restarts).
    let fed = open(&a, &log, vec![config.clone()]);
    assert_eq!(fed.bundles().get(&td).unwrap().sequence(), start + 10);
    drop(fed);

    // The operator puts b's genuine current bundle in the config: it replaces the cache.
    b.issuer.rotate_prepare(SystemTime::now()).unwrap();
    let fed = open(&a, &log, vec![link_to(&b, &b.issuer.bundle())]);
    let held = fed.bundles().get(&td).unwrap();
    assert_eq!(held.sequence(), start + 1);
    let rogue_root = &rogue.issuer.bundle().x509_roots()[0].clone();
    assert!(!held.x509_roots().contains(rogue_root));
    // The genuine peer's next rotation is taken again.
    b.issuer.rotate_activate(SystemTime::now()).unwrap();
    assert!(
        fed.offer_bundle(&td, b.issuer.bundle(), SystemTime::now())
            .accepted
    );

    // Both link settings from the config and both accepted bundles are admin events.
    let records = log.query(&meshgate_policy::Filter::default()).unwrap();
    let events: Vec<(&str, &str)> = records
        .iter()
        .map(|r| (r.principal.as_str(), r.action.as_str()))
        .collect();
    let from_config = events
        .iter()
        .filter(|(who, what)| *who == "config file" && what.contains("set from the config"))
        .count();
    let accepted = events
        .iter()
        .filter(|(who, what)| {
            *who == "spiffe://b.example/meshgate/gateway" && what.contains("accepted")
        })
        .count();
    assert_eq!((from_config, accepted), (2, 2), "{events:?}");
}

fn linked(fed: &Federation, td: &TrustDomain) -> bool {
    fed.is_linked(td) && fed.bundles().get(td).is_some()
}

#[test]
fn a_link_deleted_from_the_config_stays_deleted() {
    let (a, b) = (side("a.example"), side("b.example"));
    let log_dir = tempfile::tempdir().unwrap();
    let log = Arc::new(DecisionLog::open(log_dir.path(), None, Default::default()).unwrap());
    let td = b.issuer.trust_domain().clone();
    let fed = open(&a, &log, vec![link_to(&b, &b.issuer.bundle())]);
    assert!(linked(&fed, &td));
    drop(fed);
    // The `[[peers]]` block is deleted: gone at the next start, and the one after.
    for _ in 0..2 {
        let fed = open(&a, &log, vec![]);
        assert!(!linked(&fed, &td));
        assert!(fed.store().links().unwrap().is_empty());
        drop(fed);
    }
    let records = log.query(&meshgate_policy::Filter::default()).unwrap();
    assert!(
        records
            .iter()
            .any(|r| r.action.contains("removed: no longer in the config file")),
        "the removal is an admin event"
    );
}

#[test]
fn runtime_links_persist_until_removed_and_removal_sticks() {
    let (a, b) = (side("a.example"), side("b.example"));
    let log_dir = tempfile::tempdir().unwrap();
    let log = Arc::new(DecisionLog::open(log_dir.path(), None, Default::default()).unwrap());
    let td = b.issuer.trust_domain().clone();
    let fed = open(&a, &log, vec![]);
    // Added at run time, in the odd spelling: stored normalized.
    let mut odd = link_to(&b, &b.issuer.bundle());
    odd.trust_domain = "spiffe://b.example".into();
    fed.add_link(odd, SystemTime::now()).unwrap();
    assert!(fed.store().links().unwrap().contains_key("b.example"));
    drop(fed);
    let fed = open(&a, &log, vec![]);
    assert!(linked(&fed, &td), "a runtime link survives a restart");
    assert!(fed.remove_link(&td).unwrap());
    drop(fed);
    let fed = open(&a, &log, vec![]);
    assert!(!linked(&fed, &td), "and its removal too");
    // The self-link guard holds for every spelling.
    let mut me = link_to(&a, &a.issuer.bundle());
    me.trust_domain = "spiffe://a.example".into();
    assert!(matches!(
        fed.add_link(me, SystemTime::now()),
        Err(FederationError::SelfLink(_))
    ));
    drop(fed);
    // A config link in the odd spelling is the same link as the plain one.
    let mut odd = link_to(&b, &b.issuer.bundle());
    odd.trust_domain = "spiffe://b.example".into();
    let fed = open(&a, &log, vec![odd]);
    assert!(linked(&fed, &td));
    drop(fed);
    let fed = open(&a, &log, vec![link_to(&b, &b.issuer.bundle())]);
    assert_eq!(fed.store().links().unwrap().len(), 1);
    drop(fed);
    let fed = open(&a, &log, vec![]);
    assert!(!linked(&fed, &td));
}
