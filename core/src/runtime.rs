//! The container runtime as the reconciler sees it: primitive operations and
//! their results, plus the labels and names podfleet puts on containers.
//!
//! Operations are deliberately small (inspect image, pull, create, start,
//! wait, inspect, stop, remove, list) so that the simulator can fault each step on its own: a "run
//! to completion" is a sequence of them plus a deadline kept by the core, not
//! one opaque call. This module describes operations; it never performs one.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::wire::{PortMapping, PullFailure, RuntimeOperation, Signal, VolumeMount};

/// Label present (value `"true"`) on every container podfleet manages.
pub const LABEL_MANAGED: &str = "io.podfleet.managed";
/// Label holding the deployment name.
pub const LABEL_DEPLOYMENT: &str = "io.podfleet.deployment";
/// Label holding the service (or init container) name.
pub const LABEL_SERVICE: &str = "io.podfleet.service";
/// Label holding the hash of the service spec the container was created from.
pub const LABEL_SPEC_HASH: &str = "io.podfleet.spec-hash";
/// Label holding the desired-state revision the container was created for.
pub const LABEL_REVISION: &str = "io.podfleet.revision";
/// Label holding the grace period, in seconds, the container is stopped with.
pub const LABEL_GRACE: &str = "io.podfleet.grace-period";
/// Label holding the stop signal's name, e.g. `SIGTERM`.
pub const LABEL_STOP_SIGNAL: &str = "io.podfleet.stop-signal";
/// Label holding the manifest digest (`sha256:...`) of the image the
/// container was created from, when the store knew it at create time.
pub const LABEL_IMAGE_DIGEST: &str = "io.podfleet.image-digest";
/// Label present (value `"true"`) on init containers, so that
/// `podman ps -a --filter label=io.podfleet.init=true` finds them.
pub const LABEL_INIT: &str = "io.podfleet.init";

/// The container name of a deployment's service: `<deployment>_<service>`.
///
/// Deployment and service names cannot contain `_`, so names never collide
/// across deployments.
pub fn service_container_name(deployment: &str, service: &str) -> String {
    format!("{deployment}_{service}")
}

/// The container name of a deployment's init container: `<deployment>_init_<name>`.
pub fn init_container_name(deployment: &str, init: &str) -> String {
    format!("{deployment}_init_{init}")
}

/// Everything needed to create one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// The container's name.
    pub name: String,
    /// The image reference.
    pub image: String,
    /// Arguments to the entrypoint.
    pub args: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Mounts.
    pub volumes: Vec<VolumeMount>,
    /// Published ports.
    pub ports: Vec<PortMapping>,
    /// Labels, including podfleet's own.
    pub labels: BTreeMap<String, String>,
    /// The signal `stop` sends first.
    pub stop_signal: Signal,
}

/// One primitive runtime operation. Adapters always create containers with
/// restart policy "no": restarts are the reconciler's decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RuntimeOp {
    /// List every container carrying [`LABEL_MANAGED`], in any state.
    List,
    /// Create (not start) a container.
    Create {
        /// What to create.
        spec: ContainerSpec,
    },
    /// Start a created or exited container.
    Start {
        /// Id or name.
        container: String,
    },
    /// Block until the container is no longer running.
    Wait {
        /// Id or name.
        container: String,
    },
    /// Read the container's state and exit code.
    Inspect {
        /// Id or name.
        container: String,
    },
    /// Send `signal`, wait up to `grace`, then kill.
    Stop {
        /// Id or name.
        container: String,
        /// The signal to send first (the one baked in at create).
        signal: Signal,
        /// How long to wait before the kill.
        #[serde(with = "crate::wire::score::whole_seconds")]
        grace: Duration,
    },
    /// Remove the container; `force` kills it first if it still runs.
    Remove {
        /// Id or name.
        container: String,
        /// Kill a running container rather than fail.
        force: bool,
    },
    /// Look `image` up in the local store; never touches the network.
    InspectImage {
        /// The image reference, as the score names it.
        image: String,
    },
    /// Pull `image` from its registry into the local store, with the
    /// device's credentials for that registry. Fails with
    /// [`RuntimeErrorKind::Pull`].
    Pull {
        /// The image reference, as the score names it.
        image: String,
    },
    /// List every image in the local store, with what uses it, and how
    /// full the store's filesystem is (for image garbage collection).
    ListImages,
    /// Remove one image from the local store, by id; never forced, so the
    /// runtime refuses (with [`RuntimeErrorKind::ImageInUse`]) to remove an
    /// image a container uses, whoever owns the container.
    RemoveImage {
        /// The image id, as [`ImageSummary::id`] gives it.
        id: String,
    },
    /// Write one file into a container (created or running), making its
    /// parent directories: how a setup script is delivered.
    CopyFile {
        /// Id or name.
        container: String,
        /// Absolute path inside the container.
        path: String,
        /// The file's bytes, as text.
        content: String,
        /// Its permission bits, e.g. `0o700`.
        mode: u32,
    },
    /// Run `argv` inside a running container, stdin from `/dev/null`, and
    /// wait for it to exit. The core keeps the deadline: it walks away from
    /// an exec that runs too long.
    Exec {
        /// Id or name.
        container: String,
        /// The program and its arguments.
        argv: Vec<String>,
    },
}

impl RuntimeOp {
    /// Which call this is, as named in failure causes.
    pub fn kind(&self) -> RuntimeOperation {
        match self {
            RuntimeOp::List => RuntimeOperation::List,
            RuntimeOp::Create { .. } => RuntimeOperation::Create,
            RuntimeOp::Start { .. } => RuntimeOperation::Start,
            RuntimeOp::Wait { .. } => RuntimeOperation::Wait,
            RuntimeOp::Inspect { .. } => RuntimeOperation::Inspect,
            RuntimeOp::Stop { .. } => RuntimeOperation::Stop,
            RuntimeOp::Remove { .. } => RuntimeOperation::Remove,
            RuntimeOp::InspectImage { .. } => RuntimeOperation::InspectImage,
            RuntimeOp::Pull { .. } => RuntimeOperation::Pull,
            RuntimeOp::ListImages => RuntimeOperation::ListImages,
            RuntimeOp::RemoveImage { .. } => RuntimeOperation::RemoveImage,
            RuntimeOp::CopyFile { .. } => RuntimeOperation::CopyFile,
            RuntimeOp::Exec { .. } => RuntimeOperation::Exec,
        }
    }

    /// The operation's name, as shown in failure causes: `"create"`, `"start"`...
    pub fn name(&self) -> &'static str {
        self.kind().as_str()
    }

    /// The container the operation is about (its name for `create`), or
    /// `None` for `list` and the image operations.
    pub fn container(&self) -> Option<&str> {
        match self {
            RuntimeOp::List
            | RuntimeOp::InspectImage { .. }
            | RuntimeOp::Pull { .. }
            | RuntimeOp::ListImages
            | RuntimeOp::RemoveImage { .. } => None,
            RuntimeOp::Create { spec } => Some(&spec.name),
            RuntimeOp::Start { container }
            | RuntimeOp::Wait { container }
            | RuntimeOp::Inspect { container }
            | RuntimeOp::Stop { container, .. }
            | RuntimeOp::Remove { container, .. }
            | RuntimeOp::CopyFile { container, .. }
            | RuntimeOp::Exec { container, .. } => Some(container),
        }
    }

    /// The image the operation is about, for the image operations.
    pub fn image(&self) -> Option<&str> {
        match self {
            RuntimeOp::InspectImage { image } | RuntimeOp::Pull { image } => Some(image),
            _ => None,
        }
    }

    /// Whether the operation can change a container's state or contents
    /// (a pull adds to the image store and touches no container).
    pub fn is_mutation(&self) -> bool {
        matches!(
            self,
            RuntimeOp::Create { .. }
                | RuntimeOp::Start { .. }
                | RuntimeOp::Stop { .. }
                | RuntimeOp::Remove { .. }
                | RuntimeOp::CopyFile { .. }
                | RuntimeOp::Exec { .. }
        )
    }
}

/// The lifecycle state of a container, as the runtime reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerState {
    /// Created, never started.
    Created,
    /// Running (the only state counted as healthy).
    Running,
    /// Paused by someone.
    Paused,
    /// Being stopped.
    Stopping,
    /// Exited or stopped.
    Exited,
    /// Anything else the runtime says (removing, unknown...).
    Unknown,
}

/// One row of a [`RuntimeOp::List`] answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSummary {
    /// Full id.
    pub id: String,
    /// Name, without a leading `/`.
    pub name: String,
    /// State.
    pub state: ContainerState,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

impl ContainerSummary {
    /// The value of `label`, if set.
    pub fn label(&self, label: &str) -> Option<&str> {
        self.labels.get(label).map(String::as_str)
    }
}

/// A [`RuntimeOp::Inspect`] answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStatus {
    /// Full id.
    pub id: String,
    /// State.
    pub state: ContainerState,
    /// The exit code once the container has exited.
    pub exit_code: Option<i64>,
    /// The id of the image it was created from, when the runtime said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
}

/// How a [`RuntimeOp::Stop`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopOutcome {
    /// It exited on the stop signal within the grace period.
    Graceful,
    /// The grace period ran out and it was killed.
    Killed,
    /// It was not running.
    AlreadyStopped,
}

/// A successful answer to a [`RuntimeOp`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum RuntimeReply {
    /// Answer to `list`.
    Listed {
        /// Every managed container.
        containers: Vec<ContainerSummary>,
    },
    /// Answer to `create`.
    Created {
        /// The new container's id.
        id: String,
    },
    /// Answer to `start`.
    Started,
    /// Answer to `wait`: the container is no longer running (as far as
    /// `wait` knows; inspect may briefly disagree, the libpod race).
    Waited,
    /// Answer to `inspect`.
    Inspected {
        /// The container's status.
        status: ContainerStatus,
    },
    /// Answer to `stop`.
    Stopped {
        /// Whether it needed the kill.
        outcome: StopOutcome,
    },
    /// Answer to `remove`.
    Removed,
    /// Answer to `inspect_image`.
    ImageInspected {
        /// The image, or `None` when the store does not have it.
        image: Option<ImageInfo>,
    },
    /// Answer to `pull`: the image is in the store.
    Pulled {
        /// What was pulled.
        image: ImageInfo,
    },
    /// Answer to `list_images`.
    ImagesListed {
        /// Every image in the store, tagged or not.
        images: Vec<ImageSummary>,
        /// How full the filesystem holding the store is, when the runtime
        /// could tell.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk: Option<DiskUsage>,
    },
    /// Answer to `remove_image`.
    ImageRemoved,
    /// Answer to `copy_file`.
    FileCopied,
    /// Answer to `exec`: the command ran and exited.
    Executed {
        /// Its exit code.
        exit_code: i64,
        /// The end of its output, stdout and stderr interleaved, at most
        /// [`EXEC_OUTPUT_MAX_BYTES`].
        output: String,
    },
}

/// The most bytes of an exec's output a [`RuntimeReply::Executed`] keeps
/// (its end).
pub const EXEC_OUTPUT_MAX_BYTES: usize = 4096;

/// `path` relative to `/`, when it can be the target of a
/// [`RuntimeOp::CopyFile`]: absolute, and naming a file through plain
/// components (none empty, `.` or `..`, no NUL).
///
/// # Errors
///
/// [`RuntimeErrorKind::Other`], naming the path, otherwise: runtimes
/// refuse such a copy before touching the container.
pub fn copy_file_target(path: &str) -> Result<&str, RuntimeError> {
    let refused = |why: &str| {
        RuntimeError::new(
            RuntimeErrorKind::Other,
            format!(
                "cannot copy a file to {}: the path {why}",
                crate::wire::text::Quoted(path)
            ),
        )
    };
    let relative = path
        .strip_prefix('/')
        .ok_or_else(|| refused("is not absolute"))?;
    for component in relative.split('/') {
        match component {
            "" => return Err(refused("names no file or has an empty component")),
            "." | ".." => return Err(refused("has a `.` or `..` component")),
            _ if component.contains('\0') => return Err(refused("contains a NUL")),
            _ => {}
        }
    }
    Ok(relative)
}

/// How far a pull has got, as the runtime tells it while the pull runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullProgress {
    /// Bytes downloaded so far.
    pub downloaded: u64,
    /// Bytes to download, as far as known (0 when not known yet).
    pub total: u64,
    /// Layers fully downloaded.
    pub layers_done: u32,
    /// Layers the runtime has reported on.
    pub layers: u32,
}

/// One row of a [`RuntimeOp::ListImages`] answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    /// The image id, as [`ImageInfo::id`] gives it.
    pub id: String,
    /// Every name the store knows it by: tags (`host/repo:tag`) and
    /// digests (`host/repo@sha256:...`), fully qualified.
    pub names: Vec<String>,
    /// Its size in bytes, layers shared with other images included.
    pub size: u64,
    /// When it was created or pulled, in seconds since the Unix epoch
    /// (older images are removed first).
    pub created: i64,
    /// How many containers, of any owner and in any state, use it.
    pub containers: u32,
}

/// How full a filesystem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUsage {
    /// Bytes in use.
    pub used: u64,
    /// Bytes in all.
    pub total: u64,
}

impl DiskUsage {
    /// The share in use, in percent (0 for an empty filesystem).
    pub fn percent(&self) -> u64 {
        (u128::from(self.used) * 100)
            .checked_div(u128::from(self.total))
            .map_or(0, |p| u64::try_from(p).unwrap_or(u64::MAX))
    }
}

/// An image in the local store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The image id (the config's digest), as `podman images --no-trunc`
    /// shows it.
    pub id: String,
    /// The manifest digest the image was pulled by (`sha256:...`), when the
    /// store knows one; an image built locally has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// What went wrong, as far as the reconciler needs to tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeErrorKind {
    /// No such container (or image, for `remove_image`).
    NotFound,
    /// A container with that name already exists.
    NameConflict,
    /// The image is not present and cannot be pulled.
    ImageMissing,
    /// The runtime's API did not answer.
    Unavailable,
    /// A pull failed, for this reason.
    Pull(PullFailure),
    /// `remove_image` refused: a container uses the image.
    ImageInUse,
    /// Anything else.
    Other,
}

/// A failed runtime operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct RuntimeError {
    /// Which kind of failure.
    pub kind: RuntimeErrorKind,
    /// The runtime's own words.
    pub message: String,
}

impl RuntimeError {
    /// Builds an error.
    pub fn new(kind: RuntimeErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// The outcome of one [`RuntimeOp`].
pub type RuntimeResult = Result<RuntimeReply, RuntimeError>;

impl fmt::Display for ContainerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ContainerState::Created => "created",
            ContainerState::Running => "running",
            ContainerState::Paused => "paused",
            ContainerState::Stopping => "stopping",
            ContainerState::Exited => "exited",
            ContainerState::Unknown => "unknown",
        })
    }
}
