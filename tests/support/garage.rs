//! A real Garage (the S3-compatible store) per test: one node on loopback ports of its own, fsync
//! on for data and metadata, a fixed access key and the bucket `videos`; and the tests' own
//! look at the bucket through curl's SigV4 (an implementation of the protocol independent of
//! the daemon's). `scripts/test` installs Garage (cached under `~/.cache/hingnetd-test`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BUCKET: &str = "videos";
pub const PREFIX: &str = "hingnet/";
pub const REGION: &str = "garage";
/// Garage wants a key ID of at least 8 of `[A-Za-z0-9._-]` and a secret of 16 printable
/// characters.
pub const KEY_ID: &str = "GKhingnetdtest0123456789";
pub const SECRET: &str = "hingnetd-test-secret-0123456789abcdef";

/// The `garage` binary: `HINGNETD_TEST_GARAGE`, else where `scripts/test` installs it, else
/// the PATH's.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("HINGNETD_TEST_GARAGE") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let cached = home.join(".cache/hingnetd-test/garage-2.5.0/bin/garage");
    if cached.exists() {
        return cached;
    }
    PathBuf::from("garage")
}

pub struct Garage {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// The S3 port Garage listens on now (a new one after each restart).
    pub port: u16,
    /// What the daemons are given as the endpoint: a forwarder whose port stays the same
    /// across restarts, and which can reset connections (`tcp_proxy`).
    pub proxy: super::tcp_proxy::Proxy,
    /// The access key the daemons get (the environment).
    pub key_id: String,
    pub secret: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Garage {
    /// Starts a node and waits until the bucket answers a listing.
    pub fn start() -> Garage {
        let mut g = Garage {
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
            port: 0,
            proxy: super::tcp_proxy::Proxy::start(0),
            key_id: KEY_ID.into(),
            secret: SECRET.into(),
        };
        g.launch();
        g
    }

    /// Writes the config with fresh ports (a killed node's may be held by TIME_WAIT) and
    /// starts the node on the same data.
    fn launch(&mut self) {
        let d = self.dir.path();
        self.port = free_port();
        let rpc = free_port();
        let config = format!(
            "metadata_dir = {:?}\ndata_dir = {:?}\ndb_engine = \"sqlite\"\nreplication_factor = 1\n\
             metadata_fsync = true\ndata_fsync = true\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_secret = \"{secret}\"\n\
             [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n",
            d.join("meta"),
            d.join("data"),
            s3 = self.port,
            secret = "4f".repeat(32),
        );
        std::fs::write(d.join("garage.toml"), config).expect("write garage.toml");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("garage.log"))
            .expect("garage log");
        let child = Command::new(binary())
            .arg("-c")
            .arg(d.join("garage.toml"))
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", KEY_ID)
            .env("GARAGE_DEFAULT_SECRET_KEY", SECRET)
            .env("GARAGE_DEFAULT_BUCKET", BUCKET)
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run Garage ({}): {e}; scripts/test installs it",
                    binary().display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self
                .request("GET", &format!("/{BUCKET}?list-type=2&max-keys=1"), None)
                .0
                == 200
            {
                self.proxy.retarget(self.port);
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("Garage exited ({status}) at start:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "Garage not ready in 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The endpoint daemons are given (the forwarder's).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.proxy.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same data (after `kill`), behind the same endpoint.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Runs the `garage` CLI against this node (its RPC), e.g. to manage keys.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let out = Command::new(binary())
            .arg("-c")
            .arg(self.dir.path().join("garage.toml"))
            .args(args)
            .env("RUST_LOG", "garage=warn")
            .output()
            .expect("run garage");
        assert!(
            out.status.success(),
            "garage {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Imports an access key with these rights on the bucket.
    pub fn add_key(&self, id: &str, secret: &str, rights: &[&str]) {
        self.cli(&["key", "import", "--yes", "-n", id, id, secret]);
        let mut args = vec!["bucket", "allow"];
        args.extend_from_slice(rights);
        args.extend_from_slice(&[BUCKET, "--key", id]);
        self.cli(&args);
    }

    /// Deletes an access key: requests signed with it are refused from now on.
    pub fn delete_key(&self, id: &str) {
        self.cli(&["key", "delete", "--yes", id]);
    }

    /// A signed request (curl's `--aws-sigv4`) to `path_and_query`: status and body.
    pub fn request(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&Path>,
    ) -> (u16, Vec<u8>) {
        let out_file = self
            .dir
            .path()
            .join(format!("curl-{}.out", fastrand::u64(..)));
        let mut c = Command::new("curl");
        c.args(["-s", "-X", method, "--aws-sigv4"])
            .arg(format!("aws:amz:{REGION}:s3"))
            .arg("--user")
            .arg(format!("{}:{}", self.key_id, self.secret))
            // curl 7.88 does not send it by itself, and Garage requires it.
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .arg("-o")
            .arg(&out_file)
            .args(["-w", "%{http_code}"]);
        if let Some(b) = body {
            c.arg("--data-binary").arg(format!("@{}", b.display()));
        }
        c.arg(format!("http://127.0.0.1:{}{path_and_query}", self.port));
        let out = c.output().expect("run curl");
        let status = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        let body = std::fs::read(&out_file).unwrap_or_default();
        let _ = std::fs::remove_file(&out_file);
        (status, body)
    }

    /// Every key under `prefix`, with its size, in key order.
    pub fn list(&self, prefix: &str) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            // curl signs the query as written: its parameters must be in sorted order.
            let q = if token.is_empty() {
                format!("/{BUCKET}?list-type=2&prefix={}", encode(prefix))
            } else {
                format!(
                    "/{BUCKET}?continuation-token={}&list-type=2&prefix={}",
                    encode(&token),
                    encode(prefix)
                )
            };
            let (status, body) = self.request("GET", &q, None);
            let text = String::from_utf8_lossy(&body).into_owned();
            assert_eq!(status, 200, "listing the bucket: {text}");
            for c in between_all(&text, "<Contents>", "</Contents>") {
                let key = unescape(between_all(c, "<Key>", "</Key>")[0]);
                let size = between_all(c, "<Size>", "</Size>")[0].parse().unwrap();
                out.push((key, size));
            }
            match between_all(&text, "<NextContinuationToken>", "</NextContinuationToken>").first()
            {
                Some(t) if text.contains("<IsTruncated>true</IsTruncated>") => token = unescape(t),
                _ => return out,
            }
        }
    }

    /// An object's bytes; `None` if there is none.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let (status, body) = self.request("GET", &format!("/{BUCKET}/{}", encode_path(key)), None);
        match status {
            200 => Some(body),
            404 => None,
            s => panic!("GET {key}: HTTP {s}: {}", String::from_utf8_lossy(&body)),
        }
    }

    /// Writes an object (as another tool would), without any checksum.
    pub fn put(&self, key: &str, bytes: &[u8]) {
        let f = self.dir.path().join(format!("put-{}", fastrand::u64(..)));
        std::fs::write(&f, bytes).unwrap();
        let (status, body) =
            self.request("PUT", &format!("/{BUCKET}/{}", encode_path(key)), Some(&f));
        let _ = std::fs::remove_file(&f);
        assert_eq!(status, 200, "PUT {key}: {}", String::from_utf8_lossy(&body));
    }

    /// Multipart uploads begun and not finished under `prefix`, by key.
    pub fn unfinished_uploads(&self, prefix: &str) -> Vec<String> {
        let (status, body) = self.request(
            "GET",
            &format!("/{BUCKET}?prefix={}&uploads=", encode(prefix)),
            None,
        );
        let text = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, 200, "listing multipart uploads: {text}");
        between_all(&text, "<Upload>", "</Upload>")
            .into_iter()
            .map(|u| unescape(between_all(u, "<Key>", "</Key>")[0]))
            .collect()
    }

    /// Begins a multipart upload and leaves it, as a crashed tool would; returns its ID.
    pub fn begin_upload(&self, key: &str) -> String {
        let (status, body) = self.request(
            "POST",
            &format!("/{BUCKET}/{}?uploads=", encode_path(key)),
            None,
        );
        let text = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, 200, "CreateMultipartUpload {key}: {text}");
        unescape(between_all(&text, "<UploadId>", "</UploadId>")[0])
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}

fn between_all<'a>(text: &'a str, open: &str, close: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(close) else { break };
        out.push(&after[..j]);
        rest = &after[j + close.len()..];
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Percent-encodes a key for the path, keeping its slashes.
fn encode_path(key: &str) -> String {
    key.split('/').map(encode).collect::<Vec<_>>().join("/")
}
