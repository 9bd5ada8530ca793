//! The retry policy, in one place: what a row becomes after an attempt (`decide`), the backoff
//! between attempts, and how long the whole client waits after a 429.

use std::time::{Duration, SystemTime};

use crate::config::{RetryConfig, format_duration};
use crate::fetch::{Ended, Outcome, expired_words, status_interval};
use crate::queue::{Claimed, FileRecord, Finish};

/// Refusals (401/402/403) of one video, each while the API accepted the token for another,
/// after which the video fails with the API's message.
pub const REFUSALS_TO_FAIL: u32 = 3;

/// The row's next state after an attempt. The whole retry policy is here: backoff, the give-up
/// deadline, and the video's expiry (past it, retrying is pointless).
pub fn decide(
    claimed: &Claimed,
    ended: &Ended,
    retry: &RetryConfig,
    held_for: Duration,
    now: SystemTime,
) -> Finish {
    let backoff = backoff(retry, claimed.attempts);
    let expires_at = ended.expires_at.or(claimed.expires_at);
    let unix_now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let until_expiry = expires_at.map(|t| t as f64 - unix_now);
    let retry_or_give_up = |http_status: Option<u16>, reason: &str, at_least: Duration| {
        if until_expiry.is_some_and(|left| left <= 0.0) {
            return Finish::Failed {
                error: format!("{}: {reason}", expired_words(expires_at)),
                http_status,
                kept: None,
            };
        }
        let elapsed = claimed.since_first_attempt + held_for;
        let Some(left) = retry
            .give_up_after
            .checked_sub(elapsed)
            .filter(|l| !l.is_zero())
        else {
            return Finish::Failed {
                error: format!(
                    "gave up after {} (retry.give_up_after): {reason}",
                    format_duration(retry.give_up_after)
                ),
                http_status,
                kept: None,
            };
        };
        // The last try lands on the deadline, or on the expiry, rather than after it.
        let mut delay = backoff.max(at_least).min(left);
        if let Some(left) = until_expiry {
            delay = delay.min(Duration::from_secs_f64(left));
        }
        Finish::Retry {
            delay,
            error: reason.to_owned(),
            http_status,
        }
    };
    let file = |p: &crate::store::Published| FileRecord {
        path: p.path.clone(),
        sha256: p.sha256.clone(),
        bytes: p.bytes,
        metadata: p.metadata.clone(),
    };
    let finish = match &ended.outcome {
        Outcome::Archived {
            published,
            http_status,
            ..
        } => Finish::Done {
            file: file(published),
            http_status: *http_status,
        },
        // Failed, so that `done` keeps meaning "complete and checked"; kept, so that nothing
        // the API has is thrown away.
        Outcome::Kept {
            published,
            http_status,
            reason,
        } => Finish::Failed {
            error: reason.clone(),
            http_status: Some(*http_status),
            kept: Some(file(published)),
        },
        Outcome::NotReady {
            http_status,
            reason,
        } => retry_or_give_up(Some(*http_status), reason, Duration::ZERO),
        // The second confirmation must come at least `retry.initial_delay` later, and when the
        // status object may be read again.
        Outcome::MaybeMissing { reason } => retry_or_give_up(
            Some(404),
            reason,
            retry.initial_delay.max(status_interval(retry)),
        ),
        Outcome::Transient {
            http_status,
            reason,
        } => retry_or_give_up(*http_status, reason, Duration::ZERO),
        Outcome::Gone {
            http_status,
            reason,
        } => Finish::Failed {
            error: reason.clone(),
            http_status: Some(*http_status),
            kept: None,
        },
        Outcome::Blocked { reason } => Finish::Failed {
            error: reason.clone(),
            http_status: None,
            kept: None,
        },
        Outcome::InvalidId => Finish::Failed {
            error: "invalid video id".into(),
            http_status: None,
            kept: None,
        },
        // The token's fault or the video's: the scheduler finds out which (`Scheduler::absorb`)
        // and fails the video itself when it is the video's. Meanwhile nothing counts against
        // it; the probe goes to another video (`Queue::claim`'s `except`).
        Outcome::AccountProblem {
            http_status,
            reason,
        } => Finish::Release {
            delay: Duration::ZERO,
            error: Some(format!(
                "waiting: the API refused the token or this video ({http_status}): {reason}"
            )),
        },
        Outcome::RateLimited { retry_after } => Finish::Release {
            delay: rate_limit_wait(retry, *retry_after, backoff).0,
            error: Some("waiting: rate limited (429)".into()),
        },
        // Given back, but not due at once: the row is written before the loop hears of the
        // outage and pauses, and a look in between must not retry it straight away.
        Outcome::Unreachable { reason } => Finish::Release {
            delay: backoff,
            error: Some(format!("waiting: API unreachable: {reason}")),
        },
        Outcome::Interrupted { .. } => Finish::Release {
            delay: Duration::ZERO,
            error: None,
        },
        Outcome::Storage { reason } | Outcome::DiskShort { reason } => Finish::Release {
            delay: backoff,
            error: Some(format!("archive error: {reason}")),
        },
        Outcome::StoreAway { reason } => Finish::Release {
            delay: backoff,
            error: Some(format!(
                "waiting: {reason}; a finished download stays staged until it is uploaded"
            )),
        },
    };
    // Given back for the client's sake (a refused token, a 429, an outage, the disk), a video
    // past its expiry is still gone: waiting for it is pointless. (Not on a shutdown: the next
    // start asks the API once more.)
    // Except for the archive's store: a finished download waits staged for it whatever the
    // expiry (the API is not asked again), and one not started cannot be known to be lost
    // until the store can be asked whether it holds the video.
    match finish {
        Finish::Release {
            error: Some(error), ..
        } if until_expiry.is_some_and(|left| left <= 0.0)
            && !matches!(ended.outcome, Outcome::StoreAway { .. }) =>
        {
            Finish::Failed {
                error: format!("{}: {error}", expired_words(expires_at)),
                http_status: match &ended.outcome {
                    Outcome::AccountProblem { http_status, .. } => Some(*http_status),
                    _ => None,
                },
                kept: None,
            }
        }
        other => other,
    }
}

/// How long the whole client waits after a 429: `Retry-After` (or, without one, `otherwise`),
/// never less than `retry.initial_delay` (0, or a date in the past, is no invitation to
/// hammer) and never more than `retry.max_delay` (a wait longer than a video lives is not
/// obeyed blindly). Also says whether it was cut short, in which case one request probes
/// before the others follow.
pub fn rate_limit_wait(
    retry: &RetryConfig,
    retry_after: Option<Duration>,
    otherwise: Duration,
) -> (Duration, bool) {
    let asked = retry_after.unwrap_or(otherwise);
    (
        asked.clamp(retry.initial_delay, retry.max_delay),
        asked > retry.max_delay,
    )
}

/// Exponential backoff with jitter: `initial * 2^(attempt-1)`, capped, then drawn uniformly
/// from its upper half so that videos enqueued together do not retry in lockstep.
pub fn backoff(retry: &RetryConfig, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let base = retry
        .initial_delay
        .saturating_mul(1u32 << exp)
        .min(retry.max_delay);
    let half = base / 2;
    half + half.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry() -> RetryConfig {
        RetryConfig {
            initial_delay: Duration::from_secs(30),
            max_delay: Duration::from_secs(600),
            give_up_after: Duration::from_secs(3600),
        }
    }

    fn claimed(attempts: u32, since: u64, expires_at: Option<i64>) -> Claimed {
        Claimed {
            row: crate::queue::RowId(b"tv".to_vec()),
            video_id: "v".into(),
            token: "t".into(),
            attempts,
            since_first_attempt: Duration::from_secs(since),
            expires_at,
        }
    }

    fn decide_now(c: &Claimed, o: Outcome) -> Finish {
        decide(c, &o.into(), &retry(), Duration::ZERO, SystemTime::now())
    }

    fn unix_now() -> i64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let r = retry();
        for attempt in 1..40 {
            let full = (Duration::from_secs(30) * 2u32.pow((attempt - 1).min(10))).min(r.max_delay);
            let d = backoff(&r, attempt);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d:?} vs {full:?}"
            );
        }
    }

    #[test]
    fn not_ready_retries_until_the_deadline() {
        let o = || Outcome::NotReady {
            http_status: 400,
            reason: "not ready".into(),
        };
        assert!(matches!(
            decide_now(&claimed(3, 0, None), o()),
            Finish::Retry { .. }
        ));
        match decide_now(&claimed(3, 3590, None), o()) {
            Finish::Retry { delay, .. } => assert!(delay <= Duration::from_secs(10)),
            f => panic!("{f:?}"),
        }
        match decide_now(&claimed(3, 3600, None), o()) {
            Finish::Failed {
                error, http_status, ..
            } => {
                assert!(error.contains("gave up after 1h"), "{error}");
                assert_eq!(http_status, Some(400));
            }
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn past_its_expiry_a_video_fails_and_before_it_the_last_try_lands_on_it() {
        let o = || Outcome::NotReady {
            http_status: 400,
            reason: "video not ready".into(),
        };
        match decide_now(&claimed(1, 0, Some(unix_now() - 5)), o()) {
            Finish::Failed {
                error, http_status, ..
            } => {
                assert!(error.starts_with("expired at "), "{error}");
                assert!(
                    error.contains("before it could be downloaded: video not ready"),
                    "{error}"
                );
                assert_eq!(http_status, Some(400));
            }
            f => panic!("{f:?}"),
        }
        match decide_now(&claimed(9, 0, Some(unix_now() + 10)), o()) {
            Finish::Retry { delay, .. } => assert!(delay <= Duration::from_secs(10), "{delay:?}"),
            f => panic!("{f:?}"),
        }
        // What the attempt learned counts over what the row said.
        let ended = Ended {
            outcome: o(),
            expires_at: Some(unix_now() - 1),
        };
        let f = decide(
            &claimed(1, 0, Some(unix_now() + 3600)),
            &ended,
            &retry(),
            Duration::ZERO,
            SystemTime::now(),
        );
        assert!(matches!(f, Finish::Failed { .. }), "{f:?}");
        // A download that completes is never failed for its expiry.
        let published = crate::store::Published {
            path: "/a/v.mp4".into(),
            sha256: "00".into(),
            bytes: 1,
            metadata: None,
        };
        let done = Outcome::Archived {
            published,
            http_status: 200,
            received: 1,
            resumed_from: 0,
        };
        assert!(matches!(
            decide_now(&claimed(1, 0, Some(unix_now() - 5)), done),
            Finish::Done { .. }
        ));
    }

    #[test]
    fn a_first_404_confirmation_waits_until_the_status_may_be_read_again() {
        for _ in 0..20 {
            match decide_now(
                &claimed(1, 0, None),
                Outcome::MaybeMissing { reason: "x".into() },
            ) {
                Finish::Retry {
                    delay, http_status, ..
                } => {
                    // retry.initial_delay is 30 s; the status object is read once a minute.
                    assert!(delay >= Duration::from_secs(60), "{delay:?}");
                    assert_eq!(http_status, Some(404));
                }
                f => panic!("{f:?}"),
            }
        }
    }

    #[test]
    fn rate_limit_waits_are_floored_and_capped() {
        let r = retry();
        let b = Duration::from_secs(45);
        assert_eq!(
            rate_limit_wait(&r, Some(Duration::ZERO), b),
            (r.initial_delay, false)
        );
        assert_eq!(
            rate_limit_wait(&r, Some(Duration::from_secs(3600)), b),
            (r.max_delay, true)
        );
        assert_eq!(
            rate_limit_wait(&r, Some(Duration::from_secs(90)), b),
            (Duration::from_secs(90), false)
        );
        assert_eq!(rate_limit_wait(&r, None, b), (b, false));
    }

    #[test]
    fn gone_kept_blocked_and_invalid_fail_account_problems_do_not() {
        let c = claimed(1, 99_999, None);
        let gone = Outcome::Gone {
            http_status: 404,
            reason: "x".into(),
        };
        assert!(matches!(
            decide_now(&c, gone),
            Finish::Failed {
                http_status: Some(404),
                kept: None,
                ..
            }
        ));
        assert!(matches!(
            decide_now(&c, Outcome::InvalidId),
            Finish::Failed { .. }
        ));
        assert!(matches!(
            decide_now(
                &c,
                Outcome::Blocked {
                    reason: "dir".into()
                }
            ),
            Finish::Failed { .. }
        ));
        let kept = Outcome::Kept {
            published: crate::store::Published {
                path: "/a/v.mp4".into(),
                sha256: "ab".into(),
                bytes: 7,
                metadata: None,
            },
            http_status: 200,
            reason: "the API served an incomplete MP4 twice: x".into(),
        };
        match decide_now(&c, kept) {
            Finish::Failed {
                kept: Some(f),
                error,
                ..
            } => assert_eq!(
                (f.path.as_str(), f.bytes, &error[..7]),
                ("/a/v.mp4", 7, "the API")
            ),
            f => panic!("{f:?}"),
        }
        let auth = || Outcome::AccountProblem {
            http_status: 401,
            reason: "bad".into(),
        };
        assert!(matches!(decide_now(&c, auth()), Finish::Release { .. }));
        // Past its expiry, a video given back is failed: nothing would come of waiting.
        let expired = claimed(1, 0, Some(unix_now() - 1));
        match decide_now(&expired, auth()) {
            Finish::Failed {
                error, http_status, ..
            } => assert!(
                error.starts_with("expired at ") && http_status == Some(401),
                "{error}"
            ),
            f => panic!("{f:?}"),
        }
        assert!(matches!(
            decide_now(&expired, Outcome::Interrupted { parked_bytes: 0 }),
            Finish::Release { .. }
        ));
    }
}
