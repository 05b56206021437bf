#![allow(clippy::unwrap_used)]
//! `no_launch`: podfleet verifies containers someone else runs and touches
//! nothing. Each scenario checks what is reported and that no mutation was
//! ever asked for (the oracle also checks every operation: only own
//! containers).

use std::collections::BTreeMap;
use std::time::Duration;

use podfleet_core::reconciler::{Bugs, Config};
use podfleet_core::runtime::{ContainerSpec, RuntimeErrorKind, RuntimeOp};
use podfleet_core::wire::{
    DeploymentName, DeploymentState, DeviceId, FailureCause, Phase, Signal, VerifiedStatus,
};
use podfleet_testkit::harness::OpFault;
use podfleet_testkit::images::{self, A_1, A_2};
use podfleet_testkit::{Harness, ImageStore, Invariant};

fn device() -> Harness {
    let mut h = Harness::new(Config::new(DeviceId::new("dev-0").unwrap(), "test"));
    h.runtime = images::runtime();
    h.run_for(Duration::from_secs(1));
    h
}

/// A container the device's base system runs, without podfleet's labels.
fn external(h: &mut Harness, name: &str, image: &str, start: bool) -> String {
    let id = h.runtime.create_quietly(ContainerSpec {
        name: name.into(),
        image: image.into(),
        args: Vec::new(),
        env: BTreeMap::new(),
        volumes: Vec::new(),
        ports: Vec::new(),
        labels: BTreeMap::from([("com.example.owner".into(), "base-system".into())]),
        stop_signal: Signal::Term,
    });
    if start {
        let _ = h.runtime.execute(&RuntimeOp::Start {
            container: id.clone(),
        });
    }
    id
}

fn score(image: &str) -> String {
    format!(
        r#"{{"lifetime":"no_launch","services":[{{"name":"proxy","image":"{image}","container":"base_proxy"}}]}}"#
    )
}

fn state(h: &Harness) -> &DeploymentState {
    &h.states[&DeploymentName::new("edge").unwrap()]
}

/// Nothing but looking: no operation that changes a container or the store.
fn assert_touched_nothing(h: &Harness) {
    let changes: Vec<&RuntimeOp> = h
        .ops
        .iter()
        .map(|(_, op)| op)
        .filter(|op| op.is_mutation() || matches!(op, RuntimeOp::Pull { .. }))
        .collect();
    assert!(changes.is_empty(), "{changes:?}\n{}", h.transcript);
    assert!(h.violations.is_empty(), "{:?}", h.violations);
}

fn unverified(h: &Harness) -> (VerifiedStatus, String) {
    match &state(h).cause {
        Some(FailureCause::Unverified {
            status, evidence, ..
        }) => (*status, evidence.clone()),
        other => panic!(
            "expected an unverified cause, got {other:?}\n{}",
            h.transcript
        ),
    }
}

#[test]
fn a_running_container_on_the_expected_image_is_reported_running_and_left_alone() {
    let mut h = device();
    let id = external(&mut h, "base_proxy", A_1, true);
    h.put("edge", 1, &score(A_1));
    h.run_for(Duration::from_secs(60));
    let s = state(&h);
    assert_eq!(s.phase, Phase::Running, "{}", h.transcript);
    assert_eq!(s.container_ids["proxy"], id);
    assert_eq!(s.verified["proxy"].status, VerifiedStatus::Running);
    assert_eq!(s.verified["proxy"].container, "base_proxy");
    // Verified again on every liveness tick, still touching nothing.
    let inspects = h
        .ops
        .iter()
        .filter(
            |(_, op)| matches!(op, RuntimeOp::Inspect { container } if container == "base_proxy"),
        )
        .count();
    assert!(inspects >= 3, "{}", h.transcript);
    assert_touched_nothing(&h);
}

#[test]
fn missing_stopped_and_drifted_containers_are_reported_with_their_evidence() {
    // Missing: nothing is created in its place.
    let mut h = device();
    h.put("edge", 1, &score(A_1));
    h.run_for(Duration::from_secs(30));
    assert_eq!(state(&h).phase, Phase::Failed);
    let (status, evidence) = unverified(&h);
    assert_eq!(status, VerifiedStatus::Missing);
    assert!(evidence.contains("base_proxy"), "{evidence}");
    assert!(h.runtime.by_name("base_proxy").is_none());
    assert_touched_nothing(&h);

    // Stopped (after a reboot, say): reported, never started.
    let mut h = device();
    let id = external(&mut h, "base_proxy", A_1, true);
    h.runtime.crash(h.now, &id, 0);
    h.put("edge", 1, &score(A_1));
    h.run_for(Duration::from_secs(30));
    let (status, evidence) = unverified(&h);
    assert_eq!(status, VerifiedStatus::Stopped);
    assert_eq!(evidence, "exited with code 0");
    assert!(state(&h).container_ids.is_empty());
    assert_touched_nothing(&h);

    // Drifted: it runs another image than the score names.
    let mut h = device();
    external(&mut h, "base_proxy", A_1, true);
    h.put("edge", 1, &score(A_2));
    h.run_for(Duration::from_secs(30));
    let (status, evidence) = unverified(&h);
    assert_eq!(status, VerifiedStatus::Drifted);
    assert!(evidence.contains(A_2), "{evidence}");
    assert_touched_nothing(&h);
}

#[test]
fn an_unreadable_tag_is_never_a_pass_and_is_never_pulled() {
    let mut h = device();
    external(&mut h, "base_proxy", A_1, true);
    // The tag is gone from the store: what the container runs cannot be
    // checked against it.
    h.runtime.remove_image(A_1);
    h.put("edge", 1, &score(A_1));
    h.run_for(Duration::from_secs(30));
    let (status, evidence) = unverified(&h);
    assert_eq!(status, VerifiedStatus::Drifted);
    assert!(evidence.contains("not in the device's store"), "{evidence}");
    assert_touched_nothing(&h);
}

#[test]
fn a_failed_probe_is_unknown_never_missing_and_starts_nothing() {
    let mut h = device();
    external(&mut h, "base_proxy", A_1, true);
    h.faults
        .entry("inspect")
        .or_default()
        .push_back(OpFault::Fail(RuntimeErrorKind::Unavailable));
    h.put("edge", 1, &score(A_1));
    h.run_for(Duration::from_millis(500));
    let (status, _) = unverified(&h);
    assert_eq!(status, VerifiedStatus::Unknown, "{}", h.transcript);
    // The next liveness tick verifies again and finds it running.
    h.run_for(Duration::from_secs(30));
    assert_eq!(state(&h).phase, Phase::Running, "{}", h.transcript);
    assert_touched_nothing(&h);
}

#[test]
fn deleting_it_touches_nothing_and_switching_to_it_retires_only_own_containers() {
    let mut h = device();
    let theirs = external(&mut h, "base_proxy", A_1, true);
    // First a persistent deployment of podfleet's own...
    h.put(
        "edge",
        1,
        &format!(r#"{{"services":[{{"name":"proxy","image":"{A_2}"}}]}}"#),
    );
    h.run_for(Duration::from_secs(30));
    let own = state(&h).container_ids["proxy"].clone();
    // ...then the same deployment verifying the base system's container:
    // podfleet's own container goes, theirs is only looked at.
    h.put("edge", 2, &score(A_1));
    h.run_for(Duration::from_secs(30));
    assert_eq!(state(&h).phase, Phase::Running, "{}", h.transcript);
    assert!(!h.runtime.containers().contains_key(&own));
    assert!(h.runtime.is_running(&theirs));
    let from = h.ops.len();
    h.delete("edge", 3);
    h.run_for(Duration::from_secs(30));
    assert!(h.runtime.is_running(&theirs));
    let after: Vec<_> = h.ops[from..]
        .iter()
        .filter(|(_, op)| op.is_mutation())
        .collect();
    assert!(after.is_empty(), "{after:?}");
    assert!(h.violations.is_empty(), "{:?}", h.violations);
}

#[test]
fn its_own_container_of_an_earlier_lifetime_goes_even_when_its_spec_is_the_same() {
    // Found by the core's property test: the persistent container and a
    // container of the no_launch score's service would be the same spec,
    // yet no_launch runs nothing of its own, so retiring it is no
    // recreation of a healthy container.
    let mut h = device();
    h.put(
        "edge",
        1,
        &format!(r#"{{"services":[{{"name":"proxy","image":"{A_1}"}}]}}"#),
    );
    h.run_for(Duration::from_secs(30));
    let own = state(&h).container_ids["proxy"].clone();
    h.put(
        "edge",
        2,
        &format!(r#"{{"lifetime":"no_launch","services":[{{"name":"proxy","image":"{A_1}"}}]}}"#),
    );
    h.run_for(Duration::from_secs(30));
    assert!(
        !h.runtime.containers().contains_key(&own),
        "{}",
        h.transcript
    );
    assert_eq!(unverified(&h).0, VerifiedStatus::Missing);
    assert!(h.violations.is_empty(), "{:?}", h.violations);
}

#[test]
fn switching_to_it_waits_for_no_image_before_retiring_its_own_containers() {
    // Found by the core's property test: a no_launch revision never pulls,
    // so the image it verifies being absent is no reason to keep podfleet's
    // own containers of the earlier lifetime ("download before kill" is
    // about the images a rollout creates containers from: none here).
    let mut h = device();
    h.put(
        "edge",
        1,
        &format!(r#"{{"services":[{{"name":"proxy","image":"{A_1}"}}]}}"#),
    );
    h.run_for(Duration::from_secs(30));
    let own = state(&h).container_ids["proxy"].clone();
    h.put("edge", 2, &score(images::MISSING));
    h.run_for(Duration::from_secs(30));
    assert!(
        !h.runtime.containers().contains_key(&own),
        "{}",
        h.transcript
    );
    assert_eq!(unverified(&h).0, VerifiedStatus::Missing);
    assert!(h.violations.is_empty(), "{:?}", h.violations);
}

#[test]
fn after_an_agent_restart_it_verifies_again_before_reporting() {
    let mut h = device();
    let id = external(&mut h, "base_proxy", A_1, true);
    h.put("edge", 1, &score(A_1));
    h.run_for(Duration::from_secs(30));
    assert_eq!(state(&h).phase, Phase::Running);
    h.restart_agent(true);
    h.run_for(Duration::from_secs(30));
    assert_eq!(state(&h).phase, Phase::Running, "{}", h.transcript);
    assert_eq!(state(&h).container_ids["proxy"], id);
    assert_touched_nothing(&h);
}

#[test]
fn starting_a_verified_container_is_caught() {
    for (bugs, caught) in [
        (Bugs::default(), false),
        (
            Bugs {
                start_unverified: true,
                ..Bugs::default()
            },
            true,
        ),
    ] {
        let config = Config::new(DeviceId::new("dev-0").unwrap(), "test").inject_bugs(bugs);
        let mut h = Harness::new(config);
        h.runtime = images::runtime();
        let id = external(&mut h, "base_proxy", A_1, true);
        h.runtime.crash(h.now, &id, 0);
        h.put("edge", 1, &score(A_1));
        h.run_for(Duration::from_secs(30));
        let found = h
            .violations
            .iter()
            .any(|v| v.invariant == Invariant::OnlyOwnContainers);
        assert_eq!(found, caught, "{:?}\n{}", h.violations, h.transcript);
    }
}

#[test]
fn the_verified_image_is_never_podfleets_to_collect() {
    let mut h = device();
    // A store that lists what it holds (a preloaded one lists nothing).
    *h.runtime.images_mut() = ImageStore::empty();
    h.runtime.add_image(A_1);
    let id = external(&mut h, "base_proxy", A_1, true);
    h.put("edge", 1, &score(A_1));
    h.run_for(Duration::from_secs(30));
    // The base system removes its container (to recreate it later, say);
    // the deployment goes away.
    let _ = h.runtime.execute(&RuntimeOp::Remove {
        container: id,
        force: true,
    });
    h.delete("edge", 2);
    h.run_for(Duration::from_secs(700));
    assert!(
        !h.ops
            .iter()
            .any(|(_, op)| matches!(op, RuntimeOp::RemoveImage { .. })),
        "{}",
        h.transcript
    );
    assert!(h.runtime.image(A_1).is_some());
}
