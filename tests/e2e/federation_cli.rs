//! `meshgate federation …` and `meshgate audit verify --witnesses` as processes, on state
//! directories without a running gateway (the state-direct path).

use std::time::SystemTime;

use meshgate_policy::{Checkpoint, CheckpointSigner, DecisionLog, DecisionRecordInput};

use crate::procs::{arg, meshgate, run};

#[test]
fn links_are_added_listed_and_removed_and_bad_input_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let (east, west) = (dir.path().join("east"), dir.path().join("west"));
    meshgate(&[
        "identity",
        "init",
        "--state",
        &arg(&east),
        "--trust-domain",
        "east.example",
    ]);
    meshgate(&[
        "identity",
        "init",
        "--state",
        &arg(&west),
        "--trust-domain",
        "west.example",
    ]);
    let bundle = dir.path().join("west-bundle.json");
    let out = meshgate(&["identity", "bundle", "--state", &arg(&west)]);
    std::fs::write(&bundle, &out.stdout).unwrap();
    let add = |td: &str, bundle: &str| {
        run(&[
            "federation",
            "add",
            "--state",
            &arg(&east),
            "--cluster",
            "west",
            "--trust-domain",
            td,
            "--gateway",
            "127.0.0.1:15443",
            "--bundle",
            bundle,
        ])
    };
    assert_eq!(
        add("east.example", &arg(&bundle)).status.code(),
        Some(2),
        "a link to itself"
    );
    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "{\"keys\": 3}").unwrap();
    let bad = add("west.example", &arg(&garbage));
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("bundle"),
        "{bad:?}"
    );
    let ok = add("west.example", &arg(&bundle));
    assert!(ok.status.success(), "{ok:?}");

    let status = meshgate(&["federation", "status", "--state", &arg(&east), "--json"]);
    let links: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(links[0]["cluster"], "west");
    assert_eq!(links[0]["trust_domain"], "west.example");
    assert_eq!(links[0]["state"], "never_synced");
    assert!(links[0]["bundle_sequence"].as_u64().unwrap() >= 1);
    let list = meshgate(&["federation", "list", "--state", &arg(&east)]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("west (west.example)"));

    meshgate(&["federation", "remove", "--state", &arg(&east), "west"]);
    let after = meshgate(&["federation", "status", "--state", &arg(&east)]);
    assert!(String::from_utf8_lossy(&after.stdout).contains("no federation links"));
    let missing = run(&["federation", "remove", "--state", &arg(&east), "west"]);
    assert_eq!(missing.status.code(), Some(2));
    // Each state-direct change is an admin event in the decision log.
    let events = meshgate(&["audit", "query", &arg(&east), "--decision", "admin"]);
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(
        events.contains("federation add") && events.contains("federation remove"),
        "{events}"
    );
}

#[test]
fn audit_verify_with_witnesses_detects_a_rewritten_resigned_log() {
    let dir = tempfile::tempdir().unwrap();
    let east = dir.path().join("east");
    meshgate(&[
        "identity",
        "init",
        "--state",
        &arg(&east),
        "--trust-domain",
        "east.example",
    ]);
    meshgate(&["audit", "checkpoint", &arg(&east)]);
    meshgate(&["audit", "checkpoint", &arg(&east)]);
    let cps: Vec<Checkpoint> =
        serde_json::from_slice(&meshgate(&["audit", "checkpoints", &arg(&east)]).stdout).unwrap();
    let head = cps.last().unwrap().clone();
    let witness = |checkpoints: Vec<Checkpoint>, name: &str| {
        let path = dir.path().join(name);
        let file = serde_json::json!({
            "trust_domain": "east.example", "witness": "west", "checkpoints": checkpoints,
        });
        std::fs::write(&path, file.to_string()).unwrap();
        path
    };
    let honest = witness(cps.clone(), "honest.json");
    let out = run(&["audit", "verify", &arg(&east), "--witnesses", &arg(&honest)]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("witnesses: ok"));

    // The same seq, signed with east's own checkpoint key, over a different history: what a
    // peer holds when east's log is rewritten and re-signed after the peer witnessed it.
    let pem = std::fs::read_to_string(east.join("keys/audit-checkpoint.pem")).unwrap();
    let signer = CheckpointSigner::from_pkcs8_pem(&pem).unwrap();
    let other = tempfile::tempdir().unwrap();
    let other_log = DecisionLog::open(other.path(), Some(signer), Default::default()).unwrap();
    for _ in 0..head.seq {
        other_log
            .append(DecisionRecordInput::admin(
                "mallory",
                "another history",
                SystemTime::now(),
            ))
            .unwrap();
    }
    let other_head = other_log.checkpoint(SystemTime::now()).unwrap();
    assert_eq!(other_head.seq, head.seq);
    assert_eq!(other_head.public_key, head.public_key);
    let disagreeing = witness(vec![other_head], "disagreeing.json");
    let out = run(&[
        "audit",
        "verify",
        &arg(&east),
        "--witnesses",
        &arg(&disagreeing),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("rewritten"),
        "{out:?}"
    );

    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, "[]").unwrap();
    assert_eq!(
        run(&["audit", "verify", &arg(&east), "--witnesses", &arg(&broken)])
            .status
            .code(),
        Some(2)
    );
}

/// The review's case: a trust domain written `spiffe://west.example` was stored as given but
/// removed normalized, so `remove` did not stick and the self-link guard was passed. Every
/// spelling is now one link, stored as `west.example`, removed by any spelling; its own
/// trust domain in any spelling is refused; other spellings are exit 2.
#[test]
fn trust_domain_spellings_name_one_link() {
    let dir = tempfile::tempdir().unwrap();
    let (east, west) = (dir.path().join("east"), dir.path().join("west"));
    for (state, td) in [(&east, "east.example"), (&west, "west.example")] {
        meshgate(&[
            "identity",
            "init",
            "--state",
            &arg(state),
            "--trust-domain",
            td,
        ]);
    }
    let bundle = dir.path().join("west-bundle.json");
    let own = dir.path().join("east-bundle.json");
    std::fs::write(
        &bundle,
        meshgate(&["identity", "bundle", "--state", &arg(&west)]).stdout,
    )
    .unwrap();
    std::fs::write(
        &own,
        meshgate(&["identity", "bundle", "--state", &arg(&east)]).stdout,
    )
    .unwrap();
    let add = |td: &str, bundle: &std::path::Path| {
        run(&[
            "federation",
            "add",
            "--state",
            &arg(&east),
            "--cluster",
            "west",
            "--trust-domain",
            td,
            "--gateway",
            "127.0.0.1:15443",
            "--bundle",
            &arg(bundle),
        ])
    };
    let me = add("spiffe://east.example", &own);
    assert_eq!(me.status.code(), Some(2), "a link to itself: {me:?}");
    for odd in ["West.Example", "spiffe://west.example/x", "west.example/"] {
        assert_eq!(add(odd, &bundle).status.code(), Some(2), "{odd}");
    }
    let ok = add("spiffe://west.example", &bundle);
    assert!(ok.status.success(), "{ok:?}");
    let status = meshgate(&["federation", "status", "--state", &arg(&east), "--json"]);
    let links: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(links.as_array().unwrap().len(), 1);
    assert_eq!(links[0]["trust_domain"], "west.example");
    // The other spelling names the same link: removed, and it stays removed.
    meshgate(&[
        "federation",
        "remove",
        "--state",
        &arg(&east),
        "spiffe://west.example",
    ]);
    let after = meshgate(&["federation", "status", "--state", &arg(&east)]);
    assert!(String::from_utf8_lossy(&after.stdout).contains("no federation links"));
    let db = sled::Config::new().path(east.join("db")).open().unwrap();
    let store = meshgate_federation::Store::open(&db).unwrap();
    assert!(store.links().unwrap().is_empty());
    assert!(store.peers().unwrap().is_empty());
}
