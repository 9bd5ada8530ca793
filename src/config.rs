//! The configuration file: its schema, its defaults (all in this file), validation, and loading
//! the API token from its three possible sources.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where the daemon looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/hingnetd/hingnetd.toml";
/// No duration setting may exceed this: longer is a typo, and would overflow timers.
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);
/// The systemd credential name (`LoadCredential=hingnet-token:...`).
pub const TOKEN_CREDENTIAL: &str = "hingnet-token";
/// Environment variable that may carry the token (handy for a shell session, never for a unit).
pub const TOKEN_ENV: &str = "HINGNET_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `at` is `:LINE: key` (or `:LINE`), where the file says what is wrong.
    #[error("invalid config file {}{at}: {message}", path.display())]
    Parse {
        path: PathBuf,
        at: String,
        message: String,
    },
    #[error("invalid config file {}{}: {key}: {message}", path.display(), line.map_or(String::new(), |l| format!(":{l}")))]
    Invalid {
        path: PathBuf,
        key: &'static str,
        /// The key's line, when the file sets it (a default can be invalid only in
        /// combination with a key that is set).
        line: Option<usize>,
        message: String,
    },
    #[error("{0}")]
    Token(String),
}

/// The whole file. Every section and key is optional; defaults live in the `Default` impls below.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub api: ApiConfig,
    pub queue: QueueConfig,
    pub archive: ArchiveConfig,
    pub download: DownloadConfig,
    pub retry: RetryConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where `/metrics` is served (`127.0.0.1:9464`); empty: not at all (the default).
    pub listen: String,
}

impl MetricsConfig {
    /// The address, if metrics are served; `validate` has already proven it parses.
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        (!self.listen.is_empty()).then(|| self.listen.parse().expect("validated at load"))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub base_url: String,
    pub token_file: PathBuf,
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Longest silence allowed while a response (headers or body) is streaming.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub read_timeout: Duration,
    /// A plain `http://` base URL for a host that is not loopback sends the token in clear:
    /// refused unless this says the operator's own network carries it (a TLS-terminating
    /// gateway on the LAN).
    pub allow_plain_http: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// A file path: the SQLite queue. A `postgres://` URL: a queue shared by a fleet.
    pub database: String,
    /// Safety net only: new rows are noticed by watching the database files (SQLite) or by
    /// LISTEN (PostgreSQL).
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub poll_interval: Duration,
    /// PostgreSQL: a file holding the password (also: env PGPASSWORD, or the systemd
    /// credential "hingnet-db-password"). Empty: none.
    pub password_file: PathBuf,
    /// PostgreSQL: how long a claim lives without its daemon's heartbeat; after a crash, its
    /// rows wait this long before another daemon takes them.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub lease: Duration,
    /// PostgreSQL: this daemon's name in the queue. Empty: the host name.
    pub instance: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// A directory, or `s3://bucket/prefix/` for a bucket (`[archive.s3]`).
    pub dir: PathBuf,
    /// With a bucket: where downloads are written before they are uploaded. Empty: `staging`
    /// beside the SQLite queue database.
    pub staging_dir: PathBuf,
    /// New downloads wait while the archive's filesystem has less free space than this, and
    /// a file is started only if it fits above it.
    #[serde(deserialize_with = "size", serialize_with = "ser_size")]
    pub min_free: u64,
    /// Write what the API says about each video (its status object) beside it as `<id>.json`.
    pub sidecar: bool,
    pub s3: S3Config,
}

/// `[archive.s3]`: how to reach the bucket `archive.dir` names.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Empty: AWS, from the region.
    pub endpoint: String,
    pub region: String,
    /// `https://endpoint/bucket/key` rather than `https://bucket.endpoint/key`: what Garage,
    /// MinIO and most self-hosted stores need.
    pub path_style: bool,
    /// Plain http to an endpoint that is not loopback (a store on a trusted network).
    pub allow_plain_http: bool,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: String::new(),
            region: "us-east-1".into(),
            path_style: false,
            allow_plain_http: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadConfig {
    pub concurrency: usize,
    /// On SIGTERM, how long in-flight downloads may run on before they are parked as partials.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub shutdown_grace: Duration,
    /// A body larger than this is refused (a broken or hostile server must not fill the disk).
    #[serde(deserialize_with = "size", serialize_with = "ser_size")]
    pub max_bytes: u64,
    /// A body slower than this many bytes a second for `low_speed_time` ends the attempt
    /// (resumably), as curl's `--speed-limit`/`--speed-time` do: a trickle just under
    /// `read_timeout` must not hold a slot for ever. 0 turns the check off.
    #[serde(deserialize_with = "size", serialize_with = "ser_size")]
    pub low_speed_limit: u64,
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub low_speed_time: Duration,
    /// Bytes a second for all downloads of the process together (0: unlimited), so that the
    /// archive does not starve the server's own traffic. Changes live on reload.
    #[serde(deserialize_with = "rate", serialize_with = "ser_rate")]
    pub rate_limit: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub initial_delay: Duration,
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub max_delay: Duration,
    /// Counted from a video's first attempt; past it, a video still not downloadable is failed.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub give_up_after: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `hingnetd=debug,info`. `RUST_LOG` overrides it.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line per event, `key=value` fields; no colours unless stderr is a terminal.
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            base_url: "https://models.hingnet.com.cn".into(),
            token_file: "/etc/hingnetd/token".into(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            allow_plain_http: false,
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            database: "/var/lib/hingnetd/queue.db".into(),
            poll_interval: Duration::from_secs(5),
            password_file: PathBuf::new(),
            lease: Duration::from_secs(60),
            instance: String::new(),
        }
    }
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            dir: "/var/lib/hingnetd/videos".into(),
            staging_dir: PathBuf::new(),
            min_free: 1 << 30,
            sidecar: true,
            s3: S3Config::default(),
        }
    }
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig {
            concurrency: 4,
            shutdown_grace: Duration::from_secs(10),
            max_bytes: 16 << 30,
            low_speed_limit: 1 << 10,
            low_speed_time: Duration::from_secs(60),
            rate_limit: 0,
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_delay: Duration::from_secs(30),
            max_delay: Duration::from_secs(600),
            give_up_after: Duration::from_secs(24 * 3600),
        }
    }
}

impl Config {
    /// Reads, parses and validates the file. A missing file at the default path is not an
    /// error (all defaults apply); a missing file the operator named is.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let (at, message) = toml_error_at(text, &e);
            ConfigError::Parse {
                path: path.to_owned(),
                at,
                message,
            }
        })?;
        config.validate(path, text)?;
        Ok(config)
    }

    fn validate(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let bad = |key, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            line: line_of_key(text, key),
            message,
        };
        let url = reqwest::Url::parse(&self.api.base_url).map_err(|e| {
            bad(
                "api.base_url",
                format!("{:?} is not a URL ({e})", self.api.base_url),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(bad(
                "api.base_url",
                format!("{:?} must be an http(s) URL with a host", self.api.base_url),
            ));
        }
        if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
            return Err(bad(
                "api.base_url",
                "must not carry a query, fragment or credentials (the token goes in token_file)"
                    .into(),
            ));
        }
        // What SDK docs call the base URL ends in /v1; ours is the host's, and hingnetd adds
        // /v1/videos itself: with /v1 here every request would 404 and every video fail.
        let path = url.path().trim_end_matches('/');
        if path.ends_with("/v1") || path.ends_with("/v1/videos") {
            let root = format!(
                "{}{}",
                crate::api::origin_of(&url),
                &path[..path.rfind("/v1").unwrap_or(0)]
            );
            return Err(bad(
                "api.base_url",
                format!(
                    "{:?} ends in {}: give the address without it ({root:?}); hingnetd adds /v1/videos/ID/content itself",
                    self.api.base_url,
                    &path[path.rfind("/v1").unwrap_or(0)..]
                ),
            ));
        }
        if url.scheme() == "http" && !is_loopback(&url) && !self.api.allow_plain_http {
            return Err(bad(
                "api.base_url",
                format!(
                    "{:?} is plain http to a host that is not loopback: the token would travel in clear; use https, or set api.allow_plain_http = true for your own gateway on a trusted network",
                    self.api.base_url
                ),
            ));
        }
        for (key, d) in [
            ("api.connect_timeout", self.api.connect_timeout),
            ("api.read_timeout", self.api.read_timeout),
            ("queue.poll_interval", self.queue.poll_interval),
            ("queue.lease", self.queue.lease),
            ("retry.initial_delay", self.retry.initial_delay),
            ("retry.max_delay", self.retry.max_delay),
            ("retry.give_up_after", self.retry.give_up_after),
            ("download.low_speed_time", self.download.low_speed_time),
        ] {
            if d.is_zero() {
                return Err(bad(key, "must be greater than zero".into()));
            }
            if d > MAX_DURATION {
                return Err(bad(key, "must be at most 30 days".into()));
            }
        }
        if self.download.max_bytes == 0 {
            return Err(bad(
                "download.max_bytes",
                "must be greater than zero".into(),
            ));
        }
        if self.retry.max_delay < self.retry.initial_delay {
            return Err(bad(
                "retry.max_delay",
                "must not be shorter than retry.initial_delay".into(),
            ));
        }
        if !(1..=256).contains(&self.download.concurrency) {
            return Err(bad(
                "download.concurrency",
                format!("{} is out of range (1 to 256)", self.download.concurrency),
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            return Err(bad("log.level", format!("{:?}: {e}", self.log.level)));
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(bad(
                "metrics.listen",
                format!(
                    "{:?} is not an address and port like \"127.0.0.1:9464\" or \"[::1]:9464\" (empty: no metrics)",
                    self.metrics.listen
                ),
            ));
        }
        if self.queue.database.is_empty() {
            return Err(bad("queue.database", "must not be empty".into()));
        }
        if self.archive.dir.as_os_str().is_empty() {
            return Err(bad("archive.dir", "must not be empty".into()));
        }
        crate::queue::Location::of(&self.queue).map_err(|e| bad("queue.database", e))?;
        let archive = crate::store::Location::of(self).map_err(|(key, e)| bad(key, e))?;
        if archive.is_bucket() && self.download.max_bytes > crate::store::s3::MAX_OBJECT {
            return Err(bad(
                "download.max_bytes",
                format!(
                    "{} is more than a bucket takes in one upload (5GiB): set it to at most \"5GiB\" when archive.dir is a bucket",
                    self.download.max_bytes
                ),
            ));
        }
        if self.queue.lease < Duration::from_secs(1) {
            return Err(bad("queue.lease", "must be at least 1s".into()));
        }
        if !self.queue.instance.is_empty()
            && (self.queue.instance.len() > 64
                || !self
                    .queue
                    .instance
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
        {
            return Err(bad(
                "queue.instance",
                format!(
                    "{:?}: use up to 64 letters, digits, '.', '_' and '-'",
                    self.queue.instance
                ),
            ));
        }
        Ok(())
    }

    /// Where the queue is; `validate` has already proven `[queue]` names one.
    pub fn queue_location(&self) -> crate::queue::Location {
        crate::queue::Location::of(&self.queue).expect("validated at load")
    }

    /// Where the archive is; `validate` has already proven `[archive]` names one.
    pub fn archive_location(&self) -> crate::store::Location {
        crate::store::Location::of(self).expect("validated at load")
    }

    /// The base URL as parsed; `validate` has already proven it parses.
    pub fn base_url(&self) -> reqwest::Url {
        reqwest::Url::parse(&self.api.base_url).expect("validated at load")
    }
}

/// Whether a URL names this machine: 127.0.0.0/8, ::1 or `localhost`.
pub(crate) fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        // Not `*.localhost`: the resolver may ask DNS for those, and get any address.
        Err(_) => bare.trim_end_matches('.').eq_ignore_ascii_case("localhost"),
    }
}

/// toml's errors are multi-line with a source excerpt and its messages name no key; an
/// operator's log wants one line that names the line and the key (`:14: retry.initial_delay`).
fn toml_error_at(text: &str, e: &toml::de::Error) -> (String, String) {
    let message = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else {
        return (String::new(), message);
    };
    let start = span.start.min(text.len());
    let line = text[..start].matches('\n').count() + 1;
    let key = keyed_lines(text).find(|(l, _)| *l == line).map(|(_, k)| k);
    let at = match key {
        Some(key) => format!(":{line}: {key}"),
        None => format!(":{line}"),
    };
    (at, message)
}

/// The line that sets a dotted key (`retry.max_delay`), if the file sets it.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    keyed_lines(text).find(|(_, k)| k == key).map(|(l, _)| l)
}

/// Each line that names a key, with its number (from 1) and the dotted key: a `[table]`
/// header names the table; `name = ...` names `table.name`, the table being the last header
/// above it.
fn keyed_lines(text: &str) -> impl Iterator<Item = (usize, String)> + '_ {
    let mut table = String::new();
    text.lines().enumerate().filter_map(move |(i, l)| {
        let l = l.trim();
        if l.starts_with('#') {
            return None;
        }
        if let Some(t) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = t.trim_matches(|c| c == '[' || c == ' ').to_owned();
            return Some((i + 1, table.clone()));
        }
        let name = l.split_once('=')?.0.trim().trim_matches('"');
        match (name.is_empty(), table.is_empty()) {
            (true, _) => None,
            (false, true) => Some((i + 1, name.to_owned())),
            (false, false) => Some((i + 1, format!("{table}.{name}"))),
        }
    })
}

/// The secret. Its `Debug` and `Display` never show it, so it cannot leak through a log line
/// or an error chain by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    #[cfg(test)]
    pub fn new(s: String) -> Token {
        Token(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Where the token came from, for log lines (never the token itself).
#[derive(Debug, Clone)]
pub enum TokenSource {
    Credential(PathBuf),
    Env,
    File(PathBuf),
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Credential(p) => write!(f, "systemd credential {}", p.display()),
            TokenSource::Env => write!(f, "environment variable {TOKEN_ENV}"),
            TokenSource::File(p) => write!(f, "token file {}", p.display()),
        }
    }
}

/// Loads the token: a systemd credential wins (it is what the unit is meant to use), then the
/// environment, then `api.token_file`. Called again whenever the API rejects the token, so an
/// operator's fix is picked up without a restart.
pub fn load_token(api: &ApiConfig) -> Result<(Token, TokenSource), ConfigError> {
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let path = Path::new(&dir).join(TOKEN_CREDENTIAL);
        if path.exists() {
            let src = TokenSource::Credential(path.clone());
            return read_token_file(&path).map(|t| (t, src));
        }
    }
    if let Some(v) = std::env::var_os(TOKEN_ENV) {
        let v = v
            .into_string()
            .map_err(|_| ConfigError::Token(format!("{TOKEN_ENV} is not valid UTF-8")))?;
        return check_token(v.trim(), &TokenSource::Env).map(|t| (t, TokenSource::Env));
    }
    let path = &api.token_file;
    read_token_file(path).map(|t| (t, TokenSource::File(path.clone())))
}

fn read_token_file(path: &Path) -> Result<Token, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let cannot = |e: std::io::Error| {
        ConfigError::Token(format!(
            "cannot read token file {} (api.token_file): {e}",
            path.display()
        ))
    };
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    // Checked on the opened file, so what is checked is what is read.
    let mode = file.metadata().map_err(cannot)?.permissions().mode();
    if mode & 0o002 != 0 {
        return Err(ConfigError::Token(format!(
            "token file {} is world-writable (mode {:o}); refusing a token anyone could replace",
            path.display(),
            mode & 0o7777
        )));
    }
    if mode & 0o044 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", mode & 0o7777),
            "token file is readable by group or others; chmod 600 it"
        );
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(cannot)?;
    check_token(text.trim(), &TokenSource::File(path.to_owned()))
}

fn check_token(t: &str, src: &TokenSource) -> Result<Token, ConfigError> {
    if t.is_empty() {
        return Err(ConfigError::Token(format!("the token in {src} is empty")));
    }
    // The token becomes an HTTP header value: reject what would be refused there, without
    // echoing the offending content.
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::Token(format!(
            "the token in {src} contains spaces, control or non-ASCII characters"
        )));
    }
    Ok(Token(t.to_owned()))
}

const DURATION_FORMS: &str = "(use 300ms, 30s, 10m, 24h)";

/// Parses `300ms`, `30s`, `10m`, `24h`, `7d` (also compound: `1h30m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("{s:?} is not a duration {DURATION_FORMS}"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{s:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86400)),
            "" if rest.is_empty() => {
                return Err(format!(
                    "{s:?} is not a duration: the number needs a unit {DURATION_FORMS}"
                ));
            }
            "" => return Err(format!("{s:?} is not a duration {DURATION_FORMS}")),
            _ => {
                return Err(format!(
                    "{s:?} is not a duration: unknown unit {unit:?} {DURATION_FORMS}"
                ));
            }
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// Formats a duration the way the config file spells it, for `check-config` and log lines.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    match s {
        s if s != 0 && s.is_multiple_of(3600) => format!("{}h", s / 3600),
        s if s != 0 && s.is_multiple_of(60) => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

const SIZE_UNITS: [(&str, u64); 10] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    // SI's own spelling of the kilo; the other prefixes are capitals either way.
    ("kB", 1_000),
    ("B", 1),
];

/// Parses `16GiB`, `500MiB`, `1GB`, `4096` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = s.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like \"16GiB\", \"500MiB\" or \"4096\""))?;
    let mult = match unit.trim() {
        "" => 1,
        u => SIZE_UNITS
            .iter()
            .find(|(name, _)| *name == u)
            .map(|(_, m)| *m)
            .ok_or_else(|| {
                format!("{s:?} has unknown unit {u:?} (B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)")
            })?,
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// The largest binary unit that divides `n` exactly.
pub fn format_size(n: u64) -> String {
    for (name, m) in &SIZE_UNITS[..4] {
        if n != 0 && n.is_multiple_of(*m) {
            return format!("{}{name}", n / m);
        }
    }
    format!("{n}B")
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) => Ok(n),
        Size::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

/// What a rate must look like, for the error that refuses one.
const RATE_FORM: &str =
    "a rate like \"50MiB/s\", \"500KiB/s\", \"2MB/s\", \"1000000/s\", or \"0\" for unlimited";

/// Parses `download.rate_limit`: a size (`parse_size`'s units) per second, or `0`.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(0);
    }
    let refused = || format!("{s:?} is not {RATE_FORM}");
    let per_second = t.strip_suffix("/s").ok_or_else(refused)?;
    // The size's own message would speak of sizes; the operator wrote a rate.
    parse_size(per_second).map_err(|_| refused())
}

/// `50MiB/s`, `2000000B/s`, `0`: as `parse_rate` reads it back.
pub fn format_rate(n: u64) -> String {
    match n {
        0 => "0".into(),
        n => format!("{}/s", format_size(n)),
    }
}

/// A visitor rather than an untagged enum, so that a wrong type (`-5`, `1.5`) is told the form
/// too. The key and line come from `toml_error_at`.
fn rate<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct Rate;
    impl serde::de::Visitor<'_> for Rate {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "{RATE_FORM}")
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<u64, E> {
            Ok(n)
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<u64, E> {
            u64::try_from(n).map_err(|_| E::custom(format!("{n} is not {RATE_FORM}")))
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<u64, E> {
            parse_rate(s).map_err(E::custom)
        }
    }
    d.deserialize_any(Rate)
}

fn ser_rate<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_rate(*n))
}

fn ser_size<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_size(*n))
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("10").unwrap_err().contains("unit"));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        for d in ["300ms", "30s", "10m", "24h", "72h"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16GiB"), Ok(16 << 30));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("99999999TiB").is_err());
        for s in ["16GiB", "100KiB", "12B"] {
            assert_eq!(format_size(parse_size(s).unwrap()), s);
        }
        let c = Config::parse("[download]\nmax_bytes = 1000\n", Path::new("x")).unwrap();
        assert_eq!(c.download.max_bytes, 1000);
    }

    #[test]
    fn errors_name_the_line_and_the_key() {
        let text = "# comment\n[api]\nbase_url = \"https://api.example\"\n\n[retry]\nmax_delay = \"10m\"\ninitial_delay = \"30 seconds\"\n";
        let e = Config::parse(text, Path::new("hingnetd.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid config file hingnetd.toml:7: retry.initial_delay: \"30 seconds\" is not a duration (use 300ms, 30s, 10m, 24h)"
        );
        let e = Config::parse("[download]\nconcurrency = \"four\"\n", Path::new("h.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("invalid config file h.toml:2: download.concurrency: "),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        let e = Config::parse("[download]\nconcurency = 4\n", Path::new("h.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("invalid config file h.toml:2: download.concurency: unknown field"),
            "{e}"
        );
        // Found valid by the parser, refused by validation: the same line and key.
        let e = Config::parse("[retry]\n\ninitial_delay = \"0s\"\n", Path::new("h.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid config file h.toml:3: retry.initial_delay: must be greater than zero"
        );
    }

    #[test]
    fn rates() {
        for (text, want) in [
            ("50MiB/s", 50 << 20),
            ("500KiB/s", 500 << 10),
            ("1GiB/s", 1 << 30),
            ("2MB/s", 2_000_000),
            ("500kB/s", 500_000),
            ("500KB/s", 500_000),
            ("1GB/s", 1_000_000_000),
            ("1000000/s", 1_000_000),
            ("64B/s", 64),
            (" 8 MiB/s ", 8 << 20),
            ("0", 0),
            ("0/s", 0),
        ] {
            assert_eq!(parse_rate(text), Ok(want), "{text}");
        }
        for bad in [
            "fast",
            "50MiB",
            "50 MiB per second",
            "50MiBps",
            "50Mb/s",
            "-1/s",
            "/s",
            "",
        ] {
            let e = parse_rate(bad).unwrap_err();
            assert!(
                e.contains("\"50MiB/s\"") && e.contains(&format!("{bad:?}")),
                "{e}"
            );
        }
        for n in [0, 50 << 20, 500 << 10, 2_000_000, 1] {
            assert_eq!(parse_rate(&format_rate(n)), Ok(n));
        }
        let p = Path::new("c.toml");
        let c = Config::parse("[download]\nrate_limit = \"50MiB/s\"\n", p).unwrap();
        assert_eq!(c.download.rate_limit, 50 << 20);
        let c = Config::parse("[download]\nrate_limit = 0\n", p).unwrap();
        assert_eq!(c.download.rate_limit, 0);
        let c = Config::parse("[download]\nrate_limit = 1000000\n", p).unwrap();
        assert_eq!(c.download.rate_limit, 1_000_000);
        for wrong_type in ["-5", "1.5", "true"] {
            let e = Config::parse(&format!("[download]\nrate_limit = {wrong_type}\n"), p)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("download.rate_limit") && e.contains("\"50MiB/s\""),
                "{e}"
            );
        }
        assert_eq!(Config::default().download.rate_limit, 0);
        let e = Config::parse("[download]\nrate_limit = \"50MiB\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("download.rate_limit")
                && e.contains("\"50MiB\"")
                && e.contains("\"50MiB/s\"")
                && !e.contains('\n'),
            "{e}"
        );
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", Path::new("x.toml")).unwrap();
        assert_eq!(c.download.concurrency, 4);
        assert_eq!(c.retry.give_up_after, Duration::from_secs(86400));
    }

    /// The shipped example must parse and must say exactly what the defaults say, so the
    /// documentation cannot drift from the code.
    #[test]
    fn example_file_matches_defaults() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/hingnetd.toml.example"
        ));
        let text = std::fs::read_to_string(path).unwrap();
        let parsed = Config::parse(&text, path).unwrap();
        assert_eq!(format!("{parsed:?}"), format!("{:?}", Config::default()));
        // And every key is spelled out, not left to the defaults.
        let table: toml::Table = text.parse().unwrap();
        fn leaves(t: &toml::Table) -> usize {
            t.values().map(|v| v.as_table().map_or(1, leaves)).sum()
        }
        assert_eq!(
            leaves(&table),
            30,
            "hingnetd.toml.example should document every key"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let p = Path::new("c.toml");
        let e = Config::parse("[api]\nbse_url = \"x\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bse_url"), "{e}");
        let e = Config::parse("[retry]\ninitial_delay = \"soon\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("initial_delay") || e.contains("soon"), "{e}");
        let e = Config::parse("[download]\nconcurrency = 0\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("download.concurrency"), "{e}");
        let e = Config::parse("[api]\nbase_url = \"ftp://x\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("api.base_url"), "{e}");
        for e in [
            Config::parse("[api]\nbse_url = \"x\"\n", p).unwrap_err(),
            Config::parse("[retry]\nmax_delay = \"1s\"\n", p).unwrap_err(),
        ] {
            assert!(!e.to_string().contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn base_urls_that_would_fail_every_video_or_leak_the_token_are_refused() {
        let p = Path::new("c.toml");
        let parse = |url: &str, plain: bool| {
            Config::parse(
                &format!("[api]\nbase_url = {url:?}\nallow_plain_http = {plain}\n"),
                p,
            )
        };
        for url in [
            "https://models.hingnet.com.cn/v1",
            "https://models.hingnet.com.cn/v1/",
            "https://gw.example/hingnet/v1/videos",
            "https://gw.example/v1/videos/",
        ] {
            let e = parse(url, false).unwrap_err().to_string();
            assert!(
                e.contains("api.base_url") && e.contains("ends in /v1"),
                "{e}"
            );
            assert!(!e.contains('\n'), "{e}");
        }
        let e = parse("https://gw.example/hingnet/v1", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"https://gw.example/hingnet\""), "{e}");
        for far in ["http://hingnet.internal", "http://api.localhost"] {
            let e = parse(far, false).unwrap_err().to_string();
            assert!(e.contains("in clear"), "{far}: {e}");
        }
        let e = parse("http://hingnet.internal", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("in clear") && e.contains("allow_plain_http"),
            "{e}"
        );
        parse("http://hingnet.internal", true).unwrap();
        for ok in [
            "http://127.0.0.1:8080",
            "http://127.1.2.3",
            "http://[::1]:80",
            "http://localhost",
            "https://models.hingnet.com.cn",
            "https://gw.example/v1beta",
        ] {
            parse(ok, false).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn effective_config_round_trips() {
        let c = Config::default();
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("give_up_after = \"24h\""), "{text}");
        let back = Config::parse(&text, Path::new("x")).unwrap();
        assert_eq!(format!("{back:?}"), format!("{c:?}"));
        let e = Config::parse("[log]\nlevel = \"=bad=\"\n", Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("log.level"), "{e}");
        let e = Config::parse("[log]\nformat = \"xml\"\n", Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("xml"), "{e}");
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = Token::new("oh-secret".into());
        assert!(!format!("{t:?}").contains("secret"));
    }
}
