//! The demo's traffic and its readable summary.

use std::path::Path;
use std::time::Duration;

use http::StatusCode;
use meshgate_identity::SpiffeId;
use meshgate_policy::{DecisionLog, DecisionRecord, Filter};

use super::client::{Reply, Workload};
use crate::exit::{CliResult, ResultExt};
use crate::runtime::Running;

/// What the scenario showed, expectation by expectation.
#[derive(Debug, Default)]
pub struct Summary {
    checks: Vec<(String, bool)>,
}

impl Summary {
    fn check(&mut self, what: &str, held: bool) {
        println!("    {} {what}", if held { "✓" } else { "✗" });
        self.checks.push((what.to_owned(), held));
    }

    pub fn all_held(&self) -> bool {
        self.checks.iter().all(|(_, held)| *held)
    }
}

/// Runs every scenario against the three running clusters (east, west, north).
pub async fn run(dir: &Path, running: &[Running]) -> CliResult<Summary> {
    let (east, west, north) = (&running[0], &running[1], &running[2]);
    let td = east.issuer.trust_domain().clone();
    let svid = |path: &str| -> CliResult<_> {
        let id = SpiffeId::new(&td, path).internal_err()?;
        east.issuer
            .issue_x509_svid(
                &id,
                Duration::from_secs(24 * 3600),
                &[],
                &[],
                std::time::SystemTime::now(),
            )
            .internal_err()
    };
    let web_svid = svid("/ns/shop/sa/web")?;
    write_svid_files(&dir.join("web"), &web_svid, &east.issuer.bundle().to_pem())?;
    let bundle = east.issuer.bundle();
    let gateway = east.addrs().workload;
    let web = Workload::new(Some(&web_svid), &bundle, gateway).internal_err()?;
    let report =
        Workload::new(Some(&svid("/ns/batch/sa/report")?), &bundle, gateway).internal_err()?;
    let anonymous = Workload::new(None, &bundle, gateway).internal_err()?;
    let mut s = Summary::default();

    println!("\n  1. web (east) → orders (west): an allowed cross-cluster call");
    let r = web
        .call("GET", "orders.shop.west.mesh", "/v1/orders/42", &[])
        .await
        .internal_err()?;
    show(&r);
    s.check("allowed with 200", r.status == StatusCode::OK);
    s.check(
        "the upstream in west saw the caller's SPIFFE ID `spiffe://east.example/ns/shop/sa/web`",
        r.body
            .contains("\"caller\":\"spiffe://east.example/ns/shop/sa/web\""),
    );
    let rec = record(&west.log, r.decision_id());
    s.check(
        "west's decision log holds the decision, naming `shop-reads-orders`",
        rec.as_ref()
            .is_some_and(|d| d.reasons == ["shop-reads-orders"]),
    );

    println!("\n  2. web (east) → orders (west) /admin/users: denied by policy");
    let r = web
        .call("GET", "orders.shop.west.mesh", "/admin/users", &[])
        .await
        .internal_err()?;
    show(&r);
    let rec = record(&west.log, r.decision_id());
    s.check("denied with 403", r.status == StatusCode::FORBIDDEN);
    s.check(
        "the deny names the policy `no-admin-paths`",
        rec.as_ref()
            .is_some_and(|d| d.reasons == ["no-admin-paths"]),
    );
    println!("\n     …and spelled `/v1/../admin/users` it is the same path to Cedar:");
    let r = web
        .call("GET", "orders.shop.west.mesh", "/v1/../admin/users", &[])
        .await
        .internal_err()?;
    show(&r);
    s.check("still 403", r.status == StatusCode::FORBIDDEN);

    println!("\n  3. report (east, batch) → orders: a quota of 2 a minute");
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..3 {
        let r = report
            .call("GET", "orders.shop.west.mesh", "/v1/orders", &[])
            .await
            .internal_err()?;
        statuses.push(r.status.as_u16());
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(r);
        }
    }
    println!("     statuses: {statuses:?}");
    if let Some(r) = &limited {
        println!(
            "     429 with Retry-After: {}s, decision {}",
            r.header("retry-after"),
            r.decision_id()
        );
    }
    s.check(
        "the third call is refused with 429 and Retry-After",
        statuses == [200, 200, 429]
            && limited
                .as_ref()
                .is_some_and(|r| !r.header("retry-after").is_empty()),
    );

    println!("\n  4. web (east) → inventory (north) PUT: allowed, but a shadow policy would deny");
    let r = web
        .call("PUT", "inventory.shop.north.mesh", "/v1/items/7", &[])
        .await
        .internal_err()?;
    show(&r);
    s.check(
        "allowed with 200 (the enforced set)",
        r.status == StatusCode::OK,
    );
    let rec = record(&north.log, r.decision_id());
    if let Some(shadow) = rec.as_ref().and_then(|d| d.shadow.as_ref()) {
        let why = if shadow.reasons.is_empty() {
            "no shadow policy permits it: `inventory-updates-need-a-ticket` wants `x-change-ticket`"
                .to_owned()
        } else {
            format!("determining: {}", shadow.reasons.join(", "))
        };
        println!(
            "     shadow set {}… would have {} ({why})",
            &shadow.policy_version[..12.min(shadow.policy_version.len())],
            if shadow.allowed { "allowed" } else { "denied" },
        );
    }
    s.check(
        "the decision record says the shadow set would have denied it",
        rec.as_ref()
            .and_then(|d| d.shadow.as_ref())
            .is_some_and(|sh| sh.differs && !sh.allowed),
    );
    let r = web
        .call(
            "PUT",
            "inventory.shop.north.mesh",
            "/v1/items/7",
            &[("x-change-ticket", "CHG-1234")],
        )
        .await
        .internal_err()?;
    let rec = record(&north.log, r.decision_id());
    s.check(
        "with a change ticket both sets agree",
        rec.as_ref()
            .and_then(|d| d.shadow.as_ref())
            .is_some_and(|sh| !sh.differs),
    );

    println!(
        "\n  5. web (east) → `inventory.shop.mesh`: one name, wherever the service is exported"
    );
    let r = web
        .call("GET", "inventory.shop.mesh", "/v1/items", &[])
        .await
        .internal_err()?;
    show(&r);
    s.check(
        "served by north",
        r.status == StatusCode::OK && r.body.contains("\"service\":\"inventory\""),
    );

    println!("\n  6. an unauthenticated caller and an unknown destination");
    let r = anonymous
        .call("GET", "orders.shop.west.mesh", "/v1/orders", &[])
        .await
        .internal_err()?;
    show(&r);
    s.check(
        "a caller without an X.509-SVID gets 401, recorded in east's log",
        r.status == StatusCode::UNAUTHORIZED && record(&east.log, r.decision_id()).is_some(),
    );
    let r = web
        .call("GET", "payments.shop.west.mesh", "/", &[])
        .await
        .internal_err()?;
    show(&r);
    s.check(
        "an unknown service gets 404, recorded in east's own log",
        r.status == StatusCode::NOT_FOUND && record(&east.log, r.decision_id()).is_some(),
    );

    println!(
        "\n  7. moving traffic: a 90/10 canary of `orders.shop` (west v1, north v2), and a fault"
    );
    let (mut v1, mut v2, mut other) = (0, 0, 0);
    const CALLS: usize = 150;
    for _ in 0..CALLS {
        let r = web
            .call("GET", "orders.shop.mesh", "/v1/orders", &[])
            .await
            .internal_err()?;
        match r.body.as_str() {
            b if b.contains("\"service\":\"orders-v2\"") => v2 += 1,
            b if b.contains("\"service\":\"orders\"") => v1 += 1,
            _ => other += 1,
        }
    }
    println!(
        "     {CALLS} calls by web: west (v1) {v1}, north (v2) {v2}{}",
        if other > 0 {
            format!(", {other} failed")
        } else {
            String::new()
        }
    );
    s.check(
        "east's route `orders-canary` split them about 90/10 (each call decided in the cluster it went to)",
        other == 0 && v1 + v2 == CALLS && (3..=40).contains(&v2),
    );
    let tester =
        Workload::new(Some(&svid("/ns/qa/sa/tester")?), &bundle, gateway).internal_err()?;
    let r = tester
        .call("GET", "orders.shop.mesh", "/v1/orders", &[])
        .await
        .internal_err()?;
    show(&r);
    let rec = record(&east.log, r.decision_id());
    s.check(
        "the tester gets the route's injected 503, recorded in east's log as `fault`",
        r.status == StatusCode::SERVICE_UNAVAILABLE
            && rec.is_some_and(|d| d.decision == meshgate_policy::DecisionKind::Fault),
    );
    println!();
    Ok(s)
}

fn show(r: &Reply) {
    let body: String = r.body.chars().take(160).collect();
    println!("     {} {}", r.status.as_u16(), body.trim_end());
    if !r.decision_id().is_empty() {
        println!("     x-meshgate-decision-id: {}", r.decision_id());
    }
}

fn record(log: &DecisionLog, id: &str) -> Option<DecisionRecord> {
    if id.is_empty() {
        return None;
    }
    log.query(&Filter::default())
        .ok()?
        .into_iter()
        .find(|r| r.id == id)
}

fn write_svid_files(
    dir: &Path,
    svid: &meshgate_identity::X509Svid,
    bundle_pem: &str,
) -> CliResult<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).internal_err()?;
    std::fs::write(dir.join("svid.pem"), svid.cert_chain_pem()).internal_err()?;
    std::fs::write(dir.join("bundle.pem"), bundle_pem).internal_err()?;
    let key = svid.private_key_pem().unwrap_or_default();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join("key.pem"))
        .internal_err()?;
    std::io::Write::write_all(&mut f, key.as_bytes()).internal_err()
}

/// Copy-pastable commands for the running mesh.
pub fn try_it(dir: &Path, running: &[Running]) -> String {
    let east = running[0].addrs();
    let web = dir.join("web");
    let d = |c: &str| dir.join(c).join("state").display().to_string();
    let dns = running[0]
        .config
        .listeners
        .dns
        .map(|a| a.port())
        .unwrap_or(0);
    format!(
        "Try it (the mesh is running):\n\n  cd {web}\n  \
         curl --cacert bundle.pem --cert svid.pem --key key.pem -H 'host: orders.shop.west.mesh' https://localhost:{p}/v1/orders/42\n  \
         curl --proxy https://localhost:{p} --proxy-cacert bundle.pem --proxy-cert svid.pem --proxy-key key.pem http://inventory.shop.north.mesh/v1/items\n  \
         dig @127.0.0.1 -p {dns} orders.shop.west.mesh A +short\n  \
         meshgate audit query {west} --decision deny\n  \
         meshgate audit query {north} --json | grep -c differs\n  \
         meshgate audit verify {west}\n  \
         meshgate audit query {east} --decision fault\n  \
         curl -s http://{east_admin}/metrics | grep meshgate_route_requests\n  \
         meshgate federation status --state {east_state}\n  \
         curl -s http://{admin}/metrics | grep meshgate_requests\n",
        web = web.display(),
        p = east.workload.port(),
        west = d("west"),
        north = d("north"),
        east_state = d("east"),
        east = d("east"),
        east_admin = running[0].addrs().admin,
        admin = running[1].addrs().admin,
    )
}
