//! The pauses that hold back every new download (a refused token, a 429, an unreachable API,
//! a short disk): their state and how they end (`Pauses`), and what the daemon publishes of
//! them, to the queue for `hingnetd status` and to the metrics.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{RetryConfig, format_duration};
use crate::policy::{backoff, rate_limit_wait};
use crate::queue::Claimed;

/// Why new downloads wait. A closed set: it is a metrics label, and `status` names each. In
/// the order an operator acts on them (`Ord`): a short disk and a refused token first, then
/// the pauses that end by themselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The archive's disk is short of `archive.min_free`, or its directory is unusable.
    Storage,
    /// The API refused the token (or a video: a probe tells which).
    Token,
    /// 429: the whole client waits.
    RateLimited,
    /// The API host could not be reached.
    Unreachable,
}

impl Reason {
    pub const ALL: [Reason; 4] = [
        Reason::Storage,
        Reason::Token,
        Reason::RateLimited,
        Reason::Unreachable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Token => "token",
            Reason::RateLimited => "rate_limited",
            Reason::Unreachable => "unreachable",
            Reason::Storage => "storage",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// One pause in force, as the scheduler sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pause {
    pub reason: Reason,
    /// What is wrong, in words.
    pub detail: String,
    /// When new downloads may start again, if a deadline is known (the end of a 429's wait,
    /// the next probe of a refused token).
    pub until: Option<Instant>,
    /// What the operator can do about it, where the daemon runs.
    pub advice: Option<String>,
}

/// A pause to store: times relative to now, so that the database's clock stamps them.
#[derive(Clone, Debug)]
pub struct Record {
    pub reason: Reason,
    pub detail: String,
    pub since_ago: Duration,
    pub until_in: Option<Duration>,
    pub advice: Option<String>,
}

/// A pause as stored for `hingnetd status`: times are UTC, in the queue's timestamp format.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Published {
    pub reason: Reason,
    pub detail: String,
    pub since: String,
    pub until: Option<String>,
    pub advice: Option<String>,
}

/// While new downloads wait for the archive's disk, how often it is looked at again.
const STORAGE_RECHECK: Duration = Duration::from_secs(2);

/// Every client-wide pause in one place: a 429's wait, an unreachable API host, a refused
/// token (`AccountPause`), a short disk; how many new downloads they allow; when each ends;
/// and what was last published of them. The scheduler feeds it each attempt's outcome and
/// does the I/O (probes, the queue, the archive) it calls for.
#[derive(Default)]
pub struct Pauses {
    rate_limited_until: Option<Instant>,
    /// 429s without a success in between: the client-wide wait grows with them when the
    /// server gives no `Retry-After`.
    rate_limits_in_a_row: u32,
    /// A `Retry-After` longer than `retry.max_delay` was cut short: when the wait ends, one
    /// request goes first, and the rest follow once it is answered with something else.
    rate_probe: bool,
    /// The API host could not be reached: nothing is requested until then.
    unreachable_until: Option<Instant>,
    unreachable_in_a_row: u32,
    pub account: Option<AccountPause>,
    /// Refusals of a video while the API accepted the token for others (see `AccountPause`),
    /// by video; in memory, so a restart starts the count again.
    pub refusals: HashMap<String, u32>,
    storage: Option<StoragePause>,
    /// The pauses last published, and since when each has been in force.
    published: Vec<Pause>,
    since: HashMap<Reason, Instant>,
}

/// New downloads wait: the archive's disk is short of `archive.min_free`, or its directory is
/// gone. Downloads in flight go on; the condition is checked again every `STORAGE_RECHECK`.
struct StoragePause {
    reason: String,
    next_check: Instant,
}

/// The API refused (401/402/403): the token, or only the videos it was refused for? Until a
/// probe tells, every download pauses and one probe runs at a time, on another video than the
/// suspects when there is one. A refusal of another video confirms an account problem (probes
/// then back off, and the token is re-read before each); an answer that is not a refusal ends
/// the pause, and if no other video was refused meanwhile, each suspect's refusal counts
/// against that video (`Pauses::refusals`).
pub struct AccountPause {
    /// When the first refusal was heard.
    pub since: Instant,
    pub next_probe: Instant,
    pub delay: Duration,
    /// A video other than the first suspects was refused: the token itself.
    pub confirmed: bool,
    /// The probe in flight.
    pub probe: Option<tokio::task::Id>,
    /// The videos refused since the pause began, and what the API said.
    pub suspects: HashMap<String, (Claimed, u16, String)>,
}

impl AccountPause {
    /// A probe may go now: on another video at once while unconfirmed, on any at its time.
    fn probe_now(&self, now: Instant) -> bool {
        self.probe.is_none() && (!self.confirmed || self.next_probe <= now)
    }
}

impl Pauses {
    /// Ends the 429 and unreachable-host waits whose time has come; whether one ended.
    pub fn expire(&mut self, now: Instant) -> bool {
        let rate = self.rate_limited_until.take_if(|t| *t <= now).is_some();
        let host = self.unreachable_until.take_if(|t| *t <= now).is_some();
        rate || host
    }

    /// How many new downloads may start now, with `running` in flight.
    pub fn slots(&self, concurrency: usize, running: usize, now: Instant) -> usize {
        if self.rate_limited_until.is_some() || self.unreachable_until.is_some() {
            0
        } else if let Some(a) = &self.account {
            // One probe at a time, when its time comes, and only once the downloads in flight
            // have said what they had to say about the token.
            usize::from(running == 0 && a.probe_now(now))
        } else if self.rate_probe {
            usize::from(running == 0)
        } else {
            concurrency.saturating_sub(running)
        }
    }

    /// The archive was found short a moment ago: not worth looking at again yet.
    pub fn storage_resting(&self, now: Instant) -> bool {
        self.storage.as_ref().is_some_and(|s| s.next_check > now)
    }

    /// What a look at the archive found (`problem`, or none). Returns whether its pause began
    /// or ended.
    pub fn storage_seen(&mut self, problem: Option<String>, now: Instant) -> bool {
        match problem {
            Some(reason) => {
                let began = self.storage.is_none();
                if began {
                    tracing::error!(reason = %reason, "NEW DOWNLOADS PAUSED until the archive can take them again");
                }
                self.storage = Some(StoragePause {
                    reason,
                    next_check: now + STORAGE_RECHECK,
                });
                began
            }
            None => {
                let ended = self.storage.take().is_some();
                if ended {
                    tracing::info!("archive storage is usable again: downloads resumed");
                }
                ended
            }
        }
    }

    /// A download stopped for the disk while writing.
    pub fn disk_short(&mut self, reason: String) {
        self.storage_seen(Some(reason), Instant::now());
    }

    /// A 429: the whole client waits (see `policy::rate_limit_wait`).
    pub fn rate_limited(&mut self, retry: &RetryConfig, retry_after: Option<Duration>) {
        self.rate_limits_in_a_row += 1;
        let (wait, cut) = rate_limit_wait(
            retry,
            retry_after,
            backoff(retry, self.rate_limits_in_a_row),
        );
        let until = Instant::now() + wait;
        if self.rate_limited_until.is_none_or(|t| t < until) {
            if cut {
                tracing::warn!(
                    retry_after = %format_duration(retry_after.unwrap_or_default()),
                    wait = %format_duration(wait),
                    "rate limited (429) for longer than retry.max_delay: pausing all requests that long, then probing with one"
                );
            } else {
                tracing::warn!(wait = %format_duration(wait), "rate limited (429): pausing all requests");
            }
            self.rate_limited_until = Some(until);
        }
        self.rate_probe |= cut;
    }

    /// The API host could not be reached: nothing is requested for a backoff that grows with
    /// each such attempt in a row. Returns whether the wait began or grew.
    pub fn unreachable(&mut self, retry: &RetryConfig, reason: &str) -> bool {
        self.unreachable_in_a_row += 1;
        let wait = backoff(retry, self.unreachable_in_a_row);
        let until = Instant::now() + wait;
        if self.unreachable_until.is_none_or(|t| t < until) {
            tracing::warn!(reason = %reason, wait = %format_duration(wait), "API host unreachable: pausing all requests");
            self.unreachable_until = Some(until);
            return true;
        }
        false
    }

    /// The API answered `video` with something other than a refusal, a 429 or nothing: the
    /// waits that answer ends. Returns the token pause if the answer ends it (a request sent
    /// before the first refusal proves nothing about the token now: it may have been revoked
    /// in between; only a later one, the probe's or another's, does).
    pub fn answered(&mut self, video: &str, started: Instant) -> Option<AccountPause> {
        self.rate_limits_in_a_row = 0;
        self.rate_probe = false;
        self.refusals.remove(video);
        if std::mem::take(&mut self.unreachable_in_a_row) > 0 {
            tracing::info!("API host reachable again");
        }
        self.account.take_if(|a| started >= a.since)
    }

    /// When a pause's end calls for a look at the queue. A probe waits for the downloads in
    /// flight (`idle`: there are none; their completion wakes the loop) and for any other
    /// pause to end: a probe time that has passed must not wake the loop while it cannot
    /// probe.
    pub fn deadlines(&self, idle: bool) -> impl Iterator<Item = Instant> {
        let others_over = self.rate_limited_until.is_none()
            && self.unreachable_until.is_none()
            && self.storage.is_none();
        let probe = self
            .account
            .as_ref()
            .filter(|a| a.probe.is_none() && idle && others_over)
            .map(|a| a.next_probe);
        [
            self.rate_limited_until,
            self.unreachable_until,
            self.storage.as_ref().map(|s| s.next_check),
            probe,
        ]
        .into_iter()
        .flatten()
    }

    /// Every pause in force now, in `Reason`'s order: the one to act on first first.
    /// `storage_advice` says what to do about a short disk.
    pub fn in_force(&self, storage_advice: impl FnOnce(&str) -> String) -> Vec<Pause> {
        let mut out = Vec::new();
        if let Some(s) = &self.storage {
            out.push(Pause {
                reason: Reason::Storage,
                detail: s.reason.clone(),
                until: None,
                advice: Some(storage_advice(&s.reason)),
            });
        }
        if let Some(a) = &self.account {
            // The first suspect by ID, so that the text does not change from look to look.
            let first = a.suspects.iter().min_by(|x, y| x.0.cmp(y.0));
            let said = first.map_or(String::new(), |(video, (_, status, reason))| {
                format!(" (HTTP {status} for {video}: {reason})")
            });
            out.push(Pause {
                reason: Reason::Token,
                detail: if a.confirmed {
                    format!("API rejected the token{said}")
                } else {
                    format!("API refused a video; probing whether it is the token{said}")
                },
                until: a.probe.is_none().then_some(a.next_probe),
                advice: Some(if a.confirmed {
                    format!("fix the token: {}", token_advice())
                } else {
                    "none yet: one probe on another video tells whether the token or the video is refused".into()
                }),
            });
        }
        if let Some(until) = self.rate_limited_until {
            out.push(Pause {
                reason: Reason::RateLimited,
                detail: if self.rate_probe {
                    "rate limited (429); one request probes before the rest follow".into()
                } else {
                    "rate limited (429)".into()
                },
                until: Some(until),
                advice: None,
            });
        }
        if let Some(until) = self.unreachable_until {
            out.push(Pause {
                reason: Reason::Unreachable,
                detail: format!(
                    "API host unreachable ({} attempt(s) in a row)",
                    self.unreachable_in_a_row
                ),
                until: Some(until),
                advice: Some(
                    "check the network, DNS and any proxy (HTTPS_PROXY) on the way to api.base_url"
                        .into(),
                ),
            });
        }
        out
    }

    /// `now` (from `in_force`) as records to publish, if it differs from what was last
    /// published; `published` says when the records were stored.
    pub fn unpublished(&mut self, now: &[Pause]) -> Option<Vec<Record>> {
        if now == self.published {
            return None;
        }
        let at = Instant::now();
        self.since.retain(|r, _| now.iter().any(|p| p.reason == *r));
        Some(
            now.iter()
                .map(|p| Record {
                    reason: p.reason,
                    detail: p.detail.clone(),
                    since_ago: at - *self.since.entry(p.reason).or_insert(at),
                    until_in: p.until.map(|u| u.saturating_duration_since(at)),
                    advice: p.advice.clone(),
                })
                .collect(),
        )
    }

    pub fn published(&mut self, now: Vec<Pause>) {
        self.published = now;
    }
}

/// How an operator gets a fixed token to the daemon, where it runs: under systemd the token is
/// a credential, copied once per start, so only a restart reads a new one; otherwise the token
/// file is re-read before each probe, and SIGHUP probes at once.
pub fn token_advice() -> String {
    if std::env::var_os("CREDENTIALS_DIRECTORY").is_some() {
        "systemd copies the credential only at start: put the new token in the file LoadCredential= names (/etc/hingnetd/token in the packaged unit), then run `systemctl restart hingnetd`".into()
    } else {
        format!(
            "write the new token where the daemon reads it; it is re-read before each probe, and `kill -HUP {}` probes at once",
            std::process::id()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_serializes_as_its_label() {
        for r in Reason::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
    }
}
