//! `meshgate gateway --config` as real processes: two clusters from TOML configs, a real
//! upstream, `curl` through them, Ctrl-C drains, and the decision log afterwards.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::procs::{BIN, Proc, free_tcp, free_udp, meshgate, wait_listening};
use crate::support::echo_upstream;

fn config(
    cluster: &str,
    peer: &str,
    state: &Path,
    dir: &Path,
    ports: &[SocketAddr; 4],
    peer_tunnel: SocketAddr,
    upstream: Option<SocketAddr>,
) -> String {
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policies");
    let [workload, tunnel, admin, _] = ports;
    let mut text = format!(
        r#"cluster = "{cluster}"
trust_domain = "{cluster}.example"
state_dir = "{state}"
[listeners]
workload = "{workload}"
tunnel = "{tunnel}"
admin = "{admin}"
[policy]
dir = "{policies}"
[[peers]]
cluster = "{peer}"
trust_domain = "{peer}.example"
gateways = ["{peer_tunnel}"]
bundle = "{dir}/{peer}-bundle.json"
services = ["orders.shop"]
"#,
        state = state.display(),
        policies = policies.display(),
        dir = dir.display(),
    );
    if let Some(up) = upstream {
        text.push_str(&format!("[[services]]\nname = \"orders\"\nnamespace = \"shop\"\nendpoints = [\"{up}\"]\nexport_to = [\"east\"]\n"));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_processes_and_curl() {
    let upstream = echo_upstream().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let s = |p: &Path| p.to_string_lossy().into_owned();
    for (cluster, td) in [("east", "east.example"), ("west", "west.example")] {
        meshgate(&[
            "identity",
            "init",
            "--state",
            &s(&dir.join(cluster)),
            "--trust-domain",
            td,
        ]);
        let bundle = meshgate(&["identity", "bundle", "--state", &s(&dir.join(cluster))]);
        std::fs::write(dir.join(format!("{cluster}-bundle.json")), bundle.stdout).unwrap();
    }
    // The workload's SVID, issued before the gateway takes the state.
    meshgate(&[
        "identity",
        "issue",
        "--state",
        &s(&dir.join("east")),
        "--spiffe-id",
        "spiffe://east.example/ns/shop/sa/web",
        "--out",
        &s(&dir.join("web")),
    ]);
    let east_ports = [free_tcp(), free_udp(), free_tcp(), free_tcp()];
    let west_ports = [free_tcp(), free_udp(), free_tcp(), free_tcp()];
    std::fs::write(
        dir.join("east.toml"),
        config(
            "east",
            "west",
            &dir.join("east"),
            dir,
            &east_ports,
            west_ports[1],
            None,
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("west.toml"),
        config(
            "west",
            "east",
            &dir.join("west"),
            dir,
            &west_ports,
            east_ports[1],
            Some(upstream),
        ),
    )
    .unwrap();

    // A typo in the config is refused with the key named.
    std::fs::write(
        dir.join("typo.toml"),
        std::fs::read_to_string(dir.join("east.toml"))
            .unwrap()
            .replace("tunnel =", "tunel ="),
    )
    .unwrap();
    let typo = Command::new(BIN)
        .args(["gateway", "--config", &s(&dir.join("typo.toml"))])
        .output()
        .unwrap();
    assert_eq!(typo.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&typo.stderr).contains("tunel"),
        "{}",
        String::from_utf8_lossy(&typo.stderr)
    );

    let spawn = |name: &str| {
        Proc(
            Command::new(BIN)
                .args(["gateway", "--config", &s(&dir.join(name))])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let west = spawn("west.toml");
    let east = spawn("east.toml");
    wait_listening(west_ports[2]);
    wait_listening(east_ports[2]);

    let web = dir.join("web");
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--fail-with-body",
            "--cacert",
            &s(&web.join("bundle.pem")),
            "--cert",
            &s(&web.join("svid.pem")),
            "--key",
            &s(&web.join("key.pem")),
        ])
        .args([
            "-H",
            "host: orders.shop.west.mesh",
            "-D",
            "-",
            &format!("https://localhost:{}/v1/orders/42", east_ports[0].port()),
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("\"caller\":\"spiffe://east.example/ns/shop/sa/web\""),
        "{text}"
    );
    assert!(
        text.to_ascii_lowercase()
            .contains("x-meshgate-decision-id:"),
        "{text}"
    );

    // Metrics count the request.
    let metrics = tokio::process::Command::new("curl")
        .args(["-sS", &format!("http://{}/metrics", west_ports[2])])
        .output()
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    assert!(
        metrics.contains("meshgate_requests_total{direction=\"inbound\""),
        "{metrics}"
    );

    // Stop both (SIGKILL here; the log is durable before any answer), then audit West's log.
    drop(east);
    drop(west);
    let query = meshgate(&[
        "audit",
        "query",
        &s(&dir.join("west")),
        "--decision",
        "allow",
        "--json",
    ]);
    let q = String::from_utf8_lossy(&query.stdout);
    assert!(q.contains("spiffe://east.example/ns/shop/sa/web"), "{q}");
    meshgate(&["audit", "verify", &s(&dir.join("west"))]);
}
