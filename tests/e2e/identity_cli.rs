//! `meshgate identity …` end to end: the built binary, real files, `openssl verify`, `curl`,
//! and the agent against `identity serve`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn meshgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(args)
        .output()
        .expect("run meshgate")
}

fn ok(args: &[&str]) -> String {
    let out = meshgate(args);
    assert!(
        out.status.success(),
        "`meshgate {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn exit_code(args: &[&str]) -> (i32, String) {
    let out = meshgate(args);
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn openssl_verify(bundle: &Path, svid: &Path) {
    let out = crate::procs::tool("openssl")
        .args(["verify", "-CAfile"])
        .arg(bundle)
        .arg(svid)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn init_issue_bundle_and_openssl_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let out = tmp.path().join("out");
    ok(&[
        "identity",
        "init",
        "--state",
        s(&state),
        "--trust-domain",
        "east.example",
    ]);

    let json = ok(&[
        "identity",
        "issue",
        "--state",
        s(&state),
        "--spiffe-id",
        "spiffe://east.example/ns/shop/sa/web",
        "--out",
        s(&out),
        "--ttl",
        "30m",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["spiffe_id"], "spiffe://east.example/ns/shop/sa/web");
    openssl_verify(&out.join("bundle.pem"), &out.join("svid.pem"));
    let key = std::fs::read_to_string(out.join("key.pem")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let spiffe = ok(&["identity", "bundle", "--state", s(&state)]);
    let doc: serde_json::Value = serde_json::from_str(&spiffe).unwrap();
    assert!(doc["keys"].as_array().unwrap().len() >= 2);
    let pem = ok(&[
        "identity",
        "bundle",
        "--state",
        s(&state),
        "--format",
        "pem",
    ]);
    assert_eq!(
        pem,
        std::fs::read_to_string(out.join("bundle.pem")).unwrap()
    );

    // Rotation: the prepared root is published, and the old SVID still verifies after.
    ok(&["identity", "rotate", "prepare", "--state", s(&state)]);
    ok(&["identity", "rotate", "activate", "--state", s(&state)]);
    let pem = ok(&[
        "identity",
        "bundle",
        "--state",
        s(&state),
        "--format",
        "pem",
    ]);
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2);
    let rotated = tmp.path().join("rotated.pem");
    std::fs::write(&rotated, pem).unwrap();
    openssl_verify(&rotated, &out.join("svid.pem"));
    let (code, _) = exit_code(&["identity", "rotate", "activate", "--state", s(&state)]);
    assert_eq!(code, 2, "nothing prepared");
}

#[test]
fn malformed_input_exits_2_and_io_failures_exit_3() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let out = tmp.path().join("out");
    ok(&[
        "identity",
        "init",
        "--state",
        s(&state),
        "--trust-domain",
        "east.example",
    ]);
    let other = tmp.path().join("other");
    let cases: &[&[&str]] = &[
        &[
            "identity",
            "issue",
            "--state",
            s(&state),
            "--spiffe-id",
            "spiffe://east.example/a/../b",
            "--out",
            s(&out),
        ],
        &[
            "identity",
            "issue",
            "--state",
            s(&state),
            "--spiffe-id",
            "spiffe://west.example/a",
            "--out",
            s(&out),
        ],
        &[
            "identity",
            "issue",
            "--state",
            s(&state),
            "--spiffe-id",
            "spiffe://east.example/a",
            "--out",
            s(&out),
            "--ttl",
            "soon",
        ],
        &[
            "identity",
            "init",
            "--state",
            s(&state),
            "--trust-domain",
            "east.example",
        ],
        &[
            "identity",
            "init",
            "--state",
            s(&other),
            "--trust-domain",
            "East",
        ],
        &[
            "identity",
            "entry",
            "delete",
            "--state",
            s(&state),
            "--spiffe-id",
            "spiffe://east.example/none",
        ],
    ];
    for args in cases {
        let (code, stderr) = exit_code(args);
        assert_eq!(code, 2, "`{}`: {stderr}", args.join(" "));
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error:") && first.len() > 10,
            "a one-line reason first: {stderr}"
        );
    }
    let (code, stderr) = exit_code(&[
        "identity",
        "issue",
        "--state",
        s(&state),
        "--spiffe-id",
        "spiffe://west.example/a",
        "--out",
        s(&out),
    ]);
    assert!(
        stderr.contains("outside trust domain `east.example`"),
        "{stderr}"
    );
    assert_eq!(code, 2);
    assert!(!out.exists(), "refused input wrote nothing");
    let (code, _) = exit_code(&[
        "identity",
        "bundle",
        "--state",
        s(&tmp.path().join("missing")),
    ]);
    assert_eq!(code, 3);
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The gateway's reserved ID (`spiffe://<td>/meshgate/gateway`) is never issued by the CLI:
/// a certificate for it would let its holder act as this cluster's gateway to its peers.
#[test]
fn the_gateway_id_is_never_issued() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let out = tmp.path().join("out");
    ok(&[
        "identity",
        "init",
        "--state",
        s(&state),
        "--trust-domain",
        "east.example",
    ]);
    let (code, stderr) = exit_code(&[
        "identity",
        "issue",
        "--state",
        s(&state),
        "--spiffe-id",
        "spiffe://east.example/meshgate/gateway",
        "--out",
        s(&out),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("`spiffe://east.example/meshgate/gateway` is reserved for the gateway"),
        "{stderr}"
    );
    assert!(!out.join("svid.pem").exists());
    // Other IDs under `/meshgate/` are ordinary workload IDs (only the gateway's is reserved).
    ok(&[
        "identity",
        "issue",
        "--state",
        s(&state),
        "--spiffe-id",
        "spiffe://east.example/meshgate/probe",
        "--out",
        s(&out),
    ]);
}

fn wait_for_file(path: &Path, timeout: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < timeout,
            "`{}` did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_and_agent_issue_over_https() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    ok(&[
        "identity",
        "init",
        "--state",
        s(&state),
        "--trust-domain",
        "east.example",
    ]);
    let id = "spiffe://east.example/ns/shop/sa/web";
    let entry = ok(&[
        "identity",
        "entry",
        "create",
        "--state",
        s(&state),
        "--spiffe-id",
        id,
        "--ttl",
        "10m",
        "--json",
    ]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&entry).unwrap()["ttl_secs"],
        600
    );
    let list: serde_json::Value = serde_json::from_str(&ok(&[
        "identity",
        "entry",
        "list",
        "--state",
        s(&state),
        "--json",
    ]))
    .unwrap();
    assert_eq!(list[0]["spiffe_id"], id);
    let token: serde_json::Value = serde_json::from_str(&ok(&[
        "identity",
        "token",
        "create",
        "--state",
        s(&state),
        "--spiffe-id",
        id,
        "--json",
    ]))
    .unwrap();
    let token = token["token"].as_str().unwrap().to_owned();
    let bootstrap = tmp.path().join("bootstrap.pem");
    std::fs::write(
        &bootstrap,
        ok(&[
            "identity",
            "bundle",
            "--state",
            s(&state),
            "--format",
            "pem",
        ]),
    )
    .unwrap();

    let mut serve = Killed(
        Command::new(env!("CARGO_BIN_EXE_meshgate"))
            .args([
                "identity",
                "serve",
                "--state",
                s(&state),
                "--listen",
                "127.0.0.1:0",
                "--dns-name",
                "localhost",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(serve.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected: {line}"))
        .to_owned();
    let port = addr.rsplit(':').next().unwrap();

    // A standard client verifies the issuer by DNS name with bundle.pem as CA.
    let curl = crate::procs::tool("curl")
        .args([
            "-sS",
            "--fail",
            "--cacert",
            s(&bootstrap),
            &format!("https://localhost:{port}/v1/bundle"),
        ])
        .output()
        .unwrap();
    assert!(
        curl.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&curl.stderr)
    );
    assert!(String::from_utf8_lossy(&curl.stdout).contains("x509-svid"));

    let out = tmp.path().join("agent");
    let _agent = Killed(
        Command::new(env!("CARGO_BIN_EXE_meshgate"))
            .args([
                "identity",
                "agent",
                "--issuer",
                &format!("https://{addr}"),
                "--bundle",
                s(&bootstrap),
            ])
            .args(["--token", &token, "--out", s(&out)])
            .spawn()
            .unwrap(),
    );
    wait_for_file(&out.join("bundle.pem"), Duration::from_secs(60));
    openssl_verify(&out.join("bundle.pem"), &out.join("svid.pem"));
    let cert = crate::procs::tool("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(out.join("svid.pem"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&cert.stdout).contains(id));

    // The token is spent: a second agent is refused with exit 2.
    let (code, stderr) = exit_code(&[
        "identity",
        "agent",
        "--issuer",
        &format!("https://{addr}"),
        "--bundle",
        s(&bootstrap),
        "--token",
        &token,
        "--out",
        s(&tmp.path().join("second")),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("already used"), "{stderr}");
}

#[test]
fn admin_actions_on_a_stopped_gateway_are_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    ok(&[
        "identity",
        "init",
        "--state",
        s(&state),
        "--trust-domain",
        "east.example",
    ]);
    ok(&[
        "identity",
        "entry",
        "create",
        "--state",
        s(&state),
        "--spiffe-id",
        "spiffe://east.example/ns/shop/sa/web",
    ]);
    ok(&[
        "identity",
        "token",
        "create",
        "--state",
        s(&state),
        "--spiffe-id",
        "spiffe://east.example/ns/shop/sa/web",
    ]);
    ok(&["identity", "rotate", "prepare", "--state", s(&state)]);
    let out = tmp.path().join("out");
    ok(&[
        "identity",
        "issue",
        "--state",
        s(&state),
        "--spiffe-id",
        "spiffe://east.example/ns/shop/sa/api",
        "--out",
        s(&out),
    ]);
    let events = ok(&["audit", "query", s(&state), "--decision", "admin", "--json"]);
    for what in [
        "identity entry create `spiffe://east.example/ns/shop/sa/web`",
        "identity token create",
        "identity rotate prepare",
        "identity issue `spiffe://east.example/ns/shop/sa/api`",
    ] {
        assert!(events.contains(what), "`{what}` not recorded in {events}");
    }
    ok(&["audit", "checkpoint", s(&state)]);
    ok(&["audit", "verify", s(&state)]);
    // A checkpoint key that is not the one the log was signed with is tampering (exit 1):
    // verification checks the key file, not only the key pinned inside the database.
    let key = state.join("keys/audit-checkpoint.pem");
    let other = tmp.path().join("other");
    ok(&[
        "identity",
        "init",
        "--state",
        s(&other),
        "--trust-domain",
        "other.example",
    ]);
    ok(&["audit", "checkpoint", s(&other)]);
    std::fs::copy(other.join("keys/audit-checkpoint.pem"), &key).unwrap();
    let out = meshgate(&["audit", "verify", s(&state)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("audit-checkpoint.pem"), "{text}");
}
