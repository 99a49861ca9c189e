//! Reading the log: filtered queries, JSON-lines export, every checkpoint, and pruning of
//! whole segments by age.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::SystemTime;

use serde::Serialize;

use super::record::{self, DecisionKind, DecisionRecord};
use super::segment::{self, KIND_CHECKPOINT, KIND_RECORD, ReadStop};
use super::{ANCHOR_FILE, Checkpoint, DecisionLog, LogError, io_err, write_atomic};

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
    /// The W3C trace id (32 hex digits): every record of one trace.
    pub trace_id: Option<String>,
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
            && self
                .trace_id
                .as_deref()
                .is_none_or(|id| r.trace_id.as_deref() == Some(id))
            && self.since.is_none_or(|s| t.is_some_and(|t| t >= s))
            && self.until.is_none_or(|u| t.is_some_and(|t| t < u))
    }
}

/// What [`DecisionLog::prune_before`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PruneReport {
    /// Records removed.
    pub removed: u64,
    /// Segment files removed.
    pub segments: u64,
    /// The signed anchor the retained log now starts after (`None` when nothing was pruned).
    pub anchor: Option<Checkpoint>,
}

/// What [`DecisionLog::hashes_at`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashesAt {
    /// The records asked for that the log holds, by sequence number.
    pub hashes: BTreeMap<u64, String>,
    /// The first retained sequence number.
    pub first_seq: u64,
    /// The last sequence number (0 for an empty log).
    pub head_seq: u64,
}

/// One frame of the log, as the readers see it.
pub(crate) enum Item {
    /// A record: its stored hash and body.
    Record { hash: [u8; 32], body: Vec<u8> },
    /// A signed head (decoded with the pinned key).
    Checkpoint(Checkpoint),
}

impl DecisionLog {
    /// Every record matching `filter`, oldest first. A record that cannot be decoded is an
    /// error (run `verify` to locate it).
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
        self.scan(|item| match item {
            Item::Record { hash, body } => {
                let seq = super::body_seq(&body).unwrap_or(0);
                let mut r: DecisionRecord = serde_json::from_slice(&body).map_err(|e| {
                    LogError::Encoding(format!("record {seq} cannot be decoded: {e}"))
                })?;
                r.hash = hex::encode(hash);
                Ok(f(r))
            }
            Item::Checkpoint(_) => Ok(true),
        })
    }

    /// The hashes of the records at `seqs` that the log holds, its first retained sequence
    /// number and its last one, reading only the segments that can hold them (checking heads
    /// peers witnessed needs a few records near the end, not the whole log).
    pub fn hashes_at(&self, seqs: &BTreeSet<u64>) -> Result<HashesAt, LogError> {
        let segments = segment::list(&self.dir).map_err(io_err(&self.dir))?;
        let anchor = self.anchor()?;
        let mut out = HashesAt {
            hashes: BTreeMap::new(),
            first_seq: anchor.as_ref().map_or(1, |a| a.seq + 1),
            head_seq: anchor.as_ref().map_or(0, |a| a.seq),
        };
        if let Some(a) = &anchor
            && seqs.contains(&a.seq)
        {
            out.hashes.insert(a.seq, a.head_hash.clone());
        }
        for (i, (first, path)) in segments.iter().enumerate() {
            let next = segments.get(i + 1).map(|(n, _)| *n);
            let last = next.is_none();
            // Records `first..next` live here; the last segment is read for the head too.
            let wanted = seqs
                .range(*first..next.unwrap_or(u64::MAX))
                .next()
                .is_some();
            if last {
                // Records before this segment's first one exist (in the segments before it,
                // which may have been skipped), even when it holds none yet.
                out.head_seq = out.head_seq.max(first.saturating_sub(1));
            }
            if !wanted && !last {
                continue;
            }
            let mut reader = match segment::Reader::open(path) {
                Ok(r) => r,
                Err(ReadStop::Torn { .. }) if last => break,
                Err(e) => return Err(stop_error(path, e)),
            };
            loop {
                let frame = match reader.next_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(ReadStop::Torn { .. }) if last => break,
                    Err(e) => return Err(stop_error(path, e)),
                };
                if frame.kind != KIND_RECORD || frame.payload.len() <= 32 {
                    continue;
                }
                let Some(seq) = super::body_seq(&frame.payload[32..]) else {
                    continue;
                };
                out.head_seq = out.head_seq.max(seq);
                if seqs.contains(&seq) {
                    out.hashes.insert(seq, hex::encode(&frame.payload[..32]));
                }
            }
        }
        Ok(out)
    }

    /// Every signed head stored in the log, oldest first (the prune anchor, if any, first).
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>, LogError> {
        let mut out: Vec<Checkpoint> = self.anchor()?.into_iter().collect();
        self.scan(|item| {
            if let Item::Checkpoint(cp) = item {
                out.push(cp);
            }
            Ok(true)
        })?;
        Ok(out)
    }

    /// Walks every frame of every segment in order, until `f` returns `false`. A damaged
    /// frame is an error; a frame cut short at the end of the last segment (a write in
    /// progress, or interrupted) ends the walk.
    pub(crate) fn scan(
        &self,
        mut f: impl FnMut(Item) -> Result<bool, LogError>,
    ) -> Result<(), LogError> {
        let segments = segment::list(&self.dir).map_err(io_err(&self.dir))?;
        let key = self.pinned_key().map(str::to_owned);
        for (i, (_, path)) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            let mut reader = match segment::Reader::open(path) {
                Ok(r) => r,
                Err(ReadStop::Torn { .. }) if last => return Ok(()),
                Err(e) => return Err(stop_error(path, e)),
            };
            loop {
                let frame = match reader.next_frame() {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(ReadStop::Torn { .. }) if last => return Ok(()),
                    Err(e) => return Err(stop_error(path, e)),
                };
                let item = match frame.kind {
                    KIND_RECORD => {
                        let Some((hash, body)) = record::split(&frame.payload) else {
                            return Err(LogError::Encoding(format!(
                                "`{}`: record frame at byte {} is too short",
                                path.display(),
                                frame.offset
                            )));
                        };
                        let mut h = [0u8; 32];
                        h.copy_from_slice(hash);
                        Item::Record {
                            hash: h,
                            body: body.to_vec(),
                        }
                    }
                    KIND_CHECKPOINT => match key
                        .as_deref()
                        .and_then(|k| segment::decode_checkpoint(&frame.payload, k))
                    {
                        Some(cp) => Item::Checkpoint(cp),
                        None => continue,
                    },
                    _ => continue,
                };
                if !f(item)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Writes every record as one JSON object per line (the body plus `hash`, see the
    /// `record` module); returns how many.
    pub fn export_jsonl(&self, out: &mut dyn Write) -> Result<u64, LogError> {
        let mut n = 0u64;
        self.scan(|item| {
            if let Item::Record { hash, body } = item {
                // The canonical line: the stored body with `hash` as its last member.
                let Some(open) = body.strip_suffix(b"}") else {
                    return Err(LogError::Encoding("a record body is not an object".into()));
                };
                out.write_all(open)
                    .and_then(|()| writeln!(out, ",\"hash\":\"{}\"}}", hex::encode(hash)))
                    .map_err(|e| LogError::Encoding(format!("export failed: {e}")))?;
                n += 1;
            }
            Ok(true)
        })?;
        Ok(n)
    }

    /// Removes the oldest whole segments whose every record is older than `before` (never
    /// the segment being written), after signing the head of the last removed record and
    /// storing it as the anchor the retained log starts after, so the chain stays
    /// verifiable. Needs the checkpoint signer and refuses a log that does not verify.
    pub fn prune_before(
        &self,
        before: SystemTime,
        now: SystemTime,
    ) -> Result<PruneReport, LogError> {
        let shared = self.shared()?;
        let signer = shared.signer.as_ref().ok_or(LogError::NoSigner)?;
        // Never bless a tampered prefix with a signed anchor.
        let report = self.verify()?;
        if let Some(first) = report.problems.first() {
            return Err(LogError::Tampered(format!(
                "seq {}: {}",
                first.seq, first.what
            )));
        }
        let segments = segment::list(&self.dir).map_err(io_err(&self.dir))?;
        let current = shared
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first_seq;
        let mut doomed = Vec::new();
        let mut last: Option<(u64, String)> = None;
        let mut removed = 0u64;
        for (first, path) in &segments {
            if *first >= current {
                break;
            }
            let (count, newest) = segment_records(path)?;
            match newest {
                Some((seq, hash, time)) if time.is_some_and(|t| t < before) => {
                    removed += count;
                    last = Some((seq, hash));
                    doomed.push(path.clone());
                }
                Some(_) => break,
                None => doomed.push(path.clone()),
            }
        }
        let Some((seq, hash)) = last else {
            return Ok(PruneReport {
                removed: 0,
                segments: 0,
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
        // The anchor is durable before anything is removed; verification skips segments
        // that end at or before the anchor if the removal is interrupted.
        write_atomic(&self.dir, ANCHOR_FILE, &json)?;
        let mut freed = 0u64;
        for path in &doomed {
            freed += std::fs::metadata(path).map_or(0, |m| m.len());
            std::fs::remove_file(path).map_err(io_err(path))?;
        }
        super::writer::sync_dir(&self.dir).map_err(io_err(&self.dir))?;
        shared.shrink(freed);
        Ok(PruneReport {
            removed,
            segments: doomed.len() as u64,
            anchor: Some(anchor),
        })
    }
}

/// How many records a segment holds, and its last one (seq, hash, time).
type Newest = Option<(u64, String, Option<SystemTime>)>;

fn segment_records(path: &std::path::Path) -> Result<(u64, Newest), LogError> {
    let mut reader = segment::Reader::open(path).map_err(|e| stop_error(path, e))?;
    let mut count = 0;
    let mut last = None;
    while let Some(frame) = reader.next_frame().map_err(|e| stop_error(path, e))? {
        if frame.kind == KIND_RECORD
            && let Some(r) = record::decode(&frame.payload)
        {
            count += 1;
            last = Some((r.seq, r.hash.clone(), r.system_time()));
        }
    }
    Ok((count, last))
}

fn stop_error(path: &std::path::Path, e: ReadStop) -> LogError {
    match e {
        ReadStop::Io(source) => LogError::Io {
            path: path.to_path_buf(),
            source,
        },
        ReadStop::Torn { offset } => LogError::Encoding(format!(
            "`{}` ends inside a frame at byte {offset}",
            path.display()
        )),
        ReadStop::Corrupt { what, .. } => LogError::Encoding(what),
    }
}
