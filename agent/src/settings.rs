//! The agent's configuration: a TOML file, environment variables and
//! command-line flags, merged and validated once at start.
//!
//! Precedence, highest first: a flag, its environment variable, the key in
//! the TOML file (`--config`), the default. Every knob has all three forms,
//! e.g. `--tick-interval`, `PODFLEET_TICK_INTERVAL` and `tick_interval`.
//! Validation names the knob, the bad value and the rule it breaks; it
//! never lets the agent start half-configured. This module reads the config
//! file and the credential files it names, nothing else.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use podfleet_core::reconciler::{ImageGcPolicy, DEFAULT_RUN_RETENTION, DEFAULT_SETUP_TIMEOUT};
use podfleet_core::time::Backoff;
use podfleet_core::wire::DeviceId;
use podfleet_core::Config;
use serde::Deserialize;

use crate::event_loop::LoopOptions;
use crate::nats::{default_inbox_prefix, Credentials, NatsSettings};
use crate::podman::{LoginSource, RegistryAuth, RegistryLogin};

/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/podfleet";

/// The reconciler's defaults, as [`Config::new`] has them (a unit test
/// keeps the two equal).
const DEFAULT_TICK_INTERVAL: Duration = Duration::from_secs(30);
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);
const DEFAULT_RETRY_BACKOFF: Backoff =
    Backoff::new(Duration::from_secs(10), Duration::from_secs(300));
const DEFAULT_RESTART_BACKOFF: Backoff =
    Backoff::new(Duration::from_secs(10), Duration::from_secs(300));
const DEFAULT_RESTART_RESET_AFTER: Duration = Duration::from_secs(600);
const DEFAULT_RUNTIME_BACKOFF: Backoff =
    Backoff::new(Duration::from_secs(1), Duration::from_secs(30));

/// `podfleet-agent`: converges this device's podman to the desired state
/// in NATS JetStream KV and reports back.
///
/// Every option can also be set by its environment variable or by its key
/// (the option's long name with `_` for `-`) in the TOML file given by
/// `--config`. Precedence: flag, environment, file, default. Durations take
/// a unit: `500ms`, `30s`, `5m`, `1h`. Logging follows RUST_LOG when set.
#[derive(Debug, Clone, Default, Parser)]
#[command(name = "podfleet-agent", version, about, long_about)]
pub struct Args {
    /// A TOML configuration file.
    #[arg(long, env = "PODFLEET_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Validate the configuration, print it (secrets masked) and exit.
    #[arg(long)]
    pub check_config: bool,

    /// This device's id (required): 1-63 characters of a-z, 0-9 and '-'.
    #[arg(long, env = "PODFLEET_DEVICE_ID", value_name = "ID")]
    pub device_id: Option<String>,

    /// NATS server URLs, comma-separated [default: nats://127.0.0.1:4222].
    #[arg(
        long,
        env = "PODFLEET_NATS_URLS",
        value_name = "URLS",
        value_delimiter = ','
    )]
    pub nats_urls: Option<Vec<String>>,

    /// NATS user name (with --nats-password).
    #[arg(long, env = "PODFLEET_NATS_USER", value_name = "USER")]
    pub nats_user: Option<String>,

    /// NATS password (with --nats-user).
    #[arg(
        long,
        env = "PODFLEET_NATS_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    pub nats_password: Option<String>,

    /// NATS token.
    #[arg(
        long,
        env = "PODFLEET_NATS_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub nats_token: Option<String>,

    /// A file holding this device's NKey seed (SU...).
    #[arg(long, env = "PODFLEET_NATS_NKEY_SEED_FILE", value_name = "FILE")]
    pub nats_nkey_seed_file: Option<PathBuf>,

    /// A NATS .creds file (JWT and seed).
    #[arg(long, env = "PODFLEET_NATS_CREDS_FILE", value_name = "FILE")]
    pub nats_creds_file: Option<PathBuf>,

    /// Prefix of this client's reply inboxes; the server's permissions
    /// should allow the device to subscribe to `<prefix>.>` only
    /// (default: `_INBOX.<device id>`).
    #[arg(long, env = "PODFLEET_NATS_INBOX_PREFIX", value_name = "PREFIX")]
    pub nats_inbox_prefix: Option<String>,

    /// How long a report may wait for JetStream's acknowledgement [default: 5s].
    #[arg(long, env = "PODFLEET_NATS_REQUEST_TIMEOUT", value_name = "DURATION")]
    pub nats_request_timeout: Option<String>,

    /// First wait before the desired-state watch is made again after it
    /// could not be; it doubles up to --nats-watch-backoff-max [default: 1s].
    #[arg(
        long,
        env = "PODFLEET_NATS_WATCH_BACKOFF_INITIAL",
        value_name = "DURATION"
    )]
    pub nats_watch_backoff_initial: Option<String>,

    /// Longest wait between attempts to make the watch [default: 30s].
    #[arg(long, env = "PODFLEET_NATS_WATCH_BACKOFF_MAX", value_name = "DURATION")]
    pub nats_watch_backoff_max: Option<String>,

    /// Create the KV buckets podfleet-desired, podfleet-state and
    /// podfleet-heartbeats at connect when they are missing (existing ones
    /// are never changed). A device user normally may not: the refusal is
    /// logged once and the agent carries on [default: true].
    #[arg(long, env = "PODFLEET_NATS_CREATE_BUCKETS", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub nats_create_buckets: Option<bool>,

    /// podman's API socket [default: /run/podman/podman.sock as root,
    /// $XDG_RUNTIME_DIR/podman/podman.sock otherwise]. A Docker engine's
    /// socket works too.
    #[arg(long, env = "PODFLEET_PODMAN_SOCKET", value_name = "PATH")]
    pub podman_socket: Option<PathBuf>,

    /// How long an ordinary podman API call may take [default: 30s].
    #[arg(long, env = "PODFLEET_PODMAN_REQUEST_TIMEOUT", value_name = "DURATION")]
    pub podman_request_timeout: Option<String>,

    /// A containers-auth.json file (podman's format, e.g.
    /// /run/containers/0/auth.json) with the registry logins images are
    /// pulled with; read once at start. Logins can also be given in the
    /// TOML file's `[registries."host:port"]` tables, which win.
    #[arg(long, env = "PODFLEET_REGISTRY_AUTH_FILE", value_name = "FILE")]
    pub registry_auth_file: Option<PathBuf>,

    /// Where the agent keeps its cache of applied state [default: /var/lib/podfleet].
    #[arg(long, env = "PODFLEET_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// How often running services are checked (one list call) [default: 30s].
    #[arg(long, env = "PODFLEET_TICK_INTERVAL", value_name = "DURATION")]
    pub tick_interval: Option<String>,

    /// How often a heartbeat is published [default: 15s].
    #[arg(long, env = "PODFLEET_HEARTBEAT_INTERVAL", value_name = "DURATION")]
    pub heartbeat_interval: Option<String>,

    /// First wait before a failed revision is tried again; it doubles after
    /// each failure up to --retry-backoff-max [default: 10s].
    #[arg(long, env = "PODFLEET_RETRY_BACKOFF_INITIAL", value_name = "DURATION")]
    pub retry_backoff_initial: Option<String>,

    /// Longest wait between attempts at a failed revision [default: 5m].
    #[arg(long, env = "PODFLEET_RETRY_BACKOFF_MAX", value_name = "DURATION")]
    pub retry_backoff_max: Option<String>,

    /// First wait before a service that exited is restarted; it doubles
    /// after each restart up to --restart-backoff-max [default: 10s].
    #[arg(
        long,
        env = "PODFLEET_RESTART_BACKOFF_INITIAL",
        value_name = "DURATION"
    )]
    pub restart_backoff_initial: Option<String>,

    /// Longest wait between restarts of a service that keeps exiting [default: 5m].
    #[arg(long, env = "PODFLEET_RESTART_BACKOFF_MAX", value_name = "DURATION")]
    pub restart_backoff_max: Option<String>,

    /// How long a restarted service must run before its restart backoff
    /// starts again from the initial wait [default: 10m].
    #[arg(long, env = "PODFLEET_RESTART_RESET_AFTER", value_name = "DURATION")]
    pub restart_reset_after: Option<String>,

    /// First wait before an unreachable podman is tried again; it doubles up
    /// to --runtime-backoff-max [default: 1s].
    #[arg(
        long,
        env = "PODFLEET_RUNTIME_BACKOFF_INITIAL",
        value_name = "DURATION"
    )]
    pub runtime_backoff_initial: Option<String>,

    /// Longest wait between attempts to reach podman [default: 30s].
    #[arg(long, env = "PODFLEET_RUNTIME_BACKOFF_MAX", value_name = "DURATION")]
    pub runtime_backoff_max: Option<String>,

    /// First wait before a report that NATS did not take is published again;
    /// it doubles up to --publish-backoff-max [default: 500ms].
    #[arg(
        long,
        env = "PODFLEET_PUBLISH_BACKOFF_INITIAL",
        value_name = "DURATION"
    )]
    pub publish_backoff_initial: Option<String>,

    /// Longest wait between attempts to publish a report [default: 30s].
    #[arg(long, env = "PODFLEET_PUBLISH_BACKOFF_MAX", value_name = "DURATION")]
    pub publish_backoff_max: Option<String>,

    /// Remove images no deployment keeps (those of each deployment's
    /// current and previous revision are kept) [default: true].
    #[arg(long, env = "PODFLEET_IMAGE_GC", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub image_gc: Option<bool>,

    /// At or above this share of the image store's filesystem in use, unused
    /// images podfleet never pulled are removed too, oldest first [default: 85].
    #[arg(long, env = "PODFLEET_IMAGE_GC_HIGH_PERCENT", value_name = "PERCENT")]
    pub image_gc_high_percent: Option<u8>,

    /// Removal under disk pressure stops below this share [default: 70].
    #[arg(long, env = "PODFLEET_IMAGE_GC_LOW_PERCENT", value_name = "PERCENT")]
    pub image_gc_low_percent: Option<u8>,

    /// How often image garbage collection looks when no rollout asks it to
    /// [default: 10m].
    #[arg(long, env = "PODFLEET_IMAGE_GC_INTERVAL", value_name = "DURATION")]
    pub image_gc_interval: Option<String>,

    /// How long a service's setup script may run in its fresh container
    /// [default: 5m].
    #[arg(long, env = "PODFLEET_SETUP_TIMEOUT", value_name = "DURATION")]
    pub setup_timeout: Option<String>,

    /// How long a finished `per_run` revision's exited containers are kept
    /// for their logs [default: 24h].
    #[arg(long, env = "PODFLEET_RUN_RETENTION", value_name = "DURATION")]
    pub run_retention: Option<String>,

    /// Allow the `exec` command to run programs in service containers [default: false].
    #[arg(long, env = "PODFLEET_ALLOW_EXEC", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub allow_exec: Option<bool>,

    /// The longest an `exec` may run, whatever the request asks [default: 300s].
    #[arg(long, env = "PODFLEET_EXEC_MAX_TIMEOUT", value_name = "DURATION")]
    pub exec_max_timeout: Option<String>,

    /// The most bytes of each output stream an `exec` reply carries [default: 65536].
    #[arg(long, env = "PODFLEET_EXEC_MAX_BYTES", value_name = "BYTES")]
    pub exec_max_bytes: Option<usize>,

    /// The most bytes of log text a `logs` reply carries [default: 65536].
    #[arg(long, env = "PODFLEET_LOGS_MAX_BYTES", value_name = "BYTES")]
    pub logs_max_bytes: Option<usize>,

    /// Log format: `text` or `json` [default: text].
    #[arg(long, env = "PODFLEET_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,

    /// Log filter when RUST_LOG is unset, e.g. `info` or `podfleet_agent=debug` [default: info].
    #[arg(long, env = "PODFLEET_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
}

/// The TOML file: the same knobs as [`Args`], under their snake_case names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    device_id: Option<String>,
    nats_urls: Option<Vec<String>>,
    nats_user: Option<String>,
    nats_password: Option<String>,
    nats_token: Option<String>,
    nats_nkey_seed_file: Option<PathBuf>,
    nats_creds_file: Option<PathBuf>,
    nats_inbox_prefix: Option<String>,
    nats_request_timeout: Option<String>,
    podman_socket: Option<PathBuf>,
    podman_request_timeout: Option<String>,
    registry_auth_file: Option<PathBuf>,
    registries: Option<BTreeMap<String, RegistryTable>>,
    state_dir: Option<PathBuf>,
    tick_interval: Option<String>,
    heartbeat_interval: Option<String>,
    retry_backoff_initial: Option<String>,
    retry_backoff_max: Option<String>,
    restart_backoff_initial: Option<String>,
    restart_backoff_max: Option<String>,
    restart_reset_after: Option<String>,
    runtime_backoff_initial: Option<String>,
    runtime_backoff_max: Option<String>,
    publish_backoff_initial: Option<String>,
    publish_backoff_max: Option<String>,
    nats_watch_backoff_initial: Option<String>,
    nats_watch_backoff_max: Option<String>,
    nats_create_buckets: Option<bool>,
    image_gc: Option<bool>,
    image_gc_high_percent: Option<u8>,
    image_gc_low_percent: Option<u8>,
    image_gc_interval: Option<String>,
    setup_timeout: Option<String>,
    run_retention: Option<String>,
    allow_exec: Option<bool>,
    exec_max_timeout: Option<String>,
    exec_max_bytes: Option<usize>,
    logs_max_bytes: Option<usize>,
    log_format: Option<String>,
    log_level: Option<String>,
}

/// A `[registries."host:port"]` table: one registry's login.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryTable {
    username: Option<String>,
    password: Option<String>,
    password_file: Option<PathBuf>,
}

impl fmt::Debug for RegistryTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryTable")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("password_file", &self.password_file)
            .finish()
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A configuration the agent refuses to start with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TOML file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML file is not valid, or has an unknown key.
    #[error("the configuration file {path} is invalid: {message}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message.
        message: String,
    },
    /// A required knob is not set anywhere.
    #[error(
        "{knob} is not set: give --{flag}, PODFLEET_{env} or `{knob}` in the configuration file"
    )]
    Missing {
        /// The knob's file key.
        knob: &'static str,
        /// Its flag.
        flag: String,
        /// Its environment variable's suffix.
        env: String,
    },
    /// The registry auth file (`registry_auth_file`) is missing,
    /// unreadable, or not a containers-auth.json file.
    #[error("the registry auth file {path} is unusable: {reason}")]
    RegistryAuthFile {
        /// The file.
        path: PathBuf,
        /// Why, without quoting the file.
        reason: String,
    },
    /// A knob's value breaks its rule.
    #[error("invalid {knob} {value:?}: {rule}")]
    Invalid {
        /// The knob's file key.
        knob: &'static str,
        /// The value given.
        value: String,
        /// The rule it breaks.
        rule: String,
    },
}

fn invalid(knob: &'static str, value: impl fmt::Display, rule: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        knob,
        value: value.to_string(),
        rule: rule.into(),
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This device.
    pub device: DeviceId,
    /// The NATS side.
    pub nats: NatsSettings,
    /// podman's API socket.
    pub podman_socket: PathBuf,
    /// The bound on ordinary podman API calls.
    pub podman_request_timeout: Duration,
    /// The containers-auth.json file the logins were partly read from.
    pub registry_auth_file: Option<PathBuf>,
    /// The registry logins images are pulled with.
    pub registry_auth: RegistryAuth,
    /// The cache directory.
    pub state_dir: PathBuf,
    /// The liveness tick.
    pub tick_interval: Duration,
    /// The heartbeat interval.
    pub heartbeat_interval: Duration,
    /// The backoff between attempts at a failed revision.
    pub retry_backoff: Backoff,
    /// The backoff between restarts of a service that keeps exiting.
    pub restart_backoff: Backoff,
    /// How long a restarted service must run before its backoff resets.
    pub restart_reset_after: Duration,
    /// The backoff between attempts to reach an unreachable runtime.
    pub runtime_backoff: Backoff,
    /// When and how hard unused images are removed.
    pub image_gc: ImageGcPolicy,
    /// How long a setup script may run.
    pub setup_timeout: Duration,
    /// How long a finished `per_run` revision's containers are kept.
    pub run_retention: Duration,
    /// The loop's command limits and publish backoff.
    pub loop_options: LoopOptions,
    /// How logs are written.
    pub log_format: LogFormat,
    /// The log filter used when RUST_LOG is unset.
    pub log_level: String,
}

impl Settings {
    /// Merges `args` (flags and environment, as clap parsed them) over the
    /// file they name, over the defaults, and validates the result.
    ///
    /// # Errors
    /// [`ConfigError`] naming the knob, the value and the rule.
    pub fn load(args: &Args) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::resolve(args, file)
    }

    fn resolve(args: &Args, file: FileConfig) -> Result<Self, ConfigError> {
        let device_raw = args
            .device_id
            .clone()
            .or(file.device_id)
            .ok_or_else(|| missing("device_id"))?;
        let device = DeviceId::new(device_raw.clone())
            .map_err(|e| invalid("device_id", &device_raw, e.to_string()))?;

        let urls = args
            .nats_urls
            .clone()
            .or(file.nats_urls)
            .unwrap_or_else(|| vec!["nats://127.0.0.1:4222".to_owned()]);
        if urls.is_empty() {
            return Err(invalid("nats_urls", "", "give at least one server URL"));
        }
        for url in &urls {
            url.parse::<async_nats::ServerAddr>().map_err(|e| {
                invalid(
                    "nats_urls",
                    url,
                    format!("not a NATS server URL (nats://host:port, tls://host:port): {e}"),
                )
            })?;
        }

        let credentials = credentials(
            args.nats_user.clone().or(file.nats_user),
            args.nats_password.clone().or(file.nats_password),
            args.nats_token.clone().or(file.nats_token),
            args.nats_nkey_seed_file
                .clone()
                .or(file.nats_nkey_seed_file),
            args.nats_creds_file.clone().or(file.nats_creds_file),
        )?;

        let inbox_prefix = args
            .nats_inbox_prefix
            .clone()
            .or(file.nats_inbox_prefix)
            .unwrap_or_else(|| default_inbox_prefix(&device));
        check_subject_prefix(&inbox_prefix)?;

        let duration = |knob: &'static str,
                        flag: &Option<String>,
                        file: Option<String>,
                        default| match flag.clone().or(file) {
            Some(text) => positive_duration(knob, &text),
            None => Ok(default),
        };
        let nats_request_timeout = duration(
            "nats_request_timeout",
            &args.nats_request_timeout,
            file.nats_request_timeout,
            Duration::from_secs(5),
        )?;
        let podman_request_timeout = duration(
            "podman_request_timeout",
            &args.podman_request_timeout,
            file.podman_request_timeout,
            crate::podman::DEFAULT_REQUEST_TIMEOUT,
        )?;
        let tick_interval = duration(
            "tick_interval",
            &args.tick_interval,
            file.tick_interval,
            DEFAULT_TICK_INTERVAL,
        )?;
        let heartbeat_interval = duration(
            "heartbeat_interval",
            &args.heartbeat_interval,
            file.heartbeat_interval,
            DEFAULT_HEARTBEAT_INTERVAL,
        )?;
        let restart_reset_after = duration(
            "restart_reset_after",
            &args.restart_reset_after,
            file.restart_reset_after,
            DEFAULT_RESTART_RESET_AFTER,
        )?;
        let retry_backoff = backoff(
            (
                "retry_backoff_initial",
                args.retry_backoff_initial
                    .clone()
                    .or(file.retry_backoff_initial),
            ),
            (
                "retry_backoff_max",
                args.retry_backoff_max.clone().or(file.retry_backoff_max),
            ),
            DEFAULT_RETRY_BACKOFF,
        )?;
        let restart_backoff = backoff(
            (
                "restart_backoff_initial",
                args.restart_backoff_initial
                    .clone()
                    .or(file.restart_backoff_initial),
            ),
            (
                "restart_backoff_max",
                args.restart_backoff_max
                    .clone()
                    .or(file.restart_backoff_max),
            ),
            DEFAULT_RESTART_BACKOFF,
        )?;
        let runtime_backoff = backoff(
            (
                "runtime_backoff_initial",
                args.runtime_backoff_initial
                    .clone()
                    .or(file.runtime_backoff_initial),
            ),
            (
                "runtime_backoff_max",
                args.runtime_backoff_max
                    .clone()
                    .or(file.runtime_backoff_max),
            ),
            DEFAULT_RUNTIME_BACKOFF,
        )?;
        let defaults = LoopOptions::default();
        let publish_backoff = backoff(
            (
                "publish_backoff_initial",
                args.publish_backoff_initial
                    .clone()
                    .or(file.publish_backoff_initial),
            ),
            (
                "publish_backoff_max",
                args.publish_backoff_max
                    .clone()
                    .or(file.publish_backoff_max),
            ),
            defaults.publish_backoff,
        )?;
        let mut nats = NatsSettings::new(device.clone());
        nats.watch_backoff = backoff(
            (
                "nats_watch_backoff_initial",
                args.nats_watch_backoff_initial
                    .clone()
                    .or(file.nats_watch_backoff_initial),
            ),
            (
                "nats_watch_backoff_max",
                args.nats_watch_backoff_max
                    .clone()
                    .or(file.nats_watch_backoff_max),
            ),
            nats.watch_backoff,
        )?;
        if !args
            .nats_create_buckets
            .or(file.nats_create_buckets)
            .unwrap_or(true)
        {
            nats.buckets.clear();
        }
        let exec_max_timeout = duration(
            "exec_max_timeout",
            &args.exec_max_timeout,
            file.exec_max_timeout,
            Duration::from_secs(300),
        )?;

        let bytes = |knob: &'static str, value: Option<usize>, default: usize| match value {
            Some(0) => Err(invalid(knob, 0, "must be at least 1")),
            Some(n) => Ok(n),
            None => Ok(default),
        };
        let loop_options = LoopOptions {
            exec_enabled: args.allow_exec.or(file.allow_exec).unwrap_or(false),
            logs_max_bytes: bytes(
                "logs_max_bytes",
                args.logs_max_bytes.or(file.logs_max_bytes),
                defaults.logs_max_bytes,
            )?,
            exec_max_bytes: bytes(
                "exec_max_bytes",
                args.exec_max_bytes.or(file.exec_max_bytes),
                defaults.exec_max_bytes,
            )?,
            exec_max_timeout,
            publish_backoff,
        };

        let log_format = match args.log_format.clone().or(file.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(invalid("log_format", other, "must be `text` or `json`")),
        };
        let log_level = args
            .log_level
            .clone()
            .or(file.log_level)
            .unwrap_or_else(|| "info".to_owned());
        tracing_subscriber::EnvFilter::try_new(&log_level)
            .map_err(|e| invalid("log_level", &log_level, format!("not a log filter: {e}")))?;

        let podman_socket = match args.podman_socket.clone().or(file.podman_socket) {
            Some(path) => path,
            None => default_podman_socket()?,
        };
        if !podman_socket.is_absolute() {
            return Err(invalid(
                "podman_socket",
                podman_socket.display(),
                "must be an absolute path",
            ));
        }
        let registry_auth_file = args.registry_auth_file.clone().or(file.registry_auth_file);
        let registry_auth = registry_auth(
            registry_auth_file.as_deref(),
            file.registries.unwrap_or_default(),
        )?;
        let state_dir = args
            .state_dir
            .clone()
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        if !state_dir.is_absolute() {
            return Err(invalid(
                "state_dir",
                state_dir.display(),
                "must be an absolute path",
            ));
        }

        let gc_default = ImageGcPolicy::default();
        let percent = |knob: &'static str, value: Option<u8>, default: u8| match value {
            None => Ok(default),
            Some(p) if (1..=100).contains(&p) => Ok(p),
            Some(p) => Err(invalid(knob, p, "must be a percentage from 1 to 100")),
        };
        let high_percent = percent(
            "image_gc_high_percent",
            args.image_gc_high_percent.or(file.image_gc_high_percent),
            gc_default.high_percent,
        )?;
        let low_percent = percent(
            "image_gc_low_percent",
            args.image_gc_low_percent.or(file.image_gc_low_percent),
            gc_default.low_percent.min(high_percent),
        )?;
        if low_percent > high_percent {
            return Err(invalid(
                "image_gc_low_percent",
                low_percent,
                format!("must not exceed image_gc_high_percent ({high_percent})"),
            ));
        }
        let image_gc = ImageGcPolicy {
            enabled: args
                .image_gc
                .or(file.image_gc)
                .unwrap_or(gc_default.enabled),
            high_percent,
            low_percent,
            interval: duration(
                "image_gc_interval",
                &args.image_gc_interval,
                file.image_gc_interval,
                gc_default.interval,
            )?,
        };
        let setup_timeout = duration(
            "setup_timeout",
            &args.setup_timeout,
            file.setup_timeout,
            DEFAULT_SETUP_TIMEOUT,
        )?;
        let run_retention = duration(
            "run_retention",
            &args.run_retention,
            file.run_retention,
            DEFAULT_RUN_RETENTION,
        )?;

        nats.urls = urls;
        nats.credentials = credentials;
        nats.inbox_prefix = inbox_prefix;
        nats.request_timeout = nats_request_timeout;
        Ok(Self {
            device,
            nats,
            podman_socket,
            podman_request_timeout,
            registry_auth_file,
            registry_auth,
            state_dir,
            tick_interval,
            heartbeat_interval,
            retry_backoff,
            restart_backoff,
            restart_reset_after,
            runtime_backoff,
            image_gc,
            setup_timeout,
            run_retention,
            loop_options,
            log_format,
            log_level,
        })
    }

    /// The reconciler's configuration: this device, `agent_version`, and
    /// the intervals and backoffs set here. The device facts are not
    /// settings: the process adds what [`crate::facts::gather`] reads.
    pub fn reconciler_config(&self, agent_version: &str) -> Config {
        Config::new(self.device.clone(), agent_version)
            .tick_interval(self.tick_interval)
            .heartbeat_interval(self.heartbeat_interval)
            .retry_backoff(self.retry_backoff)
            .restart_backoff(self.restart_backoff)
            .restart_reset_after(self.restart_reset_after)
            .runtime_backoff(self.runtime_backoff)
            .image_gc(self.image_gc)
            .setup_timeout(self.setup_timeout)
            .run_retention(self.run_retention)
    }
}

impl fmt::Display for Settings {
    /// The effective configuration as TOML lines, secrets masked.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let duration = |f: &mut fmt::Formatter<'_>, knob: &str, value: Duration| {
            writeln!(f, "{knob} = \"{}\"", human(value))
        };
        let backoff = |f: &mut fmt::Formatter<'_>, knob: &str, value: Backoff| {
            duration(f, &format!("{knob}_initial"), value.initial)?;
            duration(f, &format!("{knob}_max"), value.max)
        };
        writeln!(f, "device_id = {:?}", self.device.as_str())?;
        writeln!(f, "nats_urls = {:?}", self.nats.urls)?;
        writeln!(f, "nats_credentials = \"{}\"", self.nats.credentials)?;
        writeln!(f, "nats_inbox_prefix = {:?}", self.nats.inbox_prefix)?;
        duration(f, "nats_request_timeout", self.nats.request_timeout)?;
        backoff(f, "nats_watch_backoff", self.nats.watch_backoff)?;
        writeln!(f, "nats_create_buckets = {}", !self.nats.buckets.is_empty())?;
        writeln!(
            f,
            "podman_socket = {:?}",
            self.podman_socket.display().to_string()
        )?;
        duration(f, "podman_request_timeout", self.podman_request_timeout)?;
        if let Some(path) = &self.registry_auth_file {
            writeln!(f, "registry_auth_file = {:?}", path.display().to_string())?;
        }
        let from_file: Vec<&str> = self
            .registry_auth
            .logins()
            .filter(|(.., source)| *source == LoginSource::AuthFile)
            .map(|(key, ..)| key)
            .collect();
        if !from_file.is_empty() {
            writeln!(
                f,
                "# logins from registry_auth_file: {}",
                from_file.join(", ")
            )?;
        }
        writeln!(f, "state_dir = {:?}", self.state_dir.display().to_string())?;
        duration(f, "tick_interval", self.tick_interval)?;
        duration(f, "heartbeat_interval", self.heartbeat_interval)?;
        backoff(f, "retry_backoff", self.retry_backoff)?;
        backoff(f, "restart_backoff", self.restart_backoff)?;
        duration(f, "restart_reset_after", self.restart_reset_after)?;
        backoff(f, "runtime_backoff", self.runtime_backoff)?;
        backoff(f, "publish_backoff", self.loop_options.publish_backoff)?;
        writeln!(f, "image_gc = {}", self.image_gc.enabled)?;
        writeln!(f, "image_gc_high_percent = {}", self.image_gc.high_percent)?;
        writeln!(f, "image_gc_low_percent = {}", self.image_gc.low_percent)?;
        duration(f, "image_gc_interval", self.image_gc.interval)?;
        duration(f, "setup_timeout", self.setup_timeout)?;
        duration(f, "run_retention", self.run_retention)?;
        writeln!(f, "allow_exec = {}", self.loop_options.exec_enabled)?;
        duration(f, "exec_max_timeout", self.loop_options.exec_max_timeout)?;
        writeln!(f, "exec_max_bytes = {}", self.loop_options.exec_max_bytes)?;
        writeln!(f, "logs_max_bytes = {}", self.loop_options.logs_max_bytes)?;
        let format = match self.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        writeln!(f, "log_format = \"{format}\"")?;
        write!(f, "log_level = {:?}", self.log_level)?;
        for (key, login, source) in self.registry_auth.logins() {
            if source == LoginSource::Inline {
                write!(
                    f,
                    "\n\n[registries.{key:?}]\nusername = {:?}\npassword = \"***\"",
                    login.username()
                )?;
            }
        }
        Ok(())
    }
}

fn missing(knob: &'static str) -> ConfigError {
    ConfigError::Missing {
        knob,
        flag: knob.replace('_', "-"),
        env: knob.to_uppercase(),
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// One credential method at most, complete, with readable files.
fn credentials(
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
    seed_file: Option<PathBuf>,
    creds_file: Option<PathBuf>,
) -> Result<Credentials, ConfigError> {
    let chosen: Vec<&str> = [
        (
            user.is_some() || password.is_some(),
            "nats_user/nats_password",
        ),
        (token.is_some(), "nats_token"),
        (seed_file.is_some(), "nats_nkey_seed_file"),
        (creds_file.is_some(), "nats_creds_file"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect();
    if chosen.len() > 1 {
        return Err(invalid(
            "nats credentials",
            chosen.join(" + "),
            "set one credential method only",
        ));
    }
    Ok(match (user, password, token, seed_file, creds_file) {
        (Some(user), Some(password), ..) => Credentials::UserPassword { user, password },
        (Some(user), None, ..) => {
            return Err(invalid("nats_user", user, "nats_password must be set too"))
        }
        (None, Some(_), ..) => {
            return Err(invalid("nats_password", "***", "nats_user must be set too"))
        }
        (_, _, Some(token), ..) => {
            if token.is_empty() {
                return Err(invalid("nats_token", "", "must not be empty"));
            }
            Credentials::Token(token)
        }
        (_, _, _, Some(path), _) => {
            let seed = std::fs::read_to_string(&path).map_err(|e| {
                invalid(
                    "nats_nkey_seed_file",
                    path.display(),
                    format!("cannot read it: {e}"),
                )
            })?;
            let seed = seed.trim().to_owned();
            if !seed.starts_with("SU") {
                return Err(invalid(
                    "nats_nkey_seed_file",
                    path.display(),
                    "must hold a user NKey seed, which starts with SU",
                ));
            }
            Credentials::NKeySeed(seed)
        }
        (_, _, _, _, Some(path)) => {
            if !path.is_file() {
                return Err(invalid(
                    "nats_creds_file",
                    path.display(),
                    "must be a readable .creds file",
                ));
            }
            Credentials::CredsFile(path)
        }
        _ => Credentials::None,
    })
}

/// The logins of `auth_file` (a containers-auth.json), then of the
/// `[registries."host"]` tables, which win for the same key.
fn registry_auth(
    auth_file: Option<&Path>,
    tables: BTreeMap<String, RegistryTable>,
) -> Result<RegistryAuth, ConfigError> {
    let mut auth = match auth_file {
        None => RegistryAuth::new(),
        Some(path) => {
            let unusable = |reason: String| ConfigError::RegistryAuthFile {
                path: path.to_owned(),
                reason,
            };
            let text = std::fs::read_to_string(path)
                .map_err(|e| unusable(format!("cannot read it: {e}")))?;
            RegistryAuth::from_auth_json(&text).map_err(unusable)?
        }
    };
    for (key, table) in tables {
        let knob = "registries";
        let host = key.split('/').next().unwrap_or_default();
        if host.is_empty() || key.chars().any(char::is_whitespace) {
            return Err(invalid(
                knob,
                &key,
                "must be a registry host[:port], optionally with a /namespace",
            ));
        }
        let username = match table.username {
            Some(user) if !user.is_empty() => user,
            _ => return Err(invalid(knob, &key, "needs a username")),
        };
        let password = match (table.password, table.password_file) {
            (Some(password), None) => password,
            (None, Some(path)) => std::fs::read_to_string(&path)
                .map_err(|e| {
                    invalid(
                        knob,
                        &key,
                        format!("cannot read its password_file {}: {e}", path.display()),
                    )
                })?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
            _ => {
                return Err(invalid(
                    knob,
                    &key,
                    "needs exactly one of password and password_file",
                ))
            }
        };
        auth.insert(
            &key,
            RegistryLogin::new(username, password),
            LoginSource::Inline,
        );
    }
    Ok(auth)
}

/// Subject tokens without wildcards or whitespace.
fn check_subject_prefix(prefix: &str) -> Result<(), ConfigError> {
    let rule = "must be dot-separated subject tokens without spaces, `*` or `>`";
    let bad_token =
        |t: &str| t.is_empty() || t == "*" || t == ">" || t.chars().any(|c| c.is_whitespace());
    if prefix.split('.').any(bad_token) {
        return Err(invalid("nats_inbox_prefix", prefix, rule));
    }
    Ok(())
}

/// podman's rootful socket as root, the rootless one otherwise.
fn default_podman_socket() -> Result<PathBuf, ConfigError> {
    let is_root = std::fs::metadata("/proc/self").map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    if is_root.unwrap_or(false) {
        return Ok(PathBuf::from(crate::podman::DEFAULT_SOCKET));
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => Ok(PathBuf::from(dir).join("podman/podman.sock")),
        None => Err(invalid(
            "podman_socket",
            "",
            "not set, and XDG_RUNTIME_DIR is unset so the rootless default cannot be found",
        )),
    }
}

/// A backoff from its two knobs, `(file key, value given)` each: both
/// positive, the initial wait at most the longest. When only the longest
/// was given, it is the one named as breaking the rule.
fn backoff(
    (initial_knob, initial): (&'static str, Option<String>),
    (max_knob, max): (&'static str, Option<String>),
    default: Backoff,
) -> Result<Backoff, ConfigError> {
    let initial_value = match &initial {
        Some(text) => positive_duration(initial_knob, text)?,
        None => default.initial,
    };
    let max_value = match &max {
        Some(text) => positive_duration(max_knob, text)?,
        None => default.max,
    };
    if initial_value > max_value {
        return Err(match (initial, max) {
            (None, Some(max)) => invalid(
                max_knob,
                max,
                format!("must be at least {initial_knob} ({})", human(initial_value)),
            ),
            (initial, _) => invalid(
                initial_knob,
                initial.unwrap_or_else(|| human(initial_value)),
                format!("must be at most {max_knob} ({})", human(max_value)),
            ),
        });
    }
    Ok(Backoff::new(initial_value, max_value))
}

/// A duration in the form the knobs take: the largest unit that shows it
/// exactly (`1h`, `5m`, `30s`, `500ms`).
fn human(duration: Duration) -> String {
    let ms = duration.as_millis();
    match ms {
        0 => "0ms".to_owned(),
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1_000) => format!("{}s", ms / 1_000),
        _ => format!("{ms}ms"),
    }
}

/// Parses `500ms`, `30s`, `5m` or `1h` into a non-zero duration.
fn positive_duration(knob: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let rule = "must be a positive whole number with a unit: ms, s, m or h (e.g. 30s)";
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| invalid(knob, text, rule))?;
    let millis = match unit {
        "ms" => Some(number),
        "s" => number.checked_mul(1_000),
        "m" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        _ => None,
    };
    match millis {
        Some(0) | None => Err(invalid(knob, text, rule)),
        Some(ms) => Ok(Duration::from_millis(ms)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["podfleet-agent", "--podman-socket", "/run/p.sock"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    fn error(extra: &[&str]) -> String {
        Settings::resolve(&args(extra), FileConfig::default())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn defaults_fill_everything_but_the_device() {
        let settings =
            Settings::resolve(&args(&["--device-id", "rpi-01"]), FileConfig::default()).unwrap();
        assert_eq!(settings.device.as_str(), "rpi-01");
        assert_eq!(settings.nats.urls, vec!["nats://127.0.0.1:4222"]);
        assert_eq!(settings.nats.inbox_prefix, "_INBOX.rpi-01");
        assert_eq!(settings.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(settings.tick_interval, Duration::from_secs(30));
        assert!(!settings.loop_options.exec_enabled);
        assert_eq!(settings.log_format, LogFormat::Text);
        assert_eq!(
            error(&[]),
            "device_id is not set: give --device-id, PODFLEET_DEVICE_ID or `device_id` in the configuration file"
        );
    }

    #[test]
    fn flags_win_over_the_file() {
        let file: FileConfig = toml::from_str(
            "device_id = \"rpi-02\"\ntick_interval = \"5s\"\nallow_exec = true\nnats_urls = [\"nats://a:1\", \"nats://b:2\"]\n",
        )
        .unwrap();
        let settings = Settings::resolve(
            &args(&["--tick-interval", "250ms", "--allow-exec=false"]),
            file,
        )
        .unwrap();
        assert_eq!(settings.device.as_str(), "rpi-02");
        assert_eq!(settings.tick_interval, Duration::from_millis(250));
        assert!(!settings.loop_options.exec_enabled);
        assert_eq!(settings.nats.urls.len(), 2);
    }

    #[test]
    fn bad_values_name_knob_value_and_rule() {
        let message = error(&["--device-id", "RPI"]);
        assert!(
            message.starts_with("invalid device_id \"RPI\": invalid device id"),
            "{message}"
        );
        let message = error(&["--device-id", "a", "--tick-interval", "30"]);
        assert!(
            message.starts_with(
                "invalid tick_interval \"30\": must be a positive whole number with a unit"
            ),
            "{message}"
        );
        let message = error(&["--device-id", "a", "--heartbeat-interval", "0s"]);
        assert!(message.contains("heartbeat_interval \"0s\""), "{message}");
        let message = error(&["--device-id", "a", "--log-format", "xml"]);
        assert_eq!(
            message,
            "invalid log_format \"xml\": must be `text` or `json`"
        );
        let message = error(&["--device-id", "a", "--nats-urls", "nats://a b"]);
        assert!(
            message.starts_with("invalid nats_urls \"nats://a b\""),
            "{message}"
        );
        let message = error(&["--device-id", "a", "--nats-inbox-prefix", "_INBOX.>"]);
        assert!(
            message.starts_with("invalid nats_inbox_prefix"),
            "{message}"
        );
        let message = error(&["--device-id", "a", "--state-dir", "rel"]);
        assert_eq!(
            message,
            "invalid state_dir \"rel\": must be an absolute path"
        );
        let message = error(&["--device-id", "a", "--exec-max-bytes", "0"]);
        assert_eq!(message, "invalid exec_max_bytes \"0\": must be at least 1");
    }

    #[test]
    fn one_complete_credential_method() {
        let message = error(&["--device-id", "a", "--nats-user", "u", "--nats-token", "t"]);
        assert!(
            message.contains("set one credential method only"),
            "{message}"
        );
        let message = error(&["--device-id", "a", "--nats-user", "u"]);
        assert!(
            message.contains("nats_password must be set too"),
            "{message}"
        );
        let message = error(&[
            "--device-id",
            "a",
            "--nats-creds-file",
            "/nonexistent.creds",
        ]);
        assert!(
            message.contains("must be a readable .creds file"),
            "{message}"
        );
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("seed");
        std::fs::write(&seed, "not a seed\n").unwrap();
        let message = error(&[
            "--device-id",
            "a",
            "--nats-nkey-seed-file",
            seed.to_str().unwrap(),
        ]);
        assert!(message.contains("starts with SU"), "{message}");
        let settings = Settings::resolve(
            &args(&[
                "--device-id",
                "a",
                "--nats-user",
                "u",
                "--nats-password",
                "p",
            ]),
            FileConfig::default(),
        )
        .unwrap();
        assert_eq!(
            settings.nats.credentials,
            Credentials::UserPassword {
                user: "u".into(),
                password: "p".into()
            }
        );
        assert!(!settings.to_string().contains("\"p\""), "{settings}");
    }

    #[test]
    fn registry_logins_come_from_the_auth_file_and_the_tables() {
        let dir = tempfile::tempdir().unwrap();
        let auth_file = dir.path().join("auth.json");
        // u:p+?/ and user:from-file
        std::fs::write(
            &auth_file,
            r#"{"auths": {"localhost:5000": {"auth": "dTpwKz8v"}, "docker.io": {"auth": "dXNlcjpmcm9tLWZpbGU="}}}"#,
        )
        .unwrap();
        let password_file = dir.path().join("ghcr.pass");
        std::fs::write(&password_file, "s3cret-ghcr\n").unwrap();
        let file: FileConfig = toml::from_str(&format!(
            "device_id = \"a\"\nregistry_auth_file = {:?}\n\
             [registries.\"localhost:5000\"]\nusername = \"inline\"\npassword = \"s3cret-inline\"\n\
             [registries.\"ghcr.io/team\"]\nusername = \"bot\"\npassword_file = {:?}\n",
            auth_file.display().to_string(),
            password_file.display().to_string(),
        ))
        .unwrap();
        let settings = Settings::resolve(&args(&[]), file).unwrap();
        let logins: Vec<(String, String, LoginSource)> = settings
            .registry_auth
            .logins()
            .map(|(key, login, source)| (key.to_owned(), login.username().to_owned(), source))
            .collect();
        assert_eq!(
            logins,
            [
                ("docker.io".into(), "user".into(), LoginSource::AuthFile),
                ("ghcr.io/team".into(), "bot".into(), LoginSource::Inline),
                (
                    "localhost:5000".into(),
                    "inline".into(),
                    LoginSource::Inline
                ),
            ]
        );
        let shown = settings.to_string();
        assert!(
            shown.contains("# logins from registry_auth_file: docker.io\n"),
            "{shown}"
        );
        assert!(
            shown.contains("[registries.\"ghcr.io/team\"]\nusername = \"bot\"\npassword = \"***\""),
            "{shown}"
        );
        for secret in ["s3cret", "from-file", "p+?/"] {
            assert!(!shown.contains(secret), "{secret} in\n{shown}");
            assert!(
                !format!("{settings:?}").contains(secret),
                "{secret} in Debug"
            );
        }
        // What --check-config prints is a configuration the agent reads.
        let _: toml::Table = toml::from_str(&shown).unwrap();
    }

    #[test]
    fn an_unusable_auth_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        let message = error(&[
            "--device-id",
            "a",
            "--registry-auth-file",
            missing.to_str().unwrap(),
        ]);
        assert!(
            message.starts_with(&format!(
                "the registry auth file {} is unusable: cannot read it:",
                missing.display()
            )),
            "{message}"
        );
        let invalid = dir.path().join("auth.json");
        std::fs::write(&invalid, r#"{"auths": {"h": {"auth": 7}}} s3cret"#).unwrap();
        let message = error(&[
            "--device-id",
            "a",
            "--registry-auth-file",
            invalid.to_str().unwrap(),
        ]);
        assert!(
            message.contains("auth.json is unusable: not a containers-auth.json file"),
            "{message}"
        );
        let no_password: FileConfig =
            toml::from_str("device_id = \"a\"\n[registries.\"h:1\"]\nusername = \"u\"\n").unwrap();
        let message = Settings::resolve(&args(&[]), no_password)
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "invalid registries \"h:1\": needs exactly one of password and password_file"
        );
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "device_id = \"a\"\ntick_intervall = \"5s\"\n").unwrap();
        let message = Settings::load(&Args {
            config: Some(path),
            ..Args::default()
        })
        .unwrap_err()
        .to_string();
        assert!(message.contains("tick_intervall"), "{message}");
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let example = include_str!("../../deploy/agent.example.toml");
        let file: FileConfig = toml::from_str(example).unwrap();
        let settings = Settings::resolve(&args(&[]), file).unwrap();
        assert_eq!(settings.device.as_str(), "rpi-01");
        assert_eq!(settings.nats.inbox_prefix, "_INBOX.rpi-01");

        // Its commented-out knobs are real ones, shown with their defaults
        // (the other credential methods aside: one method at a time).
        let uncommented: String = example
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(knob)
                    if knob.contains(" = ")
                        && !knob.starts_with("nats_token")
                        && !knob.starts_with("nats_nkey_seed_file")
                        && !knob.starts_with("nats_creds_file") =>
                {
                    knob
                }
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert!(uncommented.contains("\nrestart_reset_after = "));
        let file: FileConfig = toml::from_str(&uncommented).unwrap();
        let all = Settings::resolve(&args(&[]), file).unwrap();
        assert_eq!(all.reconciler_config("v"), settings.reconciler_config("v"));
        assert_eq!(all.loop_options, settings.loop_options);
        assert_eq!(all.nats.watch_backoff, settings.nats.watch_backoff);
        assert_eq!(all.nats.buckets, settings.nats.buckets);
    }

    #[test]
    fn the_defaults_are_the_cores_and_the_loops() {
        let settings =
            Settings::resolve(&args(&["--device-id", "rpi-01"]), FileConfig::default()).unwrap();
        assert_eq!(
            settings.reconciler_config("1.2.3"),
            Config::new(settings.device.clone(), "1.2.3")
        );
        assert_eq!(settings.loop_options, LoopOptions::default());
        let nats = NatsSettings::new(settings.device.clone());
        assert_eq!(settings.nats.watch_backoff, nats.watch_backoff);
        assert_eq!(settings.nats.buckets, nats.buckets);
        assert_eq!(settings.nats.buckets.len(), 3);
    }

    #[test]
    fn backoff_knobs_reach_the_config() {
        let file: FileConfig = toml::from_str(
            "device_id = \"rpi-01\"\nretry_backoff_initial = \"2s\"\nretry_backoff_max = \"1m\"\n\
             restart_reset_after = \"1h\"\nnats_create_buckets = false\n",
        )
        .unwrap();
        let settings = Settings::resolve(
            &args(&[
                "--retry-backoff-max",
                "2m",
                "--restart-backoff-initial",
                "500ms",
                "--restart-backoff-max",
                "20s",
                "--runtime-backoff-initial",
                "250ms",
                "--runtime-backoff-max",
                "5s",
                "--publish-backoff-initial",
                "100ms",
                "--publish-backoff-max",
                "10s",
                "--nats-watch-backoff-initial",
                "2s",
                "--nats-watch-backoff-max",
                "1m",
            ]),
            file,
        )
        .unwrap();
        let ms = Duration::from_millis;
        assert_eq!(
            settings.reconciler_config("v"),
            Config::new(settings.device.clone(), "v")
                .retry_backoff(Backoff::new(ms(2_000), ms(120_000)))
                .restart_backoff(Backoff::new(ms(500), ms(20_000)))
                .restart_reset_after(ms(3_600_000))
                .runtime_backoff(Backoff::new(ms(250), ms(5_000)))
        );
        assert_eq!(
            settings.loop_options.publish_backoff,
            Backoff::new(ms(100), ms(10_000))
        );
        assert_eq!(
            settings.nats.watch_backoff,
            Backoff::new(ms(2_000), ms(60_000))
        );
        assert!(settings.nats.buckets.is_empty());
        let shown = settings.to_string();
        for line in [
            "retry_backoff_initial = \"2s\"",
            "retry_backoff_max = \"2m\"",
            "restart_reset_after = \"1h\"",
            "publish_backoff_initial = \"100ms\"",
            "nats_create_buckets = false",
            "log_format = \"text\"",
        ] {
            assert!(shown.lines().any(|l| l == line), "{line} in\n{shown}");
        }
    }

    #[test]
    fn a_backoff_starts_positive_and_no_longer_than_its_cap() {
        assert_eq!(
            error(&["--device-id", "a", "--retry-backoff-initial", "10m"]),
            "invalid retry_backoff_initial \"10m\": must be at most retry_backoff_max (5m)"
        );
        assert_eq!(
            error(&["--device-id", "a", "--runtime-backoff-max", "500ms"]),
            "invalid runtime_backoff_max \"500ms\": must be at least runtime_backoff_initial (1s)"
        );
        assert_eq!(
            error(&[
                "--device-id",
                "a",
                "--publish-backoff-initial",
                "2s",
                "--publish-backoff-max",
                "1s"
            ]),
            "invalid publish_backoff_initial \"2s\": must be at most publish_backoff_max (1s)"
        );
        let message = error(&["--device-id", "a", "--restart-backoff-initial", "0s"]);
        assert!(
            message.starts_with("invalid restart_backoff_initial \"0s\": must be a positive"),
            "{message}"
        );
        let message = error(&["--device-id", "a", "--restart-reset-after", "soon"]);
        assert!(
            message.starts_with("invalid restart_reset_after \"soon\""),
            "{message}"
        );
        let message = error(&["--device-id", "a", "--nats-watch-backoff-max", "1"]);
        assert!(
            message.starts_with("invalid nats_watch_backoff_max \"1\""),
            "{message}"
        );
    }

    #[test]
    fn durations_are_shown_as_they_are_written() {
        let ms = Duration::from_millis;
        assert_eq!(human(ms(500)), "500ms");
        assert_eq!(human(ms(1_500)), "1500ms");
        assert_eq!(human(ms(30_000)), "30s");
        assert_eq!(human(ms(90_000)), "90s");
        assert_eq!(human(ms(300_000)), "5m");
        assert_eq!(human(ms(7_200_000)), "2h");
        for text in ["500ms", "30s", "5m", "2h"] {
            assert_eq!(human(positive_duration("x", text).unwrap()), text);
        }
    }

    #[test]
    fn image_gc_thresholds_are_percentages_with_low_below_high() {
        let settings = Settings::resolve(
            &args(&[
                "--device-id",
                "rpi-01",
                "--image-gc-high-percent",
                "60",
                "--image-gc=false",
            ]),
            FileConfig::default(),
        )
        .unwrap();
        // The low mark follows a high mark set below its default.
        assert_eq!(
            (
                settings.image_gc.high_percent,
                settings.image_gc.low_percent
            ),
            (60, 60)
        );
        assert!(!settings.image_gc.enabled);
        let device = ["--device-id", "rpi-01"];
        let with = |extra: &[&str]| error(&[&device[..], extra].concat());
        assert_eq!(
            with(&["--image-gc-high-percent", "0"]),
            "invalid image_gc_high_percent \"0\": must be a percentage from 1 to 100"
        );
        assert_eq!(
            with(&[
                "--image-gc-high-percent",
                "80",
                "--image-gc-low-percent",
                "90"
            ]),
            "invalid image_gc_low_percent \"90\": must not exceed image_gc_high_percent (80)"
        );
    }

    #[test]
    fn durations_take_a_unit() {
        let ok = |t| positive_duration("x", t).unwrap();
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("2s"), Duration::from_secs(2));
        assert_eq!(ok("5m"), Duration::from_secs(300));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        for bad in ["", "s", "1", "1.5s", "-1s", "1d", "0ms"] {
            assert!(positive_duration("x", bad).is_err(), "{bad}");
        }
    }
}
