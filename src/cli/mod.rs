//! The `meshgate` command line: one subcommand module per area.

pub(crate) mod audit;
pub(crate) mod federation;
pub(crate) mod federation_wiring;
pub(crate) mod gateway;
mod identity;
mod policy;
mod prove;
pub(crate) mod routes;

use clap::{Parser, Subcommand};

use crate::exit::{CliResult, Outcome};

/// meshgate: a zero-trust gateway mesh (SPIFFE identities, QUIC + mTLS gateways, Cedar policy,
/// tamper-evident decision log, federation).
#[derive(Debug, Parser)]
#[command(name = "meshgate", version, propagate_version = true)]
pub struct Cli {
    /// Log as JSON lines (also `LOG_FORMAT=json`); filter with `RUST_LOG`.
    #[arg(long, global = true)]
    pub log_json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The SPIFFE identity issuer: trust domains, SVIDs, bundles, registration, the agent.
    #[command(subcommand)]
    Identity(identity::IdentityCommand),
    /// Cedar policies: validate, check, test, prove, diff, replay.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Start a three-cluster mesh on 127.0.0.1 and show what it does.
    Demo(crate::demo::DemoArgs),
    /// Run a cluster's gateway (issuer API, tunnel, enforcement, decision log).
    Gateway(gateway::GatewayArgs),
    /// The tamper-evident decision log: query, verify, export.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Federation links to peer clusters: add, remove, list, status.
    #[command(subcommand)]
    Federation(federation::FederationCommand),
    /// Traffic routes: reload them into a running gateway.
    #[command(subcommand)]
    Routes(routes::RoutesCommand),
}

impl Cli {
    pub fn run(self) -> CliResult<Outcome> {
        match self.command {
            Command::Identity(cmd) => cmd.run(),
            Command::Policy(cmd) => cmd.run(),
            Command::Audit(cmd) => cmd.run(),
            Command::Gateway(cmd) => cmd.run(),
            Command::Demo(cmd) => cmd.run(),
            Command::Federation(cmd) => cmd.run(),
            Command::Routes(cmd) => cmd.run(),
        }
    }
}

/// Installs the tracing subscriber: `RUST_LOG` filters (default `info`), JSON with
/// `--log-json` or `LOG_FORMAT=json`. Logs go to stderr so stdout stays machine-readable.
pub fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let json = json || std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests calling in-process) is harmless: ignore the error.
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// Prints a value as pretty JSON on stdout.
#[allow(dead_code)]
pub fn print_json<T: serde::Serialize>(value: &T) -> CliResult<()> {
    use crate::exit::ResultExt;
    let text = serde_json::to_string_pretty(value).internal_err()?;
    println!("{text}");
    Ok(())
}

/// Runs a future on a fresh multi-threaded runtime (for commands that do network I/O).
#[allow(dead_code)]
pub fn block_on<F: std::future::Future>(fut: F) -> CliResult<F::Output> {
    block_on_with(0, fut)
}

/// Like [`block_on`] with `workers` worker threads (0: one per core).
pub fn block_on_with<F: std::future::Future>(workers: usize, fut: F) -> CliResult<F::Output> {
    use crate::exit::ResultExt;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        builder.worker_threads(workers);
    }
    let rt = builder.enable_all().build().internal_err()?;
    Ok(rt.block_on(fut))
}
