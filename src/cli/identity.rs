//! `meshgate identity …`: the SPIFFE identity issuer from the command line.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand, ValueEnum};
use meshgate_identity::agent::{Agent, AgentConfig, AgentError};
use meshgate_identity::{
    Issuer, IssuerError, ListenerCert, RegistrationEntry, SpiffeId, SvidCertResolver, TrustBundle,
    TrustDomain, serve_issuer_api, write_atomic,
};
use serde_json::json;

use crate::admin::commands::{
    BundleView, EntryCreate, EntryDelete, EntryList, IdentityBundle, IdentityIssue, IdentityRotate,
    IssuedSvid, RotateView, TokenCreate, TokenView,
};
use crate::admin::{AdminClient, ops};
use crate::cli::{block_on, print_json};
use crate::exit::{CliError, CliResult, Outcome, ResultExt};
use crate::state::State;

/// Lifetime of the `serve` listener certificate; it is re-issued at half of it.
const SERVE_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Create a trust domain's state (CA root, JWT key) in a new state directory.
    Init {
        #[command(flatten)]
        state: StateArg,
        /// The trust domain, e.g. `east.example`.
        #[arg(long)]
        trust_domain: String,
    },
    /// Registration entries: which SPIFFE IDs workloads may hold.
    #[command(subcommand)]
    Entry(EntryCommand),
    /// One-time join tokens for `identity agent`.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Issue an X.509-SVID to files: svid.pem (leaf first), key.pem (PKCS#8), bundle.pem.
    Issue {
        #[command(flatten)]
        state: StateArg,
        /// The SPIFFE ID, inside the state's trust domain.
        #[arg(long)]
        spiffe_id: String,
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Lifetime, e.g. `1h`, `30m`.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        ttl: Duration,
        /// Extra DNS SAN (repeatable).
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        /// Extra IP SAN (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the trust bundle (SPIFFE JSON by default, or PEM roots).
    Bundle {
        #[command(flatten)]
        state: StateArg,
        /// Output format.
        #[arg(long, value_enum, default_value_t = BundleFormat::Spiffe)]
        format: BundleFormat,
    },
    /// Two-step CA rotation.
    #[command(subcommand)]
    Rotate(RotateCommand),
    /// Serve the issuer API over HTTPS (attest, renew, jwt, bundle).
    Serve {
        #[command(flatten)]
        state: StateArg,
        /// Address to listen on, e.g. `127.0.0.1:8443` (port 0 picks one; the bound address
        /// is printed).
        #[arg(long)]
        listen: SocketAddr,
        /// DNS SAN for the listener certificate (repeatable).
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        /// IP SAN for the listener certificate (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
    },
    /// Redeem a join token and keep svid.pem/key.pem/bundle.pem renewed in a directory.
    Agent {
        /// The issuer, `https://HOST:PORT`.
        #[arg(long)]
        issuer: String,
        /// The bootstrap trust anchor: the issuer's bundle.pem.
        #[arg(long)]
        bundle: PathBuf,
        /// The one-time join token.
        #[arg(long)]
        token: String,
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct StateArg {
    /// The state directory.
    #[arg(long = "state")]
    dir: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BundleFormat {
    /// The SPIFFE trust bundle JSON document.
    Spiffe,
    /// The X.509 roots as PEM.
    Pem,
}

#[derive(Debug, Subcommand)]
pub enum EntryCommand {
    /// Register a SPIFFE ID.
    Create {
        #[command(flatten)]
        state: StateArg,
        #[arg(long)]
        spiffe_id: String,
        /// SVID lifetime.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        ttl: Duration,
        /// DNS SAN (repeatable).
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// List registration entries.
    List {
        #[command(flatten)]
        state: StateArg,
        #[arg(long)]
        json: bool,
    },
    /// Delete a registration entry (its SVIDs can no longer renew).
    Delete {
        #[command(flatten)]
        state: StateArg,
        #[arg(long)]
        spiffe_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a one-time join token for a registered SPIFFE ID (printed once).
    Create {
        #[command(flatten)]
        state: StateArg,
        #[arg(long)]
        spiffe_id: String,
        /// Token lifetime.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "15m")]
        ttl: Duration,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RotateCommand {
    /// Add a new root to the bundle without signing with it yet.
    Prepare {
        #[command(flatten)]
        state: StateArg,
    },
    /// Make the prepared root the signer; the old one stays until its SVIDs expire.
    Activate {
        #[command(flatten)]
        state: StateArg,
    },
}

impl IdentityCommand {
    pub fn run(self) -> CliResult<Outcome> {
        let now = SystemTime::now();
        match self {
            Self::Init {
                state,
                trust_domain,
            } => {
                let td: TrustDomain = trust_domain
                    .parse()
                    .input_ctx(|| "invalid `--trust-domain`")?;
                if state.dir.join("db").exists() {
                    return Err(CliError::input(anyhow::anyhow!(
                        "`{}` already holds a state; refusing to overwrite it",
                        state.dir.display()
                    )));
                }
                let st = State::create(&state.dir).internal_err()?;
                Issuer::init(st.db(), &st.keys_dir(), td.clone(), now).map_err(issuer_err)?;
                println!(
                    "initialised trust domain `{td}` in `{}`",
                    state.dir.display()
                );
            }
            Self::Entry(cmd) => return cmd.run(),
            Self::Token(TokenCommand::Create {
                state,
                spiffe_id,
                ttl,
                json,
            }) => {
                let id = parse_id(&spiffe_id)?;
                let token = backend(&state)?.create_token(&TokenCreate {
                    spiffe_id: id.to_string(),
                    ttl_secs: ttl.as_secs(),
                })?;
                if json {
                    print_json(&token)?;
                } else {
                    println!("{}", token.token);
                }
            }
            Self::Issue {
                state,
                spiffe_id,
                out,
                ttl,
                dns_names,
                ips,
                json,
            } => {
                parse_id(&spiffe_id)?;
                let svid = backend(&state)?.issue(&IdentityIssue {
                    spiffe_id,
                    ttl_secs: ttl.as_secs(),
                    dns_names,
                    ips,
                })?;
                std::fs::create_dir_all(&out)
                    .internal_ctx(|| format!("cannot create `{}`", out.display()))?;
                write(&out.join("key.pem"), svid.key_pem.as_bytes(), 0o600)?;
                write(&out.join("svid.pem"), svid.svid_pem.as_bytes(), 0o644)?;
                write(&out.join("bundle.pem"), svid.bundle_pem.as_bytes(), 0o644)?;
                let (id, expires) = (&svid.spiffe_id, svid.expires_at);
                if json {
                    print_json(&json!({
                        "spiffe_id": id, "expires_at": expires,
                        "svid": out.join("svid.pem"), "key": out.join("key.pem"), "bundle": out.join("bundle.pem"),
                    }))?;
                } else {
                    println!(
                        "issued `{id}` to `{}` (expires at unix {expires})",
                        out.display()
                    );
                }
            }
            Self::Bundle { state, format } => {
                let bundle = backend(&state)?.bundle()?;
                match format {
                    BundleFormat::Spiffe => println!("{}", bundle.spiffe_json),
                    BundleFormat::Pem => print!("{}", bundle.pem),
                }
            }
            Self::Rotate(cmd) => {
                let (state, cmd, step) = match cmd {
                    RotateCommand::Prepare { state } => {
                        (state, IdentityRotate { activate: false }, "prepared")
                    }
                    RotateCommand::Activate { state } => {
                        (state, IdentityRotate { activate: true }, "activated")
                    }
                };
                let status = backend(&state)?.rotate(&cmd)?;
                println!(
                    "root generation {} {step}; bundle sequence {}",
                    status.generation, status.sequence
                );
            }
            Self::Serve {
                state,
                listen,
                dns_names,
                ips,
            } => {
                if AdminClient::live(&state.dir)?.is_some() {
                    return Err(CliError::input(anyhow::anyhow!(
                        "a gateway is running on `{}` and holds its state; it serves the issuer API itself: set `listeners.issuer = \"{listen}\"` in its config instead",
                        state.dir.display()
                    )));
                }
                serve(&state, listen, dns_names, ips)?
            }
            Self::Agent {
                issuer,
                bundle,
                token,
                out,
            } => agent(issuer, &bundle, token, out)?,
        }
        Ok(Outcome::Yes)
    }
}

impl EntryCommand {
    fn run(self) -> CliResult<Outcome> {
        match self {
            Self::Create {
                state,
                spiffe_id,
                ttl,
                dns_names,
                json,
            } => {
                let id = parse_id(&spiffe_id)?;
                let entry = backend(&state)?.create_entry(&EntryCreate {
                    spiffe_id: id.to_string(),
                    ttl_secs: ttl.as_secs(),
                    dns_names,
                })?;
                if json {
                    print_json(&entry)?;
                } else {
                    println!(
                        "created entry `{}` (ttl {}s)",
                        entry.spiffe_id, entry.ttl_secs
                    );
                }
            }
            Self::List { state, json } => {
                let entries = backend(&state)?.list_entries()?;
                if json {
                    print_json(&entries)?;
                } else {
                    for e in entries {
                        println!(
                            "{}\tttl={}s\tdns={}",
                            e.spiffe_id,
                            e.ttl_secs,
                            e.dns_names.join(",")
                        );
                    }
                }
            }
            Self::Delete { state, spiffe_id } => {
                let id = parse_id(&spiffe_id)?;
                backend(&state)?.delete_entry(&EntryDelete {
                    spiffe_id: id.to_string(),
                })?;
                println!("deleted entry `{id}`");
            }
        }
        Ok(Outcome::Yes)
    }
}

/// What the entry, token, issue, bundle and rotate commands need from an issuer: the running gateway's (over the
/// admin socket) or the state's, opened directly. Both run the same logic (`admin::ops`).
trait IdentityBackend {
    fn create_entry(&self, cmd: &EntryCreate) -> CliResult<RegistrationEntry>;
    fn list_entries(&self) -> CliResult<Vec<RegistrationEntry>>;
    fn delete_entry(&self, cmd: &EntryDelete) -> CliResult<RegistrationEntry>;
    fn create_token(&self, cmd: &TokenCreate) -> CliResult<TokenView>;
    fn issue(&self, cmd: &IdentityIssue) -> CliResult<IssuedSvid>;
    fn bundle(&self) -> CliResult<BundleView>;
    fn rotate(&self, cmd: &IdentityRotate) -> CliResult<RotateView>;
}

/// The state opened directly (no gateway running).
struct LocalIssuer {
    _state: State,
    issuer: Issuer,
}

impl LocalIssuer {
    fn record(&self, cmd: &impl crate::admin::protocol::AdminCommand) -> CliResult<()> {
        crate::cli::audit::record_admin(&self._state, &cmd.describe())
    }
}

impl IdentityBackend for LocalIssuer {
    fn create_entry(&self, cmd: &EntryCreate) -> CliResult<RegistrationEntry> {
        self.record(cmd)?;
        Ok(cmd.run(&self.issuer, SystemTime::now())?)
    }
    fn list_entries(&self) -> CliResult<Vec<RegistrationEntry>> {
        Ok(ops::list_entries(&self.issuer)?)
    }
    fn delete_entry(&self, cmd: &EntryDelete) -> CliResult<RegistrationEntry> {
        self.record(cmd)?;
        Ok(cmd.run(&self.issuer)?)
    }
    fn create_token(&self, cmd: &TokenCreate) -> CliResult<TokenView> {
        self.record(cmd)?;
        Ok(cmd.run(&self.issuer, SystemTime::now())?)
    }
    fn issue(&self, cmd: &IdentityIssue) -> CliResult<IssuedSvid> {
        self.record(cmd)?;
        Ok(cmd.run(&self.issuer, SystemTime::now())?)
    }
    fn bundle(&self) -> CliResult<BundleView> {
        Ok(ops::bundle(&self.issuer, SystemTime::now())?)
    }
    fn rotate(&self, cmd: &IdentityRotate) -> CliResult<RotateView> {
        self.record(cmd)?;
        Ok(cmd.run(&self.issuer, SystemTime::now())?)
    }
}

impl IdentityBackend for AdminClient {
    fn create_entry(&self, cmd: &EntryCreate) -> CliResult<RegistrationEntry> {
        self.call(cmd)
    }
    fn list_entries(&self) -> CliResult<Vec<RegistrationEntry>> {
        self.call(&EntryList {})
    }
    fn delete_entry(&self, cmd: &EntryDelete) -> CliResult<RegistrationEntry> {
        self.call(cmd)
    }
    fn create_token(&self, cmd: &TokenCreate) -> CliResult<TokenView> {
        self.call(cmd)
    }
    fn issue(&self, cmd: &IdentityIssue) -> CliResult<IssuedSvid> {
        self.call(cmd)
    }
    fn bundle(&self) -> CliResult<BundleView> {
        self.call(&IdentityBundle {})
    }
    fn rotate(&self, cmd: &IdentityRotate) -> CliResult<RotateView> {
        self.call(cmd)
    }
}

/// The running gateway when one answers on the state's admin socket, else the state itself.
fn backend(state: &StateArg) -> CliResult<Box<dyn IdentityBackend>> {
    if let Some(client) = AdminClient::live(&state.dir)? {
        return Ok(Box::new(client));
    }
    let (state, issuer) = open(state)?;
    Ok(Box::new(LocalIssuer {
        _state: state,
        issuer,
    }))
}

fn parse_id(s: &str) -> CliResult<SpiffeId> {
    s.parse::<SpiffeId>().input_ctx(|| "invalid `--spiffe-id`")
}

fn issuer_err(e: IssuerError) -> CliError {
    if e.is_input() {
        CliError::input(e)
    } else {
        CliError::internal(e)
    }
}

fn open(state: &StateArg) -> CliResult<(State, Issuer)> {
    let st = State::open(&state.dir).internal_err()?;
    let issuer = Issuer::open(st.db(), &st.keys_dir()).map_err(|e| match e {
        IssuerError::NotInitialised => CliError::internal(e),
        other => issuer_err(other),
    })?;
    Ok((st, issuer))
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> CliResult<()> {
    write_atomic(path, bytes, mode).internal_ctx(|| format!("cannot write `{}`", path.display()))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn serve(
    state: &StateArg,
    listen: SocketAddr,
    dns_names: Vec<String>,
    ips: Vec<IpAddr>,
) -> CliResult<()> {
    let (_st, issuer) = open(state)?;
    let issuer = Arc::new(issuer);
    let cert = ListenerCert {
        id: SpiffeId::gateway(issuer.trust_domain()),
        dns_names,
        ips,
        ttl: SERVE_CERT_TTL,
    };
    let svid = cert.issue(&issuer, SystemTime::now()).map_err(issuer_err)?;
    let resolver = Arc::new(SvidCertResolver::new(&svid).internal_err()?);
    block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .internal_ctx(|| format!("cannot listen on `{listen}`"))?;
        let bound = listener.local_addr().internal_err()?;
        println!("listening on {bound}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let renewer = tokio::spawn(cert.keep_renewed(issuer.clone(), resolver.clone()));
        let result = serve_issuer_api(listener, issuer, resolver, shutdown_signal()).await;
        renewer.abort();
        result.internal_ctx(|| "issuer API failed")
    })?
}

fn agent(issuer: String, bundle: &Path, token: String, out: PathBuf) -> CliResult<()> {
    let pem =
        std::fs::read(bundle).internal_ctx(|| format!("cannot read `{}`", bundle.display()))?;
    let bundle = TrustBundle::from_pem_infer(&pem)
        .input_ctx(|| format!("`{}` is not a usable bundle", bundle.display()))?;
    std::fs::create_dir_all(&out).internal_ctx(|| format!("cannot create `{}`", out.display()))?;
    let config = AgentConfig::new(issuer, bundle, token, out);
    // A bad URL is bad input; check it before starting.
    meshgate_identity::IssuerClient::new(&config.issuer_url, config.bundle.clone()).input_err()?;
    let agent = Agent::new(config);
    block_on(async move { agent.run(shutdown_signal()).await })?.map_err(|e| match e {
        AgentError::Refused(_) => CliError::input(e),
        other => CliError::internal(other),
    })
}
