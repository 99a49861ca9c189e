//! `meshgate federation add|remove|list|status|witnessed`: federation links of a cluster.
//!
//! While the cluster's gateway runs, the commands go through its admin socket and take
//! effect at once (a removed peer is distrusted and disconnected immediately); otherwise
//! they open the state directly and the gateway picks the links up at its next start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::anyhow;
use clap::Subcommand;
use meshgate_federation::witness::WitnessFile;
use meshgate_federation::{Federation, Link, LinkStatus, Store, status_from_db};
use meshgate_identity::TrustDomain;
use serde::{Deserialize, Serialize};

use super::print_json;
use crate::admin::protocol::{AdminCommand, AdminError};
use crate::admin::{AdminClient, Registry};
use crate::exit::{CliError, CliResult, Outcome, ResultExt};
use crate::state::State;

#[derive(Debug, Subcommand)]
pub enum FederationCommand {
    /// Add (or replace) a link to a peer cluster.
    Add {
        /// The state directory.
        #[arg(long)]
        state: PathBuf,
        /// The peer's cluster name, e.g. `west`.
        #[arg(long)]
        cluster: String,
        /// The peer's trust domain, e.g. `west.example`.
        #[arg(long)]
        trust_domain: String,
        /// A peer gateway's QUIC address (repeat for several).
        #[arg(long = "gateway")]
        gateways: Vec<SocketAddr>,
        /// A DNS name for the peer's gateways (SRV first, then A/AAAA; `name:port`).
        #[arg(long)]
        dns: Option<String>,
        /// The peer's bundle (SPIFFE JSON): the bootstrap trust anchor.
        #[arg(long)]
        bundle: PathBuf,
        /// Lower is preferred when several clusters export a service.
        #[arg(long, default_value_t = 0)]
        priority: u32,
        /// A service (`service.namespace`) the peer may serve under its unpinned name
        /// `<svc>.<ns>.mesh` (repeat for several); without it, only the pinned name.
        #[arg(long = "shared")]
        shared: Vec<String>,
        /// A service of the peer that receives the caller's `Authorization` and `Cookie`
        /// headers (repeat for several); no other service of the peer gets them.
        #[arg(long = "credentials")]
        credentials: Vec<String>,
    },
    /// Remove a link: the peer is distrusted and disconnected at once.
    Remove {
        /// The state directory.
        #[arg(long)]
        state: PathBuf,
        /// The peer's trust domain or cluster name.
        peer: String,
    },
    /// List the links.
    List {
        /// The state directory.
        #[arg(long)]
        state: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show every link: state, last sync, bundle sequence, lag, exported/imported services.
    Status {
        /// The state directory.
        #[arg(long)]
        state: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the checkpoint heads of a peer's decision log held here, as a witness file for
    /// that peer's `meshgate audit verify --witnesses`.
    Witnessed {
        /// The state directory.
        #[arg(long)]
        state: PathBuf,
        /// The peer whose heads to print (trust domain).
        #[arg(long)]
        trust_domain: String,
    },
}

/// `federation.add` over the admin socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationAdd {
    pub link: Link,
}

impl AdminCommand for FederationAdd {
    const NAME: &'static str = "federation.add";
    type Reply = ();
    fn describe(&self) -> String {
        format!(
            "federation add `{}` (`{}`)",
            self.link.cluster, self.link.trust_domain
        )
    }
}

/// `federation.remove` over the admin socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationRemove {
    pub peer: String,
}

impl AdminCommand for FederationRemove {
    const NAME: &'static str = "federation.remove";
    type Reply = String;
    fn describe(&self) -> String {
        format!("federation remove `{}`", self.peer)
    }
}

/// `federation.status` over the admin socket.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationStatus {}

impl AdminCommand for FederationStatus {
    const NAME: &'static str = "federation.status";
    type Reply = Vec<LinkStatus>;
}

/// `federation.witnessed` over the admin socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationWitnessed {
    pub trust_domain: String,
}

impl AdminCommand for FederationWitnessed {
    const NAME: &'static str = "federation.witnessed";
    type Reply = WitnessFile;
}

/// Registers the federation commands of a running gateway.
pub fn register_admin(registry: &mut Registry, fed: &Arc<Federation>) {
    let f = fed.clone();
    registry.add(move |cmd: FederationAdd, _| {
        f.add_link(cmd.link, SystemTime::now())
            .map_err(AdminError::input)
    });
    let f = fed.clone();
    registry.add(move |cmd: FederationRemove, _| {
        let td = resolve_peer(
            &cmd.peer,
            f.status(SystemTime::now())
                .iter()
                .map(|s| (&s.cluster, &s.trust_domain)),
        )
        .map_err(AdminError::input)?;
        f.remove_link(&td).map_err(AdminError::internal)?;
        Ok(td.to_string())
    });
    let f = fed.clone();
    registry.add(move |_: FederationStatus, _| Ok(f.status(SystemTime::now())));
    let f = fed.clone();
    registry.add(move |cmd: FederationWitnessed, _| {
        Ok(WitnessFile {
            checkpoints: f
                .witnessed(&cmd.trust_domain)
                .map_err(AdminError::internal)?,
            trust_domain: cmd.trust_domain,
            witness: f.local().cluster.clone(),
        })
    });
}

impl FederationCommand {
    pub fn run(self) -> CliResult<Outcome> {
        match self {
            Self::Add {
                state,
                cluster,
                trust_domain,
                gateways,
                dns,
                bundle,
                priority,
                shared,
                credentials,
            } => {
                let text = std::fs::read_to_string(&bundle)
                    .input_ctx(|| format!("cannot read bundle `{}`", bundle.display()))?;
                let mut link = Link {
                    cluster,
                    trust_domain,
                    gateways,
                    dns,
                    priority,
                    bootstrap_bundle: text,
                    services: Vec::new(),
                    shared,
                    credentials,
                };
                // One spelling everywhere (`spiffe://west.example` is `west.example`).
                link.normalize().input_err()?;
                if let Some(client) = AdminClient::live(&state)? {
                    client.call(&FederationAdd { link: link.clone() })?;
                } else {
                    let (state, store) = open(&state)?;
                    let own = meshgate_identity::Issuer::open(state.db(), &state.keys_dir())
                        .internal_err()?;
                    if own.trust_domain().as_str() == link.trust_domain {
                        return Err(CliError::input(anyhow!(
                            "`{}` is this cluster's own trust domain",
                            link.trust_domain
                        )));
                    }
                    admin_event(
                        &state,
                        &format!(
                            "federation add `{}` (`{}`)",
                            link.cluster, link.trust_domain
                        ),
                    )?;
                    store.add_link(&link, SystemTime::now()).internal_err()?;
                }
                println!("linked `{}` ({})", link.cluster, link.trust_domain);
                Ok(Outcome::Yes)
            }
            Self::Remove { state, peer } => {
                let removed = if let Some(client) = AdminClient::live(&state)? {
                    client.call(&FederationRemove { peer })?
                } else {
                    let (state, store) = open(&state)?;
                    let links = store.links().internal_err()?;
                    let td =
                        resolve_peer(&peer, links.values().map(|l| (&l.cluster, &l.trust_domain)))
                            .input_err()?;
                    admin_event(&state, &format!("federation remove `{td}`"))?;
                    store.remove_link(td.as_str()).internal_err()?;
                    if store.config_links().internal_err()?.contains(td.as_str()) {
                        eprintln!(
                            "warning: `{td}` is named in the config file: it comes back at the next start unless its [[peers]] entry is removed"
                        );
                    }
                    td.to_string()
                };
                println!("removed the link to `{removed}`");
                Ok(Outcome::Yes)
            }
            Self::List { state, json } | Self::Status { state, json } => {
                let links = status(&state)?;
                if json {
                    print_json(&links)?;
                } else {
                    print_status(&links);
                }
                Ok(Outcome::Yes)
            }
            Self::Witnessed {
                state,
                trust_domain,
            } => {
                let file = if let Some(client) = AdminClient::live(&state)? {
                    client.call(&FederationWitnessed { trust_domain })?
                } else {
                    let (state, store) = open(&state)?;
                    let cluster = state.root().display().to_string();
                    witness_file(&store, &cluster, &trust_domain).internal_err()?
                };
                print_json(&file)?;
                Ok(Outcome::Yes)
            }
        }
    }
}

fn status(state: &Path) -> CliResult<Vec<LinkStatus>> {
    if let Some(client) = AdminClient::live(state)? {
        return client.call(&FederationStatus {});
    }
    let state = State::open(state).internal_err()?;
    status_from_db(state.db(), SystemTime::now()).internal_err()
}

fn print_status(links: &[LinkStatus]) {
    if links.is_empty() {
        println!("no federation links");
    }
    for l in links {
        println!(
            "{} ({}): {}, bundle seq {}, last sync {}, lag {}",
            l.cluster,
            l.trust_domain,
            l.state,
            l.bundle_sequence,
            l.last_sync.as_deref().unwrap_or("never"),
            l.lag_seconds
                .map_or_else(|| "-".to_owned(), |s| format!("{s}s")),
        );
        println!("  imported: {}", list(&l.imported));
        println!("  exported: {}", list(&l.exported));
        if let Some(e) = &l.last_error {
            println!("  last error: {e}");
        }
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(", ")
    }
}

fn open(state: &Path) -> CliResult<(State, Store)> {
    let state = State::open(state).internal_err()?;
    let store = Store::open(state.db()).internal_err()?;
    Ok((state, store))
}

/// Finds a link by trust domain or cluster name.
fn resolve_peer<'a>(
    peer: &str,
    links: impl Iterator<Item = (&'a String, &'a String)>,
) -> anyhow::Result<TrustDomain> {
    // Any spelling of a trust domain names the same link.
    let canonical = peer
        .parse::<TrustDomain>()
        .map_or_else(|_| peer.to_owned(), |td| td.to_string());
    for (cluster, td) in links {
        if *td == canonical || cluster == peer {
            return Ok(td.parse()?);
        }
    }
    Err(anyhow!("no federation link to `{peer}`"))
}

fn witness_file(store: &Store, witness: &str, td: &str) -> anyhow::Result<WitnessFile> {
    Ok(WitnessFile {
        trust_domain: td.to_owned(),
        witness: witness.to_owned(),
        checkpoints: store.witnessed(td)?,
    })
}

/// Records a state-direct admin action in the decision log (CONTRACTS.md).
fn admin_event(state: &State, what: &str) -> CliResult<()> {
    super::audit::record_admin(state, what)
}

/// `meshgate audit verify --witnesses FILE…`: checks the local chain against the heads peers
/// hold of it (files from the peers' `meshgate federation witnessed`). A rewritten and
/// re-signed log passes its own verification but disagrees with a witnessed head.
pub fn verify_witnesses(
    log: &meshgate_policy::DecisionLog,
    files: &[PathBuf],
    json: bool,
) -> CliResult<Outcome> {
    let mut heads = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(path)
            .input_ctx(|| format!("cannot read witness file `{}`", path.display()))?;
        let file: WitnessFile = serde_json::from_str(&text)
            .input_ctx(|| format!("`{}` is not a witness file", path.display()))?;
        heads.extend(file.checkpoints);
    }
    // Reads only the records the heads name; heads signed by another key than the log's
    // own are not of this log and are ignored.
    let report = meshgate_federation::witness::verify_against(log, &heads).internal_err()?;
    let head = log.head().0;
    if report.foreign > 0 && !json {
        println!(
            "witnesses: {} head(s) signed by another key than this log's were ignored",
            report.foreign
        );
    }
    if json {
        print_json(&report)?;
    } else if report.is_ok() {
        println!(
            "witnesses: ok: {} heads held by peers match ({} pruned here)",
            report.matched, report.pruned
        );
    } else {
        match report.truncated_before {
            Some(seq) => println!(
                "witnesses: the log was truncated or rolled back: it ends at record {head}, and peers witnessed up to record {seq}"
            ),
            None => println!("witnesses: tampering found:"),
        }
        for p in &report.problems {
            println!("  {p}");
        }
    }
    Ok(if report.is_ok() {
        Outcome::Yes
    } else {
        Outcome::No
    })
}
