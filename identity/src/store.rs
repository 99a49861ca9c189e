//! Persistence of the issuer: sled trees (all named `identity.*`) and PKCS#8 key files.
//!
//! ```text
//! identity.meta      trust_domain -> name; sequence -> u64 BE; max_not_after/<gen> -> u64 BE
//! identity.roots     <gen u32 BE> -> RootRecord (JSON)
//! identity.serials   <serial hex> -> SerialRecord (JSON)
//! identity.entries   <spiffe id> -> RegistrationEntry (JSON)
//! identity.tokens    <sha256(token) hex> -> TokenRecord (JSON)
//! keys/identity-root-<gen>.key.pem, keys/identity-jwt-<gen>.key.pem   (0600)
//! ```

use std::path::{Path, PathBuf};

use rcgen::KeyPair;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::error::IssuerError;
use crate::files::{read_private, write_atomic};

pub(crate) const META_TRUST_DOMAIN: &[u8] = b"trust_domain";
pub(crate) const META_SEQUENCE: &[u8] = b"sequence";

/// The issuer's sled trees.
#[derive(Debug, Clone)]
pub(crate) struct Trees {
    pub db: sled::Db,
    pub meta: sled::Tree,
    pub roots: sled::Tree,
    pub serials: sled::Tree,
    pub entries: sled::Tree,
    pub tokens: sled::Tree,
}

impl Trees {
    pub fn open(db: &sled::Db) -> Result<Self, IssuerError> {
        Ok(Self {
            db: db.clone(),
            meta: db.open_tree("identity.meta")?,
            roots: db.open_tree("identity.roots")?,
            serials: db.open_tree("identity.serials")?,
            entries: db.open_tree("identity.entries")?,
            tokens: db.open_tree("identity.tokens")?,
        })
    }
}

/// Where a root is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootState {
    /// In the bundle, not signing yet.
    Prepared,
    /// In the bundle and signing.
    Active,
    /// In the bundle until its last SVID expires; not signing.
    Retired,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RootRecord {
    pub generation: u32,
    pub state: RootState,
    /// Base64 (standard) DER of the root certificate.
    pub cert: String,
    pub created_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SerialRecord {
    pub spiffe_id: String,
    pub generation: u32,
    pub not_before: u64,
    pub not_after: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TokenRecord {
    pub spiffe_id: String,
    pub expires_at: u64,
    pub created_at: u64,
    pub used_at: Option<u64>,
}

pub(crate) fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, IssuerError> {
    serde_json::to_vec(value).map_err(|e| IssuerError::Corrupt {
        reason: e.to_string(),
    })
}

pub(crate) fn from_json<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, IssuerError> {
    serde_json::from_slice(bytes).map_err(|e| IssuerError::Corrupt {
        reason: format!("{what}: {e}"),
    })
}

pub(crate) fn u64_value(bytes: Option<sled::IVec>) -> u64 {
    bytes
        .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map_or(0, u64::from_be_bytes)
}

pub(crate) fn max_not_after_key(generation: u32) -> Vec<u8> {
    format!("max_not_after/{generation}").into_bytes()
}

/// Key file paths of a root generation.
pub(crate) fn root_key_path(keys_dir: &Path, generation: u32) -> PathBuf {
    keys_dir.join(format!("identity-root-{generation}.key.pem"))
}

pub(crate) fn jwt_key_path(keys_dir: &Path, generation: u32) -> PathBuf {
    keys_dir.join(format!("identity-jwt-{generation}.key.pem"))
}

/// Writes a key pair as PKCS#8 PEM, 0600, atomically.
pub(crate) fn write_key(path: &Path, key: &KeyPair) -> Result<(), IssuerError> {
    write_atomic(path, key.serialize_pem().as_bytes(), 0o600).map_err(|e| IssuerError::KeyFile {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Reads a PKCS#8 PEM key pair, refusing files readable by others.
pub(crate) fn read_key(path: &Path) -> Result<KeyPair, IssuerError> {
    let key_err = |reason: String| IssuerError::KeyFile {
        path: path.display().to_string(),
        reason,
    };
    let bytes = read_private(path).map_err(|e| key_err(e.to_string()))?;
    let pem = String::from_utf8(bytes).map_err(|_| key_err("not UTF-8 PEM".into()))?;
    KeyPair::from_pem(&pem).map_err(|e| key_err(e.to_string()))
}
