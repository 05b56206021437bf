//! `no_launch`: verifying containers someone else runs.
//!
//! A `no_launch` deployment never creates, starts, stops or removes a
//! container it verifies. Each verification inspects every service's
//! container by name, then looks the score's image up in the store and
//! compares the two image ids (one comparison for a tag and for a pinned
//! digest alike: the store resolves both). What it finds is reported per
//! service; nothing it finds leads to an action. A probe that fails is
//! `unknown`, never `missing`: not knowing is not absence.
//!
//! The only containers a `no_launch` rollout removes are the deployment's
//! own, labelled ones, left by an earlier revision of another lifetime.

use super::*;
use crate::wire::{Lifetime, Verification, VerifiedStatus};

/// What the last verification of one service found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Found {
    pub(super) verification: Verification,
    /// The container's id, when it exists.
    pub(super) id: Option<String>,
    /// The manifest digest of the image it runs, when the store knows it.
    pub(super) digest: Option<String>,
}

impl Found {
    fn new(container: &str, status: VerifiedStatus, evidence: String) -> Self {
        Self {
            verification: Verification {
                container: container.to_owned(),
                status,
                evidence,
            },
            id: None,
            digest: None,
        }
    }
}

/// One inspect per service, by container name.
fn steps_for(target: &Target) -> Vec<Step> {
    target
        .score
        .services
        .iter()
        .map(|s| {
            Step::Call(Call::VerifyContainer {
                service: s.name.clone(),
                container: s.container_name().to_owned(),
            })
        })
        .collect()
}

/// A container's state in words, for the evidence.
fn state_words(status: &ContainerStatus) -> String {
    match (status.state, status.exit_code) {
        (ContainerState::Exited, Some(code)) => format!("exited with code {code}"),
        (ContainerState::Exited, None) => "exited".into(),
        (ContainerState::Created, _) => "created, never started".into(),
        (ContainerState::Paused, _) => "paused".into(),
        (ContainerState::Stopping, _) => "stopping".into(),
        (ContainerState::Running, _) => "running".into(),
        (ContainerState::Unknown, _) => "in a state the runtime did not name".into(),
    }
}

impl Deployment {
    /// Whether the target is a `no_launch` one.
    pub(super) fn verifies_only(&self) -> bool {
        self.target
            .as_ref()
            .is_some_and(|t| t.score.lifetime() == Lifetime::NoLaunch)
    }

    /// The rollout of a `no_launch` target: retire the deployment's own
    /// containers (an earlier revision's), then verify, then applied.
    pub(super) fn plan_verification(&mut self, mine: &[&ContainerSummary]) {
        let Some(target) = self.target.as_ref() else {
            return;
        };
        let mut steps = plan::retire_all(mine);
        steps.extend(steps_for(target));
        steps.push(Step::Finish);
        self.replace_steps(steps);
    }

    /// Liveness of a `no_launch` deployment: verify again, unless
    /// containers of its own are left to retire (a rollout does that).
    pub(super) fn reverify(&mut self, mine: &[&ContainerSummary]) {
        if !mine.is_empty() {
            self.demote();
            return;
        }
        if let Some(target) = self.target.as_ref().filter(|_| self.is_applied()) {
            self.job = Some(Job::new(JobKind::Verify, steps_for(target)));
        }
    }

    /// The answer to inspecting a verified container.
    pub(super) fn on_verify_container(
        &mut self,
        service: ServiceName,
        container: String,
        result: RuntimeResult,
    ) {
        let image = self
            .target
            .as_ref()
            .and_then(|t| t.score.services.iter().find(|s| s.name == service))
            .map(|s| s.image.clone());
        let found = match (result, image) {
            (Ok(RuntimeReply::Inspected { status }), Some(image)) => {
                self.push_front(Call::VerifyImage {
                    service,
                    container,
                    image,
                    status,
                });
                return;
            }
            (Err(e), _) if e.kind == RuntimeErrorKind::NotFound => Found::new(
                &container,
                VerifiedStatus::Missing,
                format!("no container is named {}", Quoted(&container)),
            ),
            (Err(e), _) => Found::new(
                &container,
                VerifiedStatus::Unknown,
                format!("inspect failed: {}", e.message),
            ),
            (Ok(reply), _) => Found::new(
                &container,
                VerifiedStatus::Unknown,
                format!("inspect answered {reply:?}"),
            ),
        };
        self.record(service, found);
    }

    /// The answer to looking the score's image up, for a container that
    /// exists.
    pub(super) fn on_verify_image(
        &mut self,
        config: &Config,
        service: ServiceName,
        container: String,
        image: &str,
        status: ContainerStatus,
        result: RuntimeResult,
    ) {
        let runs = status.image_id.as_deref();
        let mut found = match (result, runs) {
            (Err(e), _) => Found::new(
                &container,
                VerifiedStatus::Unknown,
                format!("looking up {} failed: {}", Quoted(image), e.message),
            ),
            (Ok(RuntimeReply::ImageInspected { image: None }), _) => Found::new(
                &container,
                VerifiedStatus::Drifted,
                format!(
                    "the score's image {} is not in the device's store, so what the container runs cannot be checked against it",
                    Quoted(image)
                ),
            ),
            (Ok(RuntimeReply::ImageInspected { image: Some(_) }), None) => Found::new(
                &container,
                VerifiedStatus::Unknown,
                "the runtime did not say which image the container runs".into(),
            ),
            (Ok(RuntimeReply::ImageInspected { image: Some(info) }), Some(runs))
                if info.id != runs =>
            {
                Found::new(
                    &container,
                    VerifiedStatus::Drifted,
                    format!(
                        "it runs image {runs}; the score's image {} is {} in the store",
                        Quoted(image),
                        info.id
                    ),
                )
            }
            (Ok(RuntimeReply::ImageInspected { image: Some(info) }), Some(_)) => {
                let (verdict, evidence) = if status.state == ContainerState::Running {
                    (VerifiedStatus::Running, format!("running {}", info.id))
                } else {
                    (VerifiedStatus::Stopped, state_words(&status))
                };
                let mut found = Found::new(&container, verdict, evidence);
                found.digest = info.digest;
                found
            }
            (Ok(reply), _) => Found::new(
                &container,
                VerifiedStatus::Unknown,
                format!("image lookup answered {reply:?}"),
            ),
        };
        if found.verification.status == VerifiedStatus::Stopped && bug!(config, start_unverified) {
            self.push_front(Call::StartService {
                service: service.clone(),
                id: status.id.clone(),
            });
        }
        found.id = Some(status.id);
        self.record(service, found);
    }

    fn record(&mut self, service: ServiceName, found: Found) {
        self.verified.insert(service, found);
    }

    /// The report of an applied `no_launch` deployment, or `None` until
    /// every service has been verified since the agent started.
    pub(super) fn verification_report(
        &self,
        target: &Target,
        base: impl Fn(Phase, String, Option<FailureCause>) -> DeploymentState,
    ) -> Option<DeploymentState> {
        let found: Vec<(&ServiceName, &Found)> = target
            .score
            .services
            .iter()
            .map(|s| Some((&s.name, self.verified.get(&s.name)?)))
            .collect::<Option<_>>()?;
        let down = found
            .iter()
            .find(|(_, f)| f.verification.status != VerifiedStatus::Running);
        let (phase, message, cause) = match down {
            Some((service, f)) => {
                let cause = FailureCause::Unverified {
                    service: (*service).clone(),
                    container: f.verification.container.clone(),
                    status: f.verification.status,
                    evidence: f.verification.evidence.clone(),
                };
                (Phase::Failed, super::report::describe(&cause), Some(cause))
            }
            None => {
                let n = found.len();
                let plural = if n == 1 { "" } else { "s" };
                (
                    Phase::Running,
                    format!("{n} container{plural} verified running (no_launch)"),
                    None,
                )
            }
        };
        let mut report = base(phase, message, cause);
        for (service, f) in &found {
            if f.verification.status == VerifiedStatus::Running {
                if let Some(id) = &f.id {
                    report.container_ids.insert((*service).clone(), id.clone());
                }
                if let Some(digest) = &f.digest {
                    report
                        .image_digests
                        .insert((*service).clone(), digest.clone());
                }
            }
            report
                .verified
                .insert((*service).clone(), f.verification.clone());
        }
        Some(report)
    }
}
