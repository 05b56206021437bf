//! The simulated world around real agents, shared by both network tiers.
//!
//! Each device runs the production agent's event loop
//! ([`podfleet_agent::event_loop::run`]) with simulated parts: a link to the
//! fake [`Broker`] over whatever byte streams the tier dials, the fake
//! container runtime behind a fault injector, a disk that is the only thing
//! surviving an agent crash, and [`SimClock`]. The driver ([`run_plan`])
//! walks a [`Plan`], applies its faults through the tier, heals, and checks
//! the safety invariants (the shared [`Oracle`], on every runtime operation
//! and report) and the liveness ones ([`check_device`], shared with the
//! discrete tier). A network tier ([`Network`]) only says how time
//! passes and how hosts and links fail: turmoil's lockstep network or the
//! discrete-event fleet scheduler.
//!
//! - this module: the clock, the world's trace, a device and its faulty
//!   runtime and disk, and what a tier must provide;
//! - `link`: a device's software, the agent loop and its link to the broker,
//!   which drives the production NATS session;
//! - `operator`: the operator host (an administrator's writes and pings);
//! - `controller`: the fleet controller host;
//! - `driver`: [`run_plan`], healing, liveness and quiet;
//! - `checks`: [`check_device`] and [`check_report_fields`];
//! - `shrink`: [`shrink`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use podfleet_agent::event_loop::{CacheError, CacheStore, Clock};
use podfleet_agent::runtime::{ContainerRuntime, ExecOutput, LogsOutput};
use podfleet_core::fleet::{
    DeviceRecord, FleetDeployment, FleetDeploymentStatus, Labels, Selector, Target,
};
use podfleet_core::reconciler::{fnv1a64, service_container_spec, AgentCache, Bugs};
use podfleet_core::runtime::{
    service_container_name, ContainerSpec, ContainerState, RuntimeError, RuntimeErrorKind,
    RuntimeOp, RuntimeReply, RuntimeResult, LABEL_DEPLOYMENT, LABEL_INIT, LABEL_SERVICE,
};
use podfleet_core::time::Timestamp;
use podfleet_core::wire::names::{
    DEPLOYMENTS_BUCKET, DESIRED_BUCKET, DEVICES_BUCKET, STATE_BUCKET, STATUS_BUCKET,
};
use podfleet_core::wire::{
    CommandReply, CommandSubject, DeploymentName, DeploymentState, DeviceId, FailureCause, Phase,
    PingReply, PodmanV0Score, Revision, Verb,
};
use podfleet_testkit::SharedFake;
use podfleet_testkit::{
    describe_result, FakeContainer, FakeRuntime, Invariant, Oracle, RuntimeEvent, Violation,
};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use crate::broker::{Broker, Frame, IDLE_TIMEOUT};
use crate::plan::{
    fleet_manifest, outlook, oversized_score, Action, Outlook, Plan, RuntimeTrouble,
};

mod checks;
mod controller;
mod driver;
mod link;
mod operator;
mod shrink;

pub use checks::{check_device, check_report_fields, DeviceView};
pub use controller::fleet_controller;
pub use driver::run_plan;
pub use link::device_software;
pub use operator::{operator, OperatorCommand};
pub use shrink::shrink;

/// How long after healing every deployment must have converged: the retry
/// backoff cap (5 min) twice over, plus ticks and reconnects.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(12 * 60);
/// How long a converged device must then stay still: three liveness ticks.
pub const QUIET_PERIOD: Duration = Duration::from_secs(3 * 30);
/// How long a write waits for its acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between reconnect attempts.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Time in the simulation: turmoil's simulated clock inside turmoil hosts,
/// the paused tokio clock in the fleet tier.
#[derive(Debug, Clone)]
pub enum SimClock {
    /// turmoil's `sim_elapsed`, or outside a host the driver's last step.
    Turmoil(Arc<AtomicU64>),
    /// Paused tokio time since this instant.
    Tokio(tokio::time::Instant),
}

impl Clock for SimClock {
    fn now(&self) -> Timestamp {
        let ms = match self {
            SimClock::Turmoil(driver) => turmoil::sim_elapsed()
                .map_or_else(|| driver.load(Ordering::SeqCst), |d| d.as_millis() as u64),
            SimClock::Tokio(origin) => origin.elapsed().as_millis() as u64,
        };
        Timestamp::from_millis(ms)
    }

    fn sleep_until(&self, at: Timestamp) -> impl Future<Output = ()> + Send {
        tokio::time::sleep(at.saturating_since(self.now()))
    }
}

/// The coverage probes: situations worth reaching. A default batch that
/// never reaches one fails, so the simulator cannot quietly stop exploring.
pub const PROBES: [&str; 28] = [
    "slow runtime",
    "libpod race hit",
    "retry backoff cap reached",
    "crash loop restarted",
    "init container timed out",
    "init container failed",
    "adoption after cache loss",
    "partition during an upgrade",
    "create failed but exists",
    "resync after reconnect",
    "duplicate delivery",
    "stop killed after grace",
    "delete while offline",
    "command answered",
    "older revision delivered late",
    "agent restarted into a slow runtime",
    "agent restarted into an unavailable runtime",
    "oversized value quoted cut",
    "report summarised",
    "fleet key deleted",
    "fleet deployment converged",
    "image pulled",
    "pull failed",
    "setup script failed",
    "setup script timed out",
    "unprovisioned container found",
    "run completed",
    "container verified",
];

#[derive(Debug, Default)]
struct WorldState {
    hash: u64,
    events: u64,
    keep_all: bool,
    lines: VecDeque<String>,
    violations: Vec<Violation>,
    probes: BTreeMap<&'static str, u64>,
    /// State keys the fleet controller deleted as orphans.
    collected: BTreeSet<String>,
}

/// What every part of a run reports into: the trace, violations, probes.
#[derive(Debug, Clone, Default)]
pub struct World(Arc<Mutex<WorldState>>);

impl World {
    /// A world that keeps every trace line (for `SIM_SEED`), or the last few.
    pub fn new(keep_all: bool) -> Self {
        let world = World::default();
        lock(&world.0).keep_all = keep_all;
        world
    }

    /// Folds one event into the trace.
    pub fn trace(&self, now: Timestamp, who: &str, what: impl std::fmt::Display) {
        let line = format!("{:>10} {who:<8} {what}", now.to_string());
        let mut w = lock(&self.0);
        let mut bytes = w.hash.to_le_bytes().to_vec();
        bytes.extend_from_slice(line.as_bytes());
        w.hash = fnv1a64(&bytes);
        w.events += 1;
        w.lines.push_back(line);
        if !w.keep_all && w.lines.len() > 60 {
            w.lines.pop_front();
        }
    }

    /// Records an invariant violation.
    pub fn violation(&self, violation: Violation) {
        lock(&self.0).violations.push(violation);
    }

    /// Counts a probe.
    pub fn probe(&self, name: &'static str) {
        *lock(&self.0).probes.entry(name).or_default() += 1;
    }

    /// Notes that the fleet controller deleted the state key `key` because
    /// it had outlived its desired key.
    pub fn state_collected(&self, key: String) {
        lock(&self.0).collected.insert(key);
    }

    /// Whether the fleet controller deleted the state key `key`.
    pub fn was_collected(&self, key: &str) -> bool {
        lock(&self.0).collected.contains(key)
    }
}

/// A device's fault queue: op name -> (takes effect anyway, error kind).
type FaultQueue = BTreeMap<String, VecDeque<(bool, RuntimeErrorKind)>>;

/// The last report an agent handed its publisher for one deployment, and
/// what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handed {
    /// The state, or `None` for a clear.
    pub state: Option<DeploymentState>,
    /// Whether the broker has it.
    pub delivery: Delivery,
}

/// What became of a report handed to the publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Its write is on its way, since then; `retry` when the same report
    /// failed before.
    InFlight {
        /// When it was handed.
        since: Timestamp,
        /// Whether it is a retry of a write that failed.
        retry: bool,
    },
    /// The broker acknowledged it.
    Stored,
    /// The write failed, for this reason.
    Failed(String),
}

/// What the running agent process has been through since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Epoch {
    /// How many events the fake runtime had recorded when it started.
    pub events: usize,
    /// Runtime operations that failed since.
    pub errors: u64,
}

/// Everything of one device that outlives its agent process.
#[derive(Debug, Clone)]
pub struct Device {
    /// Its index in the plan.
    pub index: u32,
    /// Its id.
    pub id: DeviceId,
    /// Its podman.
    pub fake: SharedFake<SimClock>,
    /// Its disk: the agent cache.
    pub disk: Arc<Mutex<Option<AgentCache>>>,
    faults: Arc<Mutex<FaultQueue>>,
    oracle: Arc<Mutex<Oracle>>,
    /// The last report the agent handed its publisher per deployment.
    published: Arc<Mutex<BTreeMap<String, Handed>>>,
    world: World,
    bugs: Bugs,
    /// A deliberately wrong adapter: it watches every device's keys.
    pub watch_everyone: bool,
    /// Deliberate bugs in the NATS session its link drives.
    pub session_bugs: podfleet_core::session::Bugs,
    /// Until when, and by how much, every runtime operation is slowed.
    slow: Arc<Mutex<Option<(Timestamp, Duration)>>>,
    /// Until when, and how, the runtime misbehaves after an agent restart.
    trouble: Arc<Mutex<Option<(Timestamp, RuntimeTrouble)>>>,
    /// Since the agent process last started.
    epoch: Arc<Mutex<Epoch>>,
}

/// The device id of plan index `index`.
pub fn device_id(index: u32) -> DeviceId {
    DeviceId::new(format!("dev-{index}")).expect("dev-N is a valid device id")
}

/// Catalogue images a device does not have when it starts: only its
/// registry does, so the first rollout onto one pulls it (while the old
/// revision runs). [`plan::GOOD_IMAGES`](crate::plan::GOOD_IMAGES) has
/// one, and the registry rollouts of the plans use the other.
pub const REGISTRY_ONLY_IMAGES: [&str; 2] = [
    podfleet_testkit::images::SLOW_STOP,
    podfleet_testkit::images::A_2,
];

/// A runtime with the images the plans use: the test kit's catalogue, with
/// [`REGISTRY_ONLY_IMAGES`] in the registry only; and the containers of
/// the device's base system ([`podfleet_testkit::base_system`]), which
/// `no_launch` scores verify and nothing of podfleet's may touch.
pub fn fake_runtime() -> FakeRuntime {
    let mut runtime = podfleet_testkit::images::runtime();
    for image in REGISTRY_ONLY_IMAGES {
        runtime.remove_image(image);
    }
    podfleet_testkit::base_system::install(&mut runtime);
    runtime
}

impl Device {
    /// A device with an empty runtime and disk.
    pub fn new(index: u32, clock: SimClock, world: World, bugs: Bugs) -> Self {
        Self {
            index,
            id: device_id(index),
            fake: SharedFake::new(fake_runtime(), clock),
            disk: Arc::default(),
            faults: Arc::default(),
            oracle: Arc::default(),
            published: Arc::default(),
            world,
            bugs,
            watch_everyone: false,
            session_bugs: podfleet_core::session::Bugs::default(),
            slow: Arc::default(),
            trouble: Arc::default(),
            epoch: Arc::default(),
        }
    }

    /// The last state the agent handed its publisher, per deployment
    /// (cleared ones left out).
    pub fn published(&self) -> BTreeMap<String, DeploymentState> {
        lock(&self.published)
            .iter()
            .filter_map(|(k, h)| Some((k.clone(), h.state.clone()?)))
            .collect()
    }

    fn who(&self) -> String {
        self.id.to_string()
    }

    fn check(&self, f: impl FnOnce(&Oracle, &FakeRuntime, &mut Vec<Violation>)) {
        let mut found = Vec::new();
        let oracle = lock(&self.oracle);
        self.fake.with(|fake| f(&oracle, fake, &mut found));
        drop(oracle);
        for v in found {
            self.world.violation(v.on(&self.id));
        }
    }
}

/// The device's disk as the agent sees it.
struct SimDisk(Arc<Mutex<Option<AgentCache>>>);

impl CacheStore for SimDisk {
    fn load(&mut self) -> Result<Option<AgentCache>, CacheError> {
        Ok(lock(&self.0).clone())
    }
    fn store(&mut self, cache: &AgentCache) -> Result<(), CacheError> {
        *lock(&self.0) = Some(cache.clone());
        Ok(())
    }
}

/// The fake runtime behind the plan's API faults, checking every operation
/// against the oracle and tracing it.
#[derive(Debug, Clone)]
struct FaultyRuntime {
    device: Device,
    clock: SimClock,
}

impl FaultyRuntime {
    fn trace(&self, what: impl std::fmt::Display) {
        self.device
            .world
            .trace(self.clock.now(), &self.device.who(), what);
    }
}

/// Whether `op` asks a container for the marker of its provisioning.
fn is_marker_probe(op: &RuntimeOp) -> bool {
    matches!(op, RuntimeOp::Exec { argv, .. } if argv.iter().any(|a| a == podfleet_core::reconciler::PROVISIONED_PATH))
}

impl ContainerRuntime for FaultyRuntime {
    fn pull_progress(&self, image: &str) -> Option<podfleet_core::runtime::PullProgress> {
        self.device.fake.pull_progress(image)
    }

    async fn execute(&self, op: RuntimeOp) -> RuntimeResult {
        let d = &self.device;
        let now = self.clock.now();
        d.check(|oracle, fake, out| oracle.check_op(now, &op, fake, out));
        let trouble = *lock(&d.trouble);
        let trouble = trouble.filter(|(until, _)| now < *until).map(|(_, t)| t);
        // An unreachable runtime leaves the queued API faults for later.
        let fault = match trouble {
            Some(RuntimeTrouble::Unavailable) => None,
            _ => lock(&d.faults)
                .get_mut(op.name())
                .and_then(VecDeque::pop_front),
        };
        self.trace(format_args!("-> {}", podfleet_testkit::describe_op(&op)));
        let slow = *lock(&d.slow);
        if let Some((_, delay)) = slow.filter(|(until, _)| now < *until) {
            d.world.probe("slow runtime");
            tokio::time::sleep(delay).await;
        }
        match trouble {
            Some(RuntimeTrouble::Slow { delay_ms }) => {
                d.world.probe("agent restarted into a slow runtime");
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            }
            Some(RuntimeTrouble::Unavailable) => {
                d.world.probe("agent restarted into an unavailable runtime");
            }
            None => {}
        }
        let result = match fault {
            _ if trouble == Some(RuntimeTrouble::Unavailable) => Err(RuntimeError::new(
                RuntimeErrorKind::Unavailable,
                "injected: cannot connect to the podman socket",
            )),
            Some((after_effect, kind)) => {
                if after_effect {
                    d.fake.with(|fake| drop(fake.execute(&op)));
                    d.world.probe("create failed but exists");
                }
                Err(RuntimeError::new(
                    kind,
                    format!("injected {} failure", op.name()),
                ))
            }
            None => d.fake.execute(op.clone()).await,
        };
        let now = self.clock.now();
        d.check(|oracle, fake, out| oracle.check_state(now, fake, out));
        match &result {
            Err(_) => lock(&d.epoch).errors += 1,
            Ok(RuntimeReply::Listed { .. }) => lock(&d.oracle).saw_list(),
            Ok(_) => {}
        }
        lock(&d.oracle).saw_answer(&op, &result);
        if op.image().is_some() {
            match &result {
                Ok(RuntimeReply::Pulled { .. }) => d.world.probe("image pulled"),
                Err(e) if matches!(e.kind, RuntimeErrorKind::Pull(_)) => {
                    d.world.probe("pull failed");
                }
                _ => {}
            }
        }
        match &result {
            Ok(RuntimeReply::Inspected { status }) if status.state == ContainerState::Running => {
                let init = op.container().is_some_and(|c| {
                    d.fake.with(|f| {
                        f.containers()
                            .get(c)
                            .is_some_and(|c| c.spec.labels.contains_key(LABEL_INIT))
                    })
                });
                if init {
                    d.world.probe("libpod race hit");
                }
            }
            Ok(RuntimeReply::Stopped {
                outcome: podfleet_core::runtime::StopOutcome::Killed,
            }) => d.world.probe("stop killed after grace"),
            // Asked for its marker, a container had none: an agent died
            // while its setup script ran.
            Ok(RuntimeReply::Executed { exit_code, .. })
                if *exit_code != 0 && is_marker_probe(&op) =>
            {
                d.world.probe("unprovisioned container found");
            }
            _ => {}
        }
        self.trace(format_args!("<- {}", describe_result(&result)));
        result
    }

    async fn version(&self) -> Result<String, RuntimeError> {
        let d = &self.device;
        let now = self.clock.now();
        let trouble = *lock(&d.trouble);
        let unavailable =
            trouble.is_some_and(|(until, t)| now < until && t == RuntimeTrouble::Unavailable);
        self.trace("-> version");
        let result = if unavailable {
            Err(RuntimeError::new(
                RuntimeErrorKind::Unavailable,
                "injected: cannot connect to the podman socket",
            ))
        } else {
            d.fake.version().await
        };
        match &result {
            Ok(version) => self.trace(format_args!("<- version {version}")),
            Err(e) => self.trace(format_args!("<- version error {e}")),
        }
        result
    }

    async fn logs(
        &self,
        container: &str,
        tail_lines: u32,
        max_bytes: usize,
    ) -> Result<LogsOutput, RuntimeError> {
        self.device
            .fake
            .logs(container, tail_lines, max_bytes)
            .await
    }

    async fn exec(
        &self,
        container: &str,
        argv: &[String],
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<ExecOutput, RuntimeError> {
        self.device
            .fake
            .exec(container, argv, timeout, max_bytes)
            .await
    }
}

/// A boxed read half.
pub type BoxRead = Box<dyn AsyncRead + Unpin>;
/// A boxed write half.
pub type BoxWrite = Box<dyn AsyncWrite + Unpin>;

/// A connection being opened: its read and write halves, or why not.
pub type Dialing = Pin<Box<dyn Future<Output = io::Result<(BoxRead, BoxWrite)>>>>;

/// How a tier opens a byte stream to the broker.
pub trait Dialer: Clone + 'static {
    /// Connects `who` to the broker.
    fn dial(&self, who: &str) -> Dialing;
}

/// The state of a device's link to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Messages flow.
    Up,
    /// Messages are dropped.
    Partitioned,
    /// Messages wait, then flow.
    Held,
}

/// How a network tier runs time, hosts and links.
pub trait Network {
    /// Simulated time since the start.
    fn now(&self) -> Duration;
    /// Runs the simulation until `t`.
    ///
    /// # Errors
    /// A host failed (a panic in the agent, say), in words.
    fn run_until(&mut self, t: Duration) -> Result<(), String>;
    /// Changes the link between device `index` and the broker.
    fn set_link(&mut self, index: u32, state: LinkState);
    /// Kills device `index`'s agent process.
    fn crash_agent(&mut self, index: u32);
    /// Starts device `index`'s agent process again.
    fn start_agent(&mut self, index: u32);
    /// Restarts the broker process.
    fn restart_broker(&mut self);
    /// Kills the fleet controller process.
    fn crash_controller(&mut self);
    /// Starts the fleet controller process again.
    fn start_controller(&mut self);
}

/// Everything a run shares between the tier and the driver.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The trace, violations and probes.
    pub world: World,
    /// The broker's data.
    pub broker: Broker,
    /// The devices.
    pub devices: Vec<Device>,
    /// The operator's command queue.
    pub operator: mpsc::UnboundedSender<OperatorCommand>,
}

/// What one run did and found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The plan's seed.
    pub seed: u64,
    /// Simulated time covered.
    pub simulated: Duration,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u32>,
    /// Probes reached, with counts.
    pub probes: BTreeMap<&'static str, u64>,
    /// Invariant violations.
    pub violations: Vec<Violation>,
    /// Events folded into the trace.
    pub events: u64,
    /// The running hash of every trace line.
    pub trace_hash: u64,
    /// The trace (all of it with `keep_all`, else the last lines).
    pub trace: Vec<String>,
}
