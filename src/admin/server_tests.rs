//! Tests of the admin socket server: replies, streaming, admin events, socket mode and
//! lifecycle, malformed and oversized requests.

use std::os::unix::fs::PermissionsExt;

use meshgate_policy::{DecisionKind, Filter};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::*;
use crate::admin::AdminClient;

/// A test command: streams `count` items, then answers with the text.
#[derive(Debug, Serialize, Deserialize)]
struct Echo {
    text: String,
    count: u32,
}

impl AdminCommand for Echo {
    const NAME: &'static str = "test.echo";
    type Reply = String;
    fn describe(&self) -> String {
        format!("test echo `{}`", self.text)
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    log: Arc<DecisionLog>,
    server: AdminServer,
}

async fn start() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let log =
        Arc::new(DecisionLog::open(&dir.path().join("audit"), None, Default::default()).unwrap());
    let mut registry = Registry::new();
    registry.add(|cmd: Echo, items| {
        for i in 0..cmd.count {
            items.send(&i)?;
        }
        if cmd.text == "bad" {
            return Err(AdminError::input("`bad` is refused"));
        }
        Ok(cmd.text)
    });
    let server = AdminServer::bind(&dir.path().join("admin.sock"), registry, log.clone())
        .await
        .unwrap();
    Fixture { dir, log, server }
}

/// Sends raw bytes and reads the one final line.
async fn raw(path: &Path, bytes: &[u8]) -> Response {
    let mut stream = UnixStream::connect(path).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut lines = BufReader::new(stream).lines();
    let line = lines.next_line().await.unwrap().unwrap();
    serde_json::from_str(&line).unwrap()
}

async fn echo(path: &Path, text: &str, count: u32) -> (Vec<u32>, Result<String, String>) {
    let dir = path.parent().unwrap().to_path_buf();
    let text = text.to_owned();
    tokio::task::spawn_blocking(move || {
        let client = AdminClient::live(&dir).unwrap().expect("a live server");
        let mut items = Vec::new();
        let reply = client.call_streaming(&Echo { text, count }, |item| {
            items.push(serde_json::from_value(item).unwrap());
            Ok(())
        });
        (items, reply.map_err(|e| e.to_string()))
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn answers_streams_and_records_the_admin_event() {
    let f = start().await;
    let (items, reply) = echo(f.server.path(), "hello", 3).await;
    assert_eq!(items, vec![0, 1, 2]);
    assert_eq!(reply.unwrap(), "hello");
    let (_, refused) = echo(f.server.path(), "bad", 0).await;
    assert_eq!(refused.unwrap_err(), "`bad` is refused");
    let events = f
        .log
        .query(&Filter {
            decision: Some(DecisionKind::Admin),
            ..Filter::default()
        })
        .unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].action, "test echo `hello`");
    assert!(events[0].principal.starts_with("uid:"), "{events:?}");
}

#[tokio::test]
async fn socket_is_owner_only_and_removed_on_shutdown() {
    let f = start().await;
    let path = f.server.path().to_path_buf();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    f.server.shutdown().await;
    assert!(!path.exists());
    // No live server any more: the client falls back.
    assert!(AdminClient::live(f.dir.path()).unwrap().is_none());
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_clean_errors_and_the_server_survives() {
    let f = start().await;
    let path = f.server.path();
    let r = raw(path, b"not json\n").await;
    let e = r.error.unwrap();
    assert_eq!(e.kind, ErrorKind::BadRequest);
    assert!(e.message.contains("not a JSON request"), "{e:?}");

    let big = vec![b'x'; MAX_REQUEST_BYTES + 10];
    let e = raw(path, &big).await.error.unwrap();
    assert_eq!(e.kind, ErrorKind::BadRequest);
    assert!(e.message.contains("larger than"), "{e:?}");

    let e = raw(path, b"{\"command\":\"nope\"}\n").await.error.unwrap();
    assert_eq!(e.message, "unknown command `nope`");

    let e = raw(path, b"{\"command\":\"test.echo\",\"args\":{\"text\":1}}\n")
        .await
        .error
        .unwrap();
    assert_eq!(e.kind, ErrorKind::BadRequest);
    assert!(e.message.contains("bad arguments for `test.echo`"), "{e:?}");

    // Still serving, and nothing malformed was recorded as an admin action.
    assert_eq!(echo(path, "still here", 0).await.1.unwrap(), "still here");
    assert_eq!(f.log.head().0, 1);
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let f = start().await;
    let path = f.server.path().to_path_buf();
    // A second server on a live socket is refused.
    let err = AdminServer::bind(&path, Registry::new(), f.log.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already answers"), "{err}");
    // A socket file nobody listens on is stale: replaced.
    drop(f.server);
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(stale);
    assert!(path.exists());
    assert!(AdminClient::live(f.dir.path()).unwrap().is_none());
    let server = AdminServer::bind(&path, Registry::new(), f.log.clone())
        .await
        .unwrap();
    let e = raw(&path, b"{\"command\":\"test.echo\"}\n")
        .await
        .error
        .unwrap();
    assert_eq!(e.kind, ErrorKind::BadRequest);
    server.shutdown().await;
    // A file that is not a socket is never removed.
    std::fs::write(&path, b"keep me").unwrap();
    let err = AdminServer::bind(&path, Registry::new(), f.log.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
}
