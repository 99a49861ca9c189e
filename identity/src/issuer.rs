//! [`Issuer`]: a trust domain's CA over the state's sled database and `keys/` directory.
//! Issues X.509-SVIDs (key generated here, or from a CSR) and JWT-SVIDs, serves the bundle,
//! and rotates its root in two steps.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::EncodingKey;
use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::bundle::{JwtPublicKey, TrustBundle};
use crate::ca::{self, BACKDATE, LeafSpec};
use crate::error::IssuerError;
use crate::files::{from_unix_secs, unix_secs};
use crate::id::{SpiffeId, TrustDomain};
use crate::jwt;
use crate::store::{
    self, META_SEQUENCE, META_TRUST_DOMAIN, RootRecord, RootState, SerialRecord, Trees,
};
use crate::svid::{JwtSvid, X509Svid};

/// Default X.509-SVID lifetime.
pub const DEFAULT_X509_TTL: Duration = Duration::from_secs(3600);
/// Default JWT-SVID lifetime.
pub const DEFAULT_JWT_TTL: Duration = Duration::from_secs(300);
/// Longest X.509-SVID lifetime the issuer grants.
pub const MAX_X509_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Longest JWT-SVID lifetime the issuer grants.
pub const MAX_JWT_TTL: Duration = Duration::from_secs(3600);
/// The refresh hint published in the bundle.
pub const BUNDLE_REFRESH_HINT: Duration = Duration::from_secs(300);

/// One root generation, loaded.
struct Root {
    generation: u32,
    state: RootState,
    created_at: u64,
    cert: CertificateDer<'static>,
    not_after: SystemTime,
    signer: rcgen::Issuer<'static, KeyPair>,
    jwt_key: EncodingKey,
    jwt_public: JwtPublicKey,
    kid: String,
    /// The latest expiry of anything signed by this generation (unix seconds).
    max_not_after: AtomicU64,
}

struct Roots {
    /// Sorted by generation.
    list: Vec<Root>,
    sequence: u64,
}

impl Roots {
    fn active(&self) -> Result<&Root, IssuerError> {
        self.list
            .iter()
            .find(|r| r.state == RootState::Active)
            .ok_or_else(|| IssuerError::Corrupt {
                reason: "no active root".into(),
            })
    }
}

/// What a rotation step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationStatus {
    /// The generation prepared or activated.
    pub generation: u32,
    /// The bundle's sequence afterwards.
    pub sequence: u64,
}

/// A root generation as shown to operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootInfo {
    /// Generation number, from 1.
    pub generation: u32,
    /// Prepared, active or retired.
    pub state: RootState,
    /// The root's notAfter.
    pub not_after: SystemTime,
    /// The latest expiry of anything it signed.
    pub max_issued_not_after: SystemTime,
}

/// The trust domain's CA.
pub struct Issuer {
    pub(crate) trees: Trees,
    keys_dir: PathBuf,
    trust_domain: TrustDomain,
    roots: RwLock<Roots>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// Creates the trust domain's CA in `db` and `keys_dir`: a P-256 root and a JWT key,
    /// generation 1. Refuses a state that already holds a trust domain.
    pub fn init(
        db: &sled::Db,
        keys_dir: &Path,
        td: TrustDomain,
        now: SystemTime,
    ) -> Result<Issuer, IssuerError> {
        let trees = Trees::open(db)?;
        if let Some(existing) = trees.meta.get(META_TRUST_DOMAIN)? {
            return Err(IssuerError::AlreadyInitialised {
                trust_domain: String::from_utf8_lossy(&existing).into_owned(),
            });
        }
        let record = create_generation(keys_dir, &td, 1, RootState::Active, now)?;
        trees
            .roots
            .insert(1u32.to_be_bytes(), store::to_json(&record)?)?;
        trees.meta.insert(META_SEQUENCE, &1u64.to_be_bytes())?;
        // The trust domain goes last: a crash before it leaves a state `init` can redo.
        trees
            .meta
            .insert(META_TRUST_DOMAIN, td.as_str().as_bytes())?;
        db.flush()?;
        tracing::info!(trust_domain = %td, "trust domain initialised");
        Self::open(db, keys_dir)
    }

    /// Opens the CA of an initialised state, loading and checking every root's keys.
    pub fn open(db: &sled::Db, keys_dir: &Path) -> Result<Issuer, IssuerError> {
        let trees = Trees::open(db)?;
        let td = trees
            .meta
            .get(META_TRUST_DOMAIN)?
            .ok_or(IssuerError::NotInitialised)?;
        let td: TrustDomain = std::str::from_utf8(&td)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| IssuerError::Corrupt {
                reason: "stored trust domain is invalid".into(),
            })?;
        let sequence = store::u64_value(trees.meta.get(META_SEQUENCE)?);
        let mut list = Vec::new();
        for item in trees.roots.iter() {
            let (_, value) = item?;
            let record: RootRecord = store::from_json(&value, "root record")?;
            let max = store::u64_value(
                trees
                    .meta
                    .get(store::max_not_after_key(record.generation))?,
            );
            list.push(load_root(keys_dir, &record, max)?);
        }
        list.sort_by_key(|r| r.generation);
        let roots = Roots { list, sequence };
        roots.active()?;
        Ok(Issuer {
            trees,
            keys_dir: keys_dir.to_path_buf(),
            trust_domain: td,
            roots: RwLock::new(roots),
        })
    }

    /// This CA's trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    fn read(&self) -> RwLockReadGuard<'_, Roots> {
        // A panic while holding the lock cannot leave `Roots` half-updated (every update
        // persists first, then swaps fields), so a poisoned lock is still consistent.
        self.roots
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Roots> {
        self.roots
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn check_id(&self, id: &SpiffeId) -> Result<(), IssuerError> {
        if id.trust_domain() != &self.trust_domain {
            return Err(IssuerError::ForeignTrustDomain {
                id: id.to_string(),
                trust_domain: self.trust_domain.to_string(),
            });
        }
        if id.is_trust_domain_id() {
            return Err(IssuerError::TrustDomainId { id: id.to_string() });
        }
        Ok(())
    }

    /// Issues an X.509-SVID with a fresh P-256 key pair. `dns_names` and `ip_addrs` go into
    /// extra SANs (only for listener certificates that standard clients verify by name).
    pub fn issue_x509_svid(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        dns_names: &[String],
        ip_addrs: &[IpAddr],
        now: SystemTime,
    ) -> Result<X509Svid, IssuerError> {
        self.check_id(id)?;
        check_ttl(ttl, MAX_X509_TTL)?;
        check_dns_names(dns_names)?;
        let key = ca::generate_key()?;
        let chain = self.sign(id, &key, ttl, dns_names, ip_addrs, now)?;
        let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        X509Svid::from_parts(chain, Some(pkcs8)).map_err(|e| IssuerError::Corrupt {
            reason: e.to_string(),
        })
    }

    /// Signs an X.509-SVID for the key in a PKCS#10 CSR (DER). The CSR's signature must
    /// verify with its own key (EC P-256); if it names a URI SAN, it must be `expected`.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        expected: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<X509Svid, IssuerError> {
        self.sign_csr_with_names(csr_der, expected, ttl, &[], now)
    }

    pub(crate) fn sign_csr_with_names(
        &self,
        csr_der: &[u8],
        expected: &SpiffeId,
        ttl: Duration,
        dns_names: &[String],
        now: SystemTime,
    ) -> Result<X509Svid, IssuerError> {
        self.check_id(expected)?;
        check_ttl(ttl, MAX_X509_TTL)?;
        check_dns_names(dns_names)?;
        let public_key = crate::csr::check_csr(csr_der, expected)?;
        let chain = self.sign(expected, &public_key, ttl, dns_names, &[], now)?;
        X509Svid::from_parts(chain, None).map_err(|e| IssuerError::Corrupt {
            reason: e.to_string(),
        })
    }

    /// Signs with the active root, records the serial and flushes before returning.
    fn sign(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        ttl: Duration,
        dns_names: &[String],
        ip_addrs: &[IpAddr],
        now: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, IssuerError> {
        let roots = self.read();
        let root = roots.active()?;
        let not_after = (now + ttl).min(root.not_after);
        if not_after <= now {
            return Err(IssuerError::Corrupt {
                reason: "the active root has expired; rotate it".into(),
            });
        }
        let not_before = now.checked_sub(BACKDATE).unwrap_or(now);
        let serial = self.reserve_serial(id, root.generation, not_before, not_after)?;
        let spec = LeafSpec {
            id,
            dns_names,
            ip_addrs,
            serial: &serial,
            not_before,
            not_after,
        };
        let leaf = ca::sign_leaf(&spec, public_key, &root.signer)?;
        self.note_expiry(root, not_after)?;
        self.trees.db.flush()?;
        Ok(vec![leaf])
    }

    /// Records a fresh random serial (never reusing one) before the certificate exists, so a
    /// crash between signing and answering loses no serial.
    fn reserve_serial(
        &self,
        id: &SpiffeId,
        generation: u32,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<u8>, IssuerError> {
        let record = SerialRecord {
            spiffe_id: id.to_string(),
            generation,
            not_before: unix_secs(not_before),
            not_after: unix_secs(not_after),
        };
        let value = store::to_json(&record)?;
        for _ in 0..4 {
            let serial = ca::random_serial();
            let key = hex::encode(&serial);
            if self
                .trees
                .serials
                .compare_and_swap(key, None as Option<&[u8]>, Some(value.clone()))?
                .is_ok()
            {
                return Ok(serial);
            }
        }
        Err(IssuerError::Corrupt {
            reason: "could not draw an unused serial".into(),
        })
    }

    fn note_expiry(&self, root: &Root, not_after: SystemTime) -> Result<(), IssuerError> {
        let secs = unix_secs(not_after);
        if root.max_not_after.fetch_max(secs, Ordering::AcqRel) < secs {
            self.trees
                .meta
                .fetch_and_update(store::max_not_after_key(root.generation), |old| {
                    let old = store::u64_value(old.map(sled::IVec::from));
                    Some(old.max(secs).to_be_bytes().to_vec())
                })?;
            // Pruning reads this after a restart: a lost update would drop a root that still
            // verifies live SVIDs. It changes rarely (only when the maximum moves).
            self.trees.meta.flush()?;
        }
        Ok(())
    }

    /// Mints a JWT-SVID (ES256, `kid` of the active generation's JWT key).
    pub fn mint_jwt_svid(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<JwtSvid, IssuerError> {
        self.mint_jwt_svid_amr(id, audience, &[], ttl, now)
    }

    /// Mints a JWT-SVID that also says how the subject authenticated (`amr`, RFC 8176):
    /// the gateway uses it to carry "this caller used mTLS" across the tunnel, signed.
    pub fn mint_jwt_svid_amr(
        &self,
        id: &SpiffeId,
        audience: &[String],
        amr: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<JwtSvid, IssuerError> {
        self.check_id(id)?;
        check_ttl(ttl, MAX_JWT_TTL)?;
        let roots = self.read();
        let root = roots.active()?;
        let svid = jwt::mint(&root.jwt_key, &root.kid, id, audience, amr, ttl, now)?;
        self.note_expiry(root, svid.expiry)?;
        Ok(svid)
    }

    /// The current bundle: every root still held (prepared, active, retired but needed) and
    /// their JWT keys. Does not prune: see [`Issuer::bundle_at`].
    pub fn bundle(&self) -> TrustBundle {
        let roots = self.read();
        let certs = roots.list.iter().map(|r| r.cert.clone()).collect();
        let keys = roots
            .list
            .iter()
            .map(|r| (r.kid.clone(), r.jwt_public.clone()));
        // Every root was accepted as a trust anchor when loaded, and kids are distinct
        // hashes of distinct keys; should that ever fail, publish nothing rather than panic.
        TrustBundle::new(
            self.trust_domain.clone(),
            certs,
            keys,
            roots.sequence,
            Some(BUNDLE_REFRESH_HINT),
        )
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot assemble the bundle");
            TrustBundle::empty(self.trust_domain.clone(), roots.sequence)
        })
    }

    /// The bundle's current sequence number (cheap: no bundle is built).
    pub fn bundle_sequence(&self) -> u64 {
        self.read().sequence
    }

    /// Prunes retired roots no longer needed at `now`, then returns [`Issuer::bundle`].
    pub fn bundle_at(&self, now: SystemTime) -> Result<TrustBundle, IssuerError> {
        self.prune(now)?;
        Ok(self.bundle())
    }

    /// Removes retired roots whose last SVID (X.509 or JWT) has expired at `now`, deleting
    /// their keys. Returns how many were removed.
    pub fn prune(&self, now: SystemTime) -> Result<usize, IssuerError> {
        let now_s = unix_secs(now);
        let mut roots = self.write();
        let gone: Vec<u32> = roots
            .list
            .iter()
            .filter(|r| {
                r.state == RootState::Retired && r.max_not_after.load(Ordering::Acquire) < now_s
            })
            .map(|r| r.generation)
            .collect();
        if gone.is_empty() {
            return Ok(0);
        }
        let sequence = roots.sequence + 1;
        for g in &gone {
            self.trees.roots.remove(g.to_be_bytes())?;
        }
        self.trees
            .meta
            .insert(META_SEQUENCE, &sequence.to_be_bytes())?;
        self.trees.db.flush()?;
        roots.list.retain(|r| !gone.contains(&r.generation));
        roots.sequence = sequence;
        for g in &gone {
            for path in [
                store::root_key_path(&self.keys_dir, *g),
                store::jwt_key_path(&self.keys_dir, *g),
            ] {
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot delete retired key");
                }
            }
            tracing::info!(generation = g, "retired root pruned from the bundle");
        }
        Ok(gone.len())
    }

    /// Rotation step 1: adds a new root (and JWT key) to the bundle without signing with it.
    pub fn rotate_prepare(&self, now: SystemTime) -> Result<RotationStatus, IssuerError> {
        let mut roots = self.write();
        if let Some(p) = roots.list.iter().find(|r| r.state == RootState::Prepared) {
            return Err(IssuerError::AlreadyPrepared {
                generation: p.generation,
            });
        }
        let generation = roots.list.iter().map(|r| r.generation).max().unwrap_or(0) + 1;
        let record = create_generation(
            &self.keys_dir,
            &self.trust_domain,
            generation,
            RootState::Prepared,
            now,
        )?;
        let root = load_root(&self.keys_dir, &record, 0)?;
        let sequence = roots.sequence + 1;
        self.trees
            .roots
            .insert(generation.to_be_bytes(), store::to_json(&record)?)?;
        self.trees
            .meta
            .insert(META_SEQUENCE, &sequence.to_be_bytes())?;
        self.trees.db.flush()?;
        roots.list.push(root);
        roots.sequence = sequence;
        tracing::info!(generation, sequence, "root prepared");
        Ok(RotationStatus {
            generation,
            sequence,
        })
    }

    /// Rotation step 2: the prepared root becomes the signer; the previous one is retired and
    /// stays in the bundle until everything it signed has expired.
    pub fn rotate_activate(&self, _now: SystemTime) -> Result<RotationStatus, IssuerError> {
        let mut roots = self.write();
        let prepared = roots
            .list
            .iter()
            .position(|r| r.state == RootState::Prepared)
            .ok_or(IssuerError::NothingPrepared)?;
        let active = roots.list.iter().position(|r| r.state == RootState::Active);
        let sequence = roots.sequence + 1;
        let mut batch = sled::Batch::default();
        for (idx, state) in [
            (Some(prepared), RootState::Active),
            (active, RootState::Retired),
        ] {
            let Some(idx) = idx else { continue };
            let r = &roots.list[idx];
            let record = RootRecord {
                generation: r.generation,
                state,
                cert: STANDARD.encode(&r.cert),
                created_at: r.created_at,
            };
            batch.insert(&r.generation.to_be_bytes(), store::to_json(&record)?);
        }
        self.trees.roots.apply_batch(batch)?;
        self.trees
            .meta
            .insert(META_SEQUENCE, &sequence.to_be_bytes())?;
        self.trees.db.flush()?;
        if let Some(a) = active {
            roots.list[a].state = RootState::Retired;
        }
        roots.list[prepared].state = RootState::Active;
        roots.sequence = sequence;
        let generation = roots.list[prepared].generation;
        tracing::info!(generation, sequence, "root activated");
        Ok(RotationStatus {
            generation,
            sequence,
        })
    }

    /// The root generations held.
    pub fn roots(&self) -> Vec<RootInfo> {
        self.read()
            .list
            .iter()
            .map(|r| RootInfo {
                generation: r.generation,
                state: r.state,
                not_after: r.not_after,
                max_issued_not_after: from_unix_secs(r.max_not_after.load(Ordering::Acquire)),
            })
            .collect()
    }
}

fn check_ttl(ttl: Duration, max: Duration) -> Result<(), IssuerError> {
    if ttl < Duration::from_secs(1) {
        return Err(IssuerError::BadTtl {
            reason: "must be at least 1s".into(),
        });
    }
    if ttl > max {
        return Err(IssuerError::BadTtl {
            reason: format!("must be at most {}s", max.as_secs()),
        });
    }
    Ok(())
}

pub(crate) fn check_dns_names(names: &[String]) -> Result<(), IssuerError> {
    match names.iter().find(|n| !ca::valid_dns_name(n)) {
        Some(bad) => Err(IssuerError::BadDnsName { name: bad.clone() }),
        None => Ok(()),
    }
}

/// Generates and writes the keys of a new generation; returns its record (not yet stored).
fn create_generation(
    keys_dir: &Path,
    td: &TrustDomain,
    generation: u32,
    state: RootState,
    now: SystemTime,
) -> Result<RootRecord, IssuerError> {
    let root_key = ca::generate_key()?;
    let jwt_key = ca::generate_key()?;
    let cert = ca::root_certificate(td, generation, &root_key, now)?;
    store::write_key(&store::root_key_path(keys_dir, generation), &root_key)?;
    store::write_key(&store::jwt_key_path(keys_dir, generation), &jwt_key)?;
    Ok(RootRecord {
        generation,
        state,
        cert: STANDARD.encode(&cert),
        created_at: unix_secs(now),
    })
}

fn load_root(
    keys_dir: &Path,
    record: &RootRecord,
    max_not_after: u64,
) -> Result<Root, IssuerError> {
    let corrupt = |reason: String| IssuerError::Corrupt {
        reason: format!("root {}: {reason}", record.generation),
    };
    let der = STANDARD
        .decode(&record.cert)
        .map_err(|_| corrupt("certificate is not base64".into()))?;
    let cert = CertificateDer::from(der);
    let (_, parsed) = X509Certificate::from_der(&cert).map_err(|e| corrupt(e.to_string()))?;
    let not_after =
        from_unix_secs(u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0));
    let root_key = store::read_key(&store::root_key_path(keys_dir, record.generation))?;
    if root_key.subject_public_key_info() != parsed.public_key().raw {
        return Err(corrupt(
            "the key file does not match the certificate".into(),
        ));
    }
    let signer =
        rcgen::Issuer::from_ca_cert_der(&cert, root_key).map_err(|e| corrupt(e.to_string()))?;
    let jwt_pair = store::read_key(&store::jwt_key_path(keys_dir, record.generation))?;
    let jwt_public = JwtPublicKey::from_point(jwt_pair.public_key_raw())
        .ok_or_else(|| corrupt("the JWT key is not P-256".into()))?;
    let jwt_key = EncodingKey::from_ec_der(&jwt_pair.serialize_der());
    Ok(Root {
        generation: record.generation,
        state: record.state,
        created_at: record.created_at,
        kid: jwt_public.kid(),
        cert,
        not_after,
        signer,
        jwt_key,
        jwt_public,
        max_not_after: AtomicU64::new(max_not_after),
    })
}
