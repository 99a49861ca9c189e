//! Verification: the whole chain, the prune anchor and every checkpoint.

use std::collections::BTreeMap;

use serde::Serialize;

use super::record::{self, DecisionRecord};
use super::signer::CheckpointKind;
use super::{Checkpoint, DecisionLog, LogError, key_seq};

/// One problem found by verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tamper {
    /// The first sequence number where the log stops being what was written.
    pub seq: u64,
    /// What is wrong there.
    pub what: String,
}

/// The result of [`DecisionLog::verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Records checked.
    pub records: u64,
    /// Checkpoints checked (the prune anchor included).
    pub checkpoints: u64,
    /// The first retained sequence number (1 unless pruned).
    pub first_seq: u64,
    /// The last sequence number.
    pub head_seq: u64,
    /// The last record's hash.
    pub head_hash: String,
    /// Every problem, lowest sequence number first; empty when the log verifies.
    pub problems: Vec<Tamper>,
}

impl VerifyReport {
    /// Whether the chain and every checkpoint check.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The first problem (the lowest sequence number).
    pub fn first_bad(&self) -> Option<&Tamper> {
        self.problems.first()
    }
}

impl DecisionLog {
    /// Checks every record's hash, sequence and link to its predecessor, that nothing is
    /// missing at the end, the prune anchor, and every checkpoint (signature, pinned key,
    /// and the record it names). `Err` only when the storage cannot be read.
    pub fn verify(&self) -> Result<VerifyReport, LogError> {
        let mut problems = Vec::new();
        let pinned = self.pinned_key()?;
        let anchor = self.anchor()?;
        let mut cps: Vec<Checkpoint> = Vec::new();
        for item in self.checkpoints.iter() {
            let (k, v) = item?;
            match serde_json::from_slice::<Checkpoint>(&v) {
                Ok(cp) => cps.push(cp),
                Err(_) => problems.push(Tamper {
                    seq: key_seq(&k).unwrap_or(0),
                    what: "checkpoint is not readable".to_owned(),
                }),
            }
        }
        // The key this process was configured with (the key file) must have signed every
        // head too: a rewritten pin cannot make another key's heads pass.
        let configured = self.signer.as_ref().map(|s| s.public_key_hex().to_owned());
        let check_sig = |cp: &Checkpoint, label: &str, problems: &mut Vec<Tamper>| {
            let wrong_kind = match label {
                "prune anchor" => cp.kind != CheckpointKind::Anchor,
                _ => cp.kind != CheckpointKind::Checkpoint,
            };
            if wrong_kind {
                problems.push(Tamper {
                    seq: cp.seq,
                    what: format!("{label} at seq {} is not signed as a {label}", cp.seq),
                });
            } else if configured.as_deref().is_some_and(|k| k != cp.public_key) {
                problems.push(Tamper {
                    seq: cp.seq,
                    what: format!(
                        "{label} at seq {} is not signed by the configured checkpoint key",
                        cp.seq
                    ),
                });
            } else if pinned.as_deref().is_some_and(|p| p != cp.public_key) {
                problems.push(Tamper { seq: cp.seq, what: format!("{label} at seq {} is signed by a key that is not the pinned checkpoint key", cp.seq) });
            } else if !cp.signature_valid() {
                problems.push(Tamper {
                    seq: cp.seq,
                    what: format!("{label} at seq {} has an invalid signature", cp.seq),
                });
            }
        };
        for cp in &cps {
            check_sig(cp, "checkpoint", &mut problems);
        }

        let (mut expected, mut prev) = match &anchor {
            Some(a) => {
                check_sig(a, "prune anchor", &mut problems);
                (a.seq + 1, a.head_hash.clone())
            }
            None => (1, record::GENESIS_HASH.to_owned()),
        };
        let first_seq = expected;
        let wanted: BTreeMap<u64, &Checkpoint> = cps.iter().map(|c| (c.seq, c)).collect();
        let mut seen_hashes: BTreeMap<u64, String> = BTreeMap::new();
        if let Some(a) = &anchor {
            seen_hashes.insert(a.seq, a.head_hash.clone());
        }
        let mut count = 0u64;
        let mut chain_broken = false;
        for item in self.records.iter() {
            let (k, v) = item?;
            let Some(key) = key_seq(&k) else {
                problems.push(Tamper {
                    seq: expected,
                    what: "a foreign key was inserted into the record tree".to_owned(),
                });
                chain_broken = true;
                break;
            };
            if key < expected && anchor.as_ref().is_some_and(|a| key <= a.seq) {
                continue; // left over from an interrupted prune
            }
            count += 1;
            if let Some(problem) = check_record(key, expected, &prev, &v) {
                problems.push(problem);
                chain_broken = true;
                break;
            }
            let hash = record::split(&v)
                .map(|(h, _)| hex::encode(h))
                .unwrap_or_default();
            if wanted.contains_key(&key) {
                seen_hashes.insert(key, hash.clone());
            }
            prev = hash;
            expected = key + 1;
        }
        let head_seq = expected - 1;
        if !chain_broken {
            let meta_head = self.meta_head()?;
            if meta_head > head_seq {
                problems.push(Tamper {
                    seq: head_seq + 1,
                    what: format!(
                        "records {} to {meta_head} are missing (the log was truncated)",
                        head_seq + 1
                    ),
                });
            }
            for cp in &cps {
                match seen_hashes.get(&cp.seq) {
                    Some(h) if *h == cp.head_hash => {}
                    Some(_) => problems.push(Tamper {
                        seq: cp.seq,
                        what: format!("record {} does not match the signed checkpoint (the log was rewritten up to here)", cp.seq),
                    }),
                    None if cp.seq > head_seq => problems.push(Tamper {
                        seq: head_seq + 1,
                        what: format!("a checkpoint covers seq {} but the log ends at {head_seq} (truncated)", cp.seq),
                    }),
                    None => {} // pruned away, or seq 0 of an empty log
                }
            }
        }
        problems.sort_by_key(|p| p.seq);
        let checkpoints = cps.len() as u64 + u64::from(anchor.is_some());
        Ok(VerifyReport {
            records: count,
            checkpoints,
            first_seq,
            head_seq,
            head_hash: prev,
            problems,
        })
    }
}

/// Checks one stored record against the chain so far.
fn check_record(key: u64, expected: u64, prev: &str, value: &[u8]) -> Option<Tamper> {
    if key > expected {
        let what = if key == expected + 1 {
            format!("record {expected} is missing (deleted)")
        } else {
            format!("records {expected} to {} are missing (deleted)", key - 1)
        };
        return Some(Tamper {
            seq: expected,
            what,
        });
    }
    if key < expected {
        return Some(Tamper {
            seq: key,
            what: format!("record {key} precedes the start of the retained log (inserted)"),
        });
    }
    let Some((stored, body)) = record::split(value) else {
        return Some(Tamper {
            seq: key,
            what: format!("record {key} is truncated"),
        });
    };
    if record::hash_body(body) != stored {
        return Some(Tamper {
            seq: key,
            what: format!("record {key} does not match its hash (edited)"),
        });
    }
    let Ok(rec) = serde_json::from_slice::<DecisionRecord>(body) else {
        return Some(Tamper {
            seq: key,
            what: format!("record {key} is not a valid record"),
        });
    };
    if rec.seq != key {
        return Some(Tamper {
            seq: key,
            what: format!(
                "the record stored at seq {key} says it is record {} (moved, reordered or inserted)",
                rec.seq
            ),
        });
    }
    if rec.prev_hash != prev {
        return Some(Tamper {
            seq: key,
            what: format!(
                "record {key} does not chain to record {} (a record was inserted, removed or rewritten before it)",
                key.saturating_sub(1)
            ),
        });
    }
    None
}
