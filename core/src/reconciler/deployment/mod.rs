//! One deployment: what is desired, what is applied, what runs, and the job
//! (a serial sequence of runtime steps) that moves it forward.
//!
//! A deployment runs at most one runtime command at a time, so its own
//! containers are only ever touched by one job; deployments run side by side.
//!
//! - this module: what the deployment knows, and the desired-state inputs;
//! - [`job`]: running a job, one runtime call at a time;
//! - [`plan`]: what a rollout or a teardown must do (pure, table-tested);
//! - [`liveness`]: keeping an applied deployment running;
//! - [`report`]: the state it publishes.

mod job;
mod liveness;
mod plan;
mod report;
mod run;
mod setup;
mod verify;

pub use setup::{provisioned_marker, PROVISIONED_PATH, SETUP_SCRIPT_PATH};

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use super::spec::{service_container_spec, service_spec_hash};
use super::{CachedDeployment, CommandId, Config, Effects, Owner, Wake, WakeReason};
use crate::runtime::{
    init_container_name, service_container_name, ContainerSpec, ContainerState, ContainerStatus,
    ContainerSummary, ImageInfo, PullProgress, RuntimeErrorKind, RuntimeOp, RuntimeReply,
    RuntimeResult, LABEL_GRACE, LABEL_IMAGE_DIGEST, LABEL_INIT, LABEL_REVISION, LABEL_SERVICE,
    LABEL_SPEC_HASH, LABEL_STOP_SIGNAL,
};
use crate::time::Timestamp;
use crate::wire::text::{bounded, Quoted, TEXT_MAX_BYTES};
use job::{Call, Job, JobKind, Step};

use crate::wire::{
    DeploymentName, DeploymentState, FailureCause, InitName, Phase, PodmanV0Score, PullFailure,
    PullPolicy, RestartRecord, Revision, RuntimeOperation, ScoreError, ServiceName, Signal,
    DEFAULT_INIT_CONTAINER_TIMEOUT,
};

/// The newest valid revision seen: what the deployment converges to.
#[derive(Debug, Clone)]
struct Target {
    revision: Revision,
    /// The revision at which this spec first arrived: later revisions with
    /// the same spec (a re-put) only move `revision`.
    since: Revision,
    bytes: Vec<u8>,
    score: PodmanV0Score,
    /// Service name -> spec hash, in score order of `score.services`.
    hashes: BTreeMap<ServiceName, String>,
}

impl Target {
    fn new(revision: Revision, bytes: Vec<u8>, score: PodmanV0Score) -> Self {
        let hashes = score
            .services
            .iter()
            .map(|s| (s.name.clone(), service_spec_hash(&score, s)))
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
    /// The manifest digest of its image ([`LABEL_IMAGE_DIGEST`]).
    image_digest: Option<String>,
    /// The revision it was created for ([`LABEL_REVISION`]).
    revision: Option<u64>,
    /// Its setup script is known to have finished (this agent ran it, or
    /// found its marker).
    provisioned: bool,
    /// Its setup script is known not to have finished: it was created and
    /// not provisioned, or has no (or another script's) marker.
    unprovisioned: bool,
}

impl Observed {
    fn from_summary(c: &ContainerSummary) -> Self {
        Self {
            id: c.id.clone(),
            state: c.state,
            spec_hash: c.label(LABEL_SPEC_HASH).map(str::to_owned),
            image_digest: c.label(LABEL_IMAGE_DIGEST).map(str::to_owned),
            revision: c.label(LABEL_REVISION).and_then(|r| r.parse().ok()),
            provisioned: false,
            unprovisioned: false,
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

/// Where a deployment is in its life:
///
/// - it starts `Converging`;
/// - `Converging` → `Applied` when the rollout of its target is done;
/// - `Applied` → `Converging` when a new spec arrives, or a container was
///   changed behind podfleet's back (only a rollout may put it back);
/// - either → `Deleting` on a delete;
/// - `Deleting` → `Converging` on a valid put (the teardown is walked away
///   from), or when the teardown is done and an invalid put after the
///   delete is left to report;
/// - `Deleting` → `Gone` when the teardown is done with nothing left to
///   report; the reconciler then forgets the deployment.
///
/// `Converging` covers "no valid revision yet" (only invalid payloads
/// seen), "waiting for a retry" and "rolling out": the job and the failure
/// say which.
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

/// The images `score` creates containers from, services first, each once.
fn score_images(score: &PodmanV0Score) -> Vec<String> {
    let mut images: Vec<String> = Vec::new();
    for image in score.images() {
        if !images.iter().any(|i| i == image) {
            images.push(image.to_owned());
        }
    }
    images
}

#[derive(Debug)]
pub(super) struct Deployment {
    name: DeploymentName,
    /// Highest desired revision seen, put or delete.
    latest_seen: Revision,
    target: Option<Target>,
    /// The newest payload seen, when it was invalid.
    invalid: Option<(Revision, ScoreError)>,
    /// Where the deployment is in its life.
    lifecycle: Lifecycle,
    /// Attempts at the target revision (or at the teardown).
    attempts: u32,
    /// Whether the applied revision ran init containers.
    init_completed: usize,
    observed: BTreeMap<ServiceName, Observed>,
    /// Whether `observed` comes from the runtime since the agent started,
    /// rather than from the cache: until then nothing is known about what
    /// runs, and no report may claim anything about it.
    observed_runtime: bool,
    restarts: BTreeMap<ServiceName, Restart>,
    job: Option<Job>,
    failure: Option<Failure>,
    last_report: Option<DeploymentState>,
    pub(super) last_mutation_seq: u64,
    /// What the agent's cache holds of it changed since the reconciler
    /// last looked.
    cache_dirty: bool,
    /// The images of the spec last fully rolled out, and of the one rolled
    /// out before it: image garbage collection keeps both, so that going
    /// back one revision needs no registry.
    applied_images: Vec<String>,
    previous_images: Vec<String>,
    /// `applied_images` changed since the reconciler last looked.
    images_changed: bool,
    /// `no_launch`: what the last verification found, per service.
    verified: BTreeMap<ServiceName, verify::Found>,
    /// `per_run`: the exit code of each service whose run of the target
    /// has ended.
    exit_codes: BTreeMap<ServiceName, i64>,
    /// `per_run`: when the run of the target ended, as far as this agent
    /// saw it; its containers go `run_retention` later.
    run_ended_at: Option<Timestamp>,
}

impl Deployment {
    pub(super) fn new(name: DeploymentName) -> Self {
        Self {
            name,
            latest_seen: Revision::default(),
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
            applied_images: Vec::new(),
            previous_images: Vec::new(),
            images_changed: false,
            verified: BTreeMap::new(),
            exit_codes: BTreeMap::new(),
            run_ended_at: None,
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
        d.applied_images = match (&cached.applied_images, cached.applied) {
            // A cache from before image garbage collection: what it applied
            // is what it holds.
            (images, true) if images.is_empty() => score_images(&score),
            (images, _) => images.clone(),
        };
        d.previous_images = cached.previous_images.clone();
        d.exit_codes = cached.exit_codes.clone();
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
                    image_digest: None,
                    revision: None,
                    provisioned: false,
                    unprovisioned: false,
                },
            );
        }
        Some(d)
    }

    pub(super) fn desired_put(&mut self, revision: Revision, bytes: &[u8]) {
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
                self.verified.clear();
                self.exit_codes.clear();
                self.run_ended_at = None;
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

    pub(super) fn desired_delete(&mut self, revision: Option<Revision>) {
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
        // next job lists the runtime and force-removes leftover init
        // containers. So can a pull: it touches no container, and the newer
        // revision need not wait for an image it may not use. And a wait on
        // a `per_run` service: the next rollout retires the old run.
        let waiting = matches!(
            job.in_flight,
            Some((
                _,
                Call::WaitInit { .. } | Call::WaitRun { .. } | Call::Pull { .. }
            ))
        );
        if job.in_flight.is_none() || waiting {
            self.job = None;
        } else {
            job.superseded = true;
        }
    }

    pub(super) fn latest_seen(&self) -> Revision {
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

    /// The images garbage collection must keep for this deployment: those
    /// of its target (rolled out or not), of the spec last rolled out and
    /// of the one before it. None once it is being deleted.
    pub(super) fn images_to_keep(&self) -> impl Iterator<Item = &str> {
        let live = !matches!(self.lifecycle, Lifecycle::Deleting | Lifecycle::Gone);
        let target = self
            .target
            .iter()
            .filter(move |_| live)
            .flat_map(|t| t.score.images());
        let rolled_out = self
            .applied_images
            .iter()
            .chain(&self.previous_images)
            .filter(move |_| live)
            .map(String::as_str);
        target.chain(rolled_out)
    }

    /// Every image this deployment ever asked for, as far as it remembers.
    /// A `no_launch` target asks for none: it only looks at what someone
    /// else runs, so garbage collection never counts its image as
    /// podfleet's to retire.
    pub(super) fn images_referenced(&self) -> impl Iterator<Item = &str> {
        self.target
            .iter()
            .filter(|t| t.score.lifetime() != crate::wire::Lifetime::NoLaunch)
            .flat_map(|t| t.score.images())
            .chain(self.applied_images.iter().map(String::as_str))
            .chain(self.previous_images.iter().map(String::as_str))
    }

    /// A rollout or teardown is under way.
    pub(super) fn is_busy(&self) -> bool {
        self.job.is_some()
    }

    /// Whether the images it keeps changed since the last call.
    pub(super) fn take_images_changed(&mut self) -> bool {
        std::mem::take(&mut self.images_changed)
    }

    pub(super) fn take_cache_dirty(&mut self) -> bool {
        std::mem::take(&mut self.cache_dirty)
    }

    pub(super) fn last_report(&self) -> Option<&DeploymentState> {
        self.last_report.as_ref()
    }

    /// The container of `service`: its own, or for `no_launch` the one
    /// it verified.
    pub(super) fn container_id(&self, service: &str) -> Option<&str> {
        self.observed
            .get(service)
            .map(|o| o.id.as_str())
            .or_else(|| self.verified.get(service)?.id.as_deref())
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
            applied_images: self.applied_images.clone(),
            previous_images: self.previous_images.clone(),
            exit_codes: self.exit_codes.clone(),
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
                        Call::WaitInit {
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
                (
                    Some((
                        _,
                        Call::Pull {
                            image,
                            deadline,
                            progress_at,
                            ..
                        },
                    )),
                    _,
                ) if progress_at < deadline => Some(Wake {
                    at: *progress_at,
                    reason: WakeReason::PullProgress {
                        deployment: name(),
                        image: image.clone(),
                    },
                }),
                (
                    Some((
                        _,
                        Call::Pull {
                            image, deadline, ..
                        },
                    )),
                    _,
                ) => Some(Wake {
                    at: *deadline,
                    reason: WakeReason::PullDeadline {
                        deployment: name(),
                        image: image.clone(),
                    },
                }),
                (
                    Some((
                        _,
                        Call::RunScript {
                            service, deadline, ..
                        },
                    )),
                    _,
                ) => Some(Wake {
                    at: *deadline,
                    reason: WakeReason::SetupDeadline {
                        deployment: name(),
                        service: service.clone(),
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

    fn init_name(&self, index: usize) -> InitName {
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

    /// The pull in flight, if it is time to ask the runtime how far it has
    /// got: its command and image. The next ask is due `interval` later.
    pub(super) fn due_progress_query(
        &mut self,
        now: Timestamp,
        interval: Duration,
    ) -> Option<(CommandId, String)> {
        let (id, call) = self.job.as_mut()?.in_flight.as_mut()?;
        match call {
            Call::Pull {
                image,
                deadline,
                progress_at,
                ..
            } if now >= *progress_at && now < *deadline => {
                *progress_at = now + interval;
                Some((*id, image.clone()))
            }
            _ => None,
        }
    }

    /// The runtime's answer on how far the pull `id` has got; an answer
    /// for a pull no longer in flight is dropped.
    pub(super) fn on_pull_progress(&mut self, id: CommandId, answer: Option<PullProgress>) {
        let Some(job) = self.job.as_mut() else {
            return;
        };
        if let Some((in_flight, Call::Pull { progress, .. })) = job.in_flight.as_mut() {
            if *in_flight == id && answer.is_some() {
                *progress = answer;
            }
        }
    }

    /// Acts on due deadlines. Returns true when a liveness `list` is wanted.
    pub(super) fn on_timeout(&mut self, now: Timestamp, config: &Config) -> bool {
        let Some(job) = self.job.as_ref() else {
            return self.restart_wake().is_some_and(|w| now >= w.at);
        };
        if let Some((
            _,
            Call::Pull {
                image,
                started,
                deadline,
                ..
            },
        )) = &job.in_flight
        {
            if now >= *deadline {
                let cause = FailureCause::ImagePull {
                    image: image.clone(),
                    reason: PullFailure::Timeout,
                    error: format!(
                        "no answer after {} s (the agent's pull_timeout)",
                        now.saturating_since(*started).as_secs()
                    ),
                };
                if let Some(job) = self.job.as_mut() {
                    // The pull's result, whenever it comes, no longer matches.
                    job.in_flight = None;
                }
                self.fail_job(cause);
            }
            return false;
        }
        if let Some((
            _,
            Call::RunScript {
                service,
                id,
                deadline,
            },
        )) = &job.in_flight
        {
            if now >= *deadline {
                let (service, id) = (service.clone(), id.clone());
                self.on_setup_deadline(config, service, id);
            }
            return false;
        }
        if let Some((
            _,
            Call::WaitInit {
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
                self.replace_steps(vec![Step::Call(Call::RemoveInit {
                    id,
                    then: Some(cause),
                })]);
            }
        }
        false
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
                let mut o = Observed::from_summary(c);
                // What is known of its provisioning stays with the container.
                if let Some(known) = self.observed.get(service).filter(|k| k.id == o.id) {
                    o.provisioned = known.provisioned;
                    o.unprovisioned = known.unprovisioned;
                }
                observed.insert(ServiceName::from(service), o);
            }
        }
        if observed != self.observed {
            self.observed = observed;
            self.cache_dirty = true;
        }
    }

    fn plan_rollout(&mut self, config: &Config, containers: &[ContainerSummary]) {
        if self.target.is_none() {
            self.replace_steps(vec![]);
            return;
        }
        let mine = self.mine(containers);
        self.refresh_observed(&mine);
        if self.verifies_only() {
            self.plan_verification(&mine);
            return;
        }
        let Some(target) = self.target.as_ref() else {
            return;
        };
        let steps = plan::rollout(&self.name, target, &self.observed, &mine, config);
        self.replace_steps(steps);
    }

    fn plan_teardown(&mut self, containers: &[ContainerSummary]) {
        let mine = self.mine(containers);
        self.refresh_observed(&mine);
        self.replace_steps(plan::teardown(&mine));
    }

    fn mine<'a>(&self, containers: &'a [ContainerSummary]) -> Vec<&'a ContainerSummary> {
        containers
            .iter()
            .filter(|c| c.label(crate::runtime::LABEL_DEPLOYMENT) == Some(self.name.as_str()))
            .collect()
    }
}
