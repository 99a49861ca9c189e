//! The tamper-evident decision log: append-only segment files in a directory of their own
//! (`STATE/audit/`), see [`segment`](self) for the format.
//!
//! | file | what |
//! |---|---|
//! | `seg-<first seq>.log` | records and signed checkpoints, in order |
//! | `key.pub` | the pinned checkpoint public key (hex), written on first use |
//! | `anchor.json` | the signed head the retained log starts after (after pruning) |
//! | `LOCK` | held (`flock`) by the one process that appends |
//!
//! Records are hash-chained (the `record` module gives the canonical encoding). A record is
//! written with one `write(2)` before [`DecisionLog::append_durable`] returns, so an answered
//! request's record survives `kill -9`; how soon it is also on stable storage is the
//! [`Durability`] mode: `process` syncs at most every `sync_interval` (a power loss costs at
//! most that window), `power` answers only after the `fdatasync` of the record's batch (group
//! commit). Every flush batch ends with a signed head (a [`Checkpoint`]) when a key is
//! configured, and one is signed at open and on demand, so the last head on disk is signed.
//! Any failure is returned (the gateway refuses the request: fail closed) and counted in
//! [`DecisionLog::failures`].

mod graph;
mod migrate;
mod query;
mod record;
mod segment;
mod signer;
mod verify;
mod writer;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use graph::{CallerGrouping, Edge, EdgeCounts, GraphBuilder, Node, ServiceGraph};
pub use migrate::{MigrateReport, migrate_from_sled, sled_log_present};
pub use query::{Filter, HashesAt, PruneReport};
pub use record::{
    DecisionKind, DecisionRecord, DecisionRecordInput, GENESIS_HASH, TrafficNote, new_decision_id,
};
pub use signer::{Checkpoint, CheckpointSigner};
pub use verify::{Tamper, VerifyReport};
pub use writer::Receipt;

use segment::{HEADER_LEN, KIND_CHECKPOINT, KIND_RECORD, ReadStop};
use writer::{RECENT_CHECKPOINTS, Shared, Writer};

const KEY_FILE: &str = "key.pub";
const ANCHOR_FILE: &str = "anchor.json";
const LOCK_FILE: &str = "LOCK";

/// Why the decision log could not do something.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LogError {
    /// A file of the log could not be read or written.
    #[error("decision log `{path}`: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A record could not be encoded or a stored value decoded.
    #[error("decision log encoding failed: {0}")]
    Encoding(String),
    /// Writing or syncing failed; the record is not durable.
    #[error("writing the decision log failed: {0}")]
    Flush(String),
    /// An earlier write or sync failed, and the log refuses every append since.
    #[error("the decision log failed earlier and refuses appends until restart: {0}")]
    Failed(String),
    /// The log is being closed.
    #[error("the decision log is closing")]
    FlusherStopped,
    /// Another process appends to this log.
    #[error(
        "the decision log in `{0}` is open for appending by another process (is a gateway running on this state?)"
    )]
    Locked(PathBuf),
    /// The log was opened to read; it cannot append.
    #[error("the decision log was opened read-only")]
    ReadOnly,
    /// No log at the path.
    #[error("no decision log in `{0}`")]
    Missing(PathBuf),
    /// The checkpoint key is unusable.
    #[error("checkpoint key: {0}")]
    Key(String),
    /// No checkpoint key was configured, but the operation signs.
    #[error("no checkpoint key is configured")]
    NoSigner,
    /// The log does not verify, so the operation (pruning) is refused.
    #[error("the decision log does not verify ({0}); nothing was pruned")]
    Tampered(String),
    /// The configured key is not the one pinned in the log.
    #[error("checkpoint key `{given}` is not the key pinned in the log (`{pinned}`)")]
    KeyMismatch {
        /// The pinned public key.
        pinned: String,
        /// The configured key's public key.
        given: String,
    },
    /// The old (sled) decision log could not be migrated.
    #[error("migration: {0}")]
    Migrate(String),
    /// The log has reached its disk budget: nothing more is recorded (so nothing more is
    /// answered) until old segments are pruned or the budget is raised.
    #[error(
        "the decision log is at its disk budget ({used} of {budget} bytes); prune old segments (`audit prune`) or raise `audit.max_disk_mib`"
    )]
    OverBudget {
        /// Bytes the log's segments take.
        used: u64,
        /// The budget.
        budget: u64,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How durable a record is when the request it decides is answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Written to the OS before the answer (survives the process being killed); synced to
    /// stable storage at most `sync_interval` later, so a power loss costs at most that window.
    #[default]
    Process,
    /// Synced to stable storage (the `fdatasync` of its batch) before the answer: survives
    /// power loss, at the cost of the sync's latency on every request.
    Power,
}

/// How a log is written.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// When a record is durable (see [`Durability`]).
    pub durability: Durability,
    /// Process mode: the longest time between two syncs while records are written.
    pub sync_interval: Duration,
    /// A segment is closed and a new one started past this size (pruning drops whole
    /// segments).
    pub segment_bytes: u64,
    /// The most bytes the log's segments may take (`None`: no budget). Past
    /// [`BUDGET_WARN_RATIO`] of it a warning is logged; at it, appends fail (the gateway
    /// refuses requests rather than answer unrecorded).
    pub max_disk_bytes: Option<u64>,
}

/// The share of the disk budget past which the log warns (once per crossing).
pub const BUDGET_WARN_RATIO: f64 = 0.8;

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Process,
            sync_interval: Duration::from_millis(10),
            segment_bytes: 64 << 20,
            max_disk_bytes: None,
        }
    }
}

/// The decision log in one directory.
pub struct DecisionLog {
    dir: PathBuf,
    pinned: Option<String>,
    /// The configured checkpoint key's public key (verification checks heads against it).
    configured: Option<String>,
    /// The appending side; `None` when opened read-only.
    shared: Option<Arc<Shared>>,
    /// The head when opened read-only.
    read_head: (u64, String),
    read_recent: Vec<Checkpoint>,
    syncer: Option<thread::JoinHandle<()>>,
    _lock: Option<File>,
}

impl std::fmt::Debug for DecisionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionLog")
            .field("dir", &self.dir)
            .field("pinned", &self.pinned)
            .field("read_only", &self.shared.is_none())
            .finish_non_exhaustive()
    }
}

/// The chain head and recent checkpoints found by scanning the end of the log.
struct Tail {
    seq: u64,
    hash: String,
    recent: VecDeque<Checkpoint>,
    /// The last segment ends inside a frame (an interrupted write) at this offset.
    torn: Option<u64>,
}

impl DecisionLog {
    /// Opens (or creates) the log in `dir` for appending. Only one process may append: a
    /// second opener gets [`LogError::Locked`]. With a signer, its public key is pinned on
    /// first use, a different pinned key is refused, and a checkpoint is signed at once.
    /// Opening never fails on tampered contents ([`DecisionLog::verify`] reports those); a
    /// frame cut short at the very end (a write the crash interrupted, never acknowledged) is
    /// removed.
    pub fn open(
        dir: &Path,
        signer: Option<CheckpointSigner>,
        options: LogOptions,
    ) -> Result<Self, LogError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        if lock.try_lock().is_err() {
            return Err(LogError::Locked(dir.to_path_buf()));
        }
        let pinned = pin_key(dir, signer.as_ref())?;
        let anchor = read_anchor(dir)?;
        let mut segments = segment::list(dir).map_err(io_err(dir))?;
        // A last segment without even a whole header was being created by a crash: remove it.
        if let Some((_, path)) = segments.last()
            && std::fs::metadata(path).map_err(io_err(path))?.len() < HEADER_LEN
        {
            std::fs::remove_file(path).map_err(io_err(path))?;
            segments.pop();
        }
        let tail = scan_tail(&segments, anchor.as_ref(), pinned.as_deref())?;
        let earlier: u64 = segments
            .iter()
            .rev()
            .skip(1)
            .filter_map(|(_, p)| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        let (file, first_seq, len) = match segments.last() {
            Some((first, path)) => {
                let file = OpenOptions::new()
                    .append(true)
                    .open(path)
                    .map_err(io_err(path))?;
                if let Some(offset) = tail.torn {
                    tracing::warn!(segment = %path.display(), offset, "dropping an incomplete frame at the end of the decision log (a write the process did not finish; it was never acknowledged)");
                    file.set_len(offset).map_err(io_err(path))?;
                    file.sync_all().map_err(io_err(path))?;
                }
                let len = file.metadata().map_err(io_err(path))?.len();
                (file, *first, len)
            }
            None => {
                let first = tail.seq + 1;
                let path = dir.join(segment::segment_name(first));
                let mut file = OpenOptions::new()
                    .create_new(true)
                    .append(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io_err(&path))?;
                file.write_all(&segment::header(first))
                    .and_then(|()| file.sync_all())
                    .map_err(io_err(&path))?;
                writer::sync_dir(dir).map_err(io_err(dir))?;
                (file, first, HEADER_LEN)
            }
        };
        let configured = signer.as_ref().map(|s| s.public_key_hex().to_owned());
        let has_signer = signer.is_some();
        let writer = Writer::new(file, first_seq, len, tail.seq, tail.hash.clone());
        let shared = Arc::new(Shared::new(
            dir.to_path_buf(),
            options,
            signer,
            writer,
            tail.recent,
        ));
        shared.set_disk_bytes(earlier + len);
        let runner = shared.clone();
        let syncer = thread::Builder::new()
            .name("audit-sync".to_owned())
            .spawn(move || runner.run_syncer())
            .map_err(|e| LogError::Flush(format!("cannot start the sync thread: {e}")))?;
        let log = Self {
            dir: dir.to_path_buf(),
            pinned,
            configured,
            shared: Some(shared),
            read_head: (tail.seq, tail.hash),
            read_recent: Vec::new(),
            syncer: Some(syncer),
            _lock: Some(lock),
        };
        if has_signer {
            log.checkpoint(SystemTime::now())?;
        }
        Ok(log)
    }

    /// Opens the log in `dir` to read it (query, verify, export), also while a gateway
    /// appends to it. `signer` is only used to check that the heads were signed by it.
    pub fn open_read_only(dir: &Path, signer: Option<&CheckpointSigner>) -> Result<Self, LogError> {
        if !dir.is_dir() {
            return Err(LogError::Missing(dir.to_path_buf()));
        }
        let pinned = std::fs::read_to_string(dir.join(KEY_FILE))
            .ok()
            .map(|k| k.trim().to_owned());
        let anchor = read_anchor(dir)?;
        let segments = segment::list(dir).map_err(io_err(dir))?;
        let tail = scan_tail(&segments, anchor.as_ref(), pinned.as_deref())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            pinned,
            configured: signer.map(|s| s.public_key_hex().to_owned()),
            shared: None,
            read_head: (tail.seq, tail.hash),
            read_recent: tail.recent.into(),
            syncer: None,
            _lock: None,
        })
    }

    /// The directory the log lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The durability mode (`None` when read-only).
    pub fn durability(&self) -> Option<Durability> {
        self.shared.as_ref().map(|s| s.durability())
    }

    fn shared(&self) -> Result<&Arc<Shared>, LogError> {
        self.shared.as_ref().ok_or(LogError::ReadOnly)
    }

    /// Appends one record and resolves when it is durable in the configured mode: written
    /// (process) or synced (power). The gateway calls this once per request.
    pub async fn append_durable(&self, input: &DecisionRecordInput) -> Result<Receipt, LogError> {
        let shared = self.shared()?;
        let prepared =
            record::prepare(input).map_err(|e| shared.fail(LogError::Encoding(e.to_string())))?;
        let (receipt, _) = shared.write(&prepared).map_err(|e| shared.fail(e))?;
        if shared.durability() == Durability::Power {
            shared
                .wait_synced(receipt.seq)
                .await
                .map_err(|e| shared.fail(e))?;
        }
        Ok(receipt)
    }

    /// Appends one record, blocks until it is synced to stable storage whatever the mode,
    /// and returns it as stored (admin events, tools, tests).
    pub fn append(&self, input: DecisionRecordInput) -> Result<DecisionRecord, LogError> {
        self.append_synced(input, true)
    }

    /// [`DecisionLog::append`], where an admin event may use the reserve past the disk
    /// budget only when `reserve` says so.
    fn append_synced(
        &self,
        input: DecisionRecordInput,
        reserve: bool,
    ) -> Result<DecisionRecord, LogError> {
        let shared = self.shared()?;
        let mut prepared =
            record::prepare(&input).map_err(|e| shared.fail(LogError::Encoding(e.to_string())))?;
        prepared.admin &= reserve;
        let (receipt, prev) = shared.write(&prepared).map_err(|e| shared.fail(e))?;
        shared
            .wait_synced_blocking(receipt.seq)
            .map_err(|e| shared.fail(e))?;
        let mut body = Vec::new();
        record::body(receipt.seq, &prev, &prepared, &mut body);
        let mut rec: DecisionRecord =
            serde_json::from_slice(&body).map_err(|e| LogError::Encoding(e.to_string()))?;
        rec.hash = hex::encode(record::hash_body(&body));
        Ok(rec)
    }

    /// Records that someone looked (a console page view): an admin event, synced, that never
    /// uses the reserve past the disk budget kept for the operator's commands — on a full log
    /// views are refused, `audit prune` still works.
    pub fn append_view_event(
        &self,
        who: &str,
        what: &str,
        time: SystemTime,
    ) -> Result<DecisionRecord, LogError> {
        self.append_synced(DecisionRecordInput::admin(who, what, time), false)
    }

    /// Records an admin event (who did what, when), synced before it returns.
    pub fn append_admin_event(
        &self,
        who: &str,
        what: &str,
        time: SystemTime,
    ) -> Result<DecisionRecord, LogError> {
        self.append(DecisionRecordInput::admin(who, what, time))
    }

    /// The bytes the log's segments take now, and the disk budget (`None`: read-only log).
    pub fn disk_usage(&self) -> Option<(u64, Option<u64>)> {
        self.shared.as_ref().map(|s| (s.disk_bytes(), s.budget()))
    }

    /// How many appends failed (each one a request that was refused for it).
    pub fn failures(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |s| s.failures.load(Ordering::Relaxed))
    }

    /// The last sequence number and its hash.
    pub fn head(&self) -> (u64, String) {
        match &self.shared {
            Some(s) => {
                let w = s.writer.lock().unwrap_or_else(|e| e.into_inner());
                (w.seq, w.hash.clone())
            }
            None => self.read_head.clone(),
        }
    }

    /// Signs the current chain head, appends the checkpoint and syncs it.
    pub fn checkpoint(&self, now: SystemTime) -> Result<Checkpoint, LogError> {
        self.shared()?.checkpoint_now(now)
    }

    /// The latest checkpoints (at most 64), oldest first: what peers are given to witness.
    pub fn recent_checkpoints(&self) -> Vec<Checkpoint> {
        match &self.shared {
            Some(s) => s
                .recent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .collect(),
            None => self.read_recent.clone(),
        }
    }

    /// A watch of the latest signed head (federation pushes it to peers).
    pub fn subscribe_checkpoints(
        &self,
    ) -> Option<tokio::sync::watch::Receiver<Option<Checkpoint>>> {
        self.shared.as_ref().map(|s| s.latest.subscribe())
    }

    /// The checkpoint public key pinned in the log (hex), once one was used.
    pub fn pinned_key(&self) -> Option<&str> {
        self.pinned.as_deref()
    }

    fn anchor(&self) -> Result<Option<Checkpoint>, LogError> {
        read_anchor(&self.dir)
    }
}

impl Drop for DecisionLog {
    fn drop(&mut self) {
        // A last sync (and signed head for what is new), then the sync thread ends and the
        // lock is released, so the log can be reopened at once.
        if let Some(shared) = &self.shared {
            shared.stop();
        }
        if let Some(handle) = self.syncer.take() {
            let _ = handle.join();
        }
    }
}

/// Reads `key.pub`, or writes it for `signer` on first use; refuses another key.
fn pin_key(dir: &Path, signer: Option<&CheckpointSigner>) -> Result<Option<String>, LogError> {
    let path = dir.join(KEY_FILE);
    let pinned = match std::fs::read_to_string(&path) {
        Ok(k) => Some(k.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(&path)(e)),
    };
    match (pinned, signer) {
        (Some(pinned), Some(s)) if pinned != s.public_key_hex() => Err(LogError::KeyMismatch {
            pinned,
            given: s.public_key_hex().to_owned(),
        }),
        (Some(pinned), _) => Ok(Some(pinned)),
        (None, Some(s)) => {
            write_atomic(dir, KEY_FILE, s.public_key_hex().as_bytes())?;
            Ok(Some(s.public_key_hex().to_owned()))
        }
        (None, None) => Ok(None),
    }
}

/// Writes `name` in `dir` through a synced temporary file and a rename.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), LogError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_err(&tmp))?;
    let path = dir.join(name);
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    writer::sync_dir(dir).map_err(io_err(dir))
}

fn read_anchor(dir: &Path) -> Result<Option<Checkpoint>, LogError> {
    let path = dir.join(ANCHOR_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            LogError::Encoding(format!("`{}` is not a checkpoint: {e}", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// The sequence number a record body states (`{"seq":N,…`).
pub(crate) fn body_seq(body: &[u8]) -> Option<u64> {
    let rest = body.strip_prefix(b"{\"seq\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// Finds the chain head (the last record of the last segment that has one) and the latest
/// checkpoints, and whether the last segment ends in an interrupted write.
fn scan_tail(
    segments: &[(u64, PathBuf)],
    anchor: Option<&Checkpoint>,
    pinned: Option<&str>,
) -> Result<Tail, LogError> {
    let mut tail = Tail {
        seq: anchor.map_or(0, |a| a.seq),
        hash: anchor.map_or_else(|| GENESIS_HASH.to_owned(), |a| a.head_hash.clone()),
        recent: VecDeque::new(),
        torn: None,
    };
    let mut found_record = false;
    for (i, (_, path)) in segments.iter().enumerate().rev() {
        let mut reader = match segment::Reader::open(path) {
            Ok(r) => r,
            Err(ReadStop::Io(e)) => return Err(io_err(path)(e)),
            // A damaged segment is for `verify` to name; the head comes from what reads.
            Err(_) => continue,
        };
        let mut last: Option<(u64, String)> = None;
        let mut checkpoints = Vec::new();
        loop {
            match reader.next_frame() {
                Ok(Some(frame)) => match frame.kind {
                    KIND_RECORD if frame.payload.len() > 32 => {
                        let seq = body_seq(&frame.payload[32..]);
                        last = Some((
                            seq.unwrap_or(reader.first_seq),
                            hex::encode(&frame.payload[..32]),
                        ));
                    }
                    KIND_CHECKPOINT => {
                        if let Some(cp) =
                            pinned.and_then(|k| segment::decode_checkpoint(&frame.payload, k))
                        {
                            checkpoints.push(cp);
                        }
                    }
                    _ => {}
                },
                Ok(None) => break,
                Err(ReadStop::Torn { offset }) => {
                    if i + 1 == segments.len() {
                        tail.torn = Some(offset);
                    }
                    break;
                }
                Err(ReadStop::Corrupt { .. }) => break,
                Err(ReadStop::Io(e)) => return Err(io_err(path)(e)),
            }
        }
        if tail.recent.len() < RECENT_CHECKPOINTS {
            for cp in checkpoints.into_iter().rev() {
                if tail.recent.len() == RECENT_CHECKPOINTS {
                    break;
                }
                tail.recent.push_front(cp);
            }
        }
        if !found_record && let Some((seq, hash)) = last {
            tail.seq = seq;
            tail.hash = hash;
            found_record = true;
        }
        if found_record {
            break;
        }
    }
    Ok(tail)
}

#[cfg(test)]
mod tests;
