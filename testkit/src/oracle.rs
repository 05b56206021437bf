//! [`Oracle`]: the safety invariants, checked against the fake runtime's
//! ground truth.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use podfleet_core::runtime::{ContainerSpec, RuntimeOp, RuntimeReply, RuntimeResult};
use podfleet_core::time::Timestamp;
use podfleet_core::wire::{DeploymentName, DeploymentState, Revision};

use crate::runtime::{FakeRuntime, RuntimeEvent};
use crate::violation::{Invariant, Violation};

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
    score: podfleet_core::wire::PodmanV0Score,
    /// Service name -> spec hash.
    hashes: BTreeMap<String, String>,
    /// Init container names, in order.
    inits: Vec<String>,
    /// The oracle's input count when this spec was first handed over
    /// (an identical re-put keeps it).
    handed: u64,
}

impl ValidSpec {
    /// Whether a container's revision label names this spec.
    fn is_revision(&self, label: &str) -> bool {
        label.parse().is_ok_and(|r| self.revisions.contains(&r))
    }

    /// Whether `spec` is, field for field and label for label, a container
    /// this score asks for at one of its revisions.
    fn produced(&self, deployment: &str, spec: &ContainerSpec) -> bool {
        // The digest the image had when it was created is recorded, not asked for.
        let mut spec = spec.clone();
        spec.labels
            .remove(podfleet_core::runtime::LABEL_IMAGE_DIGEST);
        let spec = &spec;
        let Some(revision) = spec
            .labels
            .get(podfleet_core::runtime::LABEL_REVISION)
            .and_then(|r| r.parse::<u64>().ok())
            .filter(|r| self.revisions.contains(r))
        else {
            return false;
        };
        self.score.services.iter().any(|s| {
            podfleet_core::reconciler::service_container_spec(
                deployment,
                &self.score,
                s,
                Revision::new(revision),
            ) == *spec
        }) || self.score.init_containers.iter().any(|i| {
            podfleet_core::reconciler::init_container_spec(deployment, i, Revision::new(revision))
                == *spec
        })
    }

    /// Whether `spec` runs what this score asks of `service`: everything
    /// baked into the container (image, args, env, mounts, ports, stop
    /// signal, name and labels), whatever revision created it and whatever
    /// grace it recorded, since neither is baked in.
    fn runs_service(&self, deployment: &str, service: &str, spec: &ContainerSpec) -> bool {
        self.score
            .services
            .iter()
            .filter(|s| s.name == service)
            .any(|s| {
                let wanted = podfleet_core::reconciler::service_container_spec(
                    deployment,
                    &self.score,
                    s,
                    Revision::new(self.revision),
                );
                baked_in(&wanted) == baked_in(spec)
            })
    }
}

/// A spec without the labels that are not baked into what runs (the
/// revision, the grace and the image's digest, which the image decides).
fn baked_in(spec: &ContainerSpec) -> ContainerSpec {
    let mut spec = spec.clone();
    spec.labels.remove(podfleet_core::runtime::LABEL_REVISION);
    spec.labels.remove(podfleet_core::runtime::LABEL_GRACE);
    spec.labels
        .remove(podfleet_core::runtime::LABEL_IMAGE_DIGEST);
    spec
}

/// The safety invariants, checked against the fake runtime's ground truth.
///
/// Tell it every desired-state input the reconciler is given, in the order
/// the reconciler is given them ([`saw_put`](Self::saw_put),
/// [`saw_delete`](Self::saw_delete), [`saw_resync`](Self::saw_resync));
/// then [`check_op`](Self::check_op) each runtime operation as it is issued,
/// [`check_state`](Self::check_state) after each one takes effect and
/// [`check_report`](Self::check_report) each state published. Each
/// [`Violation`] found is appended, with its [`Invariant`] and the time. The
/// [`Harness`](crate::Harness), the simulator's network tiers and the fuzzer all use it.
///
/// What it holds a container to is the spec the fake recorded at its create
/// ([`FakeContainer::spec`](crate::FakeContainer::spec)), compared with the spec the reconciler's own
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
    /// Inputs so far (puts and image answers), to order them.
    inputs: u64,
    /// Per image, the input count when an answer last said the store has
    /// it (an inspect that found it, a pull that landed).
    images_seen: BTreeMap<String, u64>,
    /// Containers (by id) whose marker of provisioning an answer showed the
    /// reconciler: a write of it that succeeded, or a read of it.
    markers_seen: BTreeSet<String>,
}

impl Oracle {
    /// The agent (re)started with `cache` (`None`: it had none, or lost
    /// it): it has not looked at the runtime yet, and of the valid revisions
    /// handed to it before, it knows only the ones its cache kept. A
    /// deployment the cache does not hold is as new to it as one never
    /// seen: whatever it did with it before (its images kept from garbage
    /// collection, its next rollout) cannot be asked of it until the watch
    /// hands it a valid revision again.
    pub fn saw_agent_start(&mut self, cache: Option<&podfleet_core::reconciler::AgentCache>) {
        self.listed = false;
        for (deployment, seen) in &mut self.seen {
            let cached = DeploymentName::new(deployment.as_str())
                .ok()
                .and_then(|name| cache?.deployments.get(&name))
                .filter(|cached| cached.score.is_some());
            seen.valid = cached.and_then(|cached| {
                let revision = cached.revision.get();
                self.history
                    .get(deployment)?
                    .iter()
                    .rev()
                    .find(|v| v.revisions.contains(&revision))
                    .cloned()
            });
        }
    }

    /// A `list` answered: the agent has looked at the runtime.
    pub fn saw_list(&mut self) {
        self.listed = true;
    }

    /// The reconciler was handed `result`, the answer to `op`: what it may
    /// rely on from then on ([`saw_image_answer`](Self::saw_image_answer)
    /// for an image operation; for the write or the read of a container's
    /// marker of provisioning, that the container holds it). A drive loop
    /// calls this for every answer it hands over.
    pub fn saw_answer(&mut self, op: &RuntimeOp, result: &RuntimeResult) {
        if let Some(image) = op.image() {
            self.saw_image_answer(image, result);
        }
        let marker = match (op, result) {
            (
                RuntimeOp::CopyFile {
                    container, path, ..
                },
                Ok(_),
            ) => Some(container).filter(|_| path == podfleet_core::reconciler::PROVISIONED_PATH),
            (
                RuntimeOp::Exec { container, argv },
                Ok(RuntimeReply::Executed { exit_code: 0, .. }),
            ) => Some(container).filter(|_| {
                argv.iter()
                    .any(|a| a == podfleet_core::reconciler::PROVISIONED_PATH)
            }),
            _ => None,
        };
        if let Some(container) = marker {
            self.markers_seen.insert(container.clone());
        }
    }

    /// The reconciler was handed the answer to an `inspect_image` or a
    /// `pull` of `image`: from then on it may rely on the image being in the
    /// store, even if a fault takes it away again.
    pub fn saw_image_answer(&mut self, image: &str, result: &RuntimeResult) {
        let present = matches!(
            result,
            Ok(RuntimeReply::ImageInspected { image: Some(_) } | RuntimeReply::Pulled { .. })
        );
        if present {
            self.inputs += 1;
            self.images_seen.insert(image.to_owned(), self.inputs);
        }
    }

    /// The reconciler was handed a put of `bytes` at `revision`.
    pub fn saw_put(&mut self, deployment: &str, revision: u64, bytes: &[u8]) {
        self.inputs += 1;
        let input = self.inputs;
        let entry = self.seen.entry(deployment.to_owned()).or_insert(Seen {
            latest: 0,
            valid: None,
        });
        if revision < entry.latest {
            return;
        }
        entry.latest = revision;
        if let Ok(score) = podfleet_core::wire::PodmanV0Score::from_json(bytes) {
            let hashes = score
                .services
                .iter()
                .map(|s| {
                    (
                        s.name.to_string(),
                        podfleet_core::reconciler::service_spec_hash(&score, s),
                    )
                })
                .collect();
            let inits = score
                .init_containers
                .iter()
                .map(|i| i.name.to_string())
                .collect();
            let (mut revisions, handed) = match &entry.valid {
                // The same spec (the same bytes, or bytes that decode to an
                // equal score) keeps the init containers that ran for it,
                // and the images seen for it.
                Some(v)
                    if v.bytes == bytes
                        || podfleet_core::wire::PodmanV0Score::from_json(&v.bytes).as_ref()
                            == Ok(&score) =>
                {
                    (v.revisions.clone(), v.handed)
                }
                _ => (BTreeSet::new(), input),
            };
            revisions.insert(revision);
            let valid = ValidSpec {
                revision,
                revisions,
                bytes: bytes.to_vec(),
                score,
                hashes,
                inits,
                handed,
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
    /// score that created it (4), and download before kill (7): a stop or
    /// remove of a service container of an older revision than the newest
    /// valid one comes only once every image that revision creates
    /// containers from is in the store, or an answer told the reconciler it
    /// was there since the revision was handed over (a fault may take an
    /// image away after that).
    pub fn check_op(
        &self,
        now: Timestamp,
        op: &RuntimeOp,
        runtime: &FakeRuntime,
        violations: &mut Vec<Violation>,
    ) {
        use podfleet_core::runtime::{
            LABEL_DEPLOYMENT, LABEL_GRACE, LABEL_INIT, LABEL_REVISION, LABEL_SERVICE,
        };
        if let RuntimeOp::RemoveImage { id } = op {
            self.check_image_removal(now, id, runtime, violations);
            return;
        }
        self.check_ownership(now, op, runtime, violations);
        let (spec, running) = match op {
            RuntimeOp::Create { spec } => (spec, false),
            RuntimeOp::Start { container }
            | RuntimeOp::Stop { container, .. }
            | RuntimeOp::Remove { container, .. } => {
                let found = runtime
                    .containers()
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
        let mut violation =
            |invariant, detail: String| violations.push(Violation::at(now, invariant, detail));
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
                    violation(Invariant::NoRevert, format!(
                        "{} of {deployment}/{service} (revision {}) which is not the newest valid spec seen ({newest}) as its score asks for it",
                        op.name(),
                        label(LABEL_REVISION)
                    ));
                }
                if let (RuntimeOp::Start { container }, Some(v), false) = (op, valid, init) {
                    if v.is_revision(&label(LABEL_REVISION)) {
                        // The init containers that ran before this very
                        // container was created: a later attempt's, cut
                        // short, does not undo them (a restarted container
                        // runs no init container again).
                        let id = runtime
                            .containers()
                            .get(container.as_str())
                            .or_else(|| runtime.by_name(container))
                            .map(|c| c.id.as_str());
                        let created = runtime
                            .events()
                            .iter()
                            .position(|(_, e)| matches!(e, RuntimeEvent::Created { id: c, .. } if Some(c.as_str()) == id))
                            .unwrap_or(runtime.events().len());
                        let before = &runtime.events()[..created];
                        if let Err(why) = inits_completed(before, &deployment, v) {
                            violation(
                                Invariant::InitContainersFirst,
                                format!(
                                    "start of {deployment}/{service} (revision {}) but {why}",
                                    v.revision
                                ),
                            );
                        }
                    }
                }
            }
            RuntimeOp::Stop {
                container,
                signal,
                grace,
            } if !init => {
                if !runtime.containers().contains_key(container.as_str()) {
                    violation(Invariant::GracefulReplace, format!(
                        "stop of {deployment}/{service} by name {container:?}, not by its recorded id"
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
                    violation(Invariant::GracefulReplace, format!(
                        "stop of {deployment}/{service} with {} grace {}s, but it was created with {} grace {}",
                        signal,
                        grace.as_secs(),
                        spec.stop_signal,
                        recorded_grace.map_or("unknown".to_owned(), |g| format!("{}s", g.as_secs()))
                    ));
                }
            }
            RuntimeOp::Remove { container, .. } if running && !init => {
                violation(
                    Invariant::GracefulReplace,
                    format!(
                    "remove of running {deployment}/{service} ({container}) without a stop first"
                ),
                );
            }
            _ => {}
        }
        if let (RuntimeOp::Stop { .. } | RuntimeOp::Remove { .. }, Some(v), false) =
            (op, valid, init)
        {
            if !v.is_revision(&label(LABEL_REVISION)) {
                let absent = self.images_not_ready(&deployment, v, runtime);
                if !absent.is_empty() {
                    violation(
                        Invariant::DownloadBeforeKill,
                        format!(
                            "{} of {deployment}/{service} (revision {}) while rolling out revision {}, whose images {} are not in the store",
                            op.name(),
                            label(LABEL_REVISION),
                            v.revision,
                            absent.join(", ")
                        ),
                    );
                }
            }
        }
        if running && !init && !matches!(op, RuntimeOp::Start { .. }) {
            // Healthy: what the newest spec runs, provisioned if it has a
            // setup script (the container holds the marker of that very
            // script, and an answer showed the reconciler it does: a write
            // of the marker that took effect but failed is no news it
            // could act on), and kept by its lifetime: a `persistent` one
            // (`per_run` runs again for every revision, and `no_launch`
            // runs nothing of its own, so a container of an earlier
            // lifetime goes even when its spec is the same).
            let container = op
                .container()
                .and_then(|c| runtime.containers().get(c).or_else(|| runtime.by_name(c)));
            let provisioned = |v: &ValidSpec| {
                let script = v
                    .score
                    .services
                    .iter()
                    .find(|s| s.name == service.as_str())
                    .and_then(|s| s.setup_script.as_deref());
                script.is_none_or(|script| {
                    let marker = podfleet_core::reconciler::provisioned_marker(script);
                    container.is_some_and(|c| {
                        self.markers_seen.contains(&c.id)
                            && c.files()
                                .get(podfleet_core::reconciler::PROVISIONED_PATH)
                                .is_some_and(|f| f.content == marker)
                    })
                })
            };
            let healthy_target = valid.is_some_and(|v| {
                v.runs_service(&deployment, &service, spec)
                    && provisioned(v)
                    && v.score.lifetime() == podfleet_core::wire::Lifetime::Persistent
            });
            if healthy_target {
                violation(
                    Invariant::HealthyContainerRecreated,
                    format!(
                        "{} of running {deployment}/{service} whose spec did not change",
                        op.name()
                    ),
                );
            }
        }
    }

    /// The images the rollout of `valid` creates containers from that are
    /// neither in the store nor seen there by the reconciler since `valid`
    /// was handed over: the images of its services that no container of
    /// `deployment` runs as asked, and, if there is one, of its init
    /// containers. What the rollout needs is read from the runtime, never
    /// from the reconciler's plan. A `no_launch` rollout creates nothing,
    /// so it waits for no image.
    fn images_not_ready(
        &self,
        deployment: &str,
        valid: &ValidSpec,
        runtime: &FakeRuntime,
    ) -> Vec<String> {
        use podfleet_core::runtime::{LABEL_DEPLOYMENT, LABEL_INIT, LABEL_SERVICE};
        if valid.score.lifetime() == podfleet_core::wire::Lifetime::NoLaunch {
            return Vec::new();
        }
        let recreated: Vec<&podfleet_core::wire::PodmanService> = valid
            .score
            .services
            .iter()
            .filter(|s| {
                !runtime.containers().values().any(|c| {
                    let labels = &c.spec.labels;
                    labels
                        .get(LABEL_DEPLOYMENT)
                        .is_some_and(|d| d == deployment)
                        && !labels.contains_key(LABEL_INIT)
                        && labels
                            .get(LABEL_SERVICE)
                            .is_some_and(|n| *n == s.name.as_str())
                        && valid.runs_service(deployment, s.name.as_str(), &c.spec)
                })
            })
            .collect();
        let inits = valid
            .score
            .init_containers
            .iter()
            .filter(|_| !recreated.is_empty())
            .map(|i| i.image.as_str());
        let mut absent: Vec<String> = Vec::new();
        for image in recreated.iter().map(|s| s.image.as_str()).chain(inits) {
            let seen = self
                .images_seen
                .get(image)
                .is_some_and(|&at| at > valid.handed);
            if runtime.image(image).is_none() && !seen && !absent.iter().any(|a| a == image) {
                absent.push(image.to_owned());
            }
        }
        absent
    }

    /// Image garbage collection (8): the image `id` is used by no container
    /// and named by no deployment's newest valid spec.
    fn check_image_removal(
        &self,
        now: Timestamp,
        id: &str,
        runtime: &FakeRuntime,
        violations: &mut Vec<Violation>,
    ) {
        let Some((_, names, _)) = runtime.images().list().into_iter().find(|(i, ..)| i == id)
        else {
            return;
        };
        let mut violation = |detail: String| {
            violations.push(Violation::at(now, Invariant::ImageGcKeepsNeeded, detail));
        };
        if let Some(c) = runtime
            .containers()
            .values()
            .find(|c| runtime.image(&c.spec.image).is_some_and(|i| i.id == id))
        {
            violation(format!(
                "remove_image of {} ({id}), which container {} uses",
                names.join(", "),
                c.spec.name
            ));
        }
        for (deployment, seen) in &self.seen {
            let Some(valid) = &seen.valid else {
                continue;
            };
            let wanted: Vec<&str> = valid.score.images().collect();
            if podfleet_core::reconciler::gc::named_by(wanted.iter().copied(), &names) {
                violation(format!(
                    "remove_image of {} ({id}), which revision {} of {deployment} names",
                    names.join(", "),
                    valid.revision
                ));
            }
        }
    }

    /// Checks the runtime's state: never two containers for one service (4).
    pub fn check_state(
        &self,
        now: Timestamp,
        runtime: &FakeRuntime,
        violations: &mut Vec<Violation>,
    ) {
        use podfleet_core::runtime::{LABEL_DEPLOYMENT, LABEL_INIT, LABEL_SERVICE};
        let mut per_service: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for c in runtime.containers().values() {
            // Init containers come and go in turn; the base system's are
            // not podfleet's to count.
            if c.spec.labels.contains_key(LABEL_INIT) || !is_podfleets(&c.spec.labels) {
                continue;
            }
            let label = |k: &str| c.spec.labels.get(k).map_or("", String::as_str);
            *per_service
                .entry((label(LABEL_DEPLOYMENT), label(LABEL_SERVICE)))
                .or_default() += 1;
        }
        for ((deployment, service), n) in per_service {
            if n > 1 {
                violations.push(Violation::at(
                    now,
                    Invariant::OneContainerPerService,
                    format!("{n} containers for service {deployment}/{service}"),
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
        violations: &mut Vec<Violation>,
    ) {
        let about_containers = state.phase == podfleet_core::wire::Phase::Running
            || matches!(
                state.cause,
                Some(podfleet_core::wire::FailureCause::CrashLoop { .. })
            );
        if about_containers && !self.listed {
            violations.push(Violation::at(now, Invariant::TruthfulReports, format!(
                "{deployment} reported {:?} at revision {} before the agent, since it started, listed the runtime",
                state.phase, state.revision
            )));
        }
        self.check_report(now, deployment, state, runtime, violations);
    }

    /// Only own containers: a mutation of an existing container needs
    /// podfleet's labels on it, and a `no_launch` deployment mutates
    /// nothing but its own leftovers, which it only stops and removes.
    fn check_ownership(
        &self,
        now: Timestamp,
        op: &RuntimeOp,
        runtime: &FakeRuntime,
        violations: &mut Vec<Violation>,
    ) {
        use podfleet_core::runtime::LABEL_DEPLOYMENT;
        use podfleet_core::wire::Lifetime;
        let Some(container) = op.container().filter(|_| op.is_mutation()) else {
            return;
        };
        let found = runtime
            .containers()
            .get(container)
            .or_else(|| runtime.by_name(container));
        let labels = match (op, found) {
            (RuntimeOp::Create { spec }, _) => &spec.labels,
            (_, Some(c)) => &c.spec.labels,
            (_, None) => return,
        };
        let mut violation = |detail: String| {
            violations.push(Violation::at(now, Invariant::OnlyOwnContainers, detail))
        };
        if !is_podfleets(labels) {
            violation(format!(
                "{} of {container}, a container without podfleet's labels",
                op.name()
            ));
            return;
        }
        let Some(deployment) = labels.get(LABEL_DEPLOYMENT) else {
            return;
        };
        let no_launch = self
            .seen
            .get(deployment)
            .and_then(|s| s.valid.as_ref())
            .is_some_and(|v| v.score.lifetime() == Lifetime::NoLaunch);
        let retires = matches!(op, RuntimeOp::Stop { .. } | RuntimeOp::Remove { .. });
        if no_launch && !retires {
            violation(format!(
                "{} of {container} for {deployment}, whose lifetime is no_launch",
                op.name()
            ));
        }
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
        violations: &mut Vec<Violation>,
    ) {
        if state.phase != podfleet_core::wire::Phase::Running {
            return;
        }
        let valid = self
            .seen
            .get(deployment.as_str())
            .and_then(|s| s.valid.as_ref())
            .filter(|v| v.revision == state.revision.get())
            // A summary leaves the ids out by design.
            .filter(|_| !state.summarised);
        if let Some(valid) =
            valid.filter(|v| v.score.lifetime() == podfleet_core::wire::Lifetime::NoLaunch)
        {
            // Verified, not launched: each id is the named container's, which
            // runs the score's image.
            for service in &valid.score.services {
                let id = state.container_ids.get(service.name.as_str());
                let truthful =
                    verified_running(runtime, service).is_some_and(|c| Some(&c.id) == id);
                if !truthful {
                    violations.push(Violation::at(now, Invariant::TruthfulReports, format!(
                        "{deployment} reported Running at revision {} but container {} of service {} is not running the score's image as {id:?}",
                        state.revision,
                        service.container_name(),
                        service.name
                    )));
                }
            }
            return;
        }
        if let Some(valid) = valid {
            // A service with a setup script is running only once its
            // container holds the marker of that very script.
            for service in &valid.score.services {
                let Some(script) = &service.setup_script else {
                    continue;
                };
                let marker = podfleet_core::reconciler::provisioned_marker(script);
                let marked = state
                    .container_ids
                    .get(service.name.as_str())
                    .and_then(|id| runtime.containers().get(id))
                    .and_then(|c| c.files().get(podfleet_core::reconciler::PROVISIONED_PATH))
                    .is_some_and(|f| f.content == marker);
                if !marked {
                    violations.push(Violation::at(now, Invariant::TruthfulReports, format!(
                        "{deployment} reported Running at revision {} but the container of service {} was never provisioned with its setup script",
                        state.revision, service.name
                    )));
                }
            }
            for (service, hash) in &valid.hashes {
                let id = state.container_ids.get(service.as_str());
                let created_with = id
                    .and_then(|id| runtime.containers().get(id))
                    .and_then(|c| c.spec.labels.get(podfleet_core::runtime::LABEL_SPEC_HASH));
                if created_with != Some(hash) {
                    violations.push(Violation::at(now, Invariant::TruthfulReports, format!(
                        "{deployment} reported Running at revision {} but service {service} {}",
                        state.revision,
                        match id {
                            None => "is not in the report".to_owned(),
                            Some(id) => format!("is reported as {id}, which is not its container for that revision"),
                        }
                    )));
                }
            }
        }
        for (service, id) in &state.container_ids {
            let started = runtime.containers().get(id).is_some_and(|c| c.starts > 0);
            if !started {
                violations.push(Violation::at(
                    now,
                    Invariant::TruthfulReports,
                    format!(
                        "{deployment} reported Running with {service}={id}, which {}",
                        if runtime.containers().contains_key(id) {
                            "was never started"
                        } else {
                            "does not exist"
                        }
                    ),
                ));
            }
        }
    }
}

/// Whether a container with `labels` is podfleet's: one it created (the
/// base system's, and anyone else's, are not).
pub fn is_podfleets(labels: &BTreeMap<String, String>) -> bool {
    labels
        .get(podfleet_core::runtime::LABEL_MANAGED)
        .is_some_and(|v| v == "true")
}

/// The container a `no_launch` `service` verifies, when it is running the
/// score's image: what a verification must find to say `running`. `None`
/// when it is missing, stopped, on another image, or when the store has no
/// image under the score's reference to compare with.
pub fn verified_running<'a>(
    runtime: &'a FakeRuntime,
    service: &podfleet_core::wire::PodmanService,
) -> Option<&'a crate::FakeContainer> {
    runtime.by_name(service.container_name()).filter(|c| {
        runtime.is_running(&c.id)
            && c.image_id.is_some()
            && c.image_id == runtime.image(&service.image).map(|i| i.id)
    })
}

/// Whether, by the end of `events`, every init container of `valid` had
/// exited 0, in order (each one's latest exit 0 after the one before it's).
fn inits_completed(
    events: &[(Timestamp, RuntimeEvent)],
    deployment: &str,
    valid: &ValidSpec,
) -> Result<(), String> {
    use podfleet_core::runtime::LABEL_REVISION;
    let mut previous_exit = Timestamp::ZERO;
    for init in &valid.inits {
        let name = podfleet_core::runtime::init_container_name(deployment, init);
        let ids: BTreeSet<&str> = events
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
        let exit = events
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Completion;
    use podfleet_core::reconciler::service_container_spec;
    use podfleet_core::runtime::{RuntimeReply, LABEL_GRACE, LABEL_STOP_SIGNAL};
    use podfleet_core::wire::PodmanV0Score;
    use podfleet_core::wire::Signal;

    const V1: &str = r#"{"services":[{"name":"web","image":"img/a:1"}],"lifecycle":{"stop_signal":"SIGINT","grace_period_secs":2}}"#;
    /// The same service, a longer grace: nothing is recreated.
    const V2: &str = r#"{"services":[{"name":"web","image":"img/a:1"}],"lifecycle":{"stop_signal":"SIGINT","grace_period_secs":9}}"#;
    const OTHER: &str = r#"{"services":[{"name":"web","image":"img/b:1"}]}"#;

    fn web_spec(json: &str, revision: u64) -> ContainerSpec {
        let score = PodmanV0Score::from_json(json.as_bytes()).unwrap();
        service_container_spec("shop", &score, &score.services[0], Revision::new(revision))
    }

    /// The violations `op` would cause, in words.
    fn check(oracle: &Oracle, rt: &FakeRuntime, op: &RuntimeOp) -> Vec<String> {
        let mut found = Vec::new();
        oracle.check_op(Timestamp::ZERO, op, rt, &mut found);
        found.iter().map(Violation::to_string).collect()
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

    /// Revision 5 runs img/a:1; revision 6 asks for img/a:2 and keeps db.
    const A1: &str =
        r#"{"services":[{"name":"web","image":"img/a:1"},{"name":"db","image":"img/db:1"}]}"#;
    const A2: &str = r#"{"services":[{"name":"web","image":"img/a:2"},{"name":"db","image":"img/db:1"}],"init_containers":[{"name":"migrate","image":"img/init:2"}]}"#;

    fn spec_of(json: &str, service: usize, revision: u64) -> ContainerSpec {
        let score = PodmanV0Score::from_json(json.as_bytes()).unwrap();
        service_container_spec(
            "shop",
            &score,
            &score.services[service],
            Revision::new(revision),
        )
    }

    #[test]
    fn no_old_container_is_stopped_before_the_new_revisions_images_are_in_the_store() {
        let mut oracle = Oracle::default();
        let mut rt = FakeRuntime::new();
        oracle.saw_put("shop", 5, A1.as_bytes());
        let web = create_and_start(&oracle, &mut rt, spec_of(A1, 0, 5));
        create_and_start(&oracle, &mut rt, spec_of(A1, 1, 5));
        // db is unchanged: its image is not the rollout's business.
        rt.remove_image("img/db:1");
        rt.remove_image("img/a:2");
        rt.remove_image("img/init:2");
        oracle.saw_put("shop", 6, A2.as_bytes());
        let found = check(&oracle, &rt, &stop(&web, Signal::Term, 30));
        assert!(
            found.iter().any(|v| v.contains(
                "download before kill: stop of shop/web (revision 5) while rolling out revision 6, whose images img/a:2, img/init:2 are not in the store"
            )),
            "{found:?}"
        );
        let remove = RuntimeOp::Remove {
            container: web.clone(),
            force: true,
        };
        assert!(check(&oracle, &rt, &remove)
            .iter()
            .any(|v| v.contains("download before kill")));
        // In the store: fine.
        rt.add_image("img/a:2");
        rt.add_image("img/init:2");
        assert_eq!(
            check(&oracle, &rt, &stop(&web, Signal::Term, 30)),
            Vec::<String>::new()
        );
        // Seen there since the put, then taken away by a fault: fine too.
        rt.remove_image("img/a:2");
        let pulled = Ok(RuntimeReply::Pulled {
            image: rt.image("img/a:1").unwrap(),
        });
        oracle.saw_image_answer("img/a:2", &pulled);
        assert_eq!(
            check(&oracle, &rt, &stop(&web, Signal::Term, 30)),
            Vec::<String>::new()
        );
        // Seen only before a newer revision was handed over: not enough
        // (img/init:3 is preloaded).
        oracle.saw_put("shop", 7, A2.replace("img/init:2", "img/init:3").as_bytes());
        let found = check(&oracle, &rt, &stop(&web, Signal::Term, 30));
        assert!(
            found
                .iter()
                .any(|v| v.contains("revision 7, whose images img/a:2 are")),
            "{found:?}"
        );
    }

    #[test]
    fn nothing_outside_podfleets_labels_is_touched_and_no_launch_launches_nothing() {
        let mut oracle = Oracle::default();
        let mut rt = crate::images::runtime();
        crate::base_system::install(&mut rt);
        oracle.saw_put("shop", 5, V1.as_bytes());
        let own = create_and_start(&oracle, &mut rt, web_spec(V1, 5));
        let backup = rt
            .by_name(crate::base_system::BACKUP)
            .map(|c| c.id.clone())
            .unwrap();
        let exec = |container: &str| RuntimeOp::Exec {
            container: container.to_owned(),
            argv: vec!["cat".into(), "/etc/hostname".into()],
        };
        // The base system's containers: looked at, never touched, by id or
        // by name.
        assert_eq!(
            check(
                &oracle,
                &rt,
                &RuntimeOp::Inspect {
                    container: backup.clone()
                }
            ),
            Vec::<String>::new()
        );
        for op in [
            RuntimeOp::Start {
                container: backup.clone(),
            },
            exec(crate::base_system::PROXY),
            stop(crate::base_system::VPN, Signal::Term, 30),
        ] {
            let found = check(&oracle, &rt, &op);
            assert!(
                found.iter().any(|v| v.contains("only own containers")
                    && v.contains("without podfleet's labels")),
                "{op:?}: {found:?}"
            );
        }
        // A no_launch revision of shop retires its own container, and
        // launches, starts and provisions nothing.
        let no_launch = r#"{"lifetime":"no_launch","services":[{"name":"web","image":"img/a:1","container":"base_proxy"}]}"#;
        oracle.saw_put("shop", 6, no_launch.as_bytes());
        assert_eq!(
            check(&oracle, &rt, &stop(&own, Signal::Int, 2)),
            Vec::<String>::new()
        );
        for op in [
            RuntimeOp::Start {
                container: own.clone(),
            },
            exec(&own),
            RuntimeOp::Create {
                spec: web_spec(V1, 6),
            },
        ] {
            let found = check(&oracle, &rt, &op);
            assert!(
                found.iter().any(|v| v.contains("only own containers")
                    && v.contains("whose lifetime is no_launch")),
                "{op:?}: {found:?}"
            );
        }
    }
}
