//! Fault plans: what a seed does to the world, as data.
//!
//! A seed expands ([`Plan::generate`]) into per-run fault rates (swarm
//! testing: each seed enables its own subset of faults, at its own rates)
//! and a time-ordered list of [`Step`]s: desired-state writes and the faults
//! around them. The plan is all the randomness there is: the same plan
//! replays the same run, it prints as JSON on failure, saves to a file,
//! loads back ([`Plan::from_json`]) and shrinks ([`crate::world::shrink`])
//! by dropping steps.

use std::collections::BTreeMap;

use podfleet_core::wire::{Lifetime, PodmanV0Score};
use podfleet_testkit::{base_system, images, scripts};
use serde::{Deserialize, Serialize};

use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Deployments a plan writes.
pub const DEPLOYMENTS: [&str; 3] = ["shop", "cam", "relay"];
/// Services a score picks from.
pub const SERVICES: [&str; 3] = ["web", "worker", "db"];
/// Init images that can never succeed.
pub use podfleet_testkit::images::DOOMED_INITS as DOOMED_INIT_IMAGES;
/// Images that run until stopped (see [`podfleet_testkit::images`]).
pub use podfleet_testkit::images::STEADY_SERVICES as GOOD_IMAGES;
/// Images whose program exits with code 1 some seconds after every start:
/// a crash loop that never ends (used by the long-horizon tests).
pub const CRASHING_IMAGES: [&str; 1] = [podfleet_testkit::images::CRASHLOOP];
/// NATS's default `max_payload`, the fake broker's default limit.
pub const DEFAULT_MAX_PAYLOAD: u64 = 1024 * 1024;
/// Runtime operations a fault can hit.
pub const FAULTY_OPS: [&str; 6] = ["list", "create", "start", "inspect", "stop", "remove"];

/// One thing that happens at a planned time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "do", rename_all = "snake_case")]
pub enum Action {
    /// The operator puts desired state.
    Put {
        /// Device index.
        device: u32,
        /// Deployment name.
        deployment: String,
        /// The payload (maybe malformed).
        json: String,
    },
    /// The operator deletes desired state.
    Delete {
        /// Device index.
        device: u32,
        /// Deployment name.
        deployment: String,
    },
    /// The operator pings a device over request/reply.
    Ping {
        /// Device index.
        device: u32,
    },
    /// A service container crashes.
    Crash {
        /// Device index.
        device: u32,
        /// Container name.
        container: String,
        /// Exit code.
        code: i64,
    },
    /// The device's next runtime operation `op` fails.
    ApiFault {
        /// Device index.
        device: u32,
        /// The operation ("create", "stop", ...).
        op: String,
        /// Whether it takes effect anyway ("create failed but exists").
        after_effect: bool,
        /// Whether the runtime is unreachable (else: some other error).
        unavailable: bool,
    },
    /// The device and the broker cannot reach each other for a while.
    Partition {
        /// Device index.
        device: u32,
        /// How long, in ms.
        for_ms: u64,
    },
    /// Messages between the device and the broker are held, then delivered.
    Hold {
        /// Device index.
        device: u32,
        /// How long, in ms.
        for_ms: u64,
    },
    /// The broker process restarts (its KV data survives).
    BrokerRestart,
    /// The agent process dies and comes back later.
    AgentCrash {
        /// Device index.
        device: u32,
        /// Whether its on-disk cache survives.
        keep_cache: bool,
        /// How long it stays down, in ms.
        down_ms: u64,
    },
    /// An image disappears from the device for a while.
    ImageMissing {
        /// Device index.
        device: u32,
        /// The image.
        image: String,
        /// How long, in ms.
        for_ms: u64,
    },
    /// Every runtime operation of the device takes longer for a while
    /// (a loaded SD card, a slow image start).
    SlowRuntime {
        /// Device index.
        device: u32,
        /// How long, in ms.
        for_ms: u64,
        /// The extra time per operation, in ms.
        delay_ms: u64,
    },
    /// The next desired-state write is delivered twice.
    Duplicate,
    /// The device's watch redelivers every current value.
    Redeliver {
        /// Device index.
        device: u32,
    },
    /// The device's watch delivers, after a newer revision of a key, an
    /// older one it had delivered before, as a watch can around a reconnect.
    StaleDelivery {
        /// Device index.
        device: u32,
    },
    /// The agent process dies, comes back after `down_ms`, and then finds
    /// its container runtime in trouble for `for_ms`.
    AgentRestartTrouble {
        /// Device index.
        device: u32,
        /// Whether its on-disk cache survives.
        keep_cache: bool,
        /// How long it stays down, in ms.
        down_ms: u64,
        /// How long the runtime stays in trouble after the restart, in ms.
        for_ms: u64,
        /// What the trouble is.
        trouble: RuntimeTrouble,
    },
    /// An administrator applies a fleet deployment: the score `json` on every
    /// device the label `selector` picks. The fleet controller writes the
    /// per-device keys.
    Apply {
        /// The fleet deployment's name.
        deployment: String,
        /// The target's label selector.
        selector: String,
        /// The score (maybe invalid).
        json: String,
    },
    /// An administrator deletes a fleet deployment.
    Unapply {
        /// The fleet deployment's name.
        deployment: String,
    },
    /// An administrator replaces a device's labels.
    Label {
        /// Device index.
        device: u32,
        /// The labels.
        labels: BTreeMap<String, String>,
    },
    /// The fleet controller process dies and comes back after `down_ms`.
    ControllerRestart {
        /// How long it stays down, in ms.
        down_ms: u64,
    },
    /// The device's registry does not answer for a while: pulls fail with
    /// `Pull(Network)`.
    RegistryDown {
        /// Device index.
        device: u32,
        /// How long, in ms.
        for_ms: u64,
    },
    /// The device's registry is slow for a while: pulls begun then take
    /// their size at this speed (plus a second's round trip).
    RegistrySlow {
        /// Device index.
        device: u32,
        /// How long, in ms.
        for_ms: u64,
        /// The transfer speed, in bytes per second.
        bytes_per_sec: u64,
    },
    /// The device's registry refuses its credentials for a while: pulls
    /// fail with `Pull(Unauthorized)`.
    CredentialsRefused {
        /// Device index.
        device: u32,
        /// How long, in ms.
        for_ms: u64,
    },
    /// The device's disk is full for a while: pulls that need room fail
    /// with `Pull(NoSpace)`.
    DiskFull {
        /// Device index.
        device: u32,
        /// How long, in ms.
        for_ms: u64,
    },
    /// The operator puts a score with a service name `name_bytes` long: an
    /// invalid score that fits the broker's payload limit, but whose failure
    /// report, quoting the name in full, would not: the agent quotes it cut.
    PutOversized {
        /// Device index.
        device: u32,
        /// Deployment name.
        deployment: String,
        /// The length of the service name.
        name_bytes: u64,
    },
}

/// How a runtime misbehaves after an agent restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RuntimeTrouble {
    /// Every operation takes this much longer.
    Slow {
        /// The extra time per operation, in ms.
        delay_ms: u64,
    },
    /// Every operation fails with `RuntimeErrorKind::Unavailable`.
    Unavailable,
}

/// The score of an [`Action::PutOversized`]: one service whose name is
/// `name_bytes` long, so the score is invalid and the error quotes it.
pub fn oversized_score(name_bytes: u64) -> String {
    let name = "x".repeat(usize::try_from(name_bytes).unwrap_or(usize::MAX));
    format!(r#"{{"services":[{{"name":"{name}","image":"img/app:1"}}]}}"#)
}

impl Action {
    /// The fault's kind, for the summary; `None` for workload.
    pub fn fault_kind(&self) -> Option<&'static str> {
        Some(match self {
            Action::Put { json, .. } if is_malformed(json) => "malformed payload",
            Action::Put { json, .. } if json.contains("\"wide-service-") => "wide deployment",
            Action::Put { json, .. } if doomed(json).is_some() => return doomed(json),
            Action::Apply { json, .. } if is_malformed(json) => "invalid fleet deployment",
            Action::Put { .. }
            | Action::Delete { .. }
            | Action::Ping { .. }
            | Action::Apply { .. }
            | Action::Unapply { .. }
            | Action::Label { .. } => return None,
            Action::ControllerRestart { .. } => "controller restart",
            Action::Crash { .. } => "container crash",
            Action::ApiFault {
                after_effect: true, ..
            } => "create failed but exists",
            Action::ApiFault { .. } => "runtime api failure",
            Action::Partition { .. } => "partition",
            Action::Hold { .. } => "message delay",
            Action::BrokerRestart => "broker restart",
            Action::AgentCrash {
                keep_cache: true, ..
            } => "agent crash, cache kept",
            Action::AgentCrash { .. } => "agent crash, cache lost",
            Action::ImageMissing { .. } => "image missing",
            Action::SlowRuntime { .. } => "slow runtime",
            Action::Duplicate | Action::Redeliver { .. } => "duplicate delivery",
            Action::StaleDelivery { .. } => "older revision redelivered",
            Action::AgentRestartTrouble {
                trouble: RuntimeTrouble::Slow { .. },
                ..
            } => "agent restart, slow runtime",
            Action::AgentRestartTrouble { .. } => "agent restart, runtime unavailable",
            Action::PutOversized { .. } => "oversized report",
            Action::RegistryDown { .. } => "registry down",
            Action::RegistrySlow { .. } => "registry slow",
            Action::CredentialsRefused { .. } => "credentials refused",
            Action::DiskFull { .. } => "disk full",
        })
    }
}

/// Whether a payload cannot be a valid score.
pub fn is_malformed(json: &str) -> bool {
    PodmanV0Score::from_json(json.as_bytes()).is_err()
}

/// The setup timeout of every simulated agent: a minute rather than the
/// agent's default 5, so that a script that hangs is walked away from
/// well within a plan's fault phase, and again while liveness waits.
pub const SETUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Why a valid score can never get its services running, as the summary
/// counts it: an init container that fails or hangs, or a setup script
/// that never provisions within [`SETUP_TIMEOUT`] (the fake shell model
/// says how each ends: [`scripts::provisions`]). `None` for any other
/// payload.
pub fn doomed(json: &str) -> Option<&'static str> {
    let score = PodmanV0Score::from_json(json.as_bytes()).ok()?;
    let init =
        |i: &podfleet_core::wire::InitContainer| DOOMED_INIT_IMAGES.contains(&i.image.as_str());
    let script = |s: &podfleet_core::wire::PodmanService| {
        s.setup_script
            .as_deref()
            .is_some_and(|s| !scripts::provisions(s, SETUP_TIMEOUT))
    };
    if score.init_containers.iter().any(init) {
        Some("failing init container")
    } else if score.services.iter().any(script) {
        Some("failing setup script")
    } else {
        None
    }
}

/// What a desired payload can come to, once every fault has healed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outlook {
    /// It runs: Running at its revision, one container per service.
    Succeeds,
    /// It can never run: malformed, an init container that fails or hangs,
    /// or a setup script that never provisions ([`doomed`]).
    Fails,
    /// It runs, but a service keeps exiting and is restarted forever.
    CrashLoops,
    /// A `per_run` job: it runs once, to Succeeded or Failed, and then
    /// nothing happens to it.
    RunsOnce,
    /// A `no_launch` score: it creates nothing, and is Running exactly when
    /// every container it names runs the score's image.
    Verifies,
}

/// What `json` can come to.
pub fn outlook(json: &str) -> Outlook {
    let Ok(score) = PodmanV0Score::from_json(json.as_bytes()) else {
        return Outlook::Fails;
    };
    let crashes =
        |s: &podfleet_core::wire::PodmanService| CRASHING_IMAGES.contains(&s.image.as_str());
    match score.lifetime() {
        Lifetime::NoLaunch => Outlook::Verifies,
        _ if doomed(json).is_some() => Outlook::Fails,
        Lifetime::PerRun => Outlook::RunsOnce,
        Lifetime::Persistent if score.services.iter().any(crashes) => Outlook::CrashLoops,
        Lifetime::Persistent => Outlook::Succeeds,
    }
}

/// A planned action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Simulated time, ms since the start.
    pub at_ms: u64,
    /// What happens.
    pub action: Action,
}

/// The per-run fault rates, in percent per workload step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rates {
    /// Container crashes.
    pub crash: u64,
    /// Runtime API failures.
    pub api: u64,
    /// Agent crashes.
    pub agent_crash: u64,
    /// Partitions and holds.
    pub network: u64,
    /// Broker restarts.
    pub broker: u64,
    /// Missing images.
    pub image: u64,
    /// Duplicate, repeated and stale deliveries.
    pub duplicate: u64,
    /// Agent restarts into a slow or unavailable runtime.
    #[serde(default)]
    pub restart_trouble: u64,
    /// Oversized scores and wide deployments.
    #[serde(default)]
    pub oversize: u64,
    /// Registry and disk faults (down, slow, credentials refused, disk
    /// full), drawn from their own stream (`registry_steps`).
    #[serde(default)]
    pub registry: u64,
    /// `per_run` jobs, `no_launch` verifications and setup scripts, drawn
    /// from their own stream (`lifetime_steps`).
    #[serde(default)]
    pub lifetimes: u64,
}

/// Everything one run does, as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The seed it came from.
    pub seed: u64,
    /// How many devices.
    pub devices: u32,
    /// The rates it was drawn with.
    pub rates: Rates,
    /// The steps, in time order.
    pub steps: Vec<Step>,
    /// When the fault phase ends and healing starts, ms.
    pub heal_at_ms: u64,
    /// The broker's payload limit, in bytes.
    #[serde(default = "default_max_payload")]
    pub max_payload: u64,
    /// The state bucket's largest value, in bytes (a KV bucket's
    /// `max_value_size`), when the plan sets one: plans with a
    /// [`wide_score`] set [`WIDE_STATE_LIMIT`].
    #[serde(default)]
    pub state_max_value: Option<u64>,
}

/// The state bucket's value limit in plans with a [`wide_score`]: every
/// ordinary report and every summary fits, a wide deployment's Running
/// report does not.
pub const WIDE_STATE_LIMIT: u64 = 1536;

/// A valid score with `services` services of 40-character names: a few KiB,
/// far under the payload limit, but its Running report (40 names and ids)
/// is over [`WIDE_STATE_LIMIT`].
pub fn wide_score(services: u32) -> String {
    let services: Vec<String> = (0..services)
        .map(|i| {
            format!(
                r#"{{"name":"wide-service-{i:03}-{}","image":"img/app:1"}}"#,
                "x".repeat(24)
            )
        })
        .collect();
    format!(r#"{{"services":[{}]}}"#, services.join(","))
}

fn default_max_payload() -> u64 {
    DEFAULT_MAX_PAYLOAD
}

/// A number below `n` (0 when `n` is 0).
pub(crate) fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    rng.next_u64() % n.max(1)
}

/// True `percent` times in a hundred.
pub(crate) fn chance(rng: &mut ChaCha8Rng, percent: u64) -> bool {
    below(rng, 100) < percent
}

fn pick<'a>(rng: &mut ChaCha8Rng, from: &[&'a str]) -> &'a str {
    from[below(rng, from.len() as u64) as usize]
}

/// A valid score: services from a small vocabulary, sometimes an init
/// container, a short grace period.
pub fn valid_score(rng: &mut ChaCha8Rng) -> String {
    let mut services = Vec::new();
    for (i, name) in SERVICES.iter().enumerate() {
        if i == 0 || chance(rng, 50) {
            let image = pick(rng, &GOOD_IMAGES);
            let env = below(rng, 3);
            services.push(format!(
                r#"{{"name":"{name}","image":"{image}","env":{{"V":"{env}"}}}}"#
            ));
        }
    }
    let inits = if chance(rng, 40) {
        // The second goes through the libpod race.
        r#"{"name":"migrate","image":"img/init-ok:1","timeout":30},{"name":"seed","image":"img/init-race:1","timeout":30}"#
    } else {
        ""
    };
    let grace = 1 + below(rng, 5);
    format!(
        r#"{{"services":[{}],"init_containers":[{inits}],"lifecycle":{{"grace_period_secs":{grace}}}}}"#,
        services.join(",")
    )
}

/// The fleet deployments' names: never a [`DEPLOYMENTS`] name, so the
/// controller's keys and the hand-written ones never meet.
pub const FLEET_DEPLOYMENTS: [&str; 2] = ["fleet-a", "fleet-b"];

/// The manifest an [`Action::Apply`] writes: `json` as the score (as a
/// string when it is not JSON, which the controller refuses) on the devices
/// `selector` picks.
pub fn fleet_manifest(deployment: &str, selector: &str, json: &str) -> Vec<u8> {
    let score = serde_json::from_str::<serde_json::Value>(json)
        .unwrap_or_else(|_| serde_json::Value::String(json.to_owned()));
    serde_json::json!({
        "apiVersion": podfleet_core::fleet::API_VERSION,
        "kind": podfleet_core::fleet::FLEET_DEPLOYMENT_KIND,
        "metadata": {"name": deployment},
        "spec": {"target": {"selector": selector}, "score": score},
    })
    .to_string()
    .into_bytes()
}

/// The selectors fleet deployments target.
pub const SELECTORS: [&str; 5] = ["site=a", "site=b", "site in (a,b),!canary", "!canary", ""];

/// The fleet's workload, drawn from its own stream so that the rest of a
/// seed's plan is what it was before fleets existed: labels for every
/// device, then applies, relabels, deletes and controller restarts until
/// `until_ms`.
fn fleet_steps(seed: u64, devices: u32, until_ms: u64, steps: &mut Vec<Step>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xf1ee_7000_0000_0000);
    let labels = |rng: &mut ChaCha8Rng| {
        let mut labels = BTreeMap::new();
        labels.insert("site".to_owned(), pick(rng, &["a", "b", "c"]).to_owned());
        if chance(rng, 25) {
            labels.insert("canary".to_owned(), String::new());
        }
        labels
    };
    for device in 0..devices {
        let labels = labels(&mut rng);
        steps.push(Step {
            at_ms: 1_000,
            action: Action::Label { device, labels },
        });
    }
    let span = until_ms.saturating_sub(2_000).max(1);
    let count = 2 + below(&mut rng, 6) + u64::from(devices / 4);
    for _ in 0..count {
        let at_ms = 2_000 + below(&mut rng, span);
        let deployment = pick(&mut rng, &FLEET_DEPLOYMENTS).to_owned();
        let action = match below(&mut rng, 100) {
            0..=49 => Action::Apply {
                deployment,
                selector: pick(&mut rng, &SELECTORS).to_owned(),
                json: valid_score(&mut rng),
            },
            50..=54 => Action::Apply {
                deployment,
                selector: pick(&mut rng, &SELECTORS).to_owned(),
                json: r#"{"services":[]}"#.to_owned(),
            },
            55..=79 => Action::Label {
                device: below(&mut rng, u64::from(devices)) as u32,
                labels: labels(&mut rng),
            },
            80..=91 => Action::Unapply { deployment },
            _ => Action::ControllerRestart {
                down_ms: below(&mut rng, 30_000),
            },
        };
        steps.push(Step { at_ms, action });
    }
}

/// The score of a rollout onto an image the devices do not have: only
/// their registry does ([`crate::world::REGISTRY_ONLY_IMAGES`]).
pub fn registry_rollout_score(image: &str) -> String {
    format!(
        r#"{{"services":[{{"name":"web","image":"{image}"}}],"lifecycle":{{"grace_period_secs":1}}}}"#
    )
}

/// The registry's and the disk's faults, and rollouts from a preloaded
/// image to one only the registry has (so that pulls happen while an old
/// revision runs), drawn from their own stream so that the rest of a
/// seed's plan is what it was before images were pulled. Returns the rate.
fn registry_steps(seed: u64, devices: u32, until_ms: u64, steps: &mut Vec<Step>) -> u64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x1e61_5700_0000_0000);
    let rate = below(&mut rng, 10);
    let span = until_ms.saturating_sub(2_000).max(1);
    // Both puts of a rollout before healing starts.
    let rollouts = if span > 20_000 { below(&mut rng, 3) } else { 0 };
    for _ in 0..rollouts {
        let device = below(&mut rng, u64::from(devices)) as u32;
        let deployment = pick(&mut rng, &DEPLOYMENTS).to_owned();
        let at_ms = 2_000 + below(&mut rng, span - 20_000);
        let (old, new) = (podfleet_testkit::images::A_1, podfleet_testkit::images::A_2);
        for (at_ms, image) in [(at_ms, old), (at_ms + 20_000, new)] {
            steps.push(Step {
                at_ms,
                action: Action::Put {
                    device,
                    deployment: deployment.clone(),
                    json: registry_rollout_score(image),
                },
            });
        }
    }
    for _ in 0..12 + 2 * u64::from(devices) {
        if !chance(&mut rng, rate * 3) {
            continue;
        }
        let device = below(&mut rng, u64::from(devices)) as u32;
        let at_ms = 2_000 + below(&mut rng, span);
        let for_ms = 5_000 + below(&mut rng, 120_000);
        let action = match below(&mut rng, 4) {
            0 => Action::RegistryDown { device, for_ms },
            1 => Action::RegistrySlow {
                device,
                for_ms,
                bytes_per_sec: 100_000 + below(&mut rng, 2_000_000),
            },
            2 => Action::CredentialsRefused { device, for_ms },
            _ => Action::DiskFull { device, for_ms },
        };
        steps.push(Step { at_ms, action });
    }
    rate
}

/// Images a `per_run` job's services run, each exiting by itself: with 0
/// after a second (twice as likely), with 1 after 7 s, with 5 after a
/// second.
pub const JOB_IMAGES: [&str; 4] = [
    images::INIT_OK,
    images::INIT_OK,
    images::CRASH,
    images::INIT_FAIL,
];

/// Setup scripts a job's service may carry: the ones that end at once, so
/// that they finish before the job does.
pub const JOB_SCRIPTS: [&str; 2] = [scripts::PROVISIONS, scripts::READS_STDIN];

/// A `per_run` job: web, and worker by chance, each on one of
/// [`JOB_IMAGES`], web by chance with one of [`JOB_SCRIPTS`].
pub fn job_score(rng: &mut ChaCha8Rng) -> String {
    let mut services = vec![serde_json::json!({"name": "web", "image": pick(rng, &JOB_IMAGES)})];
    if chance(rng, 30) {
        services[0]["setup_script"] = pick(rng, &JOB_SCRIPTS).into();
    }
    if chance(rng, 50) {
        services.push(serde_json::json!({"name": "worker", "image": pick(rng, &JOB_IMAGES)}));
    }
    serde_json::json!({"lifetime": "per_run", "services": services}).to_string()
}

/// A `no_launch` score: web, and worker by chance, each verifying one of
/// the base system's containers ([`base_system::NAMES`]: running, stopped,
/// on another image, missing), mostly on the image they run
/// ([`images::A_1`]), now and then on the drifted one's.
pub fn verify_score(rng: &mut ChaCha8Rng) -> String {
    let count = if chance(rng, 40) { 2 } else { 1 };
    let services: Vec<serde_json::Value> = ["web", "worker"][..count]
        .iter()
        .map(|name| {
            let image = if chance(rng, 80) {
                images::A_1
            } else {
                images::IGNORE_STOP
            };
            serde_json::json!({
                "name": name,
                "image": image,
                "container": pick(rng, &base_system::NAMES),
            })
        })
        .collect();
    serde_json::json!({"lifetime": "no_launch", "services": services}).to_string()
}

/// A persistent score whose web, on one of [`GOOD_IMAGES`], carries
/// `script`.
pub fn scripted_score(rng: &mut ChaCha8Rng, script: &str) -> String {
    serde_json::json!({
        "services": [{"name": "web", "image": pick(rng, &GOOD_IMAGES), "setup_script": script}],
        "lifecycle": {"grace_period_secs": 1 + below(rng, 3)},
    })
    .to_string()
}

/// How long after its last workload step a plan starts healing, in ms.
const HEAL_AFTER_MS: u64 = 5_000;

/// The seed of the lifetimes' own random stream, xor the plan's seed (the
/// discrete tier draws its lifetime ops from it too).
pub const LIFETIME_STREAM: u64 = 0x11fe_7100_0000_0000;

/// Whether `script` runs for a while before it ends (or never ends): an
/// agent that dies meanwhile leaves a container without its marker.
pub fn takes_a_while(script: &str) -> bool {
    !matches!(
        scripts::ending(script),
        podfleet_testkit::shell::ExecEnd::Exits { after, .. } if after.is_zero()
    )
}

/// The lifetimes' workload, drawn from their own stream so that the rest
/// of a seed's plan is what it was before lifetimes existed: puts of
/// `per_run` jobs ([`job_score`]), of `no_launch` scores verifying the
/// base system ([`verify_score`]) and of persistent scores with a setup
/// script from the catalogue ([`scripted_score`]: ones that provision, at
/// once or after 20 s, read stdin, fail, or hang past the setup timeout,
/// the last one time in four besides its share); seven in ten of the scripts that take a while are cut short by an agent
/// crash a few seconds after the put. Returns the rate.
fn lifetime_steps(seed: u64, devices: u32, until_ms: u64, steps: &mut Vec<Step>) -> u64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ LIFETIME_STREAM);
    let rate = below(&mut rng, 10);
    let span = until_ms.saturating_sub(2_000).max(1);
    for _ in 0..10 + 2 * u64::from(devices) {
        if !chance(&mut rng, rate * 6) {
            continue;
        }
        let device = below(&mut rng, u64::from(devices)) as u32;
        let deployment = pick(&mut rng, &DEPLOYMENTS).to_owned();
        let at_ms = 2_000 + below(&mut rng, span);
        let json = match below(&mut rng, 3) {
            0 => job_score(&mut rng),
            1 => verify_score(&mut rng),
            _ => {
                // A hang besides its share of the catalogue: its timeout
                // needs the deployment to stay put for a minute.
                let script = if chance(&mut rng, 25) {
                    scripts::HANGS
                } else {
                    pick(&mut rng, &scripts::ALL)
                };
                if takes_a_while(script) && chance(&mut rng, 70) {
                    let crash = Step {
                        at_ms: at_ms + 3_000 + below(&mut rng, 8_000),
                        action: Action::AgentCrash {
                            device,
                            keep_cache: chance(&mut rng, 60),
                            down_ms: below(&mut rng, 5_000),
                        },
                    };
                    // Before healing starts, as every fault is.
                    if crash.at_ms < until_ms + HEAL_AFTER_MS {
                        steps.push(crash);
                    }
                }
                scripted_score(&mut rng, script)
            }
        };
        steps.push(Step {
            at_ms,
            action: Action::Put {
                device,
                deployment,
                json,
            },
        });
    }
    rate
}

impl Plan {
    /// Expands `seed` into a plan for `devices` devices.
    pub fn generate(seed: u64, devices: u32) -> Plan {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let rates = Rates {
            crash: below(&mut rng, 25),
            api: below(&mut rng, 20),
            agent_crash: below(&mut rng, 6),
            network: below(&mut rng, 12),
            broker: below(&mut rng, 3),
            image: below(&mut rng, 5),
            duplicate: below(&mut rng, 10),
            restart_trouble: below(&mut rng, 8),
            oversize: below(&mut rng, 4),
            registry: 0,
            lifetimes: 0,
        };
        let max_payload = DEFAULT_MAX_PAYLOAD;
        let mut state_max_value = None;
        let devices = devices.max(1);
        let mut steps = Vec::new();
        let mut at_ms = 2_000;
        // Fleets get a workload per device, packed closer together.
        let workload = 12 + below(&mut rng, 20) + 3 * u64::from(devices.saturating_sub(2));
        let spread = u64::from(devices / 2).max(1);
        for _ in 0..workload {
            let device = below(&mut rng, u64::from(devices)) as u32;
            let deployment = pick(&mut rng, &DEPLOYMENTS).to_owned();
            let mut push = |at_ms: u64, action: Action| steps.push(Step { at_ms, action });
            match below(&mut rng, 100) {
                0..=54 => push(
                    at_ms,
                    Action::Put {
                        device,
                        deployment: deployment.clone(),
                        json: valid_score(&mut rng),
                    },
                ),
                55..=61 => {
                    let bad = [
                        "{",
                        r#"{"services":[]}"#,
                        r#"{"services":[{"name":"a.b","image":"x"}]}"#,
                    ];
                    push(
                        at_ms,
                        Action::Put {
                            device,
                            deployment: deployment.clone(),
                            json: pick(&mut rng, &bad).to_owned(),
                        },
                    );
                }
                62..=68 => {
                    let init = pick(&mut rng, &DOOMED_INIT_IMAGES);
                    push(
                        at_ms,
                        Action::Put {
                            device,
                            deployment: deployment.clone(),
                            json: format!(
                                r#"{{"services":[{{"name":"web","image":"img/app:1"}}],"init_containers":[{{"name":"bad","image":"{init}","timeout":5}}]}}"#
                            ),
                        },
                    );
                }
                69..=76 => push(
                    at_ms,
                    Action::Delete {
                        device,
                        deployment: deployment.clone(),
                    },
                ),
                77..=81 => push(at_ms, Action::Ping { device }),
                _ => {}
            }
            // Faults land shortly after the workload step, often mid-rollout.
            let soon = at_ms + below(&mut rng, 5_000);
            if chance(&mut rng, rates.crash) {
                let service = pick(&mut rng, &SERVICES);
                // Sometimes the same container crashes again and again.
                let times = if chance(&mut rng, 30) { 3 } else { 1 };
                for n in 0..times {
                    push(
                        soon + n * 25_000,
                        Action::Crash {
                            device,
                            container: format!("{deployment}_{service}"),
                            code: 1 + below(&mut rng, 3) as i64,
                        },
                    );
                }
            }
            if chance(&mut rng, rates.api) {
                let op = pick(&mut rng, &FAULTY_OPS).to_owned();
                let after_effect = op == "create" && chance(&mut rng, 50);
                push(
                    soon,
                    Action::ApiFault {
                        device,
                        op,
                        after_effect,
                        unavailable: chance(&mut rng, 50),
                    },
                );
            }
            if chance(&mut rng, rates.network) {
                let for_ms = 1_000 + below(&mut rng, 90_000);
                if chance(&mut rng, 60) {
                    push(soon, Action::Partition { device, for_ms });
                } else {
                    push(soon, Action::Hold { device, for_ms });
                }
            }
            if chance(&mut rng, rates.agent_crash) {
                push(
                    soon,
                    Action::AgentCrash {
                        device,
                        keep_cache: chance(&mut rng, 60),
                        down_ms: below(&mut rng, 30_000),
                    },
                );
            }
            if chance(&mut rng, rates.broker) {
                push(soon, Action::BrokerRestart);
            }
            if chance(&mut rng, rates.image) {
                push(
                    soon,
                    Action::ImageMissing {
                        device,
                        image: pick(&mut rng, &GOOD_IMAGES).to_owned(),
                        for_ms: below(&mut rng, 120_000),
                    },
                );
            }
            if chance(&mut rng, rates.api / 2) {
                push(
                    soon,
                    Action::SlowRuntime {
                        device,
                        for_ms: 10_000 + below(&mut rng, 120_000),
                        delay_ms: 200 + below(&mut rng, 8_000),
                    },
                );
            }
            if chance(&mut rng, rates.duplicate) {
                match below(&mut rng, 3) {
                    0 => push(soon, Action::Duplicate),
                    1 => push(soon, Action::Redeliver { device }),
                    _ => push(soon, Action::StaleDelivery { device }),
                }
            }
            if chance(&mut rng, rates.restart_trouble) {
                let trouble = if chance(&mut rng, 50) {
                    RuntimeTrouble::Slow {
                        delay_ms: 1_000 + below(&mut rng, 9_000),
                    }
                } else {
                    RuntimeTrouble::Unavailable
                };
                push(
                    soon,
                    Action::AgentRestartTrouble {
                        device,
                        keep_cache: chance(&mut rng, 60),
                        down_ms: below(&mut rng, 20_000),
                        for_ms: 5_000 + below(&mut rng, 60_000),
                        trouble,
                    },
                );
            }
            if chance(&mut rng, rates.oversize) {
                // Between half the limit and the limit: the score fits, a
                // report quoting the name twice does not.
                let name_bytes =
                    max_payload / 2 + max_payload / 8 + below(&mut rng, max_payload / 4);
                push(
                    at_ms + 500,
                    Action::PutOversized {
                        device,
                        deployment: pick(&mut rng, &DEPLOYMENTS).to_owned(),
                        name_bytes,
                    },
                );
            }
            if chance(&mut rng, rates.oversize) {
                state_max_value = Some(WIDE_STATE_LIMIT);
                push(
                    at_ms + 700,
                    Action::Put {
                        device,
                        deployment: pick(&mut rng, &DEPLOYMENTS).to_owned(),
                        json: wide_score(40),
                    },
                );
            }
            at_ms += (1_000 + below(&mut rng, 40_000)) / spread;
        }
        fleet_steps(seed, devices, at_ms, &mut steps);
        let rates = Rates {
            registry: registry_steps(seed, devices, at_ms, &mut steps),
            lifetimes: lifetime_steps(seed, devices, at_ms, &mut steps),
            ..rates
        };
        steps.sort_by_key(|s| s.at_ms);
        Plan {
            seed,
            devices,
            rates,
            steps,
            heal_at_ms: at_ms + HEAL_AFTER_MS,
            max_payload,
            state_max_value,
        }
    }

    /// Whether this is the plan its seed expands to, so that the seed alone
    /// replays it.
    pub fn is_generated(&self) -> bool {
        *self == Plan::generate(self.seed, self.devices)
    }

    /// The plan as JSON, to print or save.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a plan has only string map keys")
    }

    /// A plan saved by [`to_json`](Self::to_json).
    ///
    /// # Errors
    /// The decoder's error, naming what is wrong.
    pub fn from_json(text: &str) -> Result<Plan, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_data_and_round_trip() {
        let plan = Plan::generate(7, 3);
        assert!(!plan.steps.is_empty());
        assert!(plan.steps.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        assert!(plan.steps.iter().all(|s| s.at_ms < plan.heal_at_ms));
        assert_eq!(Plan::from_json(&plan.to_json()).unwrap(), plan);
        assert_eq!(
            Plan::generate(7, 3),
            plan,
            "a seed always expands the same way"
        );
    }

    #[test]
    fn the_lifetimes_are_drawn_before_healing() {
        // The events tier's default batch.
        let plans: Vec<Plan> = (0..128).map(|s| Plan::generate(s, 2)).collect();
        let mut seeds = BTreeMap::<&str, u32>::new();
        for plan in &plans {
            let mut kinds = std::collections::BTreeSet::new();
            for (i, step) in plan.steps.iter().enumerate() {
                if matches!(step.action, Action::AgentCrash { .. }) {
                    assert!(step.at_ms < plan.heal_at_ms, "{step:?}");
                }
                let Action::Put { json, device, .. } = &step.action else {
                    continue;
                };
                let Ok(score) = PodmanV0Score::from_json(json.as_bytes()) else {
                    continue;
                };
                let script = score.services[0].setup_script.as_deref();
                assert!(step.at_ms < plan.heal_at_ms, "{step:?}");
                kinds.insert(match (score.lifetime(), script) {
                    (Lifetime::PerRun, _) => "per_run",
                    (Lifetime::NoLaunch, _) => "no_launch",
                    (_, Some(_)) => "setup script",
                    _ => continue,
                });
                let cut_short = plan.steps[i..].iter().any(|s| {
                    matches!(s.action, Action::AgentCrash { device: d, .. } if d == *device)
                        && s.at_ms <= step.at_ms + 11_000
                });
                if script.is_some_and(takes_a_while) && cut_short {
                    kinds.insert("cut short");
                }
            }
            for kind in kinds {
                *seeds.entry(kind).or_default() += 1;
            }
            assert_eq!(Plan::from_json(&plan.to_json()).unwrap(), *plan);
        }
        // 84 put a job, 79 a verification, 82 a script, 42 cut a script
        // short, of the 128, when this was written.
        let at_least = [
            ("per_run", 40),
            ("no_launch", 40),
            ("setup script", 40),
            ("cut short", 15),
        ];
        for (kind, n) in at_least {
            assert!(
                seeds.get(kind).copied().unwrap_or(0) > n,
                "{kind}: {seeds:?}"
            );
        }
        // A plan saved before lifetimes existed still loads.
        let mut old: serde_json::Value = serde_json::from_str(&plans[0].to_json()).unwrap();
        old["rates"].as_object_mut().unwrap().remove("lifetimes");
        let old: Plan = serde_json::from_value(old).unwrap();
        assert_eq!(old.rates.lifetimes, 0);
    }

    #[test]
    fn registry_faults_and_registry_rollouts_are_drawn_and_leave_the_rest_alone() {
        let kinds = [
            "registry down",
            "registry slow",
            "credentials refused",
            "disk full",
        ];
        let plans: Vec<Plan> = (0..100).map(|s| Plan::generate(s, 2)).collect();
        for kind in kinds {
            let n = plans
                .iter()
                .flat_map(|p| &p.steps)
                .filter(|s| s.action.fault_kind() == Some(kind))
                .count();
            assert!(n > 5, "{kind}: {n}");
        }
        let rollouts = plans
            .iter()
            .flat_map(|p| &p.steps)
            .filter(|s| {
                matches!(&s.action, Action::Put { json, .. } if *json == registry_rollout_score(podfleet_testkit::images::A_2))
            })
            .count();
        assert!(rollouts > 20, "{rollouts}");
        for plan in &plans {
            let a2 = registry_rollout_score(podfleet_testkit::images::A_2);
            let mut mine = plan.steps.iter().filter(|s| {
                kinds.contains(&s.action.fault_kind().unwrap_or(""))
                    || matches!(&s.action, Action::Put { json, .. } if *json == a2)
            });
            assert!(mine.all(|s| s.at_ms < plan.heal_at_ms));
            assert_eq!(Plan::from_json(&plan.to_json()).unwrap(), *plan);
            // Without its registry stream, a plan is what it always was.
            let mut rng = ChaCha8Rng::seed_from_u64(plan.seed);
            assert_eq!(below(&mut rng, 25), plan.rates.crash);
        }
        // A plan saved before registry faults existed still loads.
        let mut old: serde_json::Value = serde_json::from_str(&plans[0].to_json()).unwrap();
        old["rates"].as_object_mut().unwrap().remove("registry");
        let old: Plan = serde_json::from_value(old).unwrap();
        assert_eq!(old.rates.registry, 0);
    }

    #[test]
    fn restart_trouble_and_oversized_puts_are_drawn() {
        let new = |p: &Plan| {
            p.steps
                .iter()
                .filter(|s| {
                    matches!(
                        s.action,
                        Action::AgentRestartTrouble { .. } | Action::PutOversized { .. }
                    )
                })
                .count()
        };
        let asked: Vec<Plan> = (0..200).map(|s| Plan::generate(s, 2)).collect();
        assert!(asked.iter().map(new).sum::<usize>() > 20);
        for plan in &asked {
            assert!(plan.is_generated());
            assert_eq!(Plan::from_json(&plan.to_json()).unwrap(), *plan);
            for step in &plan.steps {
                if let Action::PutOversized { name_bytes, .. } = step.action {
                    let score = oversized_score(name_bytes).len() as u64;
                    assert!(score < plan.max_payload && 2 * name_bytes > plan.max_payload);
                    assert!(is_malformed(&oversized_score(name_bytes)));
                }
            }
        }
    }
}
