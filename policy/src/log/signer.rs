//! Checkpoints: the chain head signed with ES256 (ECDSA P-256, SHA-256, fixed r||s).
//!
//! The signed message is the UTF-8 text
//! `meshgate.audit.checkpoint.v1\n<seq>\n<head hash>\n<time>\n<public key hex>` (a prune
//! anchor signs `meshgate.audit.anchor.v1\n…` instead, so neither passes for the other).
//! The public key (uncompressed SEC1 point, hex) is stored with each checkpoint and pinned
//! in the log's meta tree on first use, so a swapped key is reported by verification.

use std::fmt;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use super::LogError;

/// A signed chain head, exportable so it can be held elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The sequence number of the head record (0 for an empty log).
    pub seq: u64,
    /// The head record's hash.
    pub head_hash: String,
    /// When the checkpoint was made (RFC 3339).
    pub time: String,
    /// The signer's public key (uncompressed P-256 point, hex).
    pub public_key: String,
    /// ES256 signature (r||s, hex) over the message in the module docs.
    pub signature: String,
    /// `checkpoint` (a signed head), or `anchor` (the head a pruned log starts after). The
    /// kind is part of the signed message, so a checkpoint cannot be replayed as an anchor.
    #[serde(default, skip_serializing_if = "CheckpointKind::is_checkpoint")]
    pub kind: CheckpointKind,
}

/// What a signed head is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// A periodic signed head.
    #[default]
    Checkpoint,
    /// The anchor a pruned log starts after.
    Anchor,
}

impl CheckpointKind {
    fn is_checkpoint(&self) -> bool {
        *self == CheckpointKind::Checkpoint
    }
}

impl Checkpoint {
    fn message(
        kind: CheckpointKind,
        seq: u64,
        head_hash: &str,
        time: &str,
        public_key: &str,
    ) -> String {
        let label = match kind {
            CheckpointKind::Checkpoint => "checkpoint",
            CheckpointKind::Anchor => "anchor",
        };
        format!("meshgate.audit.{label}.v1\n{seq}\n{head_hash}\n{time}\n{public_key}")
    }

    /// Whether the signature is valid for the embedded public key.
    pub fn signature_valid(&self) -> bool {
        let (Ok(key), Ok(sig)) = (hex::decode(&self.public_key), hex::decode(&self.signature))
        else {
            return false;
        };
        let msg = Self::message(
            self.kind,
            self.seq,
            &self.head_hash,
            &self.time,
            &self.public_key,
        );
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key)
            .verify(msg.as_bytes(), &sig)
            .is_ok()
    }
}

/// The key that signs checkpoints.
pub struct CheckpointSigner {
    key: EcdsaKeyPair,
    public_hex: String,
}

impl fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointSigner")
            .field("public_key", &self.public_hex)
            .finish_non_exhaustive()
    }
}

const PEM_LABEL: &str = "PRIVATE KEY";

impl CheckpointSigner {
    /// Loads a P-256 key from PKCS#8 DER.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, LogError> {
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|e| LogError::Key(format!("not a PKCS#8 P-256 key: {e}")))?;
        let public_hex = hex::encode(key.public_key().as_ref());
        Ok(Self { key, public_hex })
    }

    /// Loads a key from a PKCS#8 PEM document (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, LogError> {
        let begin = format!("-----BEGIN {PEM_LABEL}-----");
        let end = format!("-----END {PEM_LABEL}-----");
        let body = pem
            .split_once(&begin)
            .and_then(|(_, rest)| rest.split_once(&end))
            .map(|(b, _)| b)
            .ok_or_else(|| LogError::Key("no `PRIVATE KEY` PEM block".to_owned()))?;
        let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
        let der = STANDARD
            .decode(b64)
            .map_err(|e| LogError::Key(format!("bad PEM base64: {e}")))?;
        Self::from_pkcs8_der(&der)
    }

    /// Generates a new key; returns it with its PKCS#8 DER encoding (to be stored).
    pub fn generate() -> Result<(Self, Vec<u8>), LogError> {
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|e| LogError::Key(format!("key generation failed: {e}")))?;
        let der = doc.as_ref().to_vec();
        Ok((Self::from_pkcs8_der(&der)?, der))
    }

    /// PEM-encodes PKCS#8 DER.
    pub fn pkcs8_pem(der: &[u8]) -> String {
        let b64 = STANDARD.encode(der);
        let mut out = format!("-----BEGIN {PEM_LABEL}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str(&format!("-----END {PEM_LABEL}-----\n"));
        out
    }

    /// The public key (uncompressed point, hex).
    pub fn public_key_hex(&self) -> &str {
        &self.public_hex
    }

    /// Signs a chain head.
    pub(crate) fn sign(
        &self,
        seq: u64,
        head_hash: &str,
        time: &str,
    ) -> Result<Checkpoint, LogError> {
        self.sign_kind(CheckpointKind::Checkpoint, seq, head_hash, time)
    }

    /// Signs a head of the given kind.
    pub(crate) fn sign_kind(
        &self,
        kind: CheckpointKind,
        seq: u64,
        head_hash: &str,
        time: &str,
    ) -> Result<Checkpoint, LogError> {
        let msg = Checkpoint::message(kind, seq, head_hash, time, &self.public_hex);
        let sig = self
            .key
            .sign(&SystemRandom::new(), msg.as_bytes())
            .map_err(|e| LogError::Key(format!("signing failed: {e}")))?;
        Ok(Checkpoint {
            seq,
            head_hash: head_hash.to_owned(),
            time: time.to_owned(),
            public_key: self.public_hex.clone(),
            signature: hex::encode(sig.as_ref()),
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_pem_and_signatures_verify() {
        let (signer, der) = CheckpointSigner::generate().unwrap();
        let pem = CheckpointSigner::pkcs8_pem(&der);
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let again = CheckpointSigner::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(again.public_key_hex(), signer.public_key_hex());
        let mut cp = signer.sign(3, "ab", "2025-01-01T00:00:00Z").unwrap();
        assert!(cp.signature_valid());
        cp.seq = 4;
        assert!(!cp.signature_valid());
        assert!(CheckpointSigner::from_pkcs8_pem("junk").is_err());
        assert!(CheckpointSigner::from_pkcs8_der(b"junk").is_err());
    }
}
