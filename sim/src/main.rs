//! `cargo run -p sim -- --seeds A..B`: runs seeds and prints a summary;
//! `--seed S --trace` prints one seed's readable trace.

use std::process::ExitCode;
use std::time::Instant;

fn parse_range(text: &str) -> Option<std::ops::Range<u64>> {
    let (a, b) = text.split_once("..")?;
    Some(a.parse().ok()?..b.parse().ok()?)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seeds = 0..8;
    let mut trace = false;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--seeds" => match args.get(i + 1).and_then(|a| parse_range(a)) {
                Some(range) => {
                    seeds = range;
                    i += 1;
                }
                None => return usage("--seeds takes a range like 0..100"),
            },
            "--seed" => match args.get(i + 1).and_then(|a| a.parse::<u64>().ok()) {
                Some(seed) => {
                    seeds = seed..seed + 1;
                    i += 1;
                }
                None => return usage("--seed takes a number"),
            },
            "--trace" => trace = true,
            other => return usage(&format!("unknown argument {other:?}")),
        }
        i += 1;
    }
    // Wall time is only measured here, in the runner, to report speed.
    let started = Instant::now();
    let outcomes: Vec<sim::SeedOutcome> = seeds.map(sim::run_seed).collect();
    let wall = started.elapsed();
    for o in &outcomes {
        if trace {
            println!("{}", o.transcript);
        }
        if !o.violations.is_empty() {
            println!("seed {} FAILED:", o.seed);
            for v in &o.violations {
                println!("  {v}");
            }
            println!("  replay: cargo run -p sim -- --seed {} --trace", o.seed);
        }
    }
    print!("{}", sim::summary(&outcomes, wall));
    if outcomes.iter().all(|o| o.violations.is_empty()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("sim: {problem}\nusage: sim [--seeds A..B | --seed S] [--trace]");
    ExitCode::from(2)
}
