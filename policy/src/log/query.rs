//! Reading the log: filtered queries, JSON-lines export, and pruning by age.

use std::io::Write;
use std::time::SystemTime;

use serde::Serialize;

use super::record::{self, DecisionKind, DecisionRecord};
use super::{Checkpoint, DecisionLog, LogError, META_ANCHOR, key_seq};

/// Which records a query returns; every set field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Exact principal (SPIFFE ID, or who for admin events).
    pub principal: Option<String>,
    /// Exact resource (service).
    pub resource: Option<String>,
    /// The decision.
    pub decision: Option<DecisionKind>,
    /// A policy id among the determining policies (enforced or shadow).
    pub policy: Option<String>,
    /// Records at or after this time.
    pub since: Option<SystemTime>,
    /// Records before this time.
    pub until: Option<SystemTime>,
    /// At most this many records (the oldest first).
    pub limit: Option<usize>,
}

impl Filter {
    /// Whether `r` matches.
    pub fn matches(&self, r: &DecisionRecord) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        let t = r.system_time();
        eq(&self.principal, &r.principal)
            && eq(&self.resource, &r.resource)
            && self.decision.is_none_or(|d| d == r.decision)
            && self.policy.as_deref().is_none_or(|p| {
                r.reasons.iter().any(|x| x == p)
                    || r.shadow
                        .as_ref()
                        .is_some_and(|s| s.reasons.iter().any(|x| x == p))
            })
            && self.since.is_none_or(|s| t.is_some_and(|t| t >= s))
            && self.until.is_none_or(|u| t.is_some_and(|t| t < u))
    }
}

/// What [`DecisionLog::prune_before`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Records removed.
    pub removed: u64,
    /// The signed anchor the retained log now starts after (`None` when nothing was pruned).
    pub anchor: Option<Checkpoint>,
}

impl DecisionLog {
    /// Every record matching `filter`, oldest first. A stored value that cannot be decoded
    /// is an error (run `verify` to locate it).
    pub fn query(&self, filter: &Filter) -> Result<Vec<DecisionRecord>, LogError> {
        let mut out = Vec::new();
        self.for_each(|r| {
            if filter.matches(&r) {
                out.push(r);
            }
            filter.limit.is_none_or(|l| out.len() < l)
        })?;
        Ok(out)
    }

    /// Calls `f` on every record, oldest first, until it returns `false`.
    pub fn for_each(&self, mut f: impl FnMut(DecisionRecord) -> bool) -> Result<(), LogError> {
        for item in self.records.iter() {
            let (k, v) = item?;
            let seq = key_seq(&k).unwrap_or(0);
            let r = record::decode(&v)
                .ok_or_else(|| LogError::Encoding(format!("record {seq} cannot be decoded")))?;
            if !f(r) {
                break;
            }
        }
        Ok(())
    }

    /// Writes every record as one JSON object per line (the body plus `hash`, see the
    /// `record` module); returns how many.
    pub fn export_jsonl(&self, out: &mut dyn Write) -> Result<u64, LogError> {
        let mut n = 0u64;
        let mut io_err = None;
        self.for_each(|r| {
            let line = serde_json::to_string(&r).map_err(|e| e.to_string());
            let res = line.and_then(|l| writeln!(out, "{l}").map_err(|e| e.to_string()));
            match res {
                Ok(()) => {
                    n += 1;
                    true
                }
                Err(e) => {
                    io_err = Some(e);
                    false
                }
            }
        })?;
        match io_err {
            Some(e) => Err(LogError::Encoding(format!("export failed: {e}"))),
            None => Ok(n),
        }
    }

    /// Removes the oldest records whose time is before `before`, after signing a checkpoint
    /// of the last removed record and storing it as the anchor the retained log starts
    /// after, so the chain stays verifiable. Needs the checkpoint signer.
    pub fn prune_before(
        &self,
        before: SystemTime,
        now: SystemTime,
    ) -> Result<PruneReport, LogError> {
        let signer = self.signer.as_ref().ok_or(LogError::NoSigner)?;
        // Never bless a tampered prefix with a signed anchor.
        let report = self.verify()?;
        if let Some(first) = report.problems.first() {
            return Err(LogError::Tampered(format!(
                "seq {}: {}",
                first.seq, first.what
            )));
        }
        let mut last: Option<(u64, String)> = None;
        self.for_each(|r| {
            let old = r.system_time().is_some_and(|t| t < before);
            if old {
                last = Some((r.seq, r.hash));
            }
            old
        })?;
        let Some((seq, hash)) = last else {
            return Ok(PruneReport {
                removed: 0,
                anchor: None,
            });
        };
        let anchor = signer.sign_kind(
            super::signer::CheckpointKind::Anchor,
            seq,
            &hash,
            &crate::timefmt::to_rfc3339(now),
        )?;
        let json = serde_json::to_vec(&anchor).map_err(|e| LogError::Encoding(e.to_string()))?;
        // The anchor is durable before anything is removed; verification skips leftovers
        // below the anchor if the removal is interrupted.
        self.meta.insert(META_ANCHOR, json)?;
        self.db.flush()?;
        let mut removed = 0u64;
        for item in self.records.range(..=seq.to_be_bytes()) {
            let (k, _) = item?;
            self.records.remove(k)?;
            removed += 1;
        }
        for item in self.checkpoints.range(..seq.to_be_bytes()) {
            let (k, _) = item?;
            self.checkpoints.remove(k)?;
        }
        self.db.flush()?;
        Ok(PruneReport {
            removed,
            anchor: Some(anchor),
        })
    }
}
