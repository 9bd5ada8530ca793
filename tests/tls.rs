//! TLS trusts the system's store, so an operator's own CA works through `SSL_CERT_FILE`, and an
//! unknown issuer is refused. The CA and server certificate are made with the `openssl` command
//! (`support::tls`); the HTTPS server is Python's, on loopback.

mod support;

use support::harness::{Env, Settings};
use support::tls::{HttpsServer, make_certs};

const TOKEN: &str = "oh-tls-canary-91c2";

/// Serves one small MP4 (ftyp, moov, mdat) to every request.
const HANDLER: &str = r#"
BODY = b"\0\0\0\x0cftypisom\0\0\0\x08moov" + (8 + 256 * 40).to_bytes(4, "big") + b"mdat" + bytes(range(256)) * 40
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *a):
        pass
"#;

#[test]
fn an_operators_ca_is_trusted_through_ssl_cert_file_and_unknown_issuers_are_not() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let server = HttpsServer::start(certs.path(), HANDLER, &[]);
    let base = format!("https://127.0.0.1:{}", server.port);

    // Without the CA: refused, and the row says why.
    let env = Env::new(Settings::new(&base), TOKEN);
    let _d = env.start();
    env.insert(&["video_tls"]);
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
    env.insert(&["video_tls"]);
    let row = env.wait_state("video_tls", "done");
    assert_eq!(row.bytes, Some(12 + 8 + 8 + 256 * 40));
}
