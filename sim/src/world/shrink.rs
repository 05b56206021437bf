//! Shrinking: a failing plan reduced to a smaller one that fails with the
//! same invariant.

use super::*;

/// How long a lasting fault lasts, in ms, to shorten while shrinking.
fn fault_duration(action: &mut Action) -> Option<&mut u64> {
    match action {
        Action::Partition { for_ms, .. }
        | Action::Hold { for_ms, .. }
        | Action::ImageMissing { for_ms, .. }
        | Action::SlowRuntime { for_ms, .. }
        | Action::RegistryDown { for_ms, .. }
        | Action::RegistrySlow { for_ms, .. }
        | Action::CredentialsRefused { for_ms, .. }
        | Action::DiskFull { for_ms, .. } => Some(for_ms),
        Action::AgentCrash { down_ms, .. } => Some(down_ms),
        _ => None,
    }
}

/// Reduces a failing plan to a smaller one that fails with the same
/// invariant: drops chunks of steps, halving the chunk size, halves the
/// faults' durations, then heals as early as it can. `run` runs a plan. At most `budget` runs.
pub fn shrink(plan: &Plan, mut run: impl FnMut(&Plan) -> Outcome, budget: u32) -> (Plan, Outcome) {
    let first = run(plan);
    let Some(target) = first.violations.first().map(|v| v.invariant) else {
        return (plan.clone(), first);
    };
    let fails = |o: &Outcome| o.violations.iter().any(|v| v.invariant == target);
    let mut best = (plan.clone(), first);
    let mut runs = 1;
    let mut chunk = best.0.steps.len().div_ceil(2).max(1);
    while chunk >= 1 && runs < budget {
        let mut start = 0;
        let mut progressed = false;
        while start < best.0.steps.len() && runs < budget {
            let mut candidate = best.0.clone();
            let end = (start + chunk).min(candidate.steps.len());
            candidate.steps.drain(start..end);
            let outcome = run(&candidate);
            runs += 1;
            if fails(&outcome) {
                best = (candidate, outcome);
                progressed = true;
            } else {
                start += chunk;
            }
        }
        if !progressed {
            if chunk == 1 {
                break;
            }
            chunk = chunk.div_ceil(2);
        }
    }
    // Shorter faults: halve each fault's duration while it still fails.
    for i in 0..best.0.steps.len() {
        loop {
            if runs >= budget {
                break;
            }
            let mut candidate = best.0.clone();
            let Some(duration) = candidate
                .steps
                .get_mut(i)
                .and_then(|s| fault_duration(&mut s.action))
            else {
                break;
            };
            if *duration < 2_000 {
                break;
            }
            *duration /= 2;
            let outcome = run(&candidate);
            runs += 1;
            if fails(&outcome) {
                best = (candidate, outcome);
            } else {
                break;
            }
        }
    }
    // Heal as early as the last step allows.
    let last = best.0.steps.last().map_or(0, |s| s.at_ms);
    if runs < budget && best.0.heal_at_ms > last + 5_000 {
        let mut candidate = best.0.clone();
        candidate.heal_at_ms = last + 5_000;
        let outcome = run(&candidate);
        if fails(&outcome) {
            best = (candidate, outcome);
        }
    }
    best
}
