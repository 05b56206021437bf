//! A pure model of podman: [`FakeRuntime`].
//!
//! It models what the reconciler relies on: containers by name and id,
//! created/running/exited states, exit codes, labels, stop with a signal
//! then a grace then a kill, name conflicts, missing images, the lines a
//! program writes and the libpod race (inspect still saying "running" just
//! after an exit). It runs no programs: how each behaves is configured, by
//! its argv or its image ([`crate::images`] is the catalogue the drivers
//! share). It has no clock of its own: time moves only when the caller says
//! so.
//!
//! [`crate::conformance`] states podman's behaviour and runs against both
//! real podman and this model; where they differ, this model is wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use podfleet_core::runtime::{
    ContainerSpec, ContainerState, ContainerStatus, ContainerSummary, RuntimeError,
    RuntimeErrorKind, RuntimeOp, RuntimeReply, RuntimeResult, StopOutcome, LABEL_MANAGED,
};
use podfleet_core::time::Timestamp;
use podfleet_core::wire::Signal;

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

/// The version a [`FakeRuntime`] states until told otherwise.
pub const FAKE_VERSION: &str = "fake-podman 0.0";

/// A pure model of podman. See the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct FakeRuntime {
    now: Timestamp,
    containers: BTreeMap<String, FakeContainer>,
    next_id: u64,
    missing_images: BTreeSet<String>,
    behaviours: Behaviours,
    events: Vec<(Timestamp, RuntimeEvent)>,
    /// Set by [`FakeRuntime::set_version`]; [`FAKE_VERSION`] otherwise.
    version: Option<String>,
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

    /// The version the runtime states, as podman's `/version` does:
    /// [`FAKE_VERSION`] unless [`set_version`](Self::set_version) changed it.
    pub fn version(&self) -> String {
        self.version.as_deref().unwrap_or(FAKE_VERSION).to_owned()
    }

    /// Makes the runtime state `version` from now on (an upgrade).
    pub fn set_version(&mut self, version: &str) {
        self.version = Some(version.to_owned());
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
