//! The simulator's command line. See `--help` ([`sim::cli::USAGE`]).

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::Instant;

use sim::cli::{self, Args};
use sim::world::Outcome;

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(problem) => {
            if !problem.is_empty() {
                eprintln!("sim: {problem}");
            }
            eprintln!("{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    let plans = match args.plans() {
        Ok(plans) => plans,
        Err(problem) => {
            eprintln!("sim: {problem}");
            return ExitCode::from(2);
        }
    };
    // Wall time is only read here, in the runner, to report speed.
    let started = Instant::now();
    let total = plans.len();
    let outcomes: Vec<Outcome> = cli::run_plans(args.tier, &plans, args.switches, args.jobs, |n| {
        progress(n, total, started);
    });
    eprintln!();
    let wall = started.elapsed();
    for (plan, o) in plans.iter().zip(&outcomes) {
        if args.trace {
            println!("{}", o.trace.join("\n"));
        }
        if o.violations.is_empty() {
            continue;
        }
        println!("{}", sim::failure_report(args.tier, plan, o, args.switches));
        if let Some(dir) = &args.save {
            let path = format!("{dir}/seed-{}.json", plan.seed);
            if let Err(e) =
                std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, plan.to_json()))
            {
                eprintln!("sim: cannot save {path}: {e}");
            }
        }
        if args.shrink {
            let (small, outcome) =
                sim::world::shrink(plan, |p| sim::run(args.tier, p, args.switches), 200);
            println!(
                "shrunk seed {} from {} to {} steps:\n{}\nviolations: {:#?}\nlast events:\n{}\nreplay: save the plan above as {}, then\n  {}",
                plan.seed,
                plan.steps.len(),
                small.steps.len(),
                small.to_json(),
                outcome.violations.iter().map(ToString::to_string).collect::<Vec<_>>(),
                outcome.trace.join("\n"),
                sim::plan_file(&small),
                sim::replay_commands(args.tier, &small, args.switches).join("\n  ")
            );
        }
    }
    print!(
        "{}",
        sim::summary_table(args.tier, args.devices, &outcomes, wall)
    );
    if outcomes.iter().any(|o| !o.violations.is_empty()) {
        return ExitCode::FAILURE;
    }
    let missed = sim::missed_probes(args.tier, &outcomes);
    if !missed.is_empty() && outcomes.len() >= sim::PROBE_MIN_SEEDS && !args.allow_missed_probes {
        eprintln!(
            "sim: {} seeds never reached the probes {missed:?}: the simulator stopped exploring them (--allow-missed-probes to accept)",
            outcomes.len()
        );
        return ExitCode::from(3);
    }
    ExitCode::SUCCESS
}

/// A progress bar on a terminal; a line per tenth of the run otherwise.
fn progress(done: usize, total: usize, started: Instant) {
    let tty = std::io::stderr().is_terminal();
    if !tty && done * 10 / total.max(1) == (done - 1) * 10 / total.max(1) && done != total {
        return;
    }
    let width = 30;
    let filled = done * width / total.max(1);
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    eprint!(
        "{}[{}{}] {done}/{total} seeds, {:.1}/s",
        if tty { "\r" } else { "\n" },
        "#".repeat(filled),
        " ".repeat(width - filled),
        done as f64 / secs
    );
    let _ = std::io::stderr().flush();
}
