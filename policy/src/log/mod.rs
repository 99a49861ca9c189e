//! The tamper-evident decision log, in sled trees of the state database:
//!
//! | tree | key | value |
//! |---|---|---|
//! | `audit.records` | seq (u64 big-endian) | `hash (32 bytes) || body` (see `record`) |
//! | `audit.checkpoints` | seq (u64 big-endian) | a [`Checkpoint`] as JSON |
//! | `audit.meta` | `head` | last appended seq (u64 big-endian) |
//! | | `checkpoint_key` | the pinned checkpoint public key (hex) |
//! | | `anchor` | the signed checkpoint the retained log starts after (after pruning) |
//!
//! Durability: [`DecisionLog::append`] flushes before it returns;
//! [`DecisionLog::append_durable`] (async) and [`DecisionLog::append_batched`] (blocking)
//! group concurrent appends into one flush done by a background thread. A record is
//! acknowledged only after the flush that covers it succeeded, so an answered request's
//! record survives `kill -9`. Any failure is returned (the gateway denies: fail closed) and
//! counted in [`DecisionLog::failures`].

mod query;
mod record;
mod signer;
mod verify;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, mpsc};
use std::thread;
use std::time::SystemTime;

use thiserror::Error;

pub use query::{Filter, PruneReport};
pub use record::{
    DecisionKind, DecisionRecord, DecisionRecordInput, GENESIS_HASH, new_decision_id,
};
pub use signer::{Checkpoint, CheckpointSigner};
pub use verify::{Tamper, VerifyReport};

pub(crate) const RECORDS_TREE: &str = "audit.records";
pub(crate) const CHECKPOINTS_TREE: &str = "audit.checkpoints";
pub(crate) const META_TREE: &str = "audit.meta";
const META_HEAD: &[u8] = b"head";
const META_KEY: &[u8] = b"checkpoint_key";
const META_ANCHOR: &[u8] = b"anchor";

/// Why the decision log could not do something.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LogError {
    /// The sled database failed.
    #[error("decision log storage failed: {0}")]
    Storage(#[from] sled::Error),
    /// A record could not be encoded or a stored value decoded.
    #[error("decision log encoding failed: {0}")]
    Encoding(String),
    /// Flushing to disk failed; the records of this batch are not durable.
    #[error("flushing the decision log failed: {0}")]
    Flush(String),
    /// The background flusher has stopped.
    #[error("the decision log's flusher has stopped")]
    FlusherStopped,
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
}

type Ack = Result<(), String>;

enum Waiter {
    Blocking(mpsc::SyncSender<Ack>),
    Async(tokio::sync::oneshot::Sender<Ack>),
}

impl Waiter {
    fn send(self, ack: Ack) {
        // A waiter that went away no longer needs the answer.
        let _ = match self {
            Self::Blocking(tx) => tx.send(ack).map_err(|_| ()),
            Self::Async(tx) => tx.send(ack).map_err(|_| ()),
        };
    }
}

#[derive(Debug)]
struct Head {
    seq: u64,
    hash: String,
}

/// The decision log over one sled database.
pub struct DecisionLog {
    db: sled::Db,
    records: sled::Tree,
    checkpoints: sled::Tree,
    meta: sled::Tree,
    head: Mutex<Head>,
    signer: Option<CheckpointSigner>,
    failures: AtomicU64,
    flush_tx: Mutex<Option<mpsc::Sender<Waiter>>>,
    flusher: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for DecisionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionLog")
            .field("signer", &self.signer)
            .finish_non_exhaustive()
    }
}

impl DecisionLog {
    /// Opens (or creates) the log's trees in `db`. With a signer, its public key is pinned on
    /// first use, and a different pinned key is refused. Opening never fails on tampered
    /// contents: [`DecisionLog::verify`] reports those.
    pub fn open(db: &sled::Db, signer: Option<CheckpointSigner>) -> Result<Self, LogError> {
        let records = db.open_tree(RECORDS_TREE)?;
        let checkpoints = db.open_tree(CHECKPOINTS_TREE)?;
        let meta = db.open_tree(META_TREE)?;
        if let Some(s) = &signer {
            match meta.get(META_KEY)? {
                Some(pinned) if pinned.as_ref() != s.public_key_hex().as_bytes() => {
                    return Err(LogError::KeyMismatch {
                        pinned: String::from_utf8_lossy(&pinned).into_owned(),
                        given: s.public_key_hex().to_owned(),
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert(META_KEY, s.public_key_hex().as_bytes())?;
                }
            }
        }
        let head = Self::read_head(&records, &meta)?;
        let (tx, rx) = mpsc::channel();
        let flush_db = db.clone();
        let handle = thread::Builder::new()
            .name("audit-flusher".to_owned())
            .spawn(move || flusher(&flush_db, &rx))
            .map_err(|e| LogError::Flush(format!("cannot start the flusher: {e}")))?;
        Ok(Self {
            db: db.clone(),
            records,
            checkpoints,
            meta,
            head: Mutex::new(head),
            signer,
            failures: AtomicU64::new(0),
            flush_tx: Mutex::new(Some(tx)),
            flusher: Some(handle),
        })
    }

    /// The chain head: the last record (or the prune anchor, or genesis).
    fn read_head(records: &sled::Tree, meta: &sled::Tree) -> Result<Head, LogError> {
        if let Some((k, v)) = records.last()? {
            let seq = key_seq(&k).unwrap_or(0);
            let hash = record::split(&v)
                .map(|(h, _)| hex::encode(h))
                .unwrap_or_default();
            return Ok(Head { seq, hash });
        }
        if let Some(anchor) = meta.get(META_ANCHOR)? {
            let cp: Checkpoint =
                serde_json::from_slice(&anchor).map_err(|e| LogError::Encoding(e.to_string()))?;
            return Ok(Head {
                seq: cp.seq,
                hash: cp.head_hash,
            });
        }
        Ok(Head {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        })
    }

    /// Appends one record and flushes before returning (durable, one flush per call).
    pub fn append(&self, input: DecisionRecordInput) -> Result<DecisionRecord, LogError> {
        let record = self.insert(input)?;
        self.db
            .flush()
            .map_err(|e| self.fail(LogError::Flush(e.to_string())))?;
        Ok(record)
    }

    /// Appends one record and blocks until a group flush covering it completes.
    pub fn append_batched(&self, input: DecisionRecordInput) -> Result<DecisionRecord, LogError> {
        let record = self.insert(input)?;
        let (tx, rx) = mpsc::sync_channel(1);
        self.enqueue(Waiter::Blocking(tx))?;
        match rx.recv() {
            Ok(Ok(())) => Ok(record),
            Ok(Err(e)) => Err(self.fail(LogError::Flush(e))),
            Err(_) => Err(self.fail(LogError::FlusherStopped)),
        }
    }

    /// Appends one record and resolves once a group flush covering it completes; the gateway
    /// calls this per request, and concurrent calls share one flush.
    pub async fn append_durable(
        &self,
        input: DecisionRecordInput,
    ) -> Result<DecisionRecord, LogError> {
        let record = self.insert(input)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enqueue(Waiter::Async(tx))?;
        match rx.await {
            Ok(Ok(())) => Ok(record),
            Ok(Err(e)) => Err(self.fail(LogError::Flush(e))),
            Err(_) => Err(self.fail(LogError::FlusherStopped)),
        }
    }

    /// Records an admin event (who did what, when), durably.
    pub fn append_admin_event(
        &self,
        who: &str,
        what: &str,
        time: SystemTime,
    ) -> Result<DecisionRecord, LogError> {
        self.append(DecisionRecordInput::admin(who, what, time))
    }

    /// How many appends failed (each one a request that was denied for it).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The last sequence number and its hash.
    pub fn head(&self) -> (u64, String) {
        let head = self
            .head
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (head.seq, head.hash.clone())
    }

    fn insert(&self, input: DecisionRecordInput) -> Result<DecisionRecord, LogError> {
        let id = input.id.clone().unwrap_or_else(new_decision_id);
        let mut head = self
            .head
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let seq = head.seq + 1;
        let mut rec = DecisionRecord::new(input, seq, head.hash.clone(), id);
        let value =
            record::encode(&mut rec).map_err(|e| self.fail(LogError::Encoding(e.to_string())))?;
        self.records
            .insert(seq.to_be_bytes(), value)
            .map_err(|e| self.fail(e.into()))?;
        self.meta
            .insert(META_HEAD, &seq.to_be_bytes())
            .map_err(|e| self.fail(e.into()))?;
        head.seq = seq;
        head.hash = rec.hash.clone();
        Ok(rec)
    }

    fn enqueue(&self, waiter: Waiter) -> Result<(), LogError> {
        let tx = self
            .flush_tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match tx.as_ref().map(|tx| tx.send(waiter)) {
            Some(Ok(())) => Ok(()),
            _ => Err(self.fail(LogError::FlusherStopped)),
        }
    }

    fn fail(&self, e: LogError) -> LogError {
        self.failures.fetch_add(1, Ordering::Relaxed);
        tracing::error!(error = %e, "decision log write failed; the request is denied");
        e
    }

    /// Signs the current chain head (needs a signer) and stores the checkpoint.
    pub fn checkpoint(&self, now: SystemTime) -> Result<Checkpoint, LogError> {
        let signer = self.signer.as_ref().ok_or(LogError::NoSigner)?;
        let (seq, hash) = self.head();
        let cp = signer.sign(seq, &hash, &crate::timefmt::to_rfc3339(now))?;
        let json = serde_json::to_vec(&cp).map_err(|e| LogError::Encoding(e.to_string()))?;
        self.checkpoints.insert(seq.to_be_bytes(), json)?;
        self.db.flush()?;
        Ok(cp)
    }

    /// Every stored checkpoint, oldest first (the prune anchor, if any, first).
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>, LogError> {
        let mut out = Vec::new();
        if let Some(a) = self.anchor()? {
            out.push(a);
        }
        for item in self.checkpoints.iter() {
            let (_, v) = item?;
            let cp: Checkpoint =
                serde_json::from_slice(&v).map_err(|e| LogError::Encoding(e.to_string()))?;
            if out.first() != Some(&cp) {
                out.push(cp);
            }
        }
        Ok(out)
    }

    fn anchor(&self) -> Result<Option<Checkpoint>, LogError> {
        match self.meta.get(META_ANCHOR)? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| LogError::Encoding(e.to_string())),
            None => Ok(None),
        }
    }

    fn pinned_key(&self) -> Result<Option<String>, LogError> {
        Ok(self
            .meta
            .get(META_KEY)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn meta_head(&self) -> Result<u64, LogError> {
        Ok(self
            .meta
            .get(META_HEAD)?
            .and_then(|v| key_seq(&v))
            .unwrap_or(0))
    }
}

impl Drop for DecisionLog {
    fn drop(&mut self) {
        // Closing the channel ends the flusher after it answered every waiter; joining it
        // releases its handle on the database, so the state can be reopened at once.
        if let Ok(mut tx) = self.flush_tx.lock() {
            tx.take();
        }
        if let Some(handle) = self.flusher.take() {
            let _ = handle.join();
        }
    }
}

/// The group-commit loop: take every waiter queued so far, flush once, answer them all.
fn flusher(db: &sled::Db, rx: &mpsc::Receiver<Waiter>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let ack = db.flush().map(|_| ()).map_err(|e| e.to_string());
        for w in batch {
            w.send(ack.clone());
        }
    }
}

pub(crate) fn key_seq(key: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests;
