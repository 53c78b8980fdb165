//! The `token-broker` binary: parse the command line, hand over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = token_broker::cli::Cli::parse();
    token_broker::cli::run(cli)
}
