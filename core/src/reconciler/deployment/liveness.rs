//! Liveness: what a device-wide list means for a deployment that has no
//! job running. Start what exited, recreate what vanished, never touch what
//! runs; every restart waits out its own backoff.

use super::*;

impl Deployment {
    /// Liveness, from a device-wide list: start what exited, recreate what
    /// vanished, never touch what runs. `fresh` is false when one of this
    /// deployment's own mutations completed after the list was taken.
    pub(in crate::reconciler) fn on_inventory(
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
        if self.verifies_only() {
            self.reverify(mine);
            return;
        }
        if self.runs_once() {
            self.run_liveness(now, config);
            return;
        }
        // No job of this deployment waits on an init container now, so any
        // left here belongs to an attempt that was walked away from (an
        // agent crash mid-init, then nothing valid to roll out): remove it.
        let mut steps: Vec<Step> = mine
            .iter()
            .filter(|c| c.label(LABEL_INIT).is_some())
            .map(|c| {
                Step::Call(Call::RemoveIfPresent {
                    container: c.id.clone(),
                })
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
                    let unprovisioned = o.unprovisioned && !bug!(config, trust_unprovisioned);
                    if !matches || bug!(config, recreate_on_tick) || unprovisioned {
                        // Someone else changed it, or it was never (fully)
                        // provisioned; only a rollout may replace it.
                        self.demote();
                        continue;
                    }
                    let probe = self.awaits_provisioning(config, &service.name, &o);
                    if let Some(script) = service.setup_script.as_deref().filter(|_| probe) {
                        // Not provisioned by this agent: it shows its marker
                        // before it counts as running.
                        steps.push(Step::Call(Call::ProbeProvisioned {
                            service: service.name.clone(),
                            id: o.id.clone(),
                            marker: super::setup::provisioned_marker(script),
                        }));
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
                        steps.push(Step::Call(Call::InspectExited {
                            service: service.name.clone(),
                            id: o.id.clone(),
                        }));
                        steps.push(Step::Call(Call::StartService {
                            service: service.name.clone(),
                            id: o.id.clone(),
                        }));
                    }
                }
                Some(_) => self.demote(),
                None => {
                    if self.is_applied() && self.restart_allowed(now, config, &service.name) {
                        let spec = service_container_spec(
                            self.name.as_str(),
                            &target.score,
                            service,
                            target.revision,
                        );
                        // The image may have gone since (a prune, a store
                        // wiped): the create needs it, and its digest.
                        steps.push(super::plan::ensure(&service.image, service.pull_policy()));
                        steps.push(Step::Call(Call::CreateService {
                            service: service.name.clone(),
                            spec,
                        }));
                    }
                }
            }
        }
        let cleanup_only = steps
            .iter()
            .all(|s| matches!(s, Step::Call(Call::RemoveIfPresent { .. })));
        if !steps.is_empty()
            && (self.is_applied() || bug!(config, revert_on_failure) || cleanup_only)
        {
            self.job = Some(Job::new(JobKind::Heal, steps));
        }
    }

    /// Counts a restart of `service` if its backoff allows one now.
    fn restart_allowed(&mut self, now: Timestamp, config: &Config, service: &ServiceName) -> bool {
        let r = self.restarts.entry(service.clone()).or_default();
        if now < r.next_at {
            return false;
        }
        r.count = r.count.saturating_add(1);
        r.next_at = now + config.restart_backoff.delay(r.streak);
        r.streak = r.streak.saturating_add(1);
        r.running_since = None;
        true
    }
}
