//! `per_run`: each service runs once per revision, to completion.
//!
//! The rollout creates and starts the services as a persistent rollout
//! does (images first, init containers before), then waits for each to
//! exit and records its exit code; the revision is then applied, and its
//! report says `succeeded` (every code 0) or `failed` with the first
//! non-zero code. Nothing is restarted and nothing is retried: running it
//! again is a new revision (or `podfleet rollout restart`, which writes
//! one). The exited containers stay `run_retention` for their logs, then
//! go; a newer revision retires them at once.
//!
//! A container of the same spec counts as this revision's run only when
//! it was created for one of the revisions that put this very spec
//! (`since..=revision`): an agent that restarts mid-run waits for the run
//! under way rather than starting a second one.

use super::*;
use crate::wire::Lifetime;

impl Deployment {
    /// Whether the target is a `per_run` one.
    pub(super) fn runs_once(&self) -> bool {
        self.target
            .as_ref()
            .is_some_and(|t| t.score.lifetime() == Lifetime::PerRun)
    }

    /// A service just started in a `per_run` rollout: wait for it once
    /// every service of the run has started (just before the rollout's
    /// end), so that they run side by side.
    pub(super) fn after_run_started(&mut self, service: ServiceName, id: String) {
        if !self.runs_once() {
            return;
        }
        let Some(job) = self.job.as_mut().filter(|j| j.kind == JobKind::Rollout) else {
            return;
        };
        let wait = Step::Call(Call::WaitRun {
            service,
            id,
            retried: false,
        });
        match job.steps.iter().position(|s| matches!(s, Step::Finish)) {
            Some(at) => job.steps.insert(at, wait),
            None => job.steps.push_back(wait),
        }
    }

    /// A run's wait returned: read its exit code.
    pub(super) fn on_run_waited(&mut self, service: ServiceName, id: String, retried: bool) {
        self.push_front(Call::InspectRun {
            service,
            id,
            retried,
        });
    }

    /// A run's inspect: its exit code, or once more after a wait (the
    /// libpod race: inspect may say "running" just after wait returned).
    pub(super) fn on_run_inspected(
        &mut self,
        service: ServiceName,
        id: String,
        retried: bool,
        status: &ContainerStatus,
    ) {
        if let Some(o) = self.observed.get_mut(&service).filter(|o| o.id == id) {
            o.state = status.state;
        }
        match (status.state, status.exit_code) {
            (ContainerState::Exited, Some(code)) => {
                self.exit_codes.insert(service, code);
                self.cache_dirty = true;
            }
            _ if !retried => self.push_front(Call::WaitRun {
                service,
                id,
                retried: true,
            }),
            (state, _) => self.fail_job(FailureCause::Runtime {
                container: service_container_name(self.name.as_str(), &service),
                operation: RuntimeOperation::Inspect,
                error: format!("still {state:?} after wait returned twice, with no exit code"),
            }),
        }
    }

    /// Liveness of an applied `per_run` deployment: nothing restarts; once
    /// the retention is over, the run's exited containers go.
    pub(super) fn run_liveness(&mut self, now: Timestamp, config: &Config) {
        if !self.is_applied() {
            return;
        }
        let ended = *self.run_ended_at.get_or_insert(now);
        if now.saturating_since(ended) < config.run_retention {
            return;
        }
        let steps: Vec<Step> = self
            .observed
            .iter()
            .filter(|(_, o)| !matches!(o.state, ContainerState::Running | ContainerState::Stopping))
            .map(|(service, o)| {
                Step::Call(Call::RemoveService {
                    service: service.clone(),
                    id: o.id.clone(),
                })
            })
            .collect();
        if !steps.is_empty() {
            self.job = Some(Job::new(JobKind::Heal, steps));
        }
    }

    /// The report of an applied `per_run` deployment: succeeded, or failed
    /// with the first service (in score order) that exited non-zero.
    pub(super) fn run_report(
        &self,
        target: &Target,
        base: impl Fn(Phase, String, Option<FailureCause>) -> DeploymentState,
    ) -> DeploymentState {
        let failed = target
            .score
            .services
            .iter()
            .find_map(|s| Some((s, *self.exit_codes.get(&s.name)?)).filter(|(_, c)| *c != 0));
        let mut report = match failed {
            Some((service, exit_code)) => {
                let cause = FailureCause::RunFailed {
                    service: service.name.clone(),
                    exit_code,
                };
                let message = format!(
                    "{}; it runs again only for a new revision",
                    super::report::describe(&cause)
                );
                base(Phase::Failed, message, Some(cause))
            }
            None => {
                let n = target.score.services.len();
                let plural = if n == 1 { "" } else { "s" };
                base(
                    Phase::Succeeded,
                    format!("{n} service{plural} ran to completion"),
                    None,
                )
            }
        };
        report.exit_codes = self.exit_codes.clone();
        report.container_ids.clear();
        report.image_digests.clear();
        report
    }
}
