//! The `podfleet` entry point: parses the command line, sets up logging and
//! the runtime, and hands the verb to [`shell::run`] (or runs the
//! controller); the exit codes are [`Exit`]'s (docs/cli.md). The `podfleet`
//! binary is this function, and so is the e2e crate's copy of it.

use std::process::ExitCode;

use crate::cli::args::{Cli, Command, ControllerArgs, GlobalArgs};
use crate::cli::{shell, Exit, Failure};
use crate::client::BucketPlan;
use crate::context;
use crate::run::run_controller as run;
use clap::Parser;

/// Runs `podfleet` with the process's arguments; returns its exit code.
pub fn main() -> ExitCode {
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Runs `podfleet controller` until SIGINT or SIGTERM.
///
/// The knobs map onto `podfleet_core::fleet::controller::Config`
/// (`offline_after`, `status_interval`, `orphan_state_grace`) and
/// [`BucketPlan::sized`] (`replicas`, `max_value_size`), through
/// [`ControllerArgs::options`] and [`ControllerArgs::plan`], which the
/// operator shares.
async fn run_controller(global: &GlobalArgs, args: ControllerArgs) -> anyhow::Result<()> {
    let connection = context::resolve(&global.overrides())?;
    let plan = args.plan(BucketPlan::default());
    let options = args.options(global);
    run(connection, plan, options, shutdown()).await
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
