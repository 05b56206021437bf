#![allow(clippy::unwrap_used)]
//! `per_run`: each service runs once per revision, to completion; its exit
//! codes are reported, nothing is restarted or retried, and its exited
//! containers go after the retention.

use std::time::Duration;

use podfleet_core::reconciler::Config;
use podfleet_core::runtime::RuntimeOp;
use podfleet_core::wire::{DeploymentName, DeploymentState, DeviceId, FailureCause, Phase};
use podfleet_testkit::images::{self, A_1, CRASH, INIT_FAIL, INIT_FAIL_CODE, INIT_OK};
use podfleet_testkit::Harness;

fn device() -> Harness {
    let config = Config::new(DeviceId::new("dev-0").unwrap(), "test")
        .run_retention(Duration::from_secs(600));
    let mut h = Harness::new(config);
    h.runtime = images::runtime();
    h.run_for(Duration::from_secs(1));
    h
}

fn job(services: &[(&str, &str)]) -> String {
    let services: Vec<String> = services
        .iter()
        .map(|(name, image)| format!(r#"{{"name":"{name}","image":"{image}"}}"#))
        .collect();
    format!(
        r#"{{"lifetime":"per_run","services":[{}]}}"#,
        services.join(",")
    )
}

fn state(h: &Harness) -> &DeploymentState {
    &h.states[&DeploymentName::new("batch").unwrap()]
}

fn creates(h: &Harness) -> usize {
    h.ops
        .iter()
        .filter(|(_, op)| matches!(op, RuntimeOp::Create { .. }))
        .count()
}

#[test]
fn a_run_that_exits_zero_succeeds_once_and_its_containers_go_after_the_retention() {
    let mut h = device();
    h.put("batch", 1, &job(&[("fetch", INIT_OK), ("index", INIT_OK)]));
    h.run_for(Duration::from_secs(60));
    let s = state(&h);
    assert_eq!(s.phase, Phase::Succeeded, "{}", h.transcript);
    assert_eq!(s.exit_codes.len(), 2);
    assert!(s.exit_codes.values().all(|c| *c == 0));
    assert!(s.container_ids.is_empty());
    assert_eq!(s.message, "2 services ran to completion");
    // Kept for their logs, never restarted...
    assert!(h.runtime.by_name("batch_fetch").is_some());
    h.run_for(Duration::from_secs(300));
    assert_eq!(creates(&h), 2);
    assert!(h.runtime.by_name("batch_fetch").unwrap().starts == 1);
    // ...then removed once the retention is over.
    h.run_for(Duration::from_secs(400));
    assert!(
        h.runtime.by_name("batch_fetch").is_none(),
        "{}",
        h.transcript
    );
    assert!(h.runtime.by_name("batch_index").is_none());
    assert_eq!(state(&h).phase, Phase::Succeeded);
    assert!(h.violations.is_empty(), "{:?}", h.violations);
}

#[test]
fn a_non_zero_exit_fails_the_revision_without_a_retry() {
    let mut h = device();
    h.put("batch", 1, &job(&[("ok", INIT_OK), ("bad", INIT_FAIL)]));
    h.run_for(Duration::from_secs(600));
    let s = state(&h);
    assert_eq!(s.phase, Phase::Failed, "{}", h.transcript);
    assert_eq!(
        s.cause,
        Some(FailureCause::RunFailed {
            service: "bad".into(),
            exit_code: INIT_FAIL_CODE
        })
    );
    assert_eq!(s.exit_codes["ok"], 0);
    assert_eq!(creates(&h), 2, "{}", h.transcript);
    assert!(h.violations.is_empty(), "{:?}", h.violations);
}

#[test]
fn the_services_of_a_run_run_side_by_side() {
    let mut h = device();
    // CRASH exits with 1 after 7 s, INIT_OK with 0 after 1 s.
    h.put("batch", 1, &job(&[("slow", CRASH), ("quick", INIT_OK)]));
    h.run_for(Duration::from_secs(30));
    let starts: Vec<_> = h
        .ops
        .iter()
        .filter(|(_, op)| matches!(op, RuntimeOp::Start { .. }))
        .map(|(at, _)| *at)
        .collect();
    assert_eq!(starts.len(), 2);
    assert!(
        starts[1].saturating_since(starts[0]) < Duration::from_secs(1),
        "{}",
        h.transcript
    );
    assert_eq!(state(&h).exit_codes["slow"], 1);
    assert_eq!(state(&h).exit_codes["quick"], 0);
}

#[test]
fn an_agent_restart_mid_run_waits_for_the_run_instead_of_starting_another() {
    let mut h = device();
    h.put("batch", 1, &job(&[("slow", CRASH)]));
    h.run_for(Duration::from_secs(2));
    h.restart_agent(true);
    h.run_for(Duration::from_secs(30));
    assert_eq!(creates(&h), 1, "{}", h.transcript);
    assert_eq!(state(&h).phase, Phase::Failed);
    assert_eq!(state(&h).exit_codes["slow"], 1);
    // And after the run, a restart reports what the cache remembers.
    h.restart_agent(true);
    h.run_for(Duration::from_secs(60));
    assert_eq!(state(&h).exit_codes["slow"], 1);
    assert_eq!(creates(&h), 1);
    assert!(h.violations.is_empty(), "{:?}", h.violations);
}

#[test]
fn a_new_revision_runs_again_and_the_same_spec_re_put_does_not() {
    let mut h = device();
    let spec = job(&[("once", INIT_OK)]);
    h.put("batch", 1, &spec);
    h.run_for(Duration::from_secs(30));
    h.put("batch", 2, &spec);
    h.run_for(Duration::from_secs(30));
    assert_eq!(creates(&h), 1, "{}", h.transcript);
    assert_eq!(state(&h).phase, Phase::Succeeded);
    h.put("batch", 3, &job(&[("once", INIT_OK), ("twice", INIT_OK)]));
    h.run_for(Duration::from_secs(30));
    assert_eq!(creates(&h), 3, "{}", h.transcript);
    assert_eq!(state(&h).phase, Phase::Succeeded);
    assert_eq!(state(&h).revision.get(), 3);
}

#[test]
fn a_restart_runs_the_same_spec_again_and_a_re_put_of_it_does_not() {
    let mut h = device();
    let spec = job(&[("once", INIT_OK)]);
    h.put("batch", 1, &spec);
    h.run_for(Duration::from_secs(30));
    // `podfleet rollout restart` writes the same spec with its restart
    // count raised: one run more, the previous one's container retired.
    let restarted = spec.replacen('{', r#"{"restart":1,"#, 1);
    h.put("batch", 2, &restarted);
    h.run_for(Duration::from_secs(30));
    assert_eq!(creates(&h), 2, "{}", h.transcript);
    let s = state(&h);
    assert_eq!(
        (s.phase, s.revision.get()),
        (Phase::Succeeded, 2),
        "{}",
        h.transcript
    );
    assert_eq!(h.runtime.by_name("batch_once").unwrap().starts, 1);
    // The restarted spec put again is the same run.
    h.put("batch", 3, &restarted);
    h.run_for(Duration::from_secs(30));
    assert_eq!(creates(&h), 2, "{}", h.transcript);
    assert!(h.violations.is_empty(), "{:?}", h.violations);
}

#[test]
fn a_newer_revision_walks_away_from_a_run_under_way() {
    let mut h = device();
    h.put("batch", 1, &job(&[("forever", A_1)]));
    h.run_for(Duration::from_secs(30));
    assert_eq!(state(&h).phase, Phase::Pending);
    h.put("batch", 2, &job(&[("forever", INIT_OK)]));
    h.run_for(Duration::from_secs(60));
    assert_eq!(state(&h).phase, Phase::Succeeded, "{}", h.transcript);
    // The old run was stopped gracefully, then replaced.
    assert!(h
        .ops
        .iter()
        .any(|(_, op)| matches!(op, RuntimeOp::Stop { .. })));
    assert!(h.violations.is_empty(), "{:?}", h.violations);
}
