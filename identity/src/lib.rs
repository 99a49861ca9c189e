//! SPIFFE identities for meshgate.
