//! The decisions of federation, free of I/O: which bundle update to accept, how fresh
//! cached peer state is, in which order peers serve a destination, when to sync next, which
//! service names a peer's catalog may bring in.
//! Everything takes `now` (and randomness) as arguments so tests drive it on simulated time.

use std::time::{Duration, SystemTime};

use meshgate_identity::{TrustBundle, TrustDomain};

/// Why a bundle offered by a peer was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleRefusal {
    /// The bundle is for another trust domain than the authenticated peer's.
    #[error("peer `{peer}` may only update its own bundle, not `{offered}`")]
    ForeignTrustDomain {
        /// The authenticated peer gateway's trust domain.
        peer: String,
        /// The trust domain the bundle is for.
        offered: String,
    },
    /// The sequence number does not grow.
    #[error("bundle sequence {offered} is not higher than the held {held}")]
    NotNewer {
        /// The sequence held.
        held: u64,
        /// The sequence offered.
        offered: u64,
    },
    /// The bundle holds no X.509 root: accepting it would cut the link.
    #[error("bundle holds no X.509 root")]
    NoRoots,
    /// The sequence grows by more than [`MAX_SEQUENCE_JUMP`] at once: taking it would lock
    /// out every later genuine update (only an operator's `federation add` could undo it).
    #[error("bundle sequence {offered} jumps more than {MAX_SEQUENCE_JUMP} past the held {held}")]
    SequenceJump {
        /// The sequence held.
        held: u64,
        /// The sequence offered.
        offered: u64,
    },
}

/// The most a peer's `spiffe_sequence` may grow in one update. A meshgate issuer adds one
/// per rotation step (prepare, activate, retire), so a thousand is years of rotations.
pub const MAX_SEQUENCE_JUMP: u64 = 1000;

/// Whether `offered`, received from the authenticated gateway of `peer`, replaces `held`:
/// only for the peer's own trust domain, only with a higher `spiffe_sequence` (by at most
/// [`MAX_SEQUENCE_JUMP`]), never empty.
pub fn accept_bundle(
    peer: &TrustDomain,
    held: Option<&TrustBundle>,
    offered: &TrustBundle,
) -> Result<(), BundleRefusal> {
    if offered.trust_domain() != peer {
        return Err(BundleRefusal::ForeignTrustDomain {
            peer: peer.to_string(),
            offered: offered.trust_domain().to_string(),
        });
    }
    if let Some(held) = held
        && offered.sequence() <= held.sequence()
    {
        return Err(BundleRefusal::NotNewer {
            held: held.sequence(),
            offered: offered.sequence(),
        });
    }
    if let Some(held) = held
        && offered.sequence() - held.sequence() > MAX_SEQUENCE_JUMP
    {
        return Err(BundleRefusal::SequenceJump {
            held: held.sequence(),
            offered: offered.sequence(),
        });
    }
    if offered.x509_roots().is_empty() {
        return Err(BundleRefusal::NoRoots);
    }
    Ok(())
}

/// How usable cached peer state is at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Synced within the refresh window.
    Fresh,
    /// Not synced lately (partition), still within the bundle's validity: keep serving.
    Stale,
    /// The cached bundle expired (all roots past `notAfter`, or not confirmed for longer
    /// than the configured maximum): fail closed for this peer.
    Expired,
}

/// Judges cached peer state. `confirmed` is when the bundle was last fetched or accepted
/// (or the link added); `bundle_not_after` the latest `notAfter` among its roots.
pub fn freshness(
    now: SystemTime,
    confirmed: SystemTime,
    bundle_not_after: Option<SystemTime>,
    stale_after: Duration,
    max_stale: Duration,
) -> Freshness {
    if bundle_not_after.is_none_or(|t| now >= t) {
        return Freshness::Expired;
    }
    let age = now.duration_since(confirmed).unwrap_or_default();
    if age >= max_stale {
        Freshness::Expired
    } else if age >= stale_after {
        Freshness::Stale
    } else {
        Freshness::Fresh
    }
}

/// What route ordering needs to know about one peer serving a destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The peer's cluster name (the final tie-break, for a stable order).
    pub cluster: String,
    /// Configured priority, lower first.
    pub priority: u32,
    /// Whether the last sync with the peer succeeded.
    pub healthy: bool,
    /// Smoothed round-trip time of control requests, if measured.
    pub rtt: Option<Duration>,
}

/// Orders peers: healthy before unhealthy, then by priority, then by measured latency
/// (unmeasured last), then by name. Returns indexes into `candidates`.
pub fn rank(candidates: &[Candidate]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&candidates[a], &candidates[b]);
        b.healthy
            .cmp(&a.healthy)
            .then(a.priority.cmp(&b.priority))
            .then(
                a.rtt
                    .unwrap_or(Duration::MAX)
                    .cmp(&b.rtt.unwrap_or(Duration::MAX)),
            )
            .then(a.cluster.cmp(&b.cluster))
    });
    order
}

/// Folds a new round-trip sample into the smoothed value (EWMA, weight 1/4).
pub fn smooth_rtt(previous: Option<Duration>, sample: Duration) -> Duration {
    match previous {
        None => sample,
        Some(p) => (p * 3 + sample) / 4,
    }
}

/// Refresh timing settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Shortest wait between successful syncs.
    pub min_refresh: Duration,
    /// Longest wait between successful syncs (caps the peer's refresh hint).
    pub max_refresh: Duration,
    /// First wait after a failure; doubles per consecutive failure.
    pub initial_backoff: Duration,
    /// Longest wait after failures.
    pub max_backoff: Duration,
}

/// When to sync next: after a success, the peer's refresh hint clamped to the window;
/// after `failures` consecutive failures, exponential backoff. `jitter` in `[0, 1)` spreads
/// the wait over its upper half (after failures) or its last fifth (after success), so peers
/// do not synchronize.
pub fn next_delay(timing: &Timing, failures: u32, hint: Option<Duration>, jitter: f64) -> Duration {
    let jitter = jitter.clamp(0.0, 1.0);
    if failures == 0 {
        let base = hint.unwrap_or(timing.max_refresh).clamp(
            timing.min_refresh,
            timing.max_refresh.max(timing.min_refresh),
        );
        return base.mul_f64(0.8 + 0.2 * jitter);
    }
    let exp = failures.saturating_sub(1).min(20);
    let base = timing
        .initial_backoff
        .saturating_mul(1u32 << exp)
        .min(timing.max_backoff);
    base.mul_f64(0.5 + 0.5 * jitter)
}

/// The most services taken from one peer's catalog; the rest are skipped.
pub const MAX_IMPORTED_SERVICES: usize = 4096;

/// Whether `name` can be served as `<service>.<namespace>`: two DNS labels (RFC 1123: 1–63
/// of `a-z0-9-`, not starting or ending with `-`), as the gateway resolves them.
pub fn valid_service_name(name: &str) -> bool {
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    matches!(name.split('.').collect::<Vec<_>>().as_slice(), [s, n] if label(s) && label(n))
}

/// The service names of a peer's catalog that can be served: valid names, sorted, without
/// duplicates, at most [`MAX_IMPORTED_SERVICES`]; and those skipped.
pub fn servable_services(names: Vec<String>) -> (Vec<String>, Vec<String>) {
    let (mut good, mut bad): (Vec<String>, Vec<String>) =
        names.into_iter().partition(|n| valid_service_name(n));
    good.sort();
    good.dedup();
    if good.len() > MAX_IMPORTED_SERVICES {
        bad.extend(good.split_off(MAX_IMPORTED_SERVICES));
    }
    (good, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn td(s: &str) -> TrustDomain {
        s.parse().unwrap()
    }

    fn candidate(cluster: &str, priority: u32, healthy: bool, rtt_ms: Option<u64>) -> Candidate {
        Candidate {
            cluster: cluster.into(),
            priority,
            healthy,
            rtt: rtt_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn bundle_refused_for_other_trust_domain_and_old_sequence() {
        let west = td("west.example");
        let east = TrustBundle::empty(td("east.example"), 9);
        assert!(matches!(
            accept_bundle(&west, None, &east),
            Err(BundleRefusal::ForeignTrustDomain { .. })
        ));
        let held = TrustBundle::empty(west.clone(), 5);
        for seq in [4, 5] {
            let offered = TrustBundle::empty(west.clone(), seq);
            assert_eq!(
                accept_bundle(&west, Some(&held), &offered),
                Err(BundleRefusal::NotNewer {
                    held: 5,
                    offered: seq
                })
            );
        }
        let empty = TrustBundle::empty(west.clone(), 6);
        assert_eq!(
            accept_bundle(&west, Some(&held), &empty),
            Err(BundleRefusal::NoRoots)
        );
        // An enormous jump (the compromised peer's move) is refused before anything else is
        // looked at; the largest allowed step is not.
        for seq in [5 + MAX_SEQUENCE_JUMP + 1, u64::MAX] {
            let offered = TrustBundle::empty(west.clone(), seq);
            assert_eq!(
                accept_bundle(&west, Some(&held), &offered),
                Err(BundleRefusal::SequenceJump {
                    held: 5,
                    offered: seq
                })
            );
        }
        let edge = TrustBundle::empty(west.clone(), 5 + MAX_SEQUENCE_JUMP);
        assert_eq!(
            accept_bundle(&west, Some(&held), &edge),
            Err(BundleRefusal::NoRoots),
            "within the bound, only the empty roots refuse it"
        );
    }

    #[test]
    fn freshness_moves_from_fresh_to_stale_to_expired() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let not_after = Some(t0 + 1000 * S);
        let f = |now| freshness(now, t0, not_after, 60 * S, 600 * S);
        assert_eq!(f(t0 + 10 * S), Freshness::Fresh);
        assert_eq!(f(t0 + 60 * S), Freshness::Stale);
        assert_eq!(f(t0 + 599 * S), Freshness::Stale);
        assert_eq!(f(t0 + 600 * S), Freshness::Expired);
        // The bundle's own expiry wins over a long allowance.
        let long = |now| freshness(now, t0, not_after, 60 * S, 100_000 * S);
        assert_eq!(long(t0 + 999 * S), Freshness::Stale);
        assert_eq!(long(t0 + 1000 * S), Freshness::Expired);
        assert_eq!(
            freshness(t0, t0, None, 60 * S, 600 * S),
            Freshness::Expired,
            "a bundle without roots is never usable"
        );
        // A clock that went backwards counts as fresh, not as a panic.
        assert_eq!(f(t0 - 5 * S), Freshness::Fresh);
    }

    #[test]
    fn ranking_prefers_healthy_then_priority_then_latency() {
        let c = vec![
            candidate("a", 1, false, Some(1)),
            candidate("b", 2, true, Some(50)),
            candidate("c", 2, true, Some(5)),
            candidate("d", 1, true, None),
            candidate("e", 2, true, None),
        ];
        let names: Vec<&str> = rank(&c).iter().map(|&i| c[i].cluster.as_str()).collect();
        assert_eq!(names, ["d", "c", "b", "e", "a"]);
    }

    #[test]
    fn rtt_is_smoothed() {
        let ms = Duration::from_millis;
        assert_eq!(smooth_rtt(None, ms(40)), ms(40));
        assert_eq!(smooth_rtt(Some(ms(40)), ms(80)), ms(50));
    }

    #[test]
    fn delays_honour_hints_and_back_off_with_jitter() {
        let t = Timing {
            min_refresh: 5 * S,
            max_refresh: 300 * S,
            initial_backoff: S,
            max_backoff: 60 * S,
        };
        assert_eq!(next_delay(&t, 0, Some(100 * S), 1.0), 100 * S);
        assert_eq!(next_delay(&t, 0, Some(100 * S), 0.0), 80 * S);
        assert_eq!(
            next_delay(&t, 0, Some(S), 1.0),
            5 * S,
            "hint below the floor"
        );
        assert_eq!(
            next_delay(&t, 0, Some(3600 * S), 1.0),
            300 * S,
            "hint capped"
        );
        assert_eq!(next_delay(&t, 0, None, 1.0), 300 * S);
        assert_eq!(next_delay(&t, 1, None, 1.0), S);
        assert_eq!(next_delay(&t, 3, None, 1.0), 4 * S);
        assert_eq!(next_delay(&t, 3, None, 0.0), 2 * S);
        assert_eq!(next_delay(&t, 40, None, 1.0), 60 * S, "capped, no overflow");
    }

    #[test]
    fn only_servable_service_names_are_imported() {
        let names = [
            "orders.shop",
            "orders.shop",
            "a-b.c1",
            "bad name!.shop",
            "Orders.shop",
            "orders",
            "orders.shop.west",
            "orders..shop",
            "-x.shop",
            "x-.shop",
            "",
            ".",
            &format!("{}.shop", "a".repeat(64)),
            "ünï.shop",
            "a.b\n",
        ]
        .map(String::from)
        .to_vec();
        let (good, bad) = servable_services(names);
        assert_eq!(good, ["a-b.c1", "orders.shop"]);
        assert_eq!(bad.len(), 12, "{bad:?}");
        let many: Vec<String> = (0..MAX_IMPORTED_SERVICES + 5)
            .map(|i| format!("s{i}.ns"))
            .collect();
        let (good, bad) = servable_services(many);
        assert_eq!((good.len(), bad.len()), (MAX_IMPORTED_SERVICES, 5));
    }
}
