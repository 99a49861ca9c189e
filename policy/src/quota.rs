//! Rate quotas: `@quota("…")` annotations and a sharded GCRA limiter on caller-supplied time.
//!
//! Grammar: `<count>/<s|m|h> [burst <n>] [key principal|service|shared:<name>]`, e.g.
//! `@quota("100/s burst 20")`, `@quota("600/m key service")`,
//! `@quota("10/s burst 5 key shared:batch-jobs")`.
//! - `burst` is how many requests may pass at once after an idle period; default: `count`.
//! - `key principal` (default): one bucket per calling workload; `key service`: one bucket per
//!   destination service shared by all callers; `key shared:<name>`: one bucket for every
//!   request charged to `<name>`, whichever permit matched.
//!
//! Principal and service buckets belong to the permit that carries the annotation (the
//! bucket key includes the policy id), so different permits are different tiers.
//!
//! **Which quota applies** when several permits determine an allow: the strictest, i.e. the
//! lowest sustained rate (count / period), then the smallest burst, then the smallest policy
//! id. Only that one is charged. Permits without `@quota` are not considered when another
//! determining permit has one; when none has one, the configured default applies (if any).

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The largest count or burst accepted.
const MAX_COUNT: u64 = 1_000_000_000;
const SHARDS: usize = 16;

/// Whose requests share a bucket.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum QuotaKey {
    /// One bucket per calling workload (the default).
    Principal,
    /// One bucket per destination service.
    Service,
    /// One bucket for everything charged to this name.
    Shared(String),
}

/// A parsed quota.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuotaSpec {
    /// Requests per period.
    pub count: u64,
    /// The period.
    pub period: Duration,
    /// Requests that may pass at once.
    pub burst: u64,
    /// Who shares the bucket.
    pub key: QuotaKey,
    /// The policy the annotation is on (`None` for the configured default).
    pub policy_id: Option<String>,
}

/// Why a quota annotation could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum QuotaParseError {
    /// The text does not follow the grammar.
    #[error("quota `{text}` is malformed: {why}")]
    Malformed {
        /// The annotation text.
        text: String,
        /// What is wrong.
        why: &'static str,
    },
}

impl FromStr for QuotaSpec {
    type Err = QuotaParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |why| QuotaParseError::Malformed {
            text: text.chars().take(200).collect(),
            why,
        };
        let mut words = text.split_whitespace();
        let rate = words
            .next()
            .ok_or_else(|| err("expected `<count>/<s|m|h>`"))?;
        let (count, unit) = rate
            .split_once('/')
            .ok_or_else(|| err("expected `<count>/<s|m|h>`"))?;
        let count =
            parse_count(count).ok_or_else(|| err("the count must be a whole number from 1"))?;
        let period = match unit {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(err("the period must be `s`, `m` or `h`")),
        };
        let mut spec = Self {
            count,
            period,
            burst: count,
            key: QuotaKey::Principal,
            policy_id: None,
        };
        let (mut seen_burst, mut seen_key) = (false, false);
        while let Some(word) = words.next() {
            match word {
                "burst" if !seen_burst => {
                    let n = words.next().and_then(parse_count);
                    spec.burst = n.ok_or_else(|| err("`burst` needs a whole number from 1"))?;
                    seen_burst = true;
                }
                "key" if !seen_key => {
                    spec.key = match words.next() {
                        Some("principal") => QuotaKey::Principal,
                        Some("service") => QuotaKey::Service,
                        Some(k) => match k.strip_prefix("shared:") {
                            Some(name) if !name.is_empty() && name.len() <= 128 => {
                                QuotaKey::Shared(name.to_owned())
                            }
                            _ => {
                                return Err(err(
                                    "`key` must be `principal`, `service` or `shared:<name>`",
                                ));
                            }
                        },
                        None => {
                            return Err(err(
                                "`key` must be `principal`, `service` or `shared:<name>`",
                            ));
                        }
                    };
                    seen_key = true;
                }
                _ => return Err(err("expected `burst <n>` or `key …` after the rate")),
            }
        }
        Ok(spec)
    }
}

fn parse_count(s: &str) -> Option<u64> {
    s.parse::<u64>()
        .ok()
        .filter(|n| (1..=MAX_COUNT).contains(n))
}

impl fmt::Display for QuotaSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.period.as_secs() {
            60 => "m",
            3600 => "h",
            _ => "s",
        };
        write!(f, "{}/{unit} burst {}", self.count, self.burst)?;
        match &self.key {
            QuotaKey::Principal => write!(f, " key principal"),
            QuotaKey::Service => write!(f, " key service"),
            QuotaKey::Shared(name) => write!(f, " key shared:{name}"),
        }
    }
}

impl QuotaSpec {
    /// Nanoseconds between two requests at the sustained rate (the GCRA emission interval).
    fn interval_nanos(&self) -> u64 {
        let period = u64::try_from(self.period.as_nanos()).unwrap_or(u64::MAX);
        (period / self.count.max(1)).max(1)
    }

    /// Sort key for "strictest first": lowest rate, smallest burst, smallest policy id.
    pub(crate) fn strictness(&self) -> (std::cmp::Reverse<u64>, u64, Option<&str>) {
        (
            std::cmp::Reverse(self.interval_nanos()),
            self.burst,
            self.policy_id.as_deref(),
        )
    }

    /// The bucket key for a request from `caller` to `service`.
    pub fn key_for(&self, caller: &str, service: &str) -> String {
        let policy = self.policy_id.as_deref().unwrap_or("default");
        match &self.key {
            QuotaKey::Principal => format!("{policy}|principal|{caller}"),
            QuotaKey::Service => format!("{policy}|service|{service}"),
            QuotaKey::Shared(name) => format!("shared|{name}"),
        }
    }
}

/// The outcome of charging one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuotaResult {
    /// Admitted; `remaining` requests could pass right now.
    Allowed {
        /// Requests that could still pass at this instant.
        remaining: u64,
    },
    /// Refused; the next request can pass after `retry_after`.
    Exceeded {
        /// Time until the next request would be admitted.
        retry_after: Duration,
    },
}

/// A sharded GCRA limiter. Memory is bounded by `max_keys`: a bucket whose theoretical
/// arrival time has passed is full, so dropping it changes nothing; such idle buckets are
/// swept when a shard is full, and if none is idle the bucket closest to full is dropped.
#[derive(Debug)]
pub struct QuotaLimiter {
    default: Option<QuotaSpec>,
    max_per_shard: usize,
    shards: Vec<Mutex<HashMap<String, u64>>>,
}

impl QuotaLimiter {
    /// A limiter with an optional default quota (for permits without `@quota`) holding at
    /// most `max_keys` buckets (at least one per shard).
    pub fn new(default: Option<QuotaSpec>, max_keys: usize) -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect();
        Self {
            default,
            max_per_shard: max_keys.div_ceil(SHARDS).max(1),
            shards,
        }
    }

    /// The quota for permits without `@quota`.
    pub fn default_spec(&self) -> Option<&QuotaSpec> {
        self.default.as_ref()
    }

    /// Charges one request to `key` under `spec` at `now` (time since any fixed origin, the
    /// same for every call, e.g. a monotonic clock's elapsed time).
    pub fn check(&self, key: &str, spec: &QuotaSpec, now: Duration) -> QuotaResult {
        let now = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        let t = spec.interval_nanos();
        let tau = t.saturating_mul(spec.burst.saturating_sub(1));
        let shard = &self.shards[shard_of(key)];
        // A poisoned shard only means another thread panicked mid-update of plain integers.
        let mut map = shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tat = map.get(key).copied().unwrap_or(now).max(now);
        let allow_at = tat.saturating_sub(tau);
        if now < allow_at {
            return QuotaResult::Exceeded {
                retry_after: Duration::from_nanos(allow_at - now),
            };
        }
        let new_tat = tat.saturating_add(t);
        if !map.contains_key(key) && map.len() >= self.max_per_shard {
            evict(&mut map, now);
        }
        map.insert(key.to_owned(), new_tat);
        // Requests that could pass now: those whose allow time is still <= now.
        let horizon = now.saturating_add(tau);
        let remaining = if horizon >= new_tat {
            (horizon - new_tat) / t + 1
        } else {
            0
        };
        QuotaResult::Allowed { remaining }
    }

    /// Number of buckets currently held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn evict(map: &mut HashMap<String, u64>, now: u64) {
    map.retain(|_, tat| *tat > now);
    if map.is_empty() {
        return;
    }
    let fullest = map
        .iter()
        .min_by_key(|(_, tat)| **tat)
        .map(|(k, _)| k.clone());
    if let Some(k) = fullest {
        map.remove(&k);
    }
}

fn shard_of(key: &str) -> usize {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    // SHARDS is a power of two; the modulo keeps the index in range.
    usize::try_from(h.finish() % SHARDS as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> QuotaSpec {
        s.parse().unwrap()
    }

    #[test]
    fn annotations_parse() {
        let q = spec("100/s burst 20");
        assert_eq!(
            (q.count, q.period, q.burst, q.key.clone()),
            (100, Duration::from_secs(1), 20, QuotaKey::Principal)
        );
        assert_eq!(spec("5/m").burst, 5);
        assert_eq!(spec("7/h key service").key, QuotaKey::Service);
        assert_eq!(
            spec("1/s key shared:batch").key,
            QuotaKey::Shared("batch".into())
        );
        assert_eq!(
            spec("10/s burst 5 key shared:x").to_string(),
            "10/s burst 5 key shared:x"
        );
        for bad in [
            "",
            "100",
            "100/d",
            "0/s",
            "-1/s",
            "1/s burst",
            "1/s burst 0",
            "1/s key",
            "1/s key team",
            "1/s burst 2 burst 3",
            "1/s extra",
            "99999999999/s",
        ] {
            let e = bad.parse::<QuotaSpec>().unwrap_err();
            assert!(
                e.to_string()
                    .starts_with(&format!("quota `{bad}` is malformed")),
                "{e}"
            );
        }
    }

    #[test]
    fn burst_then_steady_rate_then_retry_after() {
        let l = QuotaLimiter::new(None, 100);
        let q = spec("10/s burst 3");
        let t0 = Duration::from_secs(100);
        assert_eq!(l.check("k", &q, t0), QuotaResult::Allowed { remaining: 2 });
        assert_eq!(l.check("k", &q, t0), QuotaResult::Allowed { remaining: 1 });
        assert_eq!(l.check("k", &q, t0), QuotaResult::Allowed { remaining: 0 });
        assert_eq!(
            l.check("k", &q, t0),
            QuotaResult::Exceeded {
                retry_after: Duration::from_millis(100)
            }
        );
        assert!(matches!(
            l.check("k", &q, t0 + Duration::from_millis(100)),
            QuotaResult::Allowed { .. }
        ));
        // Another key is independent.
        assert!(matches!(
            l.check("other", &q, t0),
            QuotaResult::Allowed { remaining: 2 }
        ));
    }

    #[test]
    fn sustained_overload_admits_the_configured_rate_within_five_percent() {
        let l = QuotaLimiter::new(None, 100);
        let q = spec("100/s burst 20");
        // 1000 requests per second offered for 60 simulated seconds.
        let mut admitted = 0u64;
        let step = Duration::from_millis(1);
        let mut now = Duration::from_secs(5);
        for _ in 0..60_000 {
            if matches!(l.check("k", &q, now), QuotaResult::Allowed { .. }) {
                admitted += 1;
            }
            now += step;
        }
        let expected = 100.0 * 60.0;
        let ratio = admitted as f64 / expected;
        assert!(
            (0.95..=1.05).contains(&ratio),
            "admitted {admitted}, ratio {ratio}"
        );
    }

    #[test]
    fn memory_is_bounded_and_idle_buckets_go_first() {
        let l = QuotaLimiter::new(None, 32);
        let q = spec("1/s burst 1");
        for i in 0..10_000 {
            l.check(&format!("k{i}"), &q, Duration::from_secs(10));
        }
        assert!(l.len() <= 32 + SHARDS, "{} buckets", l.len());
        // When no bucket is idle, the one closest to full goes: a busy key survives.
        let l = QuotaLimiter::new(None, 2 * SHARDS);
        l.check("busy", &q, Duration::from_secs(10));
        for i in 0..1000 {
            l.check(&format!("k{i}"), &q, Duration::from_secs(1));
        }
        assert!(matches!(
            l.check("busy", &q, Duration::from_secs(10)),
            QuotaResult::Exceeded { .. }
        ));
    }

    #[test]
    fn strictest_sorts_first() {
        let mut specs = [spec("100/s"), spec("10/s burst 50"), spec("10/s burst 5")];
        specs.sort_by(|a, b| a.strictness().cmp(&b.strictness()));
        assert_eq!(specs[0].to_string(), "10/s burst 5 key principal");
    }
}
