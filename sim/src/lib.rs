//! The deterministic simulation testbed.
//!
//! Each seed expands into a workload (desired-state puts, edits, deletes,
//! invalid payloads, redeliveries) and a fault plan (container crashes,
//! runtime API failures, missing images, agent restarts with the cache kept
//! or lost), which drive the real podfleet-core reconciler against the fake
//! runtime in virtual time. The harness checks the safety invariants at
//! every step; after the faults heal, a liveness phase requires every
//! deployment whose spec can succeed to report Running with the true ids,
//! and then no further runtime mutation for several ticks.
//!
//! This is the discrete-event tier: it jumps straight to the next deadline,
//! so an hour of device time costs milliseconds. The same seed always
//! replays the same run, bit for bit; [`world::Outcome::trace_hash`] proves it.

pub mod broker;
pub mod cli;
pub mod plan;
pub mod tiers;
pub mod world;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use podfleet_core::reconciler::Bugs;
use podfleet_core::runtime::RuntimeErrorKind;
use podfleet_core::wire::{DeploymentName, DeviceId};
use podfleet_core::Config;
use podfleet_testkit::images::{INIT_FAIL, INIT_HANG};
use podfleet_testkit::{Harness, Invariant, OpFault, Violation};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use plan::{below, chance, DEPLOYMENTS, FAULTY_OPS as OPS, SERVICES};

fn world(bugs: Bugs) -> Harness {
    let config = Config::new(DeviceId::new("sim-device").expect("valid"), "sim").inject_bugs(bugs);
    let mut h = Harness::new(config);
    // The network tiers' images.
    h.runtime = world::fake_runtime();
    h
}

/// Runs one seed: workload and faults, then heal and check liveness.
pub fn run_seed(seed: u64) -> world::Outcome {
    run_seed_with_bugs(seed, Bugs::default())
}

/// Runs one seed against a reconciler with deliberate bugs switched on, to
/// prove the invariant checks notice them.
pub fn run_seed_with_bugs(seed: u64, bugs: Bugs) -> world::Outcome {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut h = world(bugs);
    let mut faults: BTreeMap<&'static str, u32> = BTreeMap::new();
    // Swarm testing: each seed enables its own subset of faults.
    let crash_rate = below(&mut rng, 30);
    let api_fault_rate = below(&mut rng, 25);
    let restart_rate = below(&mut rng, 8);
    let mut revision = 0u64;
    // What the desired-state bucket holds now, to redeliver after a restart.
    let mut kv: BTreeMap<&'static str, (u64, String)> = BTreeMap::new();
    // What the agent process was handed, per deployment, newest last (a
    // delete as `None`), to deliver an older revision late.
    let mut handed: BTreeMap<&'static str, Vec<(u64, Option<String>)>> = BTreeMap::new();
    let mut epoch = world::Epoch::default();
    let mut errors_at_start = 0;
    let steps = 20 + below(&mut rng, 40);
    for _ in 0..steps {
        let deployment = DEPLOYMENTS[below(&mut rng, 3) as usize];
        match below(&mut rng, 100) {
            0..=34 => {
                revision += 1;
                let json = plan::valid_score(&mut rng);
                h.put(deployment, revision, &json);
                handed
                    .entry(deployment)
                    .or_default()
                    .push((revision, Some(json.clone())));
                kv.insert(deployment, (revision, json));
            }
            35..=39 => {
                revision += 1;
                let bad = [
                    "{",
                    r#"{"services":[]}"#,
                    r#"{"services":[{"name":"a.b","image":"x"}]}"#,
                ];
                let json = bad[below(&mut rng, 3) as usize];
                h.put(deployment, revision, json);
                handed
                    .entry(deployment)
                    .or_default()
                    .push((revision, Some(json.to_owned())));
                kv.insert(deployment, (revision, json.to_owned()));
                *faults.entry("invalid payload").or_default() += 1;
            }
            40..=44 => {
                revision += 1;
                let init = if chance(&mut rng, 50) {
                    INIT_FAIL
                } else {
                    INIT_HANG
                };
                let json = format!(
                    r#"{{"services":[{{"name":"web","image":"img/app:1"}}],"init_containers":[{{"name":"bad","image":"{init}","timeout":5}}]}}"#
                );
                h.put(deployment, revision, &json);
                handed
                    .entry(deployment)
                    .or_default()
                    .push((revision, Some(json.clone())));
                kv.insert(deployment, (revision, json));
                *faults.entry("failing init container").or_default() += 1;
            }
            45..=47 => {
                // JetStream redelivers what the bucket holds, after a reconnect.
                if let Some((r, json)) = kv.get(deployment).cloned() {
                    h.put(deployment, r, &json);
                    *faults.entry("duplicate delivery").or_default() += 1;
                }
            }
            48..=49 => {
                // A watch delivers an older revision after a newer one.
                let older = handed.get(deployment).and_then(|h| h.iter().rev().nth(1));
                match older.cloned() {
                    Some((r, Some(json))) => h.put(deployment, r, &json),
                    Some((r, None)) => h.delete(deployment, r),
                    None => {}
                }
                if older.is_some() {
                    *faults.entry("older revision redelivered").or_default() += 1;
                }
            }
            50..=54 => {
                revision += 1;
                h.delete(deployment, revision);
                handed.entry(deployment).or_default().push((revision, None));
                kv.remove(deployment);
            }
            _ => {}
        }
        if chance(&mut rng, crash_rate) {
            let service = SERVICES[below(&mut rng, 3) as usize];
            let name = format!("{deployment}_{service}");
            if h.crash(&name, 1 + below(&mut rng, 3) as i64) {
                *faults.entry("container crash").or_default() += 1;
            }
        }
        if chance(&mut rng, api_fault_rate) {
            let op = OPS[below(&mut rng, OPS.len() as u64) as usize];
            let kind = [RuntimeErrorKind::Unavailable, RuntimeErrorKind::Other]
                [below(&mut rng, 2) as usize];
            let fault = if op == "create" && chance(&mut rng, 50) {
                *faults.entry("create failed but exists").or_default() += 1;
                OpFault::FailAfterEffect(kind)
            } else {
                *faults.entry("runtime api failure").or_default() += 1;
                OpFault::Fail(kind)
            };
            h.faults.entry(op).or_default().push_back(fault);
        }
        if chance(&mut rng, restart_rate) {
            let keep = chance(&mut rng, 50);
            h.restart_agent(keep);
            handed.clear();
            epoch.events = h.runtime.events().len();
            errors_at_start = h.errors;
            *faults
                .entry(if keep {
                    "agent restart, cache kept"
                } else {
                    "agent restart, cache lost"
                })
                .or_default() += 1;
            // The watch delivers the bucket's current values, then the end
            // of its initial snapshot.
            for (d, (r, json)) in &kv {
                h.put(d, *r, json);
                handed.entry(d).or_default().push((*r, Some(json.clone())));
            }
            let present = kv
                .keys()
                .filter_map(|d| DeploymentName::new(*d).ok())
                .collect();
            h.resync(&present);
        }
        h.run_for(Duration::from_millis(below(&mut rng, 60_000)));
    }
    // Liveness: heal every fault, keep desired state stable, give it the
    // retry cap plus a few ticks, then require convergence and quiet.
    h.faults.clear();
    h.run_for(Duration::from_secs(15 * 60));
    epoch.errors = h.errors - errors_at_start;
    let running = check_converged(&mut h, &kv, epoch);
    // Deployments that run must now stay still; failing ones keep retrying.
    let running: Vec<String> = running.iter().map(|d| format!("{d}_")).collect();
    let quiet_from = h.ops.len();
    h.run_for(Duration::from_secs(5 * 30));
    let flaps: Vec<String> = h.ops[quiet_from..]
        .iter()
        .filter(|(_, op)| op.is_mutation())
        .map(|(t, op)| (t, op, podfleet_testkit::describe_op(op)))
        .filter(|(_, op, text)| {
            let name = op
                .container()
                .and_then(|c| h.runtime.containers().get(c))
                .map(|c| c.spec.name.clone())
                .unwrap_or_default();
            running
                .iter()
                .any(|p| text.contains(p.as_str()) || name.starts_with(p.as_str()))
        })
        .map(|(t, _, text)| format!("{t}: {text}"))
        .collect();
    if !flaps.is_empty() {
        h.violations.push(Violation::new(
            Invariant::Liveness,
            format!("no quiet after convergence: {flaps:?}"),
        ));
    }
    let trace: Vec<String> = h.transcript.lines().map(str::to_owned).collect();
    world::Outcome {
        seed,
        simulated: h.now.saturating_since(podfleet_core::Timestamp::ZERO),
        faults,
        probes: BTreeMap::new(),
        violations: h.violations.clone(),
        events: trace.len() as u64,
        // The determinism fingerprint of the run.
        trace_hash: podfleet_core::reconciler::fnv1a64(h.transcript.as_bytes()),
        trace,
    }
}

/// The network tiers' liveness checks ([`world::check_device`]) on the
/// harness: its published states are what the state bucket would hold.
/// Returns the deployments that converged to Running.
fn check_converged(
    h: &mut Harness,
    kv: &BTreeMap<&'static str, (u64, String)>,
    epoch: world::Epoch,
) -> Vec<String> {
    let desired = kv
        .iter()
        .map(|(d, (r, json))| ((*d).to_owned(), (*r, json.clone().into_bytes())))
        .collect();
    let stored = h
        .states
        .iter()
        .map(|(d, s)| {
            let value = serde_json::to_vec(s).expect("a state has only string map keys");
            (d.to_string(), value)
        })
        .collect();
    let (problems, running) = world::check_device(&world::DeviceView {
        desired: &desired,
        stored: &stored,
        published: None,
        fake: &h.runtime,
        oracle: &h.oracle,
        epoch,
        now: h.now,
    });
    h.violations.extend(problems);
    running
}

/// Which simulator runs a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Agents, broker and operator as hosts on turmoil's network.
    Turmoil,
    /// The discrete-event fleet tier: the same agents, in one paused runtime.
    Events,
    /// The reconciler alone over the fake runtime, from the plan's seed.
    Discrete,
}

impl Tier {
    /// The name the command line takes.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Turmoil => "turmoil",
            Tier::Events => "events",
            Tier::Discrete => "discrete",
        }
    }
}

/// Runs `plan` on `tier`.
pub fn run(tier: Tier, plan: &plan::Plan, switches: tiers::Switches) -> world::Outcome {
    match tier {
        Tier::Turmoil => tiers::run_turmoil(plan, switches),
        Tier::Events => tiers::run_events(plan, switches),
        Tier::Discrete => run_seed_with_bugs(plan.seed, switches.bugs),
    }
}

/// What to print when a run fails: the seed, the violations, the fault
/// plan, the last events and the commands that replay it
/// ([`replay_commands`]).
pub fn failure_report(
    tier: Tier,
    plan: &plan::Plan,
    outcome: &world::Outcome,
    switches: tiers::Switches,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "seed {} FAILED on the {} tier:",
        plan.seed,
        tier.name()
    );
    for v in &outcome.violations {
        let _ = writeln!(out, "  violated: {v}");
    }
    let _ = writeln!(out, "fault plan:\n{}", plan.to_json());
    let tail = outcome.trace.len().saturating_sub(40);
    let _ = writeln!(out, "last events:\n{}", outcome.trace[tail..].join("\n"));
    if tier != Tier::Discrete && !plan.is_generated() {
        let _ = writeln!(
            out,
            "this plan is not what its seed expands to: save the fault plan above as {}",
            plan_file(plan)
        );
    }
    for (i, command) in replay_commands(tier, plan, switches).iter().enumerate() {
        let _ = writeln!(
            out,
            "{}{command}",
            if i == 0 { "replay: " } else { "   or: " }
        );
    }
    out
}

/// Where a failure report asks for a plan that its seed does not expand to
/// (a shrunk or a hand-written one) to be saved.
pub fn plan_file(plan: &plan::Plan) -> String {
    format!("/tmp/sim-plan-seed-{}.json", plan.seed)
}

/// The commands that replay `plan` on `tier` with `switches`: the runner,
/// then the test batch. Both go through [`cli`], and each reproduces the
/// run: the tier, the devices, the seed (or the saved plan, when the seed
/// does not expand to it), and the bug switches.
pub fn replay_commands(tier: Tier, plan: &plan::Plan, switches: tiers::Switches) -> Vec<String> {
    let bugs = cli::switch_names(switches);
    let mut flags = String::new();
    let mut env = format!("SIM_TIER={}", tier.name());
    if tier == Tier::Discrete || plan.is_generated() {
        let _ = write!(flags, " --devices {} --seed {}", plan.devices, plan.seed);
        let _ = write!(env, " SIM_DEVICES={} SIM_SEED={}", plan.devices, plan.seed);
    } else {
        let _ = write!(flags, " --plan {}", plan_file(plan));
        let _ = write!(env, " SIM_PLAN={}", plan_file(plan));
    }
    if !bugs.is_empty() {
        let _ = write!(flags, " --bug {}", bugs.join(","));
        let _ = write!(env, " SIM_BUG={}", bugs.join(","));
    }
    vec![
        format!(
            "cargo run --release -p sim -- --tier {}{flags} --trace",
            tier.name()
        ),
        format!("{env} cargo test -p sim --test seeds -- --nocapture"),
    ]
}

/// How many seeds a batch needs before a probe it never reached counts as
/// a failure. The README's `--seeds 0..8` legitimately misses the two
/// rarest ("crash loop restarted", "delete while offline"); 7.6% of the
/// 32-seed windows of 0..2000 on the events tier miss one, but no 64-seed
/// window of 0..2000 (events, 2 devices), 0..1000 (events, 1 device) or
/// 0..400 (turmoil) does.
pub const PROBE_MIN_SEEDS: usize = 64;

/// The probes a batch on `tier` never reached (none on the discrete tier,
/// which has no probes).
pub fn missed_probes(tier: Tier, outcomes: &[world::Outcome]) -> Vec<&'static str> {
    if tier == Tier::Discrete {
        return Vec::new();
    }
    world::PROBES
        .into_iter()
        .filter(|p| outcomes.iter().all(|o| !o.probes.contains_key(p)))
        .collect()
}

/// The runner's summary table.
pub fn summary_table(
    tier: Tier,
    devices: u32,
    outcomes: &[world::Outcome],
    wall: Duration,
) -> String {
    let mut faults: BTreeMap<&str, u32> = BTreeMap::new();
    let mut probes: BTreeMap<&str, u64> = BTreeMap::new();
    for o in outcomes {
        for (k, v) in &o.faults {
            *faults.entry(k).or_default() += v;
        }
        for (k, v) in &o.probes {
            *probes.entry(k).or_default() += v;
        }
    }
    let simulated: Duration = outcomes.iter().map(|o| o.simulated).sum();
    let failed: Vec<u64> = outcomes
        .iter()
        .filter(|o| !o.violations.is_empty())
        .map(|o| o.seed)
        .collect();
    let secs = wall.as_secs_f64().max(1e-9);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "tier                   {} ({devices} devices)",
        tier.name()
    );
    let _ = writeln!(out, "seeds run              {}", outcomes.len());
    let _ = writeln!(
        out,
        "simulated time         {:.1} h",
        simulated.as_secs_f64() / 3600.0
    );
    let _ = writeln!(
        out,
        "events traced          {}",
        outcomes.iter().map(|o| o.events).sum::<u64>()
    );
    for (kind, n) in &faults {
        let _ = writeln!(out, "fault {kind:<24} {n}");
    }
    if tier != Tier::Discrete {
        for probe in world::PROBES {
            let _ = writeln!(
                out,
                "probe {probe:<24} {}",
                probes.get(probe).copied().unwrap_or(0)
            );
        }
        let missed = missed_probes(tier, outcomes);
        let _ = writeln!(out, "missed probes          {} {missed:?}", missed.len());
    }
    let _ = writeln!(out, "invariant violations   {} {failed:?}", failed.len());
    let _ = writeln!(
        out,
        "seeds per second       {:.2}",
        outcomes.len() as f64 / secs
    );
    let _ = writeln!(
        out,
        "simulated:wall         {:.0}x",
        simulated.as_secs_f64() / secs
    );
    let _ = writeln!(
        out,
        "device-hours per sec   {:.1}",
        simulated.as_secs_f64() * f64::from(devices.max(1)) / 3600.0 / secs
    );
    out
}

/// The deliberate bugs of the agent's event loop, which only the network
/// tiers run (the discrete tier drives the reconciler alone), and the
/// invariant whose check must report each.
pub const LOOP_BITES: [(&str, Bugs, Invariant); 1] = [(
    "head_of_line_reports",
    Bugs {
        head_of_line_reports: true,
        ..NO_BUGS
    },
    Invariant::Liveness,
)];

/// Each deliberate bug of the reconciler, and the invariant whose check
/// must report it.
pub const BITES: [(&str, Bugs, Invariant); 7] = [
    (
        "recreate_on_tick",
        Bugs {
            recreate_on_tick: true,
            ..NO_BUGS
        },
        Invariant::HealthyContainerRecreated,
    ),
    (
        "revert_on_failure",
        Bugs {
            revert_on_failure: true,
            ..NO_BUGS
        },
        Invariant::NoRevert,
    ),
    (
        "skip_init_containers",
        Bugs {
            skip_init_containers: true,
            ..NO_BUGS
        },
        Invariant::InitContainersFirst,
    ),
    (
        "skip_graceful_stop",
        Bugs {
            skip_graceful_stop: true,
            ..NO_BUGS
        },
        Invariant::GracefulReplace,
    ),
    (
        "create_before_remove",
        Bugs {
            create_before_remove: true,
            ..NO_BUGS
        },
        Invariant::OneContainerPerService,
    ),
    (
        "report_running_early",
        Bugs {
            report_running_early: true,
            ..NO_BUGS
        },
        Invariant::TruthfulReports,
    ),
    (
        "report_before_observing",
        Bugs {
            report_before_observing: true,
            ..NO_BUGS
        },
        Invariant::TruthfulReports,
    ),
];

/// No deliberate bug.
pub const NO_BUGS: Bugs = Bugs {
    recreate_on_tick: false,
    revert_on_failure: false,
    skip_init_containers: false,
    skip_graceful_stop: false,
    create_before_remove: false,
    report_running_early: false,
    report_before_observing: false,
    head_of_line_reports: false,
};
