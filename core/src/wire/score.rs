//! The desired state of one deployment: [`PodmanV0Score`].
//!
//! This module owns the score's wire form, its defaults and its validation.
//! Parsing is tolerant of fields it does not know (an agent may be older
//! than the operator that wrote the payload) and strict about the values it
//! does know: [`PodmanV0Score::from_json`] returns a [`ScoreError`] that names
//! the offending value and the rule it broke.
//!
//! Compatibility promise: a payload written before `init_containers` or
//! `lifecycle` existed parses, with an empty list and `None`, and behaves as
//! it did then.
//!
//! Init containers must be idempotent: they run again on every rollout of a
//! new revision, and again when a failed rollout is retried.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::wire::ids::{InitName, ServiceName};
use crate::wire::names::{validate_label, NameError, NameKind};
use crate::wire::text::{bounded, Quoted, TEXT_MAX_BYTES};

/// How long an init container may run when its score does not say.
pub const DEFAULT_INIT_CONTAINER_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a stopping container gets between its stop signal and the kill.
pub const DEFAULT_GRACE_PERIOD_SECS: u64 = 30;

/// The JSON Schema's top-level description: what the schema leaves to the agent.
///
/// Every rule of [`PodmanV0Score::validate`] that looks at one value is in the
/// schema, through the `schemars` attributes beside the fields. The rules
/// below span several values, or the JSON text rather than the value it
/// encodes, which JSON Schema cannot express; the score tests hold one case
/// for each and assert that the schema accepts it and the agent does not.
const SCHEMA_DESCRIPTION: &str = "A deployment's desired state, version 0 of the podman score.

The agent alone checks these rules, which JSON Schema cannot express:
- service names are unique;
- init container names are unique;
- no init container has the name of a service;
- a host port and protocol pair is published once in the whole score;
- no field is written twice in one object;
- integers are written without a fraction or an exponent (80, not 80.0 or 8e1) and fit in 64 bits.";

/// A deployment's desired state, version 0 of the podman score.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "podfleet PodmanV0Score", description = SCHEMA_DESCRIPTION)]
pub struct PodmanV0Score {
    /// Long-running services, each one container; at least one.
    #[schemars(length(min = 1))]
    pub services: Vec<PodmanService>,
    /// One-shot containers run to completion, in list order, before any
    /// service of a new revision is (re)created.
    #[serde(default)]
    pub init_containers: Vec<InitContainer>,
    /// How service containers are stopped; `None` means SIGTERM and 30 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<LifecyclePolicy>,
    /// What podfleet does with the deployment's containers over time:
    /// `persistent`, `per_run` or `no_launch`. Absent and `null` both mean
    /// `persistent`, what every score meant before the field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<Lifetime>,
    /// How many times a person asked for the deployment to be restarted
    /// (`podfleet rollout restart`): a change recreates every service
    /// container, gracefully as any change of spec, and runs a `per_run`
    /// deployment again. Absent, `null` and 0 are the same: no restart
    /// asked, what every score meant before the field existed. A
    /// `no_launch` score does not take it: podfleet starts nothing there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<u64>,
}

/// The score fields an agent must understand before a score may use them,
/// by the name agents give them in their heartbeat
/// ([`Heartbeat::score_features`](crate::wire::Heartbeat::score_features)):
/// fields added after the first agents, which an older agent would ignore
/// and do something else instead. Every agent of this version understands
/// them all.
pub const SCORE_FEATURES: [&str; 3] = ["lifetime", "setup_script", "restart"];

/// What podfleet does with a deployment's containers over time
/// (docs/lifetimes.md has the whole truth table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Lifetime {
    /// Long-running services: created once per revision, adopted across
    /// agent restarts and reboots, restarted when they exit, never
    /// recreated while their spec is unchanged.
    #[default]
    Persistent,
    /// A run to completion: each service runs once per revision, its exit
    /// code is reported (`succeeded` when every one exited 0), and its
    /// container is removed once it has exited.
    PerRun,
    /// podfleet never creates, starts, stops or removes anything: it
    /// verifies that each service's existing container runs the expected
    /// image, and reports what it found.
    NoLaunch,
}

impl Lifetime {
    /// The lifetime's name on the wire: `"persistent"`, `"per_run"`, `"no_launch"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Lifetime::Persistent => "persistent",
            Lifetime::PerRun => "per_run",
            Lifetime::NoLaunch => "no_launch",
        }
    }
}

impl fmt::Display for Lifetime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The most bytes a service's `setup_script` may have.
///
/// A score travels whole in one broker message (1 MiB by default) to every
/// device it targets and is kept in the agent's cache; docs/lifetimes.md
/// gives the measurements behind this figure.
pub const SETUP_SCRIPT_MAX_BYTES: usize = 64 * 1024;

/// The most bytes of an existing container's name (`container`).
pub const CONTAINER_NAME_MAX_BYTES: usize = 253;

/// One long-running service container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PodmanService {
    /// The service's name, unique among the score's services and init
    /// containers: 1-63 characters of a-z, 0-9 and '-', starting and ending
    /// with a letter or digit.
    pub name: ServiceName,
    /// The image reference, for example `localhost/app:1.2`; not blank.
    #[schemars(regex(pattern = IMAGE_PATTERN))]
    pub image: String,
    /// Arguments passed to the image's entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables; names are non-empty and contain neither '='
    /// nor NUL.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("propertyNames" = { "pattern": ENV_NAME_PATTERN }))]
    pub env: BTreeMap<String, String>,
    /// Bind mounts and named volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// Published ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
    /// When the image is pulled; absent means [`PullPolicy::default_for`]
    /// the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
    /// `no_launch` only: the name of the existing container this service
    /// verifies (podman's rule: a letter or digit, then letters, digits,
    /// `_`, `.` or `-`); absent means the service's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = CONTAINER_NAME_PATTERN), length(max = 253))]
    pub container: Option<String>,
    /// A script run inside each freshly created container of the service,
    /// after it starts and before the service counts as running: delivered
    /// as a file and run by `/bin/sh` with `-e -o pipefail` and stdin from
    /// `/dev/null`. Never run on a container adopted as it was. At most
    /// 65,536 bytes; not with `no_launch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub setup_script: Option<String>,
}

impl PodmanService {
    /// The name of the container a `no_launch` service verifies.
    pub fn container_name(&self) -> &str {
        self.container.as_deref().unwrap_or(self.name.as_str())
    }

    /// The pull policy in force: the one set, else the image's default.
    pub fn pull_policy(&self) -> PullPolicy {
        self.pull_policy
            .unwrap_or_else(|| PullPolicy::default_for(&self.image))
    }
}

/// A container run to completion before the services start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct InitContainer {
    /// The init container's name, unique within the score and distinct from
    /// every service name: 1-63 characters of a-z, 0-9 and '-', starting and
    /// ending with a letter or digit.
    pub name: InitName,
    /// The image reference; not blank.
    #[schemars(regex(pattern = IMAGE_PATTERN))]
    pub image: String,
    /// Arguments passed to the image's entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables; names are non-empty and contain neither '='
    /// nor NUL.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("propertyNames" = { "pattern": ENV_NAME_PATTERN }))]
    pub env: BTreeMap<String, String>,
    /// Bind mounts and named volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// How long it may run before it is force-removed and the revision fails;
    /// whole seconds on the wire, 300 when absent, never 0.
    #[serde(default = "default_init_timeout", with = "whole_seconds")]
    #[schemars(with = "u64", range(min = 1), extend("default" = 300))]
    pub timeout: Duration,
    /// When the image is pulled; absent means [`PullPolicy::default_for`]
    /// the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
}

impl InitContainer {
    /// The pull policy in force: the one set, else the image's default.
    pub fn pull_policy(&self) -> PullPolicy {
        self.pull_policy
            .unwrap_or_else(|| PullPolicy::default_for(&self.image))
    }
}

/// When the agent pulls a container's image from its registry, with the
/// meaning Kubernetes gives `imagePullPolicy`. Every image of a revision is
/// in the device's store before the first container of the old revision is
/// stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PullPolicy {
    /// Pull only when the store does not have the image.
    IfNotPresent,
    /// Pull each time a revision creates a container from it (the tag may
    /// have moved); the registry must answer.
    Always,
    /// Never pull: the image must be in the store already.
    Never,
}

impl PullPolicy {
    /// The default for `image`, as Kubernetes decides it: [`Always`] for an
    /// untagged reference or the tag `latest`, [`IfNotPresent`] for any
    /// other tag and for a digest (`name@sha256:...`).
    ///
    /// [`Always`]: PullPolicy::Always
    /// [`IfNotPresent`]: PullPolicy::IfNotPresent
    pub fn default_for(image: &str) -> Self {
        if image.contains('@') {
            return PullPolicy::IfNotPresent;
        }
        // The tag follows the last ':' after the last '/' (a ':' before
        // it is a registry's port).
        let last = image.rsplit('/').next().unwrap_or(image);
        match last.rsplit_once(':') {
            Some((_, tag)) if tag != "latest" => PullPolicy::IfNotPresent,
            _ => PullPolicy::Always,
        }
    }

    /// The policy's name on the wire: `"if_not_present"`, `"always"`, `"never"`.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::IfNotPresent => "if_not_present",
            PullPolicy::Always => "always",
            PullPolicy::Never => "never",
        }
    }
}

fn default_init_timeout() -> Duration {
    DEFAULT_INIT_CONTAINER_TIMEOUT
}

/// How a service container is stopped when it is replaced or dropped.
///
/// There is deliberately no "kill fallback" switch: after the grace period
/// the runtime always kills.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LifecyclePolicy {
    /// Sent first; baked into the container when it is created.
    #[serde(default)]
    pub stop_signal: Signal,
    /// Seconds between the stop signal and the kill.
    #[serde(default = "default_grace")]
    #[schemars(extend("default" = 30))]
    pub grace_period_secs: u64,
}

fn default_grace() -> u64 {
    DEFAULT_GRACE_PERIOD_SECS
}

impl Default for LifecyclePolicy {
    fn default() -> Self {
        Self {
            stop_signal: Signal::default(),
            grace_period_secs: DEFAULT_GRACE_PERIOD_SECS,
        }
    }
}

impl LifecyclePolicy {
    /// The grace period as a duration.
    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.grace_period_secs)
    }
}

/// A stop signal, by its conventional name (`"SIGTERM"`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub enum Signal {
    /// SIGHUP (1).
    Hup,
    /// SIGINT (2).
    Int,
    /// SIGQUIT (3).
    Quit,
    /// SIGKILL (9): no grace at all.
    Kill,
    /// SIGUSR1 (10).
    Usr1,
    /// SIGUSR2 (12).
    Usr2,
    /// SIGTERM (15), the default.
    #[default]
    Term,
    /// SIGWINCH (28), the stop signal some web servers use for a graceful stop.
    Winch,
}

impl Signal {
    /// Every signal a score may name.
    pub const ALL: [Signal; 8] = [
        Signal::Hup,
        Signal::Int,
        Signal::Quit,
        Signal::Kill,
        Signal::Usr1,
        Signal::Usr2,
        Signal::Term,
        Signal::Winch,
    ];

    /// The conventional name, e.g. `"SIGTERM"`.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Hup => "SIGHUP",
            Signal::Int => "SIGINT",
            Signal::Quit => "SIGQUIT",
            Signal::Kill => "SIGKILL",
            Signal::Usr1 => "SIGUSR1",
            Signal::Usr2 => "SIGUSR2",
            Signal::Term => "SIGTERM",
            Signal::Winch => "SIGWINCH",
        }
    }

    /// The Linux signal number (podman's inspect reports this, as `"15"`).
    pub fn number(self) -> u8 {
        match self {
            Signal::Hup => 1,
            Signal::Int => 2,
            Signal::Quit => 3,
            Signal::Kill => 9,
            Signal::Usr1 => 10,
            Signal::Usr2 => 12,
            Signal::Term => 15,
            Signal::Winch => 28,
        }
    }

    /// Finds a signal by its number.
    pub fn from_number(number: u8) -> Option<Signal> {
        Signal::ALL.into_iter().find(|s| s.number() == number)
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A stop signal name that is not one of [`Signal::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown stop signal {0:?}: expected one of SIGHUP, SIGINT, SIGQUIT, SIGKILL, SIGUSR1, SIGUSR2, SIGTERM, SIGWINCH")]
pub struct UnknownSignal(pub String);

impl FromStr for Signal {
    type Err = UnknownSignal;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Signal::ALL
            .into_iter()
            .find(|sig| sig.name() == s)
            .ok_or_else(|| UnknownSignal(s.to_owned()))
    }
}

impl TryFrom<String> for Signal {
    type Error = UnknownSignal;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Signal> for String {
    fn from(s: Signal) -> String {
        s.name().to_owned()
    }
}

impl JsonSchema for Signal {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Signal".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let names: Vec<&str> = Signal::ALL.iter().map(|s| s.name()).collect();
        schemars::json_schema!({ "type": "string", "enum": names, "default": "SIGTERM" })
    }
}

/// A bind mount (`source` is an absolute host path) or a named volume
/// (`source` is a plain name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VolumeMount {
    /// Absolute host path, or a named volume; not empty, no ':'.
    #[schemars(regex(pattern = VOLUME_SOURCE_PATTERN))]
    pub source: String,
    /// Absolute path inside the container; no ':'.
    #[schemars(regex(pattern = VOLUME_TARGET_PATTERN))]
    pub target: String,
    /// Mount read-only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// A port published on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PortMapping {
    /// Port on the device, 1-65535.
    #[schemars(range(min = 1))]
    pub host_port: u16,
    /// Port inside the container, 1-65535.
    #[schemars(range(min = 1))]
    pub container_port: u16,
    /// Transport protocol.
    #[serde(default)]
    pub protocol: Protocol,
}

/// A port's transport protocol.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// TCP, the default.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Why a desired-state payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScoreError {
    /// The bytes are not a score at all (bad JSON, wrong types, missing fields).
    #[error("malformed score: {}", bounded(.reason, TEXT_MAX_BYTES / 2))]
    Malformed {
        /// The decoder's message, with line and column.
        reason: String,
    },
    /// A score with no services would run nothing.
    #[error("the score has no services: at least one is required")]
    NoServices,
    /// A service or init-container name broke the naming rule.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// Two services share a name.
    #[error("duplicate service name {}: service names must be unique", Quoted(.name))]
    DuplicateService {
        /// The repeated name.
        name: String,
    },
    /// Two init containers share a name.
    #[error("duplicate init container name {}: init container names must be unique", Quoted(.name))]
    DuplicateInitContainer {
        /// The repeated name.
        name: String,
    },
    /// A service and an init container share a name.
    #[error("{} names both a service and an init container: names must be distinct", Quoted(.name))]
    ServiceInitNameClash {
        /// The shared name.
        name: String,
    },
    /// A container has an empty image reference.
    #[error("{} has an empty image: every container needs an image reference", Quoted(.container))]
    EmptyImage {
        /// The service or init container.
        container: String,
    },
    /// An init container's timeout is zero.
    #[error("init container {} has a timeout of 0 s: the timeout must be at least 1 s", Quoted(.name))]
    ZeroTimeout {
        /// The init container.
        name: String,
    },
    /// An environment variable name is empty or contains `=` or NUL.
    #[error("{} has invalid environment variable name {}: names must be non-empty and contain neither '=' nor NUL", Quoted(.container), Quoted(.key))]
    InvalidEnvName {
        /// The service or init container.
        container: String,
        /// The offending name.
        key: String,
    },
    /// A volume mount's source or target is unusable.
    #[error("{} has invalid volume {} -> {}: {rule}", Quoted(.container), Quoted(.source_path), Quoted(.target))]
    InvalidVolume {
        /// The service or init container.
        container: String,
        /// The mount's source.
        source_path: String,
        /// The mount's target.
        target: String,
        /// The rule it broke.
        rule: &'static str,
    },
    /// A port number is zero.
    #[error("service {} publishes port 0: ports must be 1-65535", Quoted(.service))]
    ZeroPort {
        /// The service.
        service: String,
    },
    /// A field the score's lifetime does not take.
    #[error("{} sets {field}, which lifetime {lifetime} does not take{}", if .container.is_empty() { "the score".to_owned() } else { Quoted(.container).to_string() }, lifetime_hint(.field, *.lifetime))]
    NotWithLifetime {
        /// The service or init container, or empty for a score-wide field.
        container: String,
        /// The field.
        field: &'static str,
        /// The score's lifetime.
        lifetime: Lifetime,
    },
    /// A `no_launch` service's `container` is not a podman container name.
    #[error("service {} names container {}: a container name is a letter or digit, then letters, digits, '_', '.' or '-', at most 253 bytes", Quoted(.service), Quoted(.name))]
    InvalidContainerName {
        /// The service.
        service: String,
        /// The name given.
        name: String,
    },
    /// A `setup_script` is empty or too large.
    #[error("service {} has a setup_script of {bytes} bytes: it must be 1 to 65536 bytes", Quoted(.service))]
    SetupScriptSize {
        /// The service.
        service: String,
        /// The script's size.
        bytes: usize,
    },
    /// Two services publish the same host port and protocol.
    #[error("host port {port}/{protocol} is published by both {} and {}: a host port can be published once", Quoted(.first), Quoted(.second))]
    PortConflict {
        /// The host port.
        port: u16,
        /// Its protocol.
        protocol: Protocol,
        /// The first service publishing it.
        first: String,
        /// The second service publishing it.
        second: String,
    },
}

/// Why a lifetime refuses a field, for [`ScoreError::NotWithLifetime`].
fn lifetime_hint(field: &str, lifetime: Lifetime) -> &'static str {
    match (lifetime, field) {
        (Lifetime::NoLaunch, _) => {
            ": podfleet never creates a no_launch deployment's containers, so what would create them is refused"
        }
        (_, "container") => ": only a no_launch service names an existing container",
        _ => "",
    }
}

impl ScoreError {
    /// Where in `score` the broken rule is, as a field path relative to the
    /// score (`services[1].image`, `init_containers[0].timeout`), so a
    /// person editing a file can find it. A [`ScoreError::Malformed`] score
    /// was never decoded: its path is the empty string (the decoder's
    /// message says where).
    pub fn field_path(&self, score: &PodmanV0Score) -> String {
        let service = |name: &str| score.services.iter().rposition(|s| s.name.as_str() == name);
        let init = |name: &str| {
            score
                .init_containers
                .iter()
                .rposition(|i| i.name.as_str() == name)
        };
        let container = |name: &str, field: &str| match (service(name), init(name)) {
            (Some(i), _) => format!("services[{i}].{field}"),
            (None, Some(i)) => format!("init_containers[{i}].{field}"),
            (None, None) => String::new(),
        };
        match self {
            ScoreError::Malformed { .. } => String::new(),
            ScoreError::NoServices => "services".to_owned(),
            ScoreError::InvalidName(NameError::InvalidLabel { kind, value, .. }) => {
                match (kind, service(value), init(value)) {
                    (NameKind::Service, Some(i), _) => format!("services[{i}].name"),
                    (_, _, Some(i)) => format!("init_containers[{i}].name"),
                    _ => String::new(),
                }
            }
            ScoreError::InvalidName(_) => String::new(),
            ScoreError::DuplicateService { name } => service(name)
                .map(|i| format!("services[{i}].name"))
                .unwrap_or_default(),
            ScoreError::DuplicateInitContainer { name }
            | ScoreError::ServiceInitNameClash { name } => init(name)
                .map(|i| format!("init_containers[{i}].name"))
                .unwrap_or_default(),
            ScoreError::EmptyImage { container: name } => container(name, "image"),
            ScoreError::ZeroTimeout { name } => init(name)
                .map(|i| format!("init_containers[{i}].timeout"))
                .unwrap_or_default(),
            ScoreError::InvalidEnvName {
                container: name,
                key,
            } => container(name, &format!("env.{key}")),
            ScoreError::InvalidVolume {
                container: name, ..
            } => container(name, "volumes"),
            ScoreError::ZeroPort { service: name } => container(name, "ports"),
            ScoreError::NotWithLifetime {
                container: name,
                field,
                ..
            } => match (*field, name.is_empty()) {
                ("init_containers", _) => init(name)
                    .map(|i| format!("init_containers[{i}]"))
                    .unwrap_or_default(),
                (field, true) => field.to_owned(),
                (field, false) => container(name, field),
            },
            ScoreError::InvalidContainerName { service: name, .. } => container(name, "container"),
            ScoreError::SetupScriptSize { service: name, .. } => container(name, "setup_script"),
            ScoreError::PortConflict { second, .. } => container(second, "ports"),
        }
    }
}

impl PodmanV0Score {
    /// Parses and validates a desired-state payload.
    ///
    /// Unknown fields are ignored (forward compatibility); absent
    /// `init_containers`, `lifecycle` and `timeout` take their defaults.
    ///
    /// # Errors
    /// [`ScoreError::Malformed`] when the bytes do not decode, otherwise the
    /// first rule [`PodmanV0Score::validate`] finds broken.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ScoreError> {
        let score: PodmanV0Score =
            serde_json::from_slice(bytes).map_err(|e| ScoreError::Malformed {
                reason: e.to_string(),
            })?;
        score.validate()?;
        Ok(score)
    }

    /// The score's canonical JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a score always serialises: its maps have string keys")
    }

    /// Every image the score names, services first, then init containers
    /// (an image named twice comes twice).
    pub fn images(&self) -> impl Iterator<Item = &str> {
        self.services
            .iter()
            .map(|s| s.image.as_str())
            .chain(self.init_containers.iter().map(|i| i.image.as_str()))
    }

    /// The lifecycle policy in force, with defaults filled in.
    pub fn lifecycle_or_default(&self) -> LifecyclePolicy {
        self.lifecycle.clone().unwrap_or_default()
    }

    /// The lifetime in force: [`Lifetime::Persistent`] unless set.
    pub fn lifetime(&self) -> Lifetime {
        self.lifetime.unwrap_or_default()
    }

    /// The restarts asked for: 0 unless set.
    pub fn restart(&self) -> u64 {
        self.restart.unwrap_or(0)
    }

    /// The [`SCORE_FEATURES`] the score uses: an agent that does not
    /// understand one of them would ignore it and do something else (run a
    /// `no_launch` deployment's services itself, skip a setup script, never
    /// restart), so the fleet controller writes the score only to agents
    /// that name every one in their heartbeat.
    pub fn features(&self) -> Vec<&'static str> {
        let [lifetime, setup_script, restart] = SCORE_FEATURES;
        let mut used = Vec::new();
        if self.lifetime() != Lifetime::Persistent {
            used.push(lifetime);
        }
        if self.services.iter().any(|s| s.setup_script.is_some()) {
            used.push(setup_script);
        }
        if self.restart() != 0 {
            used.push(restart);
        }
        used
    }

    /// Checks every rule a score must follow.
    ///
    /// # Errors
    /// The first broken rule, as a [`ScoreError`] naming the offending value.
    pub fn validate(&self) -> Result<(), ScoreError> {
        if self.services.is_empty() {
            return Err(ScoreError::NoServices);
        }
        let mut services = BTreeSet::new();
        let mut host_ports: BTreeMap<(u16, Protocol), &str> = BTreeMap::new();
        for service in &self.services {
            validate_label(NameKind::Service, &service.name)?;
            if !services.insert(service.name.as_str()) {
                return Err(ScoreError::DuplicateService {
                    name: service.name.to_string(),
                });
            }
            validate_container(
                &service.name,
                &service.image,
                &service.env,
                &service.volumes,
            )?;
            validate_lifetime_fields(self.lifetime(), service)?;
            for port in &service.ports {
                if port.host_port == 0 || port.container_port == 0 {
                    return Err(ScoreError::ZeroPort {
                        service: service.name.to_string(),
                    });
                }
                if let Some(first) =
                    host_ports.insert((port.host_port, port.protocol), &service.name)
                {
                    return Err(ScoreError::PortConflict {
                        port: port.host_port,
                        protocol: port.protocol,
                        first: first.to_owned(),
                        second: service.name.to_string(),
                    });
                }
            }
        }
        if self.lifetime() == Lifetime::NoLaunch {
            if let Some(init) = self.init_containers.first() {
                return Err(ScoreError::NotWithLifetime {
                    container: init.name.to_string(),
                    field: "init_containers",
                    lifetime: Lifetime::NoLaunch,
                });
            }
            if self.lifecycle.is_some() {
                return Err(ScoreError::NotWithLifetime {
                    container: String::new(),
                    field: "lifecycle",
                    lifetime: Lifetime::NoLaunch,
                });
            }
            if self.restart() != 0 {
                return Err(ScoreError::NotWithLifetime {
                    container: String::new(),
                    field: "restart",
                    lifetime: Lifetime::NoLaunch,
                });
            }
        }
        let mut inits = BTreeSet::new();
        for init in &self.init_containers {
            validate_label(NameKind::InitContainer, &init.name)?;
            if !inits.insert(init.name.as_str()) {
                return Err(ScoreError::DuplicateInitContainer {
                    name: init.name.to_string(),
                });
            }
            if services.contains(init.name.as_str()) {
                return Err(ScoreError::ServiceInitNameClash {
                    name: init.name.to_string(),
                });
            }
            validate_container(&init.name, &init.image, &init.env, &init.volumes)?;
            if init.timeout.is_zero() {
                return Err(ScoreError::ZeroTimeout {
                    name: init.name.to_string(),
                });
            }
        }
        Ok(())
    }
}

// The JSON Schema (ECMA-262) patterns of the single-value rules in
// `validate_container`. Each is written so that ECMA-262 and the regex crate
// read it alike: no `\s` (the two disagree on it), no flags.

/// Some character that `char::is_whitespace` (Unicode White_Space) rejects,
/// so `image.trim().is_empty()` is false.
const IMAGE_PATTERN: &str =
    r"[^\t\n\v\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]";
/// Non-empty, neither '=' nor NUL.
const ENV_NAME_PATTERN: &str = r"^[^=\x00]+$";
/// Non-empty, no ':'.
const VOLUME_SOURCE_PATTERN: &str = "^[^:]+$";
/// Starts with '/', no ':'.
const VOLUME_TARGET_PATTERN: &str = "^/[^:]*$";

/// podman's rule for a container name.
const CONTAINER_NAME_PATTERN: &str = "^[a-zA-Z0-9][a-zA-Z0-9_.-]*$";

/// The rules of the fields that only some lifetimes take.
fn validate_lifetime_fields(lifetime: Lifetime, service: &PodmanService) -> Result<(), ScoreError> {
    let refuse = |field: &'static str| ScoreError::NotWithLifetime {
        container: service.name.to_string(),
        field,
        lifetime,
    };
    if lifetime == Lifetime::NoLaunch {
        // What creates a container means nothing for one podfleet never
        // creates: refused rather than silently ignored.
        let creating = [
            ("args", !service.args.is_empty()),
            ("env", !service.env.is_empty()),
            ("volumes", !service.volumes.is_empty()),
            ("ports", !service.ports.is_empty()),
            ("pull_policy", service.pull_policy.is_some()),
            ("setup_script", service.setup_script.is_some()),
        ];
        if let Some((field, _)) = creating.into_iter().find(|(_, set)| *set) {
            return Err(refuse(field));
        }
    } else if service.container.is_some() {
        return Err(refuse("container"));
    }
    if let Some(name) = &service.container {
        let mut chars = name.chars();
        let valid = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            && name.len() <= CONTAINER_NAME_MAX_BYTES;
        if !valid {
            return Err(ScoreError::InvalidContainerName {
                service: service.name.to_string(),
                name: name.clone(),
            });
        }
    }
    if let Some(script) = &service.setup_script {
        if script.is_empty() || script.len() > SETUP_SCRIPT_MAX_BYTES {
            return Err(ScoreError::SetupScriptSize {
                service: service.name.to_string(),
                bytes: script.len(),
            });
        }
    }
    Ok(())
}

fn validate_container(
    name: &str,
    image: &str,
    env: &BTreeMap<String, String>,
    volumes: &[VolumeMount],
) -> Result<(), ScoreError> {
    if image.trim().is_empty() {
        return Err(ScoreError::EmptyImage {
            container: name.to_owned(),
        });
    }
    if let Some(key) = env
        .keys()
        .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
    {
        return Err(ScoreError::InvalidEnvName {
            container: name.to_owned(),
            key: key.clone(),
        });
    }
    for volume in volumes {
        let rule = if volume.source.is_empty() {
            Some("the source must not be empty")
        } else if !volume.target.starts_with('/') {
            Some("the target must be an absolute path")
        } else if volume.source.contains(':') || volume.target.contains(':') {
            Some("paths must not contain ':'")
        } else {
            None
        };
        if let Some(rule) = rule {
            return Err(ScoreError::InvalidVolume {
                container: name.to_owned(),
                source_path: volume.source.clone(),
                target: volume.target.clone(),
                rule,
            });
        }
    }
    Ok(())
}

/// Serde adapter: a [`Duration`] as whole seconds.
pub mod whole_seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the duration's whole seconds (sub-second parts are dropped).
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    /// Reads whole seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

#[cfg(test)]
mod tests;
