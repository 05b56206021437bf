//! The `podfleet-agent` process: configuration, logging, signals, and the
//! wiring of the production adapters into [`event_loop::run`].
//!
//! It lives in the library so that the shipped binary and the e2e tests'
//! copy of it run the same code; `main.rs` only calls [`main`].
//!
//! # Guarantees
//!
//! - The agent starts without NATS (the client connects in the background,
//!   then makes sure the KV buckets exist) and without podman (the runtime
//!   starts connecting in the background at once, so the first deployment
//!   does not wait for it, and is retried on use while it is down).
//! - SIGTERM and SIGINT end the loop at once and leave every container
//!   running; a restarted agent adopts them without recreating anything.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cache_store::FileCacheStore;
use crate::event_loop::{self, CacheError, LoopExit, LoopStats, TokioClock};
use crate::facts;
use crate::nats::{self, NatsError};
use crate::podman::LazyPodmanRuntime;
use crate::settings::{Args, ConfigError, LogFormat, Settings};

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state directory is unusable.
    #[error(transparent)]
    StateDir(#[from] CacheError),
    /// The NATS client could not be set up.
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// The tokio runtime or a signal handler could not be set up.
    #[error("cannot set up the process: {0}")]
    Process(#[from] std::io::Error),
}

/// Runs the agent as `podfleet-agent` does: parses the command line and
/// environment, and returns the process's exit code (0 after a signal,
/// 2 for a refused configuration, 1 for other start-up failures).
pub fn main() -> ExitCode {
    let args = Args::parse();
    let settings = match Settings::load(&args) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("podfleet-agent: {error}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("{settings}");
        return ExitCode::SUCCESS;
    }
    init_logging(&settings);
    match run(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "podfleet-agent stopped");
            eprintln!("podfleet-agent: {error}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(settings: &Settings) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match settings.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs the agent with `settings` on a single-threaded tokio runtime until
/// SIGTERM or SIGINT.
///
/// # Errors
/// [`AgentError`] when something needed at start is unusable.
pub fn run(settings: Settings) -> Result<(), AgentError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(settings))
}

async fn serve(settings: Settings) -> Result<(), AgentError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "stopping; containers keep running");
    };

    let store = FileCacheStore::open(&settings.state_dir)?;
    let runtime = LazyPodmanRuntime::new(&settings.podman_socket, settings.podman_request_timeout)
        .with_registry_auth(settings.registry_auth.clone());
    runtime.connect_in_background();
    let (source, publisher) = nats::connect(settings.nats.clone()).await?;
    let config = settings
        .reconciler_config(env!("CARGO_PKG_VERSION"))
        .device_facts(facts::gather());
    tracing::info!(
        device = %settings.device,
        version = env!("CARGO_PKG_VERSION"),
        arch = %config.facts().arch,
        os = %config.facts().os,
        kernel = %config.facts().kernel,
        nats = %settings.nats.urls.join(","),
        podman_socket = %settings.podman_socket.display(),
        state_dir = %settings.state_dir.display(),
        "podfleet-agent starting"
    );
    let mut stats = LoopStats::default();
    let exit = event_loop::run(
        config,
        settings.loop_options.clone(),
        source,
        publisher,
        runtime,
        TokioClock::start(),
        store,
        shutdown,
        &mut stats,
    )
    .await;
    let LoopStats {
        runtime_ops,
        published,
        publish_failures,
        commands,
        cache_failures,
        ..
    } = stats;
    match exit {
        LoopExit::Shutdown => tracing::info!(
            runtime_ops,
            published,
            publish_failures,
            commands,
            cache_failures,
            "stopped"
        ),
        LoopExit::SourceClosed => tracing::warn!(
            runtime_ops,
            published,
            publish_failures,
            commands,
            cache_failures,
            "the NATS adapter stopped"
        ),
    }
    Ok(())
}
