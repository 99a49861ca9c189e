//! End-to-end tests of the whole mesh: one test binary, modules per area.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod admin_socket;
mod audit_graph;
mod console;
mod console_browser;
mod demo;
mod dns;
mod faults;
mod federation;
mod federation_cli;
mod federation_support;
mod gateway;
mod gateway_cli;
mod gateway_ops;
mod hardening;
mod hardening_limits;
mod identity_cli;
mod pair;
mod policy_cli;
mod policy_prove;
mod procs;
mod protocols;
mod reconnect;
mod relay;
mod support;
mod traces;
mod traffic;
mod traffic_cli;
mod tunnel_attacks;
mod witness_rollback;
