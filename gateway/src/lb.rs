//! Endpoint selection and health, free of I/O: power of two choices over EWMA latency ×
//! outstanding requests, outlier ejection after consecutive failures, and a retry budget.
//! Time is passed in, so all of it runs on simulated time in tests.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Consecutive failures that eject an endpoint.
const EJECT_AFTER_FAILURES: u32 = 5;
/// First ejection length; doubles with each further ejection, up to [`MAX_EJECTION`].
const BASE_EJECTION: Duration = Duration::from_secs(5);
const MAX_EJECTION: Duration = Duration::from_secs(300);
/// Weight of a new latency sample in the EWMA.
const EWMA_ALPHA: f64 = 0.3;
/// Latency assumed for an endpoint without samples (so new endpoints get tried).
const INITIAL_EWMA_MICROS: u64 = 1_000;
/// A failure counts as this much latency for [`PENALTY_FOR`], so power-of-two choices steers
/// away from a failing endpoint before it is ejected (and comes back to it afterwards).
const FAILURE_PENALTY_MICROS: u64 = 1_000_000;
const PENALTY_FOR: Duration = Duration::from_secs(2);

/// One upstream endpoint and its live statistics.
#[derive(Debug)]
pub struct Endpoint {
    /// `host:port`.
    pub addr: String,
    outstanding: AtomicU32,
    ewma_micros: AtomicU64,
    consecutive_failures: AtomicU32,
    ejection: Mutex<Ejection>,
    penalized_until: Mutex<Option<Instant>>,
}

#[derive(Debug, Default)]
struct Ejection {
    until: Option<Instant>,
    count: u32,
}

impl Endpoint {
    /// A fresh endpoint.
    pub fn new(addr: String) -> Self {
        Self {
            addr,
            outstanding: AtomicU32::new(0),
            ewma_micros: AtomicU64::new(INITIAL_EWMA_MICROS),
            consecutive_failures: AtomicU32::new(0),
            ejection: Mutex::new(Ejection::default()),
            penalized_until: Mutex::new(None),
        }
    }

    /// Whether the endpoint is ejected at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejection
            .lock()
            .map(|e| e.until.is_some_and(|u| now < u))
            .unwrap_or(false)
    }

    fn score(&self, now: Instant) -> u64 {
        let outstanding = u64::from(self.outstanding.load(Ordering::Relaxed));
        let mut latency = self.ewma_micros.load(Ordering::Relaxed);
        let penalized = self
            .penalized_until
            .lock()
            .map(|p| p.is_some_and(|u| now < u))
            .unwrap_or(false);
        if penalized {
            latency = latency.max(FAILURE_PENALTY_MICROS);
        }
        latency.saturating_mul(outstanding + 1)
    }

    /// Marks a request as started; the guard records its outcome.
    pub fn start(&self) -> InFlight<'_> {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: self,
            done: false,
        }
    }

    fn record_success(&self, latency: Duration) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        let sample = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let old = self.ewma_micros.load(Ordering::Relaxed);
        let new = (EWMA_ALPHA * sample as f64 + (1.0 - EWMA_ALPHA) * old as f64) as u64;
        self.ewma_micros.store(new.max(1), Ordering::Relaxed);
        if let Ok(mut e) = self.ejection.lock() {
            // A success after the ejection expired resets the back-off.
            if e.until.is_none() {
                e.count = 0;
            }
        }
    }

    /// Returns true if this failure ejected the endpoint.
    fn record_failure(&self, now: Instant) -> bool {
        if let Ok(mut p) = self.penalized_until.lock() {
            *p = Some(now + PENALTY_FOR);
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < EJECT_AFTER_FAILURES {
            return false;
        }
        let Ok(mut e) = self.ejection.lock() else {
            return false;
        };
        if e.until.is_some_and(|u| now < u) {
            return false;
        }
        let factor = 1u32 << e.count.min(8);
        e.until = Some(now + (BASE_EJECTION * factor).min(MAX_EJECTION));
        e.count += 1;
        self.consecutive_failures.store(0, Ordering::Relaxed);
        true
    }

    /// Clears an expired ejection so the endpoint is tried again.
    fn expire_ejection(&self, now: Instant) {
        if let Ok(mut e) = self.ejection.lock()
            && e.until.is_some_and(|u| now >= u)
        {
            e.until = None;
        }
    }
}

/// A request in flight on an endpoint. Dropped without an outcome counts as neither.
#[derive(Debug)]
pub struct InFlight<'a> {
    endpoint: &'a Endpoint,
    done: bool,
}

impl InFlight<'_> {
    /// The request succeeded after `latency`.
    pub fn success(mut self, latency: Duration) {
        self.done = true;
        self.endpoint.record_success(latency);
    }

    /// The request failed (connect error, timeout, 502/503/504). Returns true if the endpoint
    /// was ejected by it.
    pub fn failure(mut self, now: Instant) -> bool {
        self.done = true;
        self.endpoint.record_failure(now)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let _ = self.done;
        self.endpoint.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Picks an endpoint: power of two random choices among the healthy ones; if every endpoint
/// is ejected, the one whose ejection ends first (better a likely failure than none at all).
/// `random` supplies two random numbers (tests pass fixed ones).
pub fn pick(endpoints: &[Endpoint], now: Instant, random: (usize, usize)) -> Option<&Endpoint> {
    pick_avoiding(endpoints, now, random, &[]).map(|(_, e)| e)
}

/// Like [`pick`], but a retry avoids the endpoints (by index) that already failed this
/// request while another healthy one is left. Returns the index with the endpoint.
pub fn pick_avoiding<'a>(
    endpoints: &'a [Endpoint],
    now: Instant,
    random: (usize, usize),
    avoid: &[usize],
) -> Option<(usize, &'a Endpoint)> {
    for e in endpoints {
        e.expire_ejection(now);
    }
    let mut healthy: Vec<(usize, &Endpoint)> = endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| !e.is_ejected(now))
        .collect();
    if healthy.iter().any(|(i, _)| !avoid.contains(i)) {
        healthy.retain(|(i, _)| !avoid.contains(i));
    }
    match healthy.len() {
        0 => endpoints
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| e.ejection.lock().ok().and_then(|j| j.until)),
        1 => Some(healthy[0]),
        n => {
            let a = healthy[random.0 % n];
            let mut b = healthy[random.1 % n];
            if a.0 == b.0 {
                b = healthy[(random.1 + 1) % n];
            }
            Some(if a.1.score(now) <= b.1.score(now) {
                a
            } else {
                b
            })
        }
    }
}

/// A retry budget (as Linkerd's): retries may add `ratio` of the request volume, and at least
/// `min_per_sec` retries a second are always allowed, so a quiet service whose endpoints
/// start failing can still retry around them. Token arithmetic in thousandths.
#[derive(Debug)]
pub struct RetryBudget {
    milli_tokens: AtomicU64,
    deposit_milli: u64,
    cap_milli: u64,
    floor: Mutex<Floor>,
    min_per_sec: f64,
}

#[derive(Debug)]
struct Floor {
    tokens: f64,
    last: Option<Instant>,
}

impl RetryBudget {
    /// `ratio` of requests may be retried (e.g. 0.2), with at most `cap` retries banked, plus
    /// `min_per_sec` retries a second whatever the volume.
    pub fn new(ratio: f64, cap: u32, min_per_sec: u32) -> Self {
        Self {
            milli_tokens: AtomicU64::new(0),
            deposit_milli: (ratio.clamp(0.0, 1.0) * 1000.0) as u64,
            cap_milli: u64::from(cap) * 1000,
            floor: Mutex::new(Floor {
                tokens: f64::from(min_per_sec),
                last: None,
            }),
            min_per_sec: f64::from(min_per_sec),
        }
    }

    /// Every first try deposits into the budget.
    pub fn deposit(&self) {
        let _ = self
            .milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some((t + self.deposit_milli).min(self.cap_milli))
            });
    }

    /// A retry withdraws one token (from the ratio, else from the per-second floor); false
    /// means the budget is spent and the retry is skipped.
    pub fn withdraw(&self, now: Instant) -> bool {
        let from_ratio = self
            .milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                t.checked_sub(1000)
            })
            .is_ok();
        if from_ratio {
            return true;
        }
        let Ok(mut floor) = self.floor.lock() else {
            return false;
        };
        if let Some(last) = floor.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * self.min_per_sec;
            floor.tokens = (floor.tokens + refill).min(self.min_per_sec);
        }
        floor.last = Some(now);
        if floor.tokens >= 1.0 {
            floor.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: usize) -> Vec<Endpoint> {
        (0..n)
            .map(|i| Endpoint::new(format!("127.0.0.1:{}", 8000 + i)))
            .collect()
    }

    #[test]
    fn p2c_prefers_the_less_loaded_endpoint() {
        let eps = endpoints(2);
        let now = Instant::now();
        let _busy = [eps[0].start(), eps[0].start(), eps[0].start()];
        for r in 0..10 {
            assert_eq!(pick(&eps, now, (r, r + 1)).unwrap().addr, eps[1].addr);
        }
    }

    #[test]
    fn p2c_prefers_the_faster_endpoint() {
        let eps = endpoints(2);
        for _ in 0..10 {
            eps[0].start().success(Duration::from_millis(50));
            eps[1].start().success(Duration::from_millis(1));
        }
        assert_eq!(
            pick(&eps, Instant::now(), (0, 1)).unwrap().addr,
            eps[1].addr
        );
    }

    #[test]
    fn consecutive_failures_eject_and_ejection_expires() {
        let eps = endpoints(2);
        let t0 = Instant::now();
        for i in 0..EJECT_AFTER_FAILURES {
            let ejected = eps[0].start().failure(t0);
            assert_eq!(ejected, i + 1 == EJECT_AFTER_FAILURES);
        }
        assert!(eps[0].is_ejected(t0));
        for r in 0..10 {
            assert_eq!(pick(&eps, t0, (r, r * 7)).unwrap().addr, eps[1].addr);
        }
        let later = t0 + BASE_EJECTION + Duration::from_millis(1);
        assert!(!eps[0].is_ejected(later));
        // A second ejection lasts twice as long.
        for _ in 0..EJECT_AFTER_FAILURES {
            eps[0].start().failure(later);
        }
        assert!(eps[0].is_ejected(later + BASE_EJECTION + Duration::from_millis(1)));
        assert!(!eps[0].is_ejected(later + 2 * BASE_EJECTION + Duration::from_millis(1)));
    }

    #[test]
    fn a_failure_steers_picks_away_for_a_while() {
        let eps = endpoints(2);
        let now = Instant::now();
        eps[0].start().failure(now);
        for r in 0..20 {
            assert_eq!(pick(&eps, now, (r, r + 1)).unwrap().addr, eps[1].addr);
        }
        // After the penalty the endpoint is tried again (no starvation).
        let later = now + PENALTY_FOR + Duration::from_millis(1);
        assert!((0..20).any(|r| pick(&eps, later, (r, r + 1)).unwrap().addr == eps[0].addr));
    }

    #[test]
    fn retries_avoid_the_endpoint_that_failed() {
        let eps = endpoints(2);
        let now = Instant::now();
        for r in 0..20 {
            assert_eq!(pick_avoiding(&eps, now, (r, r * 3), &[0]).unwrap().0, 1);
        }
        // Every endpoint that failed this request is avoided while another is left.
        let three = endpoints(3);
        for r in 0..20 {
            assert_eq!(
                pick_avoiding(&three, now, (r, r * 5), &[0, 2]).unwrap().0,
                1
            );
        }
        // With one endpoint there is nothing else to try.
        assert_eq!(pick_avoiding(&eps[..1], now, (0, 0), &[0]).unwrap().0, 0);
    }

    #[test]
    fn all_ejected_still_picks_one() {
        let eps = endpoints(2);
        let now = Instant::now();
        for e in &eps {
            for _ in 0..EJECT_AFTER_FAILURES {
                e.start().failure(now);
            }
        }
        assert!(pick(&eps, now, (0, 1)).is_some());
        assert!(pick(&[], now, (0, 1)).is_none());
    }

    #[test]
    fn success_resets_failure_streak() {
        let eps = endpoints(1);
        let now = Instant::now();
        for _ in 0..EJECT_AFTER_FAILURES - 1 {
            eps[0].start().failure(now);
        }
        eps[0].start().success(Duration::from_millis(1));
        assert!(!eps[0].start().failure(now));
        assert!(!eps[0].is_ejected(now));
    }

    #[test]
    fn retry_budget_limits_retries_to_a_ratio_plus_a_floor() {
        let budget = RetryBudget::new(0.2, 10, 10);
        let t0 = Instant::now();
        // The floor: 10 retries at once, then none until time passes.
        let floor = (0..100).take_while(|_| budget.withdraw(t0)).count();
        assert_eq!(floor, 10);
        // Under volume, about 20 % of requests (at one instant: no floor refill).
        let mut retries = 0;
        for _ in 0..1000 {
            budget.deposit();
            if budget.withdraw(t0) {
                retries += 1;
            }
        }
        assert!(
            (195..=200).contains(&retries),
            "{retries} retries for 1000 requests"
        );
        // Half a second later the floor has 5 more.
        let later = t0 + Duration::from_millis(500);
        assert_eq!((0..100).take_while(|_| budget.withdraw(later)).count(), 5);
    }
}
