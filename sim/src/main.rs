//! The simulator's command line. See `--help`.

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use sim::plan::Plan;
use sim::tiers::Switches;
use sim::world::Outcome;
use sim::Tier;

const USAGE: &str = "\
usage: sim [--tier turmoil|events|discrete] [--devices N] [--seeds A..B | --seed S]
           [--plan FILE] [--save-failing DIR] [--shrink] [--trace] [--jobs N]

  --tier       turmoil (default): agents, broker and operator on turmoil's network;
               events: the discrete-event fleet tier (fast, for many devices);
               discrete: the reconciler alone over the fake runtime (fastest)
  --devices    devices per run (default 2; ignored by the discrete tier)
  --seeds      a range of seeds (default 0..8); --seed runs one
  --plan       replays a plan saved as JSON instead of expanding a seed
  --save-failing  writes each failing seed's plan to DIR/seed-S.json
  --shrink     reduces each failing plan to a minimal one and prints it
  --trace      prints the whole trace of each run
  --jobs       runs this many seeds at once (default: the number of cores)";

struct Args {
    tier: Tier,
    devices: u32,
    seeds: std::ops::Range<u64>,
    plan: Option<String>,
    save: Option<String>,
    shrink: bool,
    trace: bool,
    jobs: usize,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        tier: Tier::Turmoil,
        devices: 2,
        seeds: 0..8,
        plan: None,
        save: None,
        shrink: false,
        trace: false,
        jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} takes a value"));
        match arg.as_str() {
            "--tier" => {
                args.tier = match value("--tier")?.as_str() {
                    "turmoil" => Tier::Turmoil,
                    "events" => Tier::Events,
                    "discrete" => Tier::Discrete,
                    other => return Err(format!("unknown tier {other:?}")),
                }
            }
            "--devices" => {
                args.devices = value("--devices")?
                    .parse()
                    .map_err(|_| "--devices takes a number".to_owned())?
            }
            "--seeds" => {
                let text = value("--seeds")?;
                let (a, b) = text
                    .split_once("..")
                    .ok_or("--seeds takes a range like 0..100")?;
                let a = a.parse().map_err(|_| "--seeds: bad start".to_owned())?;
                let b = b.parse().map_err(|_| "--seeds: bad end".to_owned())?;
                args.seeds = a..b;
            }
            "--seed" => {
                let s: u64 = value("--seed")?
                    .parse()
                    .map_err(|_| "--seed takes a number".to_owned())?;
                args.seeds = s..s + 1;
            }
            "--plan" => args.plan = Some(value("--plan")?),
            "--save-failing" => args.save = Some(value("--save-failing")?),
            "--shrink" => args.shrink = true,
            "--trace" => args.trace = true,
            "--jobs" => {
                args.jobs = value("--jobs")?
                    .parse()
                    .map_err(|_| "--jobs takes a number".to_owned())?
            }
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(problem) => {
            if !problem.is_empty() {
                eprintln!("sim: {problem}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let switches = Switches {
        keep_trace: args.trace,
        ..Switches::default()
    };
    let plans: Vec<Plan> = match &args.plan {
        Some(path) => {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("sim: cannot read {path}: {e}");
                    return ExitCode::from(2);
                }
            };
            match Plan::from_json(&text) {
                Ok(plan) => vec![plan],
                Err(e) => {
                    eprintln!("sim: {path} is not a plan: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        None => args
            .seeds
            .clone()
            .map(|s| Plan::generate(s, args.devices))
            .collect(),
    };
    // Wall time is only read here, in the runner, to report speed.
    let started = Instant::now();
    let total = plans.len();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Outcome)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..args.jobs.clamp(1, total.max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(plan) = plans.get(i) else { break };
                let outcome = sim::run(args.tier, plan, switches);
                results
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((i, outcome));
                let n = done.fetch_add(1, Ordering::SeqCst) + 1;
                progress(n, total, started);
            });
        }
    });
    eprintln!();
    let wall = started.elapsed();
    let mut results = results
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    results.sort_by_key(|(i, _)| *i);
    let outcomes: Vec<Outcome> = results.into_iter().map(|(_, o)| o).collect();
    for (plan, o) in plans.iter().zip(&outcomes) {
        if args.trace {
            println!("{}", o.trace.join("\n"));
        }
        if o.violations.is_empty() {
            continue;
        }
        println!("{}", sim::failure_report(args.tier, plan, o));
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
                sim::world::shrink(plan, |p| sim::run(args.tier, p, switches), 200);
            println!(
                "shrunk seed {} from {} to {} steps:\n{}\nviolations: {:?}\nlast events:\n{}",
                plan.seed,
                plan.steps.len(),
                small.steps.len(),
                small.to_json(),
                outcome.violations,
                outcome.trace.join("\n")
            );
        }
    }
    print!(
        "{}",
        sim::summary_table(args.tier, args.devices, &outcomes, wall)
    );
    if outcomes.iter().all(|o| o.violations.is_empty()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
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
