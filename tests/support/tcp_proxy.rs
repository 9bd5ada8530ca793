//! A TCP forwarder on a loopback port of its own, in front of a server whose port may change
//! (Garage restarted after a kill cannot bind its old port while the killed one's connections
//! sit in TIME_WAIT). It can also reset connections mid-stream: after `reset_next(n, after)`,
//! the first `n` connections (open or new: clients pool them) whose client sends more than
//! `after` bytes from then on are cut with a TCP RST, as a store restarting or a middlebox
//! dropping state would.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
}

struct Shared {
    target: AtomicU16,
    /// Bumped by each `reset_next`: a connection counts its bytes from the last one it saw.
    armed: AtomicU64,
    /// Connections still to reset, and after how many client bytes.
    resets_left: AtomicUsize,
    reset_after: AtomicU64,
    /// Connections reset so far.
    resets_done: AtomicUsize,
    /// Bytes a second each connection may carry from the client (0: unlimited).
    rate: AtomicU64,
    accepted: AtomicUsize,
}

impl Proxy {
    pub fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            target: AtomicU16::new(target),
            armed: AtomicU64::new(0),
            resets_left: AtomicUsize::new(0),
            reset_after: AtomicU64::new(0),
            resets_done: AtomicUsize::new(0),
            rate: AtomicU64::new(0),
            accepted: AtomicUsize::new(0),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let s = s.clone();
                std::thread::spawn(move || serve(client, &s));
            }
        });
        Proxy { port, shared }
    }

    pub fn retarget(&self, port: u16) {
        self.shared.target.store(port, Ordering::SeqCst);
    }

    /// The next `n` connections are reset once their client has sent `after` bytes.
    pub fn reset_next(&self, n: usize, after: u64) {
        self.shared.reset_after.store(after, Ordering::SeqCst);
        self.shared.resets_left.store(n, Ordering::SeqCst);
        self.shared.armed.fetch_add(1, Ordering::SeqCst);
    }

    /// Each connection carries at most this many bytes a second from its client (a slow
    /// uplink); 0 lifts the limit.
    pub fn throttle(&self, bytes_per_second: u64) {
        self.shared.rate.store(bytes_per_second, Ordering::SeqCst);
    }

    pub fn resets_done(&self) -> usize {
        self.shared.resets_done.load(Ordering::SeqCst)
    }

    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

fn rst(s: &TcpStream) {
    // SO_LINGER with a zero timeout: close(2) sends a RST instead of a FIN.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt on a socket this process owns, with a correctly sized struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let _ = s.shutdown(Shutdown::Both);
}

fn serve(client: TcpStream, s: &Shared) {
    s.accepted.fetch_add(1, Ordering::SeqCst);
    let target = s.target.load(Ordering::SeqCst);
    let Ok(upstream) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], target).into(), Duration::from_secs(5))
    else {
        rst(&client);
        return;
    };

    let (mut c_read, mut u_write) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let (mut u_read, mut c_write) = (upstream.try_clone().unwrap(), client.try_clone().unwrap());
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut u_read, &mut c_write);
        let _ = c_write.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 16 * 1024];
    let mut sent = 0u64;
    let begun = std::time::Instant::now();
    let (mut seen, mut base) = (s.armed.load(Ordering::SeqCst), 0u64);
    loop {
        let n = match c_read.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let armed = s.armed.load(Ordering::SeqCst);
        if armed != seen {
            (seen, base) = (armed, sent);
        }
        let cut = sent + n as u64 - base > s.reset_after.load(Ordering::SeqCst)
            && s.resets_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| k.checked_sub(1))
                .is_ok();
        if cut {
            s.resets_done.fetch_add(1, Ordering::SeqCst);
            rst(&client);
            rst(&upstream);
            break;
        }
        if u_write.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
        let rate = s.rate.load(Ordering::SeqCst);
        if rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(begun.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    let _ = u_write.shutdown(Shutdown::Write);
    let _ = back.join();
}
