//! The simulated world around real agents, shared by both network tiers.
//!
//! Each device runs the production agent's event loop
//! ([`podfleet_agent::event_loop::run`]) with simulated parts: a link to the
//! fake [`Broker`] over whatever byte streams the tier dials, the fake
//! container runtime behind a fault injector, a disk that is the only thing
//! surviving an agent crash, and [`SimClock`]. The driver ([`run_plan`])
//! walks a [`Plan`], applies its faults through the tier, heals, and checks
//! the safety and liveness invariants. A network tier ([`Network`]) only says how time
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

use podfleet_agent::event_loop::{
    self, CacheError, CacheStore, Clock, CommandRequest, DesiredSource, Inbound, LoopOptions,
    LoopStats, PublishError, Publisher, Report,
};
use podfleet_agent::fake_runtime::SharedFake;
use podfleet_agent::runtime::{ContainerRuntime, ExecOutput, LogsOutput};
use podfleet_core::fake::{Behaviour, FakeRuntime, Oracle, RuntimeEvent};
use podfleet_core::reconciler::{fnv1a64, AgentCache, Bugs};
use podfleet_core::runtime::{
    ContainerState, RuntimeError, RuntimeErrorKind, RuntimeOp, RuntimeReply, RuntimeResult,
    LABEL_DEPLOYMENT, LABEL_INIT,
};
use podfleet_core::time::Timestamp;
use podfleet_core::wire::names::{
    COMMAND_SUBJECT_PREFIX, DESIRED_BUCKET, HEARTBEAT_BUCKET, STATE_BUCKET,
};
use podfleet_core::wire::{
    CommandReply, CommandSubject, DeploymentKey, DeploymentName, DeploymentState, DeviceId,
    FailureCause, Phase, PingReply, Verb,
};
use podfleet_core::Config;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

use crate::broker::{Broker, Frame, IDLE_TIMEOUT, PING_INTERVAL};
use crate::plan::{is_malformed, Action, Plan, DOOMED_INIT_IMAGES};

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
pub const PROBES: [&str; 14] = [
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
];

#[derive(Debug, Default)]
struct WorldState {
    hash: u64,
    events: u64,
    keep_all: bool,
    lines: VecDeque<String>,
    violations: Vec<String>,
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
    pub fn violation(&self, text: String) {
        lock(&self.0).violations.push(text);
    }

    /// Counts a probe.
    pub fn probe(&self, name: &'static str) {
        *lock(&self.0).probes.entry(name).or_default() += 1;
    }
}

/// A device's fault queue: op name -> (takes effect anyway, error kind).
type FaultQueue = BTreeMap<String, VecDeque<(bool, RuntimeErrorKind)>>;

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
    /// The last state it published per deployment.
    published: Arc<Mutex<BTreeMap<String, DeploymentState>>>,
    world: World,
    bugs: Bugs,
    /// A deliberately wrong adapter: it watches every device's keys.
    pub watch_everyone: bool,
    /// Until when, and by how much, every runtime operation is slowed.
    slow: Arc<Mutex<Option<(Timestamp, Duration)>>>,
}

/// The device id of plan index `index`.
pub fn device_id(index: u32) -> DeviceId {
    DeviceId::new(format!("dev-{index}")).expect("dev-N is a valid device id")
}

/// A runtime with the images the plans use.
pub fn fake_runtime() -> FakeRuntime {
    let mut rt = FakeRuntime::new();
    rt.set_behaviour(
        "img/slow-stop:1",
        Behaviour {
            stop_delay: Duration::from_secs(2),
            ..Behaviour::default()
        },
    );
    rt.set_behaviour(
        "img/app:2",
        Behaviour {
            ignores_stop_signal: true,
            ..Behaviour::default()
        },
    );
    rt.set_behaviour(
        "img/init-ok:1",
        Behaviour {
            inspect_lag: Duration::from_millis(150),
            ..Behaviour::exits(0, Duration::from_secs(2))
        },
    );
    rt.set_behaviour(
        "img/init-fail:1",
        Behaviour::exits(3, Duration::from_secs(1)),
    );
    rt.set_behaviour("img/init-hang:1", Behaviour::default());
    rt
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
            slow: Arc::default(),
        }
    }

    fn who(&self) -> String {
        self.id.to_string()
    }

    fn check(&self, f: impl FnOnce(&Oracle, &FakeRuntime, &mut Vec<String>)) {
        let mut found = Vec::new();
        let oracle = lock(&self.oracle);
        self.fake.with(|fake| f(&oracle, fake, &mut found));
        drop(oracle);
        for v in found {
            self.world.violation(format!("{}: {v}", self.id));
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
        let fault = lock(&d.faults)
            .get_mut(op.name())
            .and_then(VecDeque::pop_front);
        self.trace(format_args!("-> {}", podfleet_core::fake::describe_op(&op)));
        let slow = *lock(&d.slow);
        if let Some((_, delay)) = slow.filter(|(until, _)| now < *until) {
            d.world.probe("slow runtime");
            tokio::time::sleep(delay).await;
        }
        let result = match fault {
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

/// What the agent's publisher asks the link to send.
#[derive(Debug)]
enum Outgoing {
    Write {
        bucket: &'static str,
        key: String,
        value: Option<Vec<u8>>,
        done: oneshot::Sender<Result<(), String>>,
    },
    Respond {
        reply: u64,
        body: Vec<u8>,
    },
}

/// The agent's publisher: reports become KV writes over the link.
#[derive(Debug, Clone)]
struct SimPublisher {
    device: Device,
    clock: SimClock,
    link: mpsc::UnboundedSender<Outgoing>,
}

impl SimPublisher {
    async fn write(
        &self,
        bucket: &'static str,
        key: String,
        value: Option<Vec<u8>>,
    ) -> Result<(), PublishError> {
        let (done, answer) = oneshot::channel();
        self.link
            .send(Outgoing::Write {
                bucket,
                key,
                value,
                done,
            })
            .map_err(|_| PublishError::Failed("link gone".into()))?;
        match tokio::time::timeout(ACK_TIMEOUT, answer).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(reason))) => Err(PublishError::Failed(reason)),
            Ok(Err(_)) => Err(PublishError::Failed("connection lost".into())),
            Err(_) => Err(PublishError::Failed("no acknowledgement".into())),
        }
    }
}

impl Publisher for SimPublisher {
    async fn publish(&self, report: Report) -> Result<(), PublishError> {
        let d = &self.device;
        match report {
            Report::State { deployment, state } => {
                let now = self.clock.now();
                d.check(|oracle, fake, out| {
                    oracle.check_report(now, &deployment, &state, fake, out);
                });
                if state.attempt >= 6 && state.phase != Phase::Running {
                    d.world.probe("retry backoff cap reached");
                }
                if state.restarts.values().any(|r| r.count >= 2) {
                    d.world.probe("crash loop restarted");
                }
                match &state.cause {
                    Some(FailureCause::InitContainerTimedOut { .. }) => {
                        d.world.probe("init container timed out");
                    }
                    Some(FailureCause::InitContainerExited { .. }) => {
                        d.world.probe("init container failed");
                    }
                    _ => {}
                }
                d.world.trace(
                    now,
                    &d.who(),
                    format_args!(
                        "publish {deployment}: {:?} rev {} {:?}",
                        state.phase, state.revision, state.container_ids
                    ),
                );
                let value =
                    serde_json::to_vec(&state).map_err(|e| PublishError::Failed(e.to_string()))?;
                lock(&d.published).insert(deployment.to_string(), state);
                self.write(STATE_BUCKET, format!("{}.{deployment}", d.id), Some(value))
                    .await
            }
            Report::Clear { deployment } => {
                lock(&d.published).remove(deployment.as_str());
                self.write(STATE_BUCKET, format!("{}.{deployment}", d.id), None)
                    .await
            }
            Report::Heartbeat(heartbeat) => {
                let value = serde_json::to_vec(&heartbeat)
                    .map_err(|e| PublishError::Failed(e.to_string()))?;
                self.write(HEARTBEAT_BUCKET, d.id.to_string(), Some(value))
                    .await
            }
        }
    }

    async fn reply(&self, reply_to: String, body: Vec<u8>) -> Result<(), PublishError> {
        let reply = reply_to
            .parse()
            .map_err(|_| PublishError::Failed(format!("bad reply subject {reply_to:?}")))?;
        self.link
            .send(Outgoing::Respond { reply, body })
            .map_err(|_| PublishError::Failed("link gone".into()))
    }
}

/// The agent's desired-state source: what the link hands over. The oracle
/// learns each input here, at the moment the reconciler is handed it.
struct ChannelSource {
    inbox: mpsc::UnboundedReceiver<Inbound>,
    oracle: Arc<Mutex<Oracle>>,
}

impl DesiredSource for ChannelSource {
    async fn next(&mut self) -> Option<Inbound> {
        let inbound = self.inbox.recv().await?;
        let mut oracle = lock(&self.oracle);
        match &inbound {
            Inbound::Put {
                deployment,
                revision,
                value,
            } => oracle.saw_put(deployment.as_str(), *revision, value),
            Inbound::Delete {
                deployment,
                revision,
            } => oracle.saw_delete(deployment.as_str(), *revision),
            Inbound::Snapshot { present } => oracle.saw_resync(present),
            Inbound::Command(_) => {}
        }
        Some(inbound)
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

/// The agent side of the broker connection, reconnecting forever: after
/// every (re)connect it watches its keys again, whose initial snapshot ends
/// in an [`Inbound::Snapshot`].
async fn link<D: Dialer>(
    device: Device,
    dialer: D,
    clock: SimClock,
    to_agent: mpsc::UnboundedSender<Inbound>,
    mut from_agent: mpsc::UnboundedReceiver<Outgoing>,
) {
    let who = device.who();
    let world = device.world.clone();
    let mut connects = 0u32;
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        let Ok((reader, mut writer)) = dialer.dial(&format!("device:{who}")).await else {
            tokio::time::sleep(RECONNECT_DELAY).await;
            continue;
        };
        connects += 1;
        world.trace(clock.now(), &who, format_args!("connected (#{connects})"));
        let prefix = if device.watch_everyone {
            String::new()
        } else {
            format!("{}.", device.id)
        };
        let hello = [
            Frame::Hello {
                client: format!("device:{who}"),
            },
            Frame::Watch {
                bucket: DESIRED_BUCKET.into(),
                prefix,
            },
            Frame::Subscribe {
                prefix: format!("{COMMAND_SUBJECT_PREFIX}.{}.", device.id),
            },
        ];
        let mut ok = true;
        for frame in &hello {
            ok &= writer.write_all(&frame.to_line()).await.is_ok();
        }
        let mut lines = BufReader::new(reader).lines();
        let mut snapshot: Option<BTreeSet<DeploymentName>> = Some(BTreeSet::new());
        let mut acks: BTreeMap<u64, oneshot::Sender<Result<(), String>>> = BTreeMap::new();
        let mut next_id = 0u64;
        let mut ping = tokio::time::interval(PING_INTERVAL);
        let mut silent_since = tokio::time::Instant::now();
        while ok {
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(silent_since + IDLE_TIMEOUT) => break,
                line = lines.next_line() => {
                    let Ok(Some(line)) = line else { break };
                    silent_since = tokio::time::Instant::now();
                    let Ok(frame) = serde_json::from_str::<Frame>(&line) else { break };
                    match frame {
                        Frame::Entry { key, revision, value } => {
                            let parsed = DeploymentKey::parse(&key);
                            let Some(parsed) = parsed.ok().filter(|k| k.device == device.id) else {
                                world.violation(format!(
                                    "{who}: isolation: the agent received key {key:?}, not one of its own"
                                ));
                                continue;
                            };
                            let last = seen.insert(key.clone(), revision);
                            if last.is_some_and(|l| l >= revision) {
                                world.probe("duplicate delivery");
                            }
                            let deployment = parsed.deployment;
                            let inbound = match value {
                                Some(value) => {
                                    if let Some(s) = snapshot.as_mut() {
                                        s.insert(deployment.clone());
                                    }
                                    Inbound::Put { deployment, revision, value }
                                }
                                None => Inbound::Delete { deployment, revision },
                            };
                            let _ = to_agent.send(inbound);
                        }
                        Frame::Synced => {
                            if let Some(present) = snapshot.take() {
                                if connects > 1 {
                                    world.probe("resync after reconnect");
                                }
                                let _ = to_agent.send(Inbound::Snapshot { present });
                            }
                        }
                        Frame::Ack { id, .. } => {
                            if let Some(done) = acks.remove(&id) {
                                let _ = done.send(Ok(()));
                            }
                        }
                        Frame::Denied { id, reason } => {
                            if let Some(done) = acks.remove(&id) {
                                let _ = done.send(Err(reason));
                            }
                        }
                        Frame::Incoming { reply, subject, body } => {
                            let Ok(parsed) = CommandSubject::parse(&subject) else { continue };
                            let _ = to_agent.send(Inbound::Command(CommandRequest {
                                verb: parsed.verb,
                                body,
                                reply_to: reply.to_string(),
                            }));
                        }
                        _ => {}
                    }
                }
                out = from_agent.recv() => {
                    let Some(out) = out else { return };
                    let frame = match out {
                        Outgoing::Write { bucket, key, value, done } => {
                            if done.is_closed() {
                                continue;
                            }
                            next_id += 1;
                            acks.insert(next_id, done);
                            Frame::Write { id: next_id, bucket: bucket.into(), key, value }
                        }
                        Outgoing::Respond { reply, body } => Frame::Respond { reply, body },
                    };
                    ok = writer.write_all(&frame.to_line()).await.is_ok();
                }
                _ = ping.tick() => {
                    ok = writer.write_all(&Frame::Ping.to_line()).await.is_ok();
                }
            }
        }
        world.trace(clock.now(), &who, "disconnected");
        drop(acks);
        tokio::time::sleep(RECONNECT_DELAY).await;
    }
}

/// The software of one device: the production event loop and its link.
pub async fn device_software<D: Dialer>(device: Device, dialer: D, clock: SimClock) {
    let (to_agent, inbox) = mpsc::unbounded_channel();
    let (outbox, from_agent) = mpsc::unbounded_channel();
    let link = link(device.clone(), dialer, clock.clone(), to_agent, from_agent);
    let config = Config::new(device.id.clone(), "sim").inject_bugs(device.bugs);
    let publisher = SimPublisher {
        device: device.clone(),
        clock: clock.clone(),
        link: outbox,
    };
    let runtime = FaultyRuntime {
        device: device.clone(),
        clock: clock.clone(),
    };
    let mut stats = LoopStats::default();
    let agent = event_loop::run(
        config,
        LoopOptions::default(),
        ChannelSource {
            inbox,
            oracle: Arc::clone(&device.oracle),
        },
        publisher,
        runtime,
        clock,
        SimDisk(device.disk.clone()),
        std::future::pending(),
        &mut stats,
    );
    tokio::select! {
        biased;
        () = link => {}
        _ = agent => {}
    }
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
        other => world.violation(format!(
            "{now}: isolation: a ping to {device} was answered with {other:?}"
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
    /// Invariant violations, in words.
    pub violations: Vec<String>,
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
    AgentUp(u32),
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
                            let upgrading = lock(&d.published)
                                .values()
                                .any(|s| s.phase == Phase::Pending);
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
                            later(&mut queue, down_ms, Timed::AgentUp(i));
                        }
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
            Timed::AgentUp(i) => {
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
        world.violation(format!("a host failed: {e}"));
    }
    for refusal in shared.broker.refusals() {
        world.violation(format!(
            "isolation: the broker refused {refusal}, which is not the device's own"
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
/// state and the runtime's ground truth. Returns the (device, deployment)
/// pairs that run and must now stay still.
fn check_converged(shared: &Shared) -> Vec<(usize, String)> {
    let desired = shared.broker.entries(DESIRED_BUCKET);
    let reported = shared.broker.entries(STATE_BUCKET);
    let mut running = Vec::new();
    for (i, d) in shared.devices.iter().enumerate() {
        let prefix = format!("{}.", d.id);
        let mut problems = Vec::new();
        let under = |map: &'_ BTreeMap<String, (u64, Vec<u8>)>| {
            map.range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, v)| (k[prefix.len()..].to_owned(), v.clone()))
                .collect::<BTreeMap<String, (u64, Vec<u8>)>>()
        };
        let mine = under(&desired);
        for (deployment, (revision, value)) in &mine {
            let text = String::from_utf8_lossy(value);
            let can_succeed =
                !is_malformed(&text) && !DOOMED_INIT_IMAGES.iter().any(|i| text.contains(i));
            let state = reported
                .get(&format!("{prefix}{deployment}"))
                .and_then(|(_, v)| serde_json::from_slice::<DeploymentState>(v).ok());
            match (&state, can_succeed) {
                (Some(s), true) if s.phase == Phase::Running && s.revision == *revision => {
                    let Ok(name) = DeploymentName::new(deployment.as_str()) else {
                        continue;
                    };
                    let mut found = Vec::new();
                    let oracle = lock(&d.oracle).clone();
                    d.fake.with(|f| {
                        oracle.check_report(Timestamp::ZERO, &name, s, f, &mut found);
                        for (service, id) in &s.container_ids {
                            if !f.is_running(id) {
                                found.push(format!("{service}={id} does not run"));
                            }
                        }
                        for c in f.containers().values() {
                            let of_it = c.spec.labels.get(LABEL_DEPLOYMENT).map(String::as_str)
                                == Some(deployment.as_str());
                            if of_it && c.spec.labels.contains_key(LABEL_INIT) {
                                found.push(format!("init container {} left behind", c.spec.name));
                            }
                        }
                    });
                    if found.is_empty() {
                        running.push((i, (*deployment).to_owned()));
                    }
                    problems.extend(found);
                }
                (Some(s), false) if s.phase == Phase::Failed && s.cause.is_some() => {}
                // Between two failed attempts, a retry is under way.
                (Some(s), false) if s.phase == Phase::Pending && s.attempt > 1 => {}
                (other, _) => problems.push(format!(
                    "{deployment} (revision {revision}, {}) reports {:?}",
                    if can_succeed {
                        "can succeed"
                    } else {
                        "cannot succeed"
                    },
                    other.as_ref().map(|s| (s.phase, s.revision, &s.message))
                )),
            }
        }
        for key in under(&reported).keys() {
            if !mine.contains_key(key) {
                problems.push(format!("{key} is deleted but still has a reported state"));
            }
        }
        d.fake.with(|f| {
            for c in f.containers().values() {
                let deployment = c
                    .spec
                    .labels
                    .get(LABEL_DEPLOYMENT)
                    .map_or("", String::as_str);
                if !mine.contains_key(deployment) {
                    problems.push(format!(
                        "{} of deleted {deployment} still exists",
                        c.spec.name
                    ));
                }
            }
        });
        for p in problems {
            shared
                .world
                .violation(format!("{}: liveness: not converged: {p}", d.id));
        }
    }
    running
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
            shared.world.violation(format!(
                "{}: liveness: no quiet after convergence:{flaps}",
                d.id
            ));
        }
    }
}

/// The invariant a violation names (the words before the first colon after
/// the timestamp), for shrinking towards the same failure.
pub fn invariant_of(violation: &str) -> &str {
    for name in [
        "no revert",
        "healthy container recreated",
        "init containers first",
        "graceful replace",
        "truthful reports",
        "isolation",
        "liveness",
        "a host failed",
    ] {
        if violation.contains(name) {
            return name;
        }
    }
    "other"
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
    let Some(target) = first.violations.first().map(|v| invariant_of(v).to_owned()) else {
        return (plan.clone(), first);
    };
    let fails = |o: &Outcome| o.violations.iter().any(|v| invariant_of(v) == target);
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
