//! The `podfleet-operator` command line: `podfleet-operator` runs the
//! operator (see `--help`); `podfleet-operator crds` prints the
//! CustomResourceDefinitions. The `podfleet-operator` binary is [`main`],
//! and so is the e2e crate's copy of it.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use crate::{run, LeaseOptions, Options};
use clap::{Args, Parser, Subcommand};
use podfleet_control::cli::args::{
    parse_duration, parse_registry_host, ControllerArgs, GlobalArgs,
};
use podfleet_control::context;
use tracing_subscriber::EnvFilter;

/// The podfleet operator: FleetDeployment and Device custom resources,
/// converged by the fleet controller over NATS.
#[derive(Debug, Parser)]
#[command(name = "podfleet-operator", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    operator: OperatorArgs,
    #[command(flatten)]
    controller: ControllerArgs,
    #[command(flatten)]
    nats: GlobalArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (YAML) and exit
    Crds,
}

/// The operator's own knobs.
#[derive(Debug, Args)]
struct OperatorArgs {
    /// The namespace whose FleetDeployments it manages (one namespace is one fleet), and of its Lease
    #[arg(
        long,
        env = "POD_NAMESPACE",
        default_value = "podfleet",
        value_name = "NAMESPACE"
    )]
    namespace: String,
    /// Create a Device for every device that heartbeats without one (Devices are never deleted automatically)
    #[arg(long, env = "PODFLEET_CREATE_DEVICES")]
    create_devices: bool,
    /// How often Device statuses are worked out and written when changed
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    device_status_every: Duration,
    /// A Device's lastSeen is rounded down to this, so heartbeats do not rewrite it each time
    #[arg(long, default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    last_seen_every: Duration,
    /// Elect a leader through a Lease, so that several replicas never both write
    #[arg(long, env = "PODFLEET_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    leader_election: bool,
    /// The Lease's name
    #[arg(long, default_value = "podfleet-operator", value_name = "NAME")]
    lease_name: String,
    /// The claim written to the Lease
    #[arg(long, default_value = "15s", value_parser = parse_duration, value_name = "DURATION")]
    lease_duration: Duration,
    /// How long the leader leads after its last successful renewal (below --lease-duration)
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    renew_deadline: Duration,
    /// How often the Lease is read and renewed
    #[arg(long, default_value = "2s", value_parser = parse_duration, value_name = "DURATION")]
    lease_retry: Duration,
    /// This replica's identity in the Lease and in events [default: $POD_NAME, else host-pid]
    #[arg(long, env = "POD_NAME", value_name = "NAME")]
    identity: Option<String>,
    /// Serve /metrics, /healthz and /readyz here; "off" for none
    #[arg(
        long,
        env = "PODFLEET_METRICS_ADDR",
        default_value = "0.0.0.0:8080",
        value_name = "ADDR"
    )]
    metrics_addr: String,
    /// Publish no events
    #[arg(long)]
    no_events: bool,
    /// The Secret (in --namespace, of type kubernetes.io/dockerconfigjson) whose logins image tags are resolved to digests with; without it registries are asked anonymously
    #[arg(long, env = "PODFLEET_REGISTRY_AUTH_SECRET", value_name = "NAME")]
    registry_auth_secret: Option<String>,
    /// A registry to ask over plain HTTP, as image references name it (repeatable)
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]", value_parser = parse_registry_host)]
    insecure_registries: Vec<String>,
}

/// Runs `podfleet-operator` with the process's arguments; returns its exit
/// code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Crds) = cli.command {
        print!("{}", crate::crd::crds_yaml());
        return ExitCode::SUCCESS;
    }
    let filter = match cli.nats.verbose {
        0 => "info",
        1 => "info,podfleet_operator=debug",
        2 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("podfleet-operator: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(operate(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("podfleet-operator: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn operate(cli: Cli) -> anyhow::Result<()> {
    let args = cli.operator;
    if args.leader_election && args.renew_deadline >= args.lease_duration {
        anyhow::bail!(
            "--renew-deadline ({:?}) must be shorter than --lease-duration ({:?})",
            args.renew_deadline,
            args.lease_duration
        );
    }
    let metrics_addr = match args.metrics_addr.as_str() {
        "off" | "" => None,
        addr => Some(addr.parse::<SocketAddr>().map_err(|e| {
            anyhow::anyhow!("--metrics-addr {addr:?}: {e} (expected host:port, or off)")
        })?),
    };
    let connection = context::resolve(&cli.nats.overrides())?;
    let client = kube::Client::try_default().await.map_err(|e| {
        anyhow::anyhow!("cannot make a Kubernetes client (in-cluster or KUBECONFIG): {e}")
    })?;
    let mut options = Options::new(&args.namespace);
    options.engine.create_devices = args.create_devices;
    options.engine.device_status_every = args.device_status_every;
    options.engine.last_seen_every = args.last_seen_every;
    options.controller = cli.controller.options(&cli.nats);
    options.plan = cli.controller.plan(options.plan);
    options.metrics_addr = metrics_addr;
    options.events = !args.no_events;
    options.registry.auth_secret = args.registry_auth_secret.filter(|name| !name.is_empty());
    options.registry.insecure = args.insecure_registries;
    options.registry.request_timeout = cli.nats.request_timeout;
    if let Some(identity) = args.identity {
        options.identity = identity;
    }
    options.lease = args.leader_election.then_some(LeaseOptions {
        name: args.lease_name,
        duration: args.lease_duration,
        renew_deadline: args.renew_deadline,
        retry: args.lease_retry,
    });
    tracing::info!(namespace = %args.namespace, nats = %connection.url_list(), "podfleet-operator starting");
    run(
        client,
        connection,
        options,
        podfleet_control::cli::entry::shutdown(),
    )
    .await
}
