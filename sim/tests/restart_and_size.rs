//! Issue 10's two agent bugs, as simulator faults and regressions:
//!
//! - an agent restart into a slow or unavailable runtime: the agent used to
//!   publish states (a crash loop for every service it had not seen yet)
//!   before it had listed the runtime: "truthful reports";
//! - an invalid score whose error quotes a huge service name: the report
//!   quoting it in full was over the broker's size limit, refused
//!   forever, and retried ahead of every other deployment's report:
//!   "truthful reports" and "liveness". The agent now quotes values cut,
//!   and a report that cannot be published waits behind no other.
//!
//! Both faults are drawn by every generated plan; these tests pin one plan
//! each, prove the faults do what they say, and keep the invariants.
#![allow(clippy::unwrap_used)]

use podfleet_core::reconciler::Bugs;
use podfleet_testkit::Invariant;
use sim::plan::{wide_score, Action, Plan, RuntimeTrouble, Step, WIDE_STATE_LIMIT};
use sim::tiers::Switches;
use sim::world::Outcome;
use sim::Tier;

fn step(at_s: u64, action: Action) -> Step {
    Step {
        at_ms: at_s * 1000,
        action,
    }
}

fn put(at_s: u64, deployment: &str, env: u32) -> Step {
    step(
        at_s,
        Action::Put {
            device: 0,
            deployment: deployment.into(),
            json: format!(
                r#"{{"services":[{{"name":"web","image":"img/app:1","env":{{"V":"{env}"}}}}]}}"#
            ),
        },
    )
}

/// A normal deployment, an oversized score beside it, then an edit of the
/// normal one, on a broker whose payload limit is 32 KiB.
fn oversized() -> Plan {
    Plan {
        seed: 1,
        devices: 1,
        steps: vec![
            put(2, "shop", 1),
            step(
                3,
                Action::PutOversized {
                    device: 0,
                    deployment: "cam".into(),
                    name_bytes: 20_000,
                },
            ),
            put(60, "shop", 2),
        ],
        heal_at_ms: 120_000,
        max_payload: 32 * 1024,
        ..Plan::generate(1, 1)
    }
}

/// A deployment, then an agent restart into a runtime in `trouble`.
fn restart_into(trouble: RuntimeTrouble) -> Plan {
    Plan {
        seed: 1,
        devices: 1,
        steps: vec![
            put(2, "shop", 1),
            step(
                30,
                Action::AgentRestartTrouble {
                    device: 0,
                    keep_cache: true,
                    down_ms: 2_000,
                    for_ms: 30_000,
                    trouble,
                },
            ),
        ],
        heal_at_ms: 120_000,
        ..Plan::generate(1, 1)
    }
}

fn run(plan: &Plan) -> Outcome {
    sim::run(Tier::Events, plan, Switches::default())
}

#[test]
fn the_faults_do_what_they_say() {
    let outcome = run(&oversized());
    assert!(
        outcome.probes.get("oversized value quoted cut") > Some(&0),
        "{:?}",
        outcome.probes
    );
    assert!(
        !outcome
            .violations
            .iter()
            .any(|v| v.invariant == Invariant::Isolation),
        "a refusal over the payload limit is no isolation violation: {:?}",
        outcome.violations
    );
    for (trouble, probe) in [
        (
            RuntimeTrouble::Unavailable,
            "agent restarted into an unavailable runtime",
        ),
        (
            RuntimeTrouble::Slow { delay_ms: 4_000 },
            "agent restarted into a slow runtime",
        ),
    ] {
        let outcome = run(&restart_into(trouble));
        assert!(outcome.probes.get(probe) > Some(&0), "{:?}", outcome.probes);
        assert!(outcome
            .faults
            .keys()
            .any(|k| k.starts_with("agent restart, ")));
    }
}

#[test]
fn an_oversized_value_neither_blocks_the_others_nor_goes_missing() {
    let outcome = run(&oversized());
    assert!(outcome.violations.is_empty(), "{:#?}", outcome.violations);
}

#[test]
fn after_a_restart_reports_wait_for_the_runtime() {
    for trouble in [
        RuntimeTrouble::Unavailable,
        RuntimeTrouble::Slow { delay_ms: 4_000 },
    ] {
        let outcome = run(&restart_into(trouble));
        assert!(
            outcome.violations.is_empty(),
            "{trouble:?}: {:#?}",
            outcome.violations
        );
    }
}

/// Runs `plan` on the events tier with `bugs` on and requires a violation
/// of `invariant` naming `words`.
fn assert_bites(plan: &Plan, bugs: Bugs, invariant: Invariant, words: &str) {
    let switches = Switches {
        bugs,
        ..Switches::default()
    };
    let outcome = sim::run(Tier::Events, plan, switches);
    assert!(
        outcome
            .violations
            .iter()
            .any(|v| v.invariant == invariant && v.detail.contains(words)),
        "{:#?}",
        outcome.violations
    );
}

#[test]
fn the_restart_check_bites() {
    let bugs = Bugs {
        report_before_observing: true,
        ..sim::NO_BUGS
    };
    let plan = restart_into(RuntimeTrouble::Unavailable);
    assert_bites(&plan, bugs, Invariant::TruthfulReports, "before the agent");
}

/// Three deployments on a state bucket whose values are limited to
/// [`WIDE_STATE_LIMIT`]: `cam`, sorting first, is wide, so its Running
/// report is over the limit; `relay` and `shop` sort after it.
fn wide() -> Plan {
    Plan {
        seed: 1,
        devices: 1,
        steps: vec![
            step(
                2,
                Action::Put {
                    device: 0,
                    deployment: "cam".into(),
                    json: wide_score(40),
                },
            ),
            put(3, "relay", 1),
            put(4, "shop", 1),
            put(60, "shop", 2),
        ],
        heal_at_ms: 120_000,
        state_max_value: Some(WIDE_STATE_LIMIT),
        ..Plan::generate(1, 1)
    }
}

#[test]
fn a_report_over_the_buckets_limit_is_summarised_and_holds_up_nobody() {
    let outcome = run(&wide());
    assert!(outcome.violations.is_empty(), "{:#?}", outcome.violations);
    assert!(
        outcome.probes.get("report summarised") > Some(&0),
        "{:?}",
        outcome.probes
    );
}

#[test]
fn the_head_of_line_check_bites() {
    let bugs = Bugs {
        head_of_line_reports: true,
        ..sim::NO_BUGS
    };
    assert_bites(&wide(), bugs, Invariant::Liveness, "");
}
