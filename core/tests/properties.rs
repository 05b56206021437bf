//! A state-machine property test of the reconciler alone: random lists of
//! the test kit's ops (desired states, runtime faults, crashes, images
//! going and coming back, restarts and time; the same ops the fuzzer
//! decodes), with the harness checking after every operation that
//! - no service ever has two containers,
//! - no running container whose spec did not change is stopped or removed,
//! - no container of an older spec is created or started once a newer
//!   valid revision was seen,
//! - nothing outside podfleet's labels (the base system's containers,
//!   which `no_launch` scores verify) is ever touched,
//! - no input panics.

use std::time::Duration;

use podfleet_core::reconciler::{Bugs, Config};
use podfleet_core::wire::DeviceId;
use podfleet_testkit::ops::{self, Player};
use podfleet_testkit::{base_system, images, Harness, Invariant};
use proptest::prelude::*;

fn world() -> Player {
    let config = Config::new(DeviceId::new("prop").expect("valid"), "prop")
        .tick_interval(Duration::from_secs(30));
    let mut h = Harness::new(config);
    images::install(&mut h.runtime);
    base_system::install(&mut h.runtime);
    Player::new(h)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn reconciler_keeps_its_invariants(ops in ops::ops(1..40)) {
        let mut player = world();
        for op in &ops {
            player.play(op);
            prop_assert!(player.h.violations.is_empty(), "after {op:?}: {:?}\n{}", player.h.violations, player.h.transcript);
        }
        // Heal every fault and let it settle: still no violation.
        player.h.faults.clear();
        player.h.run_for(Duration::from_secs(600));
        prop_assert!(player.h.violations.is_empty(), "{:?}\n{}", player.h.violations, player.h.transcript);
    }
}

/// The property checks must be able to fail: each deliberate bug is caught.
#[test]
fn property_checks_catch_injected_bugs() {
    let bug_config =
        |bugs| Config::new(DeviceId::new("prop").expect("valid"), "prop").inject_bugs(bugs);

    // The 30 s redeploy loop: a steady deployment, ticks going by.
    let mut h = Harness::new(bug_config(Bugs {
        recreate_on_tick: true,
        ..Bugs::default()
    }));
    h.put(
        "shop",
        1,
        r#"{"services":[{"name":"web","image":"img/a:1","env":{"A":"1"}}]}"#,
    );
    h.run_for(Duration::from_secs(61));
    assert!(
        h.violations
            .iter()
            .any(|v| v.invariant == Invariant::HealthyContainerRecreated),
        "{:?}\n{}",
        h.violations,
        h.transcript
    );

    // Revert: a newer revision fails, then the old container crashes.
    let mut h = Harness::new(bug_config(Bugs {
        revert_on_failure: true,
        ..Bugs::default()
    }));
    images::install(&mut h.runtime);
    h.put(
        "shop",
        1,
        r#"{"services":[{"name":"web","image":"img/a:1"}]}"#,
    );
    h.run_for(Duration::from_secs(1));
    h.put(
        "shop",
        2,
        r#"{"services":[{"name":"web","image":"img/a:2"}],"init_containers":[{"name":"m","image":"img/init-fail:1"}]}"#,
    );
    h.run_for(Duration::from_secs(3));
    let id = h
        .runtime
        .by_name("shop_web")
        .map(|c| c.id.clone())
        .expect("old web still there");
    let now = h.now;
    h.runtime.crash(now, &id, 1);
    h.run_for(Duration::from_secs(120));
    assert!(
        h.violations
            .iter()
            .any(|v| v.invariant == Invariant::NoRevert),
        "{:?}\n{}",
        h.violations,
        h.transcript
    );
}
