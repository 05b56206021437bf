//! `podfleet rollout status NAME`: a progress line per status change, and
//! when to stop; `podfleet rollout force NAME` and `podfleet rollout
//! restart NAME`: what they write.
//!
//! The rollout is complete when the controller has observed the stored
//! manifest's generation (or a newer one) and every targeted device runs
//! it ([`FleetDeploymentStatus::is_complete`]): exit 0. It has failed when
//! a device failed on that generation, the manifest was refused, or the
//! controller refuses to write an all-or-nothing deployment whose devices
//! do not agree: exit 1. The shell exits 2 when `--timeout` runs out first.
//!
//! `rollout force` sets the stored manifest's `spec.force` to the spec's
//! fingerprint ([`force`]): the controller then writes that spec to every
//! targeted device, whatever they run, until the spec changes.
//!
//! `rollout restart` raises the stored score's `restart` count by one
//! ([`restart`]): a new generation whose every service container differs
//! from the running one, rolled out by the deployment's strategy like any
//! other change (a `per_run` deployment runs again).

use std::fmt::Write as _;

use podfleet_core::fleet::{FleetDeployment, FleetDeploymentStatus, Placement};
use podfleet_core::wire::{DeploymentName, Lifetime};

use crate::cli::Failure;

/// The progress bar's width in characters.
const BAR: u32 = 10;

/// Where a rollout stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not done: what it waits for, in words.
    Waiting(String),
    /// Every targeted device runs the generation.
    Complete(String),
    /// A device failed, or the manifest was refused: why, naming devices.
    Failed(String),
}

/// The progress line for `status`, and the verdict, for the stored
/// manifest's `generation`.
pub fn progress(
    name: &DeploymentName,
    generation: u64,
    status: Option<&FleetDeploymentStatus>,
) -> (String, Verdict) {
    let Some(status) = status else {
        return (
            format!(
                "[{}] waiting for the controller's first status",
                ".".repeat(BAR as usize)
            ),
            Verdict::Waiting(format!(
                "the controller to report a status for {name} (is `podfleet controller` running?)"
            )),
        );
    };
    let p = status.phases;
    let filled = match status.targeted {
        0 => BAR,
        targeted => p.running.min(targeted) * BAR / targeted,
    };
    let mut line = format!(
        "[{}{}] {}/{} running, {} pending, {} failed",
        "#".repeat(filled as usize),
        ".".repeat((BAR - filled) as usize),
        p.running,
        status.targeted,
        p.pending,
        p.failed
    );
    if status.offline > 0 {
        let _ = write!(line, ", {} offline", status.offline);
    }
    if status.observed_generation < generation {
        let _ = write!(
            line,
            " (generation {} of {generation})",
            status.observed_generation
        );
    }
    if let Some(refusal) = &status.placement {
        let _ = write!(line, ", refused: {}", refusal.reason.as_str());
    }
    if let Some(outdated) = &status.outdated_agents {
        let _ = write!(line, ", {} outdated agent(s)", outdated.devices.count);
    }
    let verdict = if let Some(error) = &status.error {
        Verdict::Failed(format!("rollout of {name} cannot proceed: {error}"))
    } else if status.observed_generation < generation {
        Verdict::Waiting(format!(
            "the controller to take up generation {generation} of {name} (it is on {})",
            status.observed_generation
        ))
    } else if let Some(refusal) = &status.placement {
        Verdict::Failed(format!(
            "rollout of {name} is refused ({}): {}\n  to write generation {} to every targeted device anyway: podfleet rollout force {name}",
            refusal.reason.as_str(),
            refusal.message(),
            status.observed_generation
        ))
    } else if let Some(outdated) = &status.outdated_agents {
        Verdict::Failed(format!(
            "rollout of {name} cannot reach every device: {}",
            outdated.message()
        ))
    } else if p.failed > 0 {
        let mut why = format!(
            "rollout of {name} failed: {} of {} device(s) failed on generation {}",
            p.failed, status.targeted, status.observed_generation
        );
        for group in &status.failures {
            let mut devices: Vec<&str> = group.devices.iter().map(|d| d.as_str()).collect();
            let listed = devices.len();
            let more = (group.count as usize).saturating_sub(listed);
            let more = (more > 0).then(|| format!(" and {more} more"));
            devices.sort_unstable();
            let _ = write!(
                why,
                "\n  {}{}: {}",
                devices.join(", "),
                more.unwrap_or_default(),
                group.message
            );
        }
        Verdict::Failed(why)
    } else if status.is_complete() {
        Verdict::Complete(format!(
            "rollout of {name} complete: {}/{} device(s) run generation {}",
            p.running, status.targeted, status.observed_generation
        ))
    } else {
        Verdict::Waiting(format!(
            "{} more of {} device(s) to run generation {} of {name} ({} pending{})",
            status.targeted - p.running.min(status.targeted),
            status.targeted,
            status.observed_generation,
            p.pending,
            if status.offline > 0 {
                format!(", {} offline", status.offline)
            } else {
                String::new()
            }
        ))
    };
    (line, verdict)
}

/// What `rollout force` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Force {
    /// Store this manifest, made against the stored generation.
    Write(Box<FleetDeployment>),
    /// The stored spec is forced already: nothing to write.
    AlreadyForced,
}

/// What `rollout force NAME` does with the stored manifest and its
/// generation.
///
/// # Errors
/// [`Failure`] when there is no such deployment, or its placement is not
/// `AllOrNothing` (nothing is ever refused there, so nothing to force).
pub fn force(
    name: &DeploymentName,
    stored: Option<&(u64, FleetDeployment)>,
) -> Result<Force, Failure> {
    let Some((_, manifest)) = stored else {
        return Err(Failure::failed(format!(
            "fleetdeployment \"{name}\" not found"
        )));
    };
    if manifest.spec.placement != Placement::AllOrNothing {
        return Err(Failure::failed(format!(
            "fleetdeployment/{name} has placement {}: each device takes it on its own and \
             nothing is refused, so there is nothing to force (force is for placement AllOrNothing)",
            manifest.spec.placement
        )));
    }
    if manifest.spec.is_forced() {
        return Ok(Force::AlreadyForced);
    }
    let mut forced = manifest.clone();
    forced.spec = forced.spec.forced();
    Ok(Force::Write(Box::new(forced)))
}

/// The manifest `rollout restart NAME` stores: the stored one with its
/// score's restart count raised by one.
///
/// # Errors
/// [`Failure`] when there is no such deployment, or its lifetime is
/// `no_launch` (podfleet starts nothing there, so there is nothing to
/// restart).
pub fn restart(
    name: &DeploymentName,
    stored: Option<&(u64, FleetDeployment)>,
) -> Result<FleetDeployment, Failure> {
    let Some((_, manifest)) = stored else {
        return Err(Failure::failed(format!(
            "fleetdeployment \"{name}\" not found"
        )));
    };
    let score = &manifest.spec.score;
    if score.lifetime() == Lifetime::NoLaunch {
        return Err(Failure::failed(format!(
            "fleetdeployment/{name} has lifetime no_launch: podfleet never starts its containers, \
             so it cannot restart them (restart them where they are managed)"
        )));
    }
    let mut restarted = manifest.clone();
    restarted.spec.score.restart = Some(score.restart().saturating_add(1));
    Ok(restarted)
}

/// The line `rollout restart` prints: what the new generation does.
pub fn restarted_line(restarted: &FleetDeployment, generation: u64) -> String {
    let name = &restarted.metadata.name;
    let what = match restarted.spec.score.lifetime() {
        Lifetime::PerRun => "runs it again on every targeted device",
        _ => "recreates every service container on every targeted device",
    };
    format!(
        "fleetdeployment/{name} restarted: generation {generation} {what}, as its strategy rolls out\n  \
         follow it: podfleet rollout status {name}\n"
    )
}

/// The line `rollout force` prints: what was written, or that nothing was.
pub fn forced_line(name: &DeploymentName, outcome: &Force, generation: u64) -> String {
    match outcome {
        Force::Write(_) => format!(
            "fleetdeployment/{name} forced: generation {generation} is written to every targeted device, whatever they run\n"
        ),
        Force::AlreadyForced => format!(
            "fleetdeployment/{name} already forced: generation {generation} is written to every targeted device\n"
        ),
    }
}

/// Follows one rollout: prints a line only when it changes.
#[derive(Debug, Clone)]
pub struct RolloutWatch {
    name: DeploymentName,
    generation: u64,
    last_line: Option<String>,
    waiting: String,
}

impl RolloutWatch {
    /// Follows `name` until it runs `generation`.
    pub fn new(name: DeploymentName, generation: u64) -> Self {
        Self {
            waiting: format!("the controller to report a status for {name}"),
            name,
            generation,
            last_line: None,
        }
    }

    /// Takes the next status: the line to print if it changed, and the
    /// verdict.
    pub fn step(&mut self, status: Option<&FleetDeploymentStatus>) -> (Option<String>, Verdict) {
        let (line, verdict) = progress(&self.name, self.generation, status);
        if let Verdict::Waiting(what) = &verdict {
            self.waiting.clone_from(what);
        }
        let changed = self.last_line.as_deref() != Some(line.as_str());
        self.last_line = Some(line.clone());
        (changed.then_some(line), verdict)
    }

    /// The message when the timeout runs out: what it still waited for.
    pub fn timed_out(&self, after: &str) -> String {
        format!("timed out after {after} waiting for {}", self.waiting)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use podfleet_core::fleet::{
        DeviceGroup, FailureGroup, PhaseCounts, PlacementReason, PlacementRefusal,
    };
    use podfleet_core::wire::DeviceId;

    use super::*;

    fn status(generation: u64, running: u32, pending: u32, failed: u32) -> FleetDeploymentStatus {
        FleetDeploymentStatus {
            observed_generation: generation,
            error: None,
            targeted: 5,
            updated: running + failed,
            phases: PhaseCounts {
                pending,
                running,
                failed,
                succeeded: 0,
            },
            offline: u32::from(pending > 1),
            failures: Vec::new(),
            skew: Vec::new(),
            placement: None,
            outdated_agents: None,
        }
    }

    fn ids(names: &[&str]) -> Vec<DeviceId> {
        names.iter().map(|n| DeviceId::new(*n).unwrap()).collect()
    }

    fn transcript(statuses: &[Option<FleetDeploymentStatus>]) -> String {
        let mut watch = RolloutWatch::new(DeploymentName::new("web").unwrap(), 7);
        let mut out = String::new();
        for status in statuses {
            let (line, verdict) = watch.step(status.as_ref());
            if let Some(line) = line {
                out.push_str(&line);
                out.push('\n');
            }
            match verdict {
                Verdict::Waiting(_) => {}
                Verdict::Complete(why) | Verdict::Failed(why) => {
                    out.push_str(&why);
                    out.push('\n');
                    return out;
                }
            }
        }
        out.push_str(&watch.timed_out("5m"));
        out.push('\n');
        out
    }

    #[test]
    fn rollout_progress_lines() {
        let complete = transcript(&[
            None,
            Some(status(6, 5, 0, 0)),
            Some(status(7, 0, 5, 0)),
            Some(status(7, 0, 5, 0)),
            Some(status(7, 3, 2, 0)),
            Some(status(7, 5, 0, 0)),
        ]);
        let mut failing = status(7, 3, 1, 1);
        failing.failures = vec![FailureGroup {
            reason: "init_container_exited".into(),
            message: "init container \"migrate\" exited with code 5".into(),
            count: 12,
            devices: vec![DeviceId::new("rpi-02").unwrap()],
        }];
        let failed = transcript(&[Some(status(7, 3, 2, 0)), Some(failing)]);
        let mut refused = status(6, 5, 0, 0);
        refused.error =
            Some("generation 7 was refused: spec.target: unknown variant `nodes`".into());
        let refused = transcript(&[Some(refused)]);
        let stuck = transcript(&[Some(status(7, 3, 2, 0))]);
        let mut held = status(7, 3, 2, 0);
        held.placement = Some(PlacementRefusal {
            reason: PlacementReason::PartialPlacement,
            running: DeviceGroup::of(&ids(&["rpi-01", "rpi-02", "rpi-03"])),
            not_running: DeviceGroup::of(&ids(&["rpi-04", "rpi-05"])),
            unknown: DeviceGroup::default(),
        });
        let held = transcript(&[Some(status(7, 3, 2, 0)), Some(held)]);
        let mut old = status(7, 3, 2, 0);
        old.outdated_agents = Some(podfleet_core::fleet::OutdatedAgents {
            features: vec!["lifetime".into()],
            devices: DeviceGroup::of(&ids(&["rpi-04", "rpi-05"])),
        });
        let outdated = transcript(&[Some(status(7, 3, 2, 0)), Some(old)]);
        insta::assert_snapshot!(format!(
            "{complete}\n{failed}\n{refused}\n{stuck}\n{held}\n{outdated}"
        ));
    }

    #[test]
    fn force_writes_the_fingerprint_of_an_all_or_nothing_spec_once() {
        let web = DeploymentName::new("web").unwrap();
        let manifest = |placement: Placement| {
            let mut manifest = crate::cli::fixtures::manifest(
                "web",
                serde_json::json!({"devices": ["rpi-01"]}),
                "localhost/web:1",
            );
            manifest.spec.placement = placement;
            manifest
        };
        let missing = force(&web, None).unwrap_err();
        assert_eq!(missing.message, "fleetdeployment \"web\" not found");
        let independent = force(&web, Some(&(3, manifest(Placement::Independent)))).unwrap_err();
        assert!(
            independent.message.contains("placement Independent"),
            "{independent}"
        );
        let stored = (3, manifest(Placement::AllOrNothing));
        let outcome = force(&web, Some(&stored)).unwrap();
        let Force::Write(forced) = &outcome else {
            panic!("nothing to write: {outcome:?}");
        };
        assert!(forced.spec.is_forced());
        assert_eq!(forced.spec.score, stored.1.spec.score);
        assert_eq!(
            forced_line(&web, &outcome, 4),
            "fleetdeployment/web forced: generation 4 is written to every targeted device, whatever they run\n"
        );
        // Forcing it again writes nothing.
        let again = force(&web, Some(&(4, (**forced).clone()))).unwrap();
        assert_eq!(again, Force::AlreadyForced);
        assert!(forced_line(&web, &again, 4).contains("already forced"));
        // A changed spec carries a stale token: forcing it writes anew.
        let mut changed = (**forced).clone();
        changed.spec.score.services[0].image = "localhost/web:2".into();
        assert!(matches!(
            force(&web, Some(&(5, changed))).unwrap(),
            Force::Write(_)
        ));
    }

    #[test]
    fn restart_raises_the_restart_count_and_refuses_no_launch() {
        let web = DeploymentName::new("web").unwrap();
        let manifest = crate::cli::fixtures::manifest(
            "web",
            serde_json::json!({"devices": ["rpi-01"]}),
            "localhost/web:1",
        );
        let missing = restart(&web, None).unwrap_err();
        assert_eq!(missing.message, "fleetdeployment \"web\" not found");
        let once = restart(&web, Some(&(3, manifest.clone()))).unwrap();
        assert_eq!(once.spec.score.restart, Some(1));
        let twice = restart(&web, Some(&(4, once.clone()))).unwrap();
        assert_eq!(twice.spec.score.restart, Some(2));
        // Nothing else changes, and the restarted score is still valid.
        let mut back = twice.clone();
        back.spec.score.restart = None;
        assert_eq!(back, manifest);
        twice.spec.score.validate().unwrap();
        assert_eq!(
            restarted_line(&once, 4),
            "fleetdeployment/web restarted: generation 4 recreates every service container on every targeted device, as its strategy rolls out\n  follow it: podfleet rollout status web\n"
        );
        let mut job = manifest.clone();
        job.spec.score.lifetime = Some(Lifetime::PerRun);
        let job = restart(&web, Some(&(3, job))).unwrap();
        assert!(restarted_line(&job, 4).contains("runs it again on every targeted device"));
        let mut verified = manifest;
        verified.spec.score.lifetime = Some(Lifetime::NoLaunch);
        let refused = restart(&web, Some(&(3, verified))).unwrap_err();
        assert!(refused.message.contains("lifetime no_launch"), "{refused}");
    }

    #[test]
    fn nothing_targeted_is_complete() {
        let mut empty = status(7, 0, 0, 0);
        empty.targeted = 0;
        let (line, verdict) = progress(&DeploymentName::new("web").unwrap(), 7, Some(&empty));
        assert!(line.starts_with("[##########] 0/0 running"), "{line}");
        assert!(matches!(verdict, Verdict::Complete(_)));
    }
}
