//! `meshgate demo`: the README's first command, run to completion with `--exit`.

use std::process::Command;

use crate::procs::BIN;

#[test]
fn the_demo_shows_every_behaviour_and_exits_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let out = Command::new(BIN)
        .args(["demo", "--exit", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "every expectation held.",
        "\"caller\":\"spiffe://east.example/ns/shop/sa/web\"",
        "forbidden by policy no-admin-paths",
        "statuses: [200, 200, 429]",
        "would have denied",
        "east: ok",
        "west: ok",
        "north: ok",
        "who called whom across the mesh",
        "east.example/ns/batch/sa/report",
        ", console http://127.0.0.1:",
    ] {
        assert!(
            text.contains(expected),
            "`{expected}` missing from:\n{text}"
        );
    }
    assert!(!text.contains('✗'), "{text}");
    // The service graph shows the refused edges with their counts.
    let graph_line = |from: &str, to: &str| {
        text.lines()
            .find(|l| l.contains(from) && l.contains(&format!("→ {to} ")))
            .unwrap_or_else(|| panic!("no `{from} → {to}` line in:\n{text}"))
            .to_owned()
    };
    assert!(graph_line("batch/sa/report", "orders.shop.west").ends_with("allow 2, 429 1"));
    assert!(graph_line("shop/sa/web", "orders.shop.west").contains("deny 2"));
    // The configs it wrote are the ones `meshgate gateway` takes.
    let check = Command::new(BIN)
        .args(["gateway", "--check", "--config"])
        .arg(dir.join("west/gateway.toml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    // It never writes over an existing directory without being told to.
    let again = Command::new(BIN)
        .args(["demo", "--exit", "--dir"])
        .arg(&dir)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert!(
        dir.join("west/state/db").is_dir(),
        "the existing demo was left alone"
    );
}
