#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Property-based fuzzing of the identity crate's parsers and checks: SPIFFE IDs and trust
//! domains, bundle JSON, CSRs at the issuer, JWT-SVID verification. Bounded case counts in
//! `cargo test`; `MESHGATE_FUZZ_CASES=N` runs N cases per target.

#[path = "../common/mod.rs"]
mod common;

mod bundle;
mod csr;
mod ids;
mod jwt;
