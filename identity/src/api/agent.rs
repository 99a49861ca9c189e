//! The workload agent behind `meshgate identity agent`: redeems a join token with a locally
//! generated CSR (the private key never leaves), writes `svid.pem`, `key.pem` (0600) and
//! `bundle.pem` atomically, and renews at about half the SVID's lifetime. While the issuer is
//! unreachable it keeps the still-valid files and retries with capped exponential backoff and
//! jitter.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::SvidResponse;
use super::client::{IssuerClient, IssuerClientError};
use crate::bundle::TrustBundle;
use crate::csr::CsrAndKey;
use crate::files::{pem_encode, write_atomic};
use crate::id::SpiffeId;
use crate::svid::X509Svid;

/// File names the agent writes in its output directory.
pub const SVID_FILE: &str = "svid.pem";
/// The private key file (PKCS#8 PEM, mode 0600).
pub const KEY_FILE: &str = "key.pem";
/// The trust bundle file (X.509 roots, PEM).
pub const BUNDLE_FILE: &str = "bundle.pem";
/// The SVID chain followed by its key, written in one atomic rename (mode 0600).
pub const SVID_KEY_FILE: &str = "svid_key.pem";

/// Why the agent stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The issuer refused the join token or the CSR: retrying cannot help.
    #[error("attestation refused: {0}")]
    Refused(IssuerClientError),
    /// The output files could not be written.
    #[error("cannot write `{path}`: {reason}")]
    Write {
        /// The file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// The issuer's answer was inconsistent (wrong ID, unreadable SVID or bundle).
    #[error("unusable answer from the issuer: {reason}")]
    BadAnswer {
        /// What is wrong.
        reason: String,
    },
    /// Generating the key pair or CSR failed.
    #[error("cannot generate a key pair: {reason}")]
    Keygen {
        /// What failed.
        reason: String,
    },
}

/// What the agent is doing, for tests and health checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentStatus {
    /// The SPIFFE ID held, once attested.
    pub spiffe_id: Option<SpiffeId>,
    /// The current SVID's notAfter.
    pub not_after: Option<SystemTime>,
    /// How many SVIDs were written (attestation included).
    pub svids_written: u64,
    /// Consecutive failed attempts.
    pub failures: u32,
    /// The last error, if the last attempt failed.
    pub last_error: Option<String>,
}

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `https://HOST:PORT` of the issuer API.
    pub issuer_url: String,
    /// The bootstrap trust anchor (the issuer's bundle).
    pub bundle: TrustBundle,
    /// The one-time join token.
    pub token: String,
    /// Where the files go.
    pub out_dir: PathBuf,
    /// First retry delay.
    pub min_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
}

impl AgentConfig {
    /// Settings with the default backoff (1 s doubling up to 60 s).
    pub fn new(
        issuer_url: impl Into<String>,
        bundle: TrustBundle,
        token: impl Into<String>,
        out_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            issuer_url: issuer_url.into(),
            bundle,
            token: token.into(),
            out_dir: out_dir.into(),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// The delay before retry number `attempt` (0-based): `min · 2^attempt`, capped at `max`,
/// then scaled by `jitter` in [0.5, 1.0] so agents restarted together spread out.
pub fn backoff_delay(attempt: u32, min: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = min
        .saturating_mul(2u32.saturating_pow(attempt.min(20)))
        .min(max);
    exp.mul_f64(jitter.clamp(0.5, 1.0))
}

/// When to renew an SVID received at `now` that expires at `not_after`: halfway there.
pub fn renew_at(now: SystemTime, not_after: SystemTime) -> SystemTime {
    now + not_after.duration_since(now).unwrap_or_default() / 2
}

/// The workload agent.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    status: watch::Sender<AgentStatus>,
}

impl Agent {
    /// An agent with `config`; nothing happens until [`Agent::run`].
    pub fn new(config: AgentConfig) -> Self {
        Self {
            config,
            status: watch::Sender::new(AgentStatus::default()),
        }
    }

    /// Follows the agent's status.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown` completes (then `Ok`), or until attestation is refused.
    /// If valid files already exist in the output directory (a restart), the token is not
    /// redeemed again: the agent renews from those files.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        let client = IssuerClient::new(&self.config.issuer_url, self.config.bundle.clone())
            .map_err(AgentError::Refused)?;
        let mut current = match load_existing(&self.config.out_dir, SystemTime::now()) {
            Some(svid) => {
                tracing::info!(spiffe_id = %svid.spiffe_id(), "using the still-valid SVID on disk");
                self.publish_ok(&svid, false);
                svid
            }
            None => {
                let attested = tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    r = self.attest(&client) => r?,
                };
                attested
            }
        };
        let mut next = renew_at(SystemTime::now(), current.not_after());
        loop {
            let wait = next.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
            match self.renew_once(&client, &current).await {
                Ok(svid) => {
                    next = renew_at(SystemTime::now(), svid.not_after());
                    current = svid;
                }
                Err(e) => {
                    let failures = self.publish_err(&e);
                    next = SystemTime::now() + self.delay(failures.saturating_sub(1));
                    tracing::warn!(error = %e, retry_in = ?next.duration_since(SystemTime::now()).unwrap_or_default(), "renewal failed; keeping the current files");
                }
            }
        }
    }

    fn delay(&self, attempt: u32) -> Duration {
        let jitter = 0.5 + rand::random::<f64>() * 0.5;
        backoff_delay(
            attempt,
            self.config.min_backoff,
            self.config.max_backoff,
            jitter,
        )
    }

    async fn attest(&self, client: &IssuerClient) -> Result<X509Svid, AgentError> {
        let mut attempt = 0;
        loop {
            let csr = CsrAndKey::generate(None).map_err(|e| AgentError::Keygen {
                reason: e.to_string(),
            })?;
            match client.attest(&self.config.token, &csr.csr_pem()).await {
                Ok(resp) => return self.accept(client, resp, csr, None),
                Err(e) if e.is_transient() => {
                    self.publish_err(&e.to_string());
                    let delay = self.delay(attempt);
                    attempt += 1;
                    tracing::warn!(error = %e, retry_in = ?delay, "issuer unreachable; retrying attestation");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(AgentError::Refused(e)),
            }
        }
    }

    async fn renew_once(
        &self,
        client: &IssuerClient,
        current: &X509Svid,
    ) -> Result<X509Svid, String> {
        let csr = CsrAndKey::generate(Some(current.spiffe_id())).map_err(|e| e.to_string())?;
        let resp = client
            .renew(current, &csr.csr_pem())
            .await
            .map_err(|e| e.to_string())?;
        self.accept(client, resp, csr, Some(current.spiffe_id()))
            .map_err(|e| e.to_string())
    }

    /// Checks an answer, writes the files (key first) and publishes the new status.
    fn accept(
        &self,
        client: &IssuerClient,
        resp: SvidResponse,
        csr: CsrAndKey,
        expected: Option<&SpiffeId>,
    ) -> Result<X509Svid, AgentError> {
        let bad = |reason: String| AgentError::BadAnswer { reason };
        let svid =
            X509Svid::from_pem(resp.svid.as_bytes(), None).map_err(|e| bad(e.to_string()))?;
        if expected.is_some_and(|id| id != svid.spiffe_id())
            || svid.spiffe_id().trust_domain() != client.trust_domain()
        {
            return Err(bad(format!(
                "issued `{}`, which is not this workload's ID",
                svid.spiffe_id()
            )));
        }
        let bundle = serde_json::to_string(&resp.spiffe_bundle).map_err(|e| bad(e.to_string()))?;
        let bundle = TrustBundle::from_spiffe_json(&bundle, client.trust_domain())
            .map_err(|e| bad(e.to_string()))?;
        let svid = X509Svid::from_parts(
            svid.cert_chain().to_vec(),
            Some(csr.private_key.clone_key()),
        )
        .map_err(|e| bad(e.to_string()))?;
        let dir = &self.config.out_dir;
        let key_pem = pem_encode("PRIVATE KEY", csr.private_key.secret_der());
        let chain_pem = svid.cert_chain_pem();
        // `svid_key.pem` (chain then key) is replaced in one rename: readers that must never
        // see a certificate with the wrong key read that file. The separate files are
        // written key first; `load_existing` checks that they match.
        write(
            dir,
            SVID_KEY_FILE,
            format!("{chain_pem}{key_pem}").as_bytes(),
            0o600,
        )?;
        write(dir, KEY_FILE, key_pem.as_bytes(), 0o600)?;
        write(dir, SVID_FILE, chain_pem.as_bytes(), 0o644)?;
        write(dir, BUNDLE_FILE, bundle.to_pem().as_bytes(), 0o644)?;
        client.update_bundle(bundle);
        tracing::info!(spiffe_id = %svid.spiffe_id(), "SVID written");
        self.publish_ok(&svid, true);
        Ok(svid)
    }

    fn publish_ok(&self, svid: &X509Svid, written: bool) {
        self.status.send_modify(|s| {
            s.spiffe_id = Some(svid.spiffe_id().clone());
            s.not_after = Some(svid.not_after());
            s.svids_written += u64::from(written);
            s.failures = 0;
            s.last_error = None;
        });
    }

    fn publish_err(&self, e: &str) -> u32 {
        let mut failures = 0;
        self.status.send_modify(|s| {
            s.failures = s.failures.saturating_add(1);
            s.last_error = Some(e.to_owned());
            failures = s.failures;
        });
        failures
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), AgentError> {
    let path = dir.join(name);
    write_atomic(&path, bytes, mode).map_err(|e| AgentError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// The SVID already in `dir`, if its files are readable and it is still valid at `now`.
/// `svid_key.pem` is written first and in one rename, so it is the newest consistent pair;
/// the separate files are the fallback (a crash between their two renames can leave a new
/// key beside the old certificate, which is never reused).
fn load_existing(dir: &Path, now: SystemTime) -> Option<X509Svid> {
    let combined = || {
        let both = crate::files::read_private(&dir.join(SVID_KEY_FILE)).ok()?;
        usable(X509Svid::from_pem(&both, Some(&both)).ok()?, now)
    };
    let separate = || {
        let chain = std::fs::read(dir.join(SVID_FILE)).ok()?;
        let key = crate::files::read_private(&dir.join(KEY_FILE)).ok()?;
        usable(X509Svid::from_pem(&chain, Some(&key)).ok()?, now)
    };
    combined().or_else(separate)
}

/// The SVID if its key matches its certificate and it is still valid at `now`.
fn usable(svid: X509Svid, now: SystemTime) -> Option<X509Svid> {
    crate::provider::certified_key(&svid)
        .ok()?
        .keys_match()
        .ok()?;
    (svid.not_after() > now).then_some(svid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_pair_is_never_reused_and_the_combined_file_wins() {
        let tmp = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let now = SystemTime::now();
        let issuer =
            crate::Issuer::init(&db, tmp.path(), "east.example".parse().unwrap(), now).unwrap();
        let id: crate::SpiffeId = "spiffe://east.example/ns/shop/sa/web".parse().unwrap();
        let old = issuer
            .issue_x509_svid(&id, Duration::from_secs(600), &[], &[], now)
            .unwrap();
        let new = issuer
            .issue_x509_svid(&id, Duration::from_secs(600), &[], &[], now)
            .unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let pem = |s: &X509Svid| (s.cert_chain_pem(), s.private_key_pem().unwrap());
        // Crash after the new key, before the new certificate: old cert + new key.
        std::fs::write(out.join(SVID_FILE), pem(&old).0).unwrap();
        write_atomic(&out.join(KEY_FILE), pem(&new).1.as_bytes(), 0o600).unwrap();
        assert!(
            load_existing(&out, now).is_none(),
            "a mismatched pair was reused"
        );
        // The combined file, written first, holds the new consistent pair.
        let (chain, key) = pem(&new);
        write_atomic(
            &out.join(SVID_KEY_FILE),
            format!("{chain}{key}").as_bytes(),
            0o600,
        )
        .unwrap();
        let loaded = load_existing(&out, now).expect("the combined file");
        assert_eq!(loaded.leaf(), new.leaf());
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(backoff_delay(0, min, max, 1.0), Duration::from_secs(1));
        assert_eq!(backoff_delay(3, min, max, 1.0), Duration::from_secs(8));
        assert_eq!(backoff_delay(10, min, max, 1.0), max);
        assert_eq!(backoff_delay(u32::MAX, min, max, 1.0), max);
        assert_eq!(backoff_delay(3, min, max, 0.5), Duration::from_secs(4));
        assert_eq!(
            backoff_delay(3, min, max, 0.0),
            Duration::from_secs(4),
            "jitter is clamped to [0.5, 1]"
        );
    }

    #[test]
    fn renews_halfway() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(
            renew_at(now, now + Duration::from_secs(3600)),
            now + Duration::from_secs(1800)
        );
        assert_eq!(
            renew_at(now, now - Duration::from_secs(5)),
            now,
            "an expired SVID renews at once"
        );
    }
}
