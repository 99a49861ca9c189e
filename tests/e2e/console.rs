//! The web console of real gateway processes, driven with curl: its JSON endpoints and
//! exports in the loopback mode, every view recorded in the log, bad requests refused; and
//! the mTLS mode's access control (an SVID the console policy allows, one it does not, a
//! linked peer's, none, a stranger's).

use std::path::Path;

use serde_json::Value;

use crate::pair::{Cluster, EAST_WEB, Pair, WEB, call, issue, wait_for};
use crate::procs::{arg, interrupt, meshgate, run, tool};

pub const EAST_API: &str = "spiffe://east.example/ns/shop/sa/api";
pub const ORDERS: &str = "orders.shop.west";

/// One curl GET: (HTTP status, body). `extra` adds curl arguments (certificates, headers).
pub fn get(url: &str, extra: &[&str]) -> (String, String) {
    let out = tool("curl")
        .args(["-sS", "-w", "\n%{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.to_owned(), body.to_owned())
}

/// A JSON endpoint that must answer 200.
pub fn get_json(url: &str, extra: &[&str]) -> Value {
    let (status, body) = get(url, extra);
    assert_eq!(status, "200", "{url}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {body}"))
}

/// Starts west (console on, `access`) and east, after `prepare` had the stopped pair, and
/// sends known traffic: east's `web` calls west's orders three times (allowed), east's `api`
/// once (denied), west's `web` once.
pub fn running_pair(
    access: &'static str,
    prepare: impl FnOnce(&Pair),
) -> (Pair, crate::procs::Proc, crate::procs::Proc) {
    let mut pair = Pair::new();
    prepare(&pair);
    pair.west.console_access = Some(access);
    pair.west.write_config(&pair.east, pair.upstream, "warn");
    let root = pair.tmp.path();
    issue(&pair.east, EAST_WEB, &root.join("east-web"));
    issue(&pair.east, EAST_API, &root.join("east-api"));
    issue(&pair.west, WEB, &root.join("west-web"));
    let east_gw = pair.east.start();
    let west_gw = pair.west.start();
    let host = "orders.shop.west.mesh";
    wait_for("east to route to west's orders", || {
        call(&pair.east, &root.join("east-web"), host) == "200"
    });
    for _ in 0..2 {
        assert_eq!(call(&pair.east, &root.join("east-web"), host), "200");
    }
    assert_eq!(call(&pair.east, &root.join("east-api"), host), "403");
    assert_eq!(call(&pair.west, &root.join("west-web"), host), "200");
    (pair, east_gw, west_gw)
}

fn base(c: &Cluster) -> String {
    format!("http://127.0.0.1:{}", c.console.port())
}

#[test]
fn the_loopback_console_serves_every_page_as_json_and_records_each_view() {
    let (pair, mut east_gw, mut west_gw) = running_pair("insecure_loopback", |_| {});
    let url = base(&pair.west);

    let denied = get_json(&format!("{url}/api/decisions?decision=deny"), &[]);
    let records = denied["records"].as_array().unwrap();
    assert!(
        records
            .iter()
            .any(|r| r["principal"] == EAST_API && r["resource"] == ORDERS),
        "{denied}"
    );
    assert!(records.iter().all(|r| r["decision"] == "deny"));

    // Newest first, one page at a time.
    let q = format!(
        "caller={}&decision=allow",
        EAST_WEB.replace('/', "%2F").replace(':', "%3A")
    );
    let first = get_json(&format!("{url}/api/decisions?{q}&limit=2"), &[]);
    assert_eq!(first["matched"], 3, "{first}");
    let page = first["records"].as_array().unwrap();
    assert_eq!(page.len(), 2);
    assert!(page[0]["seq"].as_u64() > page[1]["seq"].as_u64());
    let older = first["next_before"].as_u64().unwrap();
    let second = get_json(
        &format!("{url}/api/decisions?{q}&limit=2&before={older}"),
        &[],
    );
    assert_eq!(second["records"].as_array().unwrap().len(), 1, "{second}");
    assert!(second["next_before"].is_null());

    // One record with its determining policy's text.
    let id = page[0]["id"].as_str().unwrap();
    let detail = get_json(&format!("{url}/api/decisions/{id}"), &[]);
    assert_eq!(detail["record"]["principal"], EAST_WEB);
    assert_eq!(detail["policies"][0]["id"], "east-web-reads-orders");
    assert!(
        detail["policies"][0]["text"]
            .as_str()
            .unwrap()
            .contains("principal == Workload::\"spiffe://east.example/ns/shop/sa/web\""),
        "{detail}"
    );
    assert_eq!(detail["policies"][0]["same_version"], true);
    // The decision names its trace (in the trace viewer `telemetry.trace_url` names), and
    // the trace finds its decisions.
    let trace = detail["record"]["trace_id"].as_str().unwrap();
    assert_eq!(
        detail["trace_url"],
        format!("http://traces.example/trace/{trace}")
    );
    let of_trace = get_json(&format!("{url}/api/decisions?trace={trace}"), &[]);
    let ids: Vec<_> = of_trace["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id]);
    let (status, _) = get(&format!("{url}/api/decisions/{}", "0".repeat(32)), &[]);
    assert_eq!(status, "404");

    let graph = get_json(&format!("{url}/api/graph?since=1h"), &[]);
    let edge = graph["graph"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["from"] == EAST_API && e["to"] == ORDERS)
        .unwrap_or_else(|| panic!("no denied edge in {graph}"))
        .clone();
    assert_eq!(
        (edge["allow"].as_u64(), edge["deny"].as_u64()),
        (Some(0), Some(1))
    );

    let integrity = get_json(&format!("{url}/api/integrity"), &[]);
    assert_eq!(integrity["status"], "verified", "{integrity}");
    assert!(integrity["checkpoints"][0]["signature_valid"] == true);
    assert_eq!(integrity["witnesses"][0]["cluster"], "east");

    // A refused reload shows with its diagnostics; the old set keeps serving.
    let policies = get_json(&format!("{url}/api/policies"), &[]);
    assert!(policies["last_reload"].is_null(), "{policies}");
    let bad = pair.west.dir.join("policies/typo.cedar");
    std::fs::write(
        &bad,
        "permit (principal, action, resource) when { context.pth == \"/\" };",
    )
    .unwrap();
    let reload = run(&["policy", "reload", "--state", &arg(&pair.west.state())]);
    assert_eq!(reload.status.code(), Some(1), "{reload:?}");
    let policies = get_json(&format!("{url}/api/policies"), &[]);
    assert_eq!(policies["last_reload"]["applied"], false, "{policies}");
    assert!(
        policies["last_reload"]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("typo.cedar"),
        "{policies}"
    );
    assert_eq!(policies["reload_failures"], 1);
    std::fs::remove_file(&bad).unwrap();
    let ids: Vec<&str> = policies["enforced"]["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["east-web-reads-orders", "web-reads-orders"]);
    assert!(
        policies["console"].is_null(),
        "no console policy in the loopback mode"
    );

    // West learns east's exports by syncing: wait for it (views are recorded, so poll slowly).
    let mut mesh = get_json(&format!("{url}/api/mesh"), &[]);
    wait_for("west to import east's orders", || {
        mesh = get_json(&format!("{url}/api/mesh"), &[]);
        mesh["links"][0]["imported"][0] == "orders.shop"
    });
    assert_eq!(mesh["services"][0]["name"], ORDERS);
    assert_eq!(mesh["links"][0]["cluster"], "east");

    // The exports of one search: every matching record, oldest first.
    let (status, jsonl) = get(&format!("{url}/export/decisions.jsonl?{q}"), &[]);
    assert_eq!(status, "200");
    let lines: Vec<Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{jsonl}");
    assert!(
        lines
            .iter()
            .all(|r| r["principal"] == EAST_WEB && r["hash"].is_string())
    );
    assert!(lines[0]["seq"].as_u64() < lines[2]["seq"].as_u64());
    let (status, csv) = get(&format!("{url}/export/decisions.csv?{q}"), &[]);
    assert_eq!(status, "200");
    let rows: Vec<&str> = csv.lines().collect();
    assert!(
        rows[0].starts_with("seq,time,id,decision,principal"),
        "{csv}"
    );
    assert_eq!(rows.len(), 4, "{csv}");
    assert!(
        rows[1..]
            .iter()
            .all(|r| r.contains(",allow,spiffe://east.example/ns/shop/sa/web,"))
    );

    // Refused: bad input, another Host (DNS rebinding), writes, unknown pages.
    let (status, body) = get(&format!("{url}/api/decisions?decision=maybe"), &[]);
    assert_eq!(status, "400");
    assert!(body.contains("`maybe` is not one of"), "{body}");
    let (status, body) = get(&format!("{url}/api/graph?sinse=1h"), &[]);
    assert_eq!(
        (status.as_str(), body.contains("unknown parameter `sinse`")),
        ("400", true)
    );
    let (status, _) = get(
        &format!("{url}/api/mesh"),
        &["-H", "Host: attacker.example"],
    );
    assert_eq!(status, "403");
    let (status, _) = get(&format!("{url}/api/mesh"), &["-X", "POST"]);
    assert_eq!(status, "405");
    // A request another web page caused (an image, a form) is refused and not recorded.
    let (status, body) = get(
        &format!("{url}/export/decisions.jsonl?from-another-site"),
        &["-H", "Sec-Fetch-Site: cross-site"],
    );
    assert_eq!(status, "403", "{body}");
    assert!(body.contains("Sec-Fetch-Site: cross-site"), "{body}");
    let (status, _) = get(&format!("{url}/wp-admin"), &[]);
    assert_eq!(status, "404");

    // Every view is an admin event, naming the local user; the log still verifies.
    let admin = get_json(
        &format!("{url}/api/decisions?decision=admin&limit=500"),
        &[],
    );
    let views: Vec<&Value> = admin["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"].as_str().unwrap().starts_with("console view "))
        .collect();
    for page in [
        "/api/graph?since=1h",
        "/api/integrity",
        "/api/policies",
        "/api/mesh",
        "/export/decisions.csv?",
    ] {
        assert!(
            views
                .iter()
                .any(|r| r["action"].as_str().unwrap().contains(page)),
            "no view of {page} recorded in {admin}"
        );
    }
    assert!(
        !views
            .iter()
            .any(|r| r["action"].as_str().unwrap().contains("from-another-site")),
        "a cross-site request is not recorded"
    );
    assert!(
        views.iter().all(|r| r["principal"]
            .as_str()
            .unwrap()
            .starts_with("loopback 127.0.0.1:")),
        "{admin}"
    );
    assert!(interrupt(&mut west_gw.0).success());
    assert!(interrupt(&mut east_gw.0).success());
    let verify = meshgate(&["audit", "verify", &arg(&pair.west.state())]);
    assert!(String::from_utf8_lossy(&verify.stdout).starts_with("ok:"));
}

/// curl arguments presenting the SVID in `dir` and trusting `ca` for the console's certificate.
fn svid_args(dir: &Path, ca: &Path) -> Vec<String> {
    vec![
        "--cacert".into(),
        arg(&ca.join("bundle.pem")),
        "--cert".into(),
        arg(&dir.join("svid.pem")),
        "--key".into(),
        arg(&dir.join("key.pem")),
    ]
}

#[test]
fn the_mtls_console_admits_only_svids_its_policy_allows() {
    let (pair, mut east_gw, mut west_gw) = running_pair("mtls", |_| {});
    let root = pair.tmp.path();
    let url = format!("https://localhost:{}", pair.west.console.port());
    let auditor = root.join("west-audit");
    issue(
        &pair.west,
        "spiffe://west.example/ns/audit/sa/alice",
        &auditor,
    );
    let west_web = root.join("west-web");
    let east_auditor = root.join("east-audit");
    issue(
        &pair.east,
        "spiffe://east.example/ns/audit/sa/bob",
        &east_auditor,
    );
    let as_ = |dir: &Path| svid_args(dir, &auditor);

    // The default console policy: this trust domain's `audit` namespace.
    let alice = as_(&auditor);
    let alice: Vec<&str> = alice.iter().map(String::as_str).collect();
    let integrity = get_json(&format!("{url}/api/integrity"), &alice);
    assert_eq!(integrity["status"], "verified");
    let (status, html) = get(&format!("{url}/graph"), &alice);
    assert_eq!(status, "200");
    assert!(html.contains("viewing as <code>spiffe://west.example/ns/audit/sa/alice</code>"));

    // A workload of another namespace, and an auditor of the linked peer: 403, recorded.
    for (dir, who) in [
        (&west_web, WEB),
        (&east_auditor, "spiffe://east.example/ns/audit/sa/bob"),
    ] {
        let args = as_(dir);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, body) = get(&format!("{url}/api/decisions"), &args);
        assert_eq!(status, "403", "{who}: {body}");
        assert!(body.contains("no console policy allows"), "{body}");
        let admin = get_json(
            &format!(
                "{url}/api/decisions?decision=admin&caller={}",
                who.replace('/', "%2F")
            ),
            &alice,
        );
        assert!(
            admin["records"][0]["action"]
                .as_str()
                .unwrap()
                .starts_with("console view refused by the console policy: /api/decisions"),
            "{who}: {admin}"
        );
    }

    // No client certificate: 401, nothing shown.
    let ca = arg(&auditor.join("bundle.pem"));
    let (status, body) = get(&format!("{url}/api/decisions"), &["--cacert", &ca]);
    assert_eq!(status, "401", "{body}");
    assert!(body.contains("needs a client certificate"));

    // A certificate from a trust domain this gateway does not trust: the handshake fails.
    let stranger = root.join("stranger");
    meshgate(&[
        "identity",
        "init",
        "--state",
        &arg(&stranger.join("state")),
        "--trust-domain",
        "west.example",
    ]);
    meshgate(&[
        "identity",
        "issue",
        "--state",
        &arg(&stranger.join("state")),
        "--spiffe-id",
        "spiffe://west.example/ns/audit/sa/mallory",
        "--out",
        &arg(&stranger.join("svid")),
    ]);
    let forged = svid_args(&stranger.join("svid"), &auditor);
    let forged: Vec<&str> = forged.iter().map(String::as_str).collect();
    let (status, body) = get(&format!("{url}/api/decisions"), &forged);
    assert_eq!(status, "000", "a forged auditor got an answer: {body}");
    assert!(interrupt(&mut west_gw.0).success());
    assert!(interrupt(&mut east_gw.0).success());
}

#[test]
fn the_unauthenticated_mode_refuses_a_non_loopback_address() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(tmp.path(), "west");
    let peer = Cluster::new(tmp.path(), "east");
    c.console_access = Some("insecure_loopback");
    c.console = "0.0.0.0:0".parse().unwrap();
    c.write_config(&peer, "127.0.0.1:9".parse().unwrap(), "warn");
    let config = c.dir.join("gateway.toml");
    let out = run(&["gateway", "--check", "--config", &arg(&config)]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`listeners.console = \"0.0.0.0:0\"` is not a loopback address")
            && err.contains("gateway.toml"),
        "{err}"
    );
    // A typo in the section is an error too.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("access =", "acess =");
    std::fs::write(&config, text).unwrap();
    let out = run(&["gateway", "--check", "--config", &arg(&config)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("acess"));
}
