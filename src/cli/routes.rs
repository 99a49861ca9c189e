//! `meshgate routes reload --state DIR`: the running gateway reads the `[[routes]]` of its
//! config file again and swaps them in, all or nothing (an invalid set is refused, every
//! problem named, and the routes in use keep serving).

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use clap::Subcommand;
use meshgate_gateway::Routes;

use crate::admin::commands::{RoutesReload, RoutesReply};
use crate::admin::protocol::AdminError;
use crate::admin::{AdminClient, Registry};
use crate::cli::print_json;
use crate::exit::{CliError, CliResult, Outcome};

/// Traffic routes.
#[derive(Debug, Subcommand)]
pub enum RoutesCommand {
    /// Tell the running gateway to read the `[[routes]]` of its config file again. An invalid
    /// set is refused and the old one keeps serving. Exit 0 reloaded, 1 refused, 3 no
    /// gateway running.
    Reload {
        /// The state directory of the running gateway.
        #[arg(long)]
        state: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

impl RoutesCommand {
    pub fn run(self) -> CliResult<Outcome> {
        match self {
            Self::Reload { state, json } => reload(&state, json),
        }
    }
}

fn reload(state: &Path, json: bool) -> CliResult<Outcome> {
    let Some(client) = AdminClient::live(state)? else {
        return Err(CliError::internal(anyhow!(
            "no gateway is running on `{}` (no live admin socket); routes are read when `meshgate gateway` starts",
            state.display()
        )));
    };
    let reply = client.call(&RoutesReload {})?;
    if json {
        print_json(&reply)?;
    } else if reply.reloaded {
        println!("reloaded: {} traffic routes", reply.routes);
        for w in &reply.warnings {
            println!("  warning: {w}");
        }
    } else {
        eprintln!("refused: the routes in the config file are invalid:");
        for e in &reply.errors {
            eprintln!("  {e}");
        }
        eprintln!("the gateway keeps serving its {} routes", reply.routes);
    }
    Ok(if reply.reloaded {
        Outcome::Yes
    } else {
        Outcome::No
    })
}

/// Registers `routes.reload` for a gateway started from `config_file`.
pub fn register_admin(registry: &mut Registry, routes: Routes, config_file: Option<PathBuf>) {
    registry.add(move |_: RoutesReload, _| {
        let Some(path) = &config_file else {
            return Err(AdminError::input(
                "this gateway was not started from a config file (`meshgate gateway --config`): there is nothing to read routes from",
            ));
        };
        let refused = |errors: Vec<String>| RoutesReply {
            reloaded: false,
            routes: routes.count(),
            errors,
            warnings: Vec::new(),
        };
        let config = match crate::cli::gateway::load_config(path) {
            Ok(c) => c,
            Err(e) => return Ok(refused(vec![format!("{e:#}")])),
        };
        Ok(match routes.reload(&config.routes) {
            Ok(report) => RoutesReply {
                reloaded: true,
                routes: report.routes,
                errors: Vec::new(),
                warnings: report.warnings,
            },
            Err(errors) => refused(errors),
        })
    });
}
