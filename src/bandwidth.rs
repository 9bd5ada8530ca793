//! The process-wide bandwidth budget (`download.rate_limit`): one token bucket that every body
//! read in the process pays from, so that the limit is the total of all downloads together.
//!
//! The bucket may go into debt: a read is charged in full once its bytes are in, and the reader
//! waits until the refill has paid for them. A hyper read can be larger than the burst at a low
//! rate, so "wait until the bytes fit" would never end; charging first also keeps readers in the
//! order they asked (each waits for its own place in the debt), and oversleeping a timer costs
//! nothing, since the refill is computed from the clock, not from the wake-ups.
//!
//! Amounts are kept in byte-nanoseconds (bytes × 10⁹) in `u128`: a refill is then `rate ×
//! elapsed nanoseconds`, exact, so no rounding drifts the rate however long the daemon runs
//! (and 2¹²⁸ of them are 3·10²⁰ GiB: no overflow either).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

const NANOS: u128 = 1_000_000_000;
/// The smallest burst: below it a slow limit would make nearly every read wait, and a single
/// read (up to 64 KiB on a slow link, hundreds on a fast one) would never pass unhindered.
const MIN_BURST: u64 = 256 << 10;

/// How much the bucket holds when full: a tenth of a second at the rate, at least `MIN_BURST`.
/// Small, so that an idle moment does not let a later download run at line speed for long
/// (over a 20 s window the excess is at most 0.5 %); large against the timer's millisecond
/// granularity and a busy runtime's late wake-ups, so these never cost throughput.
pub fn burst(rate: u64) -> u64 {
    (rate / 10).max(MIN_BURST)
}

/// `50 MiB/s`, `1.91 MiB/s`, `unlimited`: for log lines.
pub fn describe(rate: u64) -> String {
    if rate == 0 {
        return "unlimited".into();
    }
    for (unit, m) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if rate >= m {
            return if rate.is_multiple_of(m) {
                format!("{} {unit}/s", rate / m)
            } else {
                format!("{:.2} {unit}/s", rate as f64 / m as f64)
            };
        }
    }
    format!("{rate} B/s")
}

pub struct Bandwidth {
    /// A copy of `State::rate`, so that an unlimited process takes no lock per read.
    rate: AtomicU64,
    state: Mutex<State>,
    /// Wakes every waiter to recompute its deadline when the rate changes.
    changed: Notify,
}

struct State {
    /// Bytes a second; 0: unlimited.
    rate: u64,
    /// Byte-nanoseconds credited by the refill since the start, capped at `taken` + burst.
    filled: u128,
    /// Byte-nanoseconds charged since the start.
    taken: u128,
    /// When `filled` was last brought up to date; `None` until the first use (the bucket may
    /// be made outside a runtime, where tokio's clock is not the one a test pauses).
    last: Option<Instant>,
}

impl State {
    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_nanos();
            let cap = self.taken + u128::from(burst(self.rate)) * NANOS;
            self.filled = (self.filled + u128::from(self.rate) * dt).min(cap.max(self.filled));
        }
        self.last = Some(now);
    }
}

impl Bandwidth {
    /// A bucket for `rate` bytes a second (0: unlimited), full.
    pub fn new(rate: u64) -> Bandwidth {
        Bandwidth {
            rate: AtomicU64::new(rate),
            state: Mutex::new(State {
                rate,
                filled: u128::from(burst(rate)) * NANOS,
                taken: 0,
                last: None,
            }),
            changed: Notify::new(),
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// A new rate, for every download, including those waiting now: what was earned so far is
    /// kept at the old rate, and from now on it accrues at the new one.
    pub fn set_rate(&self, rate: u64) {
        let mut st = self.lock();
        let now = Instant::now();
        st.refill(now);
        if st.rate == 0 && rate > 0 {
            // While unlimited nothing was charged; start full, as at start-up.
            st.filled = st.taken + u128::from(burst(rate)) * NANOS;
        }
        st.rate = rate;
        if rate > 0 {
            st.filled = st.filled.min(st.taken + u128::from(burst(rate)) * NANOS);
        }
        self.rate.store(rate, Ordering::Relaxed);
        drop(st);
        self.changed.notify_waiters();
    }

    /// Pays for `n` bytes just received: returns once the budget covers them, after how long a
    /// wait. Cancellation-safe: the bytes are charged before any wait (they were received,
    /// whatever becomes of them), so dropping the future at any point leaves the bucket as
    /// if it had completed, and no lock is held across an await.
    pub async fn take(&self, n: u64) -> Duration {
        if self.rate() == 0 {
            return Duration::ZERO;
        }
        let start = Instant::now();
        let ticket = {
            let mut st = self.lock();
            if st.rate == 0 {
                return Duration::ZERO;
            }
            st.refill(start);
            st.taken += u128::from(n) * NANOS;
            st.taken
        };
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read, so a change in between is not missed.
            changed.as_mut().enable();
            let deadline = {
                let mut st = self.lock();
                if st.rate == 0 {
                    break;
                }
                let now = Instant::now();
                st.refill(now);
                if st.filled >= ticket {
                    break;
                }
                let nanos = (ticket - st.filled).div_ceil(u128::from(st.rate));
                now + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
            };
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = &mut changed => {}
            }
        }
        start.elapsed()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;

    /// Virtual seconds since `t0`.
    fn secs(t0: Instant) -> f64 {
        t0.elapsed().as_secs_f64()
    }

    async fn take_in_reads(b: &Bandwidth, total: u64, read: u64) {
        let mut left = total;
        while left > 0 {
            let n = left.min(read);
            b.take(n).await;
            left -= n;
        }
    }

    #[test]
    fn burst_is_a_tenth_of_a_second_or_256_kib() {
        assert_eq!(burst(50 * MIB), 5 * MIB);
        assert_eq!(burst(256 * KIB), 256 * KIB);
        assert_eq!(burst(1), 256 * KIB);
        assert_eq!(describe(0), "unlimited");
        assert_eq!(describe(50 * MIB), "50 MiB/s");
        assert_eq!(describe(500 * KIB), "500 KiB/s");
        assert_eq!(describe(2_000_000), "1.91 MiB/s");
        assert_eq!(describe(999), "999 B/s");
    }

    #[tokio::test(start_paused = true)]
    async fn n_bytes_take_n_over_r_after_the_burst() {
        let b = Bandwidth::new(MIB);
        let t0 = Instant::now();
        take_in_reads(&b, 4 * MIB, 64 * KIB).await;
        // The first 256 KiB are the full bucket; the rest come at 1 MiB/s.
        let t = secs(t0);
        assert!((3.75..3.76).contains(&t), "{t}");
        // Empty now: the next MiB costs a whole second, read by read or in one piece.
        let t1 = Instant::now();
        b.take(MIB).await;
        let t = secs(t1);
        assert!((1.0..1.01).contains(&t), "{t}");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_takers_share_one_budget() {
        let b = Arc::new(Bandwidth::new(MIB));
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move {
                    take_in_reads(&b, MIB, 16 * KIB).await;
                    secs(t0)
                })
            })
            .collect();
        let mut ends = Vec::new();
        for t in tasks {
            ends.push(t.await.unwrap());
        }
        // 4 MiB in all at 1 MiB/s (less the burst), not 1 MiB each at 1 MiB/s: one budget.
        let last = ends.iter().cloned().fold(0.0, f64::max);
        assert!((3.75..3.77).contains(&last), "{ends:?}");
        // And shared, not served one after another (that would end them at 0.75, 1.75, 2.75
        // and 3.75 s): all end near the end, the first one a burst ahead of the others.
        assert!(ends.iter().all(|t| *t > 2.9), "{ends:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_change_applies_to_a_wait_in_progress() {
        let b = Arc::new(Bandwidth::new(100 * KIB));
        let t0 = Instant::now();
        // 1 MiB at once: 768 KiB of debt, 7.68 s at the old rate.
        let waiter = tokio::spawn({
            let b = b.clone();
            async move {
                b.take(MIB).await;
                secs(t0)
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        b.set_rate(MIB);
        // 100 KiB paid in the first second; the other 668 KiB at 1 MiB/s.
        let t = waiter.await.unwrap();
        let want = 1.0 + 668.0 / 1024.0;
        assert!((t - want).abs() < 0.01, "{t}, want {want}");
        // Slower works too: now 100 KiB/s, and empty (but for what the waiter's timer, in
        // whole milliseconds, let accrue past its due).
        b.set_rate(100 * KIB);
        let t1 = Instant::now();
        b.take(100 * KIB).await;
        let t = secs(t1);
        assert!((0.98..1.01).contains(&t), "{t}");
    }

    #[tokio::test(start_paused = true)]
    async fn going_unlimited_wakes_every_waiter_at_once() {
        let b = Arc::new(Bandwidth::new(KIB));
        let t0 = Instant::now();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move {
                    b.take(10 * MIB).await;
                    secs(t0)
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        b.set_rate(0);
        for w in waiters {
            assert_eq!(w.await.unwrap(), 1.0);
        }
        // And limited again: a full bucket, then the new rate.
        b.set_rate(MIB);
        let t1 = Instant::now();
        take_in_reads(&b, MIB + 256 * KIB, 64 * KIB).await;
        let t = secs(t1);
        assert!((1.0..1.01).contains(&t), "{t}");
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        let b = Bandwidth::new(0);
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert_eq!(b.take(u64::MAX / 2000).await, Duration::ZERO);
        }
        assert_eq!(t0.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_bucket_holds_only_the_burst() {
        let b = Bandwidth::new(MIB);
        b.take(10 * MIB).await;
        tokio::time::sleep(Duration::from_secs(100)).await;
        let t0 = Instant::now();
        b.take(256 * KIB).await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
        b.take(MIB).await;
        let t = secs(t0);
        assert!((1.0..1.01).contains(&t), "{t}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_wait_still_charges_the_bytes_received() {
        let b = Bandwidth::new(100 * KIB);
        let t0 = Instant::now();
        // Dropped after 1 s of its 7.68 s (a shutdown): the bytes were received all the same.
        let r = tokio::time::timeout(Duration::from_secs(1), b.take(MIB)).await;
        assert!(r.is_err());
        b.take(1).await;
        let t = secs(t0);
        let want = 768.0 / 100.0;
        assert!((t - want).abs() < 0.01, "{t}, want {want}");
    }
}
