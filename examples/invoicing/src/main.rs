//! `invoicing`: the converge example's command line. See `invoicing --help`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::process::ExitCode;

use clap::Parser;
use invoicing::cli::{default_log_filter, run, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_log_filter(&cli.command).into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
