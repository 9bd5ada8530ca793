//! The command line: argument definitions, and each subcommand wired to the library. Errors
//! carry the exit code the process ends with.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api::ApiClient;
use crate::archive::{Archive, VideoId};
use crate::config::{self, Config, DEFAULT_CONFIG_PATH};
use crate::daemon::{Scheduler, Settings};
use crate::fetch::Fetcher;
use crate::queue::{InstanceLock, Queue, QueueError, SharedQueue};

/// Exit codes (sysexits.h), so a unit can tell "fix the config" from "try again".
pub mod exit {
    /// Bad input to `enqueue`.
    pub const DATA: u8 = 65;
    /// Another daemon already serves this database.
    pub const ALREADY_RUNNING: u8 = 75;
    /// Config file, token or archive directory unusable: restarting will not help.
    pub const CONFIG: u8 = 78;
    /// Anything else (database errors at start, I/O).
    pub const FAILURE: u8 = 1;
}

#[derive(Debug, Parser)]
#[command(version, about = "Archives finished HingNet videos queued in SQLite", long_about = None)]
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
    Run,
    /// Add video IDs to the queue ("-" reads IDs from stdin, one per line).
    #[command(
        after_help = "Example:\n  hingnetd enqueue video_abc123 video_def456\n  ls-finished-videos | hingnetd enqueue -"
    )]
    Enqueue {
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
    },
    /// Show counts per state, the oldest pending video and recent failures.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create or upgrade the queue database schema, then exit.
    Migrate,
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

fn queue_failure(e: QueueError) -> Failure {
    let code = match e {
        QueueError::AlreadyRunning { .. } => exit::ALREADY_RUNNING,
        _ => exit::FAILURE,
    };
    Failure::new(code, e)
}

pub fn main_with(cli: Cli) -> ExitCode {
    let explicit = cli.config.as_os_str() != DEFAULT_CONFIG_PATH;
    let result = Config::load(&cli.config, explicit)
        .map_err(|e| Failure::new(exit::CONFIG, e))
        .and_then(|cfg| match cli.command {
            Command::Run => run(cfg),
            Command::Enqueue { ids } => enqueue(&cfg, ids),
            Command::Status { json } => status(&cfg, json),
            Command::Migrate => migrate(&cfg),
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            tracing::error!("{}", f.message);
            // Also on stderr directly when logs go elsewhere: the operator at a shell sees it.
            if !tracing::enabled!(tracing::Level::ERROR) {
                eprintln!("hingnetd: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

fn migrate(cfg: &Config) -> Result<(), Failure> {
    let mut q = Queue::open_and_migrate(&cfg.queue.database).map_err(queue_failure)?;
    let n = q.migrate().map_err(queue_failure)?;
    println!("{}: schema up to date", q.path().display());
    let _ = n;
    Ok(())
}

fn enqueue(cfg: &Config, args: Vec<String>) -> Result<(), Failure> {
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
            ids.push(a);
        }
    }
    let (good, bad): (Vec<_>, Vec<_>) = ids.iter().partition(|id| VideoId::parse(id).is_ok());
    for b in &bad {
        eprintln!(
            "hingnetd: invalid video id {b:?} (1-128 characters of A-Z a-z 0-9 _ -, not starting with -); not enqueued"
        );
    }
    let mut q = Queue::open_and_migrate(&cfg.queue.database).map_err(queue_failure)?;
    let r = q
        .enqueue(good.iter().map(|s| s.as_str()))
        .map_err(queue_failure)?;
    println!("enqueued {} new, {} already queued", r.added, r.already);
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Failure::new(
            exit::DATA,
            format!("{} invalid video id(s) rejected", bad.len()),
        ))
    }
}

fn status(cfg: &Config, json: bool) -> Result<(), Failure> {
    let q = Queue::open_existing(&cfg.queue.database).map_err(queue_failure)?;
    let s = q.status(5).map_err(queue_failure)?;
    let running = InstanceLock::is_held(&cfg.queue.database);
    let mut out = std::io::stdout().lock();
    if json {
        let mut v = serde_json::to_value(&s).expect("status serializes");
        v["daemon_running"] = running.into();
        v["next_due_in_ms"] = s.next_due_in.map(|d| d.as_millis() as u64).into();
        let _ = writeln!(out, "{v}");
        return Ok(());
    }
    let _ = writeln!(
        out,
        "{} pending, {} downloading, {} done, {} failed",
        s.pending, s.downloading, s.done, s.failed
    );
    let _ = writeln!(
        out,
        "daemon: {}",
        if running { "running" } else { "not running" }
    );
    if let Some((id, at)) = &s.oldest_pending {
        let _ = writeln!(out, "oldest pending: {id} (enqueued {at})");
    }
    if let Some(d) = s.next_due_in {
        let _ = writeln!(
            out,
            "next attempt due in: {}",
            config::format_duration(std::time::Duration::from_secs(d.as_secs()))
        );
    }
    if !s.recent_failures.is_empty() {
        let _ = writeln!(out, "recent failures:");
        for f in &s.recent_failures {
            let _ = writeln!(
                out,
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

/// `hingnetd run`: every check that can fail on bad configuration happens before any work.
fn run(cfg: Config) -> Result<(), Failure> {
    let (token, source) =
        config::load_token(&cfg.api).map_err(|e| Failure::new(exit::CONFIG, e))?;
    let archive = Archive::open(&cfg.archive.dir)
        .map_err(|e| Failure::new(exit::CONFIG, format!("{e} (archive.dir)")))?;
    let _lock = InstanceLock::acquire(&cfg.queue.database).map_err(queue_failure)?;
    let queue = Queue::open_and_migrate(&cfg.queue.database).map_err(queue_failure)?;
    let recovered = queue.recover_interrupted().map_err(queue_failure)?;
    if recovered > 0 {
        tracing::warn!(
            rows = recovered,
            "rows left downloading by an earlier run are pending again"
        );
    }
    let api = ApiClient::new(&cfg.api, cfg.base_url(), token)
        .map_err(|e| Failure::new(exit::CONFIG, format!("cannot build the HTTP client: {e}")))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(exit::FAILURE, format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async move {
        let wake = Arc::new(Notify::new());
        let _watch = crate::watch::watch(&cfg.queue.database, wake.clone())
            .map_err(|e| Failure::new(exit::FAILURE, e))?;
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone())?;
        let fetcher = Arc::new(Fetcher { api, archive });
        let settings = Settings {
            concurrency: cfg.download.concurrency,
            poll_interval: cfg.queue.poll_interval,
            shutdown_grace: cfg.download.shutdown_grace,
            retry: cfg.retry.clone(),
            api: cfg.api.clone(),
        };
        tracing::info!(
            database = %cfg.queue.database.display(),
            archive = %fetcher.archive.dir().display(),
            api = %crate::api::origin_of(&cfg.base_url()),
            token_from = %source,
            concurrency = cfg.download.concurrency,
            "hingnetd ready"
        );
        let scheduler = Scheduler::new(settings, SharedQueue::new(queue), fetcher, wake);
        scheduler.run(shutdown).await;
        tracing::info!("hingnetd stopped");
        Ok(())
    })
}

/// SIGTERM/SIGINT start a graceful shutdown (tokio's handlers sit on signal-hook's registry).
fn spawn_signal_handler(shutdown: CancellationToken) -> Result<(), Failure> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| Failure::new(exit::FAILURE, e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Failure::new(exit::FAILURE, e))?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutdown requested");
        shutdown.cancel();
    });
    Ok(())
}

/// Logs go to stderr (journald under systemd), without colours unless it is a terminal;
/// `RUST_LOG` overrides the default `info` level.
pub fn init_logging() {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The HTTP stack's debug output names request URIs, and a signed URL is a credential:
    // those crates stay at `info` whatever RUST_LOG asks for.
    for quiet in ["reqwest", "hyper", "hyper_util", "h2", "rustls"] {
        filter = filter.add_directive(format!("{quiet}=info").parse().expect("valid directive"));
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}
