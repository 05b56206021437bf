//! Running a job: one runtime call at a time, each result deciding the
//! next step.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JobKind {
    Rollout,
    Heal,
    Teardown,
    /// `no_launch`: verifying again; touches nothing.
    Verify,
}

/// A runtime call of a job: each maps to exactly one [`RuntimeOp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Call {
    /// List, then plan the rollout of the target from what runs.
    ListAndPlan,
    /// List, then plan the removal of every container of the deployment.
    ListAndTeardown,
    /// Look an image of the target up; pull it when absent, unless its
    /// policy is `never`.
    InspectImage {
        image: String,
        policy: PullPolicy,
    },
    /// Pull an image of the target; walked away from at `deadline`.
    Pull {
        image: String,
        started: Timestamp,
        deadline: Timestamp,
        /// When to ask the runtime how far it has got next.
        progress_at: Timestamp,
        /// What it said last, for the report.
        progress: Option<PullProgress>,
    },
    /// Remove a container by name or id; "not found" is success.
    RemoveIfPresent {
        container: String,
    },
    /// Create init container `index` of the target.
    CreateInit {
        index: usize,
        spec: ContainerSpec,
    },
    StartInit {
        index: usize,
        id: String,
    },
    WaitInit {
        index: usize,
        id: String,
        started: Timestamp,
        deadline: Timestamp,
    },
    InspectInit {
        index: usize,
        id: String,
        retried: bool,
    },
    /// Remove a finished init container, then go on or fail.
    RemoveInit {
        id: String,
        then: Option<FailureCause>,
    },
    Stop {
        service: ServiceName,
        id: String,
        signal: Signal,
        grace: Duration,
    },
    RemoveService {
        service: ServiceName,
        id: String,
    },
    CreateService {
        service: ServiceName,
        spec: ContainerSpec,
    },
    StartService {
        service: ServiceName,
        id: String,
    },
    /// Learn a crashed container's exit code before restarting it.
    InspectExited {
        service: ServiceName,
        id: String,
    },
    /// `per_run`: wait for a service's run to end; walked away from when
    /// a newer revision arrives.
    WaitRun {
        service: ServiceName,
        id: String,
        /// Whether this is the wait after the libpod race.
        retried: bool,
    },
    /// `per_run`: read the exit code of a service's run.
    InspectRun {
        service: ServiceName,
        id: String,
        retried: bool,
    },
    /// Copy a service's setup script into its fresh container.
    CopyScript {
        service: ServiceName,
        id: String,
        script: String,
    },
    /// Run the copied setup script; walked away from at `deadline`.
    RunScript {
        service: ServiceName,
        id: String,
        deadline: Timestamp,
    },
    /// Write the marker of a finished provisioning.
    MarkProvisioned {
        service: ServiceName,
        id: String,
        marker: String,
    },
    /// Ask a container this agent did not provision for its marker.
    ProbeProvisioned {
        service: ServiceName,
        id: String,
        marker: String,
    },
    /// `no_launch`: inspect a service's existing container, by name.
    VerifyContainer {
        service: ServiceName,
        container: String,
    },
    /// `no_launch`: look the score's image up, to compare it with what the
    /// inspected container runs.
    VerifyImage {
        service: ServiceName,
        container: String,
        image: String,
        status: ContainerStatus,
    },
}

/// One step of a job: a runtime call, or a marker the job acts on itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    /// A runtime call.
    Call(Call),
    /// Make sure an image of the target is in the store, as its pull
    /// policy says: a pull (`always`) or a look-up first.
    EnsureImage { image: String, policy: PullPolicy },
    /// The libpod race: wait before inspecting again.
    RaceDelay {
        index: usize,
        id: String,
        until: Timestamp,
    },
    /// The target is applied.
    Finish,
    /// The job failed.
    Fail(FailureCause),
    /// The deployment is torn down; forget it.
    Forget,
}

impl Call {
    /// A pull of `image` starting at `now`.
    fn pull(image: String, now: Timestamp, config: &Config) -> Self {
        Call::Pull {
            image,
            started: now,
            deadline: now + config.pull_timeout,
            progress_at: now + config.pull_progress_interval,
            progress: None,
        }
    }

    /// The runtime operation this call is.
    pub(super) fn op(&self) -> RuntimeOp {
        match self {
            Call::ListAndPlan | Call::ListAndTeardown => RuntimeOp::List,
            Call::InspectImage { image, .. } => RuntimeOp::InspectImage {
                image: image.clone(),
            },
            Call::Pull { image, .. } => RuntimeOp::Pull {
                image: image.clone(),
            },
            Call::RemoveIfPresent { container } => RuntimeOp::Remove {
                container: container.clone(),
                force: true,
            },
            Call::CreateInit { spec, .. } | Call::CreateService { spec, .. } => {
                RuntimeOp::Create { spec: spec.clone() }
            }
            Call::StartInit { id, .. } | Call::StartService { id, .. } => RuntimeOp::Start {
                container: id.clone(),
            },
            Call::WaitInit { id, .. } | Call::WaitRun { id, .. } => RuntimeOp::Wait {
                container: id.clone(),
            },
            Call::InspectInit { id, .. }
            | Call::InspectExited { id, .. }
            | Call::InspectRun { id, .. } => RuntimeOp::Inspect {
                container: id.clone(),
            },
            Call::CopyScript { id, script, .. } => RuntimeOp::CopyFile {
                container: id.clone(),
                path: super::SETUP_SCRIPT_PATH.to_owned(),
                content: script.clone(),
                mode: 0o700,
            },
            Call::RunScript { id, .. } => RuntimeOp::Exec {
                container: id.clone(),
                argv: ["/bin/sh", "-e", "-o", "pipefail", super::SETUP_SCRIPT_PATH]
                    .map(str::to_owned)
                    .to_vec(),
            },
            Call::MarkProvisioned { id, marker, .. } => RuntimeOp::CopyFile {
                container: id.clone(),
                path: super::PROVISIONED_PATH.to_owned(),
                content: marker.clone(),
                mode: 0o600,
            },
            Call::ProbeProvisioned { id, .. } => RuntimeOp::Exec {
                container: id.clone(),
                argv: vec!["cat".to_owned(), super::PROVISIONED_PATH.to_owned()],
            },
            Call::VerifyContainer { container, .. } => RuntimeOp::Inspect {
                container: container.clone(),
            },
            Call::VerifyImage { image, .. } => RuntimeOp::InspectImage {
                image: image.clone(),
            },
            Call::RemoveInit { id, .. } | Call::RemoveService { id, .. } => RuntimeOp::Remove {
                container: id.clone(),
                force: true,
            },
            Call::Stop {
                id, signal, grace, ..
            } => RuntimeOp::Stop {
                container: id.clone(),
                signal: *signal,
                grace: *grace,
            },
        }
    }
}

impl From<Call> for Step {
    fn from(call: Call) -> Self {
        Step::Call(call)
    }
}

#[derive(Debug)]
pub(super) struct Job {
    pub(super) kind: JobKind,
    pub(super) steps: VecDeque<Step>,
    pub(super) in_flight: Option<(CommandId, Call)>,
    pub(super) superseded: bool,
    /// Whether this rollout ran the init containers (for the message).
    pub(super) ran_init: bool,
    /// The images this job made sure of, by reference: containers created
    /// from them carry their digest as a label.
    pub(super) images: BTreeMap<String, ImageInfo>,
    /// The containers this job created: only these are provisioned.
    pub(super) fresh: std::collections::BTreeSet<String>,
}

impl Job {
    pub(super) fn new(kind: JobKind, first: Vec<Step>) -> Self {
        Self {
            kind,
            steps: first.into(),
            in_flight: None,
            superseded: false,
            ran_init: false,
            images: BTreeMap::new(),
            fresh: std::collections::BTreeSet::new(),
        }
    }
}

impl Deployment {
    /// Runs internal steps and issues the next command, or starts the next
    /// job, until the deployment waits on the runtime or on time.
    pub(in crate::reconciler) fn advance(
        &mut self,
        now: Timestamp,
        config: &Config,
        fx: &mut Effects,
    ) {
        loop {
            let Some(job) = self.job.as_mut() else {
                if !self.start_job(now) {
                    return;
                }
                continue;
            };
            if job.in_flight.is_some() {
                return;
            }
            if job.superseded {
                self.job = None;
                continue;
            }
            let Some(step) = job.steps.pop_front() else {
                self.job = None;
                continue;
            };
            match step {
                Step::RaceDelay { index, id, until } => {
                    if now < until {
                        job.steps.push_front(Step::RaceDelay { index, id, until });
                        return;
                    }
                    job.steps.push_front(Step::Call(Call::InspectInit {
                        index,
                        id,
                        retried: true,
                    }));
                }
                Step::EnsureImage { image, policy } => {
                    let call = match policy {
                        PullPolicy::Always => Call::pull(image, now, config),
                        PullPolicy::IfNotPresent | PullPolicy::Never => {
                            Call::InspectImage { image, policy }
                        }
                    };
                    job.steps.push_front(Step::Call(call));
                }
                Step::Finish => self.finish(),
                Step::Fail(cause) => self.fail(now, config, cause),
                Step::Forget => {
                    self.job = None;
                    // An invalid put after the delete is still reported.
                    self.lifecycle = if self.invalid.is_none() && self.target.is_none() {
                        Lifecycle::Gone
                    } else {
                        Lifecycle::Converging
                    };
                    return;
                }
                Step::Call(mut call) => {
                    if let Call::CreateService { spec, .. } | Call::CreateInit { spec, .. } =
                        &mut call
                    {
                        let digest = job.images.get(&spec.image).and_then(|i| i.digest.clone());
                        if let Some(digest) = digest {
                            spec.labels.insert(LABEL_IMAGE_DIGEST.to_owned(), digest);
                        }
                    }
                    let id = fx.issue(Owner::Deployment(self.name.clone()), call.op());
                    if let Some(job) = self.job.as_mut() {
                        job.in_flight = Some((id, call));
                    }
                    return;
                }
            }
        }
    }

    /// Starts the job the deployment needs now, if any.
    fn start_job(&mut self, now: Timestamp) -> bool {
        if self.lifecycle == Lifecycle::Gone {
            return false;
        }
        let retry_due = self.failure.as_ref().is_none_or(|f| now >= f.retry_at);
        if !retry_due {
            return false;
        }
        let kind = if self.lifecycle == Lifecycle::Deleting {
            JobKind::Teardown
        } else if self.target.is_some() && self.lifecycle == Lifecycle::Converging {
            JobKind::Rollout
        } else {
            return false;
        };
        self.failure = None;
        self.attempts = self.attempts.saturating_add(1);
        let first = match kind {
            JobKind::Teardown => Call::ListAndTeardown,
            _ => Call::ListAndPlan,
        };
        self.job = Some(Job::new(kind, vec![Step::Call(first)]));
        true
    }

    /// Handles the result of command `id`. Stale results (of a walked-away
    /// wait or a superseded job) only update what is known to run.
    pub(in crate::reconciler) fn on_result(
        &mut self,
        now: Timestamp,
        config: &Config,
        id: CommandId,
        result: RuntimeResult,
    ) {
        let Some(job) = self.job.as_mut() else {
            return;
        };
        let Some((expected, step)) = job.in_flight.take() else {
            return;
        };
        if expected != id {
            job.in_flight = Some((expected, step));
            return;
        }
        if job.superseded {
            return;
        }
        let kind = job.kind;
        match (step, result) {
            (Call::ListAndPlan, Ok(RuntimeReply::Listed { containers })) => {
                self.plan_rollout(config, &containers);
            }
            (Call::ListAndTeardown, Ok(RuntimeReply::Listed { containers })) => {
                self.plan_teardown(&containers);
            }
            (
                Call::InspectImage { image, .. },
                Ok(RuntimeReply::ImageInspected { image: Some(info) }),
            ) => {
                if let Some(job) = self.job.as_mut() {
                    job.images.insert(image, info);
                }
            }
            (
                Call::InspectImage {
                    image,
                    policy: PullPolicy::Never,
                },
                Ok(RuntimeReply::ImageInspected { image: None }),
            ) => {
                self.fail_job(FailureCause::ImagePull {
                    image,
                    reason: PullFailure::NotPresent,
                    error: "the image is not in the device's store and its pull policy is never"
                        .into(),
                });
            }
            (
                Call::InspectImage { image, .. },
                Ok(RuntimeReply::ImageInspected { image: None }),
            ) => {
                self.push_front(Call::pull(image, now, config));
            }
            (Call::Pull { image, .. }, Ok(RuntimeReply::Pulled { image: info })) => {
                if let Some(job) = self.job.as_mut() {
                    job.images.insert(image, info);
                }
            }
            (Call::Pull { image, .. }, Err(error)) => {
                let reason = match error.kind {
                    RuntimeErrorKind::Pull(reason) => reason,
                    RuntimeErrorKind::Unavailable => PullFailure::Network,
                    _ => PullFailure::Other,
                };
                self.fail_job(FailureCause::ImagePull {
                    image,
                    reason,
                    error: error.message,
                });
            }
            (Call::RemoveIfPresent { .. }, Ok(_)) => {}
            (Call::RemoveIfPresent { .. }, Err(e)) if e.kind == RuntimeErrorKind::NotFound => {}
            (Call::CreateInit { index, .. }, Ok(RuntimeReply::Created { id })) => {
                self.push_front(Call::StartInit { index, id });
            }
            (Call::StartInit { index, id }, Ok(_)) => {
                let timeout = self
                    .target
                    .as_ref()
                    .and_then(|t| t.score.init_containers.get(index))
                    .map_or(DEFAULT_INIT_CONTAINER_TIMEOUT, |i| i.timeout);
                self.push_front(Call::WaitInit {
                    index,
                    id,
                    started: now,
                    deadline: now + timeout,
                });
            }
            (Call::WaitInit { index, id, .. }, Ok(_)) => {
                self.push_front(Call::InspectInit {
                    index,
                    id,
                    retried: false,
                });
            }
            (Call::InspectInit { index, id, retried }, Ok(RuntimeReply::Inspected { status })) => {
                let name = self.init_name(index);
                let then = match (status.state, status.exit_code) {
                    (ContainerState::Exited, Some(0)) => {
                        if let Some(job) = self.job.as_mut() {
                            job.ran_init = true;
                        }
                        None
                    }
                    (ContainerState::Exited, Some(exit_code)) => {
                        Some(FailureCause::InitContainerExited { name, exit_code })
                    }
                    (ContainerState::Exited, None) => Some(FailureCause::Runtime {
                        container: init_container_name(self.name.as_str(), &name),
                        operation: RuntimeOperation::Inspect,
                        error: "exited without an exit code".into(),
                    }),
                    _ if !retried => {
                        self.push_front(Step::RaceDelay {
                            index,
                            id,
                            until: now + config.libpod_race_retry,
                        });
                        return;
                    }
                    _ => Some(FailureCause::StillRunningAfterWait { name }),
                };
                self.push_front(Call::RemoveInit { id, then });
            }
            (Call::RemoveInit { then, .. }, Ok(_)) => {
                if let Some(cause) = then {
                    self.replace_steps(vec![Step::Fail(cause)]);
                }
            }
            (
                Call::RemoveInit {
                    then: Some(cause), ..
                },
                Err(_),
            ) => {
                self.replace_steps(vec![Step::Fail(cause)]);
            }
            (Call::Stop { .. }, Ok(_)) => {}
            (Call::Stop { .. }, Err(e)) if e.kind == RuntimeErrorKind::NotFound => {}
            (Call::RemoveService { service, id }, result)
                if result.is_ok()
                    || matches!(&result, Err(e) if e.kind == RuntimeErrorKind::NotFound) =>
            {
                if self.observed.get(&service).is_some_and(|o| o.id == id) {
                    self.observed.remove(&service);
                    self.cache_dirty = true;
                }
            }
            (Call::CreateService { service, spec }, Ok(RuntimeReply::Created { id })) => {
                let (spec_hash, lifecycle) = match &self.target {
                    Some(t) => (
                        t.hashes.get(&service).cloned(),
                        t.score.lifecycle_or_default(),
                    ),
                    None => (None, Default::default()),
                };
                self.observed.insert(
                    service.clone(),
                    Observed {
                        id: id.clone(),
                        state: ContainerState::Created,
                        spec_hash,
                        signal: lifecycle.stop_signal,
                        grace: lifecycle.grace_period(),
                        image_digest: spec.labels.get(LABEL_IMAGE_DIGEST).cloned(),
                        revision: spec.labels.get(LABEL_REVISION).and_then(|r| r.parse().ok()),
                        provisioned: false,
                        unprovisioned: self.setup_script(&service).is_some(),
                    },
                );
                if let Some(job) = self.job.as_mut() {
                    job.fresh.insert(id.clone());
                }
                self.cache_dirty = true;
                self.push_front(Call::StartService { service, id });
            }
            (Call::StartService { service, id }, Ok(_)) => {
                if let Some(o) = self.observed.get_mut(&service).filter(|o| o.id == id) {
                    o.state = ContainerState::Running;
                }
                if let Some(r) = self.restarts.get_mut(&service) {
                    r.running_since = Some(now);
                }
                if self.job.as_ref().is_some_and(|j| j.fresh.contains(&id)) {
                    self.after_fresh_start(&service, &id);
                }
                self.after_run_started(service, id);
            }
            (Call::CopyScript { service, id, .. }, result) => {
                self.on_script_copied(now, config, service, id, result);
            }
            (Call::RunScript { service, id, .. }, result) => {
                self.on_script_ran(service, id, result)
            }
            (Call::MarkProvisioned { service, id, .. }, Ok(_)) => self.on_marked(&service, &id),
            (Call::MarkProvisioned { service, id, .. }, Err(e)) => {
                self.on_mark_failed(service, id, &e.message);
            }
            (
                Call::ProbeProvisioned {
                    service,
                    id,
                    marker,
                },
                result,
            ) => {
                self.on_probed(&service, &id, &marker, result);
            }
            (
                Call::WaitRun {
                    service,
                    id,
                    retried,
                },
                Ok(_),
            ) => self.on_run_waited(service, id, retried),
            (
                Call::InspectRun {
                    service,
                    id,
                    retried,
                },
                Ok(RuntimeReply::Inspected { status }),
            ) => self.on_run_inspected(service, id, retried, &status),
            (Call::InspectExited { service, .. }, Ok(RuntimeReply::Inspected { status })) => {
                if let Some(r) = self.restarts.get_mut(&service) {
                    r.last_exit_code = status.exit_code;
                }
            }
            (Call::InspectExited { .. }, Err(_)) => {}
            (Call::VerifyContainer { service, container }, result) => {
                self.on_verify_container(service, container, result);
            }
            (
                Call::VerifyImage {
                    service,
                    container,
                    image,
                    status,
                },
                result,
            ) => self.on_verify_image(config, service, container, &image, status, result),
            (step, Err(error)) if kind == JobKind::Heal => {
                // A failed restart is retried by a later tick, with backoff.
                let _ = (step, error);
                self.replace_steps(vec![]);
            }
            (step, result) => {
                let cause = Self::runtime_cause(&step, result);
                self.fail_job(cause);
            }
        }
    }

    fn runtime_cause(call: &Call, result: RuntimeResult) -> FailureCause {
        let op = call.op();
        let error = match result {
            Err(e) => e.message,
            Ok(reply) => format!("unexpected answer {reply:?}"),
        };
        FailureCause::Runtime {
            container: op.container().unwrap_or("").to_owned(),
            operation: op.kind(),
            error,
        }
    }

    /// Fails the running job, removing an init container it may have left.
    pub(super) fn fail_job(&mut self, cause: FailureCause) {
        let mut steps = Vec::new();
        if let Some(target) = self.target.as_ref() {
            if self
                .job
                .as_ref()
                .is_some_and(|j| j.kind == JobKind::Rollout)
            {
                for init in &target.score.init_containers {
                    steps.push(Step::Call(Call::RemoveIfPresent {
                        container: init_container_name(self.name.as_str(), &init.name),
                    }));
                }
            }
        }
        steps.push(Step::Fail(cause));
        self.replace_steps(steps);
    }

    pub(super) fn push_front(&mut self, step: impl Into<Step>) {
        if let Some(job) = self.job.as_mut() {
            job.steps.push_front(step.into());
        }
    }

    pub(super) fn replace_steps(&mut self, steps: Vec<Step>) {
        if let Some(job) = self.job.as_mut() {
            job.steps = steps.into();
        }
    }

    fn finish(&mut self) {
        let ran_init = self.job.as_ref().is_some_and(|j| j.ran_init);
        self.job = None;
        self.lifecycle = Lifecycle::Applied;
        self.failure = None;
        let images = self
            .target
            .as_ref()
            .filter(|_| !self.verifies_only())
            .map(|t| super::score_images(&t.score));
        if let Some(images) = images.filter(|i| *i != self.applied_images) {
            self.previous_images = std::mem::replace(&mut self.applied_images, images);
            self.images_changed = true;
        }
        if ran_init {
            self.init_completed = self
                .target
                .as_ref()
                .map_or(0, |t| t.score.init_containers.len());
        }
        self.cache_dirty = true;
    }

    fn fail(&mut self, now: Timestamp, config: &Config, cause: FailureCause) {
        self.job = None;
        let delay = config.retry_backoff.delay(self.attempts.saturating_sub(1));
        self.failure = Some(Failure {
            cause,
            retry_at: now + delay,
        });
    }
}
