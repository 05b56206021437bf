//! `podfleet`: the fleet CLI and the controller process.
//!
//! Parses the command line, sets up logging and the runtime, and hands the
//! verb to [`podfleet_control::cli::shell::run`]; the exit codes are
//! [`podfleet_control::cli::Exit`]'s (docs/cli.md).

use std::process::ExitCode;

use clap::Parser;
use podfleet_control::cli::args::{Cli, Command, ControllerArgs, GlobalArgs};
use podfleet_control::cli::{shell, Exit, Failure};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // --help and --version print on stdout and succeed.
            let exit = if error.use_stderr() {
                Exit::Usage
            } else {
                Exit::Success
            };
            let _ = error.print();
            return ExitCode::from(exit.code());
        }
    };
    init_logging(cli.global.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(Exit::Failed.code());
        }
    };
    let result = match cli.command {
        Command::Controller(args) => runtime
            .block_on(run_controller(&cli.global, args))
            .map(|()| Exit::Success)
            .map_err(|error| Failure::failed(format!("{error:#}"))),
        command => runtime.block_on(shell::run(&cli.global, command)),
    };
    match result {
        Ok(exit) => ExitCode::from(exit.code()),
        Err(failure) => {
            eprintln!("error: {failure}");
            ExitCode::from(failure.exit.code())
        }
    }
}

/// `-v` info, `-vv` debug, `-vvv` trace, on stderr; `RUST_LOG` wins.
fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Runs `podfleet controller` until it is stopped.
///
/// The knobs map onto `podfleet_core::fleet::controller::Config`
/// (`offline_after`, `status_interval`, `orphan_state_grace`) and
/// [`shell::bucket_plan`] (`replicas`, `max_value_size`).
async fn run_controller(global: &GlobalArgs, args: ControllerArgs) -> anyhow::Result<()> {
    // wired when run.rs lands: resolve the connection from
    // global.overrides(), then call podfleet_control::run::run_controller
    // with these knobs and shell::bucket_plan(args.replicas, args.max_value_size).
    let _ = (global.overrides(), args);
    anyhow::bail!("`podfleet controller` is not wired to run::run_controller yet")
}
