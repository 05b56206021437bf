//! `cargo test -p sim`: a default batch of seeds, the determinism check, and
//! proof that the invariant checks catch deliberate bugs.
//! `SIM_SEEDS=N` runs more seeds; `SIM_SEED=S` runs one and prints its trace.

fn seeds() -> std::ops::Range<u64> {
    if let Some(one) = std::env::var("SIM_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        return one..one + 1;
    }
    let n = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    0..n
}

#[test]
fn default_batch_keeps_every_invariant() {
    let trace = std::env::var("SIM_SEED").is_ok();
    let mut failed = Vec::new();
    for seed in seeds() {
        let outcome = sim::run_seed(seed);
        if trace {
            println!("{}", outcome.trace.join("\n"));
        }
        if !outcome.violations.is_empty() {
            let tail = &outcome.trace[outcome.trace.len().saturating_sub(40)..];
            failed.push(format!(
                "seed {seed}: {:?}\nlast events:\n{}\nreplay: SIM_SEED={seed} cargo test -p sim -- --nocapture",
                outcome.violations,
                tail.join("\n")
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
                .any(|v| v.contains(invariant))
        });
        assert!(
            caught.is_some(),
            "the simulator did not report bug {name} as {invariant:?} in 200 seeds"
        );
    }
}
