//! The production fleet controller (`podfleet_core::fleet`) runs as the
//! simulator's controller host, so a bug planted in it must show up as a
//! fleet convergence violation, and a clean run of the same seeds shows
//! none.

use podfleet_core::fleet::controller::Bugs;
use podfleet_testkit::{Invariant, Violation};
use sim::plan::{Action, Plan};
use sim::tiers::Switches;
use sim::Tier;

fn violations(seed: u64, bugs: Bugs) -> Vec<Violation> {
    let switches = Switches {
        fleet_bugs: bugs,
        ..Switches::default()
    };
    sim::run(Tier::Events, &Plan::generate(seed, 4), switches).violations
}

/// A controller that never takes a deployment away from a device that stops
/// matching leaves keys outside the target after a relabel or a retarget.
#[test]
fn a_controller_keeping_untargeted_devices_is_caught() {
    let bug = Bugs {
        keep_untargeted: true,
    };
    let caught: Vec<u64> = (0..40)
        .filter(|&seed| {
            violations(seed, bug)
                .iter()
                .any(|v| v.invariant == Invariant::FleetConvergence)
        })
        .collect();
    assert!(
        caught.len() >= 3,
        "fleet bug keep_untargeted was caught as a fleet convergence violation on seeds {caught:?} of 0..40, expected at least 3"
    );
    for seed in caught {
        let clean = violations(seed, Bugs::default());
        assert!(clean.is_empty(), "seed {seed} without the bug: {clean:?}");
    }
}

/// Generated plans give every device labels and exercise every fleet
/// action, without disturbing the rest of a seed's plan.
#[test]
fn generated_plans_label_every_device_and_drive_the_fleet() {
    let plans: Vec<Plan> = (0..50).map(|seed| Plan::generate(seed, 4)).collect();
    let count = |f: fn(&Action) -> bool| -> usize {
        plans
            .iter()
            .flat_map(|p| &p.steps)
            .filter(|s| f(&s.action))
            .count()
    };
    assert!(count(|a| matches!(a, Action::Apply { .. })) > 50);
    assert!(count(|a| matches!(a, Action::Unapply { .. })) > 10);
    assert!(count(|a| matches!(a, Action::ControllerRestart { .. })) > 5);
    for plan in &plans {
        let labelled = plan
            .steps
            .iter()
            .filter(|s| s.at_ms == 1_000 && matches!(s.action, Action::Label { .. }))
            .count();
        assert_eq!(labelled, 4, "seed {}", plan.seed);
    }
}
