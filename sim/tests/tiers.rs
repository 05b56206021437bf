//! The network tiers: the production agent loop, on turmoil and on the
//! discrete-event fleet tier, against the fake broker, the fake runtime and
//! seeded fault plans.
//!
//! `SIM_SEEDS=N` runs N seeds per tier, `SIM_SEED=S` runs one and prints its
//! trace, `SIM_TIER=turmoil|events` picks one tier, `SIM_DEVICES=N` sets the
//! devices per run.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Mutex;

use podfleet_testkit::Invariant;
use sim::plan::{Action, Plan, Step};
use sim::tiers::Switches;
use sim::world::Outcome;
use sim::Tier;

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.parse().ok()
}

fn wanted(tier: Tier) -> bool {
    std::env::var("SIM_TIER").map_or(true, |t| t == tier.name())
}

/// Runs `seeds` on `tier` two at a time; the outcomes come back in seed order.
fn run_all(tier: Tier, seeds: &[u64], devices: u32, switches: Switches) -> Vec<(Plan, Outcome)> {
    let results = Mutex::new(BTreeMap::new());
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(&seed) = seeds.get(i) else { break };
                let plan = Plan::generate(seed, devices);
                let outcome = sim::run(tier, &plan, switches);
                results.lock().unwrap().insert(i, (plan, outcome));
            });
        }
    });
    results.into_inner().unwrap().into_values().collect()
}

fn batch(tier: Tier, default: u64) {
    if !wanted(tier) {
        return;
    }
    let one = env::<u64>("SIM_SEED");
    let seeds: Vec<u64> = match one {
        Some(s) => vec![s],
        None => (0..env("SIM_SEEDS").unwrap_or(default)).collect(),
    };
    let switches = Switches {
        keep_trace: one.is_some(),
        ..Switches::default()
    };
    let devices = env("SIM_DEVICES").unwrap_or(2);
    let mut failures = Vec::new();
    let mut outcomes = Vec::new();
    for (plan, outcome) in run_all(tier, &seeds, devices, switches) {
        if one.is_some() {
            println!("{}", outcome.trace.join("\n"));
        }
        if !outcome.violations.is_empty() {
            failures.push(sim::failure_report(tier, &plan, &outcome, switches));
        }
        outcomes.push(outcome);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    if one.is_none() {
        let missed = sim::missed_probes(tier, &outcomes);
        assert!(
            missed.is_empty(),
            "the {} batch never reached {missed:?}: the simulator stopped exploring them",
            tier.name()
        );
    }
}

#[test]
fn turmoil_batch_keeps_every_invariant_and_reaches_every_probe() {
    batch(Tier::Turmoil, 32);
}

#[test]
fn events_batch_keeps_every_invariant_and_reaches_every_probe() {
    batch(Tier::Events, 128);
}

#[test]
fn same_plan_same_trace() {
    let keep = Switches {
        keep_trace: true,
        ..Switches::default()
    };
    for (tier, seeds) in [(Tier::Turmoil, 3u64), (Tier::Events, 8)] {
        for seed in 0..seeds {
            let plan = Plan::generate(seed, 2);
            let a = sim::run(tier, &plan, keep);
            let b = sim::run(tier, &plan, keep);
            if a.trace_hash != b.trace_hash {
                let first = a
                    .trace
                    .iter()
                    .zip(&b.trace)
                    .position(|(x, y)| x != y)
                    .unwrap_or(a.trace.len().min(b.trace.len()));
                panic!(
                    "{} seed {seed} diverged at event {first}:\n  first run:  {:?}\n  second run: {:?}",
                    tier.name(),
                    a.trace.get(first),
                    b.trace.get(first)
                );
            }
            assert!(a.events > 100, "a run traces its events");
        }
    }
}

/// The first seed below `limit` whose run reports `invariant`.
fn caught(tier: Tier, switches: Switches, invariant: Invariant, limit: u64) -> Option<u64> {
    (0..limit).find(|&seed| {
        sim::run(tier, &Plan::generate(seed, 2), switches)
            .violations
            .iter()
            .any(|v| v.invariant == invariant)
    })
}

#[test]
fn every_invariant_bites_through_the_real_agent_loop() {
    for (name, bugs, invariant) in sim::BITES.into_iter().chain(sim::LOOP_BITES) {
        let switches = Switches {
            bugs,
            ..Switches::default()
        };
        assert!(
            caught(Tier::Events, switches, invariant, 60).is_some(),
            "the events tier did not report bug {name} as {invariant:?} in 60 seeds"
        );
    }
    let wrong_adapter = Switches {
        watch_everyone: true,
        ..Switches::default()
    };
    assert!(
        caught(Tier::Turmoil, wrong_adapter, Invariant::Isolation, 2).is_some(),
        "an agent watching every device's keys went unnoticed"
    );
}

fn step(at_s: u64, action: Action) -> Step {
    Step {
        at_ms: at_s * 1000,
        action,
    }
}

#[test]
fn a_partitioned_device_keeps_running_its_last_applied_state() {
    let web =
        r#"{"services":[{"name":"web","image":"img/app:1"},{"name":"db","image":"img/app:1"}]}"#;
    let hours = 2 * 3600;
    let plan = Plan {
        seed: 1,
        devices: 1,
        rates: Plan::generate(1, 1).rates,
        steps: vec![
            step(
                2,
                Action::Put {
                    device: 0,
                    deployment: "shop".into(),
                    json: web.into(),
                },
            ),
            step(
                60,
                Action::Partition {
                    device: 0,
                    for_ms: hours * 1000,
                },
            ),
            step(
                605,
                Action::Crash {
                    device: 0,
                    container: "shop_web".into(),
                    code: 1,
                },
            ),
            step(
                900,
                Action::AgentCrash {
                    device: 0,
                    keep_cache: true,
                    down_ms: 5_000,
                },
            ),
        ],
        heal_at_ms: hours * 1000,
        ..Plan::generate(1, 1)
    };
    let outcome = sim::run(
        Tier::Turmoil,
        &plan,
        Switches {
            keep_trace: true,
            ..Switches::default()
        },
    );
    assert!(outcome.violations.is_empty(), "{:?}", outcome.violations);
    let offline: Vec<&String> = outcome
        .trace
        .iter()
        .filter(|l| {
            let t: f64 = l.trim_start().split('s').next().unwrap().parse().unwrap();
            t >= 605.0 && t < (hours as f64)
        })
        .collect();
    assert!(
        offline
            .iter()
            .any(|l| l.contains("dev-0") && l.contains("-> start")),
        "the crashed container was restarted while the device was offline:\n{offline:#?}"
    );
    assert!(
        !offline
            .iter()
            .any(|l| l.contains("-> stop") || l.contains("-> remove") || l.contains("-> create")),
        "nothing was stopped or recreated while offline, not even after the agent restarted"
    );
}

#[test]
fn shrinking_keeps_the_failure_and_drops_the_rest() {
    let switches = Switches {
        bugs: sim::BITES[0].1,
        ..Switches::default()
    };
    let seed = caught(Tier::Events, switches, sim::BITES[0].2, 40).unwrap();
    let plan = Plan::generate(seed, 2);
    let (small, outcome) = sim::world::shrink(&plan, |p| sim::run(Tier::Events, p, switches), 80);
    assert!(
        outcome
            .violations
            .iter()
            .any(|v| v.invariant == sim::BITES[0].2),
        "{:?}",
        outcome.violations
    );
    assert!(
        small.steps.len() < plan.steps.len(),
        "{} steps still {}",
        plan.steps.len(),
        small.steps.len()
    );
    assert_eq!(
        Plan::from_json(&small.to_json()).unwrap(),
        small,
        "the minimal plan replays from its JSON"
    );
}
