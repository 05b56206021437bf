//! Every replay command a failure report prints reproduces the failure: a
//! run made to fail by a deliberate bug is reported, each command's
//! parameters are read back from the report and run through the entry
//! points the commands use (the runner's [`sim::cli::Args`] and the test
//! batch's [`sim::cli::EnvBatch`]), and the same plan fails with the same
//! invariant.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use podfleet_testkit::Invariant;
use sim::cli::{run_plans, Args, EnvBatch};
use sim::plan::Plan;
use sim::tiers::Switches;
use sim::world::Outcome;
use sim::Tier;

/// The commands a report prints.
fn commands(report: &str) -> Vec<String> {
    report
        .lines()
        .filter_map(|l| {
            l.strip_prefix("replay: ")
                .or_else(|| l.strip_prefix("   or: "))
        })
        .map(str::to_owned)
        .collect()
}

/// Runs one printed command through the entry point it names.
fn rerun(command: &str) -> (Tier, Vec<Plan>, Vec<Outcome>) {
    if let Some((_, args)) = command.split_once("cargo run --release -p sim -- ") {
        let args = Args::parse(args.split_whitespace().map(str::to_owned)).unwrap();
        let plans = args.plans().unwrap();
        let outcomes = run_plans(args.tier, &plans, args.switches, 1, |_| {});
        return (args.tier, plans, outcomes);
    }
    let (env, test) = command.split_once(" cargo test ").unwrap();
    assert!(
        test.starts_with("-p sim --test seeds"),
        "the batch that reads the environment: {command}"
    );
    let env: BTreeMap<String, String> = env
        .split_whitespace()
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let batch = EnvBatch::from_env(|name| env.get(name).cloned()).unwrap();
    let plans = batch.plans().unwrap();
    let outcomes = run_plans(batch.tier, &plans, batch.switches, 1, |_| {});
    (batch.tier, plans, outcomes)
}

/// Reports `plan`'s failure on `tier`, replays every command of the
/// report, and checks each fails the same way.
fn replays(tier: Tier, plan: &Plan, switches: Switches, invariant: Invariant) {
    let outcome = sim::run(tier, plan, switches);
    assert!(
        outcome.violations.iter().any(|v| v.invariant == invariant),
        "{} seed {} does not fail with {invariant:?}: {:?}",
        tier.name(),
        plan.seed,
        outcome.violations
    );
    let report = sim::failure_report(tier, plan, &outcome, switches);
    if let Some(line) = report
        .lines()
        .find(|l| l.starts_with("this plan is not what its seed expands to"))
    {
        // The plan as printed is the one to save.
        let path = line.rsplit(' ').next().unwrap();
        let json = &report
            [report.find("fault plan:\n").unwrap() + 12..report.find("\nlast events:").unwrap()];
        std::fs::write(path, json).unwrap();
    }
    let commands = commands(&report);
    assert_eq!(commands.len(), 2, "{report}");
    for command in &commands {
        let (replayed_tier, plans, outcomes) = rerun(command);
        assert_eq!(replayed_tier, tier, "{command}");
        if tier != Tier::Discrete {
            assert_eq!(
                plans,
                std::slice::from_ref(plan),
                "{command} replays another plan"
            );
        }
        assert_eq!(
            outcomes[0].violations, outcome.violations,
            "{command} does not reproduce the report"
        );
        assert_eq!(outcomes[0].trace_hash, outcome.trace_hash, "{command}");
    }
}

#[test]
fn every_replay_command_reproduces_its_report_on_every_tier() {
    let (name, bugs, invariant) = sim::BITES[0];
    let switches = Switches {
        bugs,
        ..Switches::default()
    };
    for tier in [Tier::Discrete, Tier::Events, Tier::Turmoil] {
        let plan = Plan::generate(1, 2);
        replays(tier, &plan, switches, invariant);
    }
    // On one device.
    replays(Tier::Events, &Plan::generate(3, 1), switches, invariant);
    // A plan that its seed does not expand to (a shrunk one, say) is
    // replayed from the file the report asks for it to be saved in.
    let mut shrunk = Plan::generate(1, 2);
    shrunk.steps.truncate(shrunk.steps.len() / 2);
    replays(Tier::Events, &shrunk, switches, invariant);
    assert!(sim::cli::switch_names(switches) == [name]);
}

#[test]
fn a_large_batch_that_misses_a_probe_says_so() {
    let outcome = sim::run(Tier::Events, &Plan::generate(0, 2), Switches::default());
    let missed = sim::missed_probes(Tier::Events, std::slice::from_ref(&outcome));
    assert!(!missed.is_empty(), "one seed reaches every probe?");
    let table = sim::summary_table(
        Tier::Events,
        2,
        std::slice::from_ref(&outcome),
        std::time::Duration::from_secs(1),
    );
    assert!(
        table.contains(&format!("missed probes          {} ", missed.len())),
        "{table}"
    );
    assert!(sim::missed_probes(Tier::Discrete, &[outcome]).is_empty());
}
