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

    /// The 32-byte secret in `keys/NAME` (mode 0600), created from the OS's random source
    /// on first use. A file readable by others, or of another length, is refused.
    pub fn secret(&self, name: &str) -> anyhow::Result<[u8; 32]> {
        let path = self.keys_dir().join(name);
        match meshgate_identity::read_private(&path) {
            Ok(bytes) => <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
                anyhow::anyhow!(
                    "`{}` holds {} bytes, a secret is 32; remove it to have a new one made",
                    path.display(),
                    bytes.len()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret: [u8; 32] = rand::random();
                write_private(&path, &secret)?;
                Ok(secret)
            }
            Err(e) => Err(e).with_context(|| format!("cannot read `{}`", path.display())),
        }
    }

    /// The decision log's directory (segment files, pinned key, anchor).
    pub fn audit_dir(&self) -> PathBuf {
        Self::audit_dir_in(&self.root)
    }

    /// The decision log's directory of the state at `root`, which need not be opened: the
    /// log's files are readable while a gateway holds the database.
    pub fn audit_dir_in(root: &Path) -> PathBuf {
        root.join("audit")
    }

    /// The admin socket of a running gateway.
    pub fn admin_socket(&self) -> PathBuf {
        self.root.join("admin.sock")
    }
}

/// Writes a private file (0600) atomically.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    meshgate_identity::write_atomic(path, bytes, 0o600)
        .with_context(|| format!("cannot write `{}`", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_made_once_private_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let state = State::create(&tmp.path().join("state")).unwrap();
        let first = state.secret("s.key").unwrap();
        assert_eq!(state.secret("s.key").unwrap(), first);
        let path = state.keys_dir().join("s.key");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_ne!(state.secret("other.key").unwrap(), first);

        fs::write(&path, b"short").unwrap();
        let err = format!("{:#}", state.secret("s.key").unwrap_err());
        assert!(err.contains("holds 5 bytes"), "{err}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = format!("{:#}", state.secret("s.key").unwrap_err());
        assert!(err.contains("readable by the owner only"), "{err}");
    }
}
