//! `podfleet rollout status NAME`: a progress line per status change, and
//! when to stop.
//!
//! The rollout is complete when the controller has observed the stored
//! manifest's generation (or a newer one) and every targeted device runs
//! it ([`FleetDeploymentStatus::is_complete`]): exit 0. It has failed when
//! a device failed on that generation, or the manifest was refused: exit
//! 1. The shell exits 2 when `--timeout` runs out first.

use std::fmt::Write as _;

use podfleet_core::fleet::FleetDeploymentStatus;
use podfleet_core::wire::DeploymentName;

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
    let verdict = if let Some(error) = &status.error {
        Verdict::Failed(format!("rollout of {name} cannot proceed: {error}"))
    } else if status.observed_generation < generation {
        Verdict::Waiting(format!(
            "the controller to take up generation {generation} of {name} (it is on {})",
            status.observed_generation
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

    use podfleet_core::fleet::{FailureGroup, PhaseCounts};
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
        }
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
        insta::assert_snapshot!(format!("{complete}\n{failed}\n{refused}\n{stuck}"));
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
