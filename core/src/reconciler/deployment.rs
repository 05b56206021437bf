//! One deployment: what is desired, what is applied, what runs, and the job
//! (a serial sequence of runtime steps) that moves it forward.
//!
//! A deployment runs at most one runtime command at a time, so its own
//! containers are only ever touched by one job; deployments run side by side.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use super::spec::{init_container_spec, service_container_spec, service_spec_hash};
use super::{CachedDeployment, CommandId, Config, Effects, Owner, Wake, WakeReason};
use crate::runtime::{
    init_container_name, service_container_name, ContainerState, ContainerSummary,
    RuntimeErrorKind, RuntimeOp, RuntimeReply, RuntimeResult, LABEL_GRACE, LABEL_INIT,
    LABEL_SERVICE, LABEL_SPEC_HASH, LABEL_STOP_SIGNAL,
};
use crate::time::Timestamp;
use crate::wire::text::{bounded, Quoted, TEXT_MAX_BYTES};
use crate::wire::{
    DeploymentName, DeploymentState, FailureCause, Phase, PodmanV0Score, RestartRecord,
    RuntimeOperation, ScoreError, Signal, DEFAULT_INIT_CONTAINER_TIMEOUT,
};

/// The newest valid revision seen: what the deployment converges to.
#[derive(Debug, Clone)]
struct Target {
    revision: u64,
    /// The revision at which this spec first arrived: later revisions with
    /// the same spec (a re-put) only move `revision`.
    since: u64,
    bytes: Vec<u8>,
    score: PodmanV0Score,
    /// Service name -> spec hash, in score order of `score.services`.
    hashes: BTreeMap<String, String>,
}

impl Target {
    fn new(revision: u64, bytes: Vec<u8>, score: PodmanV0Score) -> Self {
        let signal = score.lifecycle_or_default().stop_signal;
        let hashes = score
            .services
            .iter()
            .map(|s| (s.name.clone(), service_spec_hash(s, signal)))
            .collect();
        Self {
            revision,
            since: revision,
            bytes,
            score,
            hashes,
        }
    }
}

/// A service container as last seen or as left by our own last step.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    id: String,
    state: ContainerState,
    spec_hash: Option<String>,
    signal: Signal,
    grace: Duration,
}

impl Observed {
    fn from_summary(c: &ContainerSummary) -> Self {
        Self {
            id: c.id.clone(),
            state: c.state,
            spec_hash: c.label(LABEL_SPEC_HASH).map(str::to_owned),
            signal: c
                .label(LABEL_STOP_SIGNAL)
                .and_then(|s| s.parse().ok())
                .unwrap_or_default(),
            grace: Duration::from_secs(
                c.label(LABEL_GRACE)
                    .and_then(|g| g.parse().ok())
                    .unwrap_or(crate::wire::score::DEFAULT_GRACE_PERIOD_SECS),
            ),
        }
    }
}

/// Restart bookkeeping of one service that has exited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Restart {
    count: u32,
    last_exit_code: Option<i64>,
    /// Earliest time the next restart may happen.
    next_at: Timestamp,
    /// When it was last seen running after a restart, for the backoff reset.
    running_since: Option<Timestamp>,
    /// Restarts since the backoff last reset (drives the delay).
    streak: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    cause: FailureCause,
    retry_at: Timestamp,
}

/// Where a deployment is in its life.
///
/// ```text
///            valid put            rollout done
///  Converging ──────▶ Converging ─────────────▶ Applied
///      ▲  ▲                                     │   │
///      │  └──────── a container changed ────────┘   │
///      │              behind our back               │ delete
///      │ put (valid or invalid)                      ▼
///      └──────────────────────────────────────── Deleting ──▶ Gone
///                                                teardown done
/// ```
///
/// `Converging` covers "no valid revision yet" (only invalid payloads
/// seen), "waiting for a retry" and "rolling out": the job and the failure
/// say which. A put after a delete lifts `Deleting` once the teardown is
/// done; only a deployment with nothing left to report becomes `Gone`, and
/// the reconciler then forgets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    /// The target, if there is one, is not (or no longer) fully rolled out.
    Converging,
    /// The target is fully rolled out.
    Applied,
    /// A delete was seen and not superseded: tearing down.
    Deleting,
    /// Torn down with nothing left to report; about to be forgotten.
    Gone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobKind {
    Rollout,
    Heal,
    Teardown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// List, then plan the rollout of the target from what runs.
    ListAndPlan,
    /// List, then plan the removal of every container of the deployment.
    ListAndTeardown,
    /// Remove a container by name or id; "not found" is success.
    RemoveIfPresent {
        container: String,
    },
    CreateInit {
        index: usize,
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
    /// Internal: the libpod race, wait before inspecting again.
    RaceDelay {
        index: usize,
        id: String,
        until: Timestamp,
    },
    /// Remove a finished init container, then go on or fail.
    RemoveInit {
        id: String,
        then: Option<FailureCause>,
    },
    Stop {
        service: String,
        id: String,
        signal: Signal,
        grace: Duration,
    },
    RemoveService {
        service: String,
        id: String,
    },
    CreateService {
        service: String,
    },
    StartService {
        service: String,
        id: String,
    },
    /// Learn a crashed container's exit code before restarting it.
    InspectExited {
        service: String,
        id: String,
    },
    /// Internal: the target is applied.
    Finish,
    /// Internal: the job failed.
    Fail(FailureCause),
    /// Internal: the deployment is torn down; forget it.
    Forget,
}

#[derive(Debug)]
struct Job {
    kind: JobKind,
    steps: VecDeque<Step>,
    in_flight: Option<(CommandId, Step)>,
    superseded: bool,
    /// Whether this rollout ran the init containers (for the message).
    ran_init: bool,
}

impl Job {
    fn new(kind: JobKind, first: Vec<Step>) -> Self {
        Self {
            kind,
            steps: first.into(),
            in_flight: None,
            superseded: false,
            ran_init: false,
        }
    }
}

#[derive(Debug)]
pub(super) struct Deployment {
    name: DeploymentName,
    /// Highest desired revision seen, put or delete.
    latest_seen: u64,
    target: Option<Target>,
    /// The newest payload seen, when it was invalid.
    invalid: Option<(u64, ScoreError)>,
    /// Where the deployment is in its life.
    lifecycle: Lifecycle,
    /// Attempts at the target revision (or at the teardown).
    attempts: u32,
    /// Whether the applied revision ran init containers.
    init_completed: usize,
    observed: BTreeMap<String, Observed>,
    /// Whether `observed` comes from the runtime since the agent started,
    /// rather than from the cache: until then nothing is known about what
    /// runs, and no report may claim anything about it.
    observed_runtime: bool,
    restarts: BTreeMap<String, Restart>,
    job: Option<Job>,
    failure: Option<Failure>,
    last_report: Option<DeploymentState>,
    pub(super) last_mutation_seq: u64,
    /// What the agent's cache holds of it changed since the reconciler
    /// last looked.
    cache_dirty: bool,
    /// `Bugs::create_before_remove`: new service containers get a second
    /// name, so the old and the new one coexist.
    bug_second_name: bool,
}

impl Deployment {
    pub(super) fn new(name: DeploymentName) -> Self {
        Self {
            name,
            latest_seen: 0,
            target: None,
            invalid: None,
            lifecycle: Lifecycle::Converging,
            attempts: 0,
            init_completed: 0,
            observed: BTreeMap::new(),
            observed_runtime: false,
            restarts: BTreeMap::new(),
            job: None,
            failure: None,
            last_report: None,
            last_mutation_seq: 0,
            cache_dirty: false,
            bug_second_name: false,
        }
    }

    /// Resumes a deployment from the agent's cache.
    pub(super) fn from_cache(name: DeploymentName, cached: &CachedDeployment) -> Option<Self> {
        let mut d = Self::new(name);
        d.latest_seen = cached.revision;
        let Some(text) = &cached.score else {
            d.lifecycle = Lifecycle::Deleting;
            return Some(d);
        };
        let bytes = text.as_bytes().to_vec();
        let score = PodmanV0Score::from_json(&bytes).ok()?;
        d.init_completed = if cached.applied {
            score.init_containers.len()
        } else {
            0
        };
        d.target = Some(Target::new(cached.revision, bytes, score));
        if cached.applied {
            d.lifecycle = Lifecycle::Applied;
        }
        // An applied revision was attempted at least once, even by an agent
        // whose cache predates the attempt count.
        d.attempts = if cached.applied {
            cached.attempt.max(1)
        } else {
            cached.attempt
        };
        for (service, id) in &cached.container_ids {
            d.observed.insert(
                service.clone(),
                Observed {
                    id: id.clone(),
                    state: ContainerState::Unknown,
                    spec_hash: None,
                    signal: Signal::default(),
                    grace: Duration::from_secs(crate::wire::score::DEFAULT_GRACE_PERIOD_SECS),
                },
            );
        }
        Some(d)
    }

    pub(super) fn desired_put(&mut self, revision: u64, bytes: &[u8]) {
        if revision < self.latest_seen {
            return;
        }
        if revision == self.latest_seen && self.lifecycle != Lifecycle::Deleting {
            // A redelivery of what we already hold.
            return;
        }
        self.latest_seen = revision;
        match PodmanV0Score::from_json(bytes) {
            Ok(score) => {
                self.invalid = None;
                // The same spec at a newer revision (the same bytes, or bytes
                // that decode to an equal score) changes nothing on the runtime.
                if let Some(target) = self
                    .target
                    .as_mut()
                    .filter(|t| t.bytes == bytes || t.score == score)
                {
                    target.revision = revision;
                    self.cache_dirty = true;
                    if self
                        .job
                        .as_ref()
                        .is_some_and(|j| j.kind == JobKind::Teardown)
                    {
                        self.supersede_job();
                    }
                    return;
                }
                self.target = Some(Target::new(revision, bytes.to_vec(), score));
                self.cache_dirty = true;
                self.lifecycle = Lifecycle::Converging;
                self.attempts = 0;
                self.failure = None;
                self.restarts.clear();
                self.supersede_job();
            }
            Err(error) => self.invalid = Some((revision, error)),
        }
    }

    pub(super) fn desired_delete(&mut self, revision: Option<u64>) {
        if let Some(revision) = revision {
            if revision < self.latest_seen {
                return;
            }
            self.latest_seen = revision;
        }
        if self.lifecycle == Lifecycle::Deleting {
            return;
        }
        self.lifecycle = Lifecycle::Deleting;
        self.cache_dirty = true;
        self.invalid = None;
        // Nothing from before the delete may come back.
        self.target = None;
        self.attempts = 0;
        self.failure = None;
        self.supersede_job();
    }

    fn supersede_job(&mut self) {
        let Some(job) = self.job.as_mut() else {
            return;
        };
        // A pending wait on an init container can be walked away from: the
        // next job lists the runtime and force-removes leftover init containers.
        let waiting = matches!(job.in_flight, Some((_, Step::WaitInit { .. })));
        if job.in_flight.is_none() || waiting {
            self.job = None;
        } else {
            job.superseded = true;
        }
    }

    pub(super) fn latest_seen(&self) -> u64 {
        self.latest_seen
    }

    /// A delete was seen and the teardown has not finished.
    pub(super) fn is_deleted(&self) -> bool {
        self.lifecycle == Lifecycle::Deleting
    }

    /// A valid revision is in force, applied or not.
    pub(super) fn has_target(&self) -> bool {
        self.target.is_some()
    }

    /// The target is fully rolled out.
    fn is_applied(&self) -> bool {
        self.lifecycle == Lifecycle::Applied
    }

    /// Something outside podfleet changed an applied container: only a
    /// rollout may put it back.
    fn demote(&mut self) {
        if self.lifecycle == Lifecycle::Applied {
            self.lifecycle = Lifecycle::Converging;
        }
    }

    pub(super) fn is_gone(&self) -> bool {
        self.lifecycle == Lifecycle::Gone
    }

    pub(super) fn take_cache_dirty(&mut self) -> bool {
        std::mem::take(&mut self.cache_dirty)
    }

    pub(super) fn last_report(&self) -> Option<&DeploymentState> {
        self.last_report.as_ref()
    }

    pub(super) fn container_id(&self, service: &str) -> Option<&str> {
        self.observed.get(service).map(|o| o.id.as_str())
    }

    pub(super) fn cached(&self) -> Option<CachedDeployment> {
        let target = self.target.as_ref();
        Some(CachedDeployment {
            revision: target.map_or(self.latest_seen, |t| t.revision),
            score: match (self.lifecycle == Lifecycle::Deleting, target) {
                (true, _) => None,
                (false, Some(t)) => Some(String::from_utf8_lossy(&t.bytes).into_owned()),
                (false, None) => return None,
            },
            applied: self.lifecycle == Lifecycle::Applied,
            attempt: self.attempts,
            container_ids: self
                .observed
                .iter()
                .filter(|(service, _)| target.is_some_and(|t| t.hashes.contains_key(*service)))
                .map(|(service, o)| (service.clone(), o.id.clone()))
                .collect(),
        })
    }

    pub(super) fn next_wake(&self) -> Option<Wake> {
        let name = || self.name.clone();
        if let Some(job) = &self.job {
            let init_name = |index: usize| self.init_name(index);
            return match (&job.in_flight, job.steps.front()) {
                (
                    Some((
                        _,
                        Step::WaitInit {
                            index, deadline, ..
                        },
                    )),
                    _,
                ) => Some(Wake {
                    at: *deadline,
                    reason: WakeReason::InitDeadline {
                        deployment: name(),
                        init: init_name(*index),
                    },
                }),
                (None, Some(Step::RaceDelay { index, until, .. })) => Some(Wake {
                    at: *until,
                    reason: WakeReason::LibpodRaceRetry {
                        deployment: name(),
                        init: init_name(*index),
                    },
                }),
                _ => None,
            };
        }
        if let Some(failure) = &self.failure {
            return Some(Wake {
                at: failure.retry_at,
                reason: WakeReason::RetryBackoff { deployment: name() },
            });
        }
        self.restart_wake()
    }

    fn restart_wake(&self) -> Option<Wake> {
        if self.lifecycle != Lifecycle::Applied {
            return None;
        }
        let target = self.target.as_ref()?;
        target
            .hashes
            .keys()
            .filter(|service| !self.is_running(service))
            .filter_map(|service| Some((self.restarts.get(service)?.next_at, service)))
            .min()
            .map(|(at, service)| Wake {
                at,
                reason: WakeReason::RestartBackoff {
                    deployment: self.name.clone(),
                    service: service.clone(),
                },
            })
    }

    fn init_name(&self, index: usize) -> String {
        self.target
            .as_ref()
            .and_then(|t| t.score.init_containers.get(index))
            .map(|i| i.name.clone())
            .unwrap_or_default()
    }

    fn is_running(&self, service: &str) -> bool {
        self.observed
            .get(service)
            .is_some_and(|o| o.state == ContainerState::Running)
    }

    /// Acts on due deadlines. Returns true when a liveness `list` is wanted.
    pub(super) fn on_timeout(&mut self, now: Timestamp) -> bool {
        let Some(job) = self.job.as_ref() else {
            return self.restart_wake().is_some_and(|w| now >= w.at);
        };
        if let Some((
            _,
            Step::WaitInit {
                index,
                id,
                started,
                deadline,
            },
        )) = &job.in_flight
        {
            if now >= *deadline {
                let cause = FailureCause::InitContainerTimedOut {
                    name: self.init_name(*index),
                    waited_secs: now.saturating_since(*started).as_secs(),
                };
                let id = id.clone();
                if let Some(job) = self.job.as_mut() {
                    // The wait's result, whenever it comes, no longer matches.
                    job.in_flight = None;
                }
                self.replace_steps(vec![Step::RemoveInit {
                    id,
                    then: Some(cause),
                }]);
            }
        }
        false
    }

    /// Runs internal steps and issues the next command, or starts the next
    /// job, until the deployment waits on the runtime or on time.
    pub(super) fn advance(&mut self, now: Timestamp, config: &Config, fx: &mut Effects) {
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
                    job.steps.push_front(Step::InspectInit {
                        index,
                        id,
                        retried: true,
                    });
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
                step => {
                    let Some(op) = self.op_for(&step) else {
                        continue;
                    };
                    let id = fx.issue(Owner::Deployment(self.name.clone()), op);
                    if let Some(job) = self.job.as_mut() {
                        job.in_flight = Some((id, step));
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
            JobKind::Teardown => Step::ListAndTeardown,
            _ => Step::ListAndPlan,
        };
        self.job = Some(Job::new(kind, vec![first]));
        true
    }

    fn op_for(&self, step: &Step) -> Option<RuntimeOp> {
        let target = self.target.as_ref();
        Some(match step {
            Step::ListAndPlan | Step::ListAndTeardown => RuntimeOp::List,
            Step::RemoveIfPresent { container } => RuntimeOp::Remove {
                container: container.clone(),
                force: true,
            },
            Step::CreateInit { index } => {
                let target = target?;
                RuntimeOp::Create {
                    spec: init_container_spec(
                        self.name.as_str(),
                        target.score.init_containers.get(*index)?,
                        target.revision,
                    ),
                }
            }
            Step::StartInit { id, .. } | Step::StartService { id, .. } => RuntimeOp::Start {
                container: id.clone(),
            },
            Step::WaitInit { id, .. } => RuntimeOp::Wait {
                container: id.clone(),
            },
            Step::InspectInit { id, .. } | Step::InspectExited { id, .. } => RuntimeOp::Inspect {
                container: id.clone(),
            },
            Step::RemoveInit { id, .. } | Step::RemoveService { id, .. } => RuntimeOp::Remove {
                container: id.clone(),
                force: true,
            },
            Step::Stop {
                id, signal, grace, ..
            } => RuntimeOp::Stop {
                container: id.clone(),
                signal: *signal,
                grace: *grace,
            },
            Step::CreateService { service } => {
                let target = target?;
                let spec = target.score.services.iter().find(|s| &s.name == service)?;
                let mut spec = service_container_spec(
                    self.name.as_str(),
                    spec,
                    &target.score.lifecycle_or_default(),
                    target.revision,
                );
                if self.bug_second_name && self.observed.contains_key(service) {
                    spec.name.push_str("-next");
                }
                RuntimeOp::Create { spec }
            }
            Step::RaceDelay { .. } | Step::Finish | Step::Fail(_) | Step::Forget => return None,
        })
    }

    /// Handles the result of command `id`. Stale results (of a walked-away
    /// wait or a superseded job) only update what is known to run.
    pub(super) fn on_result(
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
            (Step::ListAndPlan, Ok(RuntimeReply::Listed { containers })) => {
                self.plan_rollout(config, &containers);
            }
            (Step::ListAndTeardown, Ok(RuntimeReply::Listed { containers })) => {
                self.plan_teardown(&containers);
            }
            (Step::RemoveIfPresent { .. }, Ok(_)) => {}
            (Step::RemoveIfPresent { .. }, Err(e)) if e.kind == RuntimeErrorKind::NotFound => {}
            (Step::CreateInit { index }, Ok(RuntimeReply::Created { id })) => {
                self.push_front(Step::StartInit { index, id });
            }
            (Step::StartInit { index, id }, Ok(_)) => {
                let timeout = self
                    .target
                    .as_ref()
                    .and_then(|t| t.score.init_containers.get(index))
                    .map_or(DEFAULT_INIT_CONTAINER_TIMEOUT, |i| i.timeout);
                self.push_front(Step::WaitInit {
                    index,
                    id,
                    started: now,
                    deadline: now + timeout,
                });
            }
            (Step::WaitInit { index, id, .. }, Ok(_)) => {
                self.push_front(Step::InspectInit {
                    index,
                    id,
                    retried: false,
                });
            }
            (Step::InspectInit { index, id, retried }, Ok(RuntimeReply::Inspected { status })) => {
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
                self.push_front(Step::RemoveInit { id, then });
            }
            (Step::RemoveInit { then, .. }, Ok(_)) => {
                if let Some(cause) = then {
                    self.replace_steps(vec![Step::Fail(cause)]);
                }
            }
            (
                Step::RemoveInit {
                    then: Some(cause), ..
                },
                Err(_),
            ) => {
                self.replace_steps(vec![Step::Fail(cause)]);
            }
            (Step::Stop { .. }, Ok(_)) => {}
            (Step::Stop { .. }, Err(e)) if e.kind == RuntimeErrorKind::NotFound => {}
            (Step::RemoveService { service, id }, result)
                if result.is_ok()
                    || matches!(&result, Err(e) if e.kind == RuntimeErrorKind::NotFound) =>
            {
                if self.observed.get(&service).is_some_and(|o| o.id == id) {
                    self.observed.remove(&service);
                    self.cache_dirty = true;
                }
            }
            (Step::CreateService { service }, Ok(RuntimeReply::Created { id })) => {
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
                    },
                );
                self.cache_dirty = true;
                self.push_front(Step::StartService { service, id });
            }
            (Step::StartService { service, id }, Ok(_)) => {
                if let Some(o) = self.observed.get_mut(&service).filter(|o| o.id == id) {
                    o.state = ContainerState::Running;
                }
                if let Some(r) = self.restarts.get_mut(&service) {
                    r.running_since = Some(now);
                }
            }
            (Step::InspectExited { service, .. }, Ok(RuntimeReply::Inspected { status })) => {
                if let Some(r) = self.restarts.get_mut(&service) {
                    r.last_exit_code = status.exit_code;
                }
            }
            (Step::InspectExited { .. }, Err(_)) => {}
            (step, Err(error)) if kind == JobKind::Heal => {
                // A failed restart is retried by a later tick, with backoff.
                let _ = (step, error);
                self.replace_steps(vec![]);
            }
            (step, result) => {
                let cause = self.runtime_cause(&step, result);
                self.fail_job(cause);
            }
        }
    }

    fn runtime_cause(&self, step: &Step, result: RuntimeResult) -> FailureCause {
        let op = self.op_for(step);
        let error = match result {
            Err(e) => e.message,
            Ok(reply) => format!("unexpected answer {reply:?}"),
        };
        FailureCause::Runtime {
            container: op
                .as_ref()
                .and_then(|o| o.container())
                .unwrap_or("")
                .to_owned(),
            operation: op.as_ref().map_or(RuntimeOperation::List, RuntimeOp::kind),
            error,
        }
    }

    /// Fails the running job, removing an init container it may have left.
    fn fail_job(&mut self, cause: FailureCause) {
        let mut steps = Vec::new();
        if let Some(target) = self.target.as_ref() {
            if self
                .job
                .as_ref()
                .is_some_and(|j| j.kind == JobKind::Rollout)
            {
                for init in &target.score.init_containers {
                    steps.push(Step::RemoveIfPresent {
                        container: init_container_name(self.name.as_str(), &init.name),
                    });
                }
            }
        }
        steps.push(Step::Fail(cause));
        self.replace_steps(steps);
    }

    fn push_front(&mut self, step: Step) {
        if let Some(job) = self.job.as_mut() {
            job.steps.push_front(step);
        }
    }

    fn replace_steps(&mut self, steps: Vec<Step>) {
        if let Some(job) = self.job.as_mut() {
            job.steps = steps.into();
        }
    }

    fn finish(&mut self) {
        let ran_init = self.job.as_ref().is_some_and(|j| j.ran_init);
        self.job = None;
        self.lifecycle = Lifecycle::Applied;
        self.failure = None;
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

    fn refresh_observed(&mut self, mine: &[&ContainerSummary]) {
        self.observed_runtime = true;
        let mut observed = BTreeMap::new();
        for c in mine {
            if c.label(LABEL_INIT).is_some() {
                continue;
            }
            let Some(service) = c.label(LABEL_SERVICE) else {
                continue;
            };
            if c.name == service_container_name(self.name.as_str(), service) {
                observed.insert(service.to_owned(), Observed::from_summary(c));
            }
        }
        if observed != self.observed {
            self.observed = observed;
            self.cache_dirty = true;
        }
    }

    fn plan_rollout(&mut self, config: &Config, containers: &[ContainerSummary]) {
        let Some(target) = self.target.clone() else {
            self.replace_steps(vec![]);
            return;
        };
        let mine = self.mine(containers);
        self.refresh_observed(&mine);
        let expected: BTreeSet<String> = target
            .score
            .services
            .iter()
            .map(|s| service_container_name(self.name.as_str(), &s.name))
            .collect();
        let mut cleanup = Vec::new();
        let mut drops = Vec::new();
        for c in &mine {
            if c.label(LABEL_INIT).is_some() {
                cleanup.push(Step::RemoveIfPresent {
                    container: c.id.clone(),
                });
            } else if !expected.contains(&c.name) {
                retire(c, &mut drops);
            }
        }
        let mut services = Vec::new();
        let mut recreates = false;
        for service in &target.score.services {
            let hash = target.hashes.get(&service.name);
            match self.observed.get(&service.name) {
                Some(o) if o.spec_hash.as_ref() == hash && !bug!(config, recreate_on_tick) => {
                    if o.state != ContainerState::Running {
                        services.push(Step::StartService {
                            service: service.name.clone(),
                            id: o.id.clone(),
                        });
                    }
                }
                Some(o) => {
                    recreates = true;
                    if still_up(o.state) && !bug!(config, skip_graceful_stop) {
                        services.push(Step::Stop {
                            service: service.name.clone(),
                            id: o.id.clone(),
                            signal: o.signal,
                            grace: o.grace,
                        });
                    }
                    let remove = Step::RemoveService {
                        service: service.name.clone(),
                        id: o.id.clone(),
                    };
                    let create = Step::CreateService {
                        service: service.name.clone(),
                    };
                    if bug!(config, create_before_remove) {
                        self.bug_second_name = true;
                        services.push(create);
                        services.push(remove);
                    } else {
                        services.push(remove);
                        services.push(create);
                    }
                }
                None => {
                    recreates = true;
                    services.push(Step::CreateService {
                        service: service.name.clone(),
                    });
                }
            }
        }
        let mut steps = cleanup;
        if recreates && !bug!(config, skip_init_containers) {
            for (index, init) in target.score.init_containers.iter().enumerate() {
                steps.push(Step::RemoveIfPresent {
                    container: init_container_name(self.name.as_str(), &init.name),
                });
                steps.push(Step::CreateInit { index });
            }
        }
        steps.extend(drops);
        steps.extend(services);
        steps.push(Step::Finish);
        self.replace_steps(steps);
    }

    fn plan_teardown(&mut self, containers: &[ContainerSummary]) {
        let mine = self.mine(containers);
        self.refresh_observed(&mine);
        let mut steps = Vec::new();
        for c in &mine {
            retire(c, &mut steps);
        }
        steps.push(Step::Forget);
        self.replace_steps(steps);
    }

    fn mine<'a>(&self, containers: &'a [ContainerSummary]) -> Vec<&'a ContainerSummary> {
        containers
            .iter()
            .filter(|c| c.label(crate::runtime::LABEL_DEPLOYMENT) == Some(self.name.as_str()))
            .collect()
    }

    /// Liveness, from a device-wide list: start what exited, recreate what
    /// vanished, never touch what runs. `fresh` is false when one of this
    /// deployment's own mutations completed after the list was taken.
    pub(super) fn on_inventory(
        &mut self,
        now: Timestamp,
        config: &Config,
        mine: &[&ContainerSummary],
        list_seq: u64,
    ) {
        if self.job.is_some()
            || self.last_mutation_seq > list_seq
            || self.lifecycle == Lifecycle::Deleting
        {
            return;
        }
        self.refresh_observed(mine);
        // No job of this deployment waits on an init container now, so any
        // left here belongs to an attempt that was walked away from (an
        // agent crash mid-init, then nothing valid to roll out): remove it.
        let mut steps: Vec<Step> = mine
            .iter()
            .filter(|c| c.label(LABEL_INIT).is_some())
            .map(|c| Step::RemoveIfPresent {
                container: c.id.clone(),
            })
            .collect();
        let Some(target) = self.target.clone() else {
            if !steps.is_empty() {
                self.job = Some(Job::new(JobKind::Heal, steps));
            }
            return;
        };
        for service in &target.score.services {
            let hash = target.hashes.get(&service.name);
            let observed = self.observed.get(&service.name).cloned();
            let matches = observed
                .as_ref()
                .is_some_and(|o| o.spec_hash.as_ref() == hash);
            match observed {
                Some(o) if o.state == ContainerState::Running => {
                    if !matches || bug!(config, recreate_on_tick) {
                        // Someone else changed it; only a rollout may replace it.
                        self.demote();
                        continue;
                    }
                    if let Some(r) = self.restarts.get_mut(&service.name) {
                        let since = *r.running_since.get_or_insert(now);
                        if now.saturating_since(since) >= config.restart_reset_after {
                            r.streak = 0;
                        }
                    }
                }
                Some(o) if matches || (bug!(config, revert_on_failure) && !self.is_applied()) => {
                    if !self.is_applied() && !bug!(config, revert_on_failure) {
                        continue;
                    }
                    if self.restart_allowed(now, config, &service.name) {
                        steps.push(Step::InspectExited {
                            service: service.name.clone(),
                            id: o.id.clone(),
                        });
                        steps.push(Step::StartService {
                            service: service.name.clone(),
                            id: o.id.clone(),
                        });
                    }
                }
                Some(_) => self.demote(),
                None => {
                    if self.is_applied() && self.restart_allowed(now, config, &service.name) {
                        steps.push(Step::CreateService {
                            service: service.name.clone(),
                        });
                    }
                }
            }
        }
        let cleanup_only = steps
            .iter()
            .all(|s| matches!(s, Step::RemoveIfPresent { .. }));
        if !steps.is_empty()
            && (self.is_applied() || bug!(config, revert_on_failure) || cleanup_only)
        {
            self.job = Some(Job::new(JobKind::Heal, steps));
        }
    }

    /// Counts a restart of `service` if its backoff allows one now.
    fn restart_allowed(&mut self, now: Timestamp, config: &Config, service: &str) -> bool {
        let r = self.restarts.entry(service.to_owned()).or_default();
        if now < r.next_at {
            return false;
        }
        r.count = r.count.saturating_add(1);
        r.next_at = now + config.restart_backoff.delay(r.streak);
        r.streak = r.streak.saturating_add(1);
        r.running_since = None;
        true
    }

    /// The report as things stand, when it differs from the last one.
    pub(super) fn report_if_changed(&mut self, config: &Config) -> Option<DeploymentState> {
        let report = self.report(config)?;
        if let (Some(job), Some(last)) = (&self.job, &self.last_report) {
            // Mid-job reports would only narrate the steps: a restart is
            // reported when it is done, a rollout when it starts and ends.
            let same_stage = last.phase == report.phase
                && last.revision == report.revision
                && last.attempt == report.attempt;
            if job.kind == JobKind::Heal || same_stage {
                return None;
            }
        }
        if self.last_report.as_ref() == Some(&report) {
            return None;
        }
        self.last_report = Some(report.clone());
        Some(report)
    }

    fn report(&self, config: &Config) -> Option<DeploymentState> {
        let mut report = self.report_unbounded(config)?;
        report.message = bounded(&report.message, TEXT_MAX_BYTES);
        if let Some(cause) = report.cause.as_mut() {
            cause.bound_texts(TEXT_MAX_BYTES);
        }
        Some(report)
    }

    fn report_unbounded(&self, config: &Config) -> Option<DeploymentState> {
        if matches!(self.lifecycle, Lifecycle::Deleting | Lifecycle::Gone) {
            return None;
        }
        let restarts: BTreeMap<String, RestartRecord> = self
            .restarts
            .iter()
            .filter(|(_, r)| r.count > 0)
            .map(|(s, r)| {
                (
                    s.clone(),
                    RestartRecord {
                        count: r.count,
                        last_exit_code: r.last_exit_code,
                    },
                )
            })
            .collect();
        let running_ids: BTreeMap<String, String> = self
            .observed
            .iter()
            .filter(|(_, o)| o.state == ContainerState::Running)
            .map(|(s, o)| (s.clone(), o.id.clone()))
            .collect();
        let base = |phase, revision, message: String, cause| DeploymentState {
            phase,
            revision,
            container_ids: running_ids.clone(),
            message,
            cause,
            attempt: self.attempts,
            restarts: restarts.clone(),
            summarised: false,
        };
        if let Some((revision, error)) = &self.invalid {
            let message = match &self.target {
                Some(t) => format!(
                    "revision {revision} is invalid and was not applied; revision {} stays in place: {error}",
                    t.revision
                ),
                None => format!("revision {revision} is invalid and was not applied: {error}"),
            };
            let cause = FailureCause::InvalidScore {
                error: error.to_string(),
            };
            return Some(base(Phase::Failed, *revision, message, Some(cause)));
        }
        let target = self.target.as_ref()?;
        let revision = target.revision;
        if self.is_applied() && !self.observed_runtime && !bug!(config, report_before_observing) {
            // Adopted from the cache after a restart: until the runtime has
            // been listed, the last report published stands.
            return None;
        }
        if self
            .job
            .as_ref()
            .is_some_and(|j| j.kind == JobKind::Rollout)
        {
            if bug!(config, report_running_early) {
                return Some(base(Phase::Running, revision, "running".into(), None));
            }
            let message = format!(
                "rolling out revision {revision} (attempt {})",
                self.attempts
            );
            return Some(base(Phase::Pending, revision, message, None));
        }
        if let Some(failure) = &self.failure {
            let message = format!(
                "attempt {} at revision {revision} failed: {}; retrying",
                self.attempts,
                describe(&failure.cause)
            );
            return Some(base(
                Phase::Failed,
                revision,
                message,
                Some(failure.cause.clone()),
            ));
        }
        if !self.is_applied() {
            let message = format!("revision {revision} is waiting to be rolled out");
            return Some(base(Phase::Pending, revision, message, None));
        }
        let down = target.score.services.iter().find(|s| {
            self.observed
                .get(&s.name)
                .is_none_or(|o| o.state != ContainerState::Running)
        });
        if let Some(service) = down {
            let r = self
                .restarts
                .get(&service.name)
                .cloned()
                .unwrap_or_default();
            let cause = FailureCause::CrashLoop {
                service: service.name.clone(),
                restarts: r.count,
                last_exit_code: r.last_exit_code,
            };
            let message = format!("{}; restarting with backoff", describe(&cause));
            return Some(base(Phase::Failed, revision, message, Some(cause)));
        }
        let services = target.score.services.len();
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let mut message = if self.init_completed > 0 {
            format!(
                "{} completed, {} running",
                plural(self.init_completed, "init container"),
                plural(services, "service")
            )
        } else {
            format!("{} running", plural(services, "service"))
        };
        if target.since != revision {
            let _ = write!(message, " (spec unchanged since revision {})", target.since);
        }
        Some(base(Phase::Running, revision, message, None))
    }
}

/// Whether a container still has a process to stop gracefully. One already
/// stopping (say, when an agent restarted mid-stop) is stopped again with
/// its signal and grace rather than removed by force under its feet.
fn still_up(state: ContainerState) -> bool {
    matches!(state, ContainerState::Running | ContainerState::Stopping)
}

/// Steps that take `c` out of service: a graceful stop with its own signal
/// and grace when it is up (init containers are just removed), then removal.
fn retire(c: &ContainerSummary, steps: &mut Vec<Step>) {
    let o = Observed::from_summary(c);
    let service = c.label(LABEL_SERVICE).unwrap_or(&c.name).to_owned();
    if still_up(c.state) && c.label(LABEL_INIT).is_none() {
        steps.push(Step::Stop {
            service: service.clone(),
            id: c.id.clone(),
            signal: o.signal,
            grace: o.grace,
        });
    }
    steps.push(Step::RemoveService {
        service,
        id: c.id.clone(),
    });
}

/// A failure cause in words, for report messages.
pub(super) fn describe(cause: &FailureCause) -> String {
    match cause {
        FailureCause::InvalidScore { error } => format!("invalid score: {error}"),
        FailureCause::InitContainerExited { name, exit_code } => format!(
            "init container {} exited with code {exit_code}",
            Quoted(name)
        ),
        FailureCause::InitContainerTimedOut { name, waited_secs } => format!(
            "init container {} timed out after {waited_secs} s and was removed",
            Quoted(name)
        ),
        FailureCause::StillRunningAfterWait { name } => format!(
            "init container {} still reads as running after wait returned and a retry",
            Quoted(name)
        ),
        FailureCause::Runtime {
            container,
            operation,
            error,
        } => format!("{operation} of {} failed: {error}", Quoted(container)),
        FailureCause::CrashLoop {
            service,
            restarts,
            last_exit_code,
        } => match last_exit_code {
            Some(code) => format!(
                "service {} exited with code {code} ({restarts} restarts)",
                Quoted(service)
            ),
            None => format!(
                "service {} is not running ({restarts} restarts)",
                Quoted(service)
            ),
        },
    }
}
