//! Bounds on what strangers can make the decision log write.
//!
//! Every refusal is recorded, and a refusal of an unauthenticated caller is something anyone
//! who can reach a listener can cause. So such records are limited per source (an IPv4
//! address, or an IPv6 /64): a burst of [`BURST`], then [`RATE`] a second. Refusals past the
//! limit are still answered, without a record (and without a decision id); the next record
//! from that source says how many were left out since when, so the log stays a complete
//! account in numbers. And what a refusal made before Cedar records of the request is
//! capped: headers to [`MAX_HEADER_BYTES`], the path to [`MAX_PATH_CHARS`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::SystemTime;

/// Records of unauthenticated refusals one source may cause at once.
pub(crate) const BURST: f64 = 20.0;
/// Records of unauthenticated refusals one source may cause per second after the burst.
pub(crate) const RATE: f64 = 2.0;
/// Sources tracked; past it, idle ones are forgotten, and while all are busy new sources
/// share one bucket.
const MAX_SOURCES: usize = 65_536;
/// Header bytes (names and values) a refusal before Cedar records.
pub(crate) const MAX_HEADER_BYTES: usize = 4096;
/// Characters of the path a refusal before Cedar records.
pub(crate) const MAX_PATH_CHARS: usize = 1024;

/// Whether to record one unauthenticated refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Record it; `left_out` refusals of this source since `since` were not recorded.
    Record {
        left_out: u64,
        since: Option<SystemTime>,
    },
    /// Answer it without a record (counted for the next record of this source).
    LeaveOut,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: SystemTime,
    left_out: u64,
    since: Option<SystemTime>,
}

/// Per-source budgets of unauthenticated refusal records.
#[derive(Debug, Default)]
pub(crate) struct Strangers {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl Strangers {
    /// Whether a refusal of an unauthenticated caller from `source` at `now` is recorded.
    pub(crate) fn check(&self, source: IpAddr, now: SystemTime) -> Verdict {
        let key = source_key(source);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_SOURCES && !buckets.contains_key(&key) {
            buckets.retain(|_, b| b.left_out > 0 || refill(b, now) < BURST);
        }
        let key = if buckets.len() >= MAX_SOURCES && !buckets.contains_key(&key) {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            key
        };
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: BURST,
            last: now,
            left_out: 0,
            since: None,
        });
        bucket.tokens = refill(bucket, now);
        bucket.last = now.max(bucket.last);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            let verdict = Verdict::Record {
                left_out: bucket.left_out,
                since: bucket.since,
            };
            bucket.left_out = 0;
            bucket.since = None;
            verdict
        } else {
            bucket.left_out += 1;
            bucket.since.get_or_insert(now);
            Verdict::LeaveOut
        }
    }
}

fn refill(b: &Bucket, now: SystemTime) -> f64 {
    let elapsed = now.duration_since(b.last).unwrap_or_default().as_secs_f64();
    (b.tokens + elapsed * RATE).min(BURST)
}

/// IPv4 by address; IPv6 by /64 (one host usually holds a whole /64).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Caps the headers and path a refusal records; returns a note when something was cut.
pub(crate) fn cap_request(
    headers: &mut Vec<(String, String)>,
    path: &mut String,
) -> Option<String> {
    let total: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    let mut kept = 0usize;
    headers.retain(|(k, v)| {
        let size = k.len() + v.len();
        let keep = kept + size <= MAX_HEADER_BYTES;
        if keep {
            kept += size;
        }
        keep
    });
    let path_cut = path.chars().count() > MAX_PATH_CHARS;
    if path_cut {
        *path = path.chars().take(MAX_PATH_CHARS).collect::<String>() + "…";
    }
    (kept < total || path_cut).then(|| {
        format!(
            "recorded {kept} of {total} header bytes and at most {MAX_PATH_CHARS} path characters"
        )
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_then_the_rate_and_the_count_of_what_was_left_out() {
        let s = Strangers::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let b_neighbour: IpAddr = "2001:db8::ffff".parse().unwrap();
        for _ in 0..20 {
            assert!(matches!(
                s.check(a, t0),
                Verdict::Record { left_out: 0, .. }
            ));
        }
        for _ in 0..5 {
            assert_eq!(s.check(a, t0), Verdict::LeaveOut);
        }
        // Another source has its own budget; an IPv6 /64 is one source.
        for _ in 0..20 {
            assert!(matches!(s.check(b, t0), Verdict::Record { .. }));
        }
        assert_eq!(s.check(b_neighbour, t0), Verdict::LeaveOut);
        // Half a second later one more record is allowed, carrying the count.
        assert_eq!(
            s.check(a, t0 + Duration::from_millis(500)),
            Verdict::Record {
                left_out: 5,
                since: Some(t0)
            }
        );
        assert_eq!(
            s.check(a, t0 + Duration::from_millis(500)),
            Verdict::LeaveOut
        );
    }

    #[test]
    fn refusal_records_keep_bounded_headers_and_path() {
        let mut headers: Vec<(String, String)> = (0..100)
            .map(|i| (format!("x-h{i}"), "v".repeat(100)))
            .collect();
        let mut path = format!("/{}", "a".repeat(5000));
        let note = cap_request(&mut headers, &mut path).unwrap();
        let kept: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(
            kept <= MAX_HEADER_BYTES && kept > MAX_HEADER_BYTES - 200,
            "{kept}"
        );
        assert_eq!(path.chars().count(), MAX_PATH_CHARS + 1);
        assert!(note.contains("of 10490 header bytes"), "{note}");
        let mut small = vec![("host".to_owned(), "x".to_owned())];
        assert!(cap_request(&mut small, &mut "/v1".to_owned()).is_none());
    }
}
