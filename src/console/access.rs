//! Who may view the console, and as whom a view is recorded.
//!
//! - `mtls`: HTTPS with the gateway's listener certificate. A client certificate is
//!   optional at the handshake (so a browser without one gets a page that says what is
//!   missing, not a TLS alert), but one that is presented must be an X.509-SVID that chains
//!   to a trust domain this gateway trusts (its own, or a linked peer's), or the handshake
//!   fails. Without one every request is 401; with one, the console policy decides each
//!   view (403 otherwise).
//! - `insecure_loopback`: plain HTTP on a loopback address (refused otherwise at config
//!   load), no authentication. The `Host` header must name a loopback address or
//!   `localhost`, so a web page cannot reach the console through DNS rebinding. A view is
//!   recorded with the connecting user's uid when the kernel tells it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use meshgate_identity::{
    BundleSet, Issuer, ListenerCert, PeerAuthorizer, SpiffeClientVerifier, SpiffeId,
    SvidCertResolver,
};

use crate::exit::{CliResult, ResultExt};

/// The server side of the mTLS mode, and the task that keeps its certificate fresh.
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub renewal: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

/// A TLS acceptor serving the gateway's listener certificate (its SVID with the configured
/// DNS names and IPs, renewed like the gateway's own) and verifying client SVIDs against
/// `bundles` (the trust domains this gateway trusts, kept current by federation).
pub fn tls(
    issuer: &Arc<Issuer>,
    bundles: BundleSet,
    dns_names: Vec<String>,
    ips: Vec<IpAddr>,
    ttl: std::time::Duration,
) -> CliResult<Tls> {
    let cert = ListenerCert {
        id: SpiffeId::gateway(issuer.trust_domain()),
        dns_names,
        ips,
        ttl,
    };
    let svid = cert.issue(issuer, SystemTime::now()).internal_err()?;
    let resolver = Arc::new(SvidCertResolver::new(&svid).internal_err()?);
    let verifier =
        SpiffeClientVerifier::new(bundles, PeerAuthorizer::Any).client_auth_mandatory(false);
    let mut config =
        rustls::ServerConfig::builder_with_provider(meshgate_identity::crypto_provider())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .internal_err()?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Every connection presents (and has verified) its certificate: no resumed sessions, so
    // a viewer's expired or no longer trusted SVID is not carried over from an old handshake.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Tls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        renewal: Box::pin(cert.keep_renewed(issuer.clone(), resolver)),
    })
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub enum Viewer {
    /// A verified client X.509-SVID.
    Svid(SpiffeId),
    /// An mTLS connection without a client certificate: refused (401).
    Anonymous,
    /// The unauthenticated loopback mode: recorded as this description.
    Loopback(String),
}

impl Viewer {
    /// How the viewer is named in the page and in the decision log.
    pub fn who(&self) -> String {
        match self {
            Self::Svid(id) => id.to_string(),
            Self::Anonymous => "(no client certificate)".to_owned(),
            Self::Loopback(who) => who.clone(),
        }
    }
}

/// The viewer of a loopback connection: `console (loopback 127.0.0.1:PORT, uid:N (name))`.
pub fn loopback_viewer(peer: SocketAddr, local: SocketAddr) -> Viewer {
    let uid = socket_uid(peer, local)
        .map(|u| format!(", {}", crate::admin::server::who(u)))
        .unwrap_or_default();
    Viewer::Loopback(format!("loopback {peer}{uid}"))
}

/// The uid owning the client end of a loopback TCP connection, from `/proc/net/tcp{,6}`
/// (its `local_address` is our peer and its `rem_address` us). `None` when not found.
fn socket_uid(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    use std::io::BufRead;
    let file = if peer.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    let (want_local, want_remote) = (proc_addr(peer), proc_addr(local));
    let reader = std::io::BufReader::new(std::fs::File::open(file).ok()?);
    for line in reader.lines().skip(1).take(1_000_000) {
        let line = line.ok()?;
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 7 && f[1] == want_local && f[2] == want_remote {
            return f[7].parse().ok();
        }
    }
    None
}

/// An address as `/proc/net/tcp` writes it: the address's 32-bit words in host order, hex.
fn proc_addr(a: SocketAddr) -> String {
    let mut out = String::new();
    match a.ip() {
        IpAddr::V4(v4) => out.push_str(&format!("{:08X}", u32::from_ne_bytes(v4.octets()))),
        IpAddr::V6(v6) => {
            for word in v6.octets().chunks(4) {
                let w = [word[0], word[1], word[2], word[3]];
                out.push_str(&format!("{:08X}", u32::from_ne_bytes(w)));
            }
        }
    }
    out.push_str(&format!(":{:04X}", a.port()));
    out
}

/// Whether a `Host` header names this machine's loopback (`localhost`, `127.x.y.z`,
/// `[::1]`, with or without a port): the loopback mode's guard against DNS rebinding.
pub fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, tail)) if tail.is_empty() || tail.starts_with(':') => ip,
            _ => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_host_names_pass() {
        for ok in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:1",
            "127.9.9.9",
            "[::1]:443",
            "[::1]",
            "LOCALHOST",
        ] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:80",
            "10.0.0.1",
            "[::2]:1",
            "localhost.evil.example",
            "",
            "[::1]x",
        ] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn the_kernel_names_the_user_of_a_loopback_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(local).unwrap();
        let (_server, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let me = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m));
        assert_eq!(socket_uid(peer, local), me.ok());
        match loopback_viewer(peer, local) {
            Viewer::Loopback(who) => {
                assert!(who.starts_with(&format!("loopback {peer}, uid:")), "{who}")
            }
            other => panic!("{other:?}"),
        }
    }
}
