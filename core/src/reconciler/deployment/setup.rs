//! `setup_script`: provisioning a freshly created container.
//!
//! After a service's fresh container starts, its script is copied into it
//! as a file ([`SETUP_SCRIPT_PATH`]) and run by `/bin/sh -e -o pipefail`
//! with stdin from `/dev/null` (never fed on stdin, where a command that
//! reads stdin would swallow the rest of the script). Only when it exits 0
//! is a marker holding the script's hash written beside it
//! ([`PROVISIONED_PATH`]), and only then does the service count as running.
//! A script that fails, or runs past [`Config::setup_timeout`], gets its
//! container removed and fails the revision with the exit code and the end
//! of its output; the retry creates a fresh container.
//!
//! podman cannot change a container's labels once it exists, so the
//! evidence of a finished provisioning is the marker inside the container:
//! it lives exactly as long as the container's writable layer. A container
//! the agent did not provision itself (found after an agent restart) is
//! asked for its marker before it counts as running; one without the
//! marker, or with another script's, was never (fully) provisioned and is
//! recreated, never adopted as it is. A container is never provisioned
//! twice.

use super::*;
use crate::reconciler::fnv1a64;
use crate::runtime::EXEC_OUTPUT_MAX_BYTES;

/// Where a setup script is put in its container.
pub const SETUP_SCRIPT_PATH: &str = "/.podfleet/setup.sh";
/// Where the marker of a finished provisioning is put in its container.
pub const PROVISIONED_PATH: &str = "/.podfleet/provisioned";

/// What the marker of a container provisioned with `script` holds: the
/// script's hash, as one line.
pub fn provisioned_marker(script: &str) -> String {
    format!("{:016x}\n", fnv1a64(script.as_bytes()))
}

impl Deployment {
    /// The setup script of `service` in the target, if it has one.
    pub(super) fn setup_script(&self, service: &str) -> Option<&str> {
        self.target
            .as_ref()?
            .score
            .services
            .iter()
            .find(|s| s.name == service)?
            .setup_script
            .as_deref()
    }

    /// A service's fresh container just started: provision it first, if
    /// its service has a script.
    pub(super) fn after_fresh_start(&mut self, service: &ServiceName, id: &str) {
        let Some(script) = self.setup_script(service).map(str::to_owned) else {
            return;
        };
        self.push_front(Call::CopyScript {
            service: service.clone(),
            id: id.to_owned(),
            script,
        });
    }

    /// The script is in the container (or not): run it.
    pub(super) fn on_script_copied(
        &mut self,
        now: Timestamp,
        config: &Config,
        service: ServiceName,
        id: String,
        result: RuntimeResult,
    ) {
        match result {
            Ok(_) => self.push_front(Call::RunScript {
                service,
                id,
                deadline: now + config.setup_timeout,
            }),
            Err(e) => self.fail_provisioning(
                service,
                id,
                None,
                format!(
                    "copying the script into the container failed: {}",
                    e.message
                ),
            ),
        }
    }

    /// The marker could not be written: the container was not provisioned
    /// as far as anyone could tell later, so it goes.
    pub(super) fn on_mark_failed(&mut self, service: ServiceName, id: String, error: &str) {
        self.fail_provisioning(
            service,
            id,
            None,
            format!("the script exited 0, but writing its marker failed: {error}"),
        );
    }

    /// The script ran: mark the container provisioned, or remove it and
    /// fail the revision.
    pub(super) fn on_script_ran(
        &mut self,
        service: ServiceName,
        id: String,
        result: RuntimeResult,
    ) {
        let (exit_code, output) = match result {
            Ok(RuntimeReply::Executed { exit_code: 0, .. }) => {
                let marker = self.setup_script(&service).map(provisioned_marker);
                self.push_front(Call::MarkProvisioned {
                    service,
                    id,
                    marker: marker.unwrap_or_default(),
                });
                return;
            }
            Ok(RuntimeReply::Executed { exit_code, output }) => (Some(exit_code), output),
            Ok(reply) => (None, format!("exec answered {reply:?}")),
            Err(e) => (None, format!("exec failed: {}", e.message)),
        };
        self.fail_provisioning(service, id, exit_code, output);
    }

    /// The script ran past its timeout.
    pub(super) fn on_setup_deadline(&mut self, config: &Config, service: ServiceName, id: String) {
        if let Some(job) = self.job.as_mut() {
            // The exec's answer, whenever it comes, no longer matches.
            job.in_flight = None;
        }
        let output = format!(
            "no exit after {} s (the agent's setup timeout)",
            config.setup_timeout.as_secs()
        );
        self.fail_provisioning(service, id, None, output);
    }

    fn fail_provisioning(
        &mut self,
        service: ServiceName,
        id: String,
        exit_code: Option<i64>,
        output: String,
    ) {
        let cause = FailureCause::SetupScriptFailed {
            service: service.clone(),
            exit_code,
            output: crate::wire::text::bounded_tail(&output, EXEC_OUTPUT_MAX_BYTES),
        };
        // Its service's process runs: stopped as any replaced container is.
        let lifecycle = self
            .target
            .as_ref()
            .map(|t| t.score.lifecycle_or_default())
            .unwrap_or_default();
        let mut steps = vec![
            Step::Call(Call::Stop {
                service: service.clone(),
                id: id.clone(),
                signal: lifecycle.stop_signal,
                grace: lifecycle.grace_period(),
            }),
            Step::Call(Call::RemoveService { service, id }),
        ];
        if self.job.as_ref().is_some_and(|j| j.kind == JobKind::Heal) {
            // A container recreated by liveness: a rollout, with its
            // failure reports and backoff, takes it from here.
            self.demote();
        } else {
            steps.push(Step::Fail(cause));
        }
        self.replace_steps(steps);
    }

    /// The marker is written: the container counts as running.
    pub(super) fn on_marked(&mut self, service: &ServiceName, id: &str) {
        if let Some(o) = self.observed.get_mut(service).filter(|o| o.id == id) {
            o.provisioned = true;
            o.unprovisioned = false;
        }
    }

    /// The answer to asking an adopted container for its marker: it was
    /// provisioned with this script, or it is to be recreated.
    pub(super) fn on_probed(
        &mut self,
        service: &ServiceName,
        id: &str,
        marker: &str,
        result: RuntimeResult,
    ) {
        match result {
            Ok(RuntimeReply::Executed {
                exit_code: 0,
                output,
            }) if output.trim() == marker.trim() => {
                self.on_marked(service, id);
            }
            // No marker, or another script's: never (fully) provisioned.
            Ok(RuntimeReply::Executed { .. }) => {
                if let Some(o) = self.observed.get_mut(service).filter(|o| o.id == id) {
                    o.unprovisioned = true;
                }
                self.demote();
            }
            // Not known: asked again on the next tick.
            _ => {}
        }
    }

    /// Whether `o`, a container of `service`, still has to show it was
    /// provisioned before it counts as running.
    pub(super) fn awaits_provisioning(&self, config: &Config, service: &str, o: &Observed) -> bool {
        self.setup_script(service).is_some() && !o.provisioned && !bug!(config, trust_unprovisioned)
    }
}
