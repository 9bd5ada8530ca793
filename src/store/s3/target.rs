//! Where the bucket is and who we are to it: `archive.dir = "s3://bucket/prefix/"` with
//! `[archive.s3]` parsed into a `Target`, and the access key found (systemd credentials, the
//! environment, the shared credentials file), in that order.

use std::path::{Path, PathBuf};

use reqwest::Url;

use crate::config::S3Config;

/// The systemd credentials the unit's `LoadCredential=` provides.
pub const KEY_ID_CREDENTIAL: &str = "s3-access-key-id";
pub const SECRET_CREDENTIAL: &str = "s3-secret-access-key";

/// A bucket and the key prefix the archive lives under.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub bucket: String,
    /// Empty, or ending in `/`.
    pub prefix: String,
    pub endpoint: Url,
    pub region: String,
    pub path_style: bool,
}

/// Whether `archive.dir` names a bucket rather than a directory.
pub fn is_bucket(dir: &Path) -> bool {
    dir.to_str().is_some_and(|d| d.starts_with("s3://"))
}

impl Target {
    /// `s3://bucket/prefix/` and `[archive.s3]`; one line naming what is wrong otherwise.
    pub fn parse(dir: &str, s3: &S3Config) -> Result<Target, String> {
        let rest = dir
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{dir:?} does not start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // S3's rules for new buckets (3-63 of a-z, 0-9, '.', '-', starting and ending with a
        // letter or digit): a name outside them is a typo, and would make a strange URL.
        let edge_ok =
            |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !(3..=63).contains(&bucket.len())
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            || !edge_ok(bucket.chars().next())
            || !edge_ok(bucket.chars().last())
        {
            return Err(format!(
                "{dir:?}: {bucket:?} is not a bucket name (3 to 63 lowercase letters, digits, '.' and '-')"
            ));
        }
        // Keys are built as `<prefix><id>/...`: a prefix with `.`/`..` segments, empty
        // segments, or characters a shell or a console would mangle is refused, so that what
        // the operator reads is what the store holds.
        if !prefix.is_empty() {
            let bad_char = prefix.chars().find(|c| {
                !(c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.' | '=' | '+'))
            });
            if let Some(c) = bad_char {
                return Err(format!(
                    "{dir:?}: the key prefix may hold letters, digits and / - _ . = +, not {c:?}"
                ));
            }
            let segments: Vec<&str> = prefix
                .strip_suffix('/')
                .unwrap_or(prefix)
                .split('/')
                .collect();
            if segments
                .iter()
                .any(|s| s.is_empty() || *s == "." || *s == "..")
            {
                return Err(format!(
                    "{dir:?}: the key prefix has an empty, '.' or '..' segment"
                ));
            }
        }
        let prefix = match prefix {
            "" => String::new(),
            p if p.ends_with('/') => p.to_owned(),
            p => format!("{p}/"),
        };
        if s3.region.is_empty() {
            return Err(
                "archive.s3.region must not be empty (\"us-east-1\" if the store does not care)"
                    .into(),
            );
        }
        let endpoint = if s3.endpoint.is_empty() {
            format!("https://s3.{}.amazonaws.com", s3.region)
        } else {
            s3.endpoint.clone()
        };
        let endpoint =
            Url::parse(&endpoint).map_err(|e| format!("archive.s3.endpoint {endpoint:?}: {e}"))?;
        if !matches!(endpoint.scheme(), "http" | "https") || endpoint.host_str().is_none() {
            return Err(format!(
                "archive.s3.endpoint {:?}: use an http(s) URL with a host",
                s3.endpoint
            ));
        }
        if !endpoint.username().is_empty() || endpoint.password().is_some() {
            return Err("archive.s3.endpoint: credentials in the URL are refused (they would show in logs); see the README for where they go".into());
        }
        if endpoint.query().is_some() || endpoint.path() != "/" {
            return Err(format!(
                "archive.s3.endpoint {:?}: give only scheme, host and port",
                s3.endpoint
            ));
        }
        if endpoint.scheme() == "http"
            && !crate::config::is_loopback(&endpoint)
            && !s3.allow_plain_http
        {
            return Err(format!(
                "archive.s3.endpoint {:?} is plain http to a host that is not loopback: the videos and signed requests would travel in clear; use https, or set archive.s3.allow_plain_http = true for a store on a trusted network",
                s3.endpoint
            ));
        }
        // Virtual-host style puts the bucket in the host name: an address cannot have one.
        let host = endpoint.host_str().unwrap_or_default();
        let is_address = host.parse::<std::net::IpAddr>().is_ok()
            || host.starts_with('[')
            || host.eq_ignore_ascii_case("localhost");
        if is_address && !s3.path_style {
            return Err(format!(
                "archive.s3.endpoint {:?} is an address: set archive.s3.path_style = true (the bucket cannot go in its host name)",
                s3.endpoint
            ));
        }
        Ok(Target {
            bucket: bucket.to_owned(),
            prefix,
            endpoint,
            region: s3.region.clone(),
            path_style: s3.path_style,
        })
    }

    /// `s3://bucket/prefix`, as messages and rows name the archive.
    pub fn display(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    /// What a row's `path` says for a key.
    pub fn path_of(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// The key a row's `path` names, if it is in this bucket.
    pub fn key_of<'a>(&self, path: &'a str) -> Option<&'a str> {
        path.strip_prefix("s3://")?
            .strip_prefix(self.bucket.as_str())?
            .strip_prefix('/')
    }
}

/// An access key. `Debug` never shows the secret.
#[derive(Clone, PartialEq)]
pub struct Keys {
    pub id: String,
    pub secret: String,
    pub session_token: Option<String>,
    /// Where they came from, for the start-up line and messages.
    pub source: String,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("id", &self.id)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// The access key: the systemd credentials `s3-access-key-id` and `s3-secret-access-key`
/// first (what the unit is meant to use), then `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`
/// (with `AWS_SESSION_TOKEN`), then the shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`,
/// else `~/.aws/credentials`; profile `AWS_PROFILE`, else `default`). Read again when the
/// store refuses them, so an operator's fix is picked up without a restart.
pub fn load_keys() -> Result<Keys, String> {
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let dir = PathBuf::from(dir);
        let (id, secret) = (dir.join(KEY_ID_CREDENTIAL), dir.join(SECRET_CREDENTIAL));
        match (id.exists(), secret.exists()) {
            (true, true) => {
                return Ok(Keys {
                    id: read_small(&id)?,
                    secret: read_small(&secret)?,
                    session_token: None,
                    source: "systemd credentials".into(),
                });
            }
            (false, false) => {}
            _ => {
                return Err(format!(
                    "only one of the systemd credentials {KEY_ID_CREDENTIAL} and {SECRET_CREDENTIAL} is given"
                ));
            }
        }
    }
    let var = |name: &str| -> Result<Option<String>, String> {
        match std::env::var(name) {
            Ok(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_owned())),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name} is not valid UTF-8")),
        }
    };
    match (var("AWS_ACCESS_KEY_ID")?, var("AWS_SECRET_ACCESS_KEY")?) {
        (Some(id), Some(secret)) => {
            return Ok(Keys {
                id,
                secret,
                session_token: var("AWS_SESSION_TOKEN")?,
                source: "environment".into(),
            });
        }
        (None, None) => {}
        _ => {
            return Err("only one of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY is set".into());
        }
    }
    let file = match var("AWS_SHARED_CREDENTIALS_FILE")? {
        Some(f) => PathBuf::from(f),
        None => match std::env::var_os("HOME") {
            Some(home) => Path::new(&home).join(".aws/credentials"),
            None => return Err(no_keys()),
        },
    };
    let profile = var("AWS_PROFILE")?.unwrap_or_else(|| "default".into());
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(no_keys()),
        Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
    };
    from_shared_file(&text, &profile)
        .map(|(id, secret, session_token)| Keys {
            id,
            secret,
            session_token,
            source: format!("{} [{profile}]", file.display()),
        })
        .map_err(|why| format!("{}: {why}", file.display()))
}

fn no_keys() -> String {
    format!(
        "no S3 access key: set the systemd credentials {KEY_ID_CREDENTIAL} and {SECRET_CREDENTIAL}, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a shared credentials file (AWS_SHARED_CREDENTIALS_FILE)"
    )
}

fn read_small(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let t = text.trim();
    if t.is_empty() || t.contains(char::is_whitespace) {
        return Err(format!(
            "{} is empty or holds more than one word",
            path.display()
        ));
    }
    Ok(t.to_owned())
}

/// The `[profile]` section's keys of an AWS shared credentials file (INI).
fn from_shared_file(text: &str, profile: &str) -> Result<(String, String, Option<String>), String> {
    let mut in_profile = false;
    let mut found = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = name.trim() == profile;
            found |= in_profile;
            continue;
        }
        if !in_profile {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = Some(v.trim().to_owned()).filter(|v| !v.is_empty());
        match k.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => id = v,
            "aws_secret_access_key" => secret = v,
            "aws_session_token" => token = v,
            _ => {}
        }
    }
    if !found {
        return Err(format!("no profile [{profile}]"));
    }
    match (id, secret) {
        (Some(id), Some(secret)) => Ok((id, secret, token)),
        _ => Err(format!(
            "profile [{profile}] lacks aws_access_key_id or aws_secret_access_key"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(endpoint: &str) -> S3Config {
        S3Config {
            endpoint: endpoint.into(),
            path_style: true,
            ..S3Config::default()
        }
    }

    #[test]
    fn targets() {
        let t = Target::parse("s3://videos/hingnet/", &s3("http://127.0.0.1:3900")).unwrap();
        assert_eq!(
            (t.bucket.as_str(), t.prefix.as_str()),
            ("videos", "hingnet/")
        );
        assert_eq!(t.display(), "s3://videos/hingnet/");
        assert_eq!(
            t.key_of("s3://videos/hingnet/a/b.mp4"),
            Some("hingnet/a/b.mp4")
        );
        assert_eq!(t.key_of("s3://videosx/a"), None);
        assert_eq!(t.key_of("/srv/a.mp4"), None);
        let t = Target::parse("s3://videos", &s3("")).unwrap();
        assert_eq!(t.prefix, "");
        assert_eq!(t.endpoint.as_str(), "https://s3.us-east-1.amazonaws.com/");
        assert_eq!(
            Target::parse("s3://videos/a/b", &s3("")).unwrap().prefix,
            "a/b/"
        );
        for (dir, endpoint, says) in [
            ("s3://Videos/", "", "not a bucket name"),
            ("s3://v/", "", "not a bucket name"),
            ("s3://videos-/", "", "not a bucket name"),
            ("s3://videos/../x/", "", "'..' segment"),
            ("s3://videos/a//b/", "", "empty"),
            ("s3://videos/a//", "", "empty"),
            ("s3://videos/a b/", "", "not ' '"),
            ("s3://videos/", "http://s3.example.internal", "plain http"),
            (
                "s3://videos/",
                "https://k:s@s3.example.internal",
                "credentials in the URL",
            ),
            (
                "s3://videos/",
                "https://s3.example.internal/x?y",
                "only scheme, host and port",
            ),
            ("s3://videos/", "ftp://s3.example.internal", "http(s)"),
        ] {
            let e = Target::parse(dir, &s3(endpoint)).unwrap_err();
            assert!(e.contains(says), "{dir} {endpoint}: {e}");
            assert!(!e.contains(":s@"), "{e}");
        }
        let mut virtual_host = s3("http://127.0.0.1:3900");
        virtual_host.path_style = false;
        let e = Target::parse("s3://videos/", &virtual_host).unwrap_err();
        assert!(e.contains("path_style = true"), "{e}");
        let mut plain = s3("http://s3.example.internal:3900");
        plain.allow_plain_http = true;
        assert!(Target::parse("s3://videos/", &plain).is_ok());
    }

    #[test]
    fn shared_credentials_file() {
        let text = "[default]\naws_access_key_id = A1\naws_secret_access_key=S1\n\n[other]\n# c\naws_access_key_id=A2\naws_secret_access_key = S2\naws_session_token = T2\n";
        assert_eq!(
            from_shared_file(text, "default").unwrap(),
            ("A1".into(), "S1".into(), None)
        );
        assert_eq!(
            from_shared_file(text, "other").unwrap(),
            ("A2".into(), "S2".into(), Some("T2".into()))
        );
        assert!(
            from_shared_file(text, "nope")
                .unwrap_err()
                .contains("no profile [nope]")
        );
        let e = from_shared_file("[default]\naws_access_key_id=A\n", "default").unwrap_err();
        assert!(e.contains("lacks"), "{e}");
    }

    #[test]
    fn keys_debug_hides_the_secret() {
        let k = Keys {
            id: "GK1".into(),
            secret: "very-secret-value".into(),
            session_token: Some("tok".into()),
            source: "environment".into(),
        };
        let s = format!("{k:?}");
        assert!(
            s.contains("GK1") && !s.contains("very-secret") && !s.contains("tok\""),
            "{s}"
        );
    }
}
