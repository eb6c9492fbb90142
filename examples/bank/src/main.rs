//! `bank`: the event-sourcing example's command line. See `bank --help`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::process::ExitCode;

use bank::cli::{default_log_filter, run, Cli};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_log_filter(&cli.command).into());
    for directive in converge::nats::SECRET_SAFE_LOG_DIRECTIVES {
        filter = filter.add_directive(directive.parse().expect("a valid directive"));
    }
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
