//! "Never give up" is a promise over unbounded time. These runs keep a
//! crash loop and a failing revision going for two simulated days on the
//! events tier (cheap: an idle device costs nothing between its deadlines)
//! and check that the attempts keep coming at the capped interval.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use podfleet_core::runtime::{init_container_name, service_container_name};
use podfleet_core::time::Timestamp;
use podfleet_core::wire::Phase;
use podfleet_testkit::RuntimeEvent;
use sim::plan::{Action, Plan, Step};
use sim::tiers::{run_events_with, Switches};

/// Both backoffs' cap (`Config::new`): restarts and retries every 5 min.
const CAP: Duration = Duration::from_secs(300);
/// The liveness tick: an exit is noticed within one.
const TICK: Duration = Duration::from_secs(30);
/// Runtime latency, rounding.
const SLACK: Duration = Duration::from_secs(5);
const DAYS: u64 = 2;

/// The gaps between consecutive instants, in order.
fn gaps(at: &[Timestamp]) -> Vec<Duration> {
    at.windows(2).map(|w| w[1].saturating_since(w[0])).collect()
}

#[test]
fn a_crash_loop_and_a_failing_revision_are_retried_at_the_cap_for_days() {
    let horizon = DAYS * 24 * 3600 * 1000;
    let put = |at_ms, deployment: &str, json: &str| Step {
        at_ms,
        action: Action::Put {
            device: 0,
            deployment: deployment.into(),
            json: json.into(),
        },
    };
    let plan = Plan {
        seed: 0,
        devices: 1,
        steps: vec![
            // Its only service exits with code 1 twenty seconds after every start.
            put(
                2_000,
                "cam",
                r#"{"services":[{"name":"web","image":"img/crashloop:1"}]}"#,
            ),
            // Its init container exits with code 5 at every attempt.
            put(
                3_000,
                "shop",
                r#"{"services":[{"name":"web","image":"img/app:1"}],"init_containers":[{"name":"bad","image":"img/init-fail:1","timeout":5}]}"#,
            ),
            put(
                4_000,
                "relay",
                r#"{"services":[{"name":"web","image":"img/app:1"}]}"#,
            ),
        ],
        heal_at_ms: horizon,
        ..Plan::generate(0, 1)
    };
    let mut starts = Vec::new();
    let mut inits = Vec::new();
    let mut reports = None;
    let outcome = run_events_with(&plan, Switches::default(), |shared| {
        let device = &shared.devices[0];
        device.fake.with(|f| {
            let crashing = service_container_name("cam", "web");
            let init = init_container_name("shop", "bad");
            let mut names = std::collections::BTreeMap::new();
            for (at, event) in f.events() {
                match event {
                    RuntimeEvent::Created { id, spec } => {
                        names.insert(id.clone(), spec.name.clone());
                        if spec.name == init {
                            inits.push(*at);
                        }
                    }
                    RuntimeEvent::Started { id } if names.get(id) == Some(&crashing) => {
                        starts.push(*at);
                    }
                    _ => {}
                }
            }
        });
        reports = Some(device.published());
    });
    assert!(
        outcome.violations.is_empty(),
        "{:?}\n{}",
        outcome.violations,
        outcome.trace.join("\n")
    );
    let end = Timestamp::from_millis(horizon);
    let warm = Timestamp::from_millis(3_600_000);
    for (what, at) in [
        ("restarts of cam/web", &starts),
        ("attempts at shop", &inits),
    ] {
        let settled: Vec<Timestamp> = at.iter().copied().filter(|t| *t >= warm).collect();
        let expected = (DAYS * 24 * 3600 - 3600) / CAP.as_secs();
        assert!(
            settled.len() as u64 >= expected - 2,
            "{what}: {} in the last {DAYS} days less an hour, expected about {expected}",
            settled.len()
        );
        assert!(
            settled
                .last()
                .is_some_and(|t| *t + CAP + TICK + SLACK >= end),
            "{what}: the last one was at {:?}, long before {end}: they stopped",
            settled.last()
        );
        for (i, gap) in gaps(&settled).into_iter().enumerate() {
            assert!(
                gap >= CAP && gap <= CAP + TICK + SLACK,
                "{what}: gap {i} after an hour is {gap:?}, not at the {CAP:?} cap (+ a tick)"
            );
        }
    }
    let reports = reports.unwrap();
    let shop = &reports["shop"];
    assert!(
        u64::from(shop.attempt) >= (DAYS * 24 * 3600) / CAP.as_secs() - 10,
        "the failing revision's reports stopped counting attempts: {shop:?}"
    );
    assert_eq!(reports["relay"].phase, Phase::Running, "{reports:?}");
}
