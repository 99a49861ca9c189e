//! Verification: the whole chain, the prune anchor and the signed heads.
//!
//! Every record is re-hashed and its link to the previous one checked; every checkpoint must
//! name a record already written and that record's hash. Signatures are checked on the prune
//! anchor, on the last checkpoint of every segment and on the last one of the log (which,
//! with the hash chain, vouches for every record up to it); `verify_all` checks every one.
//! A log cut at a frame boundary looks whole on its own: heads held by peers (the witnesses)
//! are what catch that.

use serde::Serialize;

use super::record::{self, DecisionRecord};
use super::segment::{self, KIND_CHECKPOINT, KIND_RECORD, ReadStop};
use super::signer::CheckpointKind;
use super::{Checkpoint, DecisionLog, LogError, io_err};

/// Records whose hashes stay at hand for the checkpoints that follow them.
const RECENT_HASHES: usize = 1 << 16;

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
    /// The last record covered by a signed head whose signature checked, if any.
    pub signed_seq: Option<u64>,
    /// Every problem, lowest sequence number first; empty when the log verifies.
    pub problems: Vec<Tamper>,
    /// What is worth knowing but is not tampering (records after the last signed head, an
    /// interrupted write at the very end).
    pub notes: Vec<String>,
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

struct Walk<'a> {
    log: &'a DecisionLog,
    problems: Vec<Tamper>,
    notes: Vec<String>,
    expected: u64,
    prev: String,
    /// (seq, hash) of recent records, at `seq % RECENT_HASHES`.
    recent: Vec<(u64, String)>,
    records: u64,
    checkpoints: u64,
    signed_seq: Option<u64>,
    all_signatures: bool,
}

impl DecisionLog {
    /// Checks the chain, the anchor and the signed heads (see the module docs). `Err` only
    /// when the files cannot be read.
    pub fn verify(&self) -> Result<VerifyReport, LogError> {
        self.verify_with(false)
    }

    /// Like [`DecisionLog::verify`], and checks the signature of every checkpoint.
    pub fn verify_all(&self) -> Result<VerifyReport, LogError> {
        self.verify_with(true)
    }

    fn verify_with(&self, all_signatures: bool) -> Result<VerifyReport, LogError> {
        let anchor = self.anchor()?;
        let mut walk = Walk {
            log: self,
            problems: Vec::new(),
            notes: Vec::new(),
            expected: anchor.as_ref().map_or(1, |a| a.seq + 1),
            prev: anchor
                .as_ref()
                .map_or_else(|| record::GENESIS_HASH.to_owned(), |a| a.head_hash.clone()),
            recent: vec![(u64::MAX, String::new()); RECENT_HASHES],
            records: 0,
            checkpoints: 0,
            signed_seq: None,
            all_signatures,
        };
        if let Some(a) = &anchor {
            walk.checkpoints += 1;
            walk.check_signature(a, CheckpointKind::Anchor);
        }
        let first_seq = walk.expected;
        let segments = segment::list(&self.dir).map_err(io_err(&self.dir))?;
        let mut last_checkpoint = None;
        for (i, (first, path)) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            match walk.segment(*first, path, last, anchor.as_ref())? {
                Flow::Next(cp) => last_checkpoint = cp.or(last_checkpoint),
                Flow::Broken => break,
            }
        }
        if let Some(cp) = &last_checkpoint
            && !walk.all_signatures
        {
            walk.check_signature(cp, CheckpointKind::Checkpoint);
        }
        let head_seq = walk.expected - 1;
        if walk.problems.is_empty() {
            match walk.signed_seq {
                Some(s) if s < head_seq => walk.notes.push(format!(
                    "records {} to {head_seq} come after the last signed head (written since the last flush batch, or before a crash)",
                    s + 1
                )),
                None if head_seq >= first_seq && self.pinned.is_some() => walk
                    .notes
                    .push("no signed head covers the records yet".to_owned()),
                _ => {}
            }
        }
        walk.problems.sort_by_key(|p| p.seq);
        Ok(VerifyReport {
            records: walk.records,
            checkpoints: walk.checkpoints,
            first_seq,
            head_seq,
            head_hash: walk.prev,
            signed_seq: walk.signed_seq,
            problems: walk.problems,
            notes: walk.notes,
        })
    }
}

enum Flow {
    /// Go on with the next segment; the last checkpoint of this one.
    Next(Option<Checkpoint>),
    /// The chain is broken: stop.
    Broken,
}

impl Walk<'_> {
    fn problem(&mut self, seq: u64, what: String) {
        self.problems.push(Tamper { seq, what });
    }

    fn segment(
        &mut self,
        first: u64,
        path: &std::path::Path,
        last: bool,
        anchor: Option<&Checkpoint>,
    ) -> Result<Flow, LogError> {
        let mut reader = match segment::Reader::open(path) {
            Ok(r) => r,
            Err(ReadStop::Io(e)) => return Err(io_err(path)(e)),
            Err(ReadStop::Torn { .. }) if last => {
                self.notes.push(format!(
                    "`{}` has no complete header (being created)",
                    path.display()
                ));
                return Ok(Flow::Next(None));
            }
            Err(ReadStop::Torn { .. }) => {
                let what = format!("segment `{}` is cut short", path.display());
                self.problem(self.expected, what);
                return Ok(Flow::Broken);
            }
            Err(ReadStop::Corrupt { what, .. }) => {
                self.problem(self.expected, what);
                return Ok(Flow::Broken);
            }
        };
        if reader.first_seq != first {
            let what = format!(
                "segment `{}` says it starts at record {} (renamed or replaced)",
                path.display(),
                reader.first_seq
            );
            self.problem(first.min(self.expected), what);
            return Ok(Flow::Broken);
        }
        // Left over from an interrupted prune: a segment that ends at or before the anchor.
        if let Some(a) = anchor
            && first <= a.seq
            && self.records == 0
        {
            let end = last_record_seq(&mut reader, path)?;
            if end.is_some_and(|e| e <= a.seq) {
                return Ok(Flow::Next(None));
            }
            reader = segment::Reader::open(path).map_err(|e| match e {
                ReadStop::Io(e) => io_err(path)(e),
                _ => LogError::Encoding(format!("`{}` changed while read", path.display())),
            })?;
        }
        if first != self.expected {
            let what = if first > self.expected {
                if first == self.expected + 1 {
                    format!("record {} is missing (deleted)", self.expected)
                } else {
                    format!(
                        "records {} to {} are missing (deleted)",
                        self.expected,
                        first - 1
                    )
                }
            } else {
                format!(
                    "segment `{}` starts at record {first}, before the end of the previous one (inserted)",
                    path.display()
                )
            };
            self.problem(self.expected, what);
            return Ok(Flow::Broken);
        }
        let mut last_cp = None;
        loop {
            let frame = match reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(ReadStop::Io(e)) => return Err(io_err(path)(e)),
                Err(ReadStop::Torn { offset }) if last => {
                    self.notes.push(format!(
                        "`{}` ends inside a frame at byte {offset} (a write in progress or interrupted; never acknowledged)",
                        path.display()
                    ));
                    break;
                }
                Err(ReadStop::Torn { offset }) => {
                    let what = format!(
                        "segment `{}` is cut short at byte {offset} (records after it are missing)",
                        path.display()
                    );
                    self.problem(self.expected, what);
                    return Ok(Flow::Broken);
                }
                Err(ReadStop::Corrupt { what, .. }) => {
                    self.problem(self.expected, what);
                    return Ok(Flow::Broken);
                }
            };
            match frame.kind {
                KIND_RECORD => {
                    if let Some(p) = check_record(self.expected, &self.prev, &frame.payload) {
                        self.problems.push(p);
                        return Ok(Flow::Broken);
                    }
                    let hash = hex::encode(&frame.payload[..32]);
                    let seq = self.expected;
                    self.recent[(seq % RECENT_HASHES as u64) as usize] = (seq, hash.clone());
                    self.prev = hash;
                    self.expected += 1;
                    self.records += 1;
                }
                KIND_CHECKPOINT => {
                    self.checkpoints += 1;
                    let Some(key) = self.log.pinned.as_deref() else {
                        let what = "a checkpoint is stored but no checkpoint key is pinned (`key.pub` was removed)".to_owned();
                        self.problem(self.expected, what);
                        continue;
                    };
                    let Some(cp) = segment::decode_checkpoint(&frame.payload, key) else {
                        let what = format!(
                            "checkpoint frame at byte {} of `{}` is not readable",
                            frame.offset,
                            path.display()
                        );
                        self.problem(self.expected, what);
                        continue;
                    };
                    self.check_binding(&cp);
                    if self.all_signatures {
                        self.check_signature(&cp, CheckpointKind::Checkpoint);
                    }
                    last_cp = Some(cp);
                }
                other => {
                    let what = format!(
                        "frame of unknown kind {other} at byte {} of `{}`",
                        frame.offset,
                        path.display()
                    );
                    self.problem(self.expected, what);
                }
            }
        }
        if let Some(cp) = &last_cp
            && !self.all_signatures
            && !last
        {
            self.check_signature(cp, CheckpointKind::Checkpoint);
        }
        Ok(Flow::Next(last_cp))
    }

    /// A checkpoint names a record already written, with that record's hash.
    fn check_binding(&mut self, cp: &Checkpoint) {
        let head = self.expected - 1;
        if cp.seq > head {
            let what = format!(
                "a checkpoint names record {}, which was not written before it (forged)",
                cp.seq
            );
            self.problem(head + 1, what);
            return;
        }
        let known = if cp.seq + 1 == self.expected {
            Some(self.prev.clone())
        } else if cp.seq == 0 {
            Some(record::GENESIS_HASH.to_owned())
        } else {
            let (seq, hash) = &self.recent[(cp.seq % RECENT_HASHES as u64) as usize];
            (*seq == cp.seq).then(|| hash.clone())
        };
        match known {
            Some(h) if h == cp.head_hash => {}
            Some(_) => self.problem(
                cp.seq,
                format!(
                    "record {} does not match the signed checkpoint (the log was rewritten up to here)",
                    cp.seq
                ),
            ),
            None => self.problem(
                cp.seq,
                format!(
                    "a checkpoint of record {} is stored far after it (not written by meshgate)",
                    cp.seq
                ),
            ),
        }
    }

    fn check_signature(&mut self, cp: &Checkpoint, kind: CheckpointKind) {
        let label = match kind {
            CheckpointKind::Anchor => "prune anchor",
            CheckpointKind::Checkpoint => "checkpoint",
        };
        let what = if cp.kind != kind {
            format!("{label} at seq {} is not signed as a {label}", cp.seq)
        } else if self
            .log
            .configured
            .as_deref()
            .is_some_and(|k| k != cp.public_key)
        {
            format!(
                "{label} at seq {} is not signed by the configured checkpoint key",
                cp.seq
            )
        } else if self
            .log
            .pinned
            .as_deref()
            .is_some_and(|p| p != cp.public_key)
        {
            format!(
                "{label} at seq {} is signed by a key that is not the pinned checkpoint key",
                cp.seq
            )
        } else if !cp.signature_valid() {
            format!("{label} at seq {} has an invalid signature", cp.seq)
        } else {
            if kind == CheckpointKind::Checkpoint {
                self.signed_seq = self.signed_seq.max(Some(cp.seq));
            }
            return;
        };
        self.problem(cp.seq, what);
    }
}

/// The last record's seq in a segment (reads it to the end).
fn last_record_seq(
    reader: &mut segment::Reader,
    path: &std::path::Path,
) -> Result<Option<u64>, LogError> {
    let mut last = None;
    loop {
        match reader.next_frame() {
            Ok(Some(f)) if f.kind == KIND_RECORD && f.payload.len() > 32 => {
                last = super::body_seq(&f.payload[32..]);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(ReadStop::Torn { .. }) | Err(ReadStop::Corrupt { .. }) => break,
            Err(ReadStop::Io(e)) => return Err(io_err(path)(e)),
        }
    }
    Ok(last)
}

/// Checks one stored record against the chain so far.
fn check_record(expected: u64, prev: &str, payload: &[u8]) -> Option<Tamper> {
    let Some((stored, body)) = record::split(payload) else {
        return Some(Tamper {
            seq: expected,
            what: format!("record {expected} is truncated"),
        });
    };
    if record::hash_body(body) != stored {
        return Some(Tamper {
            seq: expected,
            what: format!("record {expected} does not match its hash (edited)"),
        });
    }
    let Ok(rec) = serde_json::from_slice::<DecisionRecord>(body) else {
        return Some(Tamper {
            seq: expected,
            what: format!("record {expected} is not a valid record"),
        });
    };
    if rec.seq != expected {
        let what = if rec.seq > expected {
            if rec.seq == expected + 1 {
                format!("record {expected} is missing (deleted)")
            } else {
                format!(
                    "records {expected} to {} are missing (deleted)",
                    rec.seq - 1
                )
            }
        } else {
            format!(
                "the record stored as record {expected} says it is record {} (moved, reordered or inserted)",
                rec.seq
            )
        };
        return Some(Tamper {
            seq: expected,
            what,
        });
    }
    if rec.prev_hash != prev {
        return Some(Tamper {
            seq: expected,
            what: format!(
                "record {expected} does not chain to record {} (a record was inserted, removed or rewritten before it)",
                expected.saturating_sub(1)
            ),
        });
    }
    None
}
