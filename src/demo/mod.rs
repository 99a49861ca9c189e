//! `meshgate demo`: three clusters on 127.0.0.1 — three trust domains with independent roots,
//! federated with each other — sample services, the sample Cedar policies from
//! `examples/demo/`, and traffic that shows what the mesh does. Then it stays up for the
//! user to try things (Ctrl-C stops it cleanly), or exits with `--exit` (tests, CI).

mod client;
mod scenario;
mod upstream;

use std::io::{BufRead, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use meshgate_identity::{Issuer, TrustDomain};

use crate::exit::{CliError, CliResult, Outcome, ResultExt};
use crate::runtime::{Prepared, Running};
use crate::state::State;

/// The sample policies, embedded so the demo runs from any directory.
const POLICIES: &[(&str, &str, &str)] = &[
    (
        "east",
        "catalog.cedar",
        include_str!("../../examples/demo/policies/east/catalog.cedar"),
    ),
    (
        "west",
        "orders.cedar",
        include_str!("../../examples/demo/policies/west/orders.cedar"),
    ),
    (
        "north",
        "inventory.cedar",
        include_str!("../../examples/demo/policies/north/inventory.cedar"),
    ),
    (
        "north-shadow",
        "inventory.cedar",
        include_str!("../../examples/demo/policies/north-shadow/inventory.cedar"),
    ),
    (
        "north",
        "orders.cedar",
        include_str!("../../examples/demo/policies/north/orders.cedar"),
    ),
    (
        "north-shadow",
        "orders.cedar",
        include_str!("../../examples/demo/policies/north/orders.cedar"),
    ),
];

/// North also runs `orders` v2 (labels `version = "v2"`), the canary of east's route.
const CANARY_SERVICE: &str = "orders-v2";

/// East's traffic route: 90/10 between west's `orders` and north's v2, and a 503 injected for
/// one caller only.
const EAST_ROUTES: &str = r#"
[[routes]]
name = "orders-canary"
service = "orders.shop"
backends = [
  { cluster = "west", weight = 90 },
  { cluster = "north", subset = { version = "v2" }, weight = 10 },
]
faults = [{ abort = 503, callers = ["spiffe://east.example/ns/qa/sa/tester"] }]
"#;

/// The three clusters: name and the service each serves.
const CLUSTERS: [(&str, &str); 3] = [
    ("east", "catalog"),
    ("west", "orders"),
    ("north", "inventory"),
];

/// Start a three-cluster mesh on 127.0.0.1 and show allowed, denied, rate-limited and
/// shadow-flipped calls and the decision log.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the demo keeps its state, configs and certificates (created; never overwritten
    /// without asking).
    #[arg(long, default_value = "meshgate-demo")]
    dir: PathBuf,
    /// Replace an existing demo directory without asking.
    #[arg(long)]
    force: bool,
    /// Run the scenario, check every expectation, stop and exit (0 when all held).
    #[arg(long)]
    exit: bool,
}

impl DemoArgs {
    pub fn run(self) -> CliResult<Outcome> {
        prepare_dir(&self.dir, self.force)?;
        let dir = std::fs::canonicalize(&self.dir).internal_err()?;
        println!(
            "meshgate demo — state, configs and certificates in `{}`",
            dir.display()
        );
        crate::cli::block_on(run(dir, self.exit))?
    }
}

/// Refuses to write over an existing, non-empty directory unless `--force` or the user says
/// yes at a terminal.
fn prepare_dir(dir: &Path, force: bool) -> CliResult<()> {
    let non_empty = std::fs::read_dir(dir)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if non_empty {
        let replace = force || ask(&format!("`{}` exists; replace it? [y/N] ", dir.display()));
        if !replace {
            return Err(CliError::input(anyhow::anyhow!(
                "`{}` already exists; choose another `--dir`, or pass `--force` to replace it",
                dir.display()
            )));
        }
        std::fs::remove_dir_all(dir)
            .internal_ctx(|| format!("cannot remove `{}`", dir.display()))?;
    }
    std::fs::create_dir_all(dir).internal_ctx(|| format!("cannot create `{}`", dir.display()))
}

fn ask(question: &str) -> bool {
    if !std::io::stdin().is_terminal() {
        return false;
    }
    print!("{question}");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).is_ok()
        && answer.trim().eq_ignore_ascii_case("y")
}

fn step(n: usize, text: &str) {
    println!("[{n}/6] {text}");
}

async fn run(dir: PathBuf, exit: bool) -> CliResult<Outcome> {
    let started = Instant::now();
    step(
        1,
        "creating three trust domains with independent roots (east, west, north)",
    );
    for (cluster, _) in CLUSTERS {
        let state = State::create(&dir.join(cluster).join("state")).internal_err()?;
        let td = trust_domain(cluster)?;
        let issuer =
            Issuer::init(state.db(), &state.keys_dir(), td, SystemTime::now()).internal_err()?;
        write(
            &dir.join(cluster).join("bundle.json"),
            &issuer.bundle().to_spiffe_json(),
        )?;
    }
    for (cluster, file, text) in POLICIES {
        write(&dir.join(cluster_dir(cluster)).join(file), text)?;
    }

    step(2, "starting sample services and writing gateway configs");
    let mut upstreams = Vec::new();
    for (cluster, service) in CLUSTERS {
        let addr = upstream::start(service).await.internal_err()?;
        upstreams.push((cluster, service, addr));
    }
    let canary = upstream::start(CANARY_SERVICE).await.internal_err()?;
    let ports: Vec<Ports> = CLUSTERS
        .iter()
        .map(|_| Ports::pick())
        .collect::<CliResult<_>>()?;
    for (i, (cluster, service)) in CLUSTERS.iter().enumerate() {
        let extra = match *cluster {
            "east" => EAST_ROUTES.to_owned(),
            "north" => format!(
                "\n[[services]]\nname = \"orders\"\nnamespace = \"shop\"\nendpoints = [\"{canary}\"]\nexport_to = [\"east\"]\nlabels = {{ version = \"v2\" }}\n"
            ),
            _ => String::new(),
        };
        let text = config_toml(&dir, i, cluster, service, upstreams[i].2, &ports)? + &extra;
        write(&dir.join(cluster).join("gateway.toml"), &text)?;
    }

    step(
        3,
        "starting three gateways (QUIC + mTLS between them, federation links, Cedar)",
    );
    let mut running: Vec<Running> = Vec::new();
    for (cluster, _) in CLUSTERS {
        let config = crate::cli::gateway::load_config(&dir.join(cluster).join("gateway.toml"))?;
        let prepared = Prepared::open(config)?;
        let cluster_running = prepared.start().await?;
        println!(
            "  {cluster}: workload listener https://{}, tunnel {}, console {}",
            cluster_running.addrs().workload,
            cluster_running.addrs().tunnel,
            cluster_running.console_url().unwrap_or("off"),
        );
        running.push(cluster_running);
    }
    wait_federated(&running).await?;
    println!(
        "  federation links synced: bundles and exported services exchanged ({:.1}s)",
        started.elapsed().as_secs_f64()
    );

    step(4, "sending traffic");
    let summary = scenario::run(&dir, &running).await?;

    step(
        5,
        "verifying every cluster's decision log (hash chain + signed checkpoints)",
    );
    let mut all_verified = true;
    for (cluster, r) in CLUSTERS.iter().zip(&running) {
        let _ = r.log.checkpoint(SystemTime::now());
        match r.log.verify() {
            Ok(report) if report.problems.is_empty() => {
                println!("  {}: ok ({} records)", cluster.0, r.log.head().0)
            }
            Ok(report) => {
                all_verified = false;
                println!("  {}: TAMPERING: {:?}", cluster.0, report.problems);
            }
            Err(e) => {
                all_verified = false;
                println!("  {}: cannot verify: {e}", cluster.0);
            }
        }
    }
    step(
        6,
        "who called whom across the mesh (`meshgate audit graph`)",
    );
    let mut graph = meshgate_policy::GraphBuilder::new(meshgate_policy::CallerGrouping::Workload);
    for r in &running {
        graph
            .add_log(&r.log, &meshgate_policy::Filter::default())
            .internal_err()?;
    }
    for edge in graph.finish().edges {
        let from = edge.from.strip_prefix("spiffe://").unwrap_or(&edge.from);
        println!("  {from:<40} → {:<24} {}", edge.to, edge.counts.summary());
    }
    let ok = summary.all_held() && all_verified;
    println!();
    println!(
        "{}",
        if ok {
            "every expectation held."
        } else {
            "SOME EXPECTATIONS DID NOT HOLD (see above)."
        }
    );
    if exit {
        for r in running {
            r.shutdown().await;
        }
        return Ok(if ok { Outcome::Yes } else { Outcome::No });
    }
    println!("{}", scenario::try_it(&dir, &running));
    println!("The web console of each cluster (read-only, loopback only, every view is logged):");
    for r in &running {
        if let Some(url) = r.console_url() {
            println!("  {:<6} {url}", r.config.cluster);
        }
    }
    println!("The mesh keeps running; press Ctrl-C to stop it.");
    tokio::signal::ctrl_c().await.internal_err()?;
    eprintln!("stopping: draining requests in flight");
    for r in running {
        r.shutdown().await;
    }
    Ok(Outcome::Yes)
}

fn trust_domain(cluster: &str) -> CliResult<TrustDomain> {
    format!("{cluster}.example").parse().internal_err()
}

fn cluster_dir(entry: &str) -> PathBuf {
    match entry.split_once('-') {
        Some((cluster, kind)) => PathBuf::from(cluster).join(format!("{kind}-policies")),
        None => PathBuf::from(entry).join("policies"),
    }
}

fn write(path: &Path, text: &str) -> CliResult<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .internal_ctx(|| format!("cannot create `{}`", parent.display()))?;
    }
    std::fs::write(path, text).internal_ctx(|| format!("cannot write `{}`", path.display()))
}

/// Loopback ports for one cluster, picked free by binding port 0.
struct Ports {
    workload: SocketAddr,
    tunnel: SocketAddr,
    admin: SocketAddr,
    dns: SocketAddr,
    issuer: SocketAddr,
    console: SocketAddr,
}

impl Ports {
    fn pick() -> CliResult<Ports> {
        let tcp = || -> CliResult<SocketAddr> {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .internal_err()
        };
        let udp = || -> CliResult<SocketAddr> {
            std::net::UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .internal_err()
        };
        Ok(Ports {
            workload: tcp()?,
            tunnel: udp()?,
            admin: tcp()?,
            dns: udp()?,
            issuer: tcp()?,
            console: tcp()?,
        })
    }
}

fn config_toml(
    dir: &Path,
    i: usize,
    cluster: &str,
    service: &str,
    upstream: SocketAddr,
    ports: &[Ports],
) -> CliResult<String> {
    let p = &ports[i];
    let shadow = if cluster == "north" {
        "shadow_dir = \"shadow-policies\"\n"
    } else {
        ""
    };
    let mut text = format!(
        "# Written by `meshgate demo`; start it alone with `meshgate gateway --config {path}`.\n\
         cluster = \"{cluster}\"\ntrust_domain = \"{cluster}.example\"\nstate_dir = \"state\"\n\n\
         [listeners]\nworkload = \"{w}\"\ntunnel = \"{t}\"\nadmin = \"{a}\"\ndns = \"{d}\"\nissuer = \"{iss}\"\n\
         console = \"{c}\"\ndns_names = [\"localhost\"]\nip_addrs = [\"127.0.0.1\"]\n\n\
         [policy]\ndir = \"policies\"\n{shadow}\n\
         [console]\n# Plain HTTP without authentication, on 127.0.0.1 only: for a laptop.\naccess = \"insecure_loopback\"\n\n\
         [[services]]\nname = \"{service}\"\nnamespace = \"shop\"\nendpoints = [\"{upstream}\"]\nexport_to = [\"*\"]\n",
        path = dir.join(cluster).join("gateway.toml").display(),
        w = p.workload,
        t = p.tunnel,
        a = p.admin,
        d = p.dns,
        iss = p.issuer,
        c = p.console,
    );
    for (j, (peer, peer_service)) in CLUSTERS.iter().enumerate() {
        if j == i {
            continue;
        }
        // North serves the canary of `orders` too; only east's route sends to it.
        let imports = if *peer == "north" && cluster == "east" {
            format!("\"{peer_service}.shop\", \"orders.shop\"")
        } else {
            format!("\"{peer_service}.shop\"")
        };
        text.push_str(&format!(
            "\n[[peers]]\ncluster = \"{peer}\"\ntrust_domain = \"{peer}.example\"\ngateways = [\"{}\"]\nbundle = \"../{peer}/bundle.json\"\nservices = [{imports}]\nshared = [\"{peer_service}.shop\"]\n",
            ports[j].tunnel
        ));
    }
    Ok(text)
}

/// Waits until every link has synced once (bundles, services and endpoints exchanged).
async fn wait_federated(running: &[Running]) -> CliResult<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pending: Vec<String> = running
            .iter()
            .flat_map(|r| {
                let me = r.config.cluster.clone();
                r.federation
                    .status(SystemTime::now())
                    .into_iter()
                    .filter(|s| s.last_sync.is_none())
                    .map(move |s| format!("{me}→{}", s.cluster))
            })
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(CliError::internal(anyhow::anyhow!(
                "federation links did not sync: {}",
                pending.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
