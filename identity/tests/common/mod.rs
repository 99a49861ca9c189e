//! Shared fixtures: a real issuer over real sled in a temp dir.
#![allow(dead_code)]

use std::time::{Duration, SystemTime};

use meshgate_identity::{Issuer, SpiffeId, TrustDomain};

pub struct Ca {
    pub dir: tempfile::TempDir,
    pub db: sled::Db,
    pub issuer: Issuer,
}

impl Ca {
    pub fn keys_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("keys")
    }
}

pub fn ca(td: &str) -> Ca {
    ca_at(td, SystemTime::now())
}

pub fn ca_at(td: &str, now: SystemTime) -> Ca {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("db"))
        .cache_capacity(1 << 20)
        .open()
        .unwrap();
    let issuer = Issuer::init(&db, &keys, td.parse::<TrustDomain>().unwrap(), now).unwrap();
    Ca { dir, db, issuer }
}

pub fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

pub const HOUR: Duration = Duration::from_secs(3600);
