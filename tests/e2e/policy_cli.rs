//! `meshgate policy …` and `meshgate audit …` run as a user runs them: the real binary, the
//! shipped example policies, a real sled state directory.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

use meshgate_policy::{DecisionLog, DecisionRecordInput, PolicyEngine, RequestFacts};
use tempfile::TempDir;

pub(crate) fn meshgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(args)
        .output()
        .expect("run meshgate")
}

pub(crate) fn text(o: &Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

pub(crate) fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn policies() -> String {
    examples().join("policies").display().to_string()
}

const WEB: &str = "spiffe://east.example/ns/shop/sa/web";

#[test]
fn validate_accepts_the_examples_and_locates_a_typo() {
    let (code, out, _) = text(&meshgate(&["policy", "validate", &policies()]));
    assert_eq!(code, 0);
    assert!(
        out.starts_with("valid: 3 policies, 1 templates, 1 template links"),
        "{out}"
    );

    let dir = TempDir::new().unwrap();
    let file = dir.path().join("typo.cedar");
    std::fs::write(&file, "@id(\"typo\")\npermit (principal, action, resource)\nwhen { principal.namespce == \"shop\" };\n")
        .unwrap();
    let (code, _, err) = text(&meshgate(&[
        "policy",
        "validate",
        &dir.path().display().to_string(),
    ]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("{}:3:8", file.display())), "{err}");
    assert!(
        err.contains("attribute `namespce` on entity type `Workload` not found"),
        "{err}"
    );
    assert!(err.contains("help: did you mean `namespace`?"), "{err}");
}

#[test]
fn check_prints_the_decision_and_its_reasons_as_json() {
    let allow = meshgate(&[
        "policy",
        "check",
        &policies(),
        "--principal",
        WEB,
        "--action",
        "GET",
        "--resource",
        "orders.shop.west",
        "--context",
        r#"{"path":"/v1/orders/42"}"#,
        "--json",
    ]);
    let (code, out, err) = text(&allow);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["decision"], "allow");
    assert_eq!(v["reasons"], serde_json::json!(["shop-reads-orders"]));
    assert_eq!(v["quota"], "100/s burst 20 key principal");

    // A deny is an answer, not a failure: exit 0.
    let deny = meshgate(&[
        "policy",
        "check",
        &policies(),
        "--principal",
        WEB,
        "--action",
        "GET",
        "--resource",
        "orders.shop.west",
        "--context",
        r#"{"path":"/v1/../admin/users"}"#,
        "--json",
    ]);
    let (code, out, _) = text(&deny);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["decision"].as_str(), v["path"].as_str()),
        (Some("deny"), Some("/admin/users"))
    );
    assert_eq!(v["reasons"], serde_json::json!(["no-admin-paths"]));

    // Malformed input: exit 2.
    let (code, _, err) = text(&meshgate(&[
        "policy",
        "check",
        &policies(),
        "--principal",
        "web",
        "--action",
        "GET",
        "--resource",
        "orders.shop.west",
    ]));
    assert_eq!(code, 2);
    assert!(
        err.contains("caller `web` is not a valid SPIFFE ID"),
        "{err}"
    );
    let (code, _, err) = text(&meshgate(&[
        "policy",
        "check",
        &policies(),
        "--principal",
        WEB,
        "--action",
        "GET",
        "--resource",
        "orders.shop.west",
        "--context",
        r#"{"pth":"/"}"#,
    ]));
    assert_eq!(code, 2);
    assert!(
        err.contains("`--context` is not a valid context object"),
        "{err}"
    );
}

#[test]
fn test_cases_pass_and_a_failing_case_exits_1_with_its_deciding_policy() {
    let cases = examples().join("policy-tests.toml").display().to_string();
    let (code, out, err) = text(&meshgate(&["policy", "test", &policies(), &cases]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("6 passed, 0 failed"), "{out}");

    let dir = TempDir::new().unwrap();
    let bad = dir.path().join("cases.toml");
    std::fs::write(
        &bad,
        format!(
            "[[case]]\nname = \"admin reachable\"\nprincipal = \"{WEB}\"\naction = \"GET\"\nresource = \"orders.shop.west\"\ncontext = {{ path = \"//admin\" }}\nexpect = \"allow\"\n"
        ),
    )
    .unwrap();
    let (code, out, _) = text(&meshgate(&[
        "policy",
        "test",
        &policies(),
        &bad.display().to_string(),
    ]));
    assert_eq!(code, 1);
    assert!(
        out.contains("FAIL admin reachable: expected allow, got deny"),
        "{out}"
    );
    assert!(out.contains("determined by: no-admin-paths"), "{out}");
}

/// A state directory as `meshgate` lays it out, with a decision log of `n` real decisions.
pub(crate) fn state_with_log(n: usize) -> TempDir {
    let dir = TempDir::new().unwrap();
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir.path().join("keys"))
        .unwrap();
    // A state as `identity init` leaves it: the sled database exists (identity lives there).
    drop(
        sled::Config::new()
            .path(dir.path().join("db"))
            .cache_capacity(4 << 20)
            .open()
            .unwrap(),
    );
    let log = DecisionLog::open(&dir.path().join("audit"), None, Default::default()).unwrap();
    let engine = PolicyEngine::load(&examples().join("policies"), None).unwrap();
    for i in 0..n {
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        let facts = RequestFacts {
            caller: WEB.to_owned(),
            service: "orders.shop.west".to_owned(),
            destination_trust_domain: "west.example".to_owned(),
            method: method.to_owned(),
            raw_path: format!("/v1/orders/{i}"),
            headers: Vec::new(),
            source_cluster: "east".to_owned(),
            destination_cluster: "west".to_owned(),
            mtls: true,
            time: SystemTime::now(),
            claims: None,
            service_labels: Default::default(),
        };
        log.append(DecisionRecordInput::from_decision(
            &facts,
            &engine.decide(&facts),
        ))
        .unwrap();
    }
    drop(log);
    dir
}

#[test]
fn audit_verify_passes_then_names_the_tampered_record() {
    let state = state_with_log(6);
    let s = state.path().display().to_string();
    let (code, out, err) = text(&meshgate(&["audit", "checkpoint", &s]));
    assert_eq!(code, 0, "{err}");
    let cp: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        cp["seq"], 7,
        "the admin event is recorded before the head is signed"
    );
    let key = state.path().join("keys/audit-checkpoint.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let (code, out, err) = text(&meshgate(&["audit", "verify", &s]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ok: 7 records (seq 1 to 7), "), "{out}");

    let (code, out, _) = text(&meshgate(&[
        "audit",
        "query",
        &s,
        "--decision",
        "allow",
        "--json",
    ]));
    assert_eq!(code, 0);
    let records: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(records.len(), 3);
    assert_eq!(
        records[0]["reasons"],
        serde_json::json!(["shop-reads-orders"])
    );
    let (_, out, _) = text(&meshgate(&["audit", "export", &s, "--format", "jsonl"]));
    assert_eq!(out.lines().count(), 7);
    let (_, out, _) = text(&meshgate(&["audit", "checkpoints", &s]));
    let heads: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(heads.last().unwrap()["seq"], 7, "{out}");

    // Replay against a set without the POST-denying default: GETs flip to deny (exit 1,
    // so a CI job fails on it).
    let strict = TempDir::new().unwrap();
    std::fs::write(
        strict.path().join("p.cedar"),
        "@id(\"nothing\") forbid (principal, action, resource);",
    )
    .unwrap();
    let (code, out, err) = text(&meshgate(&[
        "policy",
        "replay",
        "--log",
        &s,
        "--policies",
        &strict.path().display().to_string(),
        "--json",
    ]));
    assert_eq!(code, 1, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["summary"]["allow_to_deny"], 3);
    assert_eq!(
        v["flips"][0]["before"]["reasons"],
        serde_json::json!(["shop-reads-orders"])
    );
    assert_eq!(
        v["flips"][0]["after"]["reasons"],
        serde_json::json!(["nothing"])
    );

    // Edit record 4 behind the log's back.
    crate::support::edit_record(state.path(), 4, |body| {
        body.replace("\"deny\"", "\"allow\"")
    });
    let (code, out, _) = text(&meshgate(&["audit", "verify", &s]));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("first bad record seq 4: record 4 does not match its hash (edited)"),
        "{out}"
    );
}

#[test]
fn audit_verify_of_unreadable_state_exits_3() {
    let dir = TempDir::new().unwrap();
    let (code, _, err) = text(&meshgate(&[
        "audit",
        "verify",
        &dir.path().join("nope").display().to_string(),
    ]));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("is not a meshgate state directory"), "{err}");
}
