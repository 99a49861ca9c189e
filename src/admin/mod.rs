//! The admin API: a Unix socket in the state directory (`STATE/admin.sock`, mode 0600)
//! through which CLI commands that need state reach a running gateway (CONTRACTS.md,
//! "Process and state"). Without a running gateway, the CLI opens the state directly and
//! runs the same logic ([`ops`]).
//!
//! # Protocol
//! One connection per command. The client writes one JSON line (at most 64 KiB):
//! `{"command":"<name>","args":{…}}`. The server answers with zero or more item lines
//! `{"item":…}` (streamed answers: `audit.query`, `audit.export`) and exactly one final line,
//! `{"ok":true,"result":…}` or `{"ok":false,"error":{"kind":"bad_request|input|unauthorized|internal","message":"…"}}`.
//! Only the gateway's own uid (or root) is served (`SO_PEERCRED`); the request line must
//! arrive within 10 s. Every accepted command is first recorded in the decision log as an
//! admin event (`who` = `uid:<n> (<name>)`, `what` = `AdminCommand::describe`); if that
//! record cannot be written, the command is refused.
//!
//! # Adding a command
//! 1. Define its arguments as a serde struct and implement [`protocol::AdminCommand`] for it (wire
//!    `NAME` like `federation.add`, the `Reply` type, and `describe` for the admin event).
//!    Built-in ones are in [`commands`]; another part may keep its own next to its CLI.
//! 2. Register a handler before the server starts: `registry.add(move |cmd: MyCmd, items| …)`
//!    (the gateway command builds the [`Registry`] in `src/cli/gateway.rs`). Handlers run on a
//!    blocking thread; they may stream items with `items.send(&x)`.
//! 3. In the CLI: `if let Some(client) = AdminClient::live(&state)? { client.call(&MyCmd {…}) }`,
//!    otherwise run the same logic on the directly opened state.

pub mod client;
pub mod commands;
pub mod ops;
pub mod protocol;
pub mod server;

pub use client::AdminClient;
pub use ops::{AdminContext, builtin};
pub use server::{AdminServer, Registry};
