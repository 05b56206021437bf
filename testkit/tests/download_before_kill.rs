#![allow(clippy::unwrap_used)]
//! The reconciler against the fake's registry: a rollout pulls its images
//! before it stops anything, a pull that fails stops nothing, and the
//! oracle's "download before kill" check catches the deliberate bug that
//! pulls after the stop.

use std::time::Duration;

use podfleet_core::reconciler::{Bugs, Config};
use podfleet_core::runtime::RuntimeOp;
use podfleet_core::wire::{DeploymentName, DeviceId, FailureCause, Phase, PullFailure};
use podfleet_testkit::images::{A_1, A_2};
use podfleet_testkit::{images, Harness, Invariant};

const V1: &str = r#"{"services":[{"name":"web","image":"img/a:1"}]}"#;
const V2: &str = r#"{"services":[{"name":"web","image":"img/a:2"}]}"#;

/// A device running V1, whose store lacks V2's image: only its registry
/// has it.
fn running_v1(bugs: Bugs) -> Harness {
    let config = Config::new(DeviceId::new("dev-0").unwrap(), "test").inject_bugs(bugs);
    let mut h = Harness::new(config);
    h.runtime = images::runtime();
    h.runtime.remove_image(A_2);
    h.put("shop", 1, V1);
    h.run_for(Duration::from_secs(30));
    assert_eq!(phase(&h), Some((Phase::Running, 1)));
    h
}

fn phase(h: &Harness) -> Option<(Phase, u64)> {
    let state = h.states.get(&DeploymentName::new("shop").unwrap())?;
    Some((state.phase, state.revision.get()))
}

fn first(h: &Harness, what: impl Fn(&RuntimeOp) -> bool) -> Option<usize> {
    h.ops.iter().position(|(_, op)| what(op))
}

#[test]
fn a_rollout_pulls_its_image_before_it_stops_the_old_container() {
    let mut h = running_v1(Bugs::default());
    h.put("shop", 2, V2);
    h.run_for(Duration::from_secs(60));
    assert!(h.violations.is_empty(), "{:?}", h.violations);
    assert_eq!(phase(&h), Some((Phase::Running, 2)), "{}", h.transcript);
    let pull = first(
        &h,
        |op| matches!(op, RuntimeOp::Pull { image } if image == A_2),
    );
    let stop = first(&h, |op| matches!(op, RuntimeOp::Stop { .. }));
    assert!(pull.is_some() && pull < stop, "{}", h.transcript);
    assert!(h.runtime.image(A_2).is_some_and(|i| i.digest.is_some()));
}

#[test]
fn a_pull_that_fails_stops_nothing() {
    let mut h = running_v1(Bugs::default());
    h.runtime.registry_mut().set_up(false);
    h.put("shop", 2, V2);
    h.run_for(Duration::from_secs(5));
    assert!(h.violations.is_empty(), "{:?}", h.violations);
    let state = h.states.get(&DeploymentName::new("shop").unwrap()).unwrap();
    assert_eq!(state.phase, Phase::Failed, "{}", h.transcript);
    assert!(
        matches!(
            &state.cause,
            Some(FailureCause::ImagePull { image, reason: PullFailure::Network, .. }) if image == A_2
        ),
        "{:?}",
        state.cause
    );
    assert_eq!(first(&h, |op| matches!(op, RuntimeOp::Stop { .. })), None);
    let web = h.runtime.by_name("shop_web").unwrap();
    assert!(h.runtime.is_running(&web.id) && web.spec.image == A_1);
    // Once the registry is back, the retry rolls out.
    h.runtime.registry_mut().set_up(true);
    h.run_for(Duration::from_secs(120));
    assert_eq!(phase(&h), Some((Phase::Running, 2)), "{}", h.transcript);
    assert!(h.violations.is_empty(), "{:?}", h.violations);
}

#[test]
fn pulling_after_the_stop_is_caught() {
    let bugs = Bugs {
        pull_after_stop: true,
        ..Bugs::default()
    };
    let mut h = running_v1(bugs);
    h.put("shop", 2, V2);
    h.run_for(Duration::from_secs(60));
    assert!(
        h.violations
            .iter()
            .any(|v| v.invariant == Invariant::DownloadBeforeKill),
        "{:?}\n{}",
        h.violations,
        h.transcript
    );
}
