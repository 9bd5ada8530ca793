//! Talking to systemd through the sd_notify protocol: readiness, a status line in an operator's
//! words, the watchdog, reloading and stopping. Without `NOTIFY_SOCKET` every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::Instant;

pub struct Service {
    /// Ping interval: half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3) advises.
    watchdog: Option<Duration>,
    last_ping: Instant,
    last_status: String,
}

impl Service {
    pub fn from_env() -> Service {
        Service {
            watchdog: sd_notify::watchdog_enabled().map(|d| d / 2),
            last_ping: Instant::now(),
            last_status: String::new(),
        }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }

    pub fn ready(&self) {
        self.send(&[NotifyState::Ready]);
    }

    pub fn reloading(&self) {
        let now = NotifyState::monotonic_usec_now().ok();
        match now {
            Some(t) => self.send(&[NotifyState::Reloading, t]),
            None => self.send(&[NotifyState::Reloading]),
        }
    }

    /// Shutting down, which may take up to `drain` (plus a margin).
    pub fn stopping(&self, drain: Duration) {
        let usec = (drain + Duration::from_secs(5))
            .as_micros()
            .min(u32::MAX as u128) as u32;
        self.send(&[
            NotifyState::Stopping,
            NotifyState::ExtendTimeoutUsec(usec),
            NotifyState::Status("stopping"),
        ]);
    }

    /// Sends the status line if it changed.
    pub fn status(&mut self, text: String) {
        if text != self.last_status {
            self.send(&[NotifyState::Status(&text)]);
            self.last_status = text;
        }
    }

    /// When the next watchdog ping is due, if the watchdog is on.
    pub fn ping_due(&self) -> Option<Instant> {
        self.watchdog.map(|w| self.last_ping + w)
    }

    /// Called by the scheduler loop each time round: the ping proves the loop turns, so a
    /// loop stuck anywhere stops pinging and systemd restarts the service.
    pub fn ping_if_due(&mut self) {
        if let Some(due) = self.ping_due()
            && Instant::now() >= due
        {
            self.send(&[NotifyState::Watchdog]);
            self.last_ping = Instant::now();
        }
    }
}

/// `18044` → `18,044`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands() {
        assert_eq!(super::thousands(0), "0");
        assert_eq!(super::thousands(999), "999");
        assert_eq!(super::thousands(18044), "18,044");
        assert_eq!(super::thousands(1234567), "1,234,567");
    }
}
