//! Runs the HingNet stand-in by hand, for trying `hingnetd` without the real service.
//!
//! ```text
//! cargo run --example standin -- [--api 127.0.0.1:8080] [--cdn 127.0.0.2:8081] [--token TOKEN]
//! ```
//!
//! Demo mode: every requested video id gets a generated 3 MiB MP4-like video on first sight.
//! Its first content request answers 400 "video not ready", every later one a 302 to the CDN
//! listener, which serves the file (honouring `Range: bytes=N-`). Ids containing "missing"
//! answer 404 on both the content and the status endpoint. Each finished request is printed.
//! Stop with Ctrl-C.

#[path = "../tests/support/standin.rs"]
mod standin;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use standin::StandIn;

const USAGE: &str = "usage: standin [--api 127.0.0.1:8080] [--cdn 127.0.0.2:8081] [--token TOKEN]";

struct Options {
    api: SocketAddr,
    cdn: SocketAddr,
    token: String,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        api: SocketAddr::from(([127, 0, 0, 1], 8080)),
        cdn: SocketAddr::from(([127, 0, 0, 2], 8081)),
        token: "oh-standin-demo-token".to_owned(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let addr = || {
            value
                .parse::<SocketAddr>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--api" => options.api = addr()?,
            "--cdn" => options.cdn = addr()?,
            "--token" => options.token = value,
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    Ok(options)
}

fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(options) => options,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("standin: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let server = match StandIn::start_on(options.api, options.cdn, &options.token, true) {
        Ok(server) => Arc::new(server),
        Err(e) => {
            eprintln!(
                "standin: cannot listen on {} and {}: {e}",
                options.api, options.cdn
            );
            return ExitCode::FAILURE;
        }
    };

    println!("HingNet stand-in running (demo mode)");
    println!("  base URL: {}", server.base_url());
    println!("  token:    {}", options.token);
    println!("  CDN:      http://{}", server.cdn_addr());
    println!("Any video id works; ids containing \"missing\" answer 404. Ctrl-C to stop.");

    // Print every request once it has finished, in the order they finish.
    let printer = Arc::clone(&server);
    std::thread::spawn(move || {
        let mut printed: Vec<bool> = Vec::new();
        loop {
            let log = printer.wait_for("a request to finish", Duration::MAX, |log| {
                log.iter()
                    .enumerate()
                    .any(|(i, r)| r.finished && !printed.get(i).copied().unwrap_or(false))
            });
            printed.resize(log.len(), false);
            for (i, request) in log.iter().enumerate() {
                if request.finished && !printed[i] {
                    printed[i] = true;
                    println!("{request}");
                }
            }
        }
    });

    let waited = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .and_then(|runtime| runtime.block_on(tokio::signal::ctrl_c()));
    if let Err(e) = waited {
        eprintln!("standin: cannot wait for Ctrl-C: {e}");
        return ExitCode::FAILURE;
    }
    println!("stopping");
    ExitCode::SUCCESS
}
