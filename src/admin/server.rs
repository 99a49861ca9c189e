//! The admin socket server: binds `STATE/admin.sock` (mode 0600), checks each peer's uid,
//! reads one bounded request line, records the admin event, runs the handler on a blocking
//! thread and writes its items and final reply.

use std::collections::HashMap;
use std::fmt;
use std::io::ErrorKind as IoKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use meshgate_policy::DecisionLog;
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use super::protocol::{
    AdminCommand, AdminError, ErrorKind, MAX_REQUEST_BYTES, Request, Response, ResponseLine,
};

/// How long a client may take to send its request line.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one response line may take to be written (a client that stops reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Admin connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 16;
/// Items buffered between a handler and a slow client.
const ITEM_BUFFER: usize = 64;

type Prepared = Box<dyn FnOnce(&mut Items) -> Result<Value, AdminError> + Send>;
type Erased = Arc<dyn Fn(Value) -> Result<(String, Prepared), AdminError> + Send + Sync>;

/// The commands a server answers, by wire name. Built-in ones are added by
/// `handlers::builtin`; other parts (federation) add theirs with [`Registry::add`] before
/// the server starts.
#[derive(Default)]
pub struct Registry {
    handlers: HashMap<&'static str, Erased>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.handlers.keys().collect();
        names.sort();
        f.debug_struct("Registry")
            .field("commands", &names)
            .finish()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the handler of command `C`. It runs on a blocking thread (sled, Cedar and
    /// the decision log block), after the admin event is recorded; it may stream items.
    /// A second handler for the same name replaces the first.
    pub fn add<C: AdminCommand>(
        &mut self,
        handler: impl Fn(C, &mut Items) -> Result<C::Reply, AdminError> + Send + Sync + 'static,
    ) -> &mut Self {
        let handler = Arc::new(handler);
        let erased: Erased = Arc::new(move |args: Value| {
            let args = if args.is_null() {
                Value::Object(serde_json::Map::new())
            } else {
                args
            };
            let cmd: C = serde_json::from_value(args).map_err(|e| {
                AdminError::bad_request(format!("bad arguments for `{}`: {e}", C::NAME))
            })?;
            let what = cmd.describe();
            let handler = handler.clone();
            let run: Prepared = Box::new(move |items: &mut Items| {
                let reply = handler(cmd, items)?;
                serde_json::to_value(reply).map_err(AdminError::internal)
            });
            Ok((what, run))
        });
        self.handlers.insert(C::NAME, erased);
        self
    }
}

/// Where a handler streams items to the client (bounded: a slow client slows the handler).
#[derive(Debug)]
pub struct Items {
    tx: mpsc::Sender<Vec<u8>>,
}

impl Items {
    /// Sends one item; fails when the client went away (the handler should stop).
    pub fn send<T: Serialize>(&mut self, item: &T) -> Result<(), AdminError> {
        let line = line(&serde_json::json!({ "item": item }))?;
        self.tx
            .blocking_send(line)
            .map_err(|_| AdminError::internal("the admin client went away"))
    }
}

/// A running admin socket. [`AdminServer::shutdown`] (or drop) removes the socket file.
#[derive(Debug)]
pub struct AdminServer {
    path: PathBuf,
    inode: (u64, u64),
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

struct Shared {
    registry: Registry,
    log: Arc<DecisionLog>,
    uid: u32,
}

impl AdminServer {
    /// Binds `path` with mode 0600 and starts serving. A socket file already there is
    /// removed only when no server answers on it; a live one is an error.
    pub async fn bind(
        path: &Path,
        registry: Registry,
        log: Arc<DecisionLog>,
    ) -> anyhow::Result<Self> {
        remove_stale(path)?;
        let listener = UnixListener::bind(path)
            .with_context(|| format!("cannot bind the admin socket `{}`", path.display()))?;
        // Before any accept: owner only (the state directory is 0700 as well).
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot set the mode of `{}`", path.display()))?;
        let meta = std::fs::symlink_metadata(path)
            .with_context(|| format!("cannot stat `{}`", path.display()))?;
        let shared = Arc::new(Shared {
            registry,
            log,
            // The socket was just created by this process: its owner is our effective uid.
            uid: meta.uid(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, shared, stop_rx));
        tracing::info!(socket = %path.display(), "admin socket listening");
        Ok(Self {
            path: path.to_path_buf(),
            inode: (meta.dev(), meta.ino()),
            stop,
            task: Some(task),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting and removes the socket file (connections in flight finish).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.remove_socket();
    }

    /// Removes the socket file if it is still the one this server bound.
    fn remove_socket(&self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.inode
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.remove_socket();
    }
}

/// Removes a socket file nobody answers on; refuses a live socket or a non-socket file.
fn remove_stale(path: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == IoKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot stat `{}`", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "`{}` exists and is not a socket; refusing to replace it",
            path.display()
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!(
            "a gateway already answers on `{}`; stop it first",
            path.display()
        ),
        Err(e) if matches!(e.kind(), IoKind::ConnectionRefused | IoKind::NotFound) => {
            tracing::info!(socket = %path.display(), "removing a stale admin socket");
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale socket `{}`", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("cannot probe `{}`", path.display())),
    }
}

async fn accept_loop(listener: UnixListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    serve_connection(stream, &shared).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                // Out of file descriptors and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_connection(stream: UnixStream, shared: &Arc<Shared>) {
    let authorized = authorize(&stream, shared.uid);
    let (read, mut write) = stream.into_split();
    let who = match authorized {
        Ok(who) => who,
        Err(e) => {
            tracing::warn!(error = %e, "admin connection refused");
            let _ = write_line(&mut write, Response::err(e)).await;
            return;
        }
    };
    let request = match tokio::time::timeout(READ_TIMEOUT, read_request(read)).await {
        Ok(Ok(Some(request))) => request,
        // A probe that connects and closes without a request: nothing to answer.
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            let _ = write_line(&mut write, Response::err(e)).await;
            return;
        }
        Err(_) => {
            let e = AdminError::bad_request("no request line within the time limit");
            let _ = write_line(&mut write, Response::err(e)).await;
            return;
        }
    };
    let prepared = shared
        .registry
        .handlers
        .get(request.command.as_str())
        .ok_or_else(|| AdminError::bad_request(format!("unknown command `{}`", request.command)))
        .and_then(|handler| handler(request.args));
    let (what, run) = match prepared {
        Ok(p) => p,
        Err(e) => {
            let _ = write_line(&mut write, Response::err(e)).await;
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(ITEM_BUFFER);
    let log = shared.log.clone();
    let command = request.command;
    let worker = tokio::task::spawn_blocking(move || {
        let mut items = Items { tx };
        let response = match log.append_admin_event(&who, &what, SystemTime::now()) {
            Ok(_) => {
                tracing::info!(who = %who, what = %what, "admin action");
                match run(&mut items) {
                    Ok(result) => Response::ok(result),
                    Err(e) => Response::err(e),
                }
            }
            Err(e) => Response::err(AdminError::internal(format!(
                "cannot record the admin event, so `{command}` is refused: {e}"
            ))),
        };
        if let Ok(l) = line(&response) {
            let _ = items.tx.blocking_send(l);
        }
    });
    while let Some(l) = rx.recv().await {
        match tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&l)).await {
            Ok(Ok(())) => {}
            _ => break,
        }
    }
    // Dropping the receiver makes further `Items::send` fail, so the handler stops.
    drop(rx);
    let _ = worker.await;
}

/// Only the gateway's own user (or root) may use the socket.
fn authorize(stream: &UnixStream, own_uid: u32) -> Result<String, AdminError> {
    let cred = stream
        .peer_cred()
        .map_err(|e| AdminError::internal(format!("cannot read the peer's credentials: {e}")))?;
    let uid = cred.uid();
    if uid != own_uid && uid != 0 {
        return Err(AdminError::new(
            ErrorKind::Unauthorized,
            format!(
                "uid {uid} may not use this gateway's admin socket (only uid {own_uid} or root)"
            ),
        ));
    }
    Ok(who(uid))
}

/// `uid:<n>`, plus the user name from `/etc/passwd` when there is one: `uid:1000 (alice)`.
pub fn who(uid: u32) -> String {
    let name = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                let id = f.nth(1)?;
                (id.parse::<u32>().ok()? == uid).then(|| name.to_owned())
            })
        });
    match name {
        Some(n) if !n.is_empty() => format!("uid:{uid} ({n})"),
        _ => format!("uid:{uid}"),
    }
}

/// Reads one request line of at most [`MAX_REQUEST_BYTES`]; `None` when the peer closed
/// without sending anything.
async fn read_request(
    read: tokio::net::unix::OwnedReadHalf,
) -> Result<Option<Request>, AdminError> {
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut buf = Vec::new();
    reader
        .read_until(b'\n', &mut buf)
        .await
        .map_err(|e| AdminError::bad_request(format!("cannot read the request: {e}")))?;
    if buf.is_empty() {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    }
    if buf.len() > MAX_REQUEST_BYTES {
        return Err(AdminError::bad_request(format!(
            "the request is larger than {MAX_REQUEST_BYTES} bytes"
        )));
    }
    serde_json::from_slice(&buf).map(Some).map_err(|e| {
        AdminError::bad_request(format!("the request is not a JSON request line: {e}"))
    })
}

fn line<T: Serialize>(value: &T) -> Result<Vec<u8>, AdminError> {
    let mut l = serde_json::to_vec(value).map_err(AdminError::internal)?;
    l.push(b'\n');
    Ok(l)
}

async fn write_line(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: Response,
) -> Result<(), AdminError> {
    let l = line(&ResponseLine::Done(response))?;
    tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&l))
        .await
        .map_err(|_| AdminError::internal("write timed out"))?
        .map_err(AdminError::internal)
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
