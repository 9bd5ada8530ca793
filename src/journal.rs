//! Native journald logging: whether stderr is the journal, and the `tracing` layer that sends
//! each event to journald as one datagram with its fields as journal fields of their own.
//!
//! Not the tracing-journald crate: it puts only the event's message in `MESSAGE`, so
//! `journalctl -u hingnetd` would read "archived" without saying which video. Here `MESSAGE` is
//! the line the text log shows (message, then ` key=value` fields) without the timestamp and
//! level, which the journal records itself; and each field is also a journal field
//! (`video_id` → `VIDEO_ID=`, `http_status` → `HTTP_STATUS=`), for `journalctl VIDEO_ID=…`.
//!
//! Priorities: ERROR 3 (err), WARN 4 (warning), INFO 6 (info), DEBUG and TRACE 7 (debug).
//! tracing-journald maps INFO to 5 (notice) and DEBUG to 6; here INFO is routine ("archived",
//! "ready"), which syslog calls info, and anything an operator must look at is logged at WARN or
//! ERROR: so `-p warning` is exactly what needs attention, and `-p notice` shows the same (the
//! daemon sends nothing at 5), and DEBUG is `debug` under its own name.
//!
//! Field names: upper-cased, any character but A-Z 0-9 _ made `_`, at most 64 characters
//! (journald drops fields that break its rules). A name journald or this layer gives a meaning
//! of its own (`MESSAGE`, `PRIORITY`, `TARGET`, `SYSLOG_*`, `CODE_*`, a leading `_` for trusted
//! fields, and the others in `reserved`), or one journald would refuse (a leading digit), gets
//! the prefix `F_`: an event field `message` or `priority` is `F_MESSAGE` or `F_PRIORITY`, and
//! never changes the entry's own.
//!
//! Delivery: a datagram per event to `/run/systemd/journal/socket`, sent with a one-second
//! timeout (journald pushes back with a full receive queue when it is slow: a short wait rides
//! out a burst, an unbounded one would stall the runtime's threads behind a hung journald). After
//! a timeout, sends do not wait at all until one gets through again, so a stuck journald costs
//! one second, not one per line. An event that cannot be sent (too big for a datagram, journald
//! gone, no room) is written to stderr instead, which is the journal's stream for this process.

use std::ffi::OsStr;
use std::fmt;
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::os::fd::RawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Where journald reads native-protocol datagrams.
pub const SOCKET: &str = "/run/systemd/journal/socket";
/// `SYSLOG_IDENTIFIER=`: what `journalctl -t` and the short output name the lines by.
pub const IDENTIFIER: &str = "hingnetd";
const SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// journald ignores fields with longer names.
const MAX_NAME: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("no journal socket at {}: {source}", path.display())]
    NoSocket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create a socket to send to the journal: {0}")]
    Socket(#[source] io::Error),
}

/// systemd's documented test: `JOURNAL_STREAM` is `<st_dev>:<st_ino>` of the stream it connected
/// stdout/stderr to; a child that inherited the variable but not the stream must not take it.
pub fn stderr_is_journal() -> bool {
    is_journal_stream(
        std::env::var_os("JOURNAL_STREAM").as_deref(),
        std::os::fd::AsRawFd::as_raw_fd(&io::stderr()),
    )
}

fn is_journal_stream(value: Option<&OsStr>, fd: RawFd) -> bool {
    let Some((dev, ino)) = value
        .and_then(OsStr::to_str)
        .and_then(|v| v.split_once(':'))
    else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    crate::sys::fd_identity(fd) == Some((dev, ino))
}

/// The layer. `W` is where events go when the journal does not take them: stderr, except in tests.
pub struct JournalLayer<W = fn() -> io::Stderr> {
    path: PathBuf,
    /// Sends wait up to `SEND_TIMEOUT`.
    socket: UnixDatagram,
    /// Sends never wait: used while `congested`.
    quick: UnixDatagram,
    congested: AtomicBool,
    /// Whether stderr has been told why lines are arriving there.
    told: AtomicBool,
    fallback: W,
}

impl JournalLayer {
    /// To journald's socket, with stderr for what it does not take.
    pub fn new() -> Result<JournalLayer, JournalError> {
        JournalLayer::with(SOCKET, io::stderr as fn() -> io::Stderr)
    }
}

impl<W> JournalLayer<W> {
    /// Fails when there is no socket at `path` now: the caller then logs to stderr throughout,
    /// rather than every event first failing a send. Not connected: each send names the path,
    /// so a restarted journald's new socket is found.
    pub fn with(path: impl AsRef<Path>, fallback: W) -> Result<JournalLayer<W>, JournalError> {
        let path = path.as_ref().to_path_buf();
        match std::fs::metadata(&path) {
            Ok(m) if m.file_type().is_socket() => {}
            Ok(_) => {
                return Err(JournalError::NoSocket {
                    path,
                    source: io::Error::other("not a socket"),
                });
            }
            Err(source) => return Err(JournalError::NoSocket { path, source }),
        }
        let socket = UnixDatagram::unbound().map_err(JournalError::Socket)?;
        socket
            .set_write_timeout(Some(SEND_TIMEOUT))
            .map_err(JournalError::Socket)?;
        let quick = UnixDatagram::unbound().map_err(JournalError::Socket)?;
        quick.set_nonblocking(true).map_err(JournalError::Socket)?;
        Ok(JournalLayer {
            path,
            socket,
            quick,
            congested: AtomicBool::new(false),
            told: AtomicBool::new(false),
            fallback,
        })
    }

    fn send(&self, datagram: &[u8]) -> io::Result<()> {
        if self.congested.load(Ordering::Relaxed) {
            self.quick.send_to(datagram, &self.path)?;
            self.congested.store(false, Ordering::Relaxed);
            return Ok(());
        }
        match self.socket.send_to(datagram, &self.path) {
            Ok(_) => Ok(()),
            Err(e) => {
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    self.congested.store(true, Ordering::Relaxed);
                }
                Err(e)
            }
        }
    }
}

impl<S, W> Layer<S> for JournalLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut fields = Fields::default();
            attrs.record(&mut fields);
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(SpanFields(fields)) = span.extensions_mut().get_mut::<SpanFields>()
        {
            values.record(fields);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        // As the text log shows them: the event's fields, then its spans', outermost first.
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(f)) = span.extensions().get::<SpanFields>() {
                    fields.pairs.extend(f.pairs.iter().cloned());
                }
            }
        }
        let priority = priority(meta.level());
        let line = fields.line();
        let mut datagram = Vec::with_capacity(256 + line.len());
        put(&mut datagram, "PRIORITY", &priority.to_string());
        put(&mut datagram, "SYSLOG_IDENTIFIER", IDENTIFIER);
        put(&mut datagram, "MESSAGE", &line);
        put(
            &mut datagram,
            "TARGET",
            fields.target.as_deref().unwrap_or(meta.target()),
        );
        if let Some(file) = fields.file.as_deref().or(meta.file()) {
            put(&mut datagram, "CODE_FILE", file);
        }
        if let Some(n) = fields.line.or(meta.line()) {
            put(&mut datagram, "CODE_LINE", &n.to_string());
        }
        for (name, value, _) in &fields.pairs {
            put(&mut datagram, &journal_name(name), value);
        }
        match self.send(&datagram) {
            Ok(()) => {
                if self.told.load(Ordering::Relaxed) {
                    self.told.store(false, Ordering::Relaxed);
                }
            }
            Err(e) => {
                // stderr is journald's stream here: a `<N>` prefix is how a line on it says its
                // priority (journald's SyslogLevelPrefix=, on by default).
                let mut w = self.fallback.make_writer();
                if !self.told.swap(true, Ordering::Relaxed) {
                    let _ = writeln!(
                        w,
                        "<4>cannot send to the journal at {} ({e}); writing log lines here until it takes them again",
                        self.path.display()
                    );
                }
                let _ = writeln!(w, "<{priority}>{line}");
            }
        }
    }
}

fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// One field in journald's native protocol: `NAME=value\n`, or, since a newline would end the
/// value, `NAME\n<length: u64 little-endian><value>\n` for a value with one.
fn put(buf: &mut Vec<u8>, name: &str, value: &str) {
    buf.extend_from_slice(name.as_bytes());
    if value.contains('\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value.as_bytes());
    buf.push(b'\n');
}

/// An event or span field's name as a journal field name (see the module comment).
fn journal_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| match c {
            'A'..='Z' | '0'..='9' | '_' => c,
            'a'..='z' => c.to_ascii_uppercase(),
            _ => '_',
        })
        .collect();
    if reserved(&out) {
        out.insert_str(0, "F_");
    }
    // ASCII only by now: truncating at a byte count cuts no character.
    out.truncate(MAX_NAME);
    out
}

/// Names this layer sets, journald sets or interprets, or journald refuses from a client.
fn reserved(name: &str) -> bool {
    name.is_empty()
        || name.starts_with(|c: char| c == '_' || c.is_ascii_digit())
        || matches!(
            name,
            "MESSAGE"
                | "MESSAGE_ID"
                | "PRIORITY"
                | "TARGET"
                | "ERRNO"
                | "TID"
                | "DOCUMENTATION"
                | "INVOCATION_ID"
                | "USER_INVOCATION_ID"
                | "UNIT"
                | "USER_UNIT"
        )
        || ["SYSLOG_", "CODE_", "OBJECT_", "COREDUMP_"]
            .iter()
            .any(|p| name.starts_with(p))
}

/// A span's fields, kept in its extensions for the events inside it.
struct SpanFields(Fields);

#[derive(Default)]
struct Fields {
    message: String,
    /// Name, the value as the journal field holds it, and whether the text line quotes it (as
    /// tracing's fmt output does for string values).
    pairs: Vec<(&'static str, String, bool)>,
    /// An event from the `log` crate says where it is from in `log.*` fields.
    target: Option<String>,
    file: Option<String>,
    line: Option<u32>,
}

impl Fields {
    fn add(&mut self, name: &'static str, value: String, quoted: bool) {
        match name {
            "message" => self.message = value,
            "log.target" => self.target = Some(value),
            "log.file" => self.file = Some(value),
            "log.line" => self.line = value.parse().ok(),
            n if n.starts_with("log.") => {}
            n => self.pairs.push((n, value, quoted)),
        }
    }

    /// The text log's line without its timestamp and level.
    fn line(&self) -> String {
        let mut line = self.message.clone();
        for (name, value, quoted) in &self.pairs {
            if !line.is_empty() {
                line.push(' ');
            }
            let _ = if *quoted {
                write!(line, "{name}={value:?}")
            } else {
                write!(line, "{name}={value}")
            };
        }
        line
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.add(field.name(), value.to_owned(), field.name() != "message");
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.add(field.name(), format!("{value:?}"), false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn field_names_follow_journald_rules() {
        assert_eq!(journal_name("video_id"), "VIDEO_ID");
        assert_eq!(journal_name("http_status"), "HTTP_STATUS");
        assert_eq!(journal_name("log.module"), "LOG_MODULE");
        assert_eq!(journal_name("naïve-name"), "NA_VE_NAME");
        assert_eq!(journal_name("9lives"), "F_9LIVES");
        assert_eq!(journal_name(""), "F_");
        let long = "x".repeat(100);
        assert_eq!(journal_name(&long), "X".repeat(64));
        assert_eq!(journal_name(&format!("_{long}")).len(), 64);
    }

    #[test]
    fn field_names_never_overwrite_the_entrys_own() {
        for (name, journal) in [
            ("message", "F_MESSAGE"),
            ("priority", "F_PRIORITY"),
            ("target", "F_TARGET"),
            ("syslog_identifier", "F_SYSLOG_IDENTIFIER"),
            ("code_line", "F_CODE_LINE"),
            ("_pid", "F__PID"),
            ("_SYSTEMD_UNIT", "F__SYSTEMD_UNIT"),
            ("errno", "F_ERRNO"),
        ] {
            assert_eq!(journal_name(name), journal, "{name}");
        }
        // Only whole names or the reserved prefixes count.
        assert_eq!(journal_name("message_count"), "MESSAGE_COUNT");
        assert_eq!(journal_name("codec"), "CODEC");
    }

    #[test]
    fn values_with_a_newline_use_the_binary_form() {
        let mut buf = Vec::new();
        put(&mut buf, "VIDEO_ID", "video_x");
        assert_eq!(buf, b"VIDEO_ID=video_x\n");
        let mut buf = Vec::new();
        put(&mut buf, "MESSAGE", "two\nlines");
        let mut want = b"MESSAGE\n".to_vec();
        want.extend_from_slice(&9u64.to_le_bytes());
        want.extend_from_slice(b"two\nlines\n");
        assert_eq!(buf, want);
        let mut buf = Vec::new();
        put(&mut buf, "EMPTY", "");
        assert_eq!(buf, b"EMPTY=\n");
    }

    #[test]
    fn journal_stream_must_name_the_descriptor() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let file = tempfile::tempfile().unwrap();
        let m = file.metadata().unwrap();
        let fd = file.as_raw_fd();
        let ours = format!("{}:{}", m.dev(), m.ino());
        assert!(is_journal_stream(Some(OsStr::new(&ours)), fd));
        let other = format!("{}:{}", m.dev(), m.ino() + 1);
        assert!(!is_journal_stream(Some(OsStr::new(&other)), fd));
        for bad in ["", "1", "a:b", ":", "1:2:3"] {
            assert!(!is_journal_stream(Some(OsStr::new(bad)), fd), "{bad}");
        }
        assert!(!is_journal_stream(None, fd));
    }

    /// What the layer wrote to its fallback.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// A journal socket in a temporary directory, the layer sending to it, and its fallback.
    fn journal() -> (
        tempfile::TempDir,
        UnixDatagram,
        JournalLayer<Captured>,
        Captured,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let captured = Captured::default();
        let layer = JournalLayer::with(&path, captured.clone()).unwrap();
        (dir, rx, layer, captured)
    }

    /// A datagram's fields, binary values decoded.
    fn fields(mut d: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        while !d.is_empty() {
            let nl = d.iter().position(|&b| b == b'\n').unwrap();
            let line = &d[..nl];
            if let Some(eq) = line.iter().position(|&b| b == b'=') {
                out.push((
                    String::from_utf8(line[..eq].to_vec()).unwrap(),
                    String::from_utf8(line[eq + 1..].to_vec()).unwrap(),
                ));
                d = &d[nl + 1..];
            } else {
                let len = u64::from_le_bytes(d[nl + 1..nl + 9].try_into().unwrap()) as usize;
                let value = &d[nl + 9..nl + 9 + len];
                assert_eq!(d[nl + 9 + len], b'\n');
                out.push((
                    String::from_utf8(line.to_vec()).unwrap(),
                    String::from_utf8(value.to_vec()).unwrap(),
                ));
                d = &d[nl + 10 + len..];
            }
        }
        out
    }

    fn get<'a>(f: &'a [(String, String)], name: &str) -> Vec<&'a str> {
        f.iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    #[test]
    fn an_event_is_one_datagram_with_its_fields() {
        let (_dir, rx, layer, captured) = journal();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("download", attempt = 2);
            let _in = span.enter();
            let id = "video_x";
            tracing::error!(
                video_id = id,
                http_status = 401,
                reason = %"no\nway",
                message_count = 1,
                priority = "mine",
                "ALL DOWNLOADS PAUSED"
            );
            tracing::info!(video_id = %id, "archived");
        });
        let mut buf = vec![0; 65536];
        let n = rx.recv(&mut buf).unwrap();
        let f = fields(&buf[..n]);
        assert_eq!(get(&f, "PRIORITY"), ["3"]);
        assert_eq!(get(&f, "SYSLOG_IDENTIFIER"), ["hingnetd"]);
        assert_eq!(
            get(&f, "MESSAGE"),
            [
                "ALL DOWNLOADS PAUSED video_id=\"video_x\" http_status=401 reason=no\nway \
                 message_count=1 priority=\"mine\" attempt=2"
            ]
        );
        assert_eq!(get(&f, "VIDEO_ID"), ["video_x"]);
        assert_eq!(get(&f, "HTTP_STATUS"), ["401"]);
        assert_eq!(get(&f, "REASON"), ["no\nway"]);
        assert_eq!(get(&f, "MESSAGE_COUNT"), ["1"]);
        assert_eq!(get(&f, "F_PRIORITY"), ["mine"]);
        assert_eq!(get(&f, "ATTEMPT"), ["2"]);
        assert_eq!(get(&f, "TARGET"), ["hingnetd::journal::tests"]);
        assert_eq!(get(&f, "CODE_FILE"), ["src/journal.rs"]);
        assert_eq!(get(&f, "CODE_LINE").len(), 1);
        let n = rx.recv(&mut buf).unwrap();
        let f = fields(&buf[..n]);
        assert_eq!(get(&f, "PRIORITY"), ["6"]);
        assert_eq!(get(&f, "MESSAGE"), ["archived video_id=video_x attempt=2"]);
        assert_eq!(captured.text(), "");
    }

    #[test]
    fn what_the_journal_does_not_take_goes_to_the_fallback() {
        let (dir, rx, layer, captured) = journal();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            // Larger than any socket send buffer: EMSGSIZE.
            let huge = "x".repeat(8 << 20);
            tracing::warn!(blob = %huge, "too big");
            tracing::info!("fits");
            drop(rx);
            std::fs::remove_file(dir.path().join("socket")).unwrap();
            tracing::error!(video_id = "video_y", "journald gone");
            tracing::error!("still gone");
        });
        let text = captured.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{:.300}", text);
        assert!(
            lines[0].starts_with("<4>cannot send to the journal at ")
                && lines[0].contains("Message too long"),
            "{:.300}",
            lines[0]
        );
        assert!(lines[1].starts_with("<4>too big blob=xxx"));
        // Told once more after a send got through in between.
        assert!(lines[2].starts_with("<4>cannot send to the journal at "));
        assert_eq!(lines[3], "<3>journald gone video_id=\"video_y\"");
        // Told once per spell of failures.
        assert_eq!(lines[4], "<3>still gone");
        assert!(!text.contains("fits"));
    }

    #[test]
    fn no_socket_at_start_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = JournalLayer::with(dir.path().join("none"), io::stderr)
            .err()
            .unwrap();
        assert!(matches!(e, JournalError::NoSocket { .. }), "{e}");
        let e = JournalLayer::with(dir.path(), io::stderr).err().unwrap();
        assert!(e.to_string().contains("not a socket"), "{e}");
    }
}
