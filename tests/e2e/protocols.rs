//! What a service speaks decides what reaches it (review finding: `CONNECT` into an HTTP
//! service). Performed as an attacker would, end to end through two gateways.

use std::sync::{Arc, Mutex};

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::{Client, Cluster, Spec, service, tcp_service};

const WEST: &str = r#"
@id("shop-uses-open")
permit (principal in Namespace::"east.example/shop", action, resource == Service::"open.shop.west");

@id("shop-uses-db")
permit (principal in Namespace::"east.example/shop", action, resource == Service::"db.shop.west");

@id("no-admin")
forbid (principal, action, resource) when { context.path like "/admin*" };
"#;

/// A TCP upstream that records every byte it is sent (and answers nothing).
async fn recorder() -> (std::net::SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                    // Echo, so the caller knows its bytes arrived.
                    if tcp.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn connect_into_an_http_service_is_refused_and_reaches_nothing() {
    let (open_addr, open_seen) = recorder().await;
    let (db_addr, db_seen) = recorder().await;
    let mut db = tcp_service("db", "shop", db_addr, &["east"]);
    db.proxy_protocol = true;
    let west = Cluster::start(Spec {
        name: "west",
        policies: WEST,
        services: vec![service("open", "shop", open_addr, &["east"]), db],
        default_quota: None,
    })
    .await;
    let east = Cluster::start(Spec {
        name: "east",
        policies: "@id(\"none\") forbid (principal, action, resource);",
        services: vec![],
        default_quota: None,
    })
    .await;
    west.link(&east, &["open.shop", "db.shop"]);
    east.link(&west, &[]);
    let client = Client::new(&east, Some(&east.svid("/ns/shop/sa/web")), &[b"http/1.1"]);

    // The attack: a tunnel into the HTTP service, then a raw request with a forged caller,
    // to a path a policy forbids. The tunnel is refused, nothing reaches the upstream.
    let Err(err) = client.connect_tunnel("open.shop.west.mesh:80").await else {
        panic!("CONNECT into an HTTP service must be refused");
    };
    assert!(err.contains("403"), "{err}");
    assert!(
        open_seen.lock().unwrap().is_empty(),
        "bytes reached the upstream"
    );
    // The refusal is on record at west, naming why.
    let refusal = west
        .log
        .query(&meshgate_policy::Filter::default())
        .unwrap()
        .into_iter()
        .find(|r| r.method == "CONNECT")
        .expect("the refused CONNECT is recorded");
    assert_eq!(refusal.status, Some(403));
    assert!(
        refusal.errors[0].contains("is an HTTP service"),
        "{refusal:?}"
    );

    // Plain HTTP to the TCP service is refused too (it would bypass `connect`).
    let reply = client.get("db.shop.west.mesh", "/").await.unwrap();
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert!(
        reply.text().contains("is a TCP service"),
        "{}",
        reply.text()
    );
    assert!(db_seen.lock().unwrap().is_empty());

    // CONNECT to the TCP service works, and its upstream learns the verified caller from
    // the PROXY v2 header (never from bytes the caller controls).
    let mut tunnel = client
        .connect_tunnel("db.shop.west.mesh:5432")
        .await
        .unwrap();
    let line = b"x-meshgate-caller: spiffe://west.example/ns/ops/sa/root\n";
    tunnel.write_all(line).await.unwrap();
    // The recorder echoes what it got: the PROXY header (16 bytes, a 36-byte and a 32-byte
    // TLV) and the line. Once all of it is back, all of it arrived.
    let mut echoed = vec![0u8; 16 + 3 + 36 + 3 + 32 + line.len()];
    tunnel.read_exact(&mut echoed).await.unwrap();
    let seen = db_seen.lock().unwrap().clone();
    assert_eq!(
        &seen[..12],
        b"\r\n\r\n\0\r\nQUIT\n",
        "PROXY v2 signature first"
    );
    let header_len = 16 + usize::from(u16::from_be_bytes([seen[14], seen[15]]));
    let header = &seen[..header_len];
    let caller = b"spiffe://east.example/ns/shop/sa/web";
    assert!(
        header.windows(caller.len()).any(|w| w == caller),
        "the verified caller is in the PROXY header"
    );
    assert_eq!(&seen[header_len..], line);
}
