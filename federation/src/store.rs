//! The federation's sled trees, all prefixed `federation.`:
//!
//! | tree | key | value |
//! |---|---|---|
//! | `federation.links` | peer trust domain | [`Link`] JSON |
//! | `federation.peers` | peer trust domain | [`PeerState`] JSON |
//! | `federation.witness` | peer trust domain, `0x00`, seq (u64 BE) | the peer's signed checkpoint JSON |
//! | `federation.witness` | peer trust domain, `0x01` | the peer's pinned checkpoint key (hex) |
//! | `federation.config` | peer trust domain | empty: the link came from the config file at the last start |
//!
//! The config file is the declarative truth for the links it names: a link that was in it
//! at the last start and is not any more is removed at the next start. Links added at run
//! time (`federation add`) are not in `federation.config` and stay until removed.
//!
//! Every write is flushed before it is acknowledged: cached peer state must survive a crash.

use std::collections::{BTreeMap, BTreeSet};

use meshgate_policy::Checkpoint;

use crate::error::FederationError;
use crate::link::{Link, PeerState};

/// The federation trees of one state database.
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    links: sled::Tree,
    peers: sled::Tree,
    witness: sled::Tree,
    config: sled::Tree,
}

impl Store {
    /// Opens (creates) the trees in `db`.
    pub fn open(db: &sled::Db) -> Result<Self, FederationError> {
        Ok(Self {
            db: db.clone(),
            links: db.open_tree("federation.links")?,
            peers: db.open_tree("federation.peers")?,
            witness: db.open_tree("federation.witness")?,
            config: db.open_tree("federation.config")?,
        })
    }

    /// Every link, by trust domain.
    pub fn links(&self) -> Result<BTreeMap<String, Link>, FederationError> {
        read_all(&self.links)
    }

    /// Adds or replaces a link.
    pub fn put_link(&self, link: &Link) -> Result<(), FederationError> {
        let json = serde_json::to_vec(link).map_err(FederationError::encoding)?;
        self.links.insert(link.trust_domain.as_bytes(), json)?;
        self.db.flush()?;
        Ok(())
    }

    /// The trust domains whose links came from the config file at the last start.
    pub fn config_links(&self) -> Result<BTreeSet<String>, FederationError> {
        self.config
            .iter()
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k?).into_owned()))
            .collect()
    }

    /// Records which links come from the config file now.
    pub fn set_config_links(&self, tds: &BTreeSet<String>) -> Result<(), FederationError> {
        for old in self.config_links()? {
            if !tds.contains(&old) {
                self.config.remove(old.as_bytes())?;
            }
        }
        for td in tds {
            self.config.insert(td.as_bytes(), &[])?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// Adds a link without a running federation (`meshgate federation add` on the state):
    /// the bootstrap bundle replaces the cached one whatever its sequence (the operator's
    /// bundle is authoritative), and the operator's adding it counts as confirming it at `now`.
    pub fn add_link(&self, link: &Link, now: std::time::SystemTime) -> Result<(), FederationError> {
        let mut link = link.clone();
        let (_, bundle) = link.normalize()?;
        let mut state = self.peers()?.remove(&link.trust_domain).unwrap_or_default();
        // The operator's bundle is authoritative, whatever was cached.
        state.set_bundle(&bundle, now);
        state.confirmed_at = Some(crate::link::unix(now));
        self.put_link(&link)?;
        self.put_peer(&link.trust_domain, &state)
    }

    /// Removes a link and everything known about the peer. Returns whether it existed.
    pub fn remove_link(&self, td: &str) -> Result<bool, FederationError> {
        let existed = self.links.remove(td.as_bytes())?.is_some();
        self.peers.remove(td.as_bytes())?;
        self.db.flush()?;
        Ok(existed)
    }

    /// The last known state of every peer.
    pub fn peers(&self) -> Result<BTreeMap<String, PeerState>, FederationError> {
        read_all(&self.peers)
    }

    /// Stores a peer's state.
    pub fn put_peer(&self, td: &str, state: &PeerState) -> Result<(), FederationError> {
        let json = serde_json::to_vec(state).map_err(FederationError::encoding)?;
        self.peers.insert(td.as_bytes(), json)?;
        self.db.flush()?;
        Ok(())
    }

    /// The checkpoints of `td`'s decision log held here, oldest first.
    pub fn witnessed(&self, td: &str) -> Result<Vec<Checkpoint>, FederationError> {
        let mut prefix = td.as_bytes().to_vec();
        prefix.push(0);
        self.witness
            .scan_prefix(&prefix)
            .map(|item| {
                let (_, v) = item?;
                serde_json::from_slice(&v).map_err(FederationError::encoding)
            })
            .collect()
    }

    /// The latest `n` checkpoints of `td`'s log held here, oldest first.
    pub fn witnessed_recent(&self, td: &str, n: usize) -> Result<Vec<Checkpoint>, FederationError> {
        let mut prefix = td.as_bytes().to_vec();
        prefix.push(0);
        let mut recent: Vec<Checkpoint> = self
            .witness
            .scan_prefix(&prefix)
            .rev()
            .take(n)
            .map(|item| {
                let (_, v) = item?;
                serde_json::from_slice(&v).map_err(FederationError::encoding)
            })
            .collect::<Result<_, _>>()?;
        recent.reverse();
        Ok(recent)
    }

    /// The checkpoints of `td`'s log held here at the sequence numbers `seqs`, plus the latest
    /// one held: what admitting offered heads needs, read without the whole history.
    pub fn witnessed_for(
        &self,
        td: &str,
        seqs: impl IntoIterator<Item = u64>,
    ) -> Result<Vec<Checkpoint>, FederationError> {
        let mut held = self.witnessed_recent(td, 1)?;
        for seq in seqs {
            let mut k = td.as_bytes().to_vec();
            k.push(0);
            k.extend_from_slice(&seq.to_be_bytes());
            if let Some(v) = self.witness.get(k)? {
                held.push(serde_json::from_slice(&v).map_err(FederationError::encoding)?);
            }
        }
        Ok(held)
    }

    /// The checkpoint key pinned for `td`.
    pub fn witness_key(&self, td: &str) -> Result<Option<String>, FederationError> {
        let mut key = td.as_bytes().to_vec();
        key.push(1);
        Ok(self
            .witness
            .get(key)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Appends checkpoints (already admitted by the witness rules) and pins the key.
    pub fn append_witnessed(
        &self,
        td: &str,
        key: &str,
        checkpoints: &[Checkpoint],
    ) -> Result<(), FederationError> {
        let mut batch = sled::Batch::default();
        let mut pin = td.as_bytes().to_vec();
        pin.push(1);
        batch.insert(pin, key.as_bytes());
        for cp in checkpoints {
            let mut k = td.as_bytes().to_vec();
            k.push(0);
            k.extend_from_slice(&cp.seq.to_be_bytes());
            let json = serde_json::to_vec(cp).map_err(FederationError::encoding)?;
            batch.insert(k, json);
        }
        self.witness.apply_batch(batch)?;
        // No synchronous flush here (this runs on the async runtime, once a second per peer):
        // sled writes its log to disk within its flush interval (500 ms), so a crash of this
        // process loses at most the heads of the last half second, which the peer pushes again.
        Ok(())
    }
}

fn read_all<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
) -> Result<BTreeMap<String, T>, FederationError> {
    tree.iter()
        .map(|item| {
            let (k, v) = item?;
            let value = serde_json::from_slice(&v).map_err(FederationError::encoding)?;
            Ok((String::from_utf8_lossy(&k).into_owned(), value))
        })
        .collect()
}
