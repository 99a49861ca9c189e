//! `meshgate gateway --config FILE`: one cluster's runtime (see `runtime`) until Ctrl-C,
//! then a graceful drain.

use std::path::{Path, PathBuf};

use clap::Args;
use meshgate_gateway::GatewayConfig;
use meshgate_identity::TrustDomain;

use crate::exit::{CliError, CliResult, Outcome, ResultExt};
use crate::runtime::Prepared;

/// Start a cluster's gateway from a TOML config file.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// The gateway config (TOML). Relative paths inside it are relative to the file.
    #[arg(long)]
    config: PathBuf,
    /// Validate the config and the state it names, print the effective config, and exit.
    #[arg(long)]
    check: bool,
}

impl GatewayArgs {
    pub fn run(self) -> CliResult<Outcome> {
        let config = load_config(&self.config)?;
        tracing::info!(config = ?config, "effective config");
        let prepared = Prepared::open(config)?.with_config_file(&self.config);
        if self.check {
            println!(
                "{}",
                toml::to_string_pretty(prepared.config()).internal_err()?
            );
            return Ok(Outcome::Yes);
        }
        let workers = prepared.config().runtime.worker_threads;
        crate::cli::block_on_with(workers, async move {
            let running = prepared.start().await?;
            print!("{}", running.describe());
            tokio::signal::ctrl_c().await.internal_err()?;
            eprintln!("shutting down: draining requests in flight");
            running.shutdown().await;
            Ok::<_, CliError>(Outcome::Yes)
        })?
    }
}

/// Reads and validates a config file; errors name the file, the line and the key.
pub fn load_config(path: &Path) -> CliResult<GatewayConfig> {
    let text = std::fs::read_to_string(path)
        .input_ctx(|| format!("cannot read config `{}`", path.display()))?;
    let mut config: GatewayConfig = toml::from_str(&text).map_err(|e| {
        CliError::input(anyhow::anyhow!("invalid config `{}`: {e}", path.display()))
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let rel = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    rel(&mut config.state_dir);
    rel(&mut config.policy.dir);
    if let Some(p) = config.policy.shadow_dir.as_mut() {
        rel(p);
    }
    if let Some(p) = config.policy.schema.as_mut() {
        rel(p);
    }
    for peer in &mut config.peers {
        rel(&mut peer.bundle);
    }
    if let Some(p) = config.console.policy.as_mut() {
        rel(p);
    }
    config.check_console().map_err(|e| {
        CliError::input(anyhow::anyhow!("invalid config `{}`: {e}", path.display()))
    })?;
    config
        .trust_domain
        .parse::<TrustDomain>()
        .input_ctx(|| format!("`{}`: `trust_domain`", path.display()))?;
    config.telemetry.check().map_err(|e| {
        CliError::input(anyhow::anyhow!("invalid config `{}`: {e}", path.display()))
    })?;
    if let Err(problems) = meshgate_gateway::check_routes(&config.routes) {
        return Err(CliError::input(anyhow::anyhow!(
            "invalid config `{}`: {} problem(s) in `[[routes]]`:\n  {}",
            path.display(),
            problems.len(),
            problems.join("\n  ")
        )));
    }
    Ok(config)
}
