//! Witnessed decision logs: peers keep each other's signed checkpoint heads (append-only),
//! and a cluster's log is checked against the heads its peers hold, so a rewritten and
//! re-signed log is caught as soon as one peer's copy disagrees.

use std::collections::{BTreeMap, BTreeSet};

use meshgate_policy::{Checkpoint, DecisionLog, GENESIS_HASH, LogError};
use serde::{Deserialize, Serialize};

/// What the witness rules made of checkpoints offered by a peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admitted {
    /// New heads to append, oldest first.
    pub new: Vec<Checkpoint>,
    /// The key to pin (the held pin, or the first valid offered key).
    pub key: Option<String>,
    /// Offered heads that contradict held ones: evidence of a rewritten log.
    pub conflicts: Vec<String>,
    /// Offered heads refused (bad signature, unpinned key).
    pub refused: Vec<String>,
}

/// Admits offered checkpoints against those held, append-only: a valid signature by the
/// pinned key (the first key seen is pinned), and a sequence above the last one held. A head
/// for a sequence already held must carry the same hash, or it is a conflict (kept out).
pub fn admit(held: &[Checkpoint], pinned: Option<&str>, offered: &[Checkpoint]) -> Admitted {
    let by_seq: BTreeMap<u64, &Checkpoint> = held.iter().map(|c| (c.seq, c)).collect();
    let mut last = held.iter().map(|c| c.seq).max();
    let mut out = Admitted {
        key: pinned.map(str::to_owned),
        ..Admitted::default()
    };
    let mut offered: Vec<&Checkpoint> = offered.iter().collect();
    offered.sort_by_key(|c| c.seq);
    for cp in offered {
        if !cp.signature_valid() {
            out.refused
                .push(format!("checkpoint {} has an invalid signature", cp.seq));
            continue;
        }
        match &out.key {
            Some(k) if *k != cp.public_key => {
                out.refused.push(format!(
                    "checkpoint {} is signed by a key other than the pinned one",
                    cp.seq
                ));
                continue;
            }
            Some(_) => {}
            None => out.key = Some(cp.public_key.clone()),
        }
        if let Some(h) = by_seq.get(&cp.seq) {
            if h.head_hash != cp.head_hash {
                out.conflicts.push(format!(
                    "checkpoint {} now names head `{}`, but `{}` was witnessed (the log was rewritten)",
                    cp.seq, cp.head_hash, h.head_hash
                ));
            }
            continue;
        }
        if last.is_some_and(|l| cp.seq <= l) {
            continue; // older than what is held and never seen: not appended (append-only)
        }
        last = Some(cp.seq);
        out.new.push(cp.clone());
    }
    out
}

/// The result of checking a log against witnessed heads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessReport {
    /// Heads checked.
    pub checked: usize,
    /// Heads that matched the local records.
    pub matched: usize,
    /// Heads below the retained log (pruned), not checkable.
    pub pruned: usize,
    /// Each disagreement, in sequence order.
    pub problems: Vec<String>,
    /// When the log ends before heads a peer witnessed: the highest witnessed sequence number
    /// it lacks (the log was truncated or rolled back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated_before: Option<u64>,
}

impl WitnessReport {
    /// Whether every witnessed head agrees with the local log.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks `log` against heads held by peers: every witnessed head (validly signed) must name
/// the hash of the local record at its sequence. Reads only the parts of the log the heads
/// name.
pub fn verify_against(log: &DecisionLog, heads: &[Checkpoint]) -> Result<WitnessReport, LogError> {
    let wanted: BTreeSet<u64> = heads.iter().map(|h| h.seq).collect();
    let found = log.hashes_at(&wanted)?;
    let first = (found.head_seq >= found.first_seq).then_some(found.first_seq);
    Ok(check_heads(&found.hashes, first, found.head_seq, heads))
}

/// The comparison itself: `hashes` are the local records' hashes by sequence (at least those
/// the heads name), `first_seq` the first retained record, `head_seq` the last.
pub fn check_heads(
    hashes: &BTreeMap<u64, String>,
    first_seq: Option<u64>,
    head_seq: u64,
    heads: &[Checkpoint],
) -> WitnessReport {
    let mut report = WitnessReport::default();
    // A log that ends before heads a peer witnessed lost them: name the highest one.
    let lacking = heads
        .iter()
        .filter(|h| h.seq > head_seq && h.signature_valid())
        .map(|h| h.seq)
        .max();
    if let Some(highest) = lacking {
        report.truncated_before = Some(highest);
    }
    let mut heads: Vec<&Checkpoint> = heads.iter().collect();
    heads.sort_by_key(|h| h.seq);
    for h in heads {
        report.checked += 1;
        if !h.signature_valid() {
            report.problems.push(format!(
                "witnessed head {} has an invalid signature (the witness file is damaged)",
                h.seq
            ));
            continue;
        }
        let local = match h.seq {
            0 => Some(GENESIS_HASH.to_owned()),
            s => hashes.get(&s).cloned(),
        };
        match local {
            Some(hash) if hash == h.head_hash => report.matched += 1,
            Some(hash) => report.problems.push(format!(
                "record {} has hash `{hash}`, but a peer witnessed `{}` (the log was rewritten)",
                h.seq, h.head_hash
            )),
            None if h.seq > head_seq => report.problems.push(format!(
                "a peer witnessed record {}, but the log ends at {head_seq}: truncated or rolled back",
                h.seq
            )),
            None if first_seq.is_none_or(|f| h.seq < f) => report.pruned += 1,
            None => report.problems.push(format!(
                "record {} is missing, but a peer witnessed it (the log was edited)",
                h.seq
            )),
        }
    }
    report
}

/// The file a peer exports with the heads it holds of one trust domain's log
/// (`meshgate federation witnessed`), read by `meshgate audit verify --witnesses`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessFile {
    /// The trust domain whose log the heads are of.
    pub trust_domain: String,
    /// The cluster that held them.
    pub witness: String,
    /// The heads, oldest first.
    pub checkpoints: Vec<Checkpoint>,
}
