//! `meshgate`: the one CLI binary. Thin: argument parsing, exit codes and wiring.

mod admin;
mod cli;
mod console;
mod demo;
mod exit;
mod runtime;
mod state;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_tracing(cli.log_json);
    match cli.run() {
        Ok(outcome) => outcome.exit_code(),
        Err(err) => {
            err.report();
            err.exit_code()
        }
    }
}
