//! `cargo test -p sim`: a default batch of seeds, the determinism check, and
//! proof that the invariant checks catch deliberate bugs.
//! `SIM_SEEDS=N` runs more seeds; `SIM_SEED=S` runs one and prints its trace.

use podfleet_core::reconciler::Bugs;

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
            println!("{}", outcome.transcript);
        }
        if !outcome.violations.is_empty() {
            let tail: Vec<&str> = outcome.transcript.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
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
                .transcript
                .lines()
                .zip(b.transcript.lines())
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            panic!(
                "seed {seed} diverged at event {first}:\n  {:?}\n  {:?}",
                a.transcript.lines().nth(first),
                b.transcript.lines().nth(first)
            );
        }
    }
}

/// Each deliberate bug, and the invariant whose check must report it.
pub const BITES: [(&str, Bugs, &str); 6] = [
    (
        "recreate_on_tick",
        Bugs {
            recreate_on_tick: true,
            ..NO_BUGS
        },
        "healthy container recreated",
    ),
    (
        "revert_on_failure",
        Bugs {
            revert_on_failure: true,
            ..NO_BUGS
        },
        "no revert",
    ),
    (
        "skip_init_containers",
        Bugs {
            skip_init_containers: true,
            ..NO_BUGS
        },
        "init containers first",
    ),
    (
        "skip_graceful_stop",
        Bugs {
            skip_graceful_stop: true,
            ..NO_BUGS
        },
        "graceful replace",
    ),
    (
        "create_before_remove",
        Bugs {
            create_before_remove: true,
            ..NO_BUGS
        },
        "containers for service",
    ),
    (
        "report_running_early",
        Bugs {
            report_running_early: true,
            ..NO_BUGS
        },
        "truthful reports",
    ),
];

const NO_BUGS: Bugs = Bugs {
    recreate_on_tick: false,
    revert_on_failure: false,
    skip_init_containers: false,
    skip_graceful_stop: false,
    create_before_remove: false,
    report_running_early: false,
};

#[test]
fn every_invariant_bites_its_bug() {
    for (name, bug, invariant) in BITES {
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
