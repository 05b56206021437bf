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
use podfleet_core::reconciler::{fnv1a64, service_container_spec, AgentCache, Bugs};
use podfleet_core::runtime::{
    service_container_name, ContainerSpec, ContainerState, RuntimeError, RuntimeErrorKind,
    RuntimeOp, RuntimeReply, RuntimeResult, LABEL_DEPLOYMENT, LABEL_INIT, LABEL_SERVICE,
};
use podfleet_core::time::Timestamp;
use podfleet_core::wire::names::{DESIRED_BUCKET, STATE_BUCKET};
use podfleet_core::wire::{
    CommandReply, CommandSubject, DeploymentName, DeploymentState, DeviceId, FailureCause, Phase,
    PingReply, PodmanV0Score, Revision, Verb,
};
use podfleet_testkit::SharedFake;
use podfleet_testkit::{FakeContainer, FakeRuntime, Invariant, Oracle, RuntimeEvent, Violation};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use crate::broker::{Broker, Frame, IDLE_TIMEOUT};
use crate::plan::{outlook, oversized_score, Action, Outlook, Plan, RuntimeTrouble};

mod link;
pub use link::device_software;

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
pub const PROBES: [&str; 19] = [
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
];

#[derive(Debug, Default)]
struct WorldState {
    hash: u64,
    events: u64,
    keep_all: bool,
    lines: VecDeque<String>,
    violations: Vec<Violation>,
    probes: BTreeMap<&'static str, u64>,
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

/// A runtime with the images the plans use: the test kit's catalogue.
pub fn fake_runtime() -> FakeRuntime {
    podfleet_testkit::images::runtime()
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

impl ContainerRuntime for FaultyRuntime {
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
            _ => {}
        }
        self.trace(format_args!("<- {}", describe_result(&result)));
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

fn describe_result(result: &RuntimeResult) -> String {
    match result {
        Ok(RuntimeReply::Listed { containers }) => format!("listed {}", containers.len()),
        Ok(RuntimeReply::Created { id }) => format!("created {id}"),
        Ok(RuntimeReply::Inspected { status }) => {
            format!("inspected {} exit {:?}", status.state, status.exit_code)
        }
        Ok(RuntimeReply::Stopped { outcome }) => format!("stopped {outcome:?}"),
        Ok(other) => format!("{other:?}").to_lowercase(),
        Err(e) => format!("error {e}"),
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

/// What the operator host is asked to do.
#[derive(Debug, Clone)]
pub enum OperatorCommand {
    /// Put or delete (`None`) a desired key.
    Write {
        /// The key.
        key: String,
        /// The value.
        value: Option<Vec<u8>>,
    },
    /// Ping a device.
    Ping {
        /// The device.
        device: DeviceId,
    },
}

/// The operator: writes desired state in plan order, retrying until each
/// write is acknowledged, and pings devices.
pub async fn operator<D: Dialer>(
    dialer: D,
    clock: SimClock,
    world: World,
    mut commands: mpsc::UnboundedReceiver<OperatorCommand>,
) {
    let mut connection: Option<(tokio::io::Lines<BufReader<BoxRead>>, BoxWrite)> = None;
    let mut next_id = 0u64;
    while let Some(command) = commands.recv().await {
        loop {
            if connection.is_none() {
                match dialer.dial("operator").await {
                    Ok((r, mut w)) => {
                        let hello = Frame::Hello {
                            client: "operator".into(),
                        };
                        if w.write_all(&hello.to_line()).await.is_ok() {
                            connection = Some((BufReader::new(r).lines(), w));
                        }
                    }
                    Err(_) => {
                        tokio::time::sleep(RECONNECT_DELAY).await;
                        continue;
                    }
                }
            }
            let Some((lines, writer)) = connection.as_mut() else {
                continue;
            };
            next_id += 1;
            let id = next_id;
            let frame = match &command {
                OperatorCommand::Write { key, value } => Frame::Write {
                    id,
                    bucket: DESIRED_BUCKET.into(),
                    key: key.clone(),
                    value: value.clone(),
                },
                OperatorCommand::Ping { device } => Frame::Request {
                    id,
                    subject: CommandSubject {
                        device: device.clone(),
                        verb: Verb::Ping,
                    }
                    .to_subject(),
                    body: Vec::new(),
                },
            };
            if writer.write_all(&frame.to_line()).await.is_err() {
                connection = None;
                continue;
            }
            let answer = tokio::time::timeout(IDLE_TIMEOUT, async {
                loop {
                    let line = lines.next_line().await.ok().flatten()?;
                    match serde_json::from_str::<Frame>(&line).ok()? {
                        Frame::Ack { id: got, .. } if got == id => return Some(None),
                        Frame::Response { id: got, body } if got == id => return Some(body),
                        _ => {}
                    }
                }
            })
            .await;
            match (answer, &command) {
                (Ok(Some(_)), OperatorCommand::Write { .. }) => break,
                (Ok(Some(body)), OperatorCommand::Ping { device }) => {
                    if let Some(body) = body {
                        check_ping(&world, clock.now(), device, &body);
                    }
                    break;
                }
                // A ping nobody answers in time is given up; a write is not.
                (_, OperatorCommand::Ping { .. }) => {
                    connection = None;
                    break;
                }
                _ => connection = None,
            }
        }
    }
}

fn check_ping(world: &World, now: Timestamp, device: &DeviceId, body: &[u8]) {
    match serde_json::from_slice::<CommandReply<PingReply>>(body) {
        Ok(CommandReply::Ok(reply)) if reply.device_id == *device => {
            world.probe("command answered");
            world.trace(
                now,
                "operator",
                format_args!("ping {device}: up {} s", reply.uptime_s),
            );
        }
        other => world.violation(Violation::at(
            now,
            Invariant::Isolation,
            format!("a ping to {device} was answered with {other:?}"),
        )),
    }
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

#[derive(Debug, Clone)]
enum Timed {
    Plan(Action),
    LinkUp(u32),
    /// The agent starts again, maybe into a runtime in trouble for a while.
    AgentUp(u32, Option<(RuntimeTrouble, u64)>),
    ImageBack(u32, String),
}

/// Runs `plan` on `tier`: its steps, then healing, liveness and quiet.
pub fn run_plan<T: Network>(plan: &Plan, tier: &mut T, shared: &Shared) -> Outcome {
    let world = &shared.world;
    let mut queue: BTreeMap<(u64, u64), Timed> = BTreeMap::new();
    for (n, step) in plan.steps.iter().enumerate() {
        queue.insert((step.at_ms, n as u64), Timed::Plan(step.action.clone()));
    }
    let mut seq = plan.steps.len() as u64;
    let mut links = vec![LinkState::Up; shared.devices.len()];
    let mut agent_up = vec![true; shared.devices.len()];
    let mut faults: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut failure = None;
    while let Some(((at, _), timed)) = queue.pop_first() {
        if at >= plan.heal_at_ms {
            break;
        }
        if let Err(e) = tier.run_until(Duration::from_millis(at)) {
            failure = Some(e);
            break;
        }
        let now = Timestamp::from_millis(at);
        let mut later = |queue: &mut BTreeMap<(u64, u64), Timed>, after: u64, what: Timed| {
            seq += 1;
            queue.insert((at + after, seq), what);
        };
        let device = |i: u32| shared.devices.get(i as usize);
        match timed {
            Timed::Plan(action) => {
                if let Some(kind) = action.fault_kind() {
                    *faults.entry(kind).or_default() += 1;
                }
                world.trace(now, "plan", format_args!("{action:?}"));
                match action {
                    Action::Put {
                        device: i,
                        deployment,
                        json,
                    } => {
                        let _ = shared.operator.send(OperatorCommand::Write {
                            key: format!("{}.{deployment}", device_id(i)),
                            value: Some(json.into_bytes()),
                        });
                    }
                    Action::Delete {
                        device: i,
                        deployment,
                    } => {
                        let offline = links.get(i as usize) != Some(&LinkState::Up)
                            || agent_up.get(i as usize) == Some(&false);
                        if offline {
                            world.probe("delete while offline");
                        }
                        let _ = shared.operator.send(OperatorCommand::Write {
                            key: format!("{}.{deployment}", device_id(i)),
                            value: None,
                        });
                    }
                    Action::Ping { device: i } => {
                        let _ = shared.operator.send(OperatorCommand::Ping {
                            device: device_id(i),
                        });
                    }
                    Action::Crash {
                        device: i,
                        container,
                        code,
                    } => {
                        if let Some(d) = device(i) {
                            let now = d.fake.now();
                            d.fake.with(|f| {
                                let id = f.by_name(&container).map(|c| c.id.clone());
                                if let Some(id) = id.filter(|id| f.is_running(id)) {
                                    f.crash(now, &id, code);
                                }
                            });
                        }
                    }
                    Action::ApiFault {
                        device: i,
                        op,
                        after_effect,
                        unavailable,
                    } => {
                        if let Some(d) = device(i) {
                            let kind = if unavailable {
                                RuntimeErrorKind::Unavailable
                            } else {
                                RuntimeErrorKind::Other
                            };
                            lock(&d.faults)
                                .entry(op)
                                .or_default()
                                .push_back((after_effect, kind));
                        }
                    }
                    Action::Partition { device: i, for_ms }
                    | Action::Hold { device: i, for_ms }
                        if (i as usize) < links.len() =>
                    {
                        let state = if matches!(action, Action::Partition { .. }) {
                            LinkState::Partitioned
                        } else {
                            LinkState::Held
                        };
                        if let Some(d) = device(i) {
                            let upgrading =
                                d.published().values().any(|s| s.phase == Phase::Pending);
                            if upgrading && state == LinkState::Partitioned {
                                world.probe("partition during an upgrade");
                            }
                        }
                        if links[i as usize] == LinkState::Up {
                            links[i as usize] = state;
                            tier.set_link(i, state);
                            later(&mut queue, for_ms, Timed::LinkUp(i));
                        }
                    }
                    Action::Partition { .. } | Action::Hold { .. } => {}
                    Action::BrokerRestart => {
                        shared.broker.restart();
                        tier.restart_broker();
                    }
                    Action::AgentCrash {
                        device: i,
                        keep_cache,
                        down_ms,
                    } => {
                        if let Some(d) = device(i).filter(|_| agent_up[i as usize]) {
                            tier.crash_agent(i);
                            agent_up[i as usize] = false;
                            if !keep_cache {
                                *lock(&d.disk) = None;
                                if d.fake.with(|f| !f.containers().is_empty()) {
                                    world.probe("adoption after cache loss");
                                }
                            }
                            later(&mut queue, down_ms, Timed::AgentUp(i, None));
                        }
                    }
                    Action::AgentRestartTrouble {
                        device: i,
                        keep_cache,
                        down_ms,
                        for_ms,
                        trouble,
                    } => {
                        if let Some(d) = device(i).filter(|_| agent_up[i as usize]) {
                            tier.crash_agent(i);
                            agent_up[i as usize] = false;
                            if !keep_cache {
                                *lock(&d.disk) = None;
                            }
                            let up = Timed::AgentUp(i, Some((trouble, for_ms)));
                            later(&mut queue, down_ms, up);
                        }
                    }
                    Action::PutOversized {
                        device: i,
                        deployment,
                        name_bytes,
                    } => {
                        let _ = shared.operator.send(OperatorCommand::Write {
                            key: format!("{}.{deployment}", device_id(i)),
                            value: Some(oversized_score(name_bytes).into_bytes()),
                        });
                    }
                    Action::StaleDelivery { device: i } => {
                        shared
                            .broker
                            .deliver_stale(DESIRED_BUCKET, &format!("{}.", device_id(i)));
                    }
                    Action::ImageMissing {
                        device: i,
                        image,
                        for_ms,
                    } => {
                        if let Some(d) = device(i) {
                            d.fake.with(|f| f.remove_image(&image));
                            later(&mut queue, for_ms, Timed::ImageBack(i, image));
                        }
                    }
                    Action::Duplicate => shared.broker.duplicate_next(1),
                    Action::SlowRuntime {
                        device: i,
                        for_ms,
                        delay_ms,
                    } => {
                        if let Some(d) = device(i) {
                            let until = now + Duration::from_millis(for_ms);
                            *lock(&d.slow) = Some((until, Duration::from_millis(delay_ms)));
                        }
                    }
                    Action::Redeliver { device: i } => {
                        shared
                            .broker
                            .redeliver(DESIRED_BUCKET, &format!("{}.", device_id(i)));
                    }
                }
            }
            Timed::LinkUp(i) => {
                links[i as usize] = LinkState::Up;
                tier.set_link(i, LinkState::Up);
            }
            Timed::AgentUp(i, trouble) => {
                if let (Some(d), Some((trouble, for_ms))) = (device(i), trouble) {
                    let until = now + Duration::from_millis(for_ms);
                    *lock(&d.trouble) = Some((until, trouble));
                }
                agent_up[i as usize] = true;
                tier.start_agent(i);
            }
            Timed::ImageBack(i, image) => {
                if let Some(d) = device(i) {
                    d.fake.with(|f| f.add_image(&image));
                }
            }
        }
    }
    // Heal every fault still in force; desired state stays as it is.
    let heal = Duration::from_millis(plan.heal_at_ms);
    if failure.is_none() {
        failure = tier.run_until(heal).err();
    }
    world.trace(Timestamp::from_millis(plan.heal_at_ms), "plan", "heal");
    for (i, d) in shared.devices.iter().enumerate() {
        let i = i as u32;
        if links[i as usize] != LinkState::Up {
            tier.set_link(i, LinkState::Up);
        }
        if !agent_up[i as usize] {
            tier.start_agent(i);
        }
        lock(&d.faults).clear();
        *lock(&d.slow) = None;
        *lock(&d.trouble) = None;
        d.fake.with(|f| {
            for image in crate::plan::GOOD_IMAGES {
                f.add_image(image);
            }
        });
    }
    if failure.is_none() {
        failure = tier.run_until(heal + LIVENESS_BOUND).err();
    }
    if failure.is_none() {
        let running = check_converged(shared);
        let before: Vec<usize> = shared
            .devices
            .iter()
            .map(|d| d.fake.with(|f| f.events().len()))
            .collect();
        failure = tier.run_until(heal + LIVENESS_BOUND + QUIET_PERIOD).err();
        check_quiet(shared, &before, &running);
    }
    if let Some(e) = failure {
        world.violation(Violation::new(Invariant::HostFailed, e));
    }
    for refusal in shared.broker.refusals() {
        world.violation(Violation::new(
            Invariant::Isolation,
            format!("the broker refused {refusal}, which is not the device's own"),
        ));
    }
    let w = lock(&world.0);
    Outcome {
        seed: plan.seed,
        simulated: tier.now(),
        faults,
        probes: w.probes.clone(),
        violations: w.violations.clone(),
        events: w.events,
        trace_hash: w.hash,
        trace: w.lines.iter().cloned().collect(),
    }
}

/// Liveness: what each device reports through the broker matches desired
/// state, the agent's own latest reports and the runtime's ground truth
/// ([`check_device`]). Returns the (device, deployment) pairs that run and
/// must now stay still.
fn check_converged(shared: &Shared) -> Vec<(usize, String)> {
    let desired = shared.broker.entries(DESIRED_BUCKET);
    let reported = shared.broker.entries(STATE_BUCKET);
    let mut running = Vec::new();
    for (i, d) in shared.devices.iter().enumerate() {
        let prefix = format!("{}.", d.id);
        let under = |map: &BTreeMap<String, (u64, Vec<u8>)>| {
            map.range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, v)| (k[prefix.len()..].to_owned(), v.clone()))
                .collect::<BTreeMap<String, (u64, Vec<u8>)>>()
        };
        let mine = under(&desired);
        let stored = under(&reported)
            .into_iter()
            .map(|(k, (_, v))| (k, v))
            .collect();
        let published = lock(&d.published).clone();
        let oracle = lock(&d.oracle).clone();
        let epoch = *lock(&d.epoch);
        let (problems, converged) = d.fake.with(|fake| {
            check_device(&DeviceView {
                desired: &mine,
                stored: &stored,
                published: Some(&published),
                fake,
                oracle: &oracle,
                epoch,
                now: d.fake.now(),
            })
        });
        running.extend(converged.into_iter().map(|c| (i, c)));
        for p in problems {
            shared.world.violation(p.on(&d.id));
        }
    }
    running
}

/// One device as the liveness phase finds it, once every fault has healed
/// and desired state has stayed put for [`LIVENESS_BOUND`].
#[derive(Debug, Clone, Copy)]
pub struct DeviceView<'a> {
    /// Desired state: deployment -> (revision, value).
    pub desired: &'a BTreeMap<String, (u64, Vec<u8>)>,
    /// The state bucket as the broker stores it: deployment -> value.
    pub stored: &'a BTreeMap<String, Vec<u8>>,
    /// What the agent last handed its publisher, per deployment, where that
    /// can differ from `stored` (`None` when reports go straight in).
    pub published: Option<&'a BTreeMap<String, Handed>>,
    /// The device's runtime: the ground truth.
    pub fake: &'a FakeRuntime,
    /// What the reconciler was told.
    pub oracle: &'a Oracle,
    /// Since the agent process last started.
    pub epoch: Epoch,
    /// The time of the check.
    pub now: Timestamp,
}

/// The liveness checks of one device. Returns the problems, each starting
/// with the invariant it breaks, and the deployments that converged to
/// Running (and must now stay still).
///
/// - None left behind: the runtime's full container list, init containers
///   included, holds nothing of a deleted deployment; for one that can
///   succeed, exactly one container per service of the desired score,
///   running what the score asks for, and no init container; for one that
///   cannot (malformed, doomed init), no init container and at most one
///   container per service.
/// - Converged: the stored report is Running at the desired revision with
///   the true ids (or, for a spec that cannot succeed, Failed with a cause
///   or a retry under way; for a crash loop, Running or a CrashLoop).
/// - Truthful reports, every field ([`check_report_fields`]).
pub fn check_device(view: &DeviceView<'_>) -> (Vec<Violation>, Vec<String>) {
    let mut problems = Vec::new();
    let mut running = Vec::new();
    let mut states = BTreeMap::new();
    for (deployment, bytes) in view.stored {
        match serde_json::from_slice::<DeploymentState>(bytes) {
            Ok(s) => {
                states.insert(deployment.clone(), s);
            }
            Err(e) => problems.push(Violation::new(
                Invariant::TruthfulReports,
                format!("the stored state of {deployment} does not decode: {e}"),
            )),
        }
    }
    let mut by_deployment: BTreeMap<&str, Vec<&FakeContainer>> = BTreeMap::new();
    for c in view.fake.containers().values() {
        let deployment = c
            .spec
            .labels
            .get(LABEL_DEPLOYMENT)
            .map_or("", String::as_str);
        by_deployment.entry(deployment).or_default().push(c);
    }
    for (deployment, containers) in &by_deployment {
        if !view.desired.contains_key(*deployment) {
            for c in containers {
                problems.push(Violation::new(
                    Invariant::Liveness,
                    format!(
                        "not converged: {} of deleted {deployment:?} still exists ({})",
                        c.spec.name, c.state
                    ),
                ));
            }
        }
    }
    for (deployment, (revision, value)) in view.desired {
        let outlook = outlook(&String::from_utf8_lossy(value));
        let state = states.get(deployment);
        let containers = by_deployment
            .get(deployment.as_str())
            .cloned()
            .unwrap_or_default();
        let mut found = Vec::new();
        let mut services: BTreeMap<&str, Vec<&FakeContainer>> = BTreeMap::new();
        for c in containers {
            if c.spec.labels.contains_key(LABEL_INIT) {
                // A revision that cannot succeed (or that crash-loops) may be
                // at another attempt: an init container it created within
                // the longest init timeout the plans use is still at work.
                let created = created_at(view.fake, &c.id);
                let at_work = outlook != Outlook::Succeeds
                    && created.is_some_and(|at| view.now.saturating_since(at) < INIT_AT_WORK);
                if !at_work {
                    found.push(format!(
                        "init container {} of {deployment} left behind ({}, created at {})",
                        c.spec.name,
                        c.state,
                        created.map_or("?".to_owned(), |t| t.to_string())
                    ));
                }
            } else {
                let service = c.spec.labels.get(LABEL_SERVICE).map_or("", String::as_str);
                services.entry(service).or_default().push(c);
            }
        }
        for (service, cs) in &services {
            if cs.len() > 1 {
                found.push(format!(
                    "{} containers for service {deployment}/{service}",
                    cs.len()
                ));
            }
        }
        if let (Outlook::Succeeds | Outlook::CrashLoops, Ok(score)) =
            (outlook, PodmanV0Score::from_json(value))
        {
            let lifecycle = score.lifecycle_or_default();
            for s in &score.services {
                let wanted =
                    service_container_spec(deployment, s, &lifecycle, Revision::new(*revision));
                match services.get(s.name.as_str()).and_then(|cs| cs.first()) {
                    None => found.push(format!("service {deployment}/{} has no container", s.name)),
                    Some(c) if !same_program(&c.spec, &wanted) => found.push(format!(
                        "{} ({}) does not run what revision {revision} asks for: image {} env {:?}",
                        c.spec.name, c.id, c.spec.image, c.spec.env
                    )),
                    Some(c) if outlook == Outlook::Succeeds && !view.fake.is_running(&c.id) => {
                        found.push(format!("{} ({}) is {}", c.spec.name, c.id, c.state));
                    }
                    Some(_) => {}
                }
            }
            for service in services.keys() {
                if !score.services.iter().any(|s| s.name == *service) {
                    found.push(format!(
                        "a container of {deployment}/{service}, which revision {revision} does not have, is left behind"
                    ));
                }
            }
        }
        let report_ok = state.is_some_and(|s| {
            s.revision == *revision
                && match outlook {
                    Outlook::Succeeds => s.phase == Phase::Running,
                    Outlook::CrashLoops => {
                        s.phase == Phase::Running
                            || matches!(s.cause, Some(FailureCause::CrashLoop { .. }))
                    }
                    // Failed with a cause, or between two attempts a retry
                    // under way.
                    Outlook::Fails => {
                        (s.phase == Phase::Failed && s.cause.is_some())
                            || (s.phase == Phase::Pending && s.attempt > 1)
                    }
                }
        });
        match (state, report_ok) {
            // A summary leaves the ids out by design (the full report was
            // over the bucket's limit): its phase and revision are checked.
            (Some(s), true) if outlook == Outlook::Succeeds && !s.summarised => {
                if let Ok(name) = DeploymentName::new(deployment.as_str()) {
                    let mut untrue = Vec::new();
                    view.oracle
                        .check_report(Timestamp::ZERO, &name, s, view.fake, &mut untrue);
                    found.extend(untrue.iter().map(Violation::to_string));
                }
            }
            (_, true) => {}
            (state, false) => found.push(format!(
                "{deployment} (revision {revision}, {outlook:?}) reports {}",
                state.map_or("nothing".to_owned(), brief)
            )),
        }
        if found.is_empty() && outlook == Outlook::Succeeds {
            running.push(deployment.clone());
        }
        problems.extend(
            found
                .into_iter()
                .map(|p| Violation::new(Invariant::Liveness, format!("not converged: {p}"))),
        );
    }
    for key in states.keys() {
        if !view.desired.contains_key(key) {
            problems.push(Violation::new(
                Invariant::Liveness,
                format!("not converged: {key} is deleted but still has a reported state"),
            ));
        }
    }
    for (deployment, state) in &states {
        let crash_loops = view
            .desired
            .get(deployment)
            .is_some_and(|(_, v)| outlook(&String::from_utf8_lossy(v)) == Outlook::CrashLoops);
        check_report_fields(view, deployment, state, crash_loops, &mut problems);
    }
    if let Some(published) = view.published {
        let keys: BTreeSet<&String> = states.keys().chain(published.keys()).collect();
        for key in keys {
            let stored = states.get(key);
            let handed = published.get(key);
            if stored == handed.and_then(|h| h.state.as_ref()) {
                continue;
            }
            // A first attempt still on its way is not a difference yet.
            let fate = match handed.map(|h| &h.delivery) {
                Some(Delivery::InFlight {
                    since,
                    retry: false,
                }) if view.now.saturating_since(*since) < ACK_TIMEOUT => continue,
                Some(Delivery::InFlight { retry: true, .. }) => {
                    ", whose write failed before and is being retried".to_owned()
                }
                Some(Delivery::InFlight { .. }) => ", whose write was never answered".to_owned(),
                Some(Delivery::Failed(reason)) => format!(", whose write failed: {reason}"),
                Some(Delivery::Stored) | None => String::new(),
            };
            problems.push(Violation::new(
                Invariant::TruthfulReports,
                format!(
                    "{key}: the broker holds {} but the agent last handed its publisher {}{fate}",
                    stored.map_or("nothing".to_owned(), brief),
                    handed.map_or("nothing".to_owned(), |h| h
                        .state
                        .as_ref()
                        .map_or("a clear".to_owned(), brief)),
                ),
            ));
        }
    }
    (problems, running)
}

/// Truthful reports, every field of a stored report: a non-empty message;
/// a cause exactly when Failed; attempt 1 or more for a failed attempt at
/// a revision; container ids that exist and run (a crash loop's may have
/// exited since), each the container of its service; restart counts and
/// exit codes the runtime's history bears out: a restart needs an exit, a
/// reported exit code was some container's, and the agent cannot have
/// counted more restarts since it started than its containers exited
/// (plus one exit from before the start) plus runtime operations failed.
pub fn check_report_fields(
    view: &DeviceView<'_>,
    deployment: &str,
    s: &DeploymentState,
    crash_loops: bool,
    problems: &mut Vec<Violation>,
) {
    let mut bad = |p: String| {
        problems.push(Violation::new(
            Invariant::TruthfulReports,
            format!("{deployment}: {p}"),
        ));
    };
    if s.message.trim().is_empty() {
        bad(format!("{:?} report with an empty message", s.phase));
    }
    match (s.phase, &s.cause) {
        (Phase::Failed, None) => bad("Failed without a cause".to_owned()),
        (Phase::Running | Phase::Pending, Some(cause)) => {
            bad(format!("{:?} with a cause, {cause:?}", s.phase));
        }
        _ => {}
    }
    let failed_attempt = matches!(
        s.cause,
        Some(
            FailureCause::InitContainerExited { .. }
                | FailureCause::InitContainerTimedOut { .. }
                | FailureCause::StillRunningAfterWait { .. }
                | FailureCause::Runtime { .. }
        )
    );
    if failed_attempt && s.attempt == 0 {
        bad(format!(
            "a failed attempt at revision {} reported as attempt 0",
            s.revision
        ));
    }
    let fake = view.fake;
    for (service, id) in &s.container_ids {
        match fake.containers().get(id) {
            None => bad(format!("names {service}={id}, which does not exist")),
            Some(c) if c.spec.name != service_container_name(deployment, service) => {
                bad(format!("names {service}={id}, which is {}", c.spec.name));
            }
            Some(c) if !crash_loops && !fake.is_running(id) => {
                bad(format!("names {service}={id}, which is {}", c.state));
            }
            Some(_) => {}
        }
    }
    let events = fake.events();
    for (service, record) in &s.restarts {
        let name = service_container_name(deployment, service);
        let ids: BTreeSet<&str> = events
            .iter()
            .filter_map(|(_, e)| match e {
                RuntimeEvent::Created { id, spec } if spec.name == name => Some(id.as_str()),
                _ => None,
            })
            .collect();
        let exits: Vec<(usize, i64)> = events
            .iter()
            .enumerate()
            .filter_map(|(i, (_, e))| match e {
                RuntimeEvent::Exited { id, code } if ids.contains(id.as_str()) => Some((i, *code)),
                _ => None,
            })
            .collect();
        if record.count > 0 && exits.is_empty() {
            bad(format!(
                "reports {} restarts of {service}, whose containers never exited",
                record.count
            ));
        }
        if let Some(code) = record.last_exit_code {
            if !exits.iter().any(|(_, c)| *c == code) {
                bad(format!(
                    "reports that {service} last exited with code {code}, which none of its containers did"
                ));
            }
        }
        let since = exits
            .iter()
            .filter(|(i, _)| *i >= view.epoch.events)
            .count() as u64;
        if u64::from(record.count) > 1 + since + view.epoch.errors {
            bad(format!(
                "reports {} restarts of {service}, but since the agent started its containers exited {since} times and {} runtime operations failed",
                record.count, view.epoch.errors
            ));
        }
    }
}

/// How long an init container may be at work before it counts as left
/// behind: the longest init timeout the plans use (30 s), plus slack.
const INIT_AT_WORK: Duration = Duration::from_secs(40);

/// When the fake created container `id`.
fn created_at(fake: &FakeRuntime, id: &str) -> Option<Timestamp> {
    fake.events().iter().rev().find_map(|(at, e)| match e {
        RuntimeEvent::Created { id: created, .. } if created == id => Some(*at),
        _ => None,
    })
}

/// Whether two specs run the same program: everything but the labels.
fn same_program(a: &ContainerSpec, b: &ContainerSpec) -> bool {
    a.name == b.name
        && a.image == b.image
        && a.args == b.args
        && a.env == b.env
        && a.volumes == b.volumes
        && a.ports == b.ports
        && a.stop_signal == b.stop_signal
}

/// A report in a few words (its message cut short), for violations.
fn brief(s: &DeploymentState) -> String {
    let mut message: String = s.message.chars().take(120).collect();
    if message.len() < s.message.len() {
        message.push_str("...");
    }
    format!(
        "{:?} rev {} attempt {} ids {:?} restarts {:?} {message:?}",
        s.phase, s.revision, s.attempt, s.container_ids, s.restarts
    )
}

/// No flapping: converged deployments see no runtime mutation at all.
fn check_quiet(shared: &Shared, before: &[usize], running: &[(usize, String)]) {
    for (i, d) in shared.devices.iter().enumerate() {
        let from = before.get(i).copied().unwrap_or(0);
        let flaps = d.fake.with(|f| {
            let mut out = String::new();
            for (at, event) in f.events().iter().skip(from) {
                let id = match event {
                    RuntimeEvent::Created { id, .. }
                    | RuntimeEvent::Started { id }
                    | RuntimeEvent::StopBegan { id, .. }
                    | RuntimeEvent::Removed { id, .. } => id,
                    RuntimeEvent::Exited { .. } => continue,
                };
                let deployment = f
                    .containers()
                    .get(id)
                    .and_then(|c| c.spec.labels.get(LABEL_DEPLOYMENT).cloned())
                    .unwrap_or_default();
                if running.contains(&(i, deployment)) {
                    let _ = write!(out, " {at} {event:?};");
                }
            }
            out
        });
        if !flaps.is_empty() {
            shared.world.violation(
                Violation::new(
                    Invariant::Liveness,
                    format!("no quiet after convergence:{flaps}"),
                )
                .on(&d.id),
            );
        }
    }
}

/// How long a lasting fault lasts, in ms, to shorten while shrinking.
fn fault_duration(action: &mut Action) -> Option<&mut u64> {
    match action {
        Action::Partition { for_ms, .. }
        | Action::Hold { for_ms, .. }
        | Action::ImageMissing { for_ms, .. }
        | Action::SlowRuntime { for_ms, .. } => Some(for_ms),
        Action::AgentCrash { down_ms, .. } => Some(down_ms),
        _ => None,
    }
}

/// Reduces a failing plan to a smaller one that fails with the same
/// invariant: drops chunks of steps, halving the chunk size, halves the
/// faults' durations, then heals as early as it can. `run` runs a plan. At most `budget` runs.
pub fn shrink(plan: &Plan, mut run: impl FnMut(&Plan) -> Outcome, budget: u32) -> (Plan, Outcome) {
    let first = run(plan);
    let Some(target) = first.violations.first().map(|v| v.invariant) else {
        return (plan.clone(), first);
    };
    let fails = |o: &Outcome| o.violations.iter().any(|v| v.invariant == target);
    let mut best = (plan.clone(), first);
    let mut runs = 1;
    let mut chunk = best.0.steps.len().div_ceil(2).max(1);
    while chunk >= 1 && runs < budget {
        let mut start = 0;
        let mut progressed = false;
        while start < best.0.steps.len() && runs < budget {
            let mut candidate = best.0.clone();
            let end = (start + chunk).min(candidate.steps.len());
            candidate.steps.drain(start..end);
            let outcome = run(&candidate);
            runs += 1;
            if fails(&outcome) {
                best = (candidate, outcome);
                progressed = true;
            } else {
                start += chunk;
            }
        }
        if !progressed {
            if chunk == 1 {
                break;
            }
            chunk = chunk.div_ceil(2);
        }
    }
    // Shorter faults: halve each fault's duration while it still fails.
    for i in 0..best.0.steps.len() {
        loop {
            if runs >= budget {
                break;
            }
            let mut candidate = best.0.clone();
            let Some(duration) = candidate
                .steps
                .get_mut(i)
                .and_then(|s| fault_duration(&mut s.action))
            else {
                break;
            };
            if *duration < 2_000 {
                break;
            }
            *duration /= 2;
            let outcome = run(&candidate);
            runs += 1;
            if fails(&outcome) {
                best = (candidate, outcome);
            } else {
                break;
            }
        }
    }
    // Heal as early as the last step allows.
    let last = best.0.steps.last().map_or(0, |s| s.at_ms);
    if runs < budget && best.0.heal_at_ms > last + 5_000 {
        let mut candidate = best.0.clone();
        candidate.heal_at_ms = last + 5_000;
        let outcome = run(&candidate);
        if fails(&outcome) {
            best = (candidate, outcome);
        }
    }
    best
}
