//! Reporting: the deployment's state as one [`DeploymentState`], and when
//! it is news.

use super::*;

impl Deployment {
    /// The report as things stand, when it differs from the last one.
    pub(in crate::reconciler) fn report_if_changed(
        &mut self,
        config: &Config,
    ) -> Option<DeploymentState> {
        let report = self.report(config)?;
        if let (Some(job), Some(last)) = (&self.job, &self.last_report) {
            // Mid-job reports would only narrate the steps: a restart is
            // reported when it is done, a rollout when it starts and ends,
            // and when a pull of its (which may take minutes) starts or ends.
            let same_stage = last.phase == report.phase
                && last.revision == report.revision
                && last.attempt == report.attempt
                && (job.kind != JobKind::Rollout || last.message == report.message);
            if matches!(job.kind, JobKind::Heal | JobKind::Verify) || same_stage {
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
        let restarts: BTreeMap<ServiceName, RestartRecord> = self
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
        let running_ids: BTreeMap<ServiceName, String> = self
            .observed
            .iter()
            .filter(|(_, o)| o.state == ContainerState::Running)
            .map(|(s, o)| (s.clone(), o.id.clone()))
            .collect();
        let image_digests: BTreeMap<ServiceName, String> = self
            .observed
            .iter()
            .filter(|(_, o)| o.state == ContainerState::Running)
            .filter_map(|(s, o)| Some((s.clone(), o.image_digest.clone()?)))
            .collect();
        let base = |phase, revision, message: String, cause| DeploymentState {
            phase,
            revision,
            container_ids: running_ids.clone(),
            image_digests: image_digests.clone(),
            message,
            cause,
            attempt: self.attempts,
            restarts: restarts.clone(),
            exit_codes: BTreeMap::new(),
            verified: BTreeMap::new(),
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
            let mut message = format!(
                "rolling out revision {revision} (attempt {})",
                self.attempts
            );
            if let Some((
                _,
                Call::Pull {
                    image, progress, ..
                },
            )) = self.job.as_ref().and_then(|j| j.in_flight.as_ref())
            {
                let _ = write!(message, ": pulling {}", Quoted(&short_image(image)));
                if let Some(p) = progress {
                    let _ = write!(message, " ({})", describe_progress(p));
                }
            }
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
        if self.verifies_only() {
            return self.verification_report(target, |phase, message, cause| {
                base(phase, revision, message, cause)
            });
        }
        if self.runs_once() {
            return Some(self.run_report(target, |phase, message, cause| {
                base(phase, revision, message, cause)
            }));
        }
        let unconfirmed = target.score.services.iter().find(|s| {
            self.observed.get(&s.name).is_some_and(|o| {
                o.state == ContainerState::Running && self.awaits_provisioning(config, &s.name, o)
            })
        });
        if let Some(service) = unconfirmed {
            let message = format!(
                "checking that the container of service {} finished its setup script",
                Quoted(&service.name)
            );
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
        FailureCause::ImagePull {
            image,
            reason,
            error,
        } => format!("pull of {} failed ({reason}): {error}", Quoted(image)),
        FailureCause::Unverified {
            service,
            container,
            status,
            evidence,
        } => format!(
            "service {}: container {} is {status}: {evidence}",
            Quoted(service),
            Quoted(container)
        ),
        FailureCause::RunFailed { service, exit_code } => format!(
            "service {} ran and exited with code {exit_code}",
            Quoted(service)
        ),
        FailureCause::SetupScriptFailed {
            service,
            exit_code,
            output,
        } => {
            let ended = match exit_code {
                Some(code) => format!("exited with code {code}"),
                None => "ran past its timeout".to_owned(),
            };
            format!(
                "setup script of {} {ended}; its container was removed; output: {output}",
                Quoted(service)
            )
        }
    }
}

/// A pull's progress as people read it: `12.3 MB of 40.1 MB, 2/5 layers`
/// (decimal megabytes; the total only once the runtime knows it).
pub(super) fn describe_progress(p: &PullProgress) -> String {
    let mb = |bytes: u64| format!("{}.{} MB", bytes / 1_000_000, bytes % 1_000_000 / 100_000);
    let mut text = mb(p.downloaded);
    if p.total > 0 {
        let _ = write!(text, " of {}", mb(p.total));
    }
    if p.layers > 0 {
        let _ = write!(text, ", {}/{} layers", p.layers_done, p.layers);
    }
    text
}

/// An image reference for a message: a pinned digest cut to its first 12
/// hex digits, so that the name and tag stay readable within the quote
/// bound (the typed cause carries the reference whole).
pub(super) fn short_image(image: &str) -> String {
    match image.split_once("@sha256:") {
        Some((name, hex)) if hex.len() > 12 => format!("{name}@sha256:{}…", &hex[..12]),
        _ => image.to_owned(),
    }
}
