//! The runner's command line and the test batch's environment, read in one
//! place so that every replay command a failure report prints
//! ([`crate::replay_commands`]) runs through the code that real runs use:
//! `sim` (src/main.rs) reads its arguments with [`Args::parse`] and
//! `cargo test -p sim --test seeds` its environment with
//! [`EnvBatch::from_env`]; both become plans and switches here and run
//! with [`run_plans`].

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use podfleet_core::reconciler::Bugs;

use crate::plan::Plan;
use crate::tiers::Switches;
use crate::world::Outcome;
use crate::{Tier, BITES, LOOP_BITES};

/// The runner's usage text.
pub const USAGE: &str = "\
usage: sim [--tier turmoil|events|discrete] [--devices N] [--seeds A..B | --seed S]
           [--plan FILE] [--save-failing DIR] [--shrink] [--trace] [--jobs N]
           [--bug NAME[,NAME]] [--allow-missed-probes]

  --tier       turmoil (default): agents, broker and operator on turmoil's network;
               events: the discrete-event fleet tier (fast, for many devices);
               discrete: the reconciler alone over the fake runtime (fastest)
  --devices    devices per run (default 2; ignored by the discrete tier)
  --seeds      a range of seeds (default 0..8); --seed runs one
  --plan       replays a plan saved as JSON instead of expanding a seed
  --save-failing  writes each failing seed's plan to DIR/seed-S.json
  --shrink     reduces each failing plan to a minimal one and prints it
  --trace      prints the whole trace of each run
  --jobs       runs this many seeds at once (default: the number of cores)
  --bug        switches on deliberate bugs (see sim::BITES, sim::LOOP_BITES; watch_everyone,
               snapshot_one_early, keep_untargeted), to
               replay a failure report of a bite test
  --allow-missed-probes
               exits 0 even when a batch of 64 seeds or more never reached a
               coverage probe (smaller batches never fail for it)

exit status: 0 when every run kept every invariant and, for a batch of 64
seeds or more, every coverage probe was reached; 1 on a violation; 2 on a
usage error; 3 when probes were missed.";

/// The runner's command line.
#[derive(Debug, Clone)]
pub struct Args {
    /// The tier.
    pub tier: Tier,
    /// Devices per run.
    pub devices: u32,
    /// The seeds.
    pub seeds: Range<u64>,
    /// A saved plan to replay instead.
    pub plan: Option<String>,
    /// Where to save failing plans.
    pub save: Option<String>,
    /// Whether to shrink failing plans.
    pub shrink: bool,
    /// Whether to print whole traces.
    pub trace: bool,
    /// Seeds run at once.
    pub jobs: usize,
    /// Deliberate bugs and adapters.
    pub switches: Switches,
    /// Whether missed probes are tolerated in a large batch.
    pub allow_missed_probes: bool,
}

impl Args {
    /// Parses the arguments after the program name.
    ///
    /// # Errors
    /// What is wrong, in words; an empty string for `--help`.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
        let mut parsed = Args {
            tier: Tier::Turmoil,
            devices: 2,
            seeds: 0..8,
            plan: None,
            save: None,
            shrink: false,
            trace: false,
            jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
            switches: Switches::default(),
            allow_missed_probes: false,
        };
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let mut value = |name: &str| it.next().ok_or(format!("{name} takes a value"));
            match arg.as_str() {
                "--tier" => parsed.tier = tier_named(&value("--tier")?)?,
                "--devices" => {
                    parsed.devices = value("--devices")?
                        .parse()
                        .map_err(|_| "--devices takes a number".to_owned())?;
                }
                "--seeds" => {
                    let text = value("--seeds")?;
                    let (a, b) = text
                        .split_once("..")
                        .ok_or("--seeds takes a range like 0..100")?;
                    let a = a.parse().map_err(|_| "--seeds: bad start".to_owned())?;
                    let b = b.parse().map_err(|_| "--seeds: bad end".to_owned())?;
                    parsed.seeds = a..b;
                }
                "--seed" => {
                    let s: u64 = value("--seed")?
                        .parse()
                        .map_err(|_| "--seed takes a number".to_owned())?;
                    parsed.seeds = s..s + 1;
                }
                "--plan" => parsed.plan = Some(value("--plan")?),
                "--save-failing" => parsed.save = Some(value("--save-failing")?),
                "--shrink" => parsed.shrink = true,
                "--trace" => parsed.trace = true,
                "--jobs" => {
                    parsed.jobs = value("--jobs")?
                        .parse()
                        .map_err(|_| "--jobs takes a number".to_owned())?;
                }
                "--bug" => switch_on(&mut parsed.switches, &value("--bug")?)?,
                "--allow-missed-probes" => parsed.allow_missed_probes = true,
                "--help" | "-h" => return Err(String::new()),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        parsed.switches.keep_trace = parsed.trace;
        Ok(parsed)
    }

    /// The plans to run: the saved one, or each seed's.
    ///
    /// # Errors
    /// A plan file that cannot be read or is not a plan.
    pub fn plans(&self) -> Result<Vec<Plan>, String> {
        match &self.plan {
            Some(path) => Ok(vec![load_plan(path)?]),
            None => Ok(self
                .seeds
                .clone()
                .map(|s| Plan::generate(s, self.devices))
                .collect()),
        }
    }
}

/// The test batch's environment (`cargo test -p sim --test seeds`).
#[derive(Debug, Clone)]
pub struct EnvBatch {
    /// `SIM_TIER`; the discrete tier when unset.
    pub tier: Tier,
    /// `SIM_SEED` (one), `SIM_SEEDS=N` (0..N), or a default per tier.
    pub seeds: Vec<u64>,
    /// `SIM_DEVICES`, 2 when unset.
    pub devices: u32,
    /// `SIM_PLAN`: a saved plan, replayed instead of the seeds.
    pub plan: Option<String>,
    /// `SIM_BUG`: deliberate bugs; traces kept for a single run.
    pub switches: Switches,
}

impl EnvBatch {
    /// Reads the batch from the environment variables `get` returns.
    ///
    /// # Errors
    /// A value that does not parse, in words.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<EnvBatch, String> {
        let number = |name: &str| -> Result<Option<u64>, String> {
            get(name)
                .map(|v| {
                    v.parse()
                        .map_err(|_| format!("{name}={v:?} is not a number"))
                })
                .transpose()
        };
        let tier = match get("SIM_TIER") {
            Some(name) => tier_named(&name)?,
            None => Tier::Discrete,
        };
        let seeds = match (number("SIM_SEED")?, number("SIM_SEEDS")?) {
            (Some(one), _) => vec![one],
            (None, Some(n)) => (0..n).collect(),
            (None, None) => (0..default_seeds(tier)).collect(),
        };
        let mut switches = Switches::default();
        if let Some(names) = get("SIM_BUG") {
            switch_on(&mut switches, &names)?;
        }
        let plan = get("SIM_PLAN");
        switches.keep_trace = seeds.len() == 1 || plan.is_some();
        Ok(EnvBatch {
            tier,
            seeds,
            devices: u32::try_from(number("SIM_DEVICES")?.unwrap_or(2))
                .map_err(|_| "SIM_DEVICES is too large".to_owned())?,
            plan,
            switches,
        })
    }

    /// The plans to run: the saved one, or each seed's.
    ///
    /// # Errors
    /// A plan file that cannot be read or is not a plan.
    pub fn plans(&self) -> Result<Vec<Plan>, String> {
        match &self.plan {
            Some(path) => Ok(vec![load_plan(path)?]),
            None => Ok(self
                .seeds
                .iter()
                .map(|&s| Plan::generate(s, self.devices))
                .collect()),
        }
    }
}

/// The seeds a test batch runs on `tier` when `SIM_SEEDS` is not set.
fn default_seeds(tier: Tier) -> u64 {
    match tier {
        Tier::Discrete => 300,
        Tier::Events => 128,
        Tier::Turmoil => 32,
    }
}

/// The tier called `name` on the command line.
///
/// # Errors
/// An unknown name.
pub fn tier_named(name: &str) -> Result<Tier, String> {
    match name {
        "turmoil" => Ok(Tier::Turmoil),
        "events" => Ok(Tier::Events),
        "discrete" => Ok(Tier::Discrete),
        other => Err(format!("unknown tier {other:?}")),
    }
}

/// Reads a plan saved by [`Plan::to_json`].
///
/// # Errors
/// The file cannot be read or is not a plan.
pub fn load_plan(path: &str) -> Result<Plan, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    Plan::from_json(&text).map_err(|e| format!("{path} is not a plan: {e}"))
}

/// Switches on the bugs named in `names` (comma-separated): the names of
/// [`BITES`], `watch_everyone` for the adapter that watches every
/// device's keys, `snapshot_one_early` for the NATS session's bug and
/// `keep_untargeted` for the fleet controller's.
///
/// # Errors
/// An unknown name.
pub fn switch_on(switches: &mut Switches, names: &str) -> Result<(), String> {
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if name == "watch_everyone" {
            switches.watch_everyone = true;
            continue;
        }
        if name == "snapshot_one_early" {
            switches.session_bugs.snapshot_one_early = true;
            continue;
        }
        if name == "keep_untargeted" {
            switches.fleet_bugs.keep_untargeted = true;
            continue;
        }
        let (_, bug, _) = BITES
            .iter()
            .chain(&LOOP_BITES)
            .find(|(n, _, _)| *n == name)
            .ok_or_else(|| format!("unknown bug {name:?}"))?;
        switches.bugs = union(switches.bugs, *bug);
    }
    Ok(())
}

/// The names [`switch_on`] takes for what `switches` switches on.
pub fn switch_names(switches: Switches) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = BITES
        .iter()
        .chain(&LOOP_BITES)
        .filter(|(_, bug, _)| union(switches.bugs, *bug) == switches.bugs)
        .map(|(name, _, _)| *name)
        .collect();
    if switches.watch_everyone {
        names.push("watch_everyone");
    }
    if switches.session_bugs.snapshot_one_early {
        names.push("snapshot_one_early");
    }
    if switches.fleet_bugs.keep_untargeted {
        names.push("keep_untargeted");
    }
    names
}

fn union(a: Bugs, b: Bugs) -> Bugs {
    Bugs {
        recreate_on_tick: a.recreate_on_tick || b.recreate_on_tick,
        revert_on_failure: a.revert_on_failure || b.revert_on_failure,
        skip_init_containers: a.skip_init_containers || b.skip_init_containers,
        skip_graceful_stop: a.skip_graceful_stop || b.skip_graceful_stop,
        create_before_remove: a.create_before_remove || b.create_before_remove,
        pull_after_stop: a.pull_after_stop || b.pull_after_stop,
        gc_ignores_keep: a.gc_ignores_keep || b.gc_ignores_keep,
        start_unverified: a.start_unverified || b.start_unverified,
        trust_unprovisioned: a.trust_unprovisioned || b.trust_unprovisioned,
        report_running_early: a.report_running_early || b.report_running_early,
        report_before_observing: a.report_before_observing || b.report_before_observing,
        head_of_line_reports: a.head_of_line_reports || b.head_of_line_reports,
    }
}

/// Runs `plans` on `tier`, `jobs` at a time, telling `progress` how many
/// are done after each; the outcomes come back in plan order.
pub fn run_plans(
    tier: Tier,
    plans: &[Plan],
    switches: Switches,
    jobs: usize,
    progress: impl Fn(usize) + Sync,
) -> Vec<Outcome> {
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Outcome)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, plans.len().max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(plan) = plans.get(i) else { break };
                let outcome = crate::run(tier, plan, switches);
                results
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((i, outcome));
                progress(done.fetch_add(1, Ordering::SeqCst) + 1);
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(PoisonError::into_inner);
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, o)| o).collect()
}
