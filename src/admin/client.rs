//! The CLI's side of the admin socket: find a live gateway, send one command, read its
//! items and reply. Blocking (the CLI commands are synchronous).

use std::io::{BufRead, BufReader, ErrorKind as IoKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::anyhow;
use serde_json::Value;

use super::protocol::{
    AdminCommand, AdminError, ErrorKind, MAX_RESPONSE_LINE_BYTES, Request, ResponseLine,
};
use crate::exit::{CliError, CliResult};

/// The socket's file name inside the state directory.
pub const SOCKET_FILE: &str = "admin.sock";

/// How long the client waits for the next line (a verify of a large log takes a while).
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

/// A connection to a live gateway's admin socket.
#[derive(Debug)]
pub struct AdminClient {
    path: PathBuf,
    /// The connection made while probing, used by the first call.
    probe: Mutex<Option<UnixStream>>,
}

impl From<AdminError> for CliError {
    fn from(e: AdminError) -> Self {
        match e.kind {
            ErrorKind::Input => CliError::input(anyhow!(e.message)),
            ErrorKind::BadRequest | ErrorKind::Unauthorized | ErrorKind::Internal => {
                CliError::internal(anyhow!(e.message))
            }
        }
    }
}

impl AdminClient {
    /// The running gateway of state directory `state`, or `None` when none answers (no
    /// socket, or a stale socket file): the caller then opens the state directly.
    pub fn live(state: &Path) -> CliResult<Option<Self>> {
        let path = state.join(SOCKET_FILE);
        match UnixStream::connect(&path) {
            Ok(stream) => Ok(Some(Self {
                path,
                probe: Mutex::new(Some(stream)),
            })),
            Err(e) if matches!(e.kind(), IoKind::NotFound | IoKind::ConnectionRefused) => Ok(None),
            Err(e) => Err(CliError::internal(anyhow!(
                "cannot reach the gateway's admin socket `{}`: {e}",
                path.display()
            ))),
        }
    }

    /// Sends `cmd` and returns its reply, ignoring streamed items.
    pub fn call<C: AdminCommand>(&self, cmd: &C) -> CliResult<C::Reply> {
        self.call_streaming(cmd, |_| Ok(()))
    }

    /// Sends `cmd`, hands each streamed item to `on_item`, and returns the final reply.
    pub fn call_streaming<C: AdminCommand>(
        &self,
        cmd: &C,
        mut on_item: impl FnMut(Value) -> CliResult<()>,
    ) -> CliResult<C::Reply> {
        let unreachable = |e: std::io::Error| {
            CliError::internal(anyhow!(
                "cannot talk to the gateway on `{}`: {e}",
                self.path.display()
            ))
        };
        let probe = self
            .probe
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let mut stream = match probe {
            Some(s) => s,
            None => UnixStream::connect(&self.path).map_err(unreachable)?,
        };
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(unreachable)?;
        let request = Request {
            command: C::NAME.to_owned(),
            args: serde_json::to_value(cmd).map_err(CliError::internal)?,
        };
        let mut text = serde_json::to_vec(&request).map_err(CliError::internal)?;
        text.push(b'\n');
        stream.write_all(&text).map_err(unreachable)?;
        let mut reader = BufReader::new(stream);
        loop {
            let mut buf = Vec::new();
            (&mut reader)
                .take(MAX_RESPONSE_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut buf)
                .map_err(unreachable)?;
            if buf.is_empty() {
                return Err(CliError::internal(anyhow!(
                    "the gateway closed the admin connection before answering `{}`",
                    C::NAME
                )));
            }
            if buf.len() > MAX_RESPONSE_LINE_BYTES {
                return Err(CliError::internal(anyhow!(
                    "the gateway's answer to `{}` has a line over {MAX_RESPONSE_LINE_BYTES} bytes",
                    C::NAME
                )));
            }
            let line: ResponseLine = serde_json::from_slice(&buf).map_err(|e| {
                CliError::internal(anyhow!("the gateway's answer is not understood: {e}"))
            })?;
            match line {
                ResponseLine::Item { item } => on_item(item)?,
                ResponseLine::Done(response) => {
                    if let Some(e) = response.error {
                        return Err(e.into());
                    }
                    let result = response.result.unwrap_or(Value::Null);
                    return serde_json::from_value(result).map_err(|e| {
                        CliError::internal(anyhow!(
                            "the gateway's reply to `{}` is not understood: {e}",
                            C::NAME
                        ))
                    });
                }
            }
        }
    }
}
