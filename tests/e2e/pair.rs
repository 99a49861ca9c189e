//! Two gateway processes, `west` and `east`, linked by `[[peers]]` blocks, each serving
//! `orders.shop` from a shared echo upstream: the setup of tests that stop, restart, kill
//! and roll back real gateways.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::procs::{
    BIN, Proc, READY_TIMEOUT, arg, free_tcp, free_udp, meshgate, tool, wait_admin_socket,
    wait_listening,
};

pub const WEB: &str = "spiffe://west.example/ns/shop/sa/web";
/// `web` of `east`, calling west's `orders` across the tunnel.
pub const EAST_WEB: &str = "spiffe://east.example/ns/shop/sa/web";
const POLICY: &str = r#"@id("web-reads-orders")
permit (
  principal == Workload::"spiffe://west.example/ns/shop/sa/web",
  action in Action::"read",
  resource == Service::"orders.shop.west"
);
@id("east-web-reads-orders")
permit (
  principal == Workload::"spiffe://east.example/ns/shop/sa/web",
  action in Action::"read",
  resource == Service::"orders.shop.west"
);
"#;

pub struct Cluster {
    pub name: &'static str,
    pub dir: PathBuf,
    pub workload: SocketAddr,
    pub tunnel: SocketAddr,
    pub admin: SocketAddr,
    /// The console's address; it runs when `console_access` is set (`mtls` or
    /// `insecure_loopback`) before `write_config`.
    pub console: SocketAddr,
    pub console_access: Option<&'static str>,
}

impl Cluster {
    pub fn new(root: &Path, name: &'static str) -> Cluster {
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        std::fs::write(dir.join("policies/orders.cedar"), POLICY).unwrap();
        meshgate(&[
            "identity",
            "init",
            "--state",
            &arg(&dir.join("state")),
            "--trust-domain",
            &format!("{name}.example"),
        ]);
        let bundle = meshgate(&["identity", "bundle", "--state", &arg(&dir.join("state"))]);
        std::fs::write(dir.join("bundle.json"), bundle.stdout).unwrap();
        Cluster {
            name,
            dir,
            workload: free_tcp(),
            tunnel: free_udp(),
            admin: free_tcp(),
            console: free_tcp(),
            console_access: None,
        }
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn write_config(&self, peer: &Cluster, upstream: SocketAddr, witness_check: &str) {
        let (console_listener, console) = match self.console_access {
            Some(access) => (
                format!("console = \"{}\"\n", self.console),
                format!(
                    "[console]\naccess = \"{access}\"\n[telemetry]\ntrace_url = \"http://traces.example/trace/{{trace_id}}\"\n"
                ),
            ),
            None => (String::new(), String::new()),
        };
        let text = format!(
            r#"cluster = "{name}"
trust_domain = "{name}.example"
state_dir = "state"
[listeners]
workload = "{workload}"
tunnel = "{tunnel}"
admin = "{admin}"
{console_listener}{console}[policy]
dir = "policies"
[audit]
witness_check = "{witness_check}"
[limits]
# Far longer than any test waits: a test that passes shows the stale connection was dropped
# at once (CONNECTION_CLOSE, stateless reset), not after the idle timeout.
peer_dead_after = "120s"
[[services]]
name = "orders"
namespace = "shop"
endpoints = ["{upstream}"]
export_to = ["*"]
[[peers]]
cluster = "{peer}"
trust_domain = "{peer}.example"
gateways = ["{peer_tunnel}"]
bundle = "../{peer}/bundle.json"
services = ["orders.shop"]
"#,
            name = self.name,
            workload = self.workload,
            tunnel = self.tunnel,
            admin = self.admin,
            peer = peer.name,
            peer_tunnel = peer.tunnel,
        );
        std::fs::write(self.dir.join("gateway.toml"), text).unwrap();
    }

    pub fn spawn(&self) -> Proc {
        Proc(
            Command::new(BIN)
                .args(["gateway", "--config", &arg(&self.dir.join("gateway.toml"))])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    pub fn start(&self) -> Proc {
        let p = self.spawn();
        wait_listening(self.admin);
        wait_admin_socket(&self.state());
        if self.console_access.is_some() {
            wait_listening(self.console);
        }
        p
    }

    /// The `/metrics` text of the admin listener.
    pub fn metrics(&self) -> String {
        let out = tool("curl")
            .args(["-sS", &format!("http://{}/metrics", self.admin)])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// `web` calls `orders` on west's own workload listener: each call is a decision record.
pub fn call_orders(west: &Cluster, web: &Path, n: usize) {
    for _ in 0..n {
        assert_eq!(call(west, web, "orders.shop.west.mesh"), "200");
    }
}

/// One `GET /v1/orders` to `host` by the workload whose SVID files are in `web`, through
/// `via`'s workload listener: the HTTP status curl saw (`000` when none).
pub fn call(via: &Cluster, web: &Path, host: &str) -> String {
    let out = tool("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["--cacert", &arg(&web.join("bundle.pem"))])
        .args(["--cert", &arg(&web.join("svid.pem"))])
        .args(["--key", &arg(&web.join("key.pem"))])
        .args(["-H", &format!("host: {host}")])
        .arg(format!(
            "https://localhost:{}/v1/orders",
            via.workload.port()
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Issues an SVID for `spiffe_id` from `cluster`'s state into `dir` (svid.pem, key.pem,
/// bundle.pem).
pub fn issue(cluster: &Cluster, spiffe_id: &str, dir: &Path) {
    meshgate(&[
        "identity",
        "issue",
        "--state",
        &arg(&cluster.state()),
        "--spiffe-id",
        spiffe_id,
        "--out",
        &arg(dir),
    ]);
}

pub fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + READY_TIMEOUT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// West and east in a temp dir, linked both ways and configured (`witness_check = "warn"`),
/// serving `orders.shop` from one echo upstream that runs on `runtime` (keep it alive).
pub struct Pair {
    pub runtime: tokio::runtime::Runtime,
    pub upstream: SocketAddr,
    pub tmp: tempfile::TempDir,
    pub west: Cluster,
    pub east: Cluster,
}

impl Pair {
    pub fn new() -> Pair {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let upstream = rt.block_on(crate::support::echo_upstream());
        let tmp = tempfile::tempdir().unwrap();
        let west = Cluster::new(tmp.path(), "west");
        let east = Cluster::new(tmp.path(), "east");
        west.write_config(&east, upstream, "warn");
        east.write_config(&west, upstream, "warn");
        Pair {
            runtime: rt,
            upstream,
            tmp,
            west,
            east,
        }
    }
}
