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

/// Two clusters' state directories, bundles, a workload SVID and configs, ready to spawn.
pub struct Setup {
    pub tmp: tempfile::TempDir,
    pub east_ports: [SocketAddr; 4],
    pub west_ports: [SocketAddr; 4],
}

impl Setup {
    pub fn new(upstream: SocketAddr) -> Setup {
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
        let east = config(
            "east",
            "west",
            &dir.join("east"),
            dir,
            &east_ports,
            west_ports[1],
            None,
        );
        std::fs::write(dir.join("east.toml"), east).unwrap();
        let west = config(
            "west",
            "east",
            &dir.join("west"),
            dir,
            &west_ports,
            east_ports[1],
            Some(upstream),
        );
        std::fs::write(dir.join("west.toml"), west).unwrap();
        Setup {
            tmp,
            east_ports,
            west_ports,
        }
    }

    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// Starts `meshgate gateway --config <name>` and waits for its admin listener.
    pub fn spawn(&self, name: &str) -> Proc {
        let proc = Proc(
            Command::new(BIN)
                .args(["gateway", "--config"])
                .arg(self.dir().join(name))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_listening(if name.starts_with("east") {
            self.east_ports[2]
        } else {
            self.west_ports[2]
        });
        proc
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_processes_and_curl() {
    let upstream = echo_upstream().await;
    let setup = Setup::new(upstream);
    let dir = setup.dir();
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let (east_ports, west_ports) = (setup.east_ports, setup.west_ports);

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

    let west = setup.spawn("west.toml");
    let east = setup.spawn("east.toml");

    let web = dir.join("web");
    let out = crate::procs::tokio_tool("curl")
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
    let metrics = crate::procs::tokio_tool("curl")
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

/// Fault suite: `kill -9` of the destination gateway under load. Every response that came
/// back carries a decision id that is in a decision log after the restart, and the chain
/// verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_answered_decision() {
    use std::sync::{Arc, Mutex};
    let upstream = echo_upstream().await;
    let setup = Setup::new(upstream);
    let dir = setup.dir().to_path_buf();
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let mut west = setup.spawn("west.toml");
    let _east = setup.spawn("east.toml");
    let client = Arc::new(crate::support::Client::from_files(
        &dir.join("web"),
        setup.east_ports[0],
    ));
    let answered: Arc<Mutex<Vec<(u16, String)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for worker in 0..4 {
        let (client, answered, stop) = (client.clone(), answered.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                if let Ok(reply) = client
                    .get("orders.shop.west.mesh", &format!("/v1/orders/{worker}-{i}"))
                    .await
                    && let Some(id) = reply.headers.get("x-meshgate-decision-id")
                {
                    answered
                        .lock()
                        .unwrap()
                        .push((reply.status.as_u16(), id.to_str().unwrap().to_owned()));
                }
            }
        }));
    }
    let ok = |a: &Arc<Mutex<Vec<(u16, String)>>>| {
        a.lock().unwrap().iter().filter(|(s, _)| *s == 200).count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while ok(&answered) < 40 {
        assert!(std::time::Instant::now() < deadline, "no load got through");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    west.0.kill().unwrap(); // SIGKILL, mid-traffic
    west.0.wait().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    assert!(
        answered.iter().any(|(status, _)| *status != 200),
        "calls after the kill were refused, not hung"
    );

    // Restart west on the same state and ports; its log must verify and hold every decision
    // it answered before it died.
    let _west = setup.spawn("west.toml");
    meshgate(&["audit", "verify", &s(&dir.join("west"))]);
    let west_log = String::from_utf8(
        meshgate(&[
            "audit",
            "export",
            &s(&dir.join("west")),
            "--format",
            "jsonl",
        ])
        .stdout,
    )
    .unwrap();
    drop(_east);
    let east_log = String::from_utf8(
        meshgate(&[
            "audit",
            "export",
            &s(&dir.join("east")),
            "--format",
            "jsonl",
        ])
        .stdout,
    )
    .unwrap();
    let mut missing = Vec::new();
    for (status, id) in &answered {
        if !west_log.contains(id.as_str()) && !east_log.contains(id.as_str()) {
            missing.push(format!("{status} {id}"));
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} answered requests have no decision record: {missing:?}",
        missing.len(),
        answered.len()
    );
}
