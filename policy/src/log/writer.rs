//! The appending side of the decision log: one writer (the current segment under a mutex)
//! and one sync thread that signs a checkpoint per flush batch and `fdatasync`s.
//!
//! An append encodes its record outside the lock, then, under the lock, chains it (seq and
//! previous hash), hashes it and writes the frame with one `write(2)`. The sync thread wakes
//! when records are pending, at most every `sync_interval` in [`Durability::Process`] mode and
//! at once in [`Durability::Power`] mode; it signs the head (when a checkpoint key is
//! configured), appends that checkpoint, `fdatasync`s the segment and publishes the synced
//! sequence number to waiters. A write or sync failure is sticky: from then on every append
//! fails, so the gateway refuses requests instead of answering without a record.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use super::record::{self, Prepared};
use super::segment::{self, HEADER_LEN, KIND_CHECKPOINT, KIND_RECORD};
use super::signer::{Checkpoint, CheckpointSigner};
use super::{Durability, LogError, LogOptions};

/// Room past the disk budget kept for administrative events, so the operator's commands
/// (which are recorded before they run) still work on a full log: `audit prune` first.
pub(crate) const ADMIN_RESERVE_BYTES: u64 = 1 << 20;

/// Checkpoints kept in memory for peers (the latest ones).
pub(crate) const RECENT_CHECKPOINTS: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The current segment and the chain head.
pub(crate) struct Writer {
    pub file: Arc<File>,
    pub first_seq: u64,
    pub len: u64,
    pub seq: u64,
    pub hash: String,
    buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn new(file: File, first_seq: u64, len: u64, seq: u64, hash: String) -> Self {
        Self {
            file: Arc::new(file),
            first_seq,
            len,
            seq,
            hash,
            buf: Vec::with_capacity(4096),
        }
    }
}

#[derive(Default)]
struct SyncState {
    /// Records or checkpoints written since the last sync.
    pending: bool,
    /// A caller waits for a sync now (admin events, explicit checkpoints).
    now: bool,
    stop: bool,
}

/// Everything the appenders and the sync thread share.
pub(crate) struct Shared {
    dir: PathBuf,
    options: LogOptions,
    pub signer: Option<CheckpointSigner>,
    pub writer: Mutex<Writer>,
    sync: Mutex<SyncState>,
    wake: Condvar,
    synced_cv: Condvar,
    synced: AtomicU64,
    notify: tokio::sync::Notify,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    pub failures: AtomicU64,
    pub recent: Mutex<std::collections::VecDeque<Checkpoint>>,
    pub latest: tokio::sync::watch::Sender<Option<Checkpoint>>,
    /// Bytes of every segment, the current one included.
    disk_bytes: AtomicU64,
    /// Past the warning share of the budget (warned once per crossing).
    over_warning: AtomicBool,
}

/// What an append returns: where the record went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The record's sequence number.
    pub seq: u64,
    /// The decision id stored in it.
    pub id: String,
}

impl Shared {
    pub(crate) fn new(
        dir: PathBuf,
        options: LogOptions,
        signer: Option<CheckpointSigner>,
        writer: Writer,
        recent: std::collections::VecDeque<Checkpoint>,
    ) -> Self {
        let synced = writer.seq;
        let latest = recent.back().cloned();
        Self {
            dir,
            options,
            signer,
            writer: Mutex::new(writer),
            sync: Mutex::new(SyncState::default()),
            wake: Condvar::new(),
            synced_cv: Condvar::new(),
            synced: AtomicU64::new(synced),
            notify: tokio::sync::Notify::new(),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            failures: AtomicU64::new(0),
            recent: Mutex::new(recent),
            latest: tokio::sync::watch::channel(latest).0,
            disk_bytes: AtomicU64::new(0),
            over_warning: AtomicBool::new(false),
        }
    }

    /// Bytes the segments take.
    pub(crate) fn disk_bytes(&self) -> u64 {
        self.disk_bytes.load(Ordering::Relaxed)
    }

    /// The disk budget, if any.
    pub(crate) fn budget(&self) -> Option<u64> {
        self.options.max_disk_bytes
    }

    /// Sets what the segments take (at open, and after pruning recounted them).
    pub(crate) fn set_disk_bytes(&self, bytes: u64) {
        self.disk_bytes.store(bytes, Ordering::Relaxed);
        self.note_usage(bytes);
    }

    /// Segments of `by` bytes were removed.
    pub(crate) fn shrink(&self, by: u64) {
        let before = self
            .disk_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(by))
            })
            .unwrap_or_default();
        self.note_usage(before.saturating_sub(by));
    }

    fn grow(&self, by: u64) {
        let now = self.disk_bytes.fetch_add(by, Ordering::Relaxed) + by;
        self.note_usage(now);
    }

    /// Warns once when usage passes the warning share of the budget (again after it fell
    /// below, e.g. after pruning).
    fn note_usage(&self, used: u64) {
        let Some(budget) = self.budget() else { return };
        let over = used as f64 >= budget as f64 * super::BUDGET_WARN_RATIO;
        if over && !self.over_warning.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                used,
                budget,
                "the decision log is past {}% of its disk budget; at the budget every request is refused (prune old segments or raise audit.max_disk_mib)",
                (super::BUDGET_WARN_RATIO * 100.0) as u32
            );
        } else if !over {
            self.over_warning.store(false, Ordering::Relaxed);
        }
    }

    pub(crate) fn durability(&self) -> Durability {
        self.options.durability
    }

    /// Counts and logs a failed append (the request it belonged to is refused).
    pub(crate) fn fail(&self, e: LogError) -> LogError {
        self.failures.fetch_add(1, Ordering::Relaxed);
        tracing::error!(error = %e, "decision log write failed; the request is refused");
        e
    }

    fn check_failed(&self) -> Result<(), LogError> {
        if self.failed.load(Ordering::Acquire) {
            let why = lock(&self.failure).clone().unwrap_or_default();
            return Err(LogError::Failed(why));
        }
        Ok(())
    }

    /// Makes every later append fail: the log can no longer promise durability.
    fn poison(&self, why: String) {
        tracing::error!(error = %why, "the decision log failed; every request is refused until restart");
        *lock(&self.failure) = Some(why);
        self.failed.store(true, Ordering::Release);
        self.notify.notify_waiters();
        drop(lock(&self.sync));
        self.synced_cv.notify_all();
    }

    /// Chains, hashes and writes one record; it is in the OS when this returns. Returns
    /// where it went and the hash it chained to.
    pub(crate) fn write(&self, prepared: &Prepared) -> Result<(Receipt, String), LogError> {
        self.check_failed()?;
        let mut w = lock(&self.writer);
        let seq = w.seq + 1;
        let Writer { buf, hash, .. } = &mut *w;
        buf.clear();
        buf.resize(segment::FRAME_HEADER + 32, 0);
        record::body(seq, hash, prepared, buf);
        let body_len = buf.len() - segment::FRAME_HEADER - 32;
        if 32 + body_len > segment::MAX_FRAME {
            return Err(LogError::Encoding(format!(
                "record of {body_len} bytes is larger than a frame"
            )));
        }
        if let Some(budget) = self.budget() {
            let used = self.disk_bytes();
            let limit = if prepared.admin {
                budget.saturating_add(ADMIN_RESERVE_BYTES)
            } else {
                budget
            };
            if used + buf.len() as u64 > limit {
                return Err(LogError::OverBudget { used, budget });
            }
        }
        let digest = record::hash_body(&buf[segment::FRAME_HEADER + 32..]);
        buf[..4].copy_from_slice(&((32 + body_len) as u32).to_le_bytes());
        buf[4] = KIND_RECORD;
        buf[segment::FRAME_HEADER..segment::FRAME_HEADER + 32].copy_from_slice(&digest);
        self.write_frame(&mut w)?;
        w.seq = seq;
        let prev = std::mem::replace(&mut w.hash, hex::encode(digest));
        if w.len >= self.options.segment_bytes {
            self.roll(&mut w);
        }
        drop(w);
        self.mark_pending(false);
        Ok((
            Receipt {
                seq,
                id: prepared.id.clone(),
            },
            prev,
        ))
    }

    /// Starts a new segment after the current one is synced; on failure keeps appending to
    /// the current one (it only grows larger) and tries again at the next append.
    fn roll(&self, w: &mut Writer) {
        let first = w.seq + 1;
        let path = self.dir.join(segment::segment_name(first));
        let result = w.file.sync_data().and_then(|()| {
            let mut file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .mode(0o600)
                .open(&path)?;
            file.write_all(&segment::header(first))?;
            sync_dir(&self.dir)?;
            Ok(file)
        });
        match result {
            Ok(file) => {
                w.file = Arc::new(file);
                w.first_seq = first;
                w.len = HEADER_LEN;
                self.grow(HEADER_LEN);
            }
            Err(e) => {
                tracing::warn!(segment = %path.display(), error = %e, "cannot start a new decision-log segment; the current one grows");
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    fn mark_pending(&self, now: bool) {
        let mut st = lock(&self.sync);
        let was = st.pending || st.now;
        st.pending = true;
        st.now |= now;
        if !was || now {
            self.wake.notify_one();
        }
    }

    pub(crate) fn synced(&self) -> u64 {
        self.synced.load(Ordering::Acquire)
    }

    /// Blocks until `seq` is synced (asking for a sync now).
    pub(crate) fn wait_synced_blocking(&self, seq: u64) -> Result<(), LogError> {
        self.mark_pending(true);
        let mut st = lock(&self.sync);
        loop {
            self.check_failed()?;
            if self.synced() >= seq {
                return Ok(());
            }
            if st.stop {
                return Err(LogError::FlusherStopped);
            }
            st = self
                .synced_cv
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Resolves once `seq` is synced (power mode: the batch's `fdatasync`).
    pub(crate) async fn wait_synced(&self, seq: u64) -> Result<(), LogError> {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        loop {
            notified.as_mut().enable();
            self.check_failed()?;
            if self.synced() >= seq {
                return Ok(());
            }
            if lock(&self.sync).stop {
                return Err(LogError::FlusherStopped);
            }
            notified.as_mut().await;
            notified.set(self.notify.notified());
        }
    }

    /// Signs the head now, appends the checkpoint and syncs it.
    pub(crate) fn checkpoint_now(&self, now: SystemTime) -> Result<Checkpoint, LogError> {
        self.check_failed()?;
        let signer = self.signer.as_ref().ok_or(LogError::NoSigner)?;
        let (seq, hash) = {
            let w = lock(&self.writer);
            (w.seq, w.hash.clone())
        };
        let cp = signer.sign(seq, &hash, &crate::timefmt::to_rfc3339(now))?;
        self.append_checkpoint(&cp)?;
        let target = lock(&self.writer).seq;
        self.wait_synced_blocking(target)?;
        Ok(cp)
    }

    fn append_checkpoint(&self, cp: &Checkpoint) -> Result<(), LogError> {
        let payload = segment::encode_checkpoint(cp)
            .ok_or_else(|| LogError::Encoding("checkpoint cannot be encoded".to_owned()))?;
        let mut w = lock(&self.writer);
        w.buf.clear();
        segment::push_frame(&mut w.buf, KIND_CHECKPOINT, payload.len());
        w.buf.extend_from_slice(&payload);
        self.write_frame(&mut w)?;
        drop(w);
        let mut recent = lock(&self.recent);
        if recent.len() == RECENT_CHECKPOINTS {
            recent.pop_front();
        }
        recent.push_back(cp.clone());
        drop(recent);
        self.latest.send_replace(Some(cp.clone()));
        self.mark_pending(false);
        Ok(())
    }

    /// The sync thread: waits for pending writes, signs, syncs, publishes; stops after a
    /// final sync once asked to.
    pub(crate) fn run_syncer(&self) {
        let interval = match self.options.durability {
            Durability::Process => self.options.sync_interval,
            Durability::Power => Duration::ZERO,
        };
        let mut last = Instant::now()
            .checked_sub(interval)
            .unwrap_or_else(Instant::now);
        loop {
            let stopping = {
                let mut st = lock(&self.sync);
                loop {
                    if st.stop || st.now {
                        break;
                    }
                    if st.pending {
                        let due = last + interval;
                        let now = Instant::now();
                        if now >= due {
                            break;
                        }
                        st = self
                            .wake
                            .wait_timeout(st, due - now)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                        continue;
                    }
                    st = self.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
                }
                let stopping = st.stop;
                st.pending = false;
                st.now = false;
                stopping
            };
            if let Err(e) = self.sync_batch() {
                self.poison(e.to_string());
            }
            last = Instant::now();
            if stopping {
                break;
            }
        }
        self.notify.notify_waiters();
        drop(lock(&self.sync));
        self.synced_cv.notify_all();
    }

    /// One flush batch: a signed head for new records, then `fdatasync`.
    fn sync_batch(&self) -> Result<(), LogError> {
        if self.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some(signer) = &self.signer {
            let (seq, hash) = {
                let w = lock(&self.writer);
                (w.seq, w.hash.clone())
            };
            let checkpointed = lock(&self.recent).back().map(|c| c.seq);
            if checkpointed.is_none_or(|c| c < seq) {
                let cp = signer.sign(seq, &hash, &crate::timefmt::to_rfc3339(SystemTime::now()))?;
                self.append_checkpoint(&cp)?;
            }
        }
        let (file, target) = {
            let w = lock(&self.writer);
            (w.file.clone(), w.seq)
        };
        file.sync_data()
            .map_err(|e| LogError::Flush(format!("fdatasync: {e}")))?;
        self.synced.fetch_max(target, Ordering::AcqRel);
        self.notify.notify_waiters();
        // Taking the lock orders this wake-up after a waiter's check.
        drop(lock(&self.sync));
        self.synced_cv.notify_all();
        Ok(())
    }

    /// Asks the sync thread for a last batch and to stop.
    pub(crate) fn stop(&self) {
        let mut st = lock(&self.sync);
        st.stop = true;
        self.wake.notify_one();
    }

    /// Writes `w.buf` as one frame. On failure the segment is cut back to its last whole
    /// frame so that it stays parseable; if even that fails, the log is poisoned.
    fn write_frame(&self, w: &mut Writer) -> Result<(), LogError> {
        let file: &File = &w.file;
        let mut f = file;
        match f.write_all(&w.buf) {
            Ok(()) => {
                w.len += w.buf.len() as u64;
                self.grow(w.buf.len() as u64);
                Ok(())
            }
            Err(e) => match file.set_len(w.len) {
                Ok(()) => Err(LogError::Flush(format!("write failed: {e}"))),
                Err(c) => {
                    let why = format!("write failed: {e}; cutting the partial frame failed: {c}");
                    self.poison(why.clone());
                    Err(LogError::Flush(why))
                }
            },
        }
    }
}

/// Makes a directory entry change (a created or renamed file) durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
