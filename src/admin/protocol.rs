//! The wire format of the admin socket: one request line, then zero or more item lines and
//! exactly one final line, all JSON, each ending in `\n`.
//!
//! ```text
//! → {"command":"identity.entry.create","args":{"spiffe_id":"spiffe://…","ttl_secs":3600,"dns_names":[]}}
//! ← {"item":{…}}                                   (only for commands that stream: audit query/export)
//! ← {"ok":true,"result":{…}}                       (the command's reply)
//! ← {"ok":false,"error":{"kind":"input","message":"…"}}
//! ```

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The largest request line the server reads (the request is a command and small arguments).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The largest response line the client reads (one item or one final reply).
pub const MAX_RESPONSE_LINE_BYTES: usize = 16 * 1024 * 1024;

/// One typed admin command: its wire name, its arguments (the implementing type) and its
/// reply. The client sends it with `AdminClient::call`, the server registers a handler for
/// it with `Registry::add`.
pub trait AdminCommand: Serialize + DeserializeOwned + Send + 'static {
    /// The wire name, dotted like the CLI path: `identity.entry.create`.
    const NAME: &'static str;
    /// What the command answers.
    type Reply: Serialize + DeserializeOwned + Send + 'static;
    /// What the admin event in the decision log says: the command and its key arguments.
    fn describe(&self) -> String {
        Self::NAME.replace('.', " ")
    }
}

/// A request as it travels: the command's name and its arguments.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The command's wire name.
    pub command: String,
    /// Its arguments (an object; missing means `{}`).
    #[serde(default)]
    pub args: serde_json::Value,
}

/// One line the server sends back.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ResponseLine {
    /// One item of a streamed answer.
    Item {
        /// The item.
        item: serde_json::Value,
    },
    /// The final line.
    Done(Response),
}

/// The final line of an answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    /// Whether the command worked (its answer may still be "no", like a refused reload).
    pub ok: bool,
    /// The reply, when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Why not, when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<AdminError>,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Self {
        Self {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn err(error: AdminError) -> Self {
        Self {
            ok: false,
            result: None,
            error: Some(error),
        }
    }
}

/// Why an admin request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request line is not a request: not JSON, too large, unknown command, bad arguments.
    BadRequest,
    /// The arguments are well-formed but refused (bad SPIFFE ID, unknown entry): exit 2.
    Input,
    /// The peer is not the gateway's user (or root).
    Unauthorized,
    /// The gateway failed (storage, decision log): exit 3.
    Internal,
}

/// An error as it travels: its kind and a message a person reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminError {
    /// What went wrong, which decides the CLI's exit code.
    pub kind: ErrorKind,
    /// Lowercase, input in backticks.
    pub message: String,
}

impl AdminError {
    pub fn new(kind: ErrorKind, message: impl fmt::Display) -> Self {
        Self {
            kind,
            message: message.to_string(),
        }
    }

    pub fn bad_request(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }

    pub fn input(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Input, message)
    }

    pub fn internal(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AdminError {}
