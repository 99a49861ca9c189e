//! Errors of the federation crate.

/// Why a federation operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FederationError {
    /// The sled state could not be read or written.
    #[error("federation state: {0}")]
    Store(#[from] sled::Error),
    /// A stored or received document is not valid JSON of the expected shape.
    #[error("federation state is not readable: {0}")]
    Encoding(String),
    /// A link names a trust domain or SPIFFE ID that does not parse.
    #[error("invalid trust domain `{value}`: {reason}")]
    TrustDomain {
        /// What was given.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// A bootstrap or received bundle was refused.
    #[error("bundle of `{trust_domain}` refused: {reason}")]
    Bundle {
        /// Whose bundle.
        trust_domain: String,
        /// Why.
        reason: String,
    },
    /// A link is malformed (no gateway address and no DNS name, a duplicate cluster name).
    #[error("invalid link `{cluster}`: {reason}")]
    Link {
        /// The peer cluster named by the link.
        cluster: String,
        /// Why.
        reason: String,
    },
    /// No link exists for this trust domain or cluster.
    #[error("no federation link for `{0}`")]
    NoSuchLink(String),
    /// The link is the local cluster itself.
    #[error("`{0}` is this cluster's own trust domain; a link joins two different clusters")]
    SelfLink(String),
    /// A DNS name for gateway discovery is malformed or could not be resolved.
    #[error("gateway discovery for `{name}` failed: {reason}")]
    Discovery {
        /// The DNS name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The mesh DNS server could not start.
    #[error("mesh DNS: {0}")]
    Dns(String),
}

impl FederationError {
    pub(crate) fn encoding(e: impl std::fmt::Display) -> Self {
        Self::Encoding(e.to_string())
    }
}
