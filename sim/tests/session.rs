//! The production NATS session (`podfleet_core::session`) runs inside the
//! simulator's link, so a bug planted in it must show up as a violation,
//! as `sim::BITES` shows for the reconciler's.

use podfleet_core::session::Bugs;
use podfleet_testkit::{Invariant, Violation};
use sim::plan::Plan;
use sim::tiers::Switches;
use sim::Tier;

fn violations(seed: u64, bugs: Bugs) -> Vec<Violation> {
    let switches = Switches {
        session_bugs: bugs,
        ..Switches::default()
    };
    sim::run(Tier::Events, &Plan::generate(seed, 2), switches).violations
}

/// A snapshot that ends one entry early misses a deployment in its
/// `present` set, so the reconciler tears down a deployment that is still
/// desired (and the redelivered put at the same revision cannot bring it
/// back): the device never converges.
#[test]
fn a_snapshot_ending_one_entry_early_is_caught() {
    let bug = Bugs {
        snapshot_one_early: true,
    };
    let caught: Vec<u64> = (0..60)
        .filter(|&seed| {
            violations(seed, bug)
                .iter()
                .any(|v| v.invariant == Invariant::Liveness && v.detail.contains("not converged"))
        })
        .collect();
    assert!(
        !caught.is_empty(),
        "the simulator did not report session bug snapshot_one_early as a liveness violation (not converged) in 60 seeds"
    );
    for seed in caught {
        let clean = violations(seed, Bugs::default());
        assert!(
            clean.is_empty(),
            "seed {seed} fails without the bug too: {clean:?}"
        );
    }
}
