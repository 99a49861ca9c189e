//! Segment files: the decision log on disk.
//!
//! The log is a directory of append-only segment files, `seg-<first seq, 20 digits>.log`,
//! each starting with a 16-byte header (`MGAUDIT1` and the first sequence number, u64
//! little-endian) followed by frames:
//!
//! | bytes | what |
//! |---|---|
//! | 4 | payload length, u32 little-endian |
//! | 1 | kind: `1` record, `2` checkpoint |
//! | n | payload |
//!
//! A record's payload is `hash (32 bytes) || body` (the canonical encoding of the `record`
//! module). A checkpoint's payload is the signed head in binary: seq (u64 LE), head hash
//! (32 bytes), signature (64 bytes, r‖s), then the RFC 3339 time (a length byte and the
//! text); its public key is the log's pinned key, so a head signed by another key does not
//! verify. A frame is written with one `write(2)`; a frame cut short at the end of the last
//! segment is a write that never completed (nothing acknowledged it) and is dropped when the
//! writer opens the log, while anything else that does not parse is reported by `verify`.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use super::signer::{Checkpoint, CheckpointKind};

/// The segment header's magic bytes.
pub(crate) const MAGIC: &[u8; 8] = b"MGAUDIT1";
/// Header: magic and the first sequence number.
pub(crate) const HEADER_LEN: u64 = 16;
/// Frame header: payload length and kind.
pub(crate) const FRAME_HEADER: usize = 5;
/// No frame is larger (a record carries at most a few KiB of bounded request facts).
pub(crate) const MAX_FRAME: usize = 16 << 20;

pub(crate) const KIND_RECORD: u8 = 1;
pub(crate) const KIND_CHECKPOINT: u8 = 2;

/// The file name of the segment whose first record is `first_seq`.
pub(crate) fn segment_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.log")
}

/// The segments in `dir`, by first sequence number.
pub(crate) fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(digits) = name
            .strip_prefix("seg-")
            .and_then(|n| n.strip_suffix(".log"))
        else {
            continue;
        };
        if let Ok(first) = digits.parse::<u64>()
            && digits.len() == 20
        {
            out.push((first, entry.path()));
        }
    }
    out.sort_by_key(|(first, _)| *first);
    Ok(out)
}

/// The 16-byte header of a new segment.
pub(crate) fn header(first_seq: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..].copy_from_slice(&first_seq.to_le_bytes());
    h
}

/// Appends a frame (header and payload) to `buf`.
pub(crate) fn push_frame(buf: &mut Vec<u8>, kind: u8, payload_len: usize) -> usize {
    // Payloads are bounded far below u32::MAX by the callers (MAX_FRAME).
    let len = u32::try_from(payload_len).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.push(kind);
    buf.len()
}

/// A checkpoint's binary payload.
pub(crate) fn encode_checkpoint(cp: &Checkpoint) -> Option<Vec<u8>> {
    let hash = hex::decode(&cp.head_hash).ok()?;
    let sig = hex::decode(&cp.signature).ok()?;
    let time = cp.time.as_bytes();
    if hash.len() != 32 || sig.len() != 64 || time.len() > usize::from(u8::MAX) {
        return None;
    }
    let mut out = Vec::with_capacity(8 + 32 + 64 + 1 + time.len());
    out.extend_from_slice(&cp.seq.to_le_bytes());
    out.extend_from_slice(&hash);
    out.extend_from_slice(&sig);
    out.push(time.len() as u8);
    out.extend_from_slice(time);
    Some(out)
}

/// Decodes a checkpoint payload; `public_key` is the log's pinned key.
pub(crate) fn decode_checkpoint(payload: &[u8], public_key: &str) -> Option<Checkpoint> {
    if payload.len() < 8 + 32 + 64 + 1 {
        return None;
    }
    let seq = u64::from_le_bytes(payload[..8].try_into().ok()?);
    let hash = &payload[8..40];
    let sig = &payload[40..104];
    let time_len = usize::from(payload[104]);
    let time = payload.get(105..105 + time_len)?;
    if payload.len() != 105 + time_len {
        return None;
    }
    Some(Checkpoint {
        seq,
        head_hash: hex::encode(hash),
        time: std::str::from_utf8(time).ok()?.to_owned(),
        public_key: public_key.to_owned(),
        signature: hex::encode(sig),
        kind: CheckpointKind::Checkpoint,
    })
}

/// One frame read back.
#[derive(Debug)]
pub(crate) struct Frame {
    /// Where the frame starts in its file.
    pub offset: u64,
    /// Its kind byte.
    pub kind: u8,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Why reading a segment stopped early.
#[derive(Debug)]
pub(crate) enum ReadStop {
    /// The file ends inside a frame: a write that never completed.
    Torn { offset: u64 },
    /// A frame header that cannot be right (length out of bounds).
    Corrupt { what: String },
    /// The file could not be read.
    Io(io::Error),
}

/// Reads a segment's frames in order.
pub(crate) struct Reader {
    inner: BufReader<File>,
    offset: u64,
    len: u64,
    /// The first sequence number the header names.
    pub first_seq: u64,
}

impl Reader {
    /// Opens a segment and checks its header.
    pub(crate) fn open(path: &Path) -> Result<Reader, ReadStop> {
        let file = File::open(path).map_err(ReadStop::Io)?;
        let len = file.metadata().map_err(ReadStop::Io)?.len();
        let mut inner = BufReader::with_capacity(256 * 1024, file);
        let mut h = [0u8; HEADER_LEN as usize];
        if len < HEADER_LEN {
            return Err(ReadStop::Torn { offset: 0 });
        }
        inner.read_exact(&mut h).map_err(ReadStop::Io)?;
        if &h[..8] != MAGIC {
            return Err(ReadStop::Corrupt {
                what: format!("`{}` is not a decision-log segment", path.display()),
            });
        }
        let first_seq = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        Ok(Reader {
            inner,
            offset: HEADER_LEN,
            len,
            first_seq,
        })
    }

    /// The next frame, `Ok(None)` at a clean end.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame>, ReadStop> {
        let offset = self.offset;
        let remaining = self.len - offset;
        if remaining == 0 {
            return Ok(None);
        }
        if remaining < FRAME_HEADER as u64 {
            return Err(ReadStop::Torn { offset });
        }
        let mut h = [0u8; FRAME_HEADER];
        self.inner.read_exact(&mut h).map_err(ReadStop::Io)?;
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let kind = h[4];
        if len == 0 || len > MAX_FRAME {
            return Err(ReadStop::Corrupt {
                what: format!("frame at byte {offset} has an impossible length {len}"),
            });
        }
        if remaining < (FRAME_HEADER + len) as u64 {
            return Err(ReadStop::Torn { offset });
        }
        let mut payload = vec![0u8; len];
        self.inner.read_exact(&mut payload).map_err(ReadStop::Io)?;
        self.offset = offset + (FRAME_HEADER + len) as u64;
        Ok(Some(Frame {
            offset,
            kind,
            payload,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_in_binary() {
        let (signer, _) = crate::CheckpointSigner::generate().unwrap();
        let cp = signer
            .sign(7, &"ab".repeat(32), "2026-01-02T03:04:05.123456789Z")
            .unwrap();
        let bytes = encode_checkpoint(&cp).unwrap();
        let back = decode_checkpoint(&bytes, signer.public_key_hex()).unwrap();
        assert_eq!(back, cp);
        assert!(back.signature_valid());
        // Another key cannot pass for the pinned one.
        let (other, _) = crate::CheckpointSigner::generate().unwrap();
        assert!(
            !decode_checkpoint(&bytes, other.public_key_hex())
                .unwrap()
                .signature_valid()
        );
        assert!(decode_checkpoint(&bytes[..bytes.len() - 1], signer.public_key_hex()).is_none());
    }

    #[test]
    fn names_sort_by_first_seq() {
        let dir = tempfile::tempdir().unwrap();
        for first in [11u64, 2, 100] {
            std::fs::write(dir.path().join(segment_name(first)), header(first)).unwrap();
        }
        std::fs::write(dir.path().join("seg-x.log"), b"").unwrap();
        std::fs::write(dir.path().join("anchor.json"), b"{}").unwrap();
        let firsts: Vec<u64> = list(dir.path()).unwrap().into_iter().map(|s| s.0).collect();
        assert_eq!(firsts, [2, 11, 100]);
    }
}
