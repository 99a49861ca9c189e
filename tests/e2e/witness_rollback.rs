//! Rolling a gateway's decision log back, tried as an operator with root on `west` would:
//! stop it, keep a copy of its state, let it serve, stop it, put the copy back. `east`
//! witnessed `west`'s signed heads within a second of each flush, so `audit verify
//! --witnesses` names the log truncated or rolled back, the restarted `west` reports the
//! mismatch on `/metrics`, and in strict mode refuses to start.

use std::path::Path;
use std::process::Command;

use crate::pair::{Cluster, Pair, WEB, call_orders, issue, wait_for};
use crate::procs::{BIN, arg, interrupt, meshgate, output_within, run};

/// The highest seq of west's heads east holds (through east's admin socket while it runs).
fn witnessed_by_east(east: &Cluster) -> (Option<u64>, String) {
    let out = meshgate(&[
        "federation",
        "witnessed",
        "--state",
        &arg(&east.state()),
        "--trust-domain",
        "west.example",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let max = doc["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["seq"].as_u64())
        .max();
    (max, text)
}

/// The highest signed seq of west's own (stopped) log.
fn signed_head(west: &Cluster) -> u64 {
    let out = meshgate(&["audit", "verify", &arg(&west.state()), "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    report["signed_seq"].as_u64().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .args(["-a", &arg(from), &arg(to)])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn a_rolled_back_log_is_named_by_its_witnesses() {
    let Pair {
        runtime: _runtime,
        upstream,
        tmp,
        west,
        east,
    } = Pair::new();
    let web = tmp.path().join("web");
    issue(&west, WEB, &web);

    let mut east_gw = east.start();
    let mut west_gw = west.start();
    call_orders(&west, &web, 3);
    assert!(interrupt(&mut west_gw.0).success());
    // The head signed at the graceful stop was pushed before the process exited.
    let stopped_at = signed_head(&west);
    assert!(
        witnessed_by_east(&east).0 >= Some(stopped_at),
        "east holds {:?}, west stopped at {stopped_at}",
        witnessed_by_east(&east)
    );
    let backup = tmp.path().join("west-backup");
    copy_dir(&west.state(), &backup);

    // West serves a while longer; each flush's signed head reaches east within a second.
    let mut west_gw = west.start();
    call_orders(&west, &web, 5);
    wait_for("east to witness a head west signed while serving", || {
        witnessed_by_east(&east).0 > Some(stopped_at)
    });
    assert!(interrupt(&mut west_gw.0).success());
    let (lost_to, heads) = witnessed_by_east(&east);
    let lost_to = lost_to.unwrap();
    assert!(lost_to > stopped_at);

    // The rollback: the old copy back in place.
    std::fs::remove_dir_all(west.state()).unwrap();
    std::fs::rename(&backup, west.state()).unwrap();
    // The chain alone is intact: only the witnesses know what is missing.
    let alone = run(&["audit", "verify", &arg(&west.state())]);
    assert_eq!(alone.status.code(), Some(0));
    let heads_file = tmp.path().join("heads.json");
    std::fs::write(&heads_file, heads).unwrap();
    let verify = run(&[
        "audit",
        "verify",
        &arg(&west.state()),
        "--witnesses",
        &arg(&heads_file),
    ]);
    let out = String::from_utf8_lossy(&verify.stdout).into_owned()
        + &String::from_utf8_lossy(&verify.stderr);
    assert_eq!(verify.status.code(), Some(1), "{out}");
    assert!(out.contains("truncated or rolled back"), "{out}");
    assert!(out.contains(&format!("record {lost_to}")), "{out}");

    // Restarted as is (warn): it serves, and its self-check reports the peer's disagreement.
    let mut west_gw = west.start();
    wait_for("the witness mismatch metric", || {
        west.metrics()
            .contains("meshgate_audit_witness_mismatch{peer=\"east\"} 1")
    });
    assert!(interrupt(&mut west_gw.0).success());

    // Strict: refuses to start, saying why.
    west.write_config(&east, upstream, "strict");
    let out = output_within(Command::new(BIN).args([
        "gateway",
        "--config",
        &arg(&west.dir.join("gateway.toml")),
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("refusing to start"), "{err}");
    assert!(interrupt(&mut east_gw.0).success());
}
