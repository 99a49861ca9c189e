//! Witnessing at run time: our signed decision-log heads are pushed to every peer within a
//! second of being signed (and once more at a graceful stop), peers' heads are admitted
//! append-only whether fetched or pushed, and our own log is checked against the heads peers
//! hold of it (the self-check), which is what catches a log that was rolled back.

use std::sync::Weak;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use meshgate_identity::TrustDomain;
use meshgate_policy::Checkpoint;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::control::{CHECKPOINTS_PATH, CheckpointsDoc};
use crate::federation::Federation;
use crate::witness::{self, WitnessReport};

/// Pushes of new heads are at most this far apart (and at least this soon after a new one).
pub const PUSH_EVERY: Duration = Duration::from_secs(1);
/// The self-check against a peer runs after a sync at most this often.
pub const SELF_CHECK_EVERY: Duration = Duration::from_secs(60);
/// One push to one peer gateway gives up after this long.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// The most heads a peer serves of our log for the self-check (the latest ones, ~400 KiB):
/// enough to name a rollback (the highest head is among them) and forks of the last
/// ~15 minutes at one head a second.
pub const MAX_SERVED_HEADS: usize = 1000;

/// The answer to pushed heads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessAck {
    /// The latest head of the pusher's log now held here.
    pub held_seq: Option<u64>,
    /// Offered heads that contradict held ones (a rewritten log).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
    /// Offered heads refused (bad signature, another key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
}

/// The last self-check against one peer.
#[derive(Debug, Clone, Default)]
pub(crate) struct SelfCheck {
    pub at: Option<Instant>,
    /// `Some(true)` when the peer's heads disagree with our log.
    pub mismatch: Option<bool>,
    pub problem: Option<String>,
}

impl Federation {
    /// Admits heads of `td`'s log, fetched from it or pushed by it, as its witness: append
    /// only, by the key pinned for it (see `witness::admit`).
    pub(crate) fn witness_heads(&self, td: &TrustDomain, offered: &[Checkpoint]) -> WitnessAck {
        let seqs = offered.iter().map(|c| c.seq);
        let admitted = self
            .store()
            .witnessed_for(td.as_str(), seqs)
            .and_then(|held| {
                let pinned = self.store().witness_key(td.as_str())?;
                Ok((witness::admit(&held, pinned.as_deref(), offered), held))
            });
        let (a, held) = match admitted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(trust_domain = %td, error = %e, "cannot read witnessed checkpoints");
                return WitnessAck::default();
            }
        };
        for c in &a.conflicts {
            tracing::error!(trust_domain = %td, conflict = %c, "peer's decision log disagrees with the heads witnessed here");
        }
        let mut held_seq = held.iter().map(|c| c.seq).max();
        if let (Some(key), false) = (&a.key, a.new.is_empty()) {
            match self.store().append_witnessed(td.as_str(), key, &a.new) {
                Ok(()) => {
                    held_seq = held_seq.max(a.new.last().map(|c| c.seq));
                    if let Some(p) = self.write().get_mut(td) {
                        p.state.witnessed_seq = held_seq;
                        let _ = self.store().put_peer(td.as_str(), &p.state);
                    }
                }
                Err(e) => {
                    tracing::warn!(trust_domain = %td, error = %e, "cannot store witnessed checkpoints")
                }
            }
        }
        WitnessAck {
            held_seq,
            conflicts: a.conflicts,
            refused: a.refused,
        }
    }

    /// Pushes `head` (our latest signed head) to every linked peer at once, each bounded by
    /// [`PUSH_TIMEOUT`], so a stalled peer delays no other; returns how many hold it.
    pub async fn push_head(&self, head: &Checkpoint) -> usize {
        let Some(transport) = self.transport.get().cloned() else {
            return 0;
        };
        let doc = CheckpointsDoc {
            trust_domain: self.local().trust_domain.to_string(),
            checkpoints: vec![head.clone()],
        };
        let Ok(body) = serde_json::to_vec(&doc) else {
            return 0;
        };
        let body = Bytes::from(body);
        let targets: Vec<(TrustDomain, Vec<std::net::SocketAddr>)> = self
            .read()
            .iter()
            .filter(|(_, p)| !p.closed)
            .map(|(td, p)| (td.clone(), p.addresses()))
            .collect();
        let mut pushes = tokio::task::JoinSet::new();
        for (td, addrs) in targets {
            let (transport, body, seq) = (transport.clone(), body.clone(), head.seq);
            pushes.spawn(async move {
                for addr in addrs {
                    let req =
                        crate::sync::request(&td, Method::POST, CHECKPOINTS_PATH, body.clone());
                    match tokio::time::timeout(PUSH_TIMEOUT, transport.send(addr, &td, req)).await {
                        Ok(Ok(resp)) => {
                            let ack: Option<WitnessAck> = serde_json::from_slice(resp.body()).ok();
                            if ack.as_ref().is_some_and(|a| a.held_seq >= Some(seq)) {
                                return true;
                            }
                            tracing::warn!(trust_domain = %td, status = %resp.status(), ack = ?ack, "peer did not take our checkpoint");
                            return false;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(trust_domain = %td, %addr, error = %e, "checkpoint push failed")
                        }
                        Err(_) => {
                            tracing::debug!(trust_domain = %td, %addr, "checkpoint push timed out")
                        }
                    }
                }
                false
            });
        }
        let mut holding = 0;
        while let Some(held) = pushes.join_next().await {
            holding += usize::from(held.unwrap_or(false));
        }
        holding
    }

    /// Compares our log with the heads the peer `td` holds of it; remembers the result (for
    /// `status` and `/metrics`) and logs a disagreement as an error.
    pub async fn check_witness(&self, td: &TrustDomain) -> Result<WitnessReport, String> {
        let outcome = self.run_self_check(td).await;
        if let Err(e) = &outcome
            && let Some(p) = self.write().get_mut(td)
        {
            // Not checked: the metric says so (-1) instead of keeping an old answer.
            p.self_check = SelfCheck {
                at: Some(Instant::now()),
                mismatch: None,
                problem: Some(e.clone()),
            };
        }
        let report = outcome?;
        let mismatch = !report.is_ok();
        if mismatch {
            for p in &report.problems {
                tracing::error!(peer = %td, problem = %p, "our decision log disagrees with the heads a peer witnessed");
            }
        }
        if let Some(p) = self.write().get_mut(td) {
            p.self_check = SelfCheck {
                at: Some(Instant::now()),
                mismatch: Some(mismatch),
                problem: report.problems.first().cloned(),
            };
        }
        Ok(report)
    }

    async fn run_self_check(&self, td: &TrustDomain) -> Result<WitnessReport, String> {
        let log = self.log().cloned().ok_or("no decision log")?;
        let doc = self.fetch_witnessed(td).await?;
        let ours = self.local().trust_domain.to_string();
        if doc.trust_domain != ours {
            return Err(format!(
                "the peer answered with heads of `{}`, not of `{ours}`",
                doc.trust_domain
            ));
        }
        tokio::task::spawn_blocking(move || witness::verify_against(&log, &doc.checkpoints))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Whether the self-check against `td` is due (never ran, or ran a while ago).
    pub(crate) fn self_check_due(&self, td: &TrustDomain) -> bool {
        self.read().get(td).is_some_and(|p| {
            p.self_check
                .at
                .is_none_or(|t| t.elapsed() >= SELF_CHECK_EVERY)
        })
    }
}

/// Pushes each new head to the peers, at most once per [`PUSH_EVERY`] (the latest one).
pub(crate) async fn push_loop(
    fed: Weak<Federation>,
    mut heads: watch::Receiver<Option<Checkpoint>>,
) {
    loop {
        if heads.changed().await.is_err() {
            return;
        }
        let started = tokio::time::Instant::now();
        let head = heads.borrow_and_update().clone();
        let Some(f) = fed.upgrade() else { return };
        if let Some(head) = head {
            f.push_head(&head).await;
        }
        drop(f);
        tokio::time::sleep_until(started + PUSH_EVERY).await;
    }
}
