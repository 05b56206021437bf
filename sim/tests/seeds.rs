//! `cargo test -p sim`: a default batch of seeds, the determinism check, and
//! proof that the invariant checks catch deliberate bugs.
//!
//! The batch reads its environment through [`sim::cli::EnvBatch`], the
//! same code every replay command of a failure report goes through:
//! `SIM_SEEDS=N` runs more seeds, `SIM_SEED=S` runs one and prints its
//! trace, `SIM_TIER=turmoil|events|discrete` picks the tier (discrete when
//! unset), `SIM_DEVICES=N` the devices,
//! `SIM_PLAN=FILE` replays a saved plan and `SIM_BUG=NAME` switches on a
//! deliberate bug.

#[test]
fn default_batch_keeps_every_invariant() {
    let batch = sim::cli::EnvBatch::from_env(|name| std::env::var(name).ok())
        .unwrap_or_else(|problem| panic!("{problem}"));
    let plans = batch.plans().unwrap_or_else(|problem| panic!("{problem}"));
    let outcomes = sim::cli::run_plans(batch.tier, &plans, batch.switches, 2, |_| {});
    let mut failed = Vec::new();
    for (plan, outcome) in plans.iter().zip(&outcomes) {
        if batch.switches.keep_trace {
            println!("{}", outcome.trace.join("\n"));
        }
        if !outcome.violations.is_empty() {
            failed.push(sim::failure_report(
                batch.tier,
                plan,
                outcome,
                batch.switches,
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}

#[test]
fn same_seed_same_trace() {
    for seed in 0..40 {
        let a = sim::run_seed(seed);
        let b = sim::run_seed(seed);
        if a.trace_hash != b.trace_hash {
            let first = a
                .trace
                .iter()
                .zip(&b.trace)
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            panic!(
                "seed {seed} diverged at event {first}:\n  {:?}\n  {:?}",
                a.trace.get(first),
                b.trace.get(first)
            );
        }
    }
}

#[test]
fn every_invariant_bites_its_bug() {
    for (name, bug, invariant) in sim::BITES {
        let caught = (0..200).find(|&seed| {
            sim::run_seed_with_bugs(seed, bug)
                .violations
                .iter()
                .any(|v| v.invariant == invariant)
        });
        assert!(
            caught.is_some(),
            "the simulator did not report bug {name} as {invariant:?} in 200 seeds"
        );
    }
}
