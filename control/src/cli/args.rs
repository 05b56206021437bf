//! The `podfleet` command line, and its exit codes.
//!
//! Flags that say where to connect are global: they may stand before or
//! after the verb, and each has an environment variable. The connect and
//! request timeout is `--request-timeout` (kubectl's name), not `--timeout`,
//! because `rollout status --timeout` and `exec --timeout` mean how long to
//! wait for the rollout or the program.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use podfleet_core::wire::command::DEFAULT_TAIL_LINES;
use podfleet_core::wire::{DeploymentName, DeviceId};

use crate::client::BucketPlan;
use crate::context::Overrides;
use crate::run::ControllerOptions;

/// The exit codes, as `--help` prints them.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0   success
  1   failure: invalid manifest or label, not found, refused by the server,
      a device failed the rollout, a device command failed
  2   timed out: `rollout status --timeout` ran out (or `exec`'s program did)
  3   unreachable: no connection could be resolved or made
  64  usage: unknown verb, flag or malformed argument
`exec` exits with the remote program's exit code once the program has run.

Documentation: docs/cli.md";

/// How `podfleet` exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: it did what was asked.
    Success,
    /// 1: it could not, or what it watched failed.
    Failed,
    /// 2: what it waited for did not happen in time.
    TimedOut,
    /// 3: the server could not be reached, or no connection resolved.
    Unreachable,
    /// 64 (`EX_USAGE`): the command line is wrong.
    Usage,
    /// `exec`: the remote program's exit code.
    Program(u8),
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failed => 1,
            Exit::TimedOut => 2,
            Exit::Unreachable => 3,
            Exit::Usage => 64,
            Exit::Program(code) => code,
        }
    }
}

/// `podfleet`: the fleet CLI.
#[derive(Debug, Parser)]
#[command(
    name = "podfleet",
    version,
    about = "Manage a podfleet fleet: fleet deployments, devices, rollouts, device commands",
    after_help = EXIT_CODES_HELP
)]
pub struct Cli {
    /// Where to connect, and logging.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// The verb.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every verb takes.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// The config file with the contexts [default: ~/.config/podfleet/config.toml]
    #[arg(long, env = "PODFLEET_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The context to use [default: the file's current-context]
    #[arg(long, env = "PODFLEET_CONTEXT", global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// NATS server URL(s), comma-separated; overrides the context's
    #[arg(long, env = "PODFLEET_SERVER", global = true, value_name = "URL")]
    pub server: Option<String>,
    /// User name; overrides the context's credentials
    #[arg(long, env = "PODFLEET_USER", global = true)]
    pub user: Option<String>,
    /// Password, with --user
    #[arg(long, env = "PODFLEET_PASSWORD", global = true, hide_env_values = true)]
    pub password: Option<String>,
    /// A NATS .creds file; overrides the context's credentials
    #[arg(long, env = "PODFLEET_CREDS", global = true, value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// How long to wait to connect, and for each request (5s, 500ms, 1m)
    #[arg(
        long,
        env = "PODFLEET_REQUEST_TIMEOUT",
        global = true,
        default_value = "5s",
        value_parser = parse_duration,
        value_name = "DURATION"
    )]
    pub request_timeout: Duration,
    /// A device whose last heartbeat is older than this is offline: for the controller, and for what `get`, `describe` and `apply --dry-run` show
    #[arg(
        long,
        env = "PODFLEET_OFFLINE_AFTER",
        global = true,
        default_value = "60s",
        value_parser = parse_duration,
        value_name = "DURATION"
    )]
    pub offline_after: Duration,
    /// Log to stderr: -v info, -vv debug, -vvv trace (RUST_LOG wins)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

impl GlobalArgs {
    /// The fleet controller's `Config` as far as the global flags set it
    /// (`offline_after`): the controller's, and the snapshot's of every
    /// read, so both call the same devices offline.
    pub fn controller_config(&self) -> podfleet_core::fleet::controller::Config {
        podfleet_core::fleet::controller::Config {
            offline_after: self.offline_after,
            ..podfleet_core::fleet::controller::Config::default()
        }
    }

    /// The connection overrides for [`crate::context::resolve`].
    pub fn overrides(&self) -> Overrides {
        Overrides {
            config: self.config.clone(),
            context: self.context.clone(),
            server: self.server.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            creds: self.creds.clone(),
        }
    }
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or update fleet deployments from a file
    Apply(ApplyArgs),
    /// Delete a fleet deployment
    Delete(DeleteArgs),
    /// List devices or fleet deployments
    Get(GetArgs),
    /// Show one device or fleet deployment in detail
    Describe(DescribeArgs),
    /// Set or remove a device's labels
    Label(LabelArgs),
    /// Follow a fleet deployment's rollout
    Rollout(RolloutArgs),
    /// Check that a device's agent answers
    Ping(PingArgs),
    /// Print a service container's recent logs
    Logs(LogsArgs),
    /// Run a program in a service container
    Exec(ExecArgs),
    /// Run the fleet controller (long-running)
    Controller(ControllerArgs),
}

/// `apply -f FILE [--dry-run] [--keep-tags] [--registry-auth-file FILE]
/// [--insecure-registry HOST[:PORT]]...`.
#[derive(Debug, Clone, Args)]
pub struct ApplyArgs {
    /// A YAML or JSON file of one or more FleetDeployment manifests; `-` reads stdin
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,
    /// Show which devices would change and the pinned images; write nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Write image tags as given instead of pinning them to digests: each device then pulls whatever the tag names when its pull policy says to
    #[arg(long)]
    pub keep_tags: bool,
    /// The registry logins (containers-auth.json) [default: $REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json, ~/.config/containers/auth.json, ~/.docker/config.json]
    #[arg(long, value_name = "FILE")]
    pub registry_auth_file: Option<PathBuf>,
    /// A registry to ask over plain HTTP, as image references name it (repeatable)
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]", value_parser = parse_registry_host)]
    pub insecure_registries: Vec<String>,
}

/// A registry as image references name it: `host` or `host:port`.
///
/// # Errors
/// A message with the accepted form.
pub fn parse_registry_host(text: &str) -> Result<String, String> {
    let host = text.trim();
    let valid = !host.is_empty()
        && !host.contains('/')
        && !host.chars().any(char::is_whitespace)
        && host
            .rsplit_once(':')
            .is_none_or(|(name, port)| !name.is_empty() && port.parse::<u16>().is_ok());
    if valid {
        Ok(host.to_owned())
    } else {
        Err(format!(
            "{text:?} is not a registry: use host or host:port, as image references name it \
             (registry.example.com, 127.0.0.1:5000), without a scheme or a path"
        ))
    }
}

/// The kinds `delete` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeletableKind {
    /// A fleet deployment.
    #[value(alias = "deployments", alias = "fleetdeployment", alias = "fd")]
    Deployment,
}

/// `delete deployment NAME`.
#[derive(Debug, Clone, Args)]
pub struct DeleteArgs {
    /// What to delete
    pub kind: DeletableKind,
    /// Its name
    pub name: DeploymentName,
    /// Exit 0 when it does not exist
    #[arg(long)]
    pub ignore_not_found: bool,
}

/// The kinds `get` and `describe` take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// Devices.
    #[value(alias = "device", alias = "dev")]
    Devices,
    /// Fleet deployments.
    #[value(alias = "deployment", alias = "fleetdeployments", alias = "fd")]
    Deployments,
}

/// How `get` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// More columns.
    Wide,
    /// A `List` object, as JSON.
    Json,
    /// A `List` object, as YAML.
    Yaml,
    /// `kind/name`, one a line.
    Name,
}

/// `get devices|deployments`.
#[derive(Debug, Clone, Args)]
pub struct GetArgs {
    /// devices or deployments
    pub kind: Kind,
    /// Only devices whose labels match (site=lyon,!canary); devices only
    #[arg(short = 'l', long = "selector", value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// wide, json, yaml or name [default: a table]
    #[arg(short, long, value_name = "FORMAT")]
    pub output: Option<OutputFormat>,
    /// After the table, print rows again as they change (polls every second)
    #[arg(short, long)]
    pub watch: bool,
}

/// The kinds `describe` takes, one object each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DescribeKind {
    /// A device.
    #[value(alias = "devices", alias = "dev")]
    Device,
    /// A fleet deployment.
    #[value(alias = "deployments", alias = "fleetdeployment", alias = "fd")]
    Deployment,
}

/// `describe device ID` / `describe deployment NAME`.
#[derive(Debug, Clone, Args)]
pub struct DescribeArgs {
    /// device or deployment
    pub kind: DescribeKind,
    /// Its id or name
    pub name: String,
}

/// The kinds `label` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LabelKind {
    /// A device.
    #[value(alias = "devices", alias = "dev")]
    Device,
}

/// `label device ID key=value key- [--overwrite]`.
#[derive(Debug, Clone, Args)]
pub struct LabelArgs {
    /// device
    pub kind: LabelKind,
    /// The device's id
    pub device: DeviceId,
    /// key=value sets a label, key- removes one
    #[arg(required = true, value_name = "LABEL")]
    pub labels: Vec<String>,
    /// Allow changing a label that already has another value
    #[arg(long)]
    pub overwrite: bool,
}

/// `rollout status NAME`, `rollout force NAME`, `rollout restart NAME`.
#[derive(Debug, Clone, Args)]
pub struct RolloutArgs {
    /// What to do with the rollout.
    #[command(subcommand)]
    pub action: RolloutAction,
}

/// The `rollout` sub-verbs.
#[derive(Debug, Clone, Subcommand)]
pub enum RolloutAction {
    /// Wait until every targeted device runs the current generation
    Status {
        /// The fleet deployment
        name: DeploymentName,
        /// How long to wait before exiting with 2 (30s, 5m, 1h)
        #[arg(long, default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
        timeout: Duration,
    },
    /// Write an all-or-nothing deployment's current spec to every targeted device, whatever they run
    Force {
        /// The fleet deployment
        name: DeploymentName,
    },
    /// Recreate every service container (run a per_run deployment again), as the strategy rolls out
    Restart {
        /// The fleet deployment
        name: DeploymentName,
    },
}

/// `ping DEVICE`.
#[derive(Debug, Clone, Args)]
pub struct PingArgs {
    /// The device's id
    pub device: DeviceId,
}

/// `logs DEVICE DEPLOYMENT SERVICE [--tail N]`.
#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    /// The device's id
    pub device: DeviceId,
    /// The deployment
    pub deployment: DeploymentName,
    /// The service
    pub service: String,
    /// How many lines from the end
    #[arg(long, default_value_t = DEFAULT_TAIL_LINES, value_name = "N")]
    pub tail: u32,
}

/// `exec DEVICE DEPLOYMENT SERVICE -- CMD...`.
#[derive(Debug, Clone, Args)]
pub struct ExecArgs {
    /// The device's id
    pub device: DeviceId,
    /// The deployment
    pub deployment: DeploymentName,
    /// The service
    pub service: String,
    /// How long the program may run on the device
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// The program and its arguments (no shell), after `--`
    #[arg(last = true, required = true, value_name = "CMD")]
    pub argv: Vec<String>,
}

/// `controller`: the long-running fleet controller's knobs.
#[derive(Debug, Clone, Args)]
pub struct ControllerArgs {
    /// The shortest time between two status writes of one deployment
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub status_interval: Duration,
    /// How long a report may outlive its desired key before it is deleted
    #[arg(long, default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    pub orphan_state_grace: Duration,
    /// Replicas of the buckets the controller creates (existing ones are left as they are)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5), value_name = "N")]
    pub replicas: u8,
    /// Largest value, in bytes, of the buckets it creates [default: the agent's bucket default]
    #[arg(long, value_name = "BYTES")]
    pub max_value_size: Option<u32>,
}

impl ControllerArgs {
    /// The passes' options: the core's `Config` from `status_interval`,
    /// `orphan_state_grace` and the global `offline_after`, connecting
    /// within the global `request_timeout`.
    pub fn options(&self, global: &GlobalArgs) -> ControllerOptions {
        let mut config = global.controller_config();
        config.status_interval = self.status_interval;
        config.orphan_state_grace = self.orphan_state_grace;
        ControllerOptions {
            config,
            connect_timeout: global.request_timeout,
            ..ControllerOptions::default()
        }
    }

    /// `plan` with `replicas` and, when given, `max_value_size`.
    pub fn plan(&self, plan: BucketPlan) -> BucketPlan {
        plan.sized(self.replicas, self.max_value_size)
    }
}

/// Parses `500ms`, `30s`, `5m`, `2h`, `1d`, or a bare number of seconds.
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let wrong = || format!("{text:?} is not a duration: use e.g. 500ms, 30s, 5m, 2h or 1d");
    let n: u64 = number.parse().map_err(|_| wrong())?;
    let seconds = |factor: u64| n.checked_mul(factor).map(Duration::from_secs);
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => seconds(1),
        "m" => seconds(60),
        "h" => seconds(3600),
        "d" => seconds(86_400),
        _ => None,
    }
    .ok_or_else(wrong)
}

/// A duration as the flags take it: `90s`, `5m`, `2h`, `500ms`.
pub fn format_duration(duration: Duration) -> String {
    let s = duration.as_secs();
    match (duration.subsec_millis(), s) {
        (0, 0) => "0s".to_owned(),
        (0, s) if s % 3600 == 0 => format!("{}h", s / 3600),
        (0, s) if s % 60 == 0 => format!("{}m", s / 60),
        (0, s) => format!("{s}s"),
        _ => format!("{}ms", duration.as_millis()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::Path;

    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("podfleet").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_read_like_kubectl_flags() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("m").is_err());
        for text in ["500ms", "90s", "5m", "2h", "0s"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }

    #[test]
    fn global_flags_go_before_or_after_the_verb() {
        let cli = parse(&["get", "devices", "--server", "nats://a:4222", "-vv"]).unwrap();
        assert_eq!(cli.global.server.as_deref(), Some("nats://a:4222"));
        assert_eq!(cli.global.verbose, 2);
        let cli = parse(&["--request-timeout", "2s", "get", "fd", "-o", "wide"]).unwrap();
        assert_eq!(cli.global.request_timeout, Duration::from_secs(2));
        assert!(matches!(
            cli.command,
            Command::Get(GetArgs {
                kind: Kind::Deployments,
                output: Some(OutputFormat::Wide),
                ..
            })
        ));
    }

    #[test]
    fn offline_after_is_one_flag_for_the_controller_and_the_reads() {
        let cli = parse(&["get", "devices", "--offline-after", "8s"]).unwrap();
        assert_eq!(
            cli.global.controller_config().offline_after,
            Duration::from_secs(8)
        );
        let cli = parse(&["controller", "--offline-after", "2m"]).unwrap();
        assert_eq!(cli.global.offline_after, Duration::from_secs(120));
        let Command::Controller(args) = &cli.command else {
            panic!("not controller");
        };
        assert_eq!(
            args.options(&cli.global).config.offline_after,
            Duration::from_secs(120)
        );
        let cli = parse(&["describe", "device", "rpi-01"]).unwrap();
        assert_eq!(cli.global.offline_after, Duration::from_secs(60));
    }

    #[test]
    fn rollout_and_exec_have_their_own_timeouts() {
        let cli = parse(&["rollout", "status", "web", "--timeout", "90s"]).unwrap();
        let Command::Rollout(RolloutArgs {
            action: RolloutAction::Status { name, timeout },
        }) = cli.command
        else {
            panic!("not rollout status");
        };
        assert_eq!((name.as_str(), timeout), ("web", Duration::from_secs(90)));
        let cli = parse(&["rollout", "force", "web"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Rollout(RolloutArgs {
                action: RolloutAction::Force { name },
            }) if name.as_str() == "web"
        ));
        assert!(parse(&["rollout", "force", "Web_1"]).is_err());
        assert!(matches!(
            parse(&["rollout", "restart", "web"]).unwrap().command,
            Command::Rollout(RolloutArgs {
                action: RolloutAction::Restart { name },
            }) if name.as_str() == "web"
        ));
        assert_eq!(cli.global.request_timeout, Duration::from_secs(5));

        let cli = parse(&["exec", "rpi-01", "web", "app", "--", "ls", "-l", "/"]).unwrap();
        let Command::Exec(exec) = cli.command else {
            panic!("not exec");
        };
        assert_eq!(exec.argv, ["ls", "-l", "/"]);
        assert_eq!(exec.timeout, Duration::from_secs(10));
    }

    #[test]
    fn apply_takes_registry_flags() {
        let cli = parse(&[
            "apply",
            "-f",
            "web.yaml",
            "--insecure-registry",
            "127.0.0.1:5000",
            "--insecure-registry",
            "registry.lan",
            "--registry-auth-file",
            "/etc/podfleet/auth.json",
        ])
        .unwrap();
        let Command::Apply(apply) = cli.command else {
            panic!("not apply");
        };
        assert_eq!(
            apply.insecure_registries,
            ["127.0.0.1:5000", "registry.lan"]
        );
        assert_eq!(
            apply.registry_auth_file.as_deref(),
            Some(Path::new("/etc/podfleet/auth.json"))
        );
        assert!(!apply.keep_tags);
        for bad in [
            "http://127.0.0.1:5000",
            "host:port",
            "host/path",
            ":5000",
            "",
        ] {
            assert!(
                parse(&["apply", "-f", "x", "--insecure-registry", bad]).is_err(),
                "{bad:?}"
            );
        }
        assert!(parse(&["apply", "-f", "x", "--keep-tags"]).is_ok());
    }

    #[test]
    fn malformed_names_are_usage_errors() {
        let error = parse(&["ping", "Not_A_Device"]).unwrap_err();
        assert!(error.use_stderr());
        assert!(parse(&["exec", "rpi-01", "web", "app"]).is_err(), "no argv");
        assert!(parse(&["label", "device", "rpi-01"]).is_err(), "no label");
        assert!(parse(&["get", "pods"]).is_err());
    }

    #[test]
    fn exit_codes_are_distinct_and_documented() {
        let codes = [
            Exit::Success,
            Exit::Failed,
            Exit::TimedOut,
            Exit::Unreachable,
            Exit::Usage,
        ];
        for (i, exit) in codes.iter().enumerate() {
            assert!(
                EXIT_CODES_HELP.contains(&format!("  {}  ", exit.code()))
                    || EXIT_CODES_HELP.contains(&format!("  {}   ", exit.code())),
                "{exit:?} is not in the help"
            );
            assert!(codes[..i].iter().all(|e| e.code() != exit.code()));
        }
        assert_eq!(Exit::Program(7).code(), 7);
    }
}
