//! Moving a decision log from the sled trees of earlier versions into segment files.
//!
//! The record encoding did not change, so each stored `hash || body` is copied byte for byte:
//! the chain, the record hashes, and the old signed checkpoints (placed right after the record
//! they name) all stay valid. The pinned key and the prune anchor come along. The new log is
//! verified before the sled trees are dropped; if anything fails, the sled trees are left as
//! they were and the partial segment directory is removed.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use serde::Serialize;

use super::segment::{self, KIND_CHECKPOINT, KIND_RECORD};
use super::signer::{Checkpoint, CheckpointKind};
use super::{ANCHOR_FILE, DecisionLog, KEY_FILE, LogError, io_err, write_atomic};

const RECORDS_TREE: &str = "audit.records";
const CHECKPOINTS_TREE: &str = "audit.checkpoints";
const META_TREE: &str = "audit.meta";

/// What a migration did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrateReport {
    /// Records copied.
    pub records: u64,
    /// Checkpoints copied.
    pub checkpoints: u64,
    /// The checkpoints that could not be carried (signed by a key other than the pinned one).
    pub skipped_checkpoints: u64,
    /// The last record.
    pub head_seq: u64,
}

/// Whether `db` still holds a decision log in the old sled trees.
pub fn sled_log_present(db: &sled::Db) -> Result<bool, LogError> {
    let present = db
        .tree_names()
        .iter()
        .any(|n| n.as_ref() == RECORDS_TREE.as_bytes());
    if !present {
        return Ok(false);
    }
    let records = db.open_tree(RECORDS_TREE).map_err(sled_err)?;
    let meta = db.open_tree(META_TREE).map_err(sled_err)?;
    Ok(!records.is_empty() || meta.get("anchor").map_err(sled_err)?.is_some())
}

fn sled_err(e: sled::Error) -> LogError {
    LogError::Migrate(format!("the state database: {e}"))
}

/// Copies the sled decision log of `db` into a new segment log in `dir` (which must not hold
/// one yet), verifies it, then drops the sled trees.
pub fn migrate_from_sled(db: &sled::Db, dir: &Path) -> Result<MigrateReport, LogError> {
    if dir.exists() && !segment::list(dir).map_err(io_err(dir))?.is_empty() {
        return Err(LogError::Migrate(format!(
            "`{}` already holds a segment log; nothing was changed",
            dir.display()
        )));
    }
    let result = copy(db, dir);
    match result {
        Ok(report) => {
            for tree in [RECORDS_TREE, CHECKPOINTS_TREE, META_TREE] {
                db.drop_tree(tree).map_err(sled_err)?;
            }
            db.flush().map_err(sled_err)?;
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(dir);
            Err(e)
        }
    }
}

fn copy(db: &sled::Db, dir: &Path) -> Result<MigrateReport, LogError> {
    let records = db.open_tree(RECORDS_TREE).map_err(sled_err)?;
    let checkpoints = db.open_tree(CHECKPOINTS_TREE).map_err(sled_err)?;
    let meta = db.open_tree(META_TREE).map_err(sled_err)?;
    let key = meta
        .get("checkpoint_key")
        .map_err(sled_err)?
        .map(|k| String::from_utf8_lossy(&k).into_owned());
    let anchor: Option<Checkpoint> = match meta.get("anchor").map_err(sled_err)? {
        Some(v) => Some(
            serde_json::from_slice(&v)
                .map_err(|e| LogError::Migrate(format!("the prune anchor is unreadable: {e}")))?,
        ),
        None => None,
    };
    let mut cps: Vec<Checkpoint> = Vec::new();
    for item in checkpoints.iter() {
        let (_, v) = item.map_err(sled_err)?;
        let cp: Checkpoint = serde_json::from_slice(&v)
            .map_err(|e| LogError::Migrate(format!("a checkpoint is unreadable: {e}")))?;
        if cp.kind == CheckpointKind::Checkpoint {
            cps.push(cp);
        }
    }
    cps.sort_by_key(|c| c.seq);

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    if let Some(k) = &key {
        write_atomic(dir, KEY_FILE, k.as_bytes())?;
    }
    if let Some(a) = &anchor {
        let json = serde_json::to_vec(a).map_err(|e| LogError::Encoding(e.to_string()))?;
        write_atomic(dir, ANCHOR_FILE, &json)?;
    }
    let first = anchor.as_ref().map_or(1, |a| a.seq + 1);
    let path = dir.join(segment::segment_name(first));
    let file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))?;
    let mut out = std::io::BufWriter::new(file);
    out.write_all(&segment::header(first))
        .map_err(io_err(&path))?;
    let mut report = MigrateReport {
        records: 0,
        checkpoints: 0,
        skipped_checkpoints: 0,
        head_seq: first - 1,
    };
    let mut pending = cps.into_iter().peekable();
    let mut frame = Vec::new();
    let mut put_checkpoints_upto = |seq: u64,
                                    out: &mut std::io::BufWriter<std::fs::File>,
                                    report: &mut MigrateReport|
     -> Result<(), LogError> {
        while let Some(cp) = pending.next_if(|c| c.seq <= seq) {
            let carried = key.as_deref() == Some(cp.public_key.as_str());
            match segment::encode_checkpoint(&cp).filter(|_| carried) {
                Some(payload) => {
                    let mut f = Vec::with_capacity(payload.len() + 5);
                    segment::push_frame(&mut f, KIND_CHECKPOINT, payload.len());
                    f.extend_from_slice(&payload);
                    out.write_all(&f).map_err(io_err(&path))?;
                    report.checkpoints += 1;
                }
                None => report.skipped_checkpoints += 1,
            }
        }
        Ok(())
    };
    put_checkpoints_upto(first - 1, &mut out, &mut report)?;
    for item in records.iter() {
        let (k, v) = item.map_err(sled_err)?;
        let seq = <[u8; 8]>::try_from(k.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| LogError::Migrate("a record key is not a sequence number".into()))?;
        if seq < first {
            continue; // left over from an interrupted prune
        }
        frame.clear();
        segment::push_frame(&mut frame, KIND_RECORD, v.len());
        frame.extend_from_slice(&v);
        out.write_all(&frame).map_err(io_err(&path))?;
        report.records += 1;
        report.head_seq = seq;
        put_checkpoints_upto(seq, &mut out, &mut report)?;
    }
    let file = out
        .into_inner()
        .map_err(|e| io_err(&path)(e.into_error()))?;
    file.sync_all().map_err(io_err(&path))?;
    super::writer::sync_dir(dir).map_err(io_err(dir))?;

    let log = DecisionLog::open_read_only(dir, None)?;
    let verified = log.verify()?;
    if let Some(p) = verified.first_bad() {
        return Err(LogError::Migrate(format!(
            "the copied log does not verify (seq {}: {}); the sled log was left as it was — run `meshgate audit verify` on it first",
            p.seq, p.what
        )));
    }
    Ok(report)
}
