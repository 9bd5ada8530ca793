//! TLS trusts the system's store, so an operator's own CA works through `SSL_CERT_FILE`, and an
//! unknown issuer is refused. The CA and server certificate are made here with the `openssl`
//! command; the HTTPS server is Python's, on loopback.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use support::harness::{Env, Settings};

const TOKEN: &str = "oh-tls-canary-91c2";

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command is needed (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a certificate for 127.0.0.1 signed by it.
fn make_certs(dir: &std::path::Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=hingnetd test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "1",
            "-extfile",
            "ext",
        ],
    );
}

const SERVER: &str = r#"
import http.server, ssl, sys
BODY = b"\0\0\0\x0cftypisom" + (8 + 256 * 40).to_bytes(4, "big") + b"mdat" + bytes(range(256)) * 40
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *a):
        pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_operators_ca_is_trusted_through_ssl_cert_file_and_unknown_issuers_are_not() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let mut child = Command::new("python3")
        .args(["-c", SERVER])
        .arg(certs.path().join("srv.pem"))
        .arg(certs.path().join("srv.key"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let _server = Server(child);
    let base = format!("https://127.0.0.1:{}", port.trim());

    // Without the CA: refused, and the row says why.
    let env = Env::new(Settings::new(&base), TOKEN);
    let _d = env.start();
    env.insert_sqlite3(&["video_tls"]);
    let row = env.wait_row("video_tls", "an unknown-issuer error", |r| {
        r.last_error
            .as_deref()
            .is_some_and(|e| e.contains("UnknownIssuer"))
    });
    assert_eq!(row.state, "pending");

    // With the operator's CA: downloaded.
    let env = Env::new(Settings::new(&base), TOKEN);
    let ca = certs.path().join("ca.pem");
    let _d = env.start_with_env("daemon.log", &[("SSL_CERT_FILE", ca.to_str().unwrap())]);
    env.insert_sqlite3(&["video_tls"]);
    let row = env.wait_state("video_tls", "done");
    assert_eq!(row.bytes, Some(12 + 8 + 256 * 40));
}
