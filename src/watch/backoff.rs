//! How the API watchers wait before retrying a failed list or watch: exponential from
//! [`INITIAL`], capped at [`CAP`], each delay drawn at random from the upper half of its step.
//!
//! kube-rs's `default_backoff()` copies client-go's reflector (0.8 s doubling to 30 s): after a
//! control-plane restart a node could miss endpoint changes for half a minute. The cap here
//! bounds that: once the API answers again, every watcher retries within [`CAP`]. The jitter
//! spreads thousands of nodes that lost the API at the same moment over the second half of each
//! step, so they never reconnect in lockstep. At the cap a watcher retries on average every
//! 3 s: each node runs 3 watchers (6 with the Ingress proxy), so 5,000 nodes make about 5,000
//! (10,000) connection attempts per second, evenly spread, while the API is down; the first
//! attempt that succeeds resumes the watch from its resourceVersion (a relist only after
//! `410 Gone`).

use std::time::Duration;

use tokio::time::Instant;

/// The first delay's ceiling.
pub const INITIAL: Duration = Duration::from_millis(500);
/// No delay is longer: the API's return is followed within this (plus the request itself).
pub const CAP: Duration = Duration::from_secs(4);
/// A failure this long after the previous one starts a new outage, from [`INITIAL`].
pub const QUIET: Duration = Duration::from_secs(30);

/// The watchers' retry policy, for kube-rs's `WatchStreamExt::backoff`.
///
/// Each outage starts from [`INITIAL`]: a failure [`QUIET`] or more after the previous one
/// starts over. kube-rs's `reset()` cannot tell that: it is called after every successful
/// item, and the watcher emits one (`Init`) before each list attempt, failed ones included,
/// so honouring it would keep an outage at the first step forever.
pub struct WatchBackoff {
    /// No delay is longer ([`CAP`] unless [`WatchBackoff::with_cap`] chose another).
    cap: Duration,
    /// Failures in this outage.
    attempt: u32,
    last_failure: Option<Instant>,
    rng: fastrand::Rng,
}

impl WatchBackoff {
    /// A backoff with its own random seed, so two watchers (or two nodes) never share a sequence.
    pub fn new() -> Self {
        Self::with_rng(fastrand::Rng::new())
    }

    /// The same policy up to another cap (for what is expected to stay failing, such as a
    /// kind whose CRD is not installed: it is looked for again less often).
    pub fn with_cap(cap: Duration) -> Self {
        WatchBackoff { cap, ..Self::new() }
    }

    /// A reproducible backoff, for tests.
    pub fn with_seed(seed: u64) -> Self {
        Self::with_rng(fastrand::Rng::with_seed(seed))
    }

    fn with_rng(rng: fastrand::Rng) -> Self {
        WatchBackoff {
            cap: CAP,
            attempt: 0,
            last_failure: None,
            rng,
        }
    }
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self::new()
    }
}

/// The ceiling of the `attempt`-th delay (0-based): [`INITIAL`] doubled per attempt, at most [`CAP`].
pub fn ceiling(attempt: u32) -> Duration {
    ceiling_to(attempt, CAP)
}

/// [`ceiling`] up to `cap`.
fn ceiling_to(attempt: u32, cap: Duration) -> Duration {
    // 2^16 * 0.5 s passes any cap used; the shift never overflows.
    INITIAL.saturating_mul(1 << attempt.min(16)).min(cap)
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    /// Never `None`: a watcher never gives up on the API.
    fn next(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if self.last_failure.is_some_and(|t| now.duration_since(t) >= QUIET) {
            self.attempt = 0;
        }
        self.last_failure = Some(now);
        let top = ceiling_to(self.attempt, self.cap);
        self.attempt = self.attempt.saturating_add(1);
        // Uniform in [top/2, top]: at least half the step, so retries stay spread out but a
        // struggling API server still sees the rate fall as the outage lasts.
        Some(top / 2 + top.mul_f64(self.rng.f64() / 2.0))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    /// Ignored: see the type's documentation.
    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::utils::Backoff;

    #[test]
    fn delays_double_from_half_a_second_and_never_pass_the_cap() {
        assert_eq!(ceiling(0), Duration::from_millis(500));
        assert_eq!(ceiling(1), Duration::from_secs(1));
        assert_eq!(ceiling(2), Duration::from_secs(2));
        assert_eq!(ceiling(3), CAP);
        assert_eq!(ceiling(u32::MAX), CAP);
        let mut backoff = WatchBackoff::with_seed(7);
        for attempt in 0..1_000 {
            let delay = backoff.next().expect("never gives up");
            let top = ceiling(attempt);
            assert!(
                delay >= top / 2 && delay <= top,
                "attempt {attempt}: {delay:?} outside [{:?}, {top:?}]",
                top / 2
            );
        }
    }

    #[test]
    fn another_cap_bounds_the_same_doubling() {
        let mut backoff = WatchBackoff::with_cap(Duration::from_secs(10));
        let delays: Vec<Duration> = (&mut backoff).take(12).collect();
        for (attempt, delay) in delays.iter().enumerate() {
            let top = (INITIAL * (1 << attempt)).min(Duration::from_secs(10));
            assert!(*delay >= top / 2 && *delay <= top, "attempt {attempt}: {delay:?}");
        }
        assert!(delays[11] >= Duration::from_secs(5), "past the default cap");
    }

    #[tokio::test(start_paused = true)]
    async fn the_events_between_failed_attempts_do_not_reset_it() {
        // kube-rs resets after the `Init` event that precedes each (failing) list.
        let mut backoff = WatchBackoff::with_seed(1);
        for attempt in 0..6 {
            let delay = backoff.next().expect("a delay");
            assert!(delay >= ceiling(attempt) / 2, "attempt {attempt}: {delay:?}");
            backoff.reset();
            tokio::time::advance(delay).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_after_a_quiet_period_starts_over() {
        let mut backoff = WatchBackoff::with_seed(1);
        for _ in 0..10 {
            backoff.next();
        }
        tokio::time::advance(QUIET - Duration::from_millis(1)).await;
        assert!(backoff.next().expect("a delay") >= CAP / 2, "still the same outage");
        tokio::time::advance(QUIET).await;
        assert!(backoff.next().expect("a delay") <= INITIAL, "a new outage");
    }

    #[test]
    fn nodes_that_fail_together_retry_at_spread_out_times() {
        // 5,000 watchers at the cap: their next retries fill [CAP/2, CAP] roughly evenly, with
        // no second holding more than its share (lockstep would put them all in one).
        let mut buckets = [0u32; 8];
        for seed in 0..5_000 {
            let mut backoff = WatchBackoff::with_seed(seed);
            let delay = backoff.nth(10).expect("a delay");
            let slot = ((delay - CAP / 2).as_secs_f64() / (CAP / 2).as_secs_f64() * 8.0) as usize;
            buckets[slot.min(7)] += 1;
        }
        for (i, n) in buckets.iter().enumerate() {
            assert!(
                (450..=800).contains(n),
                "slot {i} of [2 s, 4 s] got {n} of 5000 retries: {buckets:?}"
            );
        }
    }
}
