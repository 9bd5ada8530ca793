//! The command line: argument definitions, and each subcommand wired to the library. Errors
//! carry the exit code the process ends with.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api::ApiClient;
use crate::config::{self, Config, DEFAULT_CONFIG_PATH, LogConfig, LogFormat};
use crate::daemon::{Scheduler, Settings, attempt};
use crate::fetch::{Fetcher, Limits, Outcome};
use crate::id::VideoId;
use crate::queue::{self, QueueError, State};
use crate::service::Service;
use crate::store::{self, StoreError};

/// Exit codes (sysexits.h), so a unit can tell "fix the config" from "try again".
pub mod exit {
    /// Bad input: invalid video IDs.
    pub const DATA: u8 = 65;
    /// Another daemon already serves this database, or is downloading that video now.
    pub const ALREADY_RUNNING: u8 = 75;
    /// Config file, token or archive directory unusable: restarting will not help.
    pub const CONFIG: u8 = 78;
    /// Something did not check out (`verify` found problems, `fetch` did not archive), or
    /// anything else failed (database errors at start, I/O): one code, as for any command
    /// that did not do what it was asked.
    pub const FAILURE: u8 = 1;
    /// `verify` could not do its job (database or archive directory unreadable): not the same
    /// as finding a problem.
    pub const IO: u8 = 74;
    /// PostgreSQL or the archive bucket: the server cannot be reached (a restart may help).
    pub const UNAVAILABLE: u8 = 69;
    /// PostgreSQL refused the login (user or password), or the bucket the access key.
    pub const LOGIN: u8 = 67;
    /// PostgreSQL: the TLS handshake failed (a certificate not trusted, or for another name).
    pub const TLS: u8 = 76;
    /// PostgreSQL: the role lacks a privilege hingnetd needs; or the bucket's key does.
    pub const NO_PERMISSION: u8 = 77;
}

#[derive(Debug, Parser)]
#[command(
    name = "hingnetd",
    version,
    about = "Archives finished HingNet videos queued in SQLite",
    after_help = "Examples:\n  hingnetd run                       # the daemon (systemd starts it)\n  hingnetd enqueue video_abc123      # queue a video\n  hingnetd status                    # how the queue is doing"
)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, value_name = "PATH", env = "HINGNETD_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (normally started by systemd).
    #[command(after_help = "Example:\n  hingnetd --config /etc/hingnetd/hingnetd.toml run")]
    Run,
    /// Add video IDs to the queue ("-" reads IDs from stdin, one per line).
    #[command(
        after_help = "Example:\n  hingnetd enqueue video_abc123 video_def456\n  list-finished-videos | hingnetd enqueue -"
    )]
    Enqueue {
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
    },
    /// Counts per state, oldest pending, downloads in flight, recent failures, archive size.
    #[command(after_help = "Example:\n  hingnetd status\n  hingnetd status --json | jq .pending")]
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List queue rows, newest first.
    #[command(after_help = "Example:\n  hingnetd list --state failed --limit 20")]
    List {
        /// Only rows in this state.
        #[arg(long, value_parser = ["pending", "downloading", "done", "failed"])]
        state: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON (one array) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show one video's row, its attempt history and why its next attempt is when it is.
    #[command(after_help = "Example:\n  hingnetd show video_abc123")]
    Show {
        #[arg(value_name = "ID")]
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Put failed videos back to pending, with a fresh give-up deadline.
    #[command(after_help = "Example:\n  hingnetd retry video_abc123\n  hingnetd retry --failed")]
    Retry {
        #[arg(
            value_name = "ID",
            required_unless_present = "failed",
            conflicts_with = "failed"
        )]
        ids: Vec<String>,
        /// Every failed video.
        #[arg(long)]
        failed: bool,
    },
    /// Re-hash archived files against their recorded SHA-256 and size; report missing,
    /// changed and orphan files. Exits 1 if anything is wrong.
    #[command(after_help = "Example:\n  hingnetd verify --all\n  hingnetd verify video_abc123")]
    Verify {
        /// Every done video, and look for orphan files (the default without IDs).
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// Put each video whose file is missing or changed back to pending, to be downloaded
        /// again (a changed file is renamed aside, never deleted).
        #[arg(long)]
        repair: bool,
        /// With an archive in a bucket, read every object back and hash it (without it, the
        /// store's own size and SHA-256 are compared). A directory is always read back.
        #[arg(long)]
        deep: bool,
        #[arg(value_name = "ID")]
        ids: Vec<String>,
    },
    /// Remove videos from the queue. A done video's file stays unless --delete-file.
    #[command(
        after_help = "Example:\n  hingnetd remove video_abc123\n  hingnetd remove --delete-file video_abc123"
    )]
    Remove {
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
        /// Remove a video even while it is being downloaded (the download in flight may still
        /// archive its file, which `verify` then reports as an orphan).
        #[arg(long)]
        force: bool,
        /// Also delete the archived file and its .json sidecar.
        #[arg(long)]
        delete_file: bool,
    },
    /// Download one video now, in the foreground, the way the daemon would.
    #[command(after_help = "Example:\n  hingnetd fetch video_abc123")]
    Fetch {
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Validate the configuration, the token and the CA store, and print the configuration
    /// as in force, with the token redacted.
    #[command(
        name = "check-config",
        after_help = "Example:\n  hingnetd --config /etc/hingnetd/hingnetd.toml check-config"
    )]
    CheckConfig {
        /// Print nothing when all is well (the unit's ExecReload= runs it before each reload).
        #[arg(long, short)]
        quiet: bool,
    },
    /// Create or upgrade the queue database schema, then exit.
    #[command(after_help = "Example:\n  hingnetd migrate")]
    Migrate,
    /// Print a shell completion script.
    #[command(
        after_help = "Example:\n  hingnetd completions bash > /etc/bash_completion.d/hingnetd"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    #[command(after_help = "Example:\n  hingnetd man | man -l -")]
    Man,
}

/// A failure with the exit code it maps to. Its message is one line.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    fn new(code: u8, e: impl std::fmt::Display) -> Failure {
        Failure {
            code,
            message: e.to_string().replace('\n', " "),
        }
    }
}

/// A store that cannot be opened: the exit code says whether a restart may help (the bucket
/// unreachable or busy) or the operator must act (the key refused, no permission, no such
/// bucket or directory: `otherwise`).
fn store_failure(e: StoreError, otherwise: u8) -> Failure {
    use crate::store::s3::S3Error;
    let code = match &e {
        StoreError::Bucket { source, .. } => match source {
            S3Error::Unreachable(_) | S3Error::Busy(_) => exit::UNAVAILABLE,
            S3Error::Credentials(_) => exit::LOGIN,
            S3Error::Permission(_) => exit::NO_PERMISSION,
            _ => otherwise,
        },
        _ => otherwise,
    };
    let key = match &e {
        StoreError::Bucket { .. } | StoreError::Setup(_) => "archive.dir, [archive.s3]",
        _ => "archive.dir",
    };
    Failure::new(code, format!("{e} ({key})"))
}

fn queue_failure(e: QueueError) -> Failure {
    let code = match e {
        QueueError::AlreadyRunning { .. } => exit::ALREADY_RUNNING,
        QueueError::Unreachable { .. } => exit::UNAVAILABLE,
        QueueError::Login { .. } => exit::LOGIN,
        QueueError::Tls { .. } => exit::TLS,
        QueueError::Privilege { .. } => exit::NO_PERMISSION,
        QueueError::Setup { .. } => exit::CONFIG,
        _ => exit::FAILURE,
    };
    Failure::new(code, e)
}

pub fn main_with(cli: Cli) -> ExitCode {
    // These need no configuration.
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "hingnetd",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Man => {
            return match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&Failure::new(exit::FAILURE, e)),
            };
        }
        _ => {}
    }
    let explicit = cli.config.as_os_str() != DEFAULT_CONFIG_PATH;
    let cfg = match Config::load(&cli.config, explicit) {
        Ok(c) => c,
        Err(e) => return fail(&Failure::new(exit::CONFIG, e)),
    };
    init_logging(&cfg.log);
    let result = match cli.command {
        Command::Run => run(cfg, cli.config),
        Command::Enqueue { ids } => enqueue(&cfg, ids),
        Command::Status { json } => status(&cfg, json),
        Command::List { state, limit, json } => {
            list(&cfg, state.as_deref().and_then(State::parse), limit, json)
        }
        Command::Show { id, json } => show(&cfg, &id, json),
        Command::Retry { ids, failed } => retry(&cfg, ids, failed),
        Command::Verify {
            all,
            repair,
            deep,
            ids,
        } => verify(&cfg, all || ids.is_empty(), deep, ids, repair),
        Command::Remove {
            ids,
            force,
            delete_file,
        } => remove(&cfg, ids, force, delete_file),
        Command::Fetch { id } => fetch(cfg, &id),
        Command::CheckConfig { quiet } => check_config(&cfg, &cli.config, quiet),
        Command::Migrate => migrate(&cfg),
        Command::Completions { .. } | Command::Man => unreachable!("handled above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => fail(&f),
    }
}

/// The one line an operator sees, on stderr (journald under systemd).
fn fail(f: &Failure) -> ExitCode {
    // On the journal's stream, `<3>` makes the line an error there (journald reads the syslog
    // prefix), so that `journalctl -p err` shows why the service would not start.
    let prefix = if crate::journal::stderr_is_journal() {
        "<3>"
    } else {
        ""
    };
    eprintln!("{prefix}hingnetd: error: {}", f.message);
    ExitCode::from(f.code)
}

fn out() -> std::io::StdoutLock<'static> {
    std::io::stdout().lock()
}

fn migrate(cfg: &Config) -> Result<(), Failure> {
    let q = queue::open_and_migrate(&cfg.queue_location()).map_err(queue_failure)?;
    let _ = writeln!(out(), "{}: schema up to date", q.location());
    Ok(())
}

fn check_config(cfg: &Config, path: &Path, quiet: bool) -> Result<(), Failure> {
    crate::sys::no_core_dumps();
    let (token, source) =
        config::load_token(&cfg.api).map_err(|e| Failure::new(exit::CONFIG, e))?;
    // The HTTP client as `run` builds it, which loads the system's CA certificates: a missing
    // trust store fails here, not at the service's first start.
    ApiClient::new(&cfg.api, cfg.base_url(), token)
        .map_err(|e| Failure::new(exit::CONFIG, format!("cannot build the HTTP client: {e}")))?;
    // A bucket's access key must be found too (the bucket itself is asked only by `run`).
    let s3_keys = if cfg.archive_location().is_bucket() {
        let keys = store::s3::target::load_keys()
            .map_err(|e| Failure::new(exit::CONFIG, format!("{e} (archive.dir is a bucket)")))?;
        Some(keys.source)
    } else {
        None
    };
    if quiet {
        return Ok(());
    }
    let text = toml::to_string(cfg).map_err(|e| Failure::new(exit::FAILURE, e))?;
    let mut o = out();
    let _ = writeln!(o, "# {}: valid", path.display());
    let _ = writeln!(o, "# token: read from {source} (redacted)");
    if let Some(from) = s3_keys {
        let _ = writeln!(o, "# S3 access key: read from {from} (secret redacted)");
    }
    let _ = write!(o, "{text}");
    Ok(())
}

/// IDs from the arguments, with "-" meaning one per line from stdin; invalid ones are named on
/// stderr and returned apart.
fn read_ids(args: Vec<String>) -> Result<(Vec<String>, usize), Failure> {
    let mut ids = Vec::new();
    for a in args {
        if a == "-" {
            for line in std::io::stdin().lock().lines() {
                let line =
                    line.map_err(|e| Failure::new(exit::DATA, format!("cannot read stdin: {e}")))?;
                let t = line.trim();
                if !t.is_empty() {
                    ids.push(t.to_owned());
                }
            }
        } else {
            ids.push(a.trim().to_owned());
        }
    }
    let (good, bad): (Vec<_>, Vec<_>) = ids.into_iter().partition(|id| VideoId::parse(id).is_ok());
    for b in &bad {
        eprintln!(
            "hingnetd: invalid video id {b:?} (1-128 characters of A-Z a-z 0-9 _ -, not starting with -); skipped"
        );
    }
    Ok((good, bad.len()))
}

fn enqueue(cfg: &Config, args: Vec<String>) -> Result<(), Failure> {
    let (good, bad) = read_ids(args)?;
    let q = queue::open_and_migrate(&cfg.queue_location()).map_err(queue_failure)?;
    let r = q.enqueue(&good).map_err(queue_failure)?;
    let _ = writeln!(
        out(),
        "enqueued {} new, {} already queued",
        r.added,
        r.already
    );
    match bad {
        0 => Ok(()),
        n => Err(Failure::new(
            exit::DATA,
            format!("{n} invalid video id(s) rejected"),
        )),
    }
}

fn status(cfg: &Config, json: bool) -> Result<(), Failure> {
    let q = queue::open_existing(&cfg.queue_location()).map_err(queue_failure)?;
    let s = q.status(5).map_err(queue_failure)?;
    let c = s.counts;
    let archived = c.archived_bytes;
    let age = s.oldest_pending.as_ref().and_then(|o| o.age);
    let running = q.daemon_running();
    // What a daemon that is no longer running left behind is not in force.
    let pauses = if running {
        q.pauses().unwrap_or_else(|e| {
            eprintln!("hingnetd: cannot read the daemon's pauses: {e}");
            Vec::new()
        })
    } else {
        Vec::new()
    };
    let mut o = out();
    if json {
        let v = serde_json::json!({
            "pending": c.pending,
            "downloading": c.downloading,
            "done": c.done,
            "failed": c.failed,
            "expiring_soon": s.expiring_soon,
            "expired_pending": s.expired_pending,
            "oldest_pending": s.oldest_pending.as_ref().map(|o| (&o.video_id, &o.enqueued_at)),
            "recent_failures": s.recent_failures,
            "daemon_running": running,
            "pauses": pauses,
            "next_due_in_ms": s.next_due_in.map(|d| d.as_millis() as u64),
            "oldest_pending_age_s": age.map(|d| d.as_secs()),
            "archive_bytes": archived,
            "claims_by_instance": s.claimants,
        });
        let _ = writeln!(o, "{v}");
        return Ok(());
    }
    let _ = writeln!(
        o,
        "{} pending, {} downloading, {} done, {} failed",
        c.pending, c.downloading, c.done, c.failed
    );
    let _ = writeln!(
        o,
        "daemon: {}",
        if running { "running" } else { "not running" }
    );
    if !s.claimants.is_empty() {
        let held: Vec<String> = s
            .claimants
            .iter()
            .map(|c| format!("{} ({})", c.instance, c.claims))
            .collect();
        let _ = writeln!(o, "claims held by: {}", held.join(", "));
    }
    for p in &pauses {
        let _ = writeln!(
            o,
            "PAUSED ({}) since {}: {}",
            p.reason.as_str(),
            p.since,
            p.detail
        );
        if let Some(until) = &p.until {
            let _ = writeln!(o, "  until: {until}");
        }
        if let Some(advice) = &p.advice {
            let _ = writeln!(o, "  what to do: {advice}");
        }
    }
    let _ = writeln!(o, "archive: {} in {} files", human_bytes(archived), c.done);
    if let Some(queue::Oldest {
        video_id: id,
        enqueued_at: at,
        ..
    }) = &s.oldest_pending
    {
        let age = age.map_or(String::new(), |a| {
            format!(
                ", {} ago",
                config::format_duration(Duration::from_secs(a.as_secs()))
            )
        });
        let _ = writeln!(o, "oldest pending: {id} (enqueued {at}{age})");
    }
    if s.expiring_soon > 0 || s.expired_pending > 0 {
        let _ = writeln!(
            o,
            "expiring: {} pending video(s) expire within {}; {} already expired undownloaded",
            s.expiring_soon,
            config::format_duration(crate::queue::EXPIRING_SOON),
            s.expired_pending
        );
    }
    if let Some(d) = s.next_due_in {
        let _ = writeln!(
            o,
            "next attempt due in: {}",
            config::format_duration(Duration::from_secs(d.as_secs()))
        );
    }
    if !s.recent_failures.is_empty() {
        let _ = writeln!(o, "recent failures:");
        for f in &s.recent_failures {
            let _ = writeln!(
                o,
                "  {} at {} (http {}): {}",
                f.video_id,
                f.finished_at.as_deref().unwrap_or("?"),
                f.http_status.map_or("-".into(), |s| s.to_string()),
                f.last_error.as_deref().unwrap_or("")
            );
        }
    }
    Ok(())
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn list(cfg: &Config, state: Option<State>, limit: usize, json: bool) -> Result<(), Failure> {
    let q = queue::open_existing(&cfg.queue_location()).map_err(queue_failure)?;
    let rows = q.list(state, limit).map_err(queue_failure)?;
    let mut o = out();
    if json {
        let _ = writeln!(
            o,
            "{}",
            serde_json::to_string(&rows).expect("rows serialize")
        );
        return Ok(());
    }
    // A header for a person; scripts that read the columns get none.
    if std::io::stdout().is_terminal() {
        let _ = writeln!(
            o,
            "{:<40} {:<11} {:>3} {:<24} {:>4} LAST ERROR",
            "VIDEO ID", "STATE", "TRY", "NEXT ATTEMPT / FINISHED", "HTTP"
        );
    }
    for r in rows {
        let when = r.finished_at.as_deref().unwrap_or(&r.next_attempt_at);
        let _ = writeln!(
            o,
            "{:<40} {:<11} {:>3} {:<24} {:>4} {}",
            r.video_id,
            r.state,
            r.attempts,
            when,
            r.http_status.map_or("-".into(), |s| s.to_string()),
            r.last_error.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

fn show(cfg: &Config, id: &str, json: bool) -> Result<(), Failure> {
    let q = queue::open_existing(&cfg.queue_location()).map_err(queue_failure)?;
    let Some(row) = q.get(id).map_err(queue_failure)? else {
        return Err(Failure::new(
            exit::DATA,
            format!("video {id:?} is not in the queue"),
        ));
    };
    // The log is under the ID as the row holds it.
    let history = q.history(&row.video_id).map_err(queue_failure)?;
    let next = match row.state {
        State::Pending => match (row.due, history.last()) {
            // A due row waits only for a free slot.
            (true, _) if q.daemon_running() => {
                "due now (waiting for a free download slot, or a pause to end)".to_string()
            }
            (true, _) => "due now, but no daemon is running".to_string(),
            (false, Some(last)) => format!(
                "at {}: {}",
                row.next_attempt_at,
                last.detail.as_deref().unwrap_or("")
            ),
            (false, None) => format!("at {} (set by the producer)", row.next_attempt_at),
        },
        State::Downloading => "downloading now".into(),
        State::Done => "never (done)".into(),
        State::Failed => "never (failed; `hingnetd retry` puts it back)".into(),
    };
    let mut o = out();
    if json {
        let v = serde_json::json!({ "row": row, "next_attempt": next, "history": history });
        let _ = writeln!(o, "{v}");
        return Ok(());
    }
    let v = serde_json::to_value(&row).expect("row serializes");
    for (k, val) in v.as_object().expect("row is an object") {
        let text = match val {
            serde_json::Value::Null => "-".to_string(),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let _ = writeln!(o, "{k:<17} {text}");
    }
    let _ = writeln!(o, "next attempt      {next}");
    if !history.is_empty() {
        let _ = writeln!(o, "history:");
        for h in &history {
            let _ = writeln!(
                o,
                "  {} attempt {} {} (http {}, {} ms): {}",
                h.at,
                h.attempt,
                h.outcome,
                h.http_status.map_or("-".into(), |s| s.to_string()),
                h.elapsed_ms.unwrap_or(0),
                h.detail.as_deref().unwrap_or("")
            );
        }
    }
    Ok(())
}

fn retry(cfg: &Config, ids: Vec<String>, all_failed: bool) -> Result<(), Failure> {
    let q = queue::open_existing(&cfg.queue_location()).map_err(queue_failure)?;
    // Each ID as its row holds it (a producer's may have whitespace around it).
    let ids = ids
        .into_iter()
        .map(|id| Ok(q.resolve(&id)?.unwrap_or(id)))
        .collect::<Result<Vec<_>, QueueError>>()
        .map_err(queue_failure)?;
    let changed = if all_failed {
        q.retry_failed(None)
    } else {
        q.retry_failed(Some(&ids))
    }
    .map_err(queue_failure)?;
    let mut o = out();
    let _ = writeln!(o, "{} failed video(s) back to pending", changed.len());
    let not_failed: Vec<&String> = ids.iter().filter(|id| !changed.contains(id)).collect();
    if !not_failed.is_empty() {
        for id in &not_failed {
            eprintln!("hingnetd: {id}: not a failed video in the queue; left as it is");
        }
        return Err(Failure::new(
            exit::DATA,
            format!("{} id(s) were not failed", not_failed.len()),
        ));
    }
    Ok(())
}

/// A progress bar on a terminal, nothing in scripts.
fn progress_bar(total: u64, what: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    Some(bar)
}

fn verify(
    cfg: &Config,
    all: bool,
    deep: bool,
    ids: Vec<String>,
    repair: bool,
) -> Result<(), Failure> {
    let q = queue::open_existing(&cfg.queue_location()).map_err(queue_failure)?;
    let archive = store::inspect(cfg).map_err(|e| store_failure(e, exit::IO))?;
    let report = crate::verify::run(&*q, &*archive, all, deep, &ids, |total| {
        progress_bar(total, "verifying")
    })
    .map_err(|e| Failure::new(exit::IO, e))?;
    let mut o = out();
    for p in &report.problems {
        let _ = writeln!(o, "{p}");
    }
    let _ = writeln!(o, "{}", report.summary());
    let mut left = report.problems.len();
    if repair {
        let archive = store::open_inventory(cfg).map_err(|e| store_failure(e, exit::IO))?;
        let repairs = crate::verify::repair(&*q, &*archive, &report)
            .map_err(|e| Failure::new(exit::IO, e))?;
        for r in &repairs {
            let _ = writeln!(o, "{r}");
        }
        let fixed = repairs
            .iter()
            .filter(|r| matches!(r, crate::verify::Repair::Requeued { .. }))
            .count();
        let _ = writeln!(o, "repaired {fixed} video(s)");
        left -= fixed;
    }
    if left == 0 {
        Ok(())
    } else {
        Err(Failure::new(
            exit::FAILURE,
            if repair {
                format!("{left} problem(s) not repaired")
            } else {
                format!("{left} problem(s) found")
            },
        ))
    }
}

/// `hingnetd remove`: the rows go; a done video's file stays unless `delete_file`, and what a
/// pending or failed one left half-downloaded goes with it.
fn remove(cfg: &Config, ids: Vec<String>, force: bool, delete_file: bool) -> Result<(), Failure> {
    use crate::queue::Removal;
    let q = queue::open_existing(&cfg.queue_location()).map_err(queue_failure)?;
    let archive = match store::open_inventory(cfg) {
        Ok(a) => Some(a),
        // Before any row goes: a row removed with its file kept was not what was asked.
        Err(e) if delete_file => {
            return Err(Failure::new(
                exit::CONFIG,
                format!("{e} (archive.dir); nothing removed, as --delete-file needs the archive"),
            ));
        }
        Err(e) => {
            eprintln!("hingnetd: {e} (archive.dir); partial files of removed videos stay");
            None
        }
    };
    let mut o = out();
    let mut refused = 0;
    for raw in &ids {
        let id = raw.trim();
        // Another host's file: this host cannot delete it, so the row stays to name it.
        if delete_file
            && !archive.as_ref().is_some_and(|a| a.shared())
            && let Some(row) = q.get(id).map_err(queue_failure)?
            && let Some(on) = row.archived_elsewhere(q.instance())
        {
            eprintln!(
                "hingnetd: {id}: its file is in {on}'s archive; run `hingnetd remove --delete-file {id}` there (or remove without --delete-file); not removed"
            );
            refused += 1;
            continue;
        }
        let row = match q.remove(id, force).map_err(queue_failure)? {
            Removal::Missing => {
                eprintln!("hingnetd: {id}: not in the queue");
                refused += 1;
                continue;
            }
            Removal::Busy => {
                eprintln!(
                    "hingnetd: {id}: being downloaded now; not removed (--force removes it anyway)"
                );
                refused += 1;
                continue;
            }
            Removal::Removed(row) => row,
        };
        let vid = VideoId::from_queued(&row.video_id).ok().map(|(v, _)| v);
        if let (Some(a), Some(v)) = (&archive, &vid)
            && let Err(e) = a.remove_leftovers(v)
        {
            eprintln!("hingnetd: {id}: cannot remove its partial file: {e}");
        }
        let file = match (&row.path, delete_file, &archive, &vid) {
            (None, ..) => String::new(),
            (Some(p), true, ..)
                if !archive.as_ref().is_some_and(|a| a.shared())
                    && row.archived_elsewhere(q.instance()).is_some() =>
            {
                eprintln!(
                    "hingnetd: {id}: removed from the queue, but its file is in another host's archive; left as it is"
                );
                refused += 1;
                format!("; its file stays at {p}")
            }
            (Some(p), true, Some(a), Some(v)) if a.keeps_at(v, p) => match a.delete_published(v) {
                Ok(()) => format!("; deleted {p}"),
                Err(e) => {
                    eprintln!("hingnetd: {id}: removed from the queue, but {e}");
                    refused += 1;
                    format!("; its file stays at {p}")
                }
            },
            (Some(p), true, ..) => {
                eprintln!(
                    "hingnetd: {id}: removed from the queue, but its file {p} is not where the archive keeps it; left as it is"
                );
                refused += 1;
                format!("; its file stays at {p}")
            }
            (Some(p), false, ..) => format!("; its file stays at {p}"),
        };
        let busy = if row.state == State::Downloading {
            " (its download in flight may still archive a file no row names)"
        } else {
            ""
        };
        let _ = writeln!(o, "removed {id} ({}){file}{busy}", row.state);
    }
    match refused {
        0 => Ok(()),
        n => Err(Failure::new(
            exit::DATA,
            format!("{n} id(s) not removed, or removed with their file kept"),
        )),
    }
}

fn fetch(cfg: Config, id: &str) -> Result<(), Failure> {
    let Ok((vid, _)) = VideoId::from_queued(id) else {
        return Err(Failure::new(exit::DATA, format!("invalid video id {id:?}")));
    };
    let id = vid.as_str().to_owned();
    let id = id.as_str();
    crate::sys::no_core_dumps();
    let (token, _) = config::load_token(&cfg.api).map_err(|e| Failure::new(exit::CONFIG, e))?;
    become_archive_owner(cfg.archive_location().local_dir())?;
    let archive = store::open(&cfg).map_err(|e| store_failure(e, exit::CONFIG))?;
    let api = ApiClient::new(&cfg.api, cfg.base_url(), token)
        .map_err(|e| Failure::new(exit::CONFIG, format!("cannot build the HTTP client: {e}")))?;
    let q = queue::open_and_migrate(&cfg.queue_location()).map_err(queue_failure)?;
    let runtime = runtime()?;
    // The partial file first: one held by another process (the daemon downloading this
    // video) stops here, before any claim.
    let partial = match runtime.block_on(archive.begin(&vid)) {
        Ok(p) => p,
        Err(e @ StoreError::Busy { .. }) => {
            return Err(Failure::new(exit::ALREADY_RUNNING, format!("{id}: {e}")));
        }
        Err(e) => return Err(Failure::new(exit::FAILURE, e)),
    };
    // Not ours to download: leave no empty partial behind.
    let claimed = match runtime.block_on(q.claim_one(id)) {
        Ok(Ok(c)) => c,
        Ok(Err(state)) => {
            let _ = runtime.block_on(partial.park());
            return not_claimed(&cfg, &*q, id, state);
        }
        Err(e) => {
            let _ = runtime.block_on(partial.park());
            return Err(queue_failure(e));
        }
    };
    let bar = progress_bar(0, id);
    let mut fetcher = Fetcher::new(api, archive, Limits::of(&cfg));
    if let Some(bar) = bar.clone() {
        fetcher = fetcher.with_progress(Arc::new(move |have, total| {
            if let Some(t) = total {
                bar.set_length(t);
            }
            bar.set_position(have);
        }));
    }
    let fetcher = Arc::new(fetcher);
    let ended = runtime.block_on(async {
        // Ctrl-C, a closing terminal or a kill park the download and give the row back. (A
        // SIGKILL leaves it `downloading`: the daemon's orphan check recovers it.)
        let cancel = CancellationToken::new();
        spawn_signal_handler(cancel.clone(), None)?;
        let held = Some((vid, partial));
        Ok::<_, Failure>(attempt(&fetcher, &claimed, held, &cfg.retry, &cancel).await)
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let (ended, finish, elapsed) = ended?;
    let recorded = runtime
        .block_on(q.finish(&claimed, &finish, elapsed, ended.expires_at))
        .map_err(queue_failure)?;
    if !recorded {
        eprintln!(
            "hingnetd: {id}: the row changed while downloading (an operator's edit?); its outcome was not recorded"
        );
    }
    let mut o = out();
    match (&ended.outcome, &finish) {
        (Outcome::Archived { published, .. }, _) => {
            let _ = writeln!(
                o,
                "{id}: archived {} ({} bytes, sha256 {})",
                published.path, published.bytes, published.sha256
            );
            Ok(())
        }
        (_, f) => Err(Failure::new(
            exit::FAILURE,
            format!("{id}: {}", f.describe()),
        )),
    }
}

/// Why `fetch` did not claim the row, in an operator's words.
fn not_claimed(cfg: &Config, q: &dyn queue::Admin, id: &str, state: State) -> Result<(), Failure> {
    if state == State::Done {
        // The row says done; the file must say so too (what `verify ID` checks).
        let archive = store::inspect(cfg).map_err(|e| store_failure(e, exit::IO))?;
        let report = crate::verify::run(q, &*archive, false, false, &[id.to_owned()], |total| {
            progress_bar(total, "verifying")
        })
        .map_err(|e| Failure::new(exit::IO, e))?;
        if let Some(crate::verify::Problem::Elsewhere { on, .. }) = report.problems.first() {
            let _ = writeln!(out(), "{id}: already archived, in {on}'s archive");
            return Ok(());
        }
        if let Some(p) = report.problems.first() {
            return Err(Failure::new(
                exit::FAILURE,
                format!(
                    "{id} is done, but: {p}; `hingnetd verify --repair {id}` puts it back to be downloaded again"
                ),
            ));
        }
        let path = q
            .get(id)
            .map_err(queue_failure)?
            .and_then(|r| r.path)
            .unwrap_or_default();
        let _ = writeln!(out(), "{id}: already archived at {path}");
        return Ok(());
    }
    let why = if q.daemon_running() {
        format!("{id} is {state}: the daemon is downloading it now")
    } else {
        format!(
            "{id} is {state}, left so by a daemon that is not running; `hingnetd run` recovers it"
        )
    };
    Err(Failure::new(exit::ALREADY_RUNNING, why))
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    crate::sys::flat_memory();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(exit::FAILURE, format!("cannot start the runtime: {e}")))
}

/// `hingnetd fetch` run as root writes the files the daemon would: as the archive directory's
/// owner (the daemon's user), with the unit's `UMask=0007`. A root-owned file would be
/// unreadable to the daemon, and `verify` would call it changed. Done after the token is read
/// (its file is root's) and before anything is created; `fetch` stops if it cannot.
fn become_archive_owner(dir: &Path) -> Result<(), Failure> {
    use std::os::unix::fs::MetadataExt;
    if !crate::sys::running_as_root() {
        return Ok(());
    }
    // A directory not made yet is made by its parent's owner (`/var/lib/hingnetd`'s).
    let meta = dir
        .ancestors()
        // A relative path's last ancestor is "": the working directory.
        .map(|d| {
            if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            }
        })
        .find_map(|d| std::fs::metadata(d).ok())
        .ok_or_else(|| {
            Failure::new(
                exit::CONFIG,
                format!("archive.dir {}: no such directory", dir.display()),
            )
        })?;
    let (uid, gid) = (meta.uid(), meta.gid());
    if uid == 0 {
        return Ok(());
    }
    crate::sys::become_user(uid, gid).map_err(|(what, e)| {
        Failure::new(
            exit::FAILURE,
            format!(
                "running as root, cannot become the archive's owner {uid}:{gid} ({what}: {e}); run fetch as that user (e.g. `sudo -u hingnetd hingnetd fetch ID`)"
            ),
        )
    })?;
    tracing::info!(
        uid,
        gid,
        "running as the archive directory's owner, as the daemon does"
    );
    Ok(())
}

/// `hingnetd run`: every check that can fail on bad configuration happens before any work, and
/// systemd hears READY=1 only once the database is open and migrated and the token read.
fn run(cfg: Config, config_path: PathBuf) -> Result<(), Failure> {
    crate::sys::no_core_dumps();
    let (token, source) =
        config::load_token(&cfg.api).map_err(|e| Failure::new(exit::CONFIG, e))?;
    let archive = store::open(&cfg).map_err(|e| store_failure(e, exit::CONFIG))?;
    // Held until the runtime below has stopped (see `queue::Hold`).
    let (_hold, queue) = queue::open_for_daemon(&cfg.queue_location()).map_err(queue_failure)?;
    let api = ApiClient::new(&cfg.api, cfg.base_url(), token)
        .map_err(|e| Failure::new(exit::CONFIG, format!("cannot build the HTTP client: {e}")))?;
    let runtime = runtime()?;
    runtime.block_on(async move {
        let claims = queue.serve().await.map_err(queue_failure)?;
        let shutdown = CancellationToken::new();
        let reload = Arc::new(Notify::new());
        spawn_signal_handler(shutdown.clone(), Some(reload.clone()))?;
        let fetcher = Arc::new(Fetcher::new(api, archive, Limits::of(&cfg)));
        tracing::info!(
            database = %cfg.queue_location().display(),
            archive = %fetcher.store().location(),
            api = %crate::api::origin_of(&cfg.base_url()),
            token_from = %source,
            concurrency = cfg.download.concurrency,
            "hingnetd ready"
        );
        let mut metrics = crate::metrics::Serving {
            scrape: Arc::new(crate::metrics::Scrape::new(
                cfg.queue_location(),
                fetcher.store().clone(),
            )),
            endpoint: None,
        };
        metrics
            .apply(cfg.metrics.addr(), cfg.archive.min_free)
            .map_err(|e| Failure::new(exit::CONFIG, e))?;
        crate::daemon::log_rate_limit(cfg.download.rate_limit);
        let service = Service::from_env();
        service.ready();
        let settings = Settings {
            config: cfg,
            config_path,
        };
        let scheduler = Scheduler::new(settings, claims, fetcher, reload, service, metrics);
        scheduler.run(shutdown).await;
        tracing::info!("hingnetd stopped");
        Ok(())
    })
}

/// SIGTERM/SIGINT start a graceful shutdown; SIGHUP reloads, or without a reload to do (a
/// foreground command whose terminal closed) shuts down too. tokio's handlers sit on
/// signal-hook's registry.
fn spawn_signal_handler(
    shutdown: CancellationToken,
    reload: Option<Arc<Notify>>,
) -> Result<(), Failure> {
    use tokio::signal::unix::{SignalKind, signal};
    let sig = |k| signal(k).map_err(|e| Failure::new(exit::FAILURE, e));
    let (mut term, mut int, mut hup) = (
        sig(SignalKind::terminate())?,
        sig(SignalKind::interrupt())?,
        sig(SignalKind::hangup())?,
    );
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => match &reload {
                    Some(reload) => {
                        tracing::info!(signal = "SIGHUP", "reloading configuration and token");
                        reload.notify_one();
                        continue;
                    }
                    None => "SIGHUP",
                },
            };
            tracing::info!(signal = name, "shutdown requested");
            shutdown.cancel();
        }
    });
    Ok(())
}

/// Under systemd (stderr is the journal's stream: `JOURNAL_STREAM`), events go to the journal
/// natively, with their priority and fields (`journal`); otherwise to stderr: text without
/// colours unless stderr is a terminal, or JSON. `RUST_LOG` overrides `[log] level`, for both.
pub fn init_logging(log: &LogConfig) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
    // The HTTP stack's debug output names request URIs, and a signed URL is a credential:
    // those crates stay at `info` whatever RUST_LOG asks for.
    for quiet in ["reqwest", "hyper", "hyper_util", "h2", "rustls"] {
        filter = filter.add_directive(format!("{quiet}=info").parse().expect("valid directive"));
    }
    let registry = tracing_subscriber::registry().with(filter);
    let to_journal = crate::journal::stderr_is_journal();
    let mut no_native = None;
    if to_journal {
        match crate::journal::JournalLayer::new() {
            Ok(layer) => {
                registry.with(layer).init();
                return;
            }
            Err(e) => no_native = Some(e),
        }
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    // journald stamps each line it reads: a second timestamp would only widen it.
    let fmt = match (log.format, to_journal) {
        (LogFormat::Json, false) => fmt.json().flatten_event(true).boxed(),
        (LogFormat::Json, true) => fmt.json().flatten_event(true).without_time().boxed(),
        (LogFormat::Text, false) => fmt.with_ansi(std::io::stderr().is_terminal()).boxed(),
        (LogFormat::Text, true) => fmt.with_ansi(false).without_time().boxed(),
    };
    registry.with(fmt).init();
    if let Some(e) = no_native {
        tracing::warn!(error = %e, "cannot log to the journal natively; logging lines to stderr");
    }
}
