//! The `hingnetd` binary: parse the command line, set up logging, hand over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = hingnetd::cli::Cli::parse();
    hingnetd::cli::init_logging();
    hingnetd::cli::main_with(cli)
}
