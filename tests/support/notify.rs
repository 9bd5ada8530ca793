//! systemd's side of sd_notify for the tests: a datagram socket a daemon is pointed at
//! (`NOTIFY_SOCKET`), whose messages a thread collects as they arrive.

#![allow(dead_code)]

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use super::harness::{DEADLINE, Env};

type Received = Arc<(Mutex<Vec<(Instant, String)>>, Condvar)>;

/// Messages a daemon sends to `NOTIFY_SOCKET`, collected by a thread as they arrive.
pub struct NotifySocket {
    path: std::path::PathBuf,
    log: Received,
}

impl NotifySocket {
    pub fn bind(env: &Env) -> NotifySocket {
        let path = env.dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let log: Received = Arc::default();
        let l = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let (m, cv) = &*l;
                m.lock().unwrap().push((
                    Instant::now(),
                    String::from_utf8_lossy(&buf[..n]).trim_end().to_owned(),
                ));
                cv.notify_all();
            }
        });
        NotifySocket { path, log }
    }

    pub fn env(&self) -> (&'static str, String) {
        ("NOTIFY_SOCKET", self.path.to_str().unwrap().to_owned())
    }

    pub fn messages(&self) -> Vec<(Instant, String)> {
        self.log.0.lock().unwrap().clone()
    }

    /// Waits until some message satisfies `pred`; returns when it arrived.
    pub fn wait(&self, what: &str, pred: impl Fn(&str) -> bool) -> Instant {
        self.wait_n(what, 1, pred)
    }

    /// Waits until `n` messages satisfy `pred`; returns when the n-th arrived.
    pub fn wait_n(&self, what: &str, n: usize, pred: impl Fn(&str) -> bool) -> Instant {
        let (m, cv) = &*self.log;
        let deadline = Instant::now() + DEADLINE;
        let mut g = m.lock().unwrap();
        loop {
            if let Some((t, _)) = g.iter().filter(|(_, msg)| pred(msg)).nth(n - 1) {
                return *t;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no sd_notify message {what}; the last ones: {:?}",
                &g[g.len().saturating_sub(10)..]
            );
            g = cv.wait_timeout(g, left).unwrap().0;
        }
    }
}
