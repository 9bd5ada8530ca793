//! Where the PostgreSQL queue is and how to reach it: the `postgres://` URL as libpq spells it
//! (a password in it refused), the password from a systemd credential, `PGPASSWORD` or
//! `queue.password_file`, and TLS by `sslmode` as libpq means it, over rustls with the system's
//! trust store or `sslrootcert`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// The systemd credential (`LoadCredential=`) that holds the database password.
pub const PASSWORD_CREDENTIAL: &str = "hingnet-db-password";

/// How long connecting may take when the URL does not say (`connect_timeout=`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `sslmode`, as libpq means it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// TLS if the server offers it, else plain; the certificate is not checked.
    Prefer,
    /// TLS or nothing; the certificate is not checked (unless `sslrootcert` is given: then
    /// as `VerifyCa`, libpq's rule).
    Require,
    /// The certificate chains to a trusted CA; its name is not checked.
    VerifyCa,
    /// The chain, and the certificate names the host.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// A parsed `queue.database` URL and the settings that go with it. Holds no password: that is
/// read when connecting (`Target::pg_config`), so nothing that prints a `Target` can show one.
#[derive(Debug, Clone)]
pub struct Target {
    user: Option<String>,
    /// A host name or address, or a directory holding the server's Unix socket.
    host: String,
    port: u16,
    dbname: Option<String>,
    pub ssl_mode: SslMode,
    root_cert: Option<PathBuf>,
    pub connect_timeout: Duration,
    application_name: String,
    password_file: Option<PathBuf>,
    /// `target_session_attrs=read-write`: connect only to a server that takes writes.
    read_write: bool,
    /// This daemon's name in the queue.
    pub instance: String,
    /// How long a claim lives without a heartbeat.
    pub lease: Duration,
}

/// Whether `database` names a PostgreSQL queue rather than a SQLite file.
pub fn is_url(database: &str) -> bool {
    database.starts_with("postgres://") || database.starts_with("postgresql://")
}

impl Target {
    /// Parses the URL. Every problem is one line naming it, never echoing the URL (it may hold
    /// a password).
    pub fn parse(
        database: &str,
        password_file: &Path,
        instance: &str,
        lease: Duration,
    ) -> Result<Target, String> {
        let url = reqwest::Url::parse(database)
            .map_err(|e| format!("not a valid postgres:// URL ({e})"))?;
        if url.password().is_some() {
            return Err("a password in the URL is refused: it would show in logs and `ps`; put it in queue.password_file, PGPASSWORD or the systemd credential hingnet-db-password".into());
        }
        let user = Some(decode(url.username(), "user")?).filter(|u| !u.is_empty());
        // An IPv6 literal keeps its brackets in the URL's host.
        let mut host = decode(
            url.host_str()
                .unwrap_or("")
                .trim_start_matches('[')
                .trim_end_matches(']'),
            "host",
        )?;
        let dbname = decode(url.path().trim_start_matches('/'), "database name")?;
        if dbname.contains('/') {
            return Err(format!("{dbname:?} is not a database name"));
        }
        let mut t = Target {
            user,
            host: String::new(),
            port: url.port().unwrap_or(5432),
            dbname: Some(dbname).filter(|d| !d.is_empty()),
            ssl_mode: SslMode::Prefer,
            root_cert: None,
            connect_timeout: CONNECT_TIMEOUT,
            application_name: "hingnetd".into(),
            password_file: Some(password_file.to_owned()).filter(|p| !p.as_os_str().is_empty()),
            read_write: false,
            instance: instance.to_owned(),
            lease,
        };
        for (key, value) in url.query_pairs() {
            match &*key {
                "sslmode" => {
                    t.ssl_mode = SslMode::parse(&value).ok_or_else(|| {
                        format!("sslmode {value:?} is not one of disable, prefer, require, verify-ca, verify-full")
                    })?
                }
                "sslrootcert" if value == "system" => t.root_cert = None,
                "sslrootcert" => t.root_cert = Some(PathBuf::from(&*value)),
                "host" => host = value.into_owned(),
                "port" => {
                    t.port = value
                        .parse()
                        .map_err(|_| format!("port {value:?} is not a port number"))?
                }
                "user" => t.user = Some(value.into_owned()),
                "dbname" => t.dbname = Some(value.into_owned()),
                "application_name" => t.application_name = value.into_owned(),
                "target_session_attrs" => {
                    t.read_write = match &*value {
                        "read-write" => true,
                        "any" => false,
                        other => {
                            return Err(format!(
                                "target_session_attrs {other:?} is not one of read-write, any"
                            ));
                        }
                    }
                }
                "connect_timeout" => {
                    let secs: u64 = value.parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                        format!("connect_timeout {value:?} is not a whole number of seconds")
                    })?;
                    t.connect_timeout = Duration::from_secs(secs);
                }
                "password" => return Err("a password in the URL is refused: it would show in logs and `ps`; put it in queue.password_file, PGPASSWORD or the systemd credential hingnet-db-password".into()),
                other => {
                    return Err(format!(
                        "URL parameter {other:?} is not one hingnetd knows (sslmode, sslrootcert, host, port, user, dbname, application_name, connect_timeout, target_session_attrs)"
                    ));
                }
            }
        }
        if host.is_empty() {
            return Err("the URL names no host (postgres://user@host:5432/db, or ?host=/run/postgresql for the local socket)".into());
        }
        t.host = host;
        if t.is_socket() && t.ssl_mode != SslMode::Disable && t.ssl_mode != SslMode::Prefer {
            return Err(format!(
                "sslmode {} over a Unix socket ({}): TLS is for TCP; use sslmode=disable or a host name",
                t.ssl_mode.as_str(),
                t.host
            ));
        }
        Ok(t)
    }

    fn is_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// Where the queue is, for messages: no password, no query string.
    pub fn display(&self) -> String {
        let user = self
            .user
            .as_deref()
            .map(|u| format!("{u}@"))
            .unwrap_or_default();
        let db = self.dbname.as_deref().unwrap_or("");
        if self.is_socket() {
            format!("postgres://{user}/{db} (socket in {})", self.host)
        } else if self.host.contains(':') {
            format!("postgres://{user}[{}]:{}/{db}", self.host, self.port)
        } else {
            format!("postgres://{user}{}:{}/{db}", self.host, self.port)
        }
    }

    /// The driver's settings, with the password read now from wherever it is kept.
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, String> {
        let mut c = tokio_postgres::Config::new();
        if self.is_socket() {
            c.host_path(&self.host);
        } else {
            c.host(&self.host);
        }
        c.port(self.port)
            .application_name(&self.application_name)
            .connect_timeout(self.connect_timeout)
            // A cut network otherwise leaves a statement waiting for the kernel's retransmission
            // timeout (a quarter of an hour): these notice it within about half a minute.
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(15))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(30))
            .ssl_mode(match self.ssl_mode {
                SslMode::Disable => tokio_postgres::config::SslMode::Disable,
                SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                _ => tokio_postgres::config::SslMode::Require,
            });
        if let Some(u) = &self.user {
            c.user(u);
        } else if let Some(u) = std::env::var("PGUSER").ok().filter(|u| !u.is_empty()) {
            c.user(u);
        }
        if let Some(d) = &self.dbname {
            c.dbname(d);
        }
        if self.read_write {
            c.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        }
        if let Some(p) = self.password()? {
            c.password(p);
        }
        Ok(c)
    }

    /// The password: a systemd credential first, then `PGPASSWORD`, then `queue.password_file`;
    /// none at all is fine (peer or trust authentication; client certificates are not
    /// supported).
    fn password(&self) -> Result<Option<String>, String> {
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let path = Path::new(&dir).join(PASSWORD_CREDENTIAL);
            if path.exists() {
                return read_password(&path, "the systemd credential").map(Some);
            }
        }
        if let Some(v) = std::env::var_os("PGPASSWORD") {
            let v = v
                .into_string()
                .map_err(|_| "PGPASSWORD is not valid UTF-8".to_owned())?;
            return Ok(Some(v));
        }
        match &self.password_file {
            Some(path) => read_password(path, "queue.password_file").map(Some),
            None => Ok(None),
        }
    }

    /// The TLS settings for `sslmode`.
    pub fn tls(&self) -> Result<rustls::ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?;
        let verify = match self.ssl_mode {
            SslMode::Disable | SslMode::Prefer => false,
            SslMode::Require => self.root_cert.is_some(),
            SslMode::VerifyCa | SslMode::VerifyFull => true,
        };
        let config = if !verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth()
        } else {
            let roots = self.roots()?;
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("TLS set-up: {e}"))?;
            if self.ssl_mode == SslMode::VerifyFull {
                builder.with_webpki_verifier(webpki).with_no_client_auth()
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
                    .with_no_client_auth()
            }
        };
        Ok(config)
    }

    fn roots(&self) -> Result<rustls::RootCertStore, String> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                let cannot = |e: &dyn std::fmt::Display| {
                    format!("cannot read sslrootcert {}: {e}", path.display())
                };
                for cert in CertificateDer::pem_file_iter(path).map_err(|e| cannot(&e))? {
                    roots
                        .add(cert.map_err(|e| cannot(&e))?)
                        .map_err(|e| cannot(&e))?;
                }
                if roots.is_empty() {
                    return Err(format!(
                        "sslrootcert {} holds no certificate",
                        path.display()
                    ));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err("the system trust store holds no certificate (install ca-certificates, or give sslrootcert=)".into());
                }
            }
        }
        Ok(roots)
    }
}

fn read_password(path: &Path, what: &str) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let cannot = |e: std::io::Error| {
        format!(
            "cannot read the database password from {} ({what}): {e}",
            path.display()
        )
    };
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    let mode = file.metadata().map_err(cannot)?.permissions().mode();
    if mode & 0o002 != 0 {
        return Err(format!(
            "database password file {} is world-writable (mode {:o}); refusing a password anyone could replace",
            path.display(),
            mode & 0o7777
        ));
    }
    if mode & 0o044 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o7777), "database password file is readable by group or others; chmod 600 it");
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(cannot)?;
    // One line, as `echo secret > file` writes it.
    let p = text.strip_suffix('\n').unwrap_or(&text);
    let p = p.strip_suffix('\r').unwrap_or(p);
    if p.is_empty() {
        return Err(format!(
            "database password file {} is empty",
            path.display()
        ));
    }
    Ok(p.to_owned())
}

/// Percent-decodes one part of the URL.
fn decode(s: &str, what: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("the URL's {what} has a broken %-escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("the URL's {what} is not UTF-8"))
}

/// `sslmode=require` (and `prefer`): encrypted, but any certificate will do, as with libpq.
/// The handshake's signatures are still checked, so the session is with whoever holds the
/// certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted CA; the name need not match. webpki
/// checks the chain before the name, so a name error means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<Target, String> {
        Target::parse(url, Path::new(""), "host1", Duration::from_secs(60))
    }

    #[test]
    fn a_password_in_the_url_is_refused_without_echoing_it() {
        for url in [
            "postgres://hingnetd:s3cret@db:5432/hingnet",
            "postgres://hingnetd@db/hingnet?password=s3cret",
        ] {
            let e = parse(url).unwrap_err();
            assert!(e.contains("password in the URL is refused"), "{e}");
            assert!(!e.contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn urls_as_libpq_spells_them() {
        let t = parse("postgres://hingnetd@db.internal:5433/hingnet?sslmode=verify-full").unwrap();
        assert_eq!(t.display(), "postgres://hingnetd@db.internal:5433/hingnet");
        assert_eq!(t.ssl_mode, SslMode::VerifyFull);
        let t = parse("postgresql:///hingnet?host=/run/postgresql&sslmode=disable").unwrap();
        assert_eq!(
            t.display(),
            "postgres:///hingnet (socket in /run/postgresql)"
        );
        let t = parse("postgres://u%40x@h/d%20b").unwrap();
        assert_eq!(t.user.as_deref(), Some("u@x"));
        assert_eq!(t.dbname.as_deref(), Some("d b"));
        assert_eq!(t.ssl_mode, SslMode::Prefer);
    }

    #[test]
    fn bad_urls_get_one_line_naming_the_problem() {
        for (url, says) in [
            ("postgres://h/db?sslmode=verify", "sslmode \"verify\""),
            ("postgres://h/db?sslcompression=1", "\"sslcompression\""),
            ("postgres:///db", "names no host"),
            ("postgres://h/db?connect_timeout=soon", "connect_timeout"),
            (
                "postgres:///db?host=/run/pg&sslmode=verify-full",
                "Unix socket",
            ),
        ] {
            let e = parse(url).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
