//! A fault-injecting UDP relay for the test harness (the kernel here has no `netem`): put it
//! between two gateways and it adds delay, loss and reordering, or black-holes the path for
//! a while and then heals. Loopback only; it stops when dropped.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// What the relay does to each datagram, in both directions.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Added to every datagram.
    pub delay: Duration,
    /// Probability of dropping a datagram (0.0–1.0).
    pub loss: f64,
    /// Probability of holding a datagram back an extra `delay` (reordering).
    pub reorder: f64,
    /// Drop everything while set.
    pub blackout: bool,
}

/// Counters of what the relay did.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayStats {
    pub forwarded: u64,
    pub dropped: u64,
}

pub struct Relay {
    front: SocketAddr,
    faults: Arc<Mutex<Faults>>,
    stats: Arc<Mutex<RelayStats>>,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Relays datagrams from one client (the first to send) to `target` and back.
    pub async fn start(target: SocketAddr) -> Relay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        back.connect(target).await.unwrap();
        let faults = Arc::new(Mutex::new(Faults::default()));
        let stats = Arc::new(Mutex::new(RelayStats::default()));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let addr = front.local_addr().unwrap();
        let (f, b, fl, st, cl) = (
            front.clone(),
            back.clone(),
            faults.clone(),
            stats.clone(),
            client.clone(),
        );
        let forward = async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, from)) = f.recv_from(&mut buf).await else {
                    break;
                };
                *cl.lock().unwrap() = Some(from);
                let packet = buf[..n].to_vec();
                let b = b.clone();
                pass(&fl, &st, async move {
                    let _ = b.send(&packet).await;
                });
            }
        };
        let (f, b, fl, st, cl) = (
            front.clone(),
            back.clone(),
            faults.clone(),
            stats.clone(),
            client,
        );
        let backward = async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok(n) = b.recv(&mut buf).await else { break };
                let Some(to) = *cl.lock().unwrap() else {
                    continue;
                };
                let packet = buf[..n].to_vec();
                let f = f.clone();
                pass(&fl, &st, async move {
                    let _ = f.send_to(&packet, to).await;
                });
            }
        };
        let task = tokio::spawn(async move {
            tokio::join!(forward, backward);
        });
        Relay {
            front: addr,
            faults,
            stats,
            task,
        }
    }

    /// The address to dial instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.front
    }

    pub fn set(&self, faults: Faults) {
        *self.faults.lock().unwrap() = faults;
    }

    pub fn stats(&self) -> RelayStats {
        *self.stats.lock().unwrap()
    }
}

/// Applies the current faults to one datagram: drop it, or send it now or later.
fn pass(
    faults: &Mutex<Faults>,
    stats: &Mutex<RelayStats>,
    send: impl Future<Output = ()> + Send + 'static,
) {
    let f = *faults.lock().unwrap();
    if f.blackout || (f.loss > 0.0 && rand_unit() < f.loss) {
        stats.lock().unwrap().dropped += 1;
        return;
    }
    stats.lock().unwrap().forwarded += 1;
    let mut delay = f.delay;
    if f.reorder > 0.0 && rand_unit() < f.reorder {
        delay += f.delay.max(Duration::from_millis(5));
    }
    if delay.is_zero() {
        tokio::spawn(send);
    } else {
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            send.await;
        });
    }
}

/// A uniform number in [0, 1) from the std hasher's random keys (no rand dependency here).
fn rand_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}
