//! `identity-sync`: `demo`, `serve` and `next-runs` (see `--help`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::process::ExitCode;

use clap::Parser;
use identity_sync::commands::{run, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "warn,converge_handlers::run=error".into());
    // Even at RUST_LOG=trace, no NATS password or token in the log.
    for directive in converge::nats::SECRET_SAFE_LOG_DIRECTIVES {
        filter = filter.add_directive(directive.parse().expect("a valid directive"));
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            let mut message = format!("identity-sync: {error}");
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}
