//! TLS for tests: a throwaway CA and a certificate for 127.0.0.1 made with the `openssl`
//! command, and Python's HTTPS server on loopback running a handler the test supplies.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

fn openssl(dir: &Path, args: &[&str]) {
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
pub fn make_certs(dir: &Path) {
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

/// An HTTPS server on 127.0.0.1 with the certificate from `make_certs`, killed when dropped.
pub struct HttpsServer {
    child: Child,
    pub port: u16,
}

impl HttpsServer {
    /// Runs `handler`, Python source defining `class H(http.server.BaseHTTPRequestHandler)`;
    /// `args` reach it as `sys.argv[3:]`.
    pub fn start(certs: &Path, handler: &str, args: &[&str]) -> HttpsServer {
        let script = format!(
            "import http.server, ssl, sys\n{handler}\n\
             s = http.server.HTTPServer((\"127.0.0.1\", 0), H)\n\
             ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
             ctx.load_cert_chain(sys.argv[1], sys.argv[2])\n\
             s.socket = ctx.wrap_socket(s.socket, server_side=True)\n\
             print(s.server_address[1], flush=True)\n\
             s.serve_forever()\n"
        );
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(certs.join("srv.pem"))
            .arg(certs.join("srv.key"))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 is needed");
        let mut port = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut port)
            .unwrap();
        let port = port.trim().parse().expect("the server's port");
        HttpsServer { child, port }
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
