//! A pure model of podman, and a harness that drives a [`Reconciler`] against
//! it over virtual time.
//!
//! [`FakeRuntime`] models what the reconciler relies on: containers by name
//! and id, created/running/exited states, exit codes, labels, stop with a
//! signal then a grace then a kill, name conflicts, missing images, the
//! lines a program writes and the libpod race (inspect still saying
//! "running" just after an exit). It runs no programs: how each behaves is
//! configured, by its argv or its image. It has no clock of its own: time
//! moves only when the caller says so.
//!
//! agent/src/conformance.rs states podman's behaviour and runs against both
//! real podman and this model; where they differ, this model is wrong.
//!
//! [`Harness`] is a shell without IO: it executes the reconciler's commands
//! on the fake, always advancing to the earliest deadline (the reconciler's,
//! a container's exit, a delayed result), and records a transcript. The
//! simulator and the fuzzer build on both. Compiled for tests and with the
//! `fake` feature only.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use crate::reconciler::{AgentCache, CommandId, Config, Output, Reconciler};
use crate::runtime::{
    ContainerSpec, ContainerState, ContainerStatus, ContainerSummary, RuntimeError,
    RuntimeErrorKind, RuntimeOp, RuntimeReply, RuntimeResult, StopOutcome, LABEL_MANAGED,
};
use crate::time::Timestamp;
use crate::wire::{DeploymentName, DeploymentState, Heartbeat, Signal};

/// How the program inside a container behaves, chosen by its argv
/// ([`FakeRuntime::set_program`]) or else by its image
/// ([`FakeRuntime::set_behaviour`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behaviour {
    /// Exits by itself after running this long; `None` runs forever.
    pub exit_after: Option<Duration>,
    /// The code it exits with by itself.
    pub exit_code: i64,
    /// How long it takes to exit after its stop signal.
    pub stop_delay: Duration,
    /// It ignores its stop signal (a PID 1 without a handler for it does):
    /// only the kill after the grace ends it, with code 137. Otherwise it
    /// handles the signal and exits 0 after `stop_delay`, unless that
    /// outlasts the grace.
    pub ignores_stop_signal: bool,
    /// For this long after an exit, inspect still says "running" (the libpod race).
    pub inspect_lag: Duration,
    /// The lines it writes to stdout and stderr, in order, as soon as it
    /// starts: every run appends them to the container's logs.
    pub output: Vec<String>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            exit_after: None,
            exit_code: 0,
            stop_delay: Duration::ZERO,
            ignores_stop_signal: false,
            inspect_lag: Duration::ZERO,
            output: Vec::new(),
        }
    }
}

impl Behaviour {
    /// A one-shot program that exits with `code` after `after`.
    pub fn exits(code: i64, after: Duration) -> Self {
        Self {
            exit_after: Some(after),
            exit_code: code,
            ..Self::default()
        }
    }
}

/// One container in the fake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeContainer {
    /// Its id.
    pub id: String,
    /// What it was created from.
    pub spec: ContainerSpec,
    /// Its state.
    pub state: ContainerState,
    /// Its exit code once exited.
    pub exit_code: Option<i64>,
    /// How often it has been started.
    pub starts: u32,
    /// When it will exit, with which code, and whether by the kill.
    exit_at: Option<(Timestamp, i64, bool)>,
    /// Inspect says "running" until then.
    lagging_until: Option<Timestamp>,
    /// The signal and grace of the stop in progress.
    stopping: Option<(Signal, Duration)>,
    /// What its runs wrote, oldest first.
    logs: Vec<String>,
}

/// A mutation the fake performed, for invariant checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeEvent {
    /// A container was created.
    Created {
        /// Its id.
        id: String,
        /// Its spec.
        spec: ContainerSpec,
    },
    /// A container was started.
    Started {
        /// Its id.
        id: String,
    },
    /// A stop began.
    StopBegan {
        /// Its id.
        id: String,
        /// The signal sent.
        signal: Signal,
        /// The grace granted.
        grace: Duration,
    },
    /// A container exited.
    Exited {
        /// Its id.
        id: String,
        /// Its exit code.
        code: i64,
    },
    /// A container was removed.
    Removed {
        /// Its id.
        id: String,
        /// Whether it was still running (force).
        was_running: bool,
    },
}

/// How an operation completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// At once.
    Ready(RuntimeResult),
    /// Once the container `id` no longer runs (wait, stop).
    WhenStopped {
        /// The container.
        id: String,
        /// The result to hand over then.
        result: RuntimeResult,
    },
}

/// A pure model of podman. See the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct FakeRuntime {
    now: Timestamp,
    containers: BTreeMap<String, FakeContainer>,
    next_id: u64,
    missing_images: BTreeSet<String>,
    behaviours: Behaviours,
    events: Vec<(Timestamp, RuntimeEvent)>,
}

impl FakeRuntime {
    /// An empty runtime where every image is present and runs forever.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes containers from `image` behave like `behaviour`, unless their
    /// program has a behaviour of its own.
    pub fn set_behaviour(&mut self, image: &str, behaviour: Behaviour) {
        self.behaviours.by_image.insert(image.to_owned(), behaviour);
    }

    /// Makes containers whose args are exactly `args` behave like
    /// `behaviour`, whatever their image.
    pub fn set_program(&mut self, args: &[&str], behaviour: Behaviour) {
        let args = args.iter().map(|&a| a.to_owned()).collect();
        self.behaviours.by_program.insert(args, behaviour);
    }

    /// Makes `image` absent: creating from it fails with `ImageMissing`.
    pub fn remove_image(&mut self, image: &str) {
        self.missing_images.insert(image.to_owned());
    }

    /// Makes `image` present again.
    pub fn add_image(&mut self, image: &str) {
        self.missing_images.remove(image);
    }

    /// Every container, by id.
    pub fn containers(&self) -> &BTreeMap<String, FakeContainer> {
        &self.containers
    }

    /// The container named `name`.
    pub fn by_name(&self, name: &str) -> Option<&FakeContainer> {
        self.containers.values().find(|c| c.spec.name == name)
    }

    /// Every mutation so far, with its time.
    pub fn events(&self) -> &[(Timestamp, RuntimeEvent)] {
        &self.events
    }

    /// Makes a running container exit now with `code`, as a crash would.
    pub fn crash(&mut self, now: Timestamp, id: &str, code: i64) {
        self.advance(now);
        if let Some(c) = self.containers.get_mut(id) {
            if c.state == ContainerState::Running {
                c.exit_at = Some((now, code, false));
            }
        }
        self.advance(now);
    }

    /// Creates a container behind the reconciler's back, as `create failed
    /// but the container exists anyway` leaves one.
    pub fn create_quietly(&mut self, spec: ContainerSpec) -> String {
        self.create(spec).unwrap_or_default()
    }

    /// The next instant something happens on its own (an exit).
    pub fn next_event(&self) -> Option<Timestamp> {
        self.containers
            .values()
            .filter_map(|c| c.exit_at.map(|(at, _, _)| at))
            .min()
    }

    /// Moves the fake's time to `now`, applying due exits.
    pub fn advance(&mut self, now: Timestamp) {
        self.now = self.now.max(now);
        let now = self.now;
        for c in self.containers.values_mut() {
            if let Some((at, code, _)) = c.exit_at {
                if at <= now {
                    let behaviour = self.behaviours.of(&c.spec);
                    c.state = ContainerState::Exited;
                    c.exit_code = Some(code);
                    c.exit_at = None;
                    c.stopping = None;
                    c.lagging_until = Some(at + behaviour.inspect_lag);
                    self.events.push((
                        at,
                        RuntimeEvent::Exited {
                            id: c.id.clone(),
                            code,
                        },
                    ));
                }
            }
        }
    }

    /// The logs of `container` (an id or a name): the [`Behaviour::output`]
    /// of each of its runs, oldest first, both streams together.
    ///
    /// # Errors
    /// `NotFound` when no such container exists.
    pub fn log_lines(&self, container: &str) -> Result<Vec<String>, RuntimeError> {
        let id = self.find(container)?;
        Ok(self.containers[&id].logs.clone())
    }

    /// Whether `id` exists and runs (or is stopping).
    pub fn is_running(&self, id: &str) -> bool {
        self.containers
            .get(id)
            .is_some_and(|c| matches!(c.state, ContainerState::Running | ContainerState::Stopping))
    }

    fn find(&self, key: &str) -> Result<String, RuntimeError> {
        if self.containers.contains_key(key) {
            return Ok(key.to_owned());
        }
        self.containers
            .values()
            .find(|c| c.spec.name == key)
            .map(|c| c.id.clone())
            .ok_or_else(|| {
                RuntimeError::new(
                    RuntimeErrorKind::NotFound,
                    format!("no such container: {key}"),
                )
            })
    }

    fn create(&mut self, spec: ContainerSpec) -> Result<String, RuntimeError> {
        if self.missing_images.contains(&spec.image) {
            return Err(RuntimeError::new(
                RuntimeErrorKind::ImageMissing,
                format!("{}: image not known", spec.image),
            ));
        }
        if self.containers.values().any(|c| c.spec.name == spec.name) {
            return Err(RuntimeError::new(
                RuntimeErrorKind::NameConflict,
                format!("the container name {:?} is already in use", spec.name),
            ));
        }
        self.next_id += 1;
        let id = format!("{:012x}", self.next_id * 0x9e37_79b9);
        self.events.push((
            self.now,
            RuntimeEvent::Created {
                id: id.clone(),
                spec: spec.clone(),
            },
        ));
        self.containers.insert(
            id.clone(),
            FakeContainer {
                id: id.clone(),
                spec,
                state: ContainerState::Created,
                exit_code: None,
                starts: 0,
                exit_at: None,
                lagging_until: None,
                stopping: None,
                logs: Vec::new(),
            },
        );
        Ok(id)
    }

    /// Executes `op` at the fake's current time.
    pub fn execute(&mut self, op: &RuntimeOp) -> Completion {
        let now = self.now;
        let ready = Completion::Ready;
        match op {
            RuntimeOp::List => ready(Ok(RuntimeReply::Listed {
                containers: self
                    .containers
                    .values()
                    .filter(|c| {
                        c.spec
                            .labels
                            .get(LABEL_MANAGED)
                            .is_some_and(|v| v == "true")
                    })
                    .map(|c| ContainerSummary {
                        id: c.id.clone(),
                        name: c.spec.name.clone(),
                        state: c.state,
                        labels: c.spec.labels.clone(),
                    })
                    .collect(),
            })),
            RuntimeOp::Create { spec } => ready(
                self.create(spec.clone())
                    .map(|id| RuntimeReply::Created { id }),
            ),
            RuntimeOp::Start { container } => ready(self.find(container).map(|id| {
                let behaviour = self.behaviour_of(&id);
                if let Some(c) = self.containers.get_mut(&id) {
                    if c.state != ContainerState::Running {
                        c.state = ContainerState::Running;
                        c.exit_code = None;
                        c.starts += 1;
                        c.lagging_until = None;
                        c.exit_at = behaviour
                            .exit_after
                            .map(|after| (now + after, behaviour.exit_code, false));
                        c.logs.extend(behaviour.output);
                        self.events
                            .push((now, RuntimeEvent::Started { id: id.clone() }));
                    }
                }
                RuntimeReply::Started
            })),
            RuntimeOp::Wait { container } => match self.find(container) {
                Err(e) => ready(Err(e)),
                Ok(id) if self.is_running(&id) => Completion::WhenStopped {
                    id,
                    result: Ok(RuntimeReply::Waited),
                },
                Ok(_) => ready(Ok(RuntimeReply::Waited)),
            },
            RuntimeOp::Inspect { container } => ready(self.find(container).map(|id| {
                let c = &self.containers[&id];
                let lagging = c.lagging_until.is_some_and(|until| now < until);
                RuntimeReply::Inspected {
                    status: ContainerStatus {
                        id: id.clone(),
                        state: if lagging {
                            ContainerState::Running
                        } else {
                            c.state
                        },
                        exit_code: if lagging { None } else { c.exit_code },
                    },
                }
            })),
            RuntimeOp::Stop {
                container,
                signal,
                grace,
            } => match self.find(container) {
                Err(e) => ready(Err(e)),
                Ok(id) if !self.is_running(&id) => ready(Ok(RuntimeReply::Stopped {
                    outcome: StopOutcome::AlreadyStopped,
                })),
                Ok(id) => {
                    let behaviour = self.behaviour_of(&id);
                    let killed = *signal == Signal::Kill
                        || behaviour.ignores_stop_signal
                        || behaviour.stop_delay >= *grace;
                    let (delay, code) = if *signal == Signal::Kill {
                        (Duration::ZERO, 137)
                    } else if killed {
                        (*grace, 137)
                    } else {
                        (behaviour.stop_delay, 0)
                    };
                    self.events.push((
                        now,
                        RuntimeEvent::StopBegan {
                            id: id.clone(),
                            signal: *signal,
                            grace: *grace,
                        },
                    ));
                    if let Some(c) = self.containers.get_mut(&id) {
                        let at = now + delay;
                        let earlier = c.exit_at.filter(|(t, _, _)| *t <= at);
                        c.exit_at = Some(earlier.unwrap_or((at, code, killed)));
                        c.state = ContainerState::Stopping;
                        c.stopping = Some((*signal, *grace));
                    }
                    let outcome = if killed {
                        StopOutcome::Killed
                    } else {
                        StopOutcome::Graceful
                    };
                    Completion::WhenStopped {
                        id,
                        result: Ok(RuntimeReply::Stopped { outcome }),
                    }
                }
            },
            RuntimeOp::Remove { container, force } => ready(self.find(container).and_then(|id| {
                let running = self.is_running(&id);
                if running && !force {
                    return Err(RuntimeError::new(
                        RuntimeErrorKind::Other,
                        format!("container {id} is running: stop it or remove with force"),
                    ));
                }
                self.containers.remove(&id);
                self.events.push((
                    now,
                    RuntimeEvent::Removed {
                        id,
                        was_running: running,
                    },
                ));
                Ok(RuntimeReply::Removed)
            })),
        }
    }

    fn behaviour_of(&self, id: &str) -> Behaviour {
        self.containers
            .get(id)
            .map(|c| self.behaviours.of(&c.spec))
            .unwrap_or_default()
    }
}

/// The configured behaviours, by program and by image.
#[derive(Debug, Clone, Default)]
struct Behaviours {
    by_program: BTreeMap<Vec<String>, Behaviour>,
    by_image: BTreeMap<String, Behaviour>,
}

impl Behaviours {
    /// How a container created from `spec` behaves: as its program, else as
    /// its image, else it runs forever and writes nothing.
    fn of(&self, spec: &ContainerSpec) -> Behaviour {
        self.by_program
            .get(&spec.args)
            .or_else(|| self.by_image.get(&spec.image))
            .cloned()
            .unwrap_or_default()
    }
}

/// A fault the [`Harness`] applies to the next runtime operation of a kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpFault {
    /// The operation fails with this error and does nothing.
    Fail(RuntimeErrorKind),
    /// The operation takes effect but reports this error ("create failed
    /// but the container exists anyway").
    FailAfterEffect(RuntimeErrorKind),
}

#[derive(Debug)]
struct Pending {
    id: CommandId,
    container: String,
    result: RuntimeResult,
}

/// Drives a [`Reconciler`] against a [`FakeRuntime`] in virtual time. See
/// the [module docs](self).
#[derive(Debug)]
pub struct Harness {
    config: Config,
    /// The reconciler under test.
    pub reconciler: Reconciler,
    /// The runtime it drives.
    pub runtime: FakeRuntime,
    /// Virtual now.
    pub now: Timestamp,
    /// The cache as last persisted.
    pub cache: Option<AgentCache>,
    /// The latest published state of each deployment.
    pub states: BTreeMap<DeploymentName, DeploymentState>,
    /// Every state publication, in order.
    pub published: Vec<(DeploymentName, DeploymentState)>,
    /// Every heartbeat, in order.
    pub heartbeats: Vec<Heartbeat>,
    /// Every runtime operation issued, in order, with its time.
    pub ops: Vec<(Timestamp, RuntimeOp)>,
    /// A readable log of everything that happened.
    pub transcript: String,
    /// Faults for the next operation of a given name ("create", "start"...).
    pub faults: BTreeMap<&'static str, VecDeque<OpFault>>,
    /// Results ready to deliver, with their delivery time.
    ready: VecDeque<(Timestamp, CommandId, RuntimeResult)>,
    pending: Vec<Pending>,
    /// Whether heartbeats go into the transcript.
    pub log_heartbeats: bool,
    /// The invariant checks, told everything the reconciler is told.
    pub oracle: Oracle,
    /// Invariant violations found so far, in words.
    pub violations: Vec<String>,
    /// Runtime operations that failed so far (injected or not).
    pub errors: u64,
}

impl Harness {
    /// A harness with an empty runtime, starting at time zero.
    pub fn new(config: Config) -> Self {
        let now = Timestamp::ZERO;
        let mut h = Self {
            reconciler: Reconciler::new(config.clone(), None, now),
            config,
            runtime: FakeRuntime::new(),
            now,
            cache: None,
            states: BTreeMap::new(),
            published: Vec::new(),
            heartbeats: Vec::new(),
            ops: Vec::new(),
            transcript: String::new(),
            faults: BTreeMap::new(),
            ready: VecDeque::new(),
            pending: Vec::new(),
            log_heartbeats: false,
            oracle: Oracle::default(),
            violations: Vec::new(),
            errors: 0,
        };
        h.drain();
        h
    }

    fn log(&mut self, line: std::fmt::Arguments<'_>) {
        let _ = writeln!(self.transcript, "{:>9} {}", self.now.to_string(), line);
    }

    /// Puts desired state for `deployment` at `revision`.
    pub fn put(&mut self, deployment: &str, revision: u64, json: &str) {
        let name = DeploymentName::new(deployment).expect("test deployment names are valid");
        self.log(format_args!("desired put {deployment} rev {revision}"));
        self.oracle.saw_put(deployment, revision, json.as_bytes());
        self.reconciler
            .handle_desired_put(self.now, name, revision, json.as_bytes());
        self.drain();
    }

    /// Deletes the desired state of `deployment` at `revision`.
    pub fn delete(&mut self, deployment: &str, revision: u64) {
        let name = DeploymentName::new(deployment).expect("test deployment names are valid");
        self.log(format_args!("desired delete {deployment} rev {revision}"));
        self.oracle.saw_delete(deployment, revision);
        self.reconciler
            .handle_desired_delete(self.now, name, revision);
        self.drain();
    }

    /// Tells the reconciler the desired bucket holds exactly `present`.
    pub fn resync(&mut self, present: &BTreeSet<DeploymentName>) {
        self.log(format_args!("desired resync {} keys", present.len()));
        self.oracle.saw_resync(present);
        self.reconciler.handle_desired_resync(self.now, present);
        self.drain();
    }

    /// Simulates an agent restart: pending results are lost, the reconciler
    /// starts afresh from the persisted cache (or none).
    pub fn restart_agent(&mut self, keep_cache: bool) {
        self.log(format_args!(
            "agent restart (cache {})",
            if keep_cache { "kept" } else { "lost" }
        ));
        self.ready.clear();
        self.pending.clear();
        if !keep_cache {
            self.cache = None;
        }
        self.oracle.saw_agent_start();
        self.reconciler = Reconciler::new(self.config.clone(), self.cache.clone(), self.now);
        self.drain();
    }

    /// Crashes the container named `name`, if it runs, with exit `code`.
    pub fn crash(&mut self, name: &str, code: i64) -> bool {
        let Some(id) = self.runtime.by_name(name).map(|c| c.id.clone()) else {
            return false;
        };
        if !self.runtime.is_running(&id) {
            return false;
        }
        self.log(format_args!(
            "fault: {name} ({id}) crashes with exit {code}"
        ));
        let now = self.now;
        self.runtime.crash(now, &id, code);
        true
    }

    /// Runs until virtual time reaches `now + d`.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// Runs until virtual time reaches `until`, always jumping to the
    /// earliest next thing: a ready result, a container exit, a deadline.
    pub fn run_until(&mut self, until: Timestamp) {
        let mut idle_wakes = 0u32;
        loop {
            if let Some((at, _, _)) = self.ready.front() {
                if *at <= self.now {
                    if let Some((_, id, result)) = self.ready.pop_front() {
                        self.deliver(id, result);
                    }
                    continue;
                }
            }
            let mut next = until;
            if let Some(wake) = self.reconciler.poll_timeout() {
                next = next.min(wake.at);
            }
            if let Some(at) = self.runtime.next_event() {
                next = next.min(at);
            }
            if let Some((at, _, _)) = self.ready.front() {
                next = next.min(*at);
            }
            let next = next.max(self.now);
            self.now = next;
            self.runtime.advance(next);
            self.resolve_pending();
            if let Some(wake) = self.reconciler.poll_timeout().filter(|w| w.at <= self.now) {
                let before = self.ops.len() + self.published.len();
                self.reconciler.handle_timeout(self.now);
                self.drain();
                let progress = self.ops.len() + self.published.len() != before;
                if !progress
                    && self
                        .reconciler
                        .poll_timeout()
                        .is_some_and(|w| w.at <= self.now)
                {
                    idle_wakes += 1;
                    assert!(
                        idle_wakes < 1000,
                        "livelock: the reconciler keeps asking to be woken at {} for {:?} and does nothing\n{}",
                        self.now,
                        wake.reason,
                        self.transcript
                    );
                } else {
                    idle_wakes = 0;
                }
            }
            let idle = self.ready.front().is_none_or(|(at, _, _)| *at > self.now);
            if self.now >= until && idle {
                return;
            }
        }
    }

    fn resolve_pending(&mut self) {
        let mut still = Vec::new();
        for p in std::mem::take(&mut self.pending) {
            if self.runtime.is_running(&p.container) {
                still.push(p);
            } else {
                self.ready.push_back((self.now, p.id, p.result));
            }
        }
        self.pending = still;
    }

    fn deliver(&mut self, id: CommandId, result: RuntimeResult) {
        let text = match &result {
            Ok(RuntimeReply::Listed { containers }) => format!("listed {}", containers.len()),
            Ok(RuntimeReply::Created { id }) => format!("created {id}"),
            Ok(RuntimeReply::Inspected { status }) => {
                format!("inspected {} exit {:?}", status.state, status.exit_code)
            }
            Ok(RuntimeReply::Stopped { outcome }) => format!("stopped {outcome:?}"),
            Ok(other) => format!("{other:?}").to_lowercase(),
            Err(e) => format!("error {e}"),
        };
        self.log(format_args!("  <- {id} {text}"));
        if result.is_err() {
            self.errors += 1;
        }
        if matches!(result, Ok(RuntimeReply::Listed { .. })) {
            self.oracle.saw_list();
        }
        self.reconciler.handle_runtime_result(self.now, id, result);
        self.drain();
    }

    /// Drains the reconciler's outputs, executing runtime operations.
    fn drain(&mut self) {
        while let Some(output) = self.reconciler.poll_output() {
            match output {
                Output::Runtime { id, op } => self.execute(id, op),
                Output::PublishState { deployment, state } => {
                    self.log(format_args!(
                        "publish {deployment}: {:?} rev {} {:?}{}",
                        state.phase,
                        state.revision,
                        state.message,
                        state
                            .cause
                            .as_ref()
                            .map(|c| format!(" cause {c:?}"))
                            .unwrap_or_default()
                    ));
                    self.oracle.check_published(
                        self.now,
                        &deployment,
                        &state,
                        &self.runtime,
                        &mut self.violations,
                    );
                    self.states.insert(deployment.clone(), state.clone());
                    self.published.push((deployment, state));
                }
                Output::ClearState { deployment } => {
                    self.log(format_args!("clear {deployment}"));
                    self.states.remove(&deployment);
                }
                Output::Heartbeat(hb) => {
                    if self.log_heartbeats {
                        self.log(format_args!("heartbeat {:?}", hb.runtime));
                    }
                    self.heartbeats.push(hb);
                }
                Output::PersistCache(cache) => self.cache = Some(cache),
            }
        }
    }

    fn execute(&mut self, id: CommandId, op: RuntimeOp) {
        self.log(format_args!("  -> {id} {}", describe_op(&op)));
        self.oracle
            .check_op(self.now, &op, &self.runtime, &mut self.violations);
        self.ops.push((self.now, op.clone()));
        let fault = self.faults.get_mut(op.name()).and_then(VecDeque::pop_front);
        let completion = match fault {
            Some(OpFault::Fail(kind)) => Completion::Ready(Err(RuntimeError::new(
                kind,
                format!("injected {} failure", op.name()),
            ))),
            Some(OpFault::FailAfterEffect(kind)) => {
                let _ = self.runtime.execute(&op);
                Completion::Ready(Err(RuntimeError::new(
                    kind,
                    format!("injected {} failure after effect", op.name()),
                )))
            }
            None => self.runtime.execute(&op),
        };
        self.oracle
            .check_state(self.now, &self.runtime, &mut self.violations);
        match completion {
            Completion::Ready(result) => self.ready.push_back((self.now, id, result)),
            Completion::WhenStopped {
                id: container,
                result,
            } => self.pending.push(Pending {
                id,
                container,
                result,
            }),
        }
    }
}

/// What the reconciler has been told about one deployment.
#[derive(Debug, Clone)]
struct Seen {
    /// The newest revision seen, valid or not.
    latest: u64,
    /// The newest valid spec seen; `None` once deleted.
    valid: Option<ValidSpec>,
}

#[derive(Debug, Clone)]
struct ValidSpec {
    revision: u64,
    /// This revision and the earlier ones that put the same bytes with no
    /// other valid score in between: the reconciler runs no init container
    /// again for identical bytes, so what ran for any of them counts for all.
    revisions: BTreeSet<u64>,
    bytes: Vec<u8>,
    score: crate::wire::PodmanV0Score,
    /// Service name -> spec hash.
    hashes: BTreeMap<String, String>,
    /// Init container names, in order.
    inits: Vec<String>,
}

impl ValidSpec {
    /// Whether a container's revision label names this spec.
    fn is_revision(&self, label: &str) -> bool {
        label.parse().is_ok_and(|r| self.revisions.contains(&r))
    }

    /// Whether `spec` is, field for field and label for label, a container
    /// this score asks for at one of its revisions.
    fn produced(&self, deployment: &str, spec: &ContainerSpec) -> bool {
        let Some(revision) = spec
            .labels
            .get(crate::runtime::LABEL_REVISION)
            .and_then(|r| r.parse::<u64>().ok())
            .filter(|r| self.revisions.contains(r))
        else {
            return false;
        };
        let lifecycle = self.score.lifecycle_or_default();
        self.score.services.iter().any(|s| {
            crate::reconciler::service_container_spec(deployment, s, &lifecycle, revision) == *spec
        }) || self
            .score
            .init_containers
            .iter()
            .any(|i| crate::reconciler::init_container_spec(deployment, i, revision) == *spec)
    }

    /// Whether `spec` runs what this score asks of `service`: everything
    /// baked into the container (image, args, env, mounts, ports, stop
    /// signal, name and labels), whatever revision created it and whatever
    /// grace it recorded, since neither is baked in.
    fn runs_service(&self, deployment: &str, service: &str, spec: &ContainerSpec) -> bool {
        let lifecycle = self.score.lifecycle_or_default();
        self.score
            .services
            .iter()
            .filter(|s| s.name == service)
            .any(|s| {
                let wanted = crate::reconciler::service_container_spec(
                    deployment,
                    s,
                    &lifecycle,
                    self.revision,
                );
                baked_in(&wanted) == baked_in(spec)
            })
    }
}

/// A spec without the labels that are not baked into what runs.
fn baked_in(spec: &ContainerSpec) -> ContainerSpec {
    let mut spec = spec.clone();
    spec.labels.remove(crate::runtime::LABEL_REVISION);
    spec.labels.remove(crate::runtime::LABEL_GRACE);
    spec
}

/// The safety invariants, checked against the fake runtime's ground truth.
///
/// Tell it every desired-state input the reconciler is given, in the order
/// the reconciler is given them ([`saw_put`](Self::saw_put),
/// [`saw_delete`](Self::saw_delete), [`saw_resync`](Self::saw_resync));
/// then [`check_op`](Self::check_op) each runtime operation as it is issued,
/// [`check_state`](Self::check_state) after each one takes effect and
/// [`check_report`](Self::check_report) each state published. Violations are
/// appended in words, prefixed with the time and the invariant's name. The
/// [`Harness`], the simulator's network tiers and the fuzzer all use it.
///
/// What it holds a container to is the spec the fake recorded at its create
/// ([`FakeContainer::spec`]), compared with the spec the reconciler's own
/// builders make from the score: labels are checked, never trusted.
#[derive(Debug, Clone, Default)]
pub struct Oracle {
    seen: BTreeMap<String, Seen>,
    /// Every valid score ever seen, per deployment, oldest first: a stop is
    /// held to the score that created the container, however old.
    history: BTreeMap<String, Vec<ValidSpec>>,
    /// Whether a `list` has answered since the agent (re)started: before
    /// that, it knows nothing of what runs.
    listed: bool,
}

impl Oracle {
    /// The agent (re)started: it has not looked at the runtime yet.
    pub fn saw_agent_start(&mut self) {
        self.listed = false;
    }

    /// A `list` answered: the agent has looked at the runtime.
    pub fn saw_list(&mut self) {
        self.listed = true;
    }

    /// The reconciler was handed a put of `bytes` at `revision`.
    pub fn saw_put(&mut self, deployment: &str, revision: u64, bytes: &[u8]) {
        let entry = self.seen.entry(deployment.to_owned()).or_insert(Seen {
            latest: 0,
            valid: None,
        });
        if revision < entry.latest {
            return;
        }
        entry.latest = revision;
        if let Ok(score) = crate::wire::PodmanV0Score::from_json(bytes) {
            let signal = score.lifecycle_or_default().stop_signal;
            let hashes = score
                .services
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        crate::reconciler::service_spec_hash(s, signal),
                    )
                })
                .collect();
            let inits = score
                .init_containers
                .iter()
                .map(|i| i.name.clone())
                .collect();
            let mut revisions = match &entry.valid {
                // The same spec (the same bytes, or bytes that decode to an
                // equal score) keeps the init containers that ran for it.
                Some(v)
                    if v.bytes == bytes
                        || crate::wire::PodmanV0Score::from_json(&v.bytes).as_ref()
                            == Ok(&score) =>
                {
                    v.revisions.clone()
                }
                _ => BTreeSet::new(),
            };
            revisions.insert(revision);
            let valid = ValidSpec {
                revision,
                revisions,
                bytes: bytes.to_vec(),
                score,
                hashes,
                inits,
            };
            let history = self.history.entry(deployment.to_owned()).or_default();
            match history.last_mut() {
                Some(last) if last.bytes == bytes => *last = valid.clone(),
                _ => history.push(valid.clone()),
            }
            entry.valid = Some(valid);
        }
    }

    /// The reconciler was handed a delete at `revision`.
    pub fn saw_delete(&mut self, deployment: &str, revision: u64) {
        let entry = self.seen.entry(deployment.to_owned()).or_insert(Seen {
            latest: 0,
            valid: None,
        });
        if revision >= entry.latest {
            *entry = Seen {
                latest: revision,
                valid: None,
            };
        }
    }

    /// The reconciler was told the bucket holds exactly `present`: every
    /// other deployment is as good as deleted.
    pub fn saw_resync(&mut self, present: &BTreeSet<DeploymentName>) {
        for (name, seen) in &mut self.seen {
            let kept = DeploymentName::new(name.as_str()).is_ok_and(|n| present.contains(&n));
            if !kept {
                seen.valid = None;
            }
        }
    }

    /// The newest valid score the reconciler was handed for `deployment`
    /// since it was last deleted, with its revision.
    pub fn newest_valid(&self, deployment: &str) -> Option<(u64, &[u8])> {
        let v = self.seen.get(deployment)?.valid.as_ref()?;
        Some((v.revision, &v.bytes))
    }

    /// The score that created a container with `spec`, with its deployment:
    /// the one whose builders make exactly this spec. `None` for a
    /// container no score the reconciler was handed asks for.
    fn created_by(&self, spec: &ContainerSpec) -> Option<&ValidSpec> {
        self.history
            .iter()
            .flat_map(|(d, specs)| specs.iter().rev().map(move |v| (d, v)))
            .find(|(d, v)| v.produced(d, spec))
            .map(|(_, v)| v)
    }

    /// Checks, as `op` is issued, what the reconciler may ask for: no
    /// revert (2: what is created is exactly what the newest valid score
    /// asks for; what is started runs it), no healthy container touched
    /// (1), init containers first (3), graceful replace by recorded id with
    /// the stop signal the container was created with and the grace of the
    /// score that created it (4).
    pub fn check_op(
        &self,
        now: Timestamp,
        op: &RuntimeOp,
        runtime: &FakeRuntime,
        violations: &mut Vec<String>,
    ) {
        use crate::runtime::{
            LABEL_DEPLOYMENT, LABEL_GRACE, LABEL_INIT, LABEL_REVISION, LABEL_SERVICE,
        };
        let (spec, running) = match op {
            RuntimeOp::Create { spec } => (spec, false),
            RuntimeOp::Start { container }
            | RuntimeOp::Stop { container, .. }
            | RuntimeOp::Remove { container, .. } => {
                let found = runtime
                    .containers
                    .get(container.as_str())
                    .or_else(|| runtime.by_name(container));
                match found {
                    Some(c) => (&c.spec, runtime.is_running(&c.id)),
                    None => return,
                }
            }
            _ => return,
        };
        let labels = &spec.labels;
        let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
        let deployment = label(LABEL_DEPLOYMENT);
        let service = label(LABEL_SERVICE);
        let init = labels.contains_key(LABEL_INIT);
        let valid = self.seen.get(&deployment).and_then(|s| s.valid.as_ref());
        let mut violation = |what: String| violations.push(format!("{now}: {what}"));
        match op {
            RuntimeOp::Create { .. } | RuntimeOp::Start { .. } => {
                let ok = match (valid, op) {
                    (None, _) => false,
                    (Some(v), RuntimeOp::Create { .. }) => v.produced(&deployment, spec),
                    (Some(v), _) if init => v.produced(&deployment, spec),
                    (Some(v), _) => v.runs_service(&deployment, &service, spec),
                };
                if !ok {
                    let newest = valid.map_or("none since its delete".to_owned(), |v| {
                        format!("revision {}", v.revision)
                    });
                    violation(format!(
                        "no revert: {} of {deployment}/{service} (revision {}) which is not the newest valid spec seen ({newest}) as its score asks for it",
                        op.name(),
                        label(LABEL_REVISION)
                    ));
                }
                if let (RuntimeOp::Start { .. }, Some(v), false) = (op, valid, init) {
                    if v.is_revision(&label(LABEL_REVISION)) {
                        if let Err(why) = inits_completed(runtime, &deployment, v) {
                            violation(format!(
                                "init containers first: start of {deployment}/{service} (revision {}) but {why}",
                                v.revision
                            ));
                        }
                    }
                }
            }
            RuntimeOp::Stop {
                container,
                signal,
                grace,
            } if !init => {
                if !runtime.containers.contains_key(container.as_str()) {
                    violation(format!(
                        "graceful replace: stop of {deployment}/{service} by name {container:?}, not by its recorded id"
                    ));
                }
                // The signal is what the container was created with; the
                // grace is the one of the score that created it, or, for a
                // container no score asked for, its label.
                let recorded_grace = match self.created_by(spec) {
                    Some(v) => Some(v.score.lifecycle_or_default().grace_period()),
                    None => labels
                        .get(LABEL_GRACE)
                        .and_then(|g| g.parse().ok())
                        .map(Duration::from_secs),
                };
                if *signal != spec.stop_signal || Some(*grace) != recorded_grace {
                    violation(format!(
                        "graceful replace: stop of {deployment}/{service} with {} grace {}s, but it was created with {} grace {}",
                        signal,
                        grace.as_secs(),
                        spec.stop_signal,
                        recorded_grace.map_or("unknown".to_owned(), |g| format!("{}s", g.as_secs()))
                    ));
                }
            }
            RuntimeOp::Remove { container, .. } if running && !init => {
                violation(format!(
                    "graceful replace: remove of running {deployment}/{service} ({container}) without a stop first"
                ));
            }
            _ => {}
        }
        if running && !init && !matches!(op, RuntimeOp::Start { .. }) {
            let healthy_target = valid.is_some_and(|v| v.runs_service(&deployment, &service, spec));
            if healthy_target {
                violation(format!(
                    "healthy container recreated: {} of running {deployment}/{service} whose spec did not change",
                    op.name()
                ));
            }
        }
    }

    /// Checks the runtime's state: never two containers for one service (4).
    pub fn check_state(&self, now: Timestamp, runtime: &FakeRuntime, violations: &mut Vec<String>) {
        use crate::runtime::{LABEL_DEPLOYMENT, LABEL_INIT, LABEL_SERVICE};
        let mut per_service: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for c in runtime.containers.values() {
            if c.spec.labels.contains_key(LABEL_INIT) {
                continue;
            }
            let label = |k: &str| c.spec.labels.get(k).map_or("", String::as_str);
            *per_service
                .entry((label(LABEL_DEPLOYMENT), label(LABEL_SERVICE)))
                .or_default() += 1;
        }
        for ((deployment, service), n) in per_service {
            if n > 1 {
                violations.push(format!(
                    "{now}: graceful replace: {n} containers for service {deployment}/{service}"
                ));
            }
        }
    }

    /// Checks a state at the moment the agent publishes it: a report about
    /// containers (Running, or a crash loop) follows a `list` since the
    /// agent started, so it says what the agent saw rather than what its
    /// cache remembers (6), and then everything [`check_report`](Self::check_report) checks.
    pub fn check_published(
        &self,
        now: Timestamp,
        deployment: &DeploymentName,
        state: &DeploymentState,
        runtime: &FakeRuntime,
        violations: &mut Vec<String>,
    ) {
        let about_containers = state.phase == crate::wire::Phase::Running
            || matches!(
                state.cause,
                Some(crate::wire::FailureCause::CrashLoop { .. })
            );
        if about_containers && !self.listed {
            violations.push(format!(
                "{now}: truthful reports: {deployment} reported {:?} at revision {} before the agent, since it started, listed the runtime",
                state.phase, state.revision
            ));
        }
        self.check_report(now, deployment, state, runtime, violations);
    }

    /// Checks a state as it is published or stored: a Running report names only
    /// containers that were created, started and not removed (6). A
    /// container may have exited since (a crash races the report); it may
    /// not be unknown, never started or gone.
    pub fn check_report(
        &self,
        now: Timestamp,
        deployment: &DeploymentName,
        state: &DeploymentState,
        runtime: &FakeRuntime,
        violations: &mut Vec<String>,
    ) {
        if state.phase != crate::wire::Phase::Running {
            return;
        }
        let valid = self
            .seen
            .get(deployment.as_str())
            .and_then(|s| s.valid.as_ref())
            .filter(|v| v.revision == state.revision)
            // A summary leaves the ids out by design.
            .filter(|_| !state.summarised);
        if let Some(valid) = valid {
            for (service, hash) in &valid.hashes {
                let id = state.container_ids.get(service);
                let created_with = id
                    .and_then(|id| runtime.containers.get(id))
                    .and_then(|c| c.spec.labels.get(crate::runtime::LABEL_SPEC_HASH));
                if created_with != Some(hash) {
                    violations.push(format!(
                        "{now}: truthful reports: {deployment} reported Running at revision {} but service {service} {}",
                        state.revision,
                        match id {
                            None => "is not in the report".to_owned(),
                            Some(id) => format!("is reported as {id}, which is not its container for that revision"),
                        }
                    ));
                }
            }
        }
        for (service, id) in &state.container_ids {
            let started = runtime.containers.get(id).is_some_and(|c| c.starts > 0);
            if !started {
                violations.push(format!(
                    "{now}: truthful reports: {deployment} reported Running with {service}={id}, which {}",
                    if runtime.containers.contains_key(id) {
                        "was never started"
                    } else {
                        "does not exist"
                    }
                ));
            }
        }
    }
}

/// Whether every init container of `valid` exited 0, in order.
fn inits_completed(
    runtime: &FakeRuntime,
    deployment: &str,
    valid: &ValidSpec,
) -> Result<(), String> {
    use crate::runtime::LABEL_REVISION;
    let mut previous_exit = Timestamp::ZERO;
    for init in &valid.inits {
        let name = crate::runtime::init_container_name(deployment, init);
        let ids: BTreeSet<&str> = runtime
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                RuntimeEvent::Created { id, spec }
                    if spec.name == name
                        && spec
                            .labels
                            .get(LABEL_REVISION)
                            .is_some_and(|r| valid.is_revision(r)) =>
                {
                    Some(id.as_str())
                }
                _ => None,
            })
            .collect();
        let exit = runtime
            .events
            .iter()
            .rev()
            .filter_map(|(at, e)| match e {
                RuntimeEvent::Exited { id, code: 0 } if ids.contains(id.as_str()) => Some(*at),
                _ => None,
            })
            .next();
        match exit {
            Some(at) if at >= previous_exit => previous_exit = at,
            Some(_) => {
                return Err(format!(
                    "init container {init:?} finished before the one before it"
                ))
            }
            None => return Err(format!("init container {init:?} never exited 0")),
        }
    }
    Ok(())
}

/// A runtime operation in a few words, for transcripts.
pub fn describe_op(op: &RuntimeOp) -> String {
    match op {
        RuntimeOp::List => "list".into(),
        RuntimeOp::Create { spec } => format!(
            "create {} image {} rev {}",
            spec.name,
            spec.image,
            spec.labels
                .get(crate::runtime::LABEL_REVISION)
                .map_or("?", String::as_str)
        ),
        RuntimeOp::Stop {
            container,
            signal,
            grace,
        } => format!("stop {container} {signal} grace {}s", grace.as_secs()),
        RuntimeOp::Remove { container, force } => {
            format!("remove {container}{}", if *force { " force" } else { "" })
        }
        other => format!("{} {}", other.name(), other.container().unwrap_or("")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, image: &str, args: &[&str]) -> ContainerSpec {
        ContainerSpec {
            name: name.to_owned(),
            image: image.to_owned(),
            args: args.iter().map(|&a| a.to_owned()).collect(),
            env: BTreeMap::new(),
            volumes: Vec::new(),
            ports: Vec::new(),
            labels: BTreeMap::new(),
            stop_signal: Signal::Term,
        }
    }

    fn start(rt: &mut FakeRuntime, name: &str) {
        let started = rt.execute(&RuntimeOp::Start {
            container: name.to_owned(),
        });
        assert_eq!(started, Completion::Ready(Ok(RuntimeReply::Started)));
    }

    #[test]
    fn a_program_behaves_as_configured_whatever_its_image_and_logs_every_run() {
        let mut rt = FakeRuntime::new();
        rt.set_behaviour("img/a:1", Behaviour::exits(1, Duration::from_secs(5)));
        rt.set_program(
            &["echo", "hi"],
            Behaviour {
                output: vec!["hi".to_owned()],
                ..Behaviour::exits(0, Duration::ZERO)
            },
        );
        rt.create_quietly(spec("echo", "img/a:1", &["echo", "hi"]));
        rt.create_quietly(spec("other", "img/a:1", &["true"]));
        for run in 1..=2 {
            start(&mut rt, "echo");
            rt.advance(Timestamp::ZERO);
            let echo = rt.by_name("echo").map(|c| (c.state, c.exit_code));
            assert_eq!(echo, Some((ContainerState::Exited, Some(0))));
            assert_eq!(rt.log_lines("echo").map(|l| l.len()), Ok(run));
        }
        start(&mut rt, "other");
        rt.advance(Timestamp::ZERO);
        assert!(rt.by_name("other").is_some_and(|c| c.exit_at.is_some()));
        assert_eq!(rt.log_lines("other"), Ok(Vec::new()));
    }
}

#[cfg(test)]
mod oracle_tests {
    use super::*;
    use crate::reconciler::service_container_spec;
    use crate::runtime::{LABEL_GRACE, LABEL_STOP_SIGNAL};
    use crate::wire::PodmanV0Score;

    const V1: &str = r#"{"services":[{"name":"web","image":"img/a:1"}],"lifecycle":{"stop_signal":"SIGINT","grace_period_secs":2}}"#;
    /// The same service, a longer grace: nothing is recreated.
    const V2: &str = r#"{"services":[{"name":"web","image":"img/a:1"}],"lifecycle":{"stop_signal":"SIGINT","grace_period_secs":9}}"#;
    const OTHER: &str = r#"{"services":[{"name":"web","image":"img/b:1"}]}"#;

    fn web_spec(json: &str, revision: u64) -> ContainerSpec {
        let score = PodmanV0Score::from_json(json.as_bytes()).unwrap();
        service_container_spec(
            "shop",
            &score.services[0],
            &score.lifecycle_or_default(),
            revision,
        )
    }

    fn check(oracle: &Oracle, rt: &FakeRuntime, op: &RuntimeOp) -> Vec<String> {
        let mut found = Vec::new();
        oracle.check_op(Timestamp::ZERO, op, rt, &mut found);
        found
    }

    /// Creates `spec` as the reconciler would, checked, and starts it.
    fn create_and_start(oracle: &Oracle, rt: &mut FakeRuntime, spec: ContainerSpec) -> String {
        let create = RuntimeOp::Create { spec };
        assert_eq!(check(oracle, rt, &create), Vec::<String>::new());
        let Completion::Ready(Ok(RuntimeReply::Created { id })) = rt.execute(&create) else {
            panic!("created");
        };
        rt.execute(&RuntimeOp::Start {
            container: id.clone(),
        });
        id
    }

    fn stop(id: &str, signal: Signal, grace_secs: u64) -> RuntimeOp {
        RuntimeOp::Stop {
            container: id.to_owned(),
            signal,
            grace: Duration::from_secs(grace_secs),
        }
    }

    #[test]
    fn a_stop_is_held_to_what_the_container_was_created_with() {
        let mut oracle = Oracle::default();
        let mut rt = FakeRuntime::new();
        oracle.saw_put("shop", 5, V1.as_bytes());
        let id = create_and_start(&oracle, &mut rt, web_spec(V1, 5));
        oracle.saw_put("shop", 6, V2.as_bytes());
        oracle.saw_put("shop", 7, OTHER.as_bytes());
        assert_eq!(
            check(&oracle, &rt, &stop(&id, Signal::Int, 2)),
            Vec::<String>::new()
        );
        // The newer score's grace is not the one it was created with.
        let found = check(&oracle, &rt, &stop(&id, Signal::Int, 9));
        assert!(found[0].contains("graceful replace"), "{found:?}");
        let found = check(&oracle, &rt, &stop(&id, Signal::Term, 2));
        assert!(
            found[0].contains("created with SIGINT grace 2s"),
            "{found:?}"
        );
    }

    #[test]
    fn labels_that_lie_are_caught_at_create_and_at_stop() {
        let mut oracle = Oracle::default();
        let mut rt = FakeRuntime::new();
        oracle.saw_put("shop", 5, V1.as_bytes());
        let mut lying = web_spec(V1, 5);
        lying.labels.insert(LABEL_GRACE.into(), "30".into());
        lying
            .labels
            .insert(LABEL_STOP_SIGNAL.into(), "SIGKILL".into());
        let create = RuntimeOp::Create {
            spec: lying.clone(),
        };
        let found = check(&oracle, &rt, &create);
        assert!(
            found[0].contains("no revert: create of shop/web"),
            "{found:?}"
        );
        let id = rt.create_quietly(lying);
        rt.execute(&RuntimeOp::Start {
            container: id.clone(),
        });
        // Stopped as its labels say: the signal it was created with is SIGINT.
        let found = check(&oracle, &rt, &stop(&id, Signal::Kill, 30));
        assert!(
            found.iter().any(|v| v.contains("graceful replace")),
            "{found:?}"
        );
    }

    #[test]
    fn an_older_revision_delivered_late_is_never_the_one_to_run() {
        let mut oracle = Oracle::default();
        let rt = FakeRuntime::new();
        oracle.saw_put("shop", 7, OTHER.as_bytes());
        // A watch delivers revision 5 after 7, and the reconciler acts on it.
        oracle.saw_put("shop", 5, V1.as_bytes());
        let found = check(
            &oracle,
            &rt,
            &RuntimeOp::Create {
                spec: web_spec(V1, 5),
            },
        );
        assert!(found[0].contains("no revert"), "{found:?}");
        let newest = RuntimeOp::Create {
            spec: web_spec(OTHER, 7),
        };
        assert_eq!(check(&oracle, &rt, &newest), Vec::<String>::new());
        assert_eq!(oracle.newest_valid("shop").map(|(r, _)| r), Some(7));
    }
}
