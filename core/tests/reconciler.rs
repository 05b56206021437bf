//! Scenario tests of the reconciler against the fake runtime, in virtual
//! time: one per behaviour the reconciler promises, and transcripts of a
//! few whole stories (insta snapshots under tests/snapshots/).

#![allow(clippy::unwrap_used)] // a panic is how a test fails

use std::collections::BTreeSet;
use std::time::Duration;

use podfleet_core::reconciler::{
    Bugs, Config, DeviceFacts, ImageGcPolicy, Input, Output, Reconciler,
};
use podfleet_core::runtime::{ContainerState, RuntimeErrorKind, RuntimeOp, LABEL_SPEC_HASH};
use podfleet_core::time::Timestamp;
use podfleet_core::wire::report::FACT_MAX_BYTES;
use podfleet_core::wire::{
    DeploymentName, DeploymentState, DeviceId, FailureCause, Phase, PullFailure, Revision,
};
use podfleet_testkit::{Behaviour, Harness, OpFault, RuntimeEvent};

const SECOND: Duration = Duration::from_secs(1);

/// No image garbage collection, for tests that drive the reconciler by
/// hand and expect only their own operations.
fn no_gc() -> ImageGcPolicy {
    ImageGcPolicy {
        enabled: false,
        ..ImageGcPolicy::default()
    }
}

fn config() -> Config {
    Config::new(DeviceId::new("rpi-01").unwrap(), "test")
}

fn harness() -> Harness {
    let mut h = Harness::new(config());
    h.run_for(SECOND);
    h
}

fn web(image: &str, env: &str) -> String {
    format!(r#"{{"name":"web","image":"{image}","env":{{"MODE":"{env}"}}}}"#)
}

fn score(services: &[String], inits: &[String]) -> String {
    format!(
        r#"{{"services":[{}],"init_containers":[{}],"lifecycle":{{"stop_signal":"SIGINT","grace_period_secs":5}}}}"#,
        services.join(","),
        inits.join(",")
    )
}

fn init(name: &str, image: &str, timeout: u64) -> String {
    format!(r#"{{"name":"{name}","image":"{image}","timeout":{timeout}}}"#)
}

fn worker() -> String {
    r#"{"name":"worker","image":"img/worker:1"}"#.to_owned()
}

fn state(h: &Harness, deployment: &str) -> DeploymentState {
    h.states
        .get(&DeploymentName::new(deployment).unwrap())
        .cloned()
        .unwrap_or_else(|| panic!("no state for {deployment}\n{}", h.transcript))
}

fn running_id(h: &Harness, name: &str) -> String {
    let c = h
        .runtime
        .by_name(name)
        .unwrap_or_else(|| panic!("no container {name}\n{}", h.transcript));
    assert_eq!(c.state, ContainerState::Running, "{name}\n{}", h.transcript);
    c.id.clone()
}

fn mutations_since(h: &Harness, from: usize) -> Vec<RuntimeOp> {
    h.ops[from..]
        .iter()
        .map(|(_, op)| op.clone())
        .filter(RuntimeOp::is_mutation)
        .collect()
}

fn deploy(h: &mut Harness, revision: u64, json: &str) {
    h.put("shop", revision, json);
    h.run_for(SECOND);
}

#[test]
fn first_deploy_reports_running_with_ids() {
    let mut h = harness();
    deploy(&mut h, 1, &score(&[web("img/web:1", "a"), worker()], &[]));
    let s = state(&h, "shop");
    assert_eq!(s.phase, Phase::Running, "{}", h.transcript);
    assert_eq!(s.revision, 1);
    assert_eq!(s.container_ids["web"], running_id(&h, "shop_web"));
    assert_eq!(s.container_ids["worker"], running_id(&h, "shop_worker"));
    assert_eq!(s.message, "2 services running");
    let published: Vec<Phase> = h.published.iter().map(|(_, s)| s.phase).collect();
    assert_eq!(published, [Phase::Pending, Phase::Running]);
}

#[test]
fn tick_is_idempotent_no_recreate() {
    let mut h = harness();
    deploy(&mut h, 1, &score(&[web("img/web:1", "with-env")], &[]));
    let id = running_id(&h, "shop_web");
    let from = h.ops.len();
    let reports = h.published.len();
    h.run_for(Duration::from_secs(30 * 10));
    assert!(mutations_since(&h, from).is_empty(), "{}", h.transcript);
    let lists = h.ops[from..]
        .iter()
        .filter(|(_, op)| *op == RuntimeOp::List)
        .count();
    assert_eq!(lists, 10, "one list per tick, nothing else");
    assert_eq!(h.ops.len() - from, 10);
    assert_eq!(running_id(&h, "shop_web"), id);
    assert_eq!(h.published.len(), reports, "a quiet tick publishes nothing");
}

#[test]
fn unchanged_score_is_a_noop() {
    let mut h = harness();
    h.runtime
        .set_behaviour("img/m:1", Behaviour::exits(0, SECOND));
    let json = score(&[web("img/web:1", "a")], &[init("migrate", "img/m:1", 60)]);
    deploy(&mut h, 1, &json);
    h.run_for(Duration::from_secs(2));
    let from = h.ops.len();
    deploy(&mut h, 1, &json); // duplicate delivery
    deploy(&mut h, 2, &json); // re-put of the same bytes
    assert!(h.ops[from..].is_empty(), "{}", h.transcript);
    let s = state(&h, "shop");
    assert_eq!((s.phase, s.revision.get()), (Phase::Running, 2));
}

#[test]
fn a_restart_gracefully_replaces_every_service_and_reruns_the_init_containers() {
    let mut h = harness();
    h.runtime
        .set_behaviour("img/m:1", Behaviour::exits(0, SECOND));
    let json = score(
        &[web("img/web:1", "a"), worker()],
        &[init("migrate", "img/m:1", 60)],
    );
    deploy(&mut h, 1, &json);
    h.run_for(Duration::from_secs(2));
    let (web_id, worker_id) = (running_id(&h, "shop_web"), running_id(&h, "shop_worker"));
    let from = h.ops.len();
    // What `podfleet rollout restart` writes: the same score, restarted once.
    let restarted = json.replacen('{', r#"{"restart":1,"#, 1);
    deploy(&mut h, 2, &restarted);
    h.run_for(Duration::from_secs(2));
    let muts = mutations_since(&h, from);
    let stops: Vec<&RuntimeOp> = muts
        .iter()
        .filter(|op| matches!(op, RuntimeOp::Stop { .. }))
        .collect();
    assert_eq!(
        stops,
        [
            &RuntimeOp::Stop {
                container: web_id.clone(),
                signal: podfleet_core::wire::Signal::Int,
                grace: Duration::from_secs(5)
            },
            &RuntimeOp::Stop {
                container: worker_id.clone(),
                signal: podfleet_core::wire::Signal::Int,
                grace: Duration::from_secs(5)
            },
        ],
        "{}",
        h.transcript
    );
    let created: Vec<String> = muts
        .iter()
        .filter_map(|op| match op {
            RuntimeOp::Create { spec } => Some(spec.name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(created, ["shop_init_migrate", "shop_web", "shop_worker"]);
    assert_ne!(running_id(&h, "shop_web"), web_id);
    assert_ne!(running_id(&h, "shop_worker"), worker_id);
    let s = state(&h, "shop");
    assert_eq!((s.phase, s.revision.get()), (Phase::Running, 2));
    // Put again, the restarted score is the same spec: nothing is touched.
    let from = h.ops.len();
    deploy(&mut h, 3, &restarted);
    assert!(mutations_since(&h, from).is_empty(), "{}", h.transcript);
    assert!(h.violations.is_empty(), "{:?}", h.violations);
}

#[test]
fn changed_score_gracefully_replaces_by_id() {
    let mut h = harness();
    deploy(&mut h, 1, &score(&[web("img/web:1", "a"), worker()], &[]));
    let old_web = running_id(&h, "shop_web");
    let worker_id = running_id(&h, "shop_worker");
    let from = h.ops.len();
    deploy(&mut h, 2, &score(&[web("img/web:1", "b"), worker()], &[]));
    let muts = mutations_since(&h, from);
    assert_eq!(
        muts[..2],
        [
            RuntimeOp::Stop {
                container: old_web.clone(),
                signal: podfleet_core::wire::Signal::Int,
                grace: Duration::from_secs(5)
            },
            RuntimeOp::Remove {
                container: old_web.clone(),
                force: true
            },
        ],
        "{}",
        h.transcript
    );
    assert!(matches!(&muts[2], RuntimeOp::Create { spec } if spec.env["MODE"] == "b"));
    assert_eq!(
        muts.len(),
        4,
        "create and start the new one, nothing else: {muts:?}"
    );
    let new_web = running_id(&h, "shop_web");
    assert_ne!(new_web, old_web);
    assert_eq!(
        running_id(&h, "shop_worker"),
        worker_id,
        "unchanged service left running"
    );
    let s = state(&h, "shop");
    assert_eq!((s.phase, s.revision.get()), (Phase::Running, 2));
    assert_eq!(s.container_ids["web"], new_web);
}

#[test]
fn stop_outcome_follows_the_program() {
    let mut h = harness();
    h.runtime.set_behaviour(
        "img/web:1",
        Behaviour {
            ignores_stop_signal: true,
            ..Behaviour::default()
        },
    );
    deploy(&mut h, 1, &score(&[web("img/web:1", "a")], &[]));
    deploy(&mut h, 2, &score(&[web("img/web:1", "b")], &[]));
    h.run_for(Duration::from_secs(10));
    assert!(h.transcript.contains("stopped Killed"), "{}", h.transcript);
    let stop_at = h.ops.iter().find(|(_, op)| op.name() == "stop").unwrap().0;
    let create_at = h
        .ops
        .iter()
        .filter(|(_, op)| op.name() == "create")
        .nth(1)
        .unwrap()
        .0;
    assert_eq!(
        create_at.saturating_since(stop_at),
        Duration::from_secs(5),
        "waited the grace"
    );
    assert_eq!(state(&h, "shop").phase, Phase::Running);
}

#[test]
fn dropped_service_is_stopped_and_removed() {
    let mut h = harness();
    deploy(&mut h, 1, &score(&[web("img/web:1", "a"), worker()], &[]));
    let web_id = running_id(&h, "shop_web");
    let worker_id = running_id(&h, "shop_worker");
    let from = h.ops.len();
    deploy(&mut h, 2, &score(&[web("img/web:1", "a")], &[]));
    assert_eq!(
        mutations_since(&h, from),
        [
            RuntimeOp::Stop {
                container: worker_id.clone(),
                signal: podfleet_core::wire::Signal::Int,
                grace: Duration::from_secs(5)
            },
            RuntimeOp::Remove {
                container: worker_id,
                force: true
            }
        ]
    );
    assert!(h.runtime.by_name("shop_worker").is_none());
    assert_eq!(running_id(&h, "shop_web"), web_id);
    assert_eq!(state(&h, "shop").container_ids.len(), 1);
}

#[test]
fn init_containers_run_in_order_before_services() {
    let mut h = harness();
    h.runtime
        .set_behaviour("img/m:1", Behaviour::exits(0, Duration::from_secs(3)));
    h.runtime
        .set_behaviour("img/w:1", Behaviour::exits(0, Duration::from_secs(2)));
    let json = score(
        &[web("img/web:1", "a"), worker()],
        &[init("migrate", "img/m:1", 60), init("warm", "img/w:1", 60)],
    );
    deploy(&mut h, 1, &json);
    h.run_for(Duration::from_secs(10));
    let created: Vec<String> = h
        .runtime
        .events()
        .iter()
        .filter_map(|(_, e)| match e {
            RuntimeEvent::Created { spec, .. } => Some(spec.name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        created,
        [
            "shop_init_migrate",
            "shop_init_warm",
            "shop_web",
            "shop_worker"
        ]
    );
    // Each init container exited before the next thing was created.
    let events = h.runtime.events();
    let exit_of_migrate = events
        .iter()
        .position(|(_, e)| matches!(e, RuntimeEvent::Exited { code: 0, .. }))
        .unwrap();
    let create_warm = events.iter().position(|(_, e)| matches!(e, RuntimeEvent::Created { spec, .. } if spec.name == "shop_init_warm")).unwrap();
    assert!(exit_of_migrate < create_warm);
    // None is left behind, and none is managed as a service.
    assert!(h.runtime.by_name("shop_init_migrate").is_none());
    assert!(h.runtime.by_name("shop_init_warm").is_none());
    let s = state(&h, "shop");
    assert_eq!(s.phase, Phase::Running);
    assert_eq!(s.message, "2 init containers completed, 2 services running");
    assert_eq!(
        s.container_ids.keys().collect::<Vec<_>>(),
        ["web", "worker"]
    );
    let init_spec = h.ops.iter().find_map(|(_, op)| match op {
        RuntimeOp::Create { spec } if spec.name == "shop_init_migrate" => Some(spec.clone()),
        _ => None,
    });
    assert_eq!(
        init_spec.unwrap().labels[podfleet_core::runtime::LABEL_INIT],
        "true"
    );
}

#[test]
fn init_failure_fails_the_revision_with_name_and_code() {
    let mut h = harness();
    deploy(&mut h, 1, &score(&[web("img/web:1", "a")], &[]));
    let old = running_id(&h, "shop_web");
    h.runtime
        .set_behaviour("img/m:bad", Behaviour::exits(3, SECOND));
    deploy(
        &mut h,
        2,
        &score(
            &[web("img/web:1", "b")],
            &[init("migrate", "img/m:bad", 60)],
        ),
    );
    h.run_for(Duration::from_secs(3));
    let s = state(&h, "shop");
    assert_eq!(s.phase, Phase::Failed, "{}", h.transcript);
    assert_eq!(
        s.cause,
        Some(FailureCause::InitContainerExited {
            name: "migrate".into(),
            exit_code: 3
        })
    );
    assert!(
        s.message
            .contains("init container \"migrate\" exited with code 3"),
        "{}",
        s.message
    );
    assert!(
        h.runtime.by_name("shop_init_migrate").is_none(),
        "removed after failing"
    );
    assert_eq!(
        running_id(&h, "shop_web"),
        old,
        "services untouched when init fails"
    );
}

#[test]
fn init_timeout_force_removes_and_reports_the_wait() {
    let mut h = harness();
    h.runtime.set_behaviour("img/hang:1", Behaviour::default());
    deploy(
        &mut h,
        1,
        &score(
            &[web("img/web:1", "a")],
            &[init("migrate", "img/hang:1", 7)],
        ),
    );
    h.run_for(Duration::from_secs(8));
    let s = state(&h, "shop");
    assert_eq!(
        s.cause,
        Some(FailureCause::InitContainerTimedOut {
            name: "migrate".into(),
            waited_secs: 7
        }),
        "{}",
        h.transcript
    );
    assert!(h.runtime.by_name("shop_init_migrate").is_none());
    assert!(
        h.runtime.by_name("shop_web").is_none(),
        "no service before init succeeds"
    );
    assert!(h
        .ops
        .iter()
        .any(|(_, op)| matches!(op, RuntimeOp::Remove { force: true, .. })));
}

#[test]
fn libpod_race_second_inspect_succeeds() {
    let mut h = harness();
    h.runtime.set_behaviour(
        "img/m:1",
        Behaviour {
            inspect_lag: Duration::from_millis(150),
            ..Behaviour::exits(0, SECOND)
        },
    );
    deploy(
        &mut h,
        1,
        &score(&[web("img/web:1", "a")], &[init("migrate", "img/m:1", 60)]),
    );
    h.run_for(Duration::from_secs(2));
    assert!(
        h.transcript.contains("inspected running"),
        "{}",
        h.transcript
    );
    let inspects = h
        .ops
        .iter()
        .filter(|(_, op)| op.name() == "inspect")
        .count();
    assert_eq!(inspects, 2);
    assert_eq!(state(&h, "shop").phase, Phase::Running);
}

#[test]
fn libpod_race_still_running_is_a_typed_error() {
    let mut h = harness();
    h.runtime.set_behaviour(
        "img/m:1",
        Behaviour {
            inspect_lag: Duration::from_secs(5),
            ..Behaviour::exits(0, SECOND)
        },
    );
    deploy(
        &mut h,
        1,
        &score(&[web("img/web:1", "a")], &[init("migrate", "img/m:1", 60)]),
    );
    h.run_for(Duration::from_secs(2));
    assert_eq!(
        state(&h, "shop").cause,
        Some(FailureCause::StillRunningAfterWait {
            name: "migrate".into()
        }),
        "{}",
        h.transcript
    );
    assert!(h.runtime.by_name("shop_init_migrate").is_none());
}

#[test]
fn roll_forward_failure_to_pull_keeps_the_old_revision_running() {
    let mut h = harness();
    deploy(&mut h, 1, &score(&[web("img/web:1", "a"), worker()], &[]));
    let old = h.runtime.by_name("shop_web").unwrap().id.clone();
    // Not in the store, and the registry does not have it either.
    h.runtime.remove_image("img/web:2");
    deploy(&mut h, 2, &score(&[web("img/web:2", "a"), worker()], &[]));
    let s = state(&h, "shop");
    assert_eq!(s.phase, Phase::Failed, "{}", h.transcript);
    assert!(
        matches!(&s.cause, Some(FailureCause::ImagePull { image, reason: PullFailure::NotFound, .. }) if image == "img/web:2"),
        "{:?}",
        s.cause
    );
    // Download, then kill: the failed download touched nothing.
    assert!(h.runtime.is_running(&old), "{}", h.transcript);
    // Retries follow the backoff, each one a pull, and never stop the old
    // container.
    h.run_for(Duration::from_secs(400));
    let pulls: Vec<Timestamp> = h
        .ops
        .iter()
        .filter_map(|(t, op)| match op {
            RuntimeOp::Pull { image } if image == "img/web:2" => Some(*t),
            _ => None,
        })
        .collect();
    let gaps: Vec<u64> = pulls
        .windows(2)
        .map(|w| w[1].saturating_since(w[0]).as_secs())
        .collect();
    assert_eq!(gaps[..5], [10, 20, 40, 80, 160], "{gaps:?}");
    assert!(h.runtime.is_running(&old), "{}", h.transcript);
    assert!(!h
        .ops
        .iter()
        .any(|(_, op)| matches!(op, RuntimeOp::Stop { container, .. } if *container == old)));
    let s = state(&h, "shop");
    assert!(s.attempt >= 6, "each attempt is visible: {}", s.attempt);
    // The image arrives: the next attempt succeeds and replaces the old web.
    h.runtime.add_image("img/web:2");
    h.run_for(Duration::from_secs(301));
    assert_eq!(state(&h, "shop").phase, Phase::Running);
    let web = h.runtime.by_name("shop_web").unwrap();
    assert_eq!(web.spec.image, "img/web:2");
    assert_ne!(web.id, old);
}

#[test]
fn newer_revision_supersedes_a_failing_one_at_once() {
    let mut h = harness();
    h.runtime.remove_image("img/web:2");
    deploy(&mut h, 1, &score(&[web("img/web:2", "a")], &[]));
    assert_eq!(state(&h, "shop").phase, Phase::Failed);
    deploy(&mut h, 2, &score(&[web("img/web:3", "a")], &[]));
    let s = state(&h, "shop");
    assert_eq!(
        (s.phase, s.revision.get(), s.attempt),
        (Phase::Running, 2, 1)
    );
}

#[test]
fn newer_revision_supersedes_a_hanging_init() {
    let mut h = harness();
    deploy(
        &mut h,
        1,
        &score(
            &[web("img/web:1", "a")],
            &[init("migrate", "img/hang:1", 300)],
        ),
    );
    assert_eq!(state(&h, "shop").phase, Phase::Pending);
    deploy(&mut h, 2, &score(&[web("img/web:2", "a")], &[]));
    assert_eq!(state(&h, "shop").phase, Phase::Running, "{}", h.transcript);
    assert!(
        h.runtime.by_name("shop_init_migrate").is_none(),
        "leftover init removed"
    );
    let images: Vec<&str> = h
        .ops
        .iter()
        .filter_map(|(_, op)| match op {
            RuntimeOp::Create { spec } if spec.name == "shop_web" => Some(spec.image.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(images, ["img/web:2"], "revision 1's service never started");
}

#[test]
fn malformed_payload_keeps_old_containers() {
    let mut h = harness();
    deploy(&mut h, 1, &score(&[web("img/web:1", "a")], &[]));
    let id = running_id(&h, "shop_web");
    let from = h.ops.len();
    deploy(&mut h, 2, "{not json");
    let s = state(&h, "shop");
    assert_eq!((s.phase, s.revision.get()), (Phase::Failed, 2));
    assert!(
        matches!(&s.cause, Some(FailureCause::InvalidScore { error }) if error.starts_with("malformed score"))
    );
    assert_eq!(s.container_ids["web"], id);
    deploy(&mut h, 3, r#"{"services":[]}"#);
    assert!(state(&h, "shop")
        .message
        .contains("the score has no services"));
    h.run_for(Duration::from_secs(120));
    assert!(mutations_since(&h, from).is_empty(), "{}", h.transcript);
    assert_eq!(running_id(&h, "shop_web"), id);
    // A valid revision after the bad ones rolls forward.
    deploy(&mut h, 4, &score(&[web("img/web:1", "c")], &[]));
    assert_eq!(state(&h, "shop").phase, Phase::Running);
}

#[test]
fn delete_removes_everything_and_clears_state() {
    let mut h = harness();
    deploy(&mut h, 1, &score(&[web("img/web:1", "a"), worker()], &[]));
    deploy(&mut h, 1, &score(&[web("img/web:1", "a"), worker()], &[]));
    h.put("other", 1, &score(&[worker()], &[]));
    h.run_for(SECOND);
    h.delete("shop", 2);
    h.run_for(SECOND);
    assert!(h.runtime.by_name("shop_web").is_none());
    assert!(h.runtime.by_name("shop_worker").is_none());
    assert!(!h.states.contains_key(&DeploymentName::new("shop").unwrap()));
    assert!(
        h.runtime.by_name("other_worker").is_some(),
        "other deployment untouched"
    );
    assert!(!h
        .cache
        .as_ref()
        .unwrap()
        .deployments
        .contains_key(&DeploymentName::new("shop").unwrap()));
}

#[test]
fn crashed_service_restarts_with_capped_backoff_and_never_gives_up() {
    let mut h = harness();
    h.runtime
        .set_behaviour("img/crash:1", Behaviour::exits(1, Duration::from_secs(2)));
    deploy(
        &mut h,
        1,
        &format!(r#"{{"services":[{}]}}"#, web("img/crash:1", "a")),
    );
    h.run_for(Duration::from_secs(3600));
    let starts: Vec<Timestamp> = h
        .runtime
        .events()
        .iter()
        .filter_map(|(t, e)| matches!(e, RuntimeEvent::Started { .. }).then_some(*t))
        .collect();
    assert!(
        starts.len() > 12,
        "still restarting after an hour: {}",
        starts.len()
    );
    let gaps: Vec<u64> = starts
        .windows(2)
        .map(|w| w[1].saturating_since(w[0]).as_secs())
        .collect();
    assert!(gaps.iter().all(|g| *g <= 300 + 30 + 2), "capped: {gaps:?}");
    assert!(
        gaps.iter().rev().take(3).all(|g| *g >= 300),
        "reaches the cap: {gaps:?}"
    );
    let s = state(&h, "shop");
    assert_eq!(s.restarts["web"].last_exit_code, Some(1));
    assert!(s.restarts["web"].count as usize >= starts.len() - 1);
    assert_eq!(
        h.runtime.containers().len(),
        1,
        "restarted in place, never recreated"
    );
}

#[test]
fn crash_loop_is_reported_and_never_blocks_a_newer_revision() {
    let mut h = harness();
    h.runtime
        .set_behaviour("img/crash:1", Behaviour::exits(2, Duration::from_secs(1)));
    deploy(
        &mut h,
        1,
        &format!(r#"{{"services":[{}]}}"#, web("img/crash:1", "a")),
    );
    h.run_for(Duration::from_secs(400));
    let crash_reported = h.published.iter().any(|(_, s)| {
        s.phase == Phase::Failed
            && matches!(&s.cause, Some(FailureCause::CrashLoop { service, last_exit_code: Some(2), .. }) if service == "web")
    });
    assert!(crash_reported, "{}", h.transcript);
    deploy(
        &mut h,
        2,
        &format!(r#"{{"services":[{}]}}"#, web("img/web:1", "a")),
    );
    let s = state(&h, "shop");
    assert_eq!((s.phase, s.revision.get()), (Phase::Running, 2));
    assert!(s.restarts.is_empty(), "a new revision starts a new count");
}

#[test]
fn vanished_container_is_recreated() {
    let mut h = harness();
    deploy(&mut h, 1, &score(&[web("img/web:1", "a")], &[]));
    let id = running_id(&h, "shop_web");
    let _ = h.runtime.execute(&RuntimeOp::Remove {
        container: id.clone(),
        force: true,
    });
    h.run_for(Duration::from_secs(31));
    assert_ne!(running_id(&h, "shop_web"), id);
    assert_eq!(state(&h, "shop").phase, Phase::Running);
}

#[test]
fn restart_with_cache_adopts_without_touching_the_runtime() {
    let mut h = harness();
    let json = score(&[web("img/web:1", "a")], &[init("migrate", "img/m:1", 60)]);
    h.runtime
        .set_behaviour("img/m:1", Behaviour::exits(0, SECOND));
    deploy(&mut h, 1, &json);
    h.run_for(Duration::from_secs(2));
    let id = running_id(&h, "shop_web");
    assert!(h.cache.is_some());
    h.restart_agent(true);
    let from = h.ops.len();
    h.run_for(Duration::from_secs(90)); // NATS unreachable: no desired put at all
    h.put("shop", 1, &json); // then the watch delivers the same value
    h.run_for(Duration::from_secs(90));
    assert!(mutations_since(&h, from).is_empty(), "{}", h.transcript);
    assert_eq!(running_id(&h, "shop_web"), id);
    assert_eq!(state(&h, "shop").container_ids["web"], id);
}

#[test]
fn restart_without_cache_adopts_by_spec_hash_label() {
    let mut h = harness();
    let json = score(
        &[web("img/web:1", "a"), worker()],
        &[init("migrate", "img/m:1", 60)],
    );
    h.runtime
        .set_behaviour("img/m:1", Behaviour::exits(0, SECOND));
    deploy(&mut h, 1, &json);
    h.run_for(Duration::from_secs(2));
    let id = running_id(&h, "shop_web");
    h.restart_agent(false);
    let from = h.ops.len();
    deploy(&mut h, 1, &json);
    h.run_for(Duration::from_secs(60));
    assert!(mutations_since(&h, from).is_empty(), "{}", h.transcript);
    assert_eq!(running_id(&h, "shop_web"), id);
    let s = state(&h, "shop");
    assert_eq!(
        (s.phase, s.container_ids["web"].as_str()),
        (Phase::Running, id.as_str())
    );
    assert!(h
        .runtime
        .by_name("shop_web")
        .unwrap()
        .spec
        .labels
        .contains_key(LABEL_SPEC_HASH));
}

#[test]
fn restart_after_a_missed_edit_rolls_forward() {
    let mut h = harness();
    deploy(&mut h, 1, &score(&[web("img/web:1", "a"), worker()], &[]));
    let worker_id = running_id(&h, "shop_worker");
    h.restart_agent(true);
    deploy(&mut h, 5, &score(&[web("img/web:1", "b"), worker()], &[]));
    assert_eq!(state(&h, "shop").revision, 5);
    assert_eq!(h.runtime.by_name("shop_web").unwrap().spec.env["MODE"], "b");
    assert_eq!(running_id(&h, "shop_worker"), worker_id);
}

#[test]
fn resync_tears_down_deployments_deleted_while_away() {
    let mut h = harness();
    deploy(&mut h, 1, &score(&[web("img/web:1", "a")], &[]));
    h.restart_agent(true);
    h.reconciler.handle(
        h.now,
        Input::DesiredResync {
            present: &BTreeSet::new(),
        },
    );
    h.run_for(SECOND);
    // The harness drains on its next step.
    h.run_for(SECOND);
    assert!(h.runtime.by_name("shop_web").is_none(), "{}", h.transcript);
}

#[test]
fn resync_sweeps_orphans_of_unknown_deployments() {
    let mut h = harness();
    deploy(&mut h, 1, &score(&[web("img/web:1", "a")], &[]));
    h.restart_agent(false);
    h.put("keep", 3, &score(&[worker()], &[]));
    let present = BTreeSet::from([DeploymentName::new("keep").unwrap()]);
    h.reconciler
        .handle(h.now, Input::DesiredResync { present: &present });
    h.run_for(SECOND);
    assert!(h.runtime.by_name("shop_web").is_none(), "{}", h.transcript);
    assert!(h.runtime.by_name("keep_worker").is_some());
}

#[test]
fn crash_mid_rollout_resumes_the_newer_revision_from_cache() {
    let mut h = harness();
    deploy(&mut h, 1, &score(&[web("img/web:1", "a")], &[]));
    h.runtime
        .set_behaviour("img/m:2", Behaviour::exits(0, Duration::from_secs(5)));
    h.put(
        "shop",
        2,
        &score(&[web("img/web:2", "a")], &[init("migrate", "img/m:2", 60)]),
    );
    h.run_for(SECOND); // init container is running
    h.restart_agent(true);
    h.run_for(Duration::from_secs(10)); // no NATS: the cache alone drives it
    let s = state(&h, "shop");
    assert_eq!(
        (s.phase, s.revision.get()),
        (Phase::Running, 2),
        "{}",
        h.transcript
    );
    assert_eq!(
        h.runtime.by_name("shop_web").unwrap().spec.image,
        "img/web:2"
    );
    assert!(h.violations.is_empty(), "{:?}", h.violations);
}

#[test]
fn create_failed_but_exists_is_adopted_on_retry() {
    let mut h = harness();
    h.faults
        .entry("create")
        .or_default()
        .push_back(OpFault::FailAfterEffect(
            podfleet_core::runtime::RuntimeErrorKind::Other,
        ));
    deploy(&mut h, 1, &score(&[web("img/web:1", "a")], &[]));
    assert_eq!(state(&h, "shop").phase, Phase::Failed);
    h.run_for(Duration::from_secs(11));
    assert_eq!(state(&h, "shop").phase, Phase::Running, "{}", h.transcript);
    assert_eq!(h.runtime.containers().len(), 1);
    let creates = h.ops.iter().filter(|(_, op)| op.name() == "create").count();
    assert_eq!(
        creates, 1,
        "the existing container is started, not recreated"
    );
}

#[test]
fn unreachable_runtime_is_retried_with_backoff_and_reported() {
    let mut h = Harness::new(config());
    // The start-up list was already issued; fail the next few.
    for _ in 0..4 {
        h.faults.entry("list").or_default().push_back(OpFault::Fail(
            podfleet_core::runtime::RuntimeErrorKind::Unavailable,
        ));
    }
    h.restart_agent(false);
    h.run_for(Duration::from_secs(20));
    let lists: Vec<u64> = h
        .ops
        .iter()
        .filter(|(_, op)| *op == RuntimeOp::List)
        .map(|(t, _)| t.as_millis() / 1000)
        .collect();
    assert_eq!(lists[1..6], [0, 1, 3, 7, 15], "{lists:?}");
    assert!(h.heartbeats.iter().any(|hb| matches!(
        hb.runtime,
        podfleet_core::wire::RuntimeHealth::Unreachable { .. }
    )));
    assert_eq!(
        h.heartbeats.last().unwrap().runtime,
        podfleet_core::wire::RuntimeHealth::Ok
    );
}

#[test]
fn one_bad_deployment_never_stops_the_others() {
    let mut h = harness();
    h.runtime.set_behaviour("img/hang:1", Behaviour::default());
    h.put(
        "bad",
        1,
        &score(&[web("img/web:1", "a")], &[init("hang", "img/hang:1", 300)]),
    );
    h.put("ugly", 1, "[]");
    h.put("good", 1, &score(&[web("img/web:1", "a")], &[]));
    h.run_for(SECOND);
    assert_eq!(state(&h, "good").phase, Phase::Running);
    assert_eq!(state(&h, "bad").phase, Phase::Pending);
    assert_eq!(state(&h, "ugly").phase, Phase::Failed);
}

#[test]
fn heartbeats_come_on_their_interval() {
    let mut h = harness();
    h.run_for(Duration::from_secs(60));
    let n = h.heartbeats.len();
    assert!((4..=6).contains(&n), "{n}");
    assert_eq!(h.heartbeats.last().unwrap().uptime_s, 60);
}

fn facts() -> DeviceFacts {
    DeviceFacts {
        arch: "aarch64".into(),
        os: "Debian GNU/Linux 12 (bookworm)".into(),
        kernel: "6.1.0-rpi7-rpi-v8".into(),
    }
}

#[test]
fn heartbeats_carry_the_device_facts_and_the_runtime_version() {
    let mut h = Harness::new(config().device_facts(facts()));
    h.runtime.set_version("4.3.1");
    h.run_for(Duration::from_secs(60));
    let last = h.heartbeats.last().unwrap();
    assert_eq!(
        (last.arch.as_str(), last.os.as_str(), last.kernel.as_str()),
        (
            "aarch64",
            "Debian GNU/Linux 12 (bookworm)",
            "6.1.0-rpi7-rpi-v8"
        )
    );
    assert_eq!(last.runtime_version.as_deref(), Some("4.3.1"));
    // Asked once: a runtime that stays up is not asked again.
    assert_eq!(h.version_queries, 1);
    // The fake answers at once, before the first heartbeat is due, and a
    // version learned is news: no heartbeat went out without it.
    assert!(h.heartbeats.iter().all(|hb| hb.runtime_version.is_some()));
    let n = h.heartbeats.len();
    assert!((4..=6).contains(&n), "{n}");
}

#[test]
fn the_runtime_version_is_asked_once_the_runtime_answers() {
    use podfleet_core::runtime::{RuntimeReply, RuntimeResult};
    let now = Timestamp::ZERO;
    let mut r = Reconciler::new(config().device_facts(facts()).image_gc(no_gc()), None, now);
    let drain = |r: &mut Reconciler| std::iter::from_fn(|| r.poll_output()).collect::<Vec<_>>();
    let outputs = drain(&mut r);
    let [Output::Runtime {
        id,
        op: RuntimeOp::List,
    }] = outputs[..]
    else {
        panic!("{outputs:?}");
    };
    // The first heartbeat goes out before the runtime answered: facts, no version.
    r.handle(now, Input::Timeout);
    let outputs = drain(&mut r);
    let [Output::Heartbeat(hb)] = &outputs[..] else {
        panic!("{outputs:?}");
    };
    assert_eq!(hb.arch, "aarch64");
    assert_eq!(hb.runtime_version, None);
    let listed: RuntimeResult = Ok(RuntimeReply::Listed {
        containers: Vec::new(),
    });
    r.handle(now, Input::RuntimeResult { id, result: listed });
    let outputs = drain(&mut r);
    assert_eq!(outputs, [Output::QueryRuntimeVersion]);
    let at = now + SECOND;
    r.handle(
        at,
        Input::RuntimeVersion {
            result: Ok("4.3.1\n".into()),
        },
    );
    let outputs = drain(&mut r);
    let [Output::Heartbeat(hb)] = &outputs[..] else {
        panic!("{outputs:?}");
    };
    assert_eq!(hb.runtime_version.as_deref(), Some("4.3.1"));
    assert_eq!(r.heartbeat(at), *hb);
    // The same answer again is no news.
    r.handle(
        at,
        Input::RuntimeVersion {
            result: Ok("4.3.1".into()),
        },
    );
    assert_eq!(drain(&mut r), []);
}

#[test]
fn a_version_asked_before_an_outage_is_asked_again_after_it() {
    use podfleet_core::runtime::{RuntimeError, RuntimeReply};
    let mut now = Timestamp::ZERO;
    let mut r = Reconciler::new(config(), None, now);
    let drain = |r: &mut Reconciler| std::iter::from_fn(|| r.poll_output()).collect::<Vec<_>>();
    let list = |outputs: &[Output]| {
        outputs.iter().find_map(|o| match o {
            Output::Runtime {
                id,
                op: RuntimeOp::List,
            } => Some(*id),
            _ => None,
        })
    };
    let asked = |outputs: &[Output]| outputs.contains(&Output::QueryRuntimeVersion);
    let listed = || {
        Ok(RuntimeReply::Listed {
            containers: Vec::new(),
        })
    };
    let id = list(&drain(&mut r)).unwrap();
    r.handle(
        now,
        Input::RuntimeResult {
            id,
            result: listed(),
        },
    );
    assert!(asked(&drain(&mut r)));
    // The runtime goes away before it answers: the tick's list fails.
    now = r.poll_timeout().at.max(now + Duration::from_secs(30));
    r.handle(now, Input::Timeout);
    let id = list(&drain(&mut r)).unwrap();
    let down = RuntimeError::new(RuntimeErrorKind::Unavailable, "connection refused");
    r.handle(
        now,
        Input::RuntimeResult {
            id,
            result: Err(down),
        },
    );
    assert!(!asked(&drain(&mut r)));
    // Back: the retried list answers, but the first ask is still out.
    now = r.poll_timeout().at;
    r.handle(now, Input::Timeout);
    let id = list(&drain(&mut r)).unwrap();
    r.handle(
        now,
        Input::RuntimeResult {
            id,
            result: listed(),
        },
    );
    assert!(!asked(&drain(&mut r)), "one ask at a time");
    // Its answer arrives late: reported, but it may be from before an upgrade.
    r.handle(
        now,
        Input::RuntimeVersion {
            result: Ok("4.3.1".into()),
        },
    );
    assert_eq!(r.heartbeat(now).runtime_version.as_deref(), Some("4.3.1"));
    // So the next list that answers asks again.
    now = now + Duration::from_secs(31);
    r.handle(now, Input::Timeout);
    let id = list(&drain(&mut r)).unwrap();
    r.handle(
        now,
        Input::RuntimeResult {
            id,
            result: listed(),
        },
    );
    assert!(asked(&drain(&mut r)));
    r.handle(
        now,
        Input::RuntimeVersion {
            result: Ok("4.9.0".into()),
        },
    );
    assert_eq!(r.heartbeat(now).runtime_version.as_deref(), Some("4.9.0"));
    // Known now: the next lists do not ask.
    now = now + Duration::from_secs(31);
    r.handle(now, Input::Timeout);
    let id = list(&drain(&mut r)).unwrap();
    r.handle(
        now,
        Input::RuntimeResult {
            id,
            result: listed(),
        },
    );
    assert!(!asked(&drain(&mut r)));
}

#[test]
fn the_runtime_version_is_asked_again_after_the_runtime_comes_back() {
    let mut h = harness();
    assert_eq!(
        h.heartbeats.last().unwrap().runtime_version.as_deref(),
        Some(podfleet_testkit::runtime::FAKE_VERSION)
    );
    // Upgraded while unreachable: the next two lists fail.
    h.runtime.set_version("4.9.0");
    for _ in 0..2 {
        h.faults
            .entry("list")
            .or_default()
            .push_back(OpFault::Fail(RuntimeErrorKind::Unavailable));
    }
    h.run_for(Duration::from_secs(60));
    assert_eq!(h.version_queries, 2, "{}", h.transcript);
    // While unreachable, heartbeats kept the version last stated.
    assert!(h.heartbeats.iter().any(|hb| matches!(
        hb.runtime,
        podfleet_core::wire::RuntimeHealth::Unreachable { .. }
    ) && hb.runtime_version.as_deref()
        == Some(podfleet_testkit::runtime::FAKE_VERSION)));
    let last = h.heartbeats.last().unwrap();
    assert_eq!(last.runtime, podfleet_core::wire::RuntimeHealth::Ok);
    assert_eq!(last.runtime_version.as_deref(), Some("4.9.0"));
}

#[test]
fn a_failed_version_query_is_asked_again_after_the_next_list() {
    let mut h = Harness::new(config());
    h.faults
        .entry("version")
        .or_default()
        .push_back(OpFault::Fail(RuntimeErrorKind::Other));
    h.run_for(SECOND);
    assert_eq!(h.version_queries, 1);
    assert_eq!(h.heartbeats.last().unwrap().runtime_version, None);
    // The runtime's health is not the version query's business.
    assert_eq!(
        h.heartbeats.last().unwrap().runtime,
        podfleet_core::wire::RuntimeHealth::Ok
    );
    // The liveness tick's list, 30 s in.
    h.run_for(Duration::from_secs(40));
    assert_eq!(h.version_queries, 2, "{}", h.transcript);
    assert_eq!(
        h.heartbeats.last().unwrap().runtime_version.as_deref(),
        Some(podfleet_testkit::runtime::FAKE_VERSION)
    );
}

#[test]
fn device_facts_and_the_runtime_version_are_cut_in_heartbeats() {
    let huge = "x".repeat(1_000_000);
    let facts = DeviceFacts {
        arch: huge.clone(),
        os: huge.clone(),
        kernel: huge.clone(),
    };
    let mut h = Harness::new(config().device_facts(facts));
    h.runtime.set_version(&huge);
    h.run_for(SECOND);
    let hb = h.heartbeats.last().unwrap();
    for fact in [&hb.arch, &hb.os, &hb.kernel] {
        assert!(fact.len() <= FACT_MAX_BYTES, "{fact}");
        assert!(fact.ends_with("(1000000 bytes in all)"), "{fact}");
    }
    let version = hb.runtime_version.as_deref().unwrap();
    assert!(version.len() <= FACT_MAX_BYTES, "{version}");
    let bytes = serde_json::to_vec(hb).unwrap().len();
    assert!(bytes < 1024, "{bytes} bytes");
}

#[test]
fn transcript_of_an_upgrade_with_init_containers() {
    let mut h = harness();
    h.runtime
        .set_behaviour("img/m:1", Behaviour::exits(0, SECOND));
    h.runtime
        .set_behaviour("img/m:2", Behaviour::exits(0, SECOND));
    h.runtime.set_behaviour(
        "img/web:1",
        Behaviour {
            stop_delay: Duration::from_secs(2),
            ..Behaviour::default()
        },
    );
    deploy(
        &mut h,
        1,
        &score(
            &[web("img/web:1", "a"), worker()],
            &[init("migrate", "img/m:1", 60)],
        ),
    );
    h.run_for(Duration::from_secs(2));
    deploy(
        &mut h,
        2,
        &score(
            &[web("img/web:2", "a"), worker()],
            &[init("migrate", "img/m:2", 60)],
        ),
    );
    h.run_for(Duration::from_secs(5));
    insta::assert_snapshot!(h.transcript);
}

#[test]
fn transcript_of_a_failing_init_and_its_retries() {
    let mut h = harness();
    h.runtime
        .set_behaviour("img/m:bad", Behaviour::exits(4, SECOND));
    deploy(
        &mut h,
        1,
        &score(
            &[web("img/web:1", "a")],
            &[init("migrate", "img/m:bad", 60)],
        ),
    );
    h.run_for(Duration::from_secs(35));
    insta::assert_snapshot!(h.transcript);
}

#[test]
fn transcript_of_delete() {
    let mut h = harness();
    deploy(&mut h, 1, &score(&[web("img/web:1", "a"), worker()], &[]));
    h.delete("shop", 2);
    h.run_for(SECOND);
    insta::assert_snapshot!(h.transcript);
}

#[test]
fn a_restart_mid_stop_stops_again_instead_of_killing() {
    // Found by the simulator: after a restart the list says "stopping", and
    // the old container was force-removed inside its grace period.
    let mut h = harness();
    h.runtime.set_behaviour(
        "img/web:1",
        Behaviour {
            ignores_stop_signal: true,
            ..Behaviour::default()
        },
    );
    deploy(&mut h, 1, &score(&[web("img/web:1", "a")], &[]));
    let old = running_id(&h, "shop_web");
    let v2 = score(&[web("img/web:1", "b")], &[]);
    h.put("shop", 2, &v2);
    h.run_for(SECOND);
    assert_eq!(
        h.runtime.containers()[&old].state,
        ContainerState::Stopping,
        "{}",
        h.transcript
    );
    h.restart_agent(false);
    h.put("shop", 2, &v2);
    h.resync(&[DeploymentName::new("shop").unwrap()].into());
    let from = h.ops.len();
    h.run_for(Duration::from_secs(20));
    assert!(
        h.violations.is_empty(),
        "{:?}\n{}",
        h.violations,
        h.transcript
    );
    let first_mutation = mutations_since(&h, from).into_iter().next();
    assert_eq!(
        first_mutation,
        Some(RuntimeOp::Stop {
            container: old,
            signal: podfleet_core::wire::Signal::Int,
            grace: Duration::from_secs(5)
        })
    );
    assert_eq!(state(&h, "shop").phase, Phase::Running);
}

#[test]
fn a_resync_clears_the_state_of_deleted_deployments_again() {
    // Found by the simulator: a clear published into a partition, then an
    // agent crash, left the deleted deployment's state in the bucket.
    let mut h = harness();
    deploy(&mut h, 1, &score(&[web("img/web:1", "a")], &[]));
    h.delete("shop", 2);
    h.run_for(Duration::from_secs(10));
    h.restart_agent(true);
    let from = h.transcript.len();
    h.resync(&BTreeSet::new());
    h.run_for(SECOND);
    assert!(
        h.transcript[from..].contains("clear shop"),
        "{}",
        &h.transcript[from..]
    );
    assert!(h.violations.is_empty(), "{:?}", h.violations);
}

#[test]
fn the_same_score_at_a_newer_revision_keeps_the_init_containers_that_ran() {
    // Found by the fuzzer (reconciler target): the operator puts the same
    // bytes again while the rollout's init container runs, and later a
    // service container vanishes. The reconciler rightly runs no init
    // container again for identical bytes; the services it creates carry
    // the newer revision, and the init containers of the older one count.
    let mut h = harness();
    h.runtime
        .set_behaviour("img/m:1", Behaviour::exits(0, Duration::from_secs(2)));
    let json = score(&[web("img/web:1", "a")], &[init("migrate", "img/m:1", 60)]);
    h.put("shop", 3, &json);
    h.run_for(SECOND);
    h.put("shop", 6, &json);
    h.run_for(Duration::from_secs(10));
    let s = state(&h, "shop");
    assert_eq!(
        (s.phase, s.revision.get()),
        (Phase::Running, 6),
        "{}",
        h.transcript
    );
    let id = running_id(&h, "shop_web");
    h.put("shop", 7, &json);
    let from = h.ops.len();
    h.runtime.execute(&RuntimeOp::Remove {
        container: id,
        force: true,
    });
    h.run_for(Duration::from_secs(60));
    running_id(&h, "shop_web");
    let inits_created = mutations_since(&h, from)
        .iter()
        .filter(|op| matches!(op, RuntimeOp::Create { spec } if spec.name == "shop_init_migrate"))
        .count();
    assert_eq!(inits_created, 0, "{}", h.transcript);
    assert!(
        h.violations.is_empty(),
        "{:?}\n{}",
        h.violations,
        h.transcript
    );
}

#[test]
fn an_invalid_put_after_a_delete_keeps_the_tombstone_across_a_restart() {
    // Found analysing a fuzzer crash (reconciler target): an invalid put
    // after a delete lifted the tombstone, the next cache write (for any
    // other deployment) dropped it from disk, and after an agent restart a
    // late redelivery of the deleted revision brought its containers back.
    let mut h = harness();
    let json = score(&[web("img/web:1", "a")], &[]);
    deploy(&mut h, 1, &json);
    h.delete("shop", 2);
    h.run_for(Duration::from_secs(10));
    h.put("shop", 3, "{");
    h.put("other", 4, &score(&[worker()], &[]));
    h.run_for(SECOND);
    assert_eq!(state(&h, "shop").phase, Phase::Failed, "{}", h.transcript);
    h.restart_agent(true);
    h.run_for(SECOND);
    h.put("shop", 1, &json);
    h.run_for(Duration::from_secs(10));
    assert!(h.runtime.by_name("shop_web").is_none(), "{}", h.transcript);
    assert!(
        h.violations.is_empty(),
        "{:?}\n{}",
        h.violations,
        h.transcript
    );
    // A valid revision after the delete does lift it.
    h.put("shop", 5, &json);
    h.run_for(SECOND);
    running_id(&h, "shop_web");
    assert!(
        h.violations.is_empty(),
        "{:?}\n{}",
        h.violations,
        h.transcript
    );
}

#[test]
fn a_container_found_again_after_a_teardown_keeps_the_tombstone() {
    // Found by the property test: a remove during the teardown said "not
    // found" while the container stayed, so the deployment was forgotten;
    // the resync's orphan sweep found the container and tore it down again,
    // and forgetting that orphan (which had seen no revision) lowered the
    // tombstone to 0, so a late redelivery of the deleted revision brought
    // the deployment back.
    let mut h = harness();
    let json = score(&[web("img/web:1", "a")], &[]);
    deploy(&mut h, 1, &json);
    h.faults
        .entry("remove")
        .or_default()
        .push_back(OpFault::Fail(
            podfleet_core::runtime::RuntimeErrorKind::NotFound,
        ));
    h.delete("shop", 2);
    h.run_for(SECOND);
    h.resync(&BTreeSet::new());
    h.run_for(Duration::from_secs(10));
    assert!(h.runtime.by_name("shop_web").is_none(), "{}", h.transcript);
    h.put("shop", 1, &json);
    h.run_for(Duration::from_secs(10));
    assert!(h.runtime.by_name("shop_web").is_none(), "{}", h.transcript);
    assert!(
        h.violations.is_empty(),
        "{:?}\n{}",
        h.violations,
        h.transcript
    );
}

/// Deploys, restarts the agent with the runtime unreachable for its first
/// `unreachable_lists` lists, redelivers the same put, and returns what was
/// published between the restart and the first successful list.
fn restart_with_runtime_down(bugs: Bugs) -> (Harness, Vec<DeploymentState>, String) {
    let mut h = Harness::new(config().inject_bugs(bugs));
    h.run_for(SECOND);
    let json = score(&[web("img/web:1", "a")], &[]);
    deploy(&mut h, 1, &json);
    let id = running_id(&h, "shop_web");
    for _ in 0..5 {
        h.faults.entry("list").or_default().push_back(OpFault::Fail(
            podfleet_core::runtime::RuntimeErrorKind::Unavailable,
        ));
    }
    h.restart_agent(true);
    let from = h.published.len();
    h.put("shop", 1, &json);
    h.run_for(Duration::from_secs(8));
    let early = h.published[from..].iter().map(|(_, s)| s.clone()).collect();
    (h, early, id)
}

#[test]
fn a_restarted_agent_reports_nothing_until_it_has_listed_the_runtime() {
    // Issue 10, bug 1: every restart published `failed` (crash_loop, 0
    // restarts) for healthy deployments before the first list, and kept it
    // published for as long as podman was unreachable.
    let (mut h, early, id) = restart_with_runtime_down(Bugs::default());
    assert!(early.is_empty(), "{early:?}\n{}", h.transcript);
    assert!(matches!(
        h.heartbeats.last().map(|hb| &hb.runtime),
        Some(podfleet_core::wire::RuntimeHealth::Unreachable { .. })
    ));
    h.run_for(Duration::from_secs(60));
    let s = state(&h, "shop");
    assert_eq!(
        (s.phase, s.revision.get()),
        (Phase::Running, 1),
        "{}",
        h.transcript
    );
    assert_eq!(s.container_ids["web"], id);
    assert_eq!(s.attempt, 1, "the attempt survives the restart");
    assert!(h.published.iter().all(|(_, s)| s.phase != Phase::Failed));
    assert!(h.violations.is_empty(), "{:?}", h.violations);
}

#[test]
fn the_restart_report_check_bites() {
    let (h, early, _) = restart_with_runtime_down(Bugs {
        report_before_observing: true,
        ..Bugs::default()
    });
    assert!(
        early
            .iter()
            .any(|s| matches!(s.cause, Some(FailureCause::CrashLoop { .. }))),
        "{early:?}\n{}",
        h.transcript
    );
}

#[test]
fn a_huge_invalid_value_is_quoted_bounded_in_its_report() {
    // Issue 10, bug 2: a 1,000,000-character service name was quoted twice
    // in the failure report, 2 MB, over the broker's size limit.
    let mut h = harness();
    let name = "w".repeat(1_000_000);
    h.put(
        "shop",
        1,
        &format!(r#"{{"services":[{{"name":"{name}","image":"img/web:1"}}]}}"#),
    );
    h.run_for(SECOND);
    let s = state(&h, "shop");
    assert_eq!(s.phase, Phase::Failed);
    let bytes = serde_json::to_vec(&s).unwrap().len();
    assert!(bytes < 4096, "{bytes} bytes: {}", s.message);
    assert!(s.message.contains("(1000000 bytes)"), "{}", s.message);
    assert!(matches!(s.cause, Some(FailureCause::InvalidScore { .. })));
}

#[test]
fn long_runtime_errors_are_cut_in_reports() {
    use podfleet_core::runtime::{ImageInfo, RuntimeError, RuntimeErrorKind, RuntimeReply};
    let now = Timestamp::ZERO;
    let mut r = Reconciler::new(config().image_gc(no_gc()), None, now);
    let listed = || {
        Ok(RuntimeReply::Listed {
            containers: Vec::new(),
        })
    };
    let next_op = |r: &mut Reconciler| loop {
        match r.poll_output().expect("an operation is due") {
            Output::Runtime { id, op } => break (id, op),
            _ => continue,
        }
    };
    let (id, _) = next_op(&mut r);
    r.handle(
        now,
        Input::RuntimeResult {
            id,
            result: listed(),
        },
    );
    let name = DeploymentName::new("shop").unwrap();
    let json = score(&[web("img/web:1", "a")], &[]);
    r.handle(
        now,
        Input::DesiredPut {
            deployment: name.clone(),
            revision: Revision::new(1),
            value: json.as_bytes(),
        },
    );
    let (id, op) = next_op(&mut r);
    assert_eq!(op, RuntimeOp::List);
    r.handle(
        now,
        Input::RuntimeResult {
            id,
            result: listed(),
        },
    );
    let (id, op) = next_op(&mut r);
    assert!(matches!(op, RuntimeOp::InspectImage { .. }), "{op:?}");
    r.handle(
        now,
        Input::RuntimeResult {
            id,
            result: Ok(RuntimeReply::ImageInspected {
                image: Some(ImageInfo {
                    id: "sha256:1".into(),
                    digest: None,
                }),
            }),
        },
    );
    let (id, op) = next_op(&mut r);
    assert!(matches!(op, RuntimeOp::Create { .. }), "{op:?}");
    let error = RuntimeError::new(RuntimeErrorKind::Other, "e".repeat(100_000));
    r.handle(
        now,
        Input::RuntimeResult {
            id,
            result: Err(error),
        },
    );
    let s = r.deployment_state(&name).expect("a state").clone();
    assert_eq!(s.phase, Phase::Failed, "{s:?}");
    assert!(serde_json::to_vec(&s).unwrap().len() < 4 * podfleet_core::wire::text::TEXT_MAX_BYTES);
    let Some(FailureCause::Runtime { error, .. }) = &s.cause else {
        panic!("{s:?}");
    };
    assert!(error.ends_with("(100000 bytes in all)"), "{error}");
}

#[test]
fn the_same_spec_at_a_newer_revision_reports_running_once_and_says_so() {
    // Issue 10: a re-put of the same content published `pending`, then
    // `running` claiming "1 init container completed" although none ran.
    let mut h = harness();
    h.runtime
        .set_behaviour("img/m:1", Behaviour::exits(0, SECOND));
    let json = score(&[web("img/web:1", "a")], &[init("migrate", "img/m:1", 60)]);
    deploy(&mut h, 1, &json);
    h.run_for(Duration::from_secs(3));
    assert_eq!(state(&h, "shop").phase, Phase::Running, "{}", h.transcript);
    let (from_ops, from_published) = (h.ops.len(), h.published.len());
    // The same score, written with other white space.
    h.put("shop", 2, &format!("  {json}\n"));
    h.run_for(Duration::from_secs(40));
    assert!(mutations_since(&h, from_ops).is_empty(), "{}", h.transcript);
    let since: Vec<&DeploymentState> = h.published[from_published..]
        .iter()
        .map(|(_, s)| s)
        .collect();
    assert_eq!(since.len(), 1, "{since:?}");
    assert_eq!(
        (since[0].phase, since[0].revision.get()),
        (Phase::Running, 2)
    );
    assert_eq!(
        since[0].message,
        "1 init container completed, 1 service running (spec unchanged since revision 1)"
    );
    // A service recreated now carries revision 2, whose init containers are
    // the ones that ran at revision 1: no init container runs again, and
    // the oracle agrees.
    let id = running_id(&h, "shop_web");
    let from = h.ops.len();
    let _ = h.runtime.execute(&RuntimeOp::Remove {
        container: id,
        force: true,
    });
    h.run_for(Duration::from_secs(60));
    running_id(&h, "shop_web");
    assert!(
        !mutations_since(&h, from)
            .iter()
            .any(|op| matches!(op, RuntimeOp::Create { spec } if spec.name == "shop_init_migrate")),
        "{}",
        h.transcript
    );
    assert!(
        h.violations.is_empty(),
        "{:?}\n{}",
        h.violations,
        h.transcript
    );
}

#[test]
fn an_init_container_left_by_a_crash_is_removed_even_with_nothing_to_roll_out() {
    // Found by the simulator's "none is left behind" check: the agent died
    // while an init container ran, came back without its cache, and the
    // newest desired value was invalid, so no rollout ever cleaned up.
    let mut h = harness();
    h.runtime
        .set_behaviour("img/m:1", Behaviour::exits(0, Duration::from_secs(20)));
    h.put(
        "shop",
        1,
        &score(&[web("img/web:1", "a")], &[init("migrate", "img/m:1", 60)]),
    );
    h.run_for(Duration::from_secs(2));
    assert!(h.runtime.by_name("shop_init_migrate").is_some());
    h.restart_agent(false);
    h.put("shop", 2, r#"{"services":[{"name":"a.b","image":"x"}]}"#);
    h.run_for(Duration::from_secs(60));
    assert!(
        h.runtime.by_name("shop_init_migrate").is_none(),
        "{}",
        h.transcript
    );
    assert_eq!(state(&h, "shop").phase, Phase::Failed);
    assert!(h.violations.is_empty(), "{:?}", h.violations);
}
