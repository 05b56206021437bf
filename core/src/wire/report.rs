//! What agents report: per-deployment [`DeploymentState`] and the device's
//! [`Heartbeat`].
//!
//! These are written by the agent into the state and heartbeat buckets and
//! read by the operator and by people. Fields added later carry
//! `#[serde(default)]`, so an operator reading an older agent's report still
//! parses it; unknown fields are ignored.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::wire::ids::{InitName, Revision, ServiceName};
use crate::wire::names::DeviceId;
use crate::wire::text::{bounded, bounded_tail};

/// Where a deployment stands on its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// A revision is in flight: init containers running, or the cutover.
    Pending,
    /// Every service of the applied revision runs, with the ids reported.
    Running,
    /// The revision failed; `cause` says why. Nothing older is restored.
    Failed,
    /// A `per_run` revision ran to completion: every service exited 0.
    Succeeded,
}

/// A container runtime call, as named in [`FailureCause::Runtime`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeOperation {
    /// Listing the managed containers.
    List,
    /// Creating a container.
    Create,
    /// Starting a container.
    Start,
    /// Waiting for a container to exit.
    Wait,
    /// Inspecting a container.
    Inspect,
    /// Stopping a container.
    Stop,
    /// Removing a container.
    Remove,
    /// Looking an image up in the device's store.
    InspectImage,
    /// Pulling an image from its registry.
    Pull,
    /// Listing the images in the device's store.
    ListImages,
    /// Removing an image from the device's store.
    RemoveImage,
    /// Copying a file into a container.
    CopyFile,
    /// Running a command inside a container.
    Exec,
    /// A call this version does not know (from a newer agent).
    #[serde(other)]
    Other,
}

impl RuntimeOperation {
    /// The call's name on the wire: `"create"`, `"start"`...
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeOperation::List => "list",
            RuntimeOperation::Create => "create",
            RuntimeOperation::Start => "start",
            RuntimeOperation::Wait => "wait",
            RuntimeOperation::Inspect => "inspect",
            RuntimeOperation::Stop => "stop",
            RuntimeOperation::Remove => "remove",
            RuntimeOperation::InspectImage => "inspect_image",
            RuntimeOperation::Pull => "pull",
            RuntimeOperation::ListImages => "list_images",
            RuntimeOperation::RemoveImage => "remove_image",
            RuntimeOperation::CopyFile => "copy_file",
            RuntimeOperation::Exec => "exec",
            RuntimeOperation::Other => "other",
        }
    }
}

impl std::fmt::Display for RuntimeOperation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The agent's report for one deployment, at key `<device_id>.<deployment>`
/// of the state bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeploymentState {
    /// Where the deployment stands.
    pub phase: Phase,
    /// The desired-state KV revision this report is about.
    pub revision: Revision,
    /// Service name -> id of the container running it.
    #[serde(default)]
    pub container_ids: BTreeMap<ServiceName, String>,
    /// A one-line summary for people, e.g. "2 init containers completed, 3 services running".
    #[serde(default)]
    pub message: String,
    /// Why the deployment failed; present exactly when `phase` is `failed`
    /// or a service is crash-looping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<FailureCause>,
    /// Which attempt at this revision this is (1 for the first); retries of
    /// a failed revision count up.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempt: u32,
    /// Services the agent has had to restart, with how often and why.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub restarts: BTreeMap<ServiceName, RestartRecord>,
    /// Service name -> the manifest digest (`sha256:...`) of the image its
    /// running container was created from; a service whose digest the
    /// device does not know (an image built on the device, a container
    /// created by an older agent) is absent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub image_digests: BTreeMap<ServiceName, String>,
    /// `per_run`: service name -> the exit code of its run, for every
    /// service whose run has ended.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exit_codes: BTreeMap<ServiceName, i64>,
    /// `no_launch`: service name -> what the last verification found.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub verified: BTreeMap<ServiceName, Verification>,
    /// This is a [summary](DeploymentState::summarised): the full report was
    /// over the broker's limit, so `container_ids`, `restarts` and
    /// `image_digests` are left out and the texts are cut.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub summarised: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The most bytes of each text a [`DeploymentState::summarised`] report keeps.
pub const SUMMARY_TEXT_MAX_BYTES: usize = 256;

impl DeploymentState {
    /// The smallest report that still says where the deployment stands: the
    /// same phase, revision, attempt and kind of cause, with texts cut to
    /// [`SUMMARY_TEXT_MAX_BYTES`] and no container ids or restart records.
    /// The agent publishes it in place of a report the broker refused as
    /// too large (`size` bytes), so the deployment's state is never missing.
    pub fn summarised(&self, size: usize) -> DeploymentState {
        let mut cause = self.cause.clone();
        if let Some(cause) = cause.as_mut() {
            cause.bound_texts(SUMMARY_TEXT_MAX_BYTES);
        }
        let note = format!(
            "[report of {size} bytes was over the broker's size limit; container ids and restarts left out] "
        );
        DeploymentState {
            phase: self.phase,
            revision: self.revision,
            container_ids: BTreeMap::new(),
            message: bounded(&(note + &self.message), SUMMARY_TEXT_MAX_BYTES + 100),
            cause,
            attempt: self.attempt,
            image_digests: BTreeMap::new(),
            exit_codes: BTreeMap::new(),
            verified: BTreeMap::new(),
            restarts: BTreeMap::new(),
            summarised: true,
        }
    }
}

/// What verifying a `no_launch` service's container found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Verification {
    /// The container verified, by name.
    pub container: String,
    /// What was found.
    pub status: VerifiedStatus,
    /// What shows it, for people: the state, the exit code, the image ids
    /// compared, the runtime's error.
    pub evidence: String,
}

/// What verifying a `no_launch` container found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum VerifiedStatus {
    /// It exists, runs, and runs the expected image.
    Running,
    /// No container has that name.
    Missing,
    /// It exists and runs the expected image, but does not run (exited,
    /// created, paused).
    Stopped,
    /// It runs another image than the score names, or the score's image
    /// cannot be read in the device's store (an unreadable tag is never a
    /// pass).
    Drifted,
    /// The runtime could not be asked: nothing is known, and nothing is
    /// assumed.
    Unknown,
}

impl VerifiedStatus {
    /// The status's name on the wire: `"running"`, `"missing"`...
    pub fn as_str(self) -> &'static str {
        match self {
            VerifiedStatus::Running => "running",
            VerifiedStatus::Missing => "missing",
            VerifiedStatus::Stopped => "stopped",
            VerifiedStatus::Drifted => "drifted",
            VerifiedStatus::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for VerifiedStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How often a service's container has been restarted by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RestartRecord {
    /// Restarts since the revision was applied.
    pub count: u32,
    /// The exit code of the last exit, when the runtime knew it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit_code: Option<i64>,
}

/// Why a deployment failed, typed so that the operator can act on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureCause {
    /// The desired payload did not parse or broke a rule; the previous
    /// revision's containers are left untouched.
    InvalidScore {
        /// The parse or validation error.
        error: String,
    },
    /// An init container exited non-zero.
    InitContainerExited {
        /// The init container.
        name: InitName,
        /// Its exit code.
        exit_code: i64,
    },
    /// An init container ran past its timeout and was force-removed.
    InitContainerTimedOut {
        /// The init container.
        name: InitName,
        /// How long it was waited for, in whole seconds.
        waited_secs: u64,
    },
    /// After `wait` returned, inspect still said "running" on the retry.
    StillRunningAfterWait {
        /// The init container.
        name: InitName,
    },
    /// A runtime call failed.
    Runtime {
        /// The container the call was about.
        container: String,
        /// The call.
        operation: RuntimeOperation,
        /// The runtime's error text.
        error: String,
    },
    /// An image of the revision could not be put in the device's store.
    /// Nothing of the running revision was stopped; the pull is retried
    /// with the usual capped backoff.
    ImagePull {
        /// The image reference, as the score names it.
        image: String,
        /// Why, as far as the agent can tell.
        reason: PullFailure,
        /// The runtime's or the registry's own words.
        error: String,
    },
    /// A `no_launch` service's container is not as the score says; the
    /// first such service in score order (`verified` has them all).
    Unverified {
        /// The service.
        service: ServiceName,
        /// Its container, by name.
        container: String,
        /// What was found.
        status: VerifiedStatus,
        /// What shows it.
        evidence: String,
    },
    /// A `per_run` service's run exited non-zero; the first such service in
    /// score order (`exit_codes` has every one).
    RunFailed {
        /// The service.
        service: ServiceName,
        /// Its exit code.
        exit_code: i64,
    },
    /// A service's `setup_script` failed in its fresh container, which was
    /// removed; retried with the usual capped backoff.
    SetupScriptFailed {
        /// The service.
        service: ServiceName,
        /// The script's exit code; absent when it ran past its timeout.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i64>,
        /// The end of its output (stdout and stderr together).
        output: String,
    },
    /// A service keeps exiting; it is restarted with a capped backoff and
    /// never given up on. Does not block a newer revision.
    CrashLoop {
        /// The service.
        service: ServiceName,
        /// Restarts so far.
        restarts: u32,
        /// The last exit code, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_exit_code: Option<i64>,
    },
}

impl FailureCause {
    /// Cuts every free text the cause carries to at most `max` bytes.
    pub fn bound_texts(&mut self, max: usize) {
        match self {
            FailureCause::InvalidScore { error } => *error = bounded(error, max),
            FailureCause::Runtime {
                container, error, ..
            } => {
                *container = bounded(container, max);
                *error = bounded(error, max);
            }
            FailureCause::InitContainerExited { name, .. }
            | FailureCause::InitContainerTimedOut { name, .. }
            | FailureCause::StillRunningAfterWait { name } => *name = bounded(name, max).into(),
            FailureCause::CrashLoop { service, .. } | FailureCause::RunFailed { service, .. } => {
                *service = bounded(service, max).into();
            }
            FailureCause::Unverified {
                service,
                container,
                evidence,
                ..
            } => {
                *service = bounded(service, max).into();
                *container = bounded(container, max);
                *evidence = bounded(evidence, max);
            }
            FailureCause::SetupScriptFailed {
                service, output, ..
            } => {
                *service = bounded(service, max).into();
                *output = bounded_tail(output, max);
            }
            FailureCause::ImagePull { image, error, .. } => {
                *image = bounded(image, max);
                *error = bounded(error, max);
            }
        }
    }
}

/// Why an image could not be pulled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PullFailure {
    /// The registry has no such repository, tag or digest.
    NotFound,
    /// The registry refused the credentials, or wanted some.
    Unauthorized,
    /// The registry could not be reached or the transfer broke off.
    Network,
    /// The pull took longer than the agent allows (its `pull_timeout`).
    Timeout,
    /// The device's disk is full.
    NoSpace,
    /// The pull policy is `never` and the image is not in the store.
    NotPresent,
    /// Anything else (a bad reference, a corrupt layer...), and causes this
    /// version does not know (from a newer agent).
    #[serde(other)]
    Other,
}

impl PullFailure {
    /// The reason's name on the wire: `"not_found"`, `"unauthorized"`...
    pub fn as_str(self) -> &'static str {
        match self {
            PullFailure::NotFound => "not_found",
            PullFailure::Unauthorized => "unauthorized",
            PullFailure::Network => "network",
            PullFailure::Timeout => "timeout",
            PullFailure::NoSpace => "no_space",
            PullFailure::NotPresent => "not_present",
            PullFailure::Other => "other",
        }
    }
}

impl std::fmt::Display for PullFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The device's periodic liveness report, at key `<device_id>` of the
/// heartbeat bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Heartbeat {
    /// The reporting device.
    pub device_id: DeviceId,
    /// The agent's version.
    pub agent_version: String,
    /// Seconds since the agent started.
    pub uptime_s: u64,
    /// How many deployments the agent manages.
    #[serde(default)]
    pub deployments: u32,
    /// Whether the container runtime answers.
    #[serde(default)]
    pub runtime: RuntimeHealth,
    /// The CPU architecture as Rust names it (`std::env::consts::ARCH`):
    /// `"aarch64"`, `"x86_64"`... Empty when unknown (agents older than the
    /// field); left out of the JSON then.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub arch: String,
    /// The operating system as a person reads it: os-release's
    /// `PRETTY_NAME`, e.g. `"Debian GNU/Linux 12 (bookworm)"`, or the bare
    /// OS name (`"linux"`) without one. Empty when unknown; at most
    /// [`FACT_MAX_BYTES`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub os: String,
    /// The kernel release, e.g. `"6.1.0-rpi7-rpi-v8"`. Empty when unknown;
    /// at most [`FACT_MAX_BYTES`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kernel: String,
    /// The container runtime's version as it states it, e.g. `"4.3.1"`;
    /// absent until the runtime has told it. At most [`FACT_MAX_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_version: Option<String>,
    /// The score features the agent understands
    /// ([`SCORE_FEATURES`](crate::wire::SCORE_FEATURES)): the fleet
    /// controller writes a score that uses one to no device whose agent
    /// does not name it. Empty for agents older than the field, which
    /// understand none of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub score_features: Vec<String>,
}

/// The most bytes of each device fact a [`Heartbeat`] carries (`arch`,
/// `os`, `kernel`, `runtime_version`): every device publishes one every few
/// seconds, so a fact never makes it large.
pub const FACT_MAX_BYTES: usize = 128;

/// Whether the container runtime's API answered the last call.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RuntimeHealth {
    /// The last call got an answer.
    #[default]
    Ok,
    /// The runtime could not be reached; the agent retries with backoff.
    Unreachable {
        /// The last error.
        error: String,
    },
}
