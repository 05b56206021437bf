//! The reconciler: every decision a podfleet agent makes, and none of its IO.
//!
//! [`Reconciler`] owns the device's deployments. Callers feed it inputs (desired
//! state from the KV watch, runtime results, the passing of time) and pull
//! outputs (runtime operations to perform, reports to publish, a cache to
//! persist). It never blocks, never reads a clock and never touches a socket
//! or a file; the production agent and the simulator drive the same code.
//!
//! # The drive loop
//!
//! 1. Create it with [`Reconciler::new`], handing in the on-disk cache if the
//!    agent has one. It asks for a `list` of managed containers first.
//! 2. Feed exactly one [`Input`] to [`handle`](Reconciler::handle), always
//!    with the current time.
//! 3. Drain [`poll_output`](Reconciler::poll_output) until it returns `None`:
//!    start each runtime operation (they may run concurrently; a `wait` may
//!    block for long) and feed its result back in step 2; ask the runtime
//!    its version when told to and feed that back too; publish reports;
//!    persist the cache.
//! 4. Sleep until [`poll_timeout`](Reconciler::poll_timeout) or the next
//!    input, whichever comes first, then go to step 2 (with
//!    [`Input::Timeout`] when the deadline passed).
//!
//! Time never goes backwards: a `now` earlier than one already handed in is
//! taken as that one, so a clock stepped back by the operating system delays
//! deadlines and never replays them.
//!
//! A whole shell, with a runtime that answers everything at once:
//!
//! ```
//! use podfleet_core::reconciler::{Input, Output};
//! use podfleet_core::runtime::{ImageInfo, RuntimeOp, RuntimeReply};
//! use podfleet_core::wire::{DeploymentName, DeviceId, Phase, Revision};
//! use podfleet_core::{Config, Reconciler, Timestamp};
//!
//! let config = Config::new(DeviceId::new("pi-1").unwrap(), "0.1.0");
//! let mut now = Timestamp::ZERO;
//! let mut reconciler = Reconciler::new(config, None, now);
//! let web = DeploymentName::new("web").unwrap();
//! let mut inputs = vec![Input::DesiredPut {
//!     deployment: web.clone(),
//!     revision: Revision::new(1),
//!     value: br#"{"services":[{"name":"app","image":"localhost/app:1"}]}"#,
//! }];
//! let mut running = false;
//! for _ in 0..100 {
//!     // 2. one input, then 3. drain the outputs.
//!     let input = inputs.pop().unwrap_or(Input::Timeout);
//!     reconciler.handle(now, input);
//!     while let Some(output) = reconciler.poll_output() {
//!         match output {
//!             Output::Runtime { id, op } => {
//!                 let reply = match op {
//!                     RuntimeOp::List => RuntimeReply::Listed { containers: vec![] },
//!                     // The image is in the store already: nothing to pull.
//!                     RuntimeOp::InspectImage { .. } => RuntimeReply::ImageInspected {
//!                         image: Some(ImageInfo { id: "sha256:1f".into(), digest: None }),
//!                     },
//!                     RuntimeOp::Create { .. } => RuntimeReply::Created { id: "c1".into() },
//!                     RuntimeOp::Start { .. } => RuntimeReply::Started,
//!                     // Image garbage collection: an empty store.
//!                     RuntimeOp::ListImages => RuntimeReply::ImagesListed { images: vec![], disk: None },
//!                     other => panic!("not in this example: {other:?}"),
//!                 };
//!                 inputs.push(Input::RuntimeResult { id, result: Ok(reply) });
//!             }
//!             Output::PublishState { state, .. } => running = state.phase == Phase::Running,
//!             _ => {} // version queries, heartbeats, cache writes
//!         }
//!     }
//!     if running {
//!         break;
//!     }
//!     // 4. with nothing to feed, sleep until the next deadline.
//!     if inputs.is_empty() {
//!         now = reconciler.poll_timeout().at;
//!     }
//! }
//! assert!(running);
//! ```
//!
//! # Guarantees
//!
//! - A running container whose spec did not change is never stopped or
//!   recreated; the liveness tick only starts what exited or vanished.
//! - Once a valid revision is seen, no container of an older spec is started.
//! - Init containers of a revision run one at a time, in order, each to
//!   completion, before any service of that revision is (re)created.
//! - A failure is reported with its typed cause and retried with a capped
//!   backoff; it is never rolled back.
//! - One deployment's failure never stalls another's.

#[macro_use]
mod bugs;
mod deployment;
pub mod gc;
mod spec;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::runtime::{
    ContainerSummary, PullProgress, RuntimeError, RuntimeErrorKind, RuntimeOp, RuntimeReply,
    RuntimeResult, LABEL_DEPLOYMENT,
};
use crate::time::{Backoff, Timestamp};
use crate::wire::report::FACT_MAX_BYTES;
use crate::wire::text::bounded;
use crate::wire::{
    DeploymentName, DeploymentState, DeviceId, Heartbeat, InitName, Revision, RuntimeHealth,
    ServiceName,
};

#[cfg(feature = "bugs")]
pub use bugs::Bugs;
use deployment::Deployment;
pub use deployment::{provisioned_marker, PROVISIONED_PATH, SETUP_SCRIPT_PATH};

/// How long a setup script may run unless [`Config::setup_timeout`] says.
pub const DEFAULT_SETUP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a finished `per_run` revision's containers are kept unless
/// [`Config::run_retention`] says.
pub const DEFAULT_RUN_RETENTION: Duration = Duration::from_secs(24 * 3600);
pub use gc::ImageGcPolicy;
pub use spec::{fnv1a64, init_container_spec, service_container_spec, service_spec_hash};

/// What the agent's shell learned about its device at start, reported in
/// every [`Heartbeat`]. The reconciler never looks at the host itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFacts {
    /// The CPU architecture as Rust names it: `"aarch64"`, `"x86_64"`...
    pub arch: String,
    /// The operating system as a person reads it, e.g.
    /// `"Debian GNU/Linux 12 (bookworm)"`.
    pub os: String,
    /// The kernel release, e.g. `"6.1.0-rpi7-rpi-v8"`; empty when unknown.
    pub kernel: String,
}

impl DeviceFacts {
    /// Each fact cut to [`FACT_MAX_BYTES`], without surrounding whitespace.
    fn bounded(&self) -> Self {
        let cut = |fact: &str| bounded(fact.trim(), FACT_MAX_BYTES);
        Self {
            arch: cut(&self.arch),
            os: cut(&self.os),
            kernel: cut(&self.kernel),
        }
    }
}

/// The reconciler's tunables. Defaults suit a Raspberry-Pi class device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    device: DeviceId,
    agent_version: String,
    facts: DeviceFacts,
    tick_interval: Duration,
    heartbeat_interval: Duration,
    retry_backoff: Backoff,
    restart_backoff: Backoff,
    restart_reset_after: Duration,
    runtime_backoff: Backoff,
    libpod_race_retry: Duration,
    pull_timeout: Duration,
    pull_progress_interval: Duration,
    image_gc: ImageGcPolicy,
    run_retention: Duration,
    setup_timeout: Duration,
    #[cfg(feature = "bugs")]
    bugs: Bugs,
}

impl Config {
    /// Defaults for `device`: a 30 s liveness tick, heartbeats every 15 s,
    /// failed revisions retried after 10 s doubling to 5 min, crashed
    /// services restarted after 10 s doubling to 5 min (reset after 10 min
    /// of running), an unreachable runtime retried after 1 s doubling to 30 s,
    /// the libpod wait/inspect race retried once after 200 ms, a setup
    /// script given 5 min, a pull
    /// given up after 15 min (its progress asked for every 2 s), the
    /// exited containers of a `per_run` revision kept 24 h for their logs,
    /// and image garbage collection as
    /// [`ImageGcPolicy::default`]. No
    /// device facts: heartbeats leave them out until
    /// [`device_facts`](Self::device_facts) hands them in.
    pub fn new(device: DeviceId, agent_version: impl Into<String>) -> Self {
        Self {
            device,
            agent_version: agent_version.into(),
            facts: DeviceFacts::default(),
            tick_interval: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(15),
            retry_backoff: Backoff::new(Duration::from_secs(10), Duration::from_secs(300)),
            restart_backoff: Backoff::new(Duration::from_secs(10), Duration::from_secs(300)),
            restart_reset_after: Duration::from_secs(600),
            runtime_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
            libpod_race_retry: Duration::from_millis(200),
            pull_timeout: Duration::from_secs(900),
            pull_progress_interval: Duration::from_secs(2),
            image_gc: ImageGcPolicy::default(),
            run_retention: DEFAULT_RUN_RETENTION,
            setup_timeout: DEFAULT_SETUP_TIMEOUT,
            #[cfg(feature = "bugs")]
            bugs: Bugs::default(),
        }
    }

    /// How long a service's `setup_script` may run in its fresh container
    /// before the container is removed and the revision fails.
    pub fn setup_timeout(mut self, timeout: Duration) -> Self {
        self.setup_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How long the exited containers of a `per_run` revision are kept
    /// after the run (so `podfleet logs` still reads them) before they are
    /// removed; a newer revision removes them at once.
    pub fn run_retention(mut self, keep: Duration) -> Self {
        self.run_retention = keep;
        self
    }

    /// The device's architecture, OS and kernel, as the shell read them,
    /// for the heartbeats; each is cut to [`FACT_MAX_BYTES`].
    pub fn device_facts(mut self, facts: DeviceFacts) -> Self {
        self.facts = facts.bounded();
        self
    }

    /// How often running services are checked for liveness.
    pub fn tick_interval(mut self, every: Duration) -> Self {
        self.tick_interval = every.max(Duration::from_millis(1));
        self
    }

    /// How often a heartbeat is emitted.
    pub fn heartbeat_interval(mut self, every: Duration) -> Self {
        self.heartbeat_interval = every.max(Duration::from_millis(1));
        self
    }

    /// Backoff between attempts at a failed revision.
    pub fn retry_backoff(mut self, backoff: Backoff) -> Self {
        self.retry_backoff = backoff;
        self
    }

    /// Backoff between restarts of a service that keeps exiting.
    pub fn restart_backoff(mut self, backoff: Backoff) -> Self {
        self.restart_backoff = backoff;
        self
    }

    /// How long a restarted service must run before its backoff resets.
    pub fn restart_reset_after(mut self, after: Duration) -> Self {
        self.restart_reset_after = after;
        self
    }

    /// Backoff between attempts to reach an unreachable runtime.
    pub fn runtime_backoff(mut self, backoff: Backoff) -> Self {
        self.runtime_backoff = backoff;
        self
    }

    /// How long one image pull may take before the revision fails with
    /// [`PullFailure::Timeout`](crate::wire::PullFailure::Timeout) (and is
    /// retried with the revision's backoff).
    pub fn pull_timeout(mut self, timeout: Duration) -> Self {
        self.pull_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How often the runtime is asked how far a pull has got
    /// ([`Output::QueryPullProgress`]); each answer that changes the
    /// progress is a report, so this also bounds how often a pulling
    /// deployment reports.
    pub fn pull_progress_interval(mut self, every: Duration) -> Self {
        self.pull_progress_interval = every.max(Duration::from_millis(1));
        self
    }

    /// When and how hard unused images are removed ([`gc`]). The low mark
    /// is kept at or below the high one.
    pub fn image_gc(mut self, policy: ImageGcPolicy) -> Self {
        self.image_gc = ImageGcPolicy {
            low_percent: policy.low_percent.min(policy.high_percent),
            interval: policy.interval.max(Duration::from_millis(1)),
            ..policy
        };
        self
    }

    /// The image garbage collection policy in force.
    pub fn image_gc_policy(&self) -> &ImageGcPolicy {
        &self.image_gc
    }

    /// The device this reconciler manages.
    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    /// The agent version reported in heartbeats.
    pub fn agent_version(&self) -> &str {
        &self.agent_version
    }

    /// The device facts reported in heartbeats.
    pub fn facts(&self) -> &DeviceFacts {
        &self.facts
    }

    /// The liveness tick interval.
    pub fn tick(&self) -> Duration {
        self.tick_interval
    }

    /// The deliberate bugs switched on.
    #[cfg(feature = "bugs")]
    pub fn bugs(&self) -> Bugs {
        self.bugs
    }

    /// Switches on deliberate bugs so that tests can prove the invariant
    /// checks catch them.
    #[cfg(feature = "bugs")]
    pub fn inject_bugs(mut self, bugs: Bugs) -> Self {
        self.bugs = bugs;
        self
    }
}

/// Identifies a runtime operation handed out by [`Reconciler::poll_output`];
/// only the reconciler makes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CommandId(u64);

impl CommandId {
    /// The id's number, for logs and traces.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Something that happened, for [`Reconciler::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Input<'a> {
    /// A desired-state value arrived for `deployment` at KV `revision`.
    ///
    /// Bytes equal to what is applied or in flight change nothing on the
    /// runtime; a revision older than one already seen is ignored (watch
    /// redeliveries). Invalid bytes fail the deployment with the parse or
    /// validation error and leave its containers as they are.
    DesiredPut {
        /// The deployment the key names.
        deployment: DeploymentName,
        /// The KV revision of the value.
        revision: Revision,
        /// The value, as received.
        value: &'a [u8],
    },
    /// The desired-state key of `deployment` was deleted at KV `revision`:
    /// stop and remove all its containers, then clear its reported state.
    DesiredDelete {
        /// The deployment the key names.
        deployment: DeploymentName,
        /// The KV revision of the delete.
        revision: Revision,
    },
    /// The desired-state bucket holds exactly `present` for this device (the
    /// end of a watch's initial snapshot, after start-up or a reconnect):
    /// every other known deployment was deleted while the agent was not
    /// listening.
    DesiredResync {
        /// The deployments whose keys exist.
        present: &'a BTreeSet<DeploymentName>,
    },
    /// The result of the runtime operation `id`.
    RuntimeResult {
        /// The id [`Output::Runtime`] handed out.
        id: CommandId,
        /// What the runtime answered.
        result: RuntimeResult,
    },
    /// The runtime's answer to [`Output::QueryRuntimeVersion`]: its version
    /// as it states it (podman's `/version` `Version`), or why it did not
    /// say.
    ///
    /// The version is reported in every heartbeat from then on (cut to
    /// [`FACT_MAX_BYTES`]); a new or changed one is published at once. A
    /// failed answer leaves the version as it was and has it asked again
    /// after the next `list` that answers. An empty version is no answer.
    RuntimeVersion {
        /// The version, or the runtime's error.
        result: Result<String, RuntimeError>,
    },
    /// The runtime's answer to [`Output::QueryPullProgress`]: how far the
    /// pull `id` has got, or `None` when it cannot tell. The deployment's
    /// report says it while the pull runs.
    PullProgress {
        /// The id the query named.
        id: CommandId,
        /// The runtime's figures.
        progress: Option<PullProgress>,
    },
    /// Time has passed: act on every deadline at or before `now`.
    Timeout,
}

/// Something the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Output {
    /// Perform a runtime operation and hand its result back as
    /// [`Input::RuntimeResult`] with this id.
    Runtime {
        /// The id to answer with.
        id: CommandId,
        /// What to do.
        op: RuntimeOp,
    },
    /// Put `state` at `<device>.<deployment>` in the state bucket.
    PublishState {
        /// The deployment.
        deployment: DeploymentName,
        /// Its new state.
        state: DeploymentState,
    },
    /// Delete `<device>.<deployment>` from the state bucket.
    ClearState {
        /// The deployment.
        deployment: DeploymentName,
    },
    /// Ask the runtime its version and hand the answer back as
    /// [`Input::RuntimeVersion`]. Asked when the first `list` answers, and
    /// again when a `list` answers after the runtime was unreachable (it may
    /// have been upgraded) or after a failed ask; never while an ask is
    /// unanswered. Best effort: an ask left unanswered only keeps the
    /// version out of heartbeats.
    QueryRuntimeVersion,
    /// Ask the runtime how far the pull `id` (still in flight) has got and
    /// hand the answer back as [`Input::PullProgress`]; asked every
    /// [`Config::pull_progress_interval`] while the pull runs. Best effort:
    /// a query left unanswered only keeps the figures out of the report.
    QueryPullProgress {
        /// The pull's command.
        id: CommandId,
        /// Its image.
        image: String,
    },
    /// Put this heartbeat in the heartbeat bucket.
    Heartbeat(Heartbeat),
    /// Write this cache to disk, atomically, replacing the previous one.
    PersistCache(AgentCache),
}

/// Why the reconciler wants to be woken.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WakeReason {
    /// The periodic liveness tick.
    Tick,
    /// The periodic heartbeat.
    Heartbeat,
    /// Retry reaching the runtime after it failed to answer a `list`.
    RuntimeRetry,
    /// An init container's timeout.
    InitDeadline {
        /// The deployment.
        deployment: DeploymentName,
        /// The init container.
        init: InitName,
    },
    /// Time to ask how far a pull has got ([`Config::pull_progress_interval`]).
    PullProgress {
        /// The deployment.
        deployment: DeploymentName,
        /// The image.
        image: String,
    },
    /// A pull's deadline ([`Config::pull_timeout`]).
    PullDeadline {
        /// The deployment.
        deployment: DeploymentName,
        /// The image.
        image: String,
    },
    /// The second inspect after the libpod wait/inspect race.
    LibpodRaceRetry {
        /// The deployment.
        deployment: DeploymentName,
        /// The init container.
        init: InitName,
    },
    /// A setup script's timeout.
    SetupDeadline {
        /// The deployment.
        deployment: DeploymentName,
        /// The service.
        service: ServiceName,
    },
    /// The next attempt at a failed revision.
    RetryBackoff {
        /// The deployment.
        deployment: DeploymentName,
    },
    /// The next restart of a crashed service.
    RestartBackoff {
        /// The deployment.
        deployment: DeploymentName,
        /// The service.
        service: ServiceName,
    },
    /// The periodic image garbage collection pass.
    ImageGc,
}

/// When and why to wake the reconciler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wake {
    /// The instant.
    pub at: Timestamp,
    /// The reason, for traces.
    pub reason: WakeReason,
}

/// What the agent keeps on disk so that a restart, even without NATS,
/// resumes where it left off: for each deployment the newest valid revision
/// seen, whether it was applied, and its container ids. A revision seen but
/// not yet applied is rolled out after the restart, never forgotten, so a
/// crash cannot send the device back to an older revision.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AgentCache {
    /// Deployment name -> what was applied.
    pub deployments: BTreeMap<DeploymentName, CachedDeployment>,
    /// Deployment name -> the revision it was deleted at, so that a late
    /// redelivery of an older put cannot bring it back after a restart.
    #[serde(default)]
    pub tombstones: BTreeMap<DeploymentName, Revision>,
}

/// How many tombstones the cache keeps (the oldest revisions go first).
const MAX_TOMBSTONES: usize = 1024;

/// One deployment in the [`AgentCache`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedDeployment {
    /// The newest valid desired-state revision seen.
    pub revision: Revision,
    /// Its score's raw bytes, as received; `None` when the deployment was
    /// deleted and its teardown had not finished.
    pub score: Option<String>,
    /// Whether that revision was fully rolled out.
    pub applied: bool,
    /// Attempts at that revision so far (0 in caches written before the
    /// field existed).
    #[serde(default)]
    pub attempt: u32,
    /// Service name -> container id.
    pub container_ids: BTreeMap<ServiceName, String>,
    /// The images of the spec last fully rolled out (empty in caches
    /// written before image garbage collection).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied_images: Vec<String>,
    /// The images of the spec rolled out before that one, which garbage
    /// collection keeps too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_images: Vec<String>,
    /// `per_run`: the exit code of each service whose run has ended.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exit_codes: BTreeMap<ServiceName, i64>,
}

impl AgentCache {
    /// Decodes a cache file.
    ///
    /// # Errors
    /// The decoder's error; the caller should start without a cache, since
    /// the runtime's labels are enough to adopt healthy containers.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Encodes the cache.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self)
            .expect("a cache always serialises: its maps have string keys")
    }
}

/// Where the reconciler stands on learning the runtime's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VersionProbe {
    /// Not known since the runtime was last unreachable (or ever), or the
    /// last ask failed: ask when the next `list` answers.
    Wanted,
    /// [`Output::QueryRuntimeVersion`] is out and unanswered. `stale`: the
    /// runtime was unreachable since, so the answer may predate an upgrade
    /// and the version is wanted again after it.
    Asked { stale: bool },
    /// Answered since the runtime was last unreachable.
    Known,
}

/// Who is waiting for a command's result.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owner {
    /// The device-wide `list` of the liveness tick or start-up.
    Inventory,
    /// A deployment's job.
    Deployment(DeploymentName),
    /// Image garbage collection.
    ImageGc,
}

/// Where image garbage collection stands.
#[derive(Debug)]
struct ImageGc {
    /// A pass is wanted as soon as no rollout or teardown is under way.
    wanted: bool,
    /// When the next periodic pass is due.
    next_at: Timestamp,
    /// The pass under way: the `list_images` out, or the removal out and
    /// the ones still to do.
    pass: Option<(CommandId, VecDeque<gc::Removal>)>,
    /// Every image a deployment asked for that is still in the store, as
    /// far as the last pass saw: those no deployment keeps any more are
    /// removed.
    referenced: BTreeSet<String>,
}

/// The effects shared by all deployments: command ids, the output queue and
/// the ledger of who owns which command.
#[derive(Debug, Default)]
struct Effects {
    next_id: u64,
    outputs: VecDeque<Output>,
    /// Who waits for each command, and whether it can change the runtime.
    owners: BTreeMap<CommandId, (Owner, bool)>,
    /// Bumped whenever a mutation's result comes back, to spot stale lists.
    mutation_seq: u64,
}

impl Effects {
    fn issue(&mut self, owner: Owner, op: RuntimeOp) -> CommandId {
        self.next_id += 1;
        let id = CommandId(self.next_id);
        self.owners.insert(id, (owner, op.is_mutation()));
        self.outputs.push_back(Output::Runtime { id, op });
        id
    }
}

/// The device's reconciler. See the [module docs](self) for the drive loop.
#[derive(Debug)]
pub struct Reconciler {
    config: Config,
    started_at: Timestamp,
    /// The latest `now` handed in: time never goes backwards.
    now: Timestamp,
    effects: Effects,
    deployments: BTreeMap<DeploymentName, Deployment>,
    /// Whether the start-up `list` has answered.
    inventory_ready: bool,
    /// The in-flight device-wide `list` and the mutation count when it was issued.
    inventory_list: Option<(CommandId, u64)>,
    /// A liveness pass is wanted as soon as no `list` is in flight.
    liveness_wanted: bool,
    next_tick: Timestamp,
    next_heartbeat: Timestamp,
    runtime_health: RuntimeHealth,
    runtime_failures: u32,
    runtime_retry_at: Option<Timestamp>,
    /// The runtime's version, as it last stated it.
    runtime_version: Option<String>,
    version_probe: VersionProbe,
    cache_dirty: bool,
    last_cache: Option<AgentCache>,
    /// After a resync, the next list also tears down containers of
    /// deployments nobody wants any more.
    orphan_sweep: bool,
    /// The last revision of each deployment torn down, so that a late
    /// redelivery of an older put cannot bring it back.
    tombstones: BTreeMap<DeploymentName, Revision>,
    image_gc: ImageGc,
}

impl Reconciler {
    /// A reconciler for `config.device()`, resuming from `cache` if the agent
    /// has one. Its first output is a `list` of the managed containers.
    pub fn new(config: Config, cache: Option<AgentCache>, now: Timestamp) -> Self {
        let mut deployments = BTreeMap::new();
        for (name, cached) in cache.iter().flat_map(|c| c.deployments.iter()) {
            if let Some(deployment) = Deployment::from_cache(name.clone(), cached) {
                deployments.insert(name.clone(), deployment);
            }
        }
        let tombstones = cache
            .as_ref()
            .map(|c| c.tombstones.clone())
            .unwrap_or_default();
        let image_gc = ImageGc {
            // Once the first `list` answers: whatever an earlier run left.
            wanted: true,
            next_at: now + config.image_gc.interval,
            pass: None,
            referenced: deployments
                .values()
                .flat_map(Deployment::images_referenced)
                .map(str::to_owned)
                .collect(),
        };
        let mut reconciler = Self {
            image_gc,
            next_tick: now + config.tick_interval,
            next_heartbeat: now,
            config,
            started_at: now,
            now,
            effects: Effects::default(),
            deployments,
            inventory_ready: false,
            inventory_list: None,
            liveness_wanted: true,
            runtime_health: RuntimeHealth::Ok,
            runtime_failures: 0,
            runtime_retry_at: None,
            runtime_version: None,
            version_probe: VersionProbe::Wanted,
            cache_dirty: false,
            last_cache: cache,
            orphan_sweep: false,
            tombstones,
        };
        reconciler.start_inventory_list();
        reconciler
    }

    /// Handles one input at `now`; drain [`poll_output`](Self::poll_output)
    /// afterwards. A `now` earlier than one handed in before is taken as
    /// that one.
    pub fn handle(&mut self, now: Timestamp, input: Input<'_>) {
        let now = now.max(self.now);
        self.now = now;
        match input {
            Input::DesiredPut {
                deployment,
                revision,
                value,
            } => self.desired_put(now, deployment, revision, value),
            Input::DesiredDelete {
                deployment,
                revision,
            } => self.desired_delete(now, deployment, revision),
            Input::DesiredResync { present } => self.desired_resync(now, present),
            Input::RuntimeResult { id, result } => self.runtime_result(now, id, result),
            Input::RuntimeVersion { result } => self.on_runtime_version(now, result),
            Input::PullProgress { id, progress } => self.on_pull_progress(now, id, progress),
            Input::Timeout => self.timeout(now),
        }
        self.start_image_gc();
    }

    fn desired_put(
        &mut self,
        now: Timestamp,
        deployment: DeploymentName,
        revision: Revision,
        bytes: &[u8],
    ) {
        if let Some(&tombstone) = self.tombstones.get(&deployment) {
            if revision <= tombstone {
                return;
            }
        }
        let entry = self
            .deployments
            .entry(deployment.clone())
            .or_insert_with(|| Deployment::new(deployment.clone()));
        entry.desired_put(revision, bytes);
        // Only a valid revision lifts the tombstone: after an invalid one, a
        // late redelivery of what was deleted must still find it, after a
        // restart too (an invalid-only deployment is not in the cache).
        if entry.has_target() {
            self.tombstones.remove(&deployment);
        }
        self.drive(now, &deployment);
    }

    fn desired_delete(&mut self, now: Timestamp, deployment: DeploymentName, revision: Revision) {
        if self
            .tombstones
            .get(&deployment)
            .is_some_and(|t| revision <= *t)
        {
            return;
        }
        // Even an unknown deployment is torn down: after a restart without
        // its cache the agent may not know what it left running.
        let entry = self
            .deployments
            .entry(deployment.clone())
            .or_insert_with(|| Deployment::new(deployment.clone()));
        entry.desired_delete(Some(revision));
        self.drive(now, &deployment);
    }

    fn desired_resync(&mut self, now: Timestamp, present: &BTreeSet<DeploymentName>) {
        let gone: Vec<DeploymentName> = self
            .deployments
            .keys()
            .filter(|name| !present.contains(*name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(entry) = self.deployments.get_mut(&name) {
                entry.desired_delete(None);
                self.drive(now, &name);
            }
        }
        // A clear published just before a crash or a partition may never
        // have reached the bucket; deleting a state key again is harmless.
        for name in self.tombstones.keys() {
            if !present.contains(name) && !self.deployments.contains_key(name) {
                self.effects.outputs.push_back(Output::ClearState {
                    deployment: name.clone(),
                });
            }
        }
        self.orphan_sweep = true;
        self.liveness_wanted = true;
        self.start_inventory_list();
    }

    fn runtime_result(&mut self, now: Timestamp, id: CommandId, result: RuntimeResult) {
        let Some((owner, mutation)) = self.effects.owners.remove(&id) else {
            return;
        };
        if mutation {
            self.effects.mutation_seq += 1;
        }
        if result.is_ok() || matches!(&result, Err(e) if e.kind != RuntimeErrorKind::Unavailable) {
            self.set_runtime_health(now, RuntimeHealth::Ok);
        }
        match owner {
            Owner::Inventory => self.on_inventory(now, id, result),
            Owner::ImageGc => self.on_image_gc(id, result),
            Owner::Deployment(name) => {
                if let Err(e) = &result {
                    if e.kind == RuntimeErrorKind::Unavailable {
                        self.set_runtime_health(
                            now,
                            RuntimeHealth::Unreachable {
                                error: e.message.clone(),
                            },
                        );
                    }
                }
                if let Some(entry) = self.deployments.get_mut(&name) {
                    if mutation {
                        entry.last_mutation_seq = self.effects.mutation_seq;
                    }
                    entry.on_result(now, &self.config, id, result);
                }
                self.drive(now, &name);
            }
        }
    }

    fn on_runtime_version(&mut self, now: Timestamp, result: Result<String, RuntimeError>) {
        let version = result
            .ok()
            .map(|v| bounded(v.trim(), FACT_MAX_BYTES))
            .filter(|v| !v.is_empty());
        self.version_probe = match (self.version_probe, &version) {
            (VersionProbe::Asked { stale: false }, Some(_)) => VersionProbe::Known,
            (VersionProbe::Asked { .. }, _) => VersionProbe::Wanted,
            // Nobody asked: a version all the same, but no answer to wait for.
            (probe, _) => probe,
        };
        if let Some(version) = version {
            if self.runtime_version.as_ref() != Some(&version) {
                self.runtime_version = Some(version);
                self.emit_heartbeat(now);
            }
        }
    }

    fn on_pull_progress(&mut self, now: Timestamp, id: CommandId, progress: Option<PullProgress>) {
        let Some((Owner::Deployment(name), _)) = self.effects.owners.get(&id) else {
            return;
        };
        let name = name.clone();
        if let Some(entry) = self.deployments.get_mut(&name) {
            entry.on_pull_progress(id, progress);
        }
        self.drive(now, &name);
    }

    fn ask_runtime_version(&mut self) {
        if self.version_probe == VersionProbe::Wanted {
            self.version_probe = VersionProbe::Asked { stale: false };
            self.effects.outputs.push_back(Output::QueryRuntimeVersion);
        }
    }

    fn timeout(&mut self, now: Timestamp) {
        if now >= self.next_heartbeat {
            self.emit_heartbeat(now);
        }
        if now >= self.next_tick {
            self.next_tick = now + self.config.tick_interval;
            self.liveness_wanted = true;
        }
        if self.runtime_retry_at.is_some_and(|at| now >= at) {
            self.runtime_retry_at = None;
            self.liveness_wanted = true;
        }
        if now >= self.image_gc.next_at {
            self.image_gc.next_at = now + self.config.image_gc.interval;
            self.image_gc.wanted = true;
        }
        let names: Vec<DeploymentName> = self.deployments.keys().cloned().collect();
        for name in names {
            if let Some(entry) = self.deployments.get_mut(&name) {
                if entry.on_timeout(now, &self.config) {
                    self.liveness_wanted = true;
                }
                let interval = self.config.pull_progress_interval;
                if let Some((id, image)) = entry.due_progress_query(now, interval) {
                    self.effects
                        .outputs
                        .push_back(Output::QueryPullProgress { id, image });
                }
            }
            self.drive(now, &name);
        }
        self.start_inventory_list();
    }

    /// The next thing to do, or `None` when there is nothing until new input.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        if let Some(output) = self.effects.outputs.pop_front() {
            return Some(output);
        }
        if self.cache_dirty {
            self.cache_dirty = false;
            let cache = self.cache();
            if self.last_cache.as_ref() != Some(&cache) {
                self.last_cache = Some(cache.clone());
                return Some(Output::PersistCache(cache));
            }
        }
        None
    }

    /// When to hand in [`Input::Timeout`] next, and why. There is always a
    /// next deadline: at least the next heartbeat.
    #[must_use]
    pub fn poll_timeout(&self) -> Wake {
        let mut best = Wake {
            at: self.next_heartbeat,
            reason: WakeReason::Heartbeat,
        };
        let mut consider = |wake: Wake| {
            if wake.at < best.at {
                best = wake;
            }
        };
        if self.inventory_ready {
            consider(Wake {
                at: self.next_tick,
                reason: WakeReason::Tick,
            });
        }
        if let Some(at) = self.runtime_retry_at {
            consider(Wake {
                at,
                reason: WakeReason::RuntimeRetry,
            });
        }
        if self.inventory_ready && self.config.image_gc.enabled {
            consider(Wake {
                at: self.image_gc.next_at,
                reason: WakeReason::ImageGc,
            });
        }
        if self.inventory_ready {
            for wake in self.deployments.values().filter_map(Deployment::next_wake) {
                // A due restart asks for a list; while one is in flight or
                // scheduled, waking again would only spin.
                let restart = matches!(wake.reason, WakeReason::RestartBackoff { .. });
                let list_coming = self.inventory_list.is_some() || self.runtime_retry_at.is_some();
                if !(restart && list_coming) {
                    consider(wake);
                }
            }
        }
        best
    }

    /// The device's heartbeat as of `now` (also the body of a `ping` reply).
    pub fn heartbeat(&self, now: Timestamp) -> Heartbeat {
        Heartbeat {
            device_id: self.config.device.clone(),
            agent_version: self.config.agent_version.clone(),
            uptime_s: now.saturating_since(self.started_at).as_secs(),
            deployments: u32::try_from(self.deployments.len()).unwrap_or(u32::MAX),
            runtime: self.runtime_health.clone(),
            arch: self.config.facts.arch.clone(),
            os: self.config.facts.os.clone(),
            kernel: self.config.facts.kernel.clone(),
            runtime_version: self.runtime_version.clone(),
            score_features: crate::wire::SCORE_FEATURES
                .iter()
                .map(|f| (*f).to_owned())
                .collect(),
        }
    }

    /// The last state reported for `deployment`; `None` once it is being
    /// torn down, when its last report no longer holds.
    pub fn deployment_state(&self, deployment: &DeploymentName) -> Option<&DeploymentState> {
        self.deployments
            .get(deployment)
            .filter(|d| !d.is_deleted())?
            .last_report()
    }

    /// The id of the container running `service` of `deployment`, for the
    /// `logs` and `exec` commands.
    pub fn service_container(&self, deployment: &DeploymentName, service: &str) -> Option<&str> {
        self.deployments.get(deployment)?.container_id(service)
    }

    /// The deployments this reconciler knows, in name order.
    pub fn deployments(&self) -> impl Iterator<Item = &DeploymentName> {
        self.deployments.keys()
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn cache(&self) -> AgentCache {
        AgentCache {
            deployments: self
                .deployments
                .iter()
                .filter_map(|(name, d)| Some((name.clone(), d.cached()?)))
                .collect(),
            tombstones: self.tombstones.clone(),
        }
    }

    /// Lets `name` make progress, publishes its report if it changed, and
    /// forgets it once it has been torn down.
    fn drive(&mut self, now: Timestamp, name: &DeploymentName) {
        let Some(entry) = self.deployments.get_mut(name) else {
            return;
        };
        if self.inventory_ready {
            entry.advance(now, &self.config, &mut self.effects);
        }
        if entry.take_cache_dirty() {
            self.cache_dirty = true;
        }
        if entry.take_images_changed() {
            self.image_gc.wanted = true;
        }
        // Called on every input: allocate only for an image not seen yet.
        for image in entry.images_referenced() {
            if !self.image_gc.referenced.contains(image) {
                self.image_gc.referenced.insert(image.to_owned());
            }
        }
        if entry.is_gone() {
            self.image_gc.wanted = true;
            // Never lower a tombstone: a deployment the orphan sweep found
            // again has seen no revision of its own.
            let tombstone = self.tombstones.entry(name.clone()).or_default();
            *tombstone = (*tombstone).max(entry.latest_seen());
            if self.tombstones.len() > MAX_TOMBSTONES {
                let oldest = self
                    .tombstones
                    .iter()
                    .min_by_key(|(_, revision)| **revision)
                    .map(|(name, _)| name.clone());
                if let Some(oldest) = oldest {
                    self.tombstones.remove(&oldest);
                }
            }
            self.deployments.remove(name);
            self.effects.outputs.push_back(Output::ClearState {
                deployment: name.clone(),
            });
            self.cache_dirty = true;
            return;
        }
        if let Some(state) = entry.report_if_changed(&self.config) {
            self.effects.outputs.push_back(Output::PublishState {
                deployment: name.clone(),
                state,
            });
        }
    }

    /// The images no deployment may lose.
    fn images_to_keep(&self) -> Vec<&str> {
        if bug!(self.config, gc_ignores_keep) {
            return Vec::new();
        }
        self.deployments
            .values()
            .flat_map(Deployment::images_to_keep)
            .collect()
    }

    /// Starts a garbage collection pass if one is wanted and nothing is
    /// being rolled out or torn down (a pass never races a rollout for an
    /// image).
    fn start_image_gc(&mut self) {
        // Called after every input: the walk over the deployments comes last.
        if !self.config.image_gc.enabled
            || !self.image_gc.wanted
            || self.image_gc.pass.is_some()
            || !self.inventory_ready
            || self.runtime_health != RuntimeHealth::Ok
            || self.deployments.values().any(Deployment::is_busy)
        {
            return;
        }
        self.image_gc.wanted = false;
        let id = self.effects.issue(Owner::ImageGc, RuntimeOp::ListImages);
        self.image_gc.pass = Some((id, VecDeque::new()));
    }

    fn on_image_gc(&mut self, id: CommandId, result: RuntimeResult) {
        let Some((expected, mut rest)) = self.image_gc.pass.take() else {
            return;
        };
        if expected != id {
            self.image_gc.pass = Some((expected, rest));
            return;
        }
        if let Ok(RuntimeReply::ImagesListed { images, disk }) = &result {
            let keep = self.images_to_keep();
            let referenced: Vec<&str> = self
                .image_gc
                .referenced
                .iter()
                .map(String::as_str)
                .collect();
            rest = gc::choose(images, *disk, &keep, &referenced, &self.config.image_gc).into();
            // Forget what the store no longer has, so the set stays small.
            let present: BTreeSet<String> = self
                .image_gc
                .referenced
                .iter()
                .filter(|r| images.iter().any(|i| gc::named_by([r.as_str()], &i.names)))
                .cloned()
                .collect();
            self.image_gc.referenced = present;
        }
        // Any other answer (a removal done, refused because a container
        // uses the image, already gone; a failed list) moves on: the next
        // pass looks again.
        self.next_image_removal(rest);
    }

    /// Issues the next removal of a pass, unless a rollout began since the
    /// pass did (then the rest waits for the next pass) or the image is now
    /// kept.
    fn next_image_removal(&mut self, mut rest: VecDeque<gc::Removal>) {
        if self.deployments.values().any(Deployment::is_busy) {
            self.image_gc.wanted = !rest.is_empty();
            return;
        }
        let keep = self.images_to_keep();
        while let Some(removal) = rest.pop_front() {
            if gc::named_by(keep.iter().copied(), &removal.names) {
                continue;
            }
            let op = RuntimeOp::RemoveImage { id: removal.id };
            let id = self.effects.issue(Owner::ImageGc, op);
            self.image_gc.pass = Some((id, rest));
            return;
        }
    }

    fn start_inventory_list(&mut self) {
        if !self.liveness_wanted || self.inventory_list.is_some() || self.runtime_retry_at.is_some()
        {
            return;
        }
        self.liveness_wanted = false;
        let id = self.effects.issue(Owner::Inventory, RuntimeOp::List);
        self.inventory_list = Some((id, self.effects.mutation_seq));
    }

    fn on_inventory(&mut self, now: Timestamp, id: CommandId, result: RuntimeResult) {
        let Some((expected, seq_at_issue)) = self.inventory_list else {
            return;
        };
        if expected != id {
            return;
        }
        self.inventory_list = None;
        let containers = match result {
            Ok(RuntimeReply::Listed { containers }) => containers,
            Ok(other) => {
                self.runtime_unreachable(now, format!("list answered with {other:?}"));
                return;
            }
            Err(e) => {
                self.runtime_unreachable(now, e.message);
                return;
            }
        };
        self.runtime_failures = 0;
        self.set_runtime_health(now, RuntimeHealth::Ok);
        self.ask_runtime_version();
        self.inventory_ready = true;
        let mut by_deployment: BTreeMap<&str, Vec<&ContainerSummary>> = BTreeMap::new();
        for c in &containers {
            if let Some(d) = c.label(LABEL_DEPLOYMENT) {
                by_deployment.entry(d).or_default().push(c);
            }
        }
        if std::mem::take(&mut self.orphan_sweep) {
            for orphan in by_deployment.keys() {
                let Ok(name) = DeploymentName::new(*orphan) else {
                    continue;
                };
                if let std::collections::btree_map::Entry::Vacant(slot) =
                    self.deployments.entry(name.clone())
                {
                    let mut entry = Deployment::new(name);
                    entry.desired_delete(None);
                    slot.insert(entry);
                }
            }
        }
        let names: Vec<DeploymentName> = self.deployments.keys().cloned().collect();
        for name in names {
            if let Some(entry) = self.deployments.get_mut(&name) {
                let mine = by_deployment
                    .get(name.as_str())
                    .map(Vec::as_slice)
                    .unwrap_or(&[]);
                entry.on_inventory(now, &self.config, mine, seq_at_issue);
            }
            self.drive(now, &name);
        }
        self.start_inventory_list();
    }

    fn runtime_unreachable(&mut self, now: Timestamp, error: String) {
        let delay = self.config.runtime_backoff.delay(self.runtime_failures);
        self.runtime_failures = self.runtime_failures.saturating_add(1);
        self.runtime_retry_at = Some(now + delay);
        self.set_runtime_health(now, RuntimeHealth::Unreachable { error });
    }

    fn set_runtime_health(&mut self, now: Timestamp, health: RuntimeHealth) {
        if health != RuntimeHealth::Ok {
            // It may come back upgraded: ask again once it answers.
            self.version_probe = match self.version_probe {
                VersionProbe::Asked { .. } => VersionProbe::Asked { stale: true },
                _ => VersionProbe::Wanted,
            };
        }
        if self.runtime_health != health {
            let was_ok = self.runtime_health == RuntimeHealth::Ok;
            let is_ok = health == RuntimeHealth::Ok;
            self.runtime_health = health;
            // A change between reachable and unreachable is news worth a heartbeat now.
            if was_ok != is_ok {
                self.emit_heartbeat(now);
            }
        }
    }

    fn emit_heartbeat(&mut self, now: Timestamp) {
        self.next_heartbeat = now + self.config.heartbeat_interval;
        let heartbeat = self.heartbeat(now);
        self.effects.outputs.push_back(Output::Heartbeat(heartbeat));
    }
}
