//! Thin entry point: parse arguments, load configuration, install telemetry, hand over to the
//! library. Exit status: 0 on success, 1 on failure, 2 on bad usage or configuration.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match backfilld::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return backfilld::cli::usage_error(e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("backfilld: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(backfilld::cli::main(cli))
}
