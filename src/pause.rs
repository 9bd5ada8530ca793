//! The pauses that hold back every new download (a refused token, a 429, an unreachable API,
//! a short disk) as the daemon publishes them: to the queue database for `hingnetd status`, and
//! to the metrics.

use std::time::Duration;

use tokio::time::Instant;

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
