//! The state directory of one cluster (CONTRACTS.md, "Process and state").
//!
//! Layout:
//! ```text
//! STATE/            mode 0700
//!   db/             the one sled database (identity, registration, peers)
//!   audit/          the decision log: append-only segment files (see meshgate-policy)
//!   keys/           mode 0700; private keys as PKCS#8 PEM files, mode 0600
//!   admin.sock      the running gateway's admin socket (mode 0600), when one runs
//! ```
//! sled allows one opener per database, so the process opens it once here and hands
//! the `sled::Db` to the crates, which open their own trees in it.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// sled's default cache is 1 GiB; a gateway's working set is a few MiB.
const SLED_CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// An opened state directory.
#[derive(Debug, Clone)]
pub struct State {
    root: PathBuf,
    db: sled::Db,
}

impl State {
    /// Creates a new state directory (mode 0700) with its database. Refuses an existing,
    /// non-empty directory: state is never overwritten.
    pub fn create(root: &Path) -> anyhow::Result<Self> {
        if root.exists() {
            let non_empty = fs::read_dir(root)
                .with_context(|| format!("cannot read `{}`", root.display()))?
                .next()
                .is_some();
            if non_empty {
                bail!(
                    "state directory `{}` already exists and is not empty; refusing to overwrite it",
                    root.display()
                );
            }
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .with_context(|| format!("cannot create state directory `{}`", root.display()))?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set permissions on `{}`", root.display()))?;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(root.join("keys"))
            .with_context(|| format!("cannot create `{}`", root.join("keys").display()))?;
        Self::open_db(root)
    }

    /// Opens an existing state directory.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        if !root.join("db").is_dir() {
            bail!(
                "`{}` is not a meshgate state directory (no `db/` inside); create one with `meshgate identity init`",
                root.display()
            );
        }
        Self::open_db(root)
    }

    fn open_db(root: &Path) -> anyhow::Result<Self> {
        let db = sled::Config::new()
            .path(root.join("db"))
            .cache_capacity(SLED_CACHE_BYTES)
            .open()
            .with_context(|| {
                format!(
                    "cannot open the state database in `{}` (is a gateway running on it?)",
                    root.display()
                )
            })?;
        Ok(Self {
            root: root.to_path_buf(),
            db,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Where private keys live (0700 directory, 0600 files).
    pub fn keys_dir(&self) -> PathBuf {
        self.root.join("keys")
    }

    /// The decision log's directory (segment files, pinned key, anchor).
    pub fn audit_dir(&self) -> PathBuf {
        self.root.join("audit")
    }

    /// The admin socket of a running gateway.
    pub fn admin_socket(&self) -> PathBuf {
        self.root.join("admin.sock")
    }
}
