//! [`IssuerError`]: why an issuer operation failed.

use crate::ca::CaError;
use crate::jwt::JwtSvidError;

/// Why an issuer operation failed. [`IssuerError::is_input`] tells bad input (the caller's
/// fault, nothing changed) from internal failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IssuerError {
    /// The state holds no trust domain yet.
    #[error("no trust domain initialised in this state; run `meshgate identity init`")]
    NotInitialised,
    /// `init` on a state that already holds a trust domain.
    #[error("this state already holds trust domain `{trust_domain}`; refusing to overwrite it")]
    AlreadyInitialised {
        /// The trust domain found.
        trust_domain: String,
    },
    /// The sled database failed.
    #[error("state database error: {reason}")]
    Storage {
        /// sled's message.
        reason: String,
    },
    /// A key file could not be written or read.
    #[error("key file `{path}`: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// Stored state is inconsistent or unreadable.
    #[error("identity state is corrupt: {reason}")]
    Corrupt {
        /// What is wrong.
        reason: String,
    },
    /// The SPIFFE ID belongs to another trust domain.
    #[error("SPIFFE ID `{id}` is outside trust domain `{trust_domain}`")]
    ForeignTrustDomain {
        /// The refused ID.
        id: String,
        /// This issuer's trust domain.
        trust_domain: String,
    },
    /// The SPIFFE ID has no path: no SVID names a trust domain itself.
    #[error("SPIFFE ID `{id}` has no path; SVIDs are issued to workloads, not trust domains")]
    TrustDomainId {
        /// The refused ID.
        id: String,
    },
    /// The ID is reserved for the trust domain's gateway; no workload may be registered
    /// under it.
    #[error("SPIFFE ID `{id}` is reserved for the gateway: it cannot be registered or issued")]
    ReservedId {
        /// The refused ID.
        id: String,
    },
    /// A TTL out of range.
    #[error("TTL {reason}")]
    BadTtl {
        /// What is wrong.
        reason: String,
    },
    /// A DNS name that cannot go into a SAN.
    #[error("DNS name `{name}` is not valid")]
    BadDnsName {
        /// The refused name.
        name: String,
    },
    /// A CSR that cannot be read, whose signature does not verify with its own key, or whose
    /// key is not EC P-256.
    #[error("CSR refused: {reason}")]
    BadCsr {
        /// What is wrong.
        reason: String,
    },
    /// The CSR asks for another SPIFFE ID than the one it may get.
    #[error("CSR asks for `{requested}`, but this caller may only get `{expected}`")]
    CsrIdMismatch {
        /// The ID in the CSR.
        requested: String,
        /// The ID the token or caller is bound to.
        expected: String,
    },
    /// The join token is not known.
    #[error("join token is not known")]
    UnknownToken,
    /// The join token was already redeemed.
    #[error("join token was already used")]
    TokenUsed,
    /// The join token's expiry has passed.
    #[error("join token expired")]
    TokenExpired,
    /// No registration entry for the SPIFFE ID.
    #[error("no registration entry for `{id}`")]
    NoSuchEntry {
        /// The ID looked up.
        id: String,
    },
    /// A registration entry for the SPIFFE ID exists already.
    #[error("a registration entry for `{id}` exists already")]
    EntryExists {
        /// The ID.
        id: String,
    },
    /// `rotate activate` without a prepared root.
    #[error("no prepared root to activate; run `rotate prepare` first")]
    NothingPrepared,
    /// `rotate prepare` while a prepared root waits for activation.
    #[error("root generation {generation} is already prepared; activate it first")]
    AlreadyPrepared {
        /// The waiting generation.
        generation: u32,
    },
    /// Certificate construction failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// JWT-SVID minting failed.
    #[error(transparent)]
    Jwt(#[from] JwtSvidError),
}

impl IssuerError {
    /// Whether the error is the caller's (malformed or refused input; no state changed), as
    /// opposed to an internal or I/O failure.
    pub fn is_input(&self) -> bool {
        !matches!(
            self,
            Self::Storage { .. }
                | Self::KeyFile { .. }
                | Self::Corrupt { .. }
                | Self::Ca(CaError::Rcgen(_))
        )
    }
}

impl From<sled::Error> for IssuerError {
    fn from(e: sled::Error) -> Self {
        Self::Storage {
            reason: e.to_string(),
        }
    }
}

impl From<sled::transaction::TransactionError<IssuerError>> for IssuerError {
    fn from(e: sled::transaction::TransactionError<IssuerError>) -> Self {
        match e {
            sled::transaction::TransactionError::Abort(e) => e,
            sled::transaction::TransactionError::Storage(e) => e.into(),
        }
    }
}
