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
    /// Heads signed by another key than the log's own checkpoint key: not heads of this log
    /// (a witness cannot forge one), ignored.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub foreign: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
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
    Ok(check_heads(
        &found.hashes,
        first,
        found.head_seq,
        log.pinned_key(),
        heads,
    ))
}

/// The comparison itself: `hashes` are the local records' hashes by sequence (at least those
/// the heads name), `first_seq` the first retained record, `head_seq` the last, `key` the
/// log's own checkpoint key when known (heads signed by any other key are ignored and
/// counted as foreign: a witness, even a hostile one, cannot forge a head of this log).
pub fn check_heads(
    hashes: &BTreeMap<u64, String>,
    first_seq: Option<u64>,
    head_seq: u64,
    key: Option<&str>,
    heads: &[Checkpoint],
) -> WitnessReport {
    let mut report = WitnessReport::default();
    let (heads, foreign): (Vec<&Checkpoint>, Vec<&Checkpoint>) = heads
        .iter()
        .partition(|h| key.is_none_or(|k| k == h.public_key));
    report.foreign = foreign.len();
    let heads: Vec<Checkpoint> = heads.into_iter().cloned().collect();
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

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use meshgate_policy::{CheckpointSigner, DecisionKind, DecisionRecordInput, LogOptions};

    use super::*;

    fn record(n: u64) -> DecisionRecordInput {
        DecisionRecordInput {
            time: SystemTime::now(),
            id: None,
            trace_id: None,
            source_gateway: None,
            decision: DecisionKind::Allow,
            principal: format!("spiffe://west.example/ns/shop/sa/w{n}"),
            action: "GET".to_owned(),
            resource: "orders.shop.west".to_owned(),
            method: "GET".to_owned(),
            raw_path: "/".to_owned(),
            path: "/".to_owned(),
            reasons: Vec::new(),
            errors: Vec::new(),
            shadow: None,
            policy_version: "v".to_owned(),
            quota_key: None,
            quota_remaining: None,
            status: None,
            facts: None,
            traffic: None,
        }
    }

    /// A real log with its own checkpoint key and `n` records; its head signed.
    fn log(dir: &std::path::Path, n: u64) -> (DecisionLog, Checkpoint) {
        let (signer, _) = CheckpointSigner::generate().unwrap();
        let log = DecisionLog::open(dir, Some(signer), LogOptions::default()).unwrap();
        for i in 0..n {
            log.append(record(i)).unwrap();
        }
        let head = log.checkpoint(SystemTime::now()).unwrap();
        (log, head)
    }

    #[test]
    fn a_head_signed_by_another_key_is_not_a_head_of_this_log() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (ours, our_head) = log(a.path(), 3);
        // A hostile witness's validly signed head far beyond our end, under its own key.
        let (_, forged) = log(b.path(), 9);
        assert!(forged.signature_valid() && forged.seq > our_head.seq);
        let report = verify_against(&ours, &[our_head.clone(), forged]).unwrap();
        assert!(report.is_ok(), "{report:?}");
        assert_eq!((report.matched, report.foreign), (1, 1));
        assert_eq!(report.truncated_before, None);
        // Without the key (an unknown log) the same head reads as a rollback: the key is what
        // tells them apart.
        let hashes = BTreeMap::from([(our_head.seq, our_head.head_hash.clone())]);
        let (_, forged) = log(tempfile::tempdir().unwrap().path(), 9);
        let blind = check_heads(&hashes, Some(1), our_head.seq, None, &[forged]);
        assert!(blind.truncated_before.is_some());
    }

    #[test]
    fn a_log_that_ends_before_a_witnessed_head_is_named_rolled_back() {
        let a = tempfile::tempdir().unwrap();
        let (ours, early) = log(a.path(), 2);
        for i in 0..3 {
            ours.append(record(10 + i)).unwrap();
        }
        let late = ours.checkpoint(SystemTime::now()).unwrap();
        let hashes = BTreeMap::from([(early.seq, early.head_hash.clone())]);
        let report = check_heads(
            &hashes,
            Some(1),
            early.seq,
            ours.pinned_key(),
            &[early.clone(), late.clone()],
        );
        assert_eq!(report.truncated_before, Some(late.seq));
        assert!(
            report.problems[0].contains("truncated or rolled back"),
            "{report:?}"
        );
    }
}
