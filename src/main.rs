//! The `hingnetd` binary: parse the command line, hand over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    hingnetd::cli::main_with(hingnetd::cli::Cli::parse())
}
