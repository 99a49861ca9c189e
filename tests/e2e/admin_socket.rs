//! The admin socket with a real `meshgate gateway` process: while it runs, every CLI command
//! that reads or changes the state (identity entries, tokens, issue, bundle, rotate; audit;
//! policy reload and replay; federation links) works, the state commands going through
//! `STATE/admin.sock` and are recorded as admin events; after a clean stop they open the
//! state directly again.

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::procs::{
    BIN, Proc, arg, free_tcp, free_udp, interrupt, meshgate, run, tool, wait_admin_socket,
    wait_listening,
};
use crate::support::echo_upstream;

const WEB: &str = "spiffe://west.example/ns/shop/sa/web";
const API: &str = "spiffe://west.example/ns/shop/sa/api";
const BATCH: &str = "spiffe://west.example/ns/shop/sa/batch";

const V1: &str = r#"@id("web-reads-orders")
permit (
  principal == Workload::"spiffe://west.example/ns/shop/sa/web",
  action in Action::"read",
  resource == Service::"orders.shop.west"
);
"#;

const BROKEN: &str = r#"@id("web-reads-orders")
permit (principal, action, resource) when { context.no_such_attribute };
"#;

const V2: &str = r#"@id("web-reads-v2-only")
permit (
  principal == Workload::"spiffe://west.example/ns/shop/sa/web",
  action in Action::"read",
  resource == Service::"orders.shop.west"
)
when { context.path like "/v2/*" };
"#;

fn config(state: &Path, policies: &Path, ports: &[SocketAddr; 3], upstream: SocketAddr) -> String {
    let [workload, tunnel, admin] = ports;
    format!(
        r#"cluster = "west"
trust_domain = "west.example"
state_dir = "{state}"
[listeners]
workload = "{workload}"
tunnel = "{tunnel}"
admin = "{admin}"
[policy]
dir = "{policies}"
[[services]]
name = "orders"
namespace = "shop"
endpoints = ["{upstream}"]
"#,
        state = state.display(),
        policies = policies.display(),
    )
}

/// The status `web` gets for `GET /v1/orders/42` through the gateway's workload listener.
async fn call_orders(web: &Path, port: u16) -> String {
    let out = crate::procs::tokio_tool("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["--cacert", &arg(&web.join("bundle.pem"))])
        .args(["--cert", &arg(&web.join("svid.pem"))])
        .args(["--key", &arg(&web.join("key.pem"))])
        .args(["-H", "host: orders.shop.west.mesh"])
        .arg(format!("https://localhost:{port}/v1/orders/42"))
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_state_commands_go_through_the_running_gateway() {
    let upstream = echo_upstream().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let state = dir.join("west");
    let st = arg(&state);
    let policies = dir.join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(policies.join("orders.cedar"), V1).unwrap();
    meshgate(&[
        "identity",
        "init",
        "--state",
        &st,
        "--trust-domain",
        "west.example",
    ]);
    meshgate(&[
        "identity",
        "issue",
        "--state",
        &st,
        "--spiffe-id",
        WEB,
        "--out",
        &arg(&dir.join("web")),
    ]);
    let ports = [free_tcp(), free_udp(), free_tcp()];
    std::fs::write(
        dir.join("west.toml"),
        config(&state, &policies, &ports, upstream),
    )
    .unwrap();
    let mut gateway = Proc(
        Command::new(BIN)
            .args(["gateway", "--config", &arg(&dir.join("west.toml"))])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(ports[2]);
    wait_admin_socket(&state);

    // Identity entries and tokens, through the socket (the gateway holds the database).
    let created = meshgate(&[
        "identity",
        "entry",
        "create",
        "--state",
        &st,
        "--spiffe-id",
        API,
    ]);
    assert_eq!(
        text(&created).0.trim(),
        format!("created entry `{API}` (ttl 3600s)")
    );
    let token = meshgate(&[
        "identity",
        "token",
        "create",
        "--state",
        &st,
        "--spiffe-id",
        API,
        "--json",
    ]);
    let token: serde_json::Value = serde_json::from_slice(&token.stdout).unwrap();
    assert!(
        token["token"].as_str().unwrap().starts_with("mgjt_"),
        "{token}"
    );
    assert_eq!(token["spiffe_id"], API);
    let list = meshgate(&["identity", "entry", "list", "--state", &st, "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|e| e["spiffe_id"] == API),
        "{list}"
    );
    // Bad input through the socket is still exit 2, with the issuer's message.
    let unknown = run(&[
        "identity",
        "token",
        "create",
        "--state",
        &st,
        "--spiffe-id",
        WEB,
    ]);
    assert_eq!(unknown.status.code(), Some(2), "{:?}", text(&unknown));
    assert!(
        text(&unknown).1.contains("no registration entry"),
        "{:?}",
        text(&unknown)
    );

    // The socket is the gateway user's only (checked after it served: it is set before accept).
    let meta = std::fs::metadata(state.join("admin.sock")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), std::fs::metadata(dir).unwrap().uid());

    // Policy reload: a broken set is refused with Cedar's diagnostic, the old set keeps deciding.
    let web = dir.join("web");
    assert_eq!(call_orders(&web, ports[0].port()).await, "200");
    std::fs::write(policies.join("orders.cedar"), BROKEN).unwrap();
    let refused = run(&["policy", "reload", "--state", &st]);
    let (_, err) = text(&refused);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(err.contains("refused"), "{err}");
    assert!(err.contains("orders.cedar:2:"), "{err}");
    assert!(err.contains("no_such_attribute"), "{err}");
    assert_eq!(call_orders(&web, ports[0].port()).await, "200");
    // A fixed set reloads: its version is printed and its decision applies.
    std::fs::write(policies.join("orders.cedar"), V2).unwrap();
    let reloaded = meshgate(&["policy", "reload", "--state", &st, "--json"]);
    let reloaded: serde_json::Value = serde_json::from_slice(&reloaded.stdout).unwrap();
    assert_eq!(reloaded["reloaded"], true, "{reloaded}");
    let version = reloaded["version"].as_str().unwrap().to_owned();
    assert_eq!(call_orders(&web, ports[0].port()).await, "403");

    // The decision log, read through the running gateway: decisions and admin events.
    let query = meshgate(&["audit", "query", &st, "--json"]);
    let records: Vec<serde_json::Value> = serde_json::from_slice(&query.stdout).unwrap();
    let admin: Vec<&str> = records
        .iter()
        .filter(|r| r["decision"] == "admin")
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    for what in [
        format!("identity entry create `{API}`"),
        format!("identity token create `{API}`"),
        "identity entry list".to_owned(),
        "policy reload".to_owned(),
        "audit query".to_owned(),
    ] {
        assert!(admin.contains(&what.as_str()), "{what} not in {admin:?}");
    }
    assert!(
        records
            .iter()
            .filter(|r| r["decision"] == "admin")
            .all(|r| r["principal"].as_str().unwrap().starts_with("uid:")),
        "{records:?}"
    );
    let allowed = records.iter().find(|r| r["decision"] == "allow").unwrap();
    assert_eq!(allowed["principal"], WEB);
    let denied = records.iter().find(|r| r["decision"] == "deny").unwrap();
    assert_eq!(denied["policy_version"], version.as_str());
    let verify = meshgate(&["audit", "verify", &st]);
    assert!(text(&verify).0.starts_with("ok: "), "{:?}", text(&verify));
    let export = meshgate(&["audit", "export", &st]);
    let lines = text(&export).0.lines().count();
    assert!(
        lines > records.len(),
        "{lines} lines, {} records",
        records.len()
    );

    // Every other command that reads or changes the state works while the gateway runs.
    // `identity issue`: the files, the key private, the SVID naming the ID.
    let api_dir = dir.join("api");
    let issued = meshgate(&[
        "identity",
        "issue",
        "--state",
        &st,
        "--spiffe-id",
        API,
        "--out",
        &arg(&api_dir),
        "--json",
    ]);
    let issued: serde_json::Value = serde_json::from_slice(&issued.stdout).unwrap();
    assert_eq!(issued["spiffe_id"], API, "{issued}");
    let key_mode = std::fs::metadata(api_dir.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let san = tool("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(api_dir.join("svid.pem"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&san.stdout).contains(API),
        "{san:?}"
    );
    // The gateway's own ID is never issued: its holder could pose as this gateway to peers.
    let gw_dir = dir.join("gw");
    let refused = crate::procs::run(&[
        "identity",
        "issue",
        "--state",
        &st,
        "--spiffe-id",
        "spiffe://west.example/meshgate/gateway",
        "--out",
        &arg(&gw_dir),
    ]);
    assert_eq!(refused.status.code(), Some(2), "{:?}", text(&refused));
    assert!(
        text(&refused).1.contains("reserved for the gateway"),
        "{:?}",
        text(&refused)
    );
    assert!(!gw_dir.join("key.pem").exists());
    // `identity bundle` in both formats, then `identity rotate prepare` adds a root to it.
    let roots = |st: &str| {
        let bundle = meshgate(&["identity", "bundle", "--state", st]);
        let bundle: serde_json::Value = serde_json::from_slice(&bundle.stdout).unwrap();
        bundle["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["use"] == "x509-svid")
            .count()
    };
    assert_eq!(roots(&st), 1);
    let pem = meshgate(&["identity", "bundle", "--state", &st, "--format", "pem"]);
    assert!(text(&pem).0.starts_with("-----BEGIN CERTIFICATE-----"));
    let prepared = meshgate(&["identity", "rotate", "prepare", "--state", &st]);
    assert!(
        text(&prepared).0.contains("prepared; bundle sequence"),
        "{:?}",
        text(&prepared)
    );
    assert_eq!(roots(&st), 2);
    // `identity entry delete`.
    for verb in ["create", "delete"] {
        meshgate(&[
            "identity",
            "entry",
            verb,
            "--state",
            &st,
            "--spiffe-id",
            BATCH,
        ]);
    }
    let list = meshgate(&["identity", "entry", "list", "--state", &st]);
    assert!(!text(&list).0.contains(BATCH), "{:?}", text(&list));
    // `audit checkpoint` and `audit checkpoints`.
    let signed = meshgate(&["audit", "checkpoint", &st]);
    assert!(!text(&signed).0.is_empty());
    let heads = meshgate(&["audit", "checkpoints", &st]);
    let heads: Vec<serde_json::Value> = serde_json::from_slice(&heads.stdout).unwrap();
    assert!(!heads.is_empty());
    // `policy replay` reads the log beside the running gateway: V1 flips the /v1 deny.
    let v1 = dir.join("v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("orders.cedar"), V1).unwrap();
    let replay = run(&["policy", "replay", "--log", &st, "--policies", &arg(&v1)]);
    assert_eq!(replay.status.code(), Some(1), "{:?}", text(&replay));
    assert!(text(&replay).0.contains("deny"), "{:?}", text(&replay));
    // `federation add|status|witnessed|remove`.
    let east = dir.join("east");
    meshgate(&[
        "identity",
        "init",
        "--state",
        &arg(&east),
        "--trust-domain",
        "east.example",
    ]);
    let east_bundle = meshgate(&["identity", "bundle", "--state", &arg(&east)]);
    std::fs::write(dir.join("east.json"), &east_bundle.stdout).unwrap();
    meshgate(&[
        "federation",
        "add",
        "--state",
        &st,
        "--cluster",
        "east",
        "--trust-domain",
        "east.example",
        "--gateway",
        &free_udp().to_string(),
        "--bundle",
        &arg(&dir.join("east.json")),
    ]);
    let status = meshgate(&["federation", "status", "--state", &st, "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(
        status
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["cluster"] == "east"),
        "{status}"
    );
    let witnessed = meshgate(&[
        "federation",
        "witnessed",
        "--state",
        &st,
        "--trust-domain",
        "east.example",
    ]);
    let witnessed: serde_json::Value = serde_json::from_slice(&witnessed.stdout).unwrap();
    assert!(witnessed["checkpoints"].is_array(), "{witnessed}");
    meshgate(&["federation", "remove", "--state", &st, "east"]);
    let status = meshgate(&["federation", "list", "--state", &st, "--json"]);
    assert!(
        !text(&status).0.contains("east.example"),
        "{:?}",
        text(&status)
    );
    // `audit prune` through the gateway: nothing is older than an hour, nothing goes.
    let pruned = meshgate(&["audit", "prune", &st, "--before", "1h", "--json"]);
    let pruned: serde_json::Value = serde_json::from_slice(&pruned.stdout).unwrap();
    assert_eq!(pruned["removed"], 0, "{pruned}");
    // `identity serve` would be a second issuer on the same state: it points to the
    // gateway's own issuer listener instead.
    let serve = run(&[
        "identity",
        "serve",
        "--state",
        &st,
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(serve.status.code(), Some(2), "{:?}", text(&serve));
    assert!(
        text(&serve).1.contains("listeners.issuer"),
        "{:?}",
        text(&serve)
    );
    // Each change above was recorded by the gateway as an admin event.
    let events = meshgate(&["audit", "query", &st, "--decision", "admin", "--json"]);
    let events: Vec<serde_json::Value> = serde_json::from_slice(&events.stdout).unwrap();
    let events: Vec<&str> = events
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    for what in [
        format!("identity issue `{API}`"),
        "identity rotate prepare".to_owned(),
        format!("identity entry delete `{BATCH}`"),
    ] {
        assert!(events.contains(&what.as_str()), "{what} not in {events:?}");
    }

    // A clean stop removes the socket; the same commands then open the state directly.
    assert!(interrupt(&mut gateway.0).success());
    assert!(!state.join("admin.sock").exists());
    let after = meshgate(&["audit", "query", &st, "--decision", "admin", "--json"]);
    let after: Vec<serde_json::Value> = serde_json::from_slice(&after.stdout).unwrap();
    assert!(after.len() >= admin.len() + 2, "{after:?}");
    let no_gateway = run(&["policy", "reload", "--state", &st]);
    assert_eq!(no_gateway.status.code(), Some(3));
    assert!(
        text(&no_gateway).1.contains("no gateway is running"),
        "{:?}",
        text(&no_gateway)
    );

    // A socket file nobody answers on (a crashed gateway) does not stand in the way.
    drop(std::os::unix::net::UnixListener::bind(state.join("admin.sock")).unwrap());
    let list = meshgate(&["identity", "entry", "list", "--state", &st]);
    assert!(text(&list).0.contains(API), "{:?}", text(&list));
}
