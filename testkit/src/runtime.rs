//! A pure model of podman: [`FakeRuntime`].
//!
//! It models what the reconciler relies on: containers by name and id,
//! created/running/exited states, exit codes, labels, stop with a signal
//! then a grace then a kill, name conflicts, the lines a program writes and
//! the libpod race (inspect still saying "running" just after an exit); and
//! images: a local [`ImageStore`] (every image present unless taken out)
//! and the [`FakeRegistry`] pulls come from, whose failures (down, refused
//! credentials, unknown image, full disk) and transfer times it models. It runs no programs: how each behaves is configured, by
//! its argv or its image ([`crate::images`] is the catalogue the drivers
//! share). It has no clock of its own: time moves only when the caller says
//! so.
//!
//! Containers hold the files `copy_file` wrote into them (created, running
//! or exited), and nothing else. An `exec` in a running container is
//! answered by [`crate::shell`]'s model of busybox `sh` and `cat` over
//! those files: at once, or once the time its `sleep`s add up to has
//! passed, or, for a script that hangs, never. An exec outlives no stop:
//! one still running when its container stops ends with 137 then
//! ([`Completion::AtUnlessStopped`], [`Completion::WhenStopped`]); podman
//! does the same, but when the container is force-removed it answers the
//! exec's inspect with "no such exec session", where this model still
//! says 137. An exec in a container that is not running fails with
//! podman's words.
//!
//! [`crate::conformance`] states podman's behaviour and runs against both
//! real podman and this model; where they differ, this model is wrong.

use std::collections::BTreeMap;
use std::time::Duration;

use podfleet_core::runtime::{
    copy_file_target, ContainerSpec, ContainerState, ContainerStatus, ContainerSummary, DiskUsage,
    ImageInfo, ImageSummary, PullProgress, RuntimeError, RuntimeErrorKind, RuntimeOp, RuntimeReply,
    RuntimeResult, StopOutcome, EXEC_OUTPUT_MAX_BYTES, LABEL_MANAGED,
};
use podfleet_core::time::Timestamp;
use podfleet_core::wire::text::bounded_tail;
use podfleet_core::wire::{PullFailure, Signal};

use crate::registry::{FakeRegistry, ImageStore, Layer, StoredImage};
use crate::shell::{self, ExecEnd, FakeFile};

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
    /// The id of the image it was created from, as the store had it then.
    pub image_id: Option<String>,
    /// When it will exit, with which code, and whether by the kill.
    exit_at: Option<(Timestamp, i64, bool)>,
    /// Inspect says "running" until then.
    lagging_until: Option<Timestamp>,
    /// The signal and grace of the stop in progress.
    stopping: Option<(Signal, Duration)>,
    /// What its runs wrote, oldest first.
    logs: Vec<String>,
    /// The files `copy_file` wrote, by absolute path.
    files: BTreeMap<String, FakeFile>,
}

impl FakeContainer {
    /// The files copied into it, by absolute path (the image's own files
    /// are not modelled).
    pub fn files(&self) -> &BTreeMap<String, FakeFile> {
        &self.files
    }
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
    /// A pull landed: the image is in the store.
    ImagePulled {
        /// The reference pulled.
        image: String,
        /// The manifest digest it was pulled by.
        digest: Option<String>,
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
    /// Once the fake's time reaches `at` (a pull, which takes its transfer
    /// time; the image is in the store from then on).
    At {
        /// When.
        at: Timestamp,
        /// The result to hand over then.
        result: RuntimeResult,
    },
    /// At `at`, unless the container `id` stops running first (an exec
    /// that takes time: stopping its container kills it).
    AtUnlessStopped {
        /// When, if the container still runs.
        at: Timestamp,
        /// The result to hand over then.
        result: RuntimeResult,
        /// The container.
        id: String,
        /// The result to hand over once it no longer runs, if that is
        /// before `at`.
        stopped: RuntimeResult,
    },
}

/// A pull under way: where its image lands, and when.
#[derive(Debug, Clone)]
struct PullInFlight {
    /// When its first layer byte comes (after the manifest's round trip).
    bytes_from: Timestamp,
    done_at: Timestamp,
    image: String,
    stored: StoredImage,
    /// The layers it fetches, in order; the others were in the store.
    missing: Vec<Layer>,
}

impl PullInFlight {
    fn bytes(&self) -> u64 {
        self.missing.iter().map(|l| l.size).sum()
    }
}

/// The version a [`FakeRuntime`] states until told otherwise.
pub const FAKE_VERSION: &str = "fake-podman 0.0";

/// A pure model of podman. See the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct FakeRuntime {
    now: Timestamp,
    containers: BTreeMap<String, FakeContainer>,
    next_id: u64,
    images: ImageStore,
    registry: FakeRegistry,
    pulls: Vec<PullInFlight>,
    behaviours: Behaviours,
    events: Vec<(Timestamp, RuntimeEvent)>,
    /// Set by [`FakeRuntime::set_version`]; [`FAKE_VERSION`] otherwise.
    version: Option<String>,
}

impl FakeRuntime {
    /// An empty runtime where every image is present and runs forever, and
    /// whose registry is up and has nothing.
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

    /// Makes `image` absent from the local store: creating from it fails
    /// with `ImageMissing`, inspecting it finds nothing, a pull may bring
    /// it back.
    pub fn remove_image(&mut self, image: &str) {
        self.images.remove(image);
    }

    /// Makes `image` present again (as preloaded, unless the store has it).
    pub fn add_image(&mut self, image: &str) {
        self.images.restore(image);
    }

    /// What the local store has for `image`: `inspect image`'s answer.
    pub fn image(&self, image: &str) -> Option<ImageInfo> {
        self.images.get(image)
    }

    /// The local image store.
    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    /// The local image store, to change (make it [`ImageStore::empty`],
    /// limit its disk).
    pub fn images_mut(&mut self) -> &mut ImageStore {
        &mut self.images
    }

    /// The registry pulls come from.
    pub fn registry(&self) -> &FakeRegistry {
        &self.registry
    }

    /// The registry pulls come from, to push to, take down, slow down or
    /// make refuse the device's credentials.
    pub fn registry_mut(&mut self) -> &mut FakeRegistry {
        &mut self.registry
    }

    /// How far the pull of `image` has got, as podman's progress stream
    /// tells it: the layers it fetches arrive one after the other, their
    /// bytes evenly from the manifest's round trip until the pull lands;
    /// layers the store already held count as done from the start, with
    /// no bytes.
    pub fn pull_progress(&self, image: &str) -> Option<PullProgress> {
        let pull = self.pulls.iter().find(|p| p.image == image)?;
        let span = pull.done_at.saturating_since(pull.bytes_from).as_millis();
        let gone = self.now.saturating_since(pull.bytes_from).as_millis();
        let total = pull.bytes();
        let downloaded = match span {
            0 => total,
            span => u64::try_from(u128::from(total) * gone.min(span) / span).unwrap_or(total),
        };
        let mut fetched = 0;
        let fetched_layers = pull
            .missing
            .iter()
            .take_while(|l| {
                fetched += l.size;
                fetched <= downloaded
            })
            .count();
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let layers = pull.stored.layers.len();
        Some(PullProgress {
            downloaded,
            total,
            layers_done: count(layers - pull.missing.len() + fetched_layers),
            layers: count(layers),
        })
    }

    /// Pulls under way: the image and when it lands.
    pub fn pulls_in_flight(&self) -> impl Iterator<Item = (&str, Timestamp)> {
        self.pulls.iter().map(|p| (p.image.as_str(), p.done_at))
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

    /// The next instant something happens on its own (an exit, a pull
    /// landing).
    pub fn next_event(&self) -> Option<Timestamp> {
        self.containers
            .values()
            .filter_map(|c| c.exit_at.map(|(at, _, _)| at))
            .chain(self.pulls.iter().map(|p| p.done_at))
            .min()
    }

    /// Moves the fake's time to `now`, applying due exits and landing due
    /// pulls.
    pub fn advance(&mut self, now: Timestamp) {
        self.now = self.now.max(now);
        let now = self.now;
        let (landed, still) = std::mem::take(&mut self.pulls)
            .into_iter()
            .partition(|p| p.done_at <= now);
        self.pulls = still;
        for p in landed {
            self.events.push((
                p.done_at,
                RuntimeEvent::ImagePulled {
                    image: p.image.clone(),
                    digest: p.stored.info.digest.clone(),
                },
            ));
            self.images.insert(&p.image, p.stored);
        }
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
        if !self.images.contains(&spec.image) {
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
        let image_id = self.images.get(&spec.image).map(|i| i.id);
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
                image_id,
                exit_at: None,
                lagging_until: None,
                stopping: None,
                logs: Vec::new(),
                files: BTreeMap::new(),
            },
        );
        Ok(id)
    }

    /// Begins a pull of `image`: its outcome is decided now, from the
    /// registry's state, and handed over once the transfer is done.
    fn pull(&mut self, image: &str) -> Completion {
        let failed = |reason, message: String| {
            Completion::Ready(Err(RuntimeError::new(
                RuntimeErrorKind::Pull(reason),
                message,
            )))
        };
        let manifest = match self.registry.resolve(image) {
            Ok(manifest) => manifest.clone(),
            Err((reason, message)) => return failed(reason, message),
        };
        let stored = FakeRegistry::pulled(&manifest);
        let have = self.images.get(image).and_then(|i| i.digest);
        // Only the layers the store lacks are fetched ("Already exists" for
        // the others); with the same digest in the store, only the manifest.
        let missing: Vec<Layer> = if have.as_ref() == Some(&manifest.digest) {
            Vec::new()
        } else {
            manifest
                .layers
                .iter()
                .filter(|l| !self.images.has_layer(&l.digest))
                .cloned()
                .collect()
        };
        let bytes = missing.iter().map(|l| l.size).sum();
        let reserved = self.pulls.iter().map(PullInFlight::bytes).sum();
        if bytes > 0 && !self.images.fits(bytes, reserved) {
            return failed(
                PullFailure::NoSpace,
                format!(
                    "writing blob: storing blob to file: write /var/lib/containers/storage: no space left on device ({image})"
                ),
            );
        }
        let (_, round_trip) = self.registry.speed();
        let at = self.now + self.registry.transfer_time(bytes);
        let info = stored.info.clone();
        self.pulls.push(PullInFlight {
            bytes_from: self.now + round_trip,
            done_at: at,
            image: image.to_owned(),
            stored,
            missing,
        });
        Completion::At {
            at,
            result: Ok(RuntimeReply::Pulled { image: info }),
        }
    }

    /// The store's images, as `list_images` answers: the containers using
    /// each one (of any owner, in any state) counted, and the disk as full
    /// as its pulled images make it when its capacity is limited.
    fn list_images(&self) -> RuntimeReply {
        let images = self
            .images
            .list()
            .into_iter()
            .map(|(id, names, size)| ImageSummary {
                containers: u32::try_from(
                    self.containers
                        .values()
                        .filter(|c| self.images.get(&c.spec.image).is_some_and(|i| i.id == id))
                        .count(),
                )
                .unwrap_or(u32::MAX),
                id,
                names,
                size,
                created: 0,
            })
            .collect();
        let disk = self.images.capacity().map(|total| DiskUsage {
            used: self.images.used(),
            total,
        });
        RuntimeReply::ImagesListed { images, disk }
    }

    /// `remove_image`: refused while a container uses the image.
    fn remove_image_by_id(&mut self, id: &str) -> RuntimeResult {
        let in_use = self
            .containers
            .values()
            .any(|c| self.images.get(&c.spec.image).is_some_and(|i| i.id == id));
        if in_use {
            return Err(RuntimeError::new(
                RuntimeErrorKind::ImageInUse,
                format!("image used by a container: image is in use by a container: consider listing external containers and force-removing image ({id})"),
            ));
        }
        if self.images.remove_id(id) {
            Ok(RuntimeReply::ImageRemoved)
        } else {
            Err(RuntimeError::new(
                RuntimeErrorKind::NotFound,
                format!("{id}: image not known"),
            ))
        }
    }

    /// `copy_file`: into a container in any state, replacing the file.
    fn copy_file(
        &mut self,
        container: &str,
        path: &str,
        content: &str,
        mode: u32,
    ) -> RuntimeResult {
        copy_file_target(path)?;
        let id = self.find(container)?;
        if let Some(c) = self.containers.get_mut(&id) {
            let file = FakeFile {
                content: content.to_owned(),
                mode: mode & 0o7777,
            };
            c.files.insert(path.to_owned(), file);
        }
        Ok(RuntimeReply::FileCopied)
    }

    /// `exec`: as [`crate::shell`] models it, in a running container.
    fn exec(&mut self, container: &str, argv: &[String]) -> Completion {
        let id = match self.find(container) {
            Ok(id) => id,
            Err(e) => return Completion::Ready(Err(e)),
        };
        let c = &self.containers[&id];
        if c.state != ContainerState::Running {
            return Completion::Ready(Err(RuntimeError::new(
                RuntimeErrorKind::Other,
                "can only create exec sessions on running containers: container state improper",
            )));
        }
        let run = shell::run(argv, &c.files);
        let output = bounded_tail(&run.output, EXEC_OUTPUT_MAX_BYTES);
        let killed = Ok(RuntimeReply::Executed {
            exit_code: shell::KILLED,
            output: output.clone(),
        });
        match run.end {
            ExecEnd::Exits { code, after } => {
                let result = Ok(RuntimeReply::Executed {
                    exit_code: code,
                    output,
                });
                if after.is_zero() {
                    Completion::Ready(result)
                } else {
                    Completion::AtUnlessStopped {
                        at: self.now + after,
                        result,
                        id,
                        stopped: killed,
                    }
                }
            }
            ExecEnd::Hangs => Completion::WhenStopped { id, result: killed },
        }
    }

    /// Executes `op` at the fake's current time.
    pub fn execute(&mut self, op: &RuntimeOp) -> Completion {
        let now = self.now;
        let ready = Completion::Ready;
        match op {
            RuntimeOp::ListImages => ready(Ok(self.list_images())),
            RuntimeOp::RemoveImage { id } => ready(self.remove_image_by_id(id)),
            RuntimeOp::CopyFile {
                container,
                path,
                content,
                mode,
            } => ready(self.copy_file(container, path, content, *mode)),
            RuntimeOp::Exec { container, argv } => self.exec(container, argv),
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
                        image_id: c.image_id.clone(),
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
            RuntimeOp::InspectImage { image } => ready(Ok(RuntimeReply::ImageInspected {
                image: self.images.get(image),
            })),
            RuntimeOp::Pull { image } => self.pull(image),
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

    fn pull(rt: &mut FakeRuntime, image: &str) -> Completion {
        rt.execute(&RuntimeOp::Pull {
            image: image.to_owned(),
        })
    }

    fn inspect_image(rt: &mut FakeRuntime, image: &str) -> Option<ImageInfo> {
        match rt.execute(&RuntimeOp::InspectImage {
            image: image.to_owned(),
        }) {
            Completion::Ready(Ok(RuntimeReply::ImageInspected { image })) => image,
            other => panic!("inspect image answered {other:?}"),
        }
    }

    fn pull_failure(completion: Completion) -> Option<PullFailure> {
        match completion {
            Completion::Ready(Err(RuntimeError {
                kind: RuntimeErrorKind::Pull(reason),
                ..
            })) => Some(reason),
            _ => None,
        }
    }

    #[test]
    fn a_pull_lands_after_its_transfer_time_and_then_creates_work() {
        let mut rt = FakeRuntime::new();
        rt.images_mut().set_capacity(Some(100_000_000));
        rt.remove_image("img/a:2");
        let digest = rt.registry_mut().push("img/a:2", 30_000_000);
        let created = rt.execute(&RuntimeOp::Create {
            spec: spec("web", "img/a:2", &[]),
        });
        assert!(
            matches!(&created, Completion::Ready(Err(e)) if e.kind == RuntimeErrorKind::ImageMissing),
            "{created:?}"
        );
        let Completion::At { at, result } = pull(&mut rt, "img/a:2") else {
            panic!("a pull takes time");
        };
        // 100 ms round trip, 30 MB at 10 MB/s.
        assert_eq!(at, Timestamp::from_millis(3_100));
        assert!(
            matches!(&result, Ok(RuntimeReply::Pulled { image }) if image.digest.as_ref() == Some(&digest))
        );
        assert_eq!(rt.next_event(), Some(at));
        rt.advance(Timestamp::from_millis(3_099));
        assert_eq!(inspect_image(&mut rt, "img/a:2"), None);
        rt.advance(at);
        let info = inspect_image(&mut rt, "img/a:2").expect("pulled");
        assert_eq!(info.digest, Some(digest.clone()));
        assert_eq!(rt.images().used(), 30_000_000);
        assert!(matches!(
            rt.events().last(),
            Some((t, RuntimeEvent::ImagePulled { image, digest: Some(d) })) if *t == at && image == "img/a:2" && *d == digest
        ));
        rt.create_quietly(spec("web", "img/a:2", &[]));
        assert!(rt.by_name("web").is_some());
        // The same digest again: only the round trip, and no more disk.
        let Completion::At { at: again, .. } = pull(&mut rt, "img/a:2") else {
            panic!("a pull takes time");
        };
        assert_eq!(again, at + Duration::from_millis(100));
        // The tag moves: the next pull brings the new digest.
        let moved = rt.registry_mut().push("img/a:2", 10_000_000);
        rt.advance(again);
        let Completion::At { at, result } = pull(&mut rt, "img/a:2") else {
            panic!("a pull takes time");
        };
        rt.advance(at);
        assert!(
            matches!(result, Ok(RuntimeReply::Pulled { image }) if image.digest == Some(moved.clone()))
        );
        assert_eq!(
            inspect_image(&mut rt, "img/a:2").and_then(|i| i.digest),
            Some(moved)
        );
        assert_eq!(rt.images().used(), 10_000_000);
    }

    #[test]
    fn pulls_fail_as_the_registry_and_the_disk_say_and_inspect_never_does() {
        let mut rt = FakeRuntime::new();
        rt.registry_mut().push("img/a:2", 50);
        rt.remove_image("img/a:2");
        assert_eq!(
            pull_failure(pull(&mut rt, "img/b:1")),
            Some(PullFailure::NotFound)
        );
        assert_eq!(
            pull_failure(pull(&mut rt, "127.0.0.1:1/podfleet-nothing:1")),
            Some(PullFailure::Network)
        );
        rt.registry_mut().set_accepts_credentials(false);
        assert_eq!(
            pull_failure(pull(&mut rt, "img/a:2")),
            Some(PullFailure::Unauthorized)
        );
        rt.registry_mut().set_up(false);
        assert_eq!(
            pull_failure(pull(&mut rt, "img/a:2")),
            Some(PullFailure::Network)
        );
        // The store answers whatever the registry does.
        assert!(inspect_image(&mut rt, "img/a:1").is_some());
        assert_eq!(inspect_image(&mut rt, "img/a:2"), None);
        rt.registry_mut().set_up(true);
        rt.registry_mut().set_accepts_credentials(true);
        rt.images_mut().set_capacity(Some(80));
        // Two pulls at once: the second does not fit beside the first.
        assert!(matches!(pull(&mut rt, "img/a:2"), Completion::At { .. }));
        rt.registry_mut().push("img/c:1", 40);
        assert_eq!(
            pull_failure(pull(&mut rt, "img/c:1")),
            Some(PullFailure::NoSpace)
        );
        rt.images_mut().set_capacity(None);
        assert!(matches!(pull(&mut rt, "img/c:1"), Completion::At { .. }));
    }

    #[test]
    fn a_pull_fetches_only_the_layers_the_store_lacks_and_reports_them() {
        let mut rt = FakeRuntime::new();
        *rt.images_mut() = ImageStore::empty();
        rt.images_mut().set_capacity(Some(100_000_000));
        let base = Layer::named("debian", 40_000_000);
        let app = |v: &str| Layer::named(&format!("app {v}"), 10_000_000);
        rt.registry_mut()
            .push_layers("img/a:1", vec![base.clone(), app("1")]);
        rt.registry_mut()
            .push_layers("img/a:2", vec![base.clone(), app("2"), app("2 config")]);
        // The first image brings the base: 100 ms + 50 MB at 10 MB/s.
        let Completion::At { at, .. } = pull(&mut rt, "img/a:1") else {
            panic!("a pull takes time");
        };
        assert_eq!(at, Timestamp::from_millis(5_100));
        // Halfway through the base: no layer done yet.
        rt.advance(Timestamp::from_millis(2_100));
        assert_eq!(
            rt.pull_progress("img/a:1"),
            Some(PullProgress {
                downloaded: 20_000_000,
                total: 50_000_000,
                layers_done: 0,
                layers: 2,
            })
        );
        rt.advance(Timestamp::from_millis(4_600));
        assert_eq!(
            rt.pull_progress("img/a:1")
                .map(|p| (p.downloaded, p.layers_done)),
            Some((45_000_000, 1))
        );
        rt.advance(at);
        assert_eq!(rt.pull_progress("img/a:1"), None);
        assert_eq!(rt.images().used(), 50_000_000);
        // The upgrade shares the base: only its two own layers travel, and
        // the base counts as done from the start.
        let Completion::At { at: upgraded, .. } = pull(&mut rt, "img/a:2") else {
            panic!("a pull takes time");
        };
        assert_eq!(upgraded, at + Duration::from_millis(2_100));
        assert_eq!(
            rt.pull_progress("img/a:2"),
            Some(PullProgress {
                downloaded: 0,
                total: 20_000_000,
                layers_done: 1,
                layers: 3,
            })
        );
        rt.advance(upgraded);
        assert_eq!(rt.images().used(), 70_000_000, "the base is held once");
        // 10 MB of room left: a 50 MB image on the same base fits, since
        // only its own 10 MB layer travels.
        rt.images_mut().set_capacity(Some(80_000_000));
        rt.registry_mut()
            .push_layers("img/b:1", vec![base.clone(), app("b")]);
        let Completion::At { at: b, .. } = pull(&mut rt, "img/b:1") else {
            panic!("the base is shared, so 10 MB fit");
        };
        rt.advance(b);
        assert_eq!(rt.images().used(), 80_000_000);
        // Removing an image frees only what no other image uses.
        let one = rt.image("img/a:1").unwrap().id;
        assert!(matches!(
            rt.execute(&RuntimeOp::RemoveImage { id: one }),
            Completion::Ready(Ok(RuntimeReply::ImageRemoved))
        ));
        assert_eq!(rt.images().used(), 70_000_000);
        let listed = match rt.execute(&RuntimeOp::ListImages) {
            Completion::Ready(Ok(RuntimeReply::ImagesListed { images, disk })) => {
                assert_eq!(disk.map(|d| d.used), Some(70_000_000));
                images
            }
            other => panic!("list images answered {other:?}"),
        };
        // podman states each image's full size, shared layers included.
        let sizes: Vec<u64> = listed.iter().map(|i| i.size).collect();
        assert_eq!(sizes.iter().sum::<u64>(), 110_000_000, "{listed:?}");
    }

    fn copy(rt: &mut FakeRuntime, container: &str, path: &str, content: &str) -> Completion {
        rt.execute(&RuntimeOp::CopyFile {
            container: container.to_owned(),
            path: path.to_owned(),
            content: content.to_owned(),
            mode: 0o700,
        })
    }

    fn exec(rt: &mut FakeRuntime, container: &str, argv: &[&str]) -> Completion {
        rt.execute(&RuntimeOp::Exec {
            container: container.to_owned(),
            argv: argv.iter().map(|&a| a.to_owned()).collect(),
        })
    }

    fn executed(code: i64, output: &str) -> RuntimeResult {
        Ok(RuntimeReply::Executed {
            exit_code: code,
            output: output.to_owned(),
        })
    }

    const SETUP: &[&str] = &["/bin/sh", "-e", "-o", "pipefail", "/.podfleet/setup.sh"];

    #[test]
    fn files_are_copied_into_a_container_in_any_state_and_execs_need_it_running() {
        let mut rt = FakeRuntime::new();
        let id = rt.create_quietly(spec("web", "img/a:1", &[]));
        let copied = copy(&mut rt, "web", "/.podfleet/setup.sh", "echo hi\nexit 3\n");
        assert_eq!(copied, Completion::Ready(Ok(RuntimeReply::FileCopied)));
        let file = rt.containers()[&id]
            .files()
            .get("/.podfleet/setup.sh")
            .cloned();
        assert_eq!(file.map(|f| f.mode), Some(0o700));
        let refused = |c: Completion| match c {
            Completion::Ready(Err(e)) => Some(e.kind),
            _ => None,
        };
        assert_eq!(
            refused(exec(&mut rt, "web", SETUP)),
            Some(RuntimeErrorKind::Other)
        );
        start(&mut rt, "web");
        assert_eq!(
            exec(&mut rt, "web", SETUP),
            Completion::Ready(executed(3, "hi\n"))
        );
        assert_eq!(
            refused(copy(&mut rt, "ghost", "/a", "")),
            Some(RuntimeErrorKind::NotFound)
        );
        assert_eq!(
            refused(exec(&mut rt, "ghost", SETUP)),
            Some(RuntimeErrorKind::NotFound)
        );
        assert_eq!(
            refused(copy(&mut rt, "web", "../a", "")),
            Some(RuntimeErrorKind::Other)
        );
        rt.crash(Timestamp::ZERO, &id, 1);
        assert_eq!(
            refused(exec(&mut rt, "web", SETUP)),
            Some(RuntimeErrorKind::Other)
        );
        assert!(matches!(
            copy(&mut rt, "web", "/.podfleet/provisioned", "done\n"),
            Completion::Ready(Ok(RuntimeReply::FileCopied))
        ));
    }

    #[test]
    fn an_exec_takes_its_sleeps_unless_its_container_stops_and_a_hang_waits_for_the_stop() {
        let mut rt = FakeRuntime::new();
        let id = rt.create_quietly(spec("web", "img/a:1", &[]));
        start(&mut rt, "web");
        copy(
            &mut rt,
            "web",
            "/.podfleet/setup.sh",
            "sleep 30\necho done\n",
        );
        assert_eq!(
            exec(&mut rt, "web", SETUP),
            Completion::AtUnlessStopped {
                at: Timestamp::from_millis(30_000),
                result: executed(0, "done\n"),
                id: id.clone(),
                stopped: executed(137, "done\n"),
            }
        );
        copy(
            &mut rt,
            "web",
            "/.podfleet/setup.sh",
            "echo waiting\nhang\n",
        );
        assert_eq!(
            exec(&mut rt, "web", SETUP),
            Completion::WhenStopped {
                id,
                result: executed(137, "waiting\n"),
            }
        );
    }

    #[test]
    fn an_execs_output_keeps_its_end() {
        let mut rt = FakeRuntime::new();
        rt.create_quietly(spec("web", "img/a:1", &[]));
        start(&mut rt, "web");
        let script: String = (0..1000).map(|i| format!("echo line {i}\n")).collect();
        copy(&mut rt, "web", "/.podfleet/setup.sh", &script);
        let Completion::Ready(Ok(RuntimeReply::Executed { exit_code, output })) =
            exec(&mut rt, "web", SETUP)
        else {
            panic!("a script without sleeps answers at once");
        };
        assert_eq!(exit_code, 0);
        assert!(output.len() <= EXEC_OUTPUT_MAX_BYTES, "{}", output.len());
        assert!(output.starts_with("(8890 bytes in all) …"), "{output}");
        assert!(output.ends_with("line 999\n"));
    }

    #[test]
    fn the_slower_the_registry_the_later_a_pull_lands() {
        let mut rt = FakeRuntime::new();
        rt.registry_mut().push("img/a:2", 4_000);
        rt.registry_mut().set_speed(1_000, Duration::from_secs(1));
        let Completion::At { at, .. } = pull(&mut rt, "img/a:2") else {
            panic!("a pull takes time");
        };
        assert_eq!(at, Timestamp::from_millis(5_000));
    }
}
