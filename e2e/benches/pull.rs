#![allow(clippy::unwrap_used)]
//! `cargo bench -p e2e --bench pull`: a first deploy that pulls its image
//! from a registry, against `podman pull` + `podman run -d` of the same
//! image in the same run (docs/performance.md, "Image pull performance").
//! A benchmark, not a test: it asserts only that the work was done, never
//! how long it took, and prints a markdown table of medians and ranges.
//!
//! One real `docker-registry` on loopback with htpasswd
//! ([`e2e::registry::Registry`]) holds one image: the busybox test image
//! with a [`PADDING`] layer of incompressible noise
//! ([`variant_image`]), pushed once. Each of [`ROUNDS`] rounds takes three
//! figures, each on a fresh isolated podman store (which holds only the
//! test image, so the padding and variant layers are pulled every time),
//! in an order that rotates from round to round:
//!
//! 1. **Baseline**: `podman pull --authfile` then `podman run -d` of the
//!    image by tag, with the registry's registries.conf, from the start of
//!    the pull until `podman run -d` returns (the container is then
//!    running).
//! 2. **Agent, by tag**: a device (its agent started with
//!    `--registry-auth-file`, the same file, and connected) gets a score
//!    naming the image; from the put until podman's own `start` event for
//!    the container, and until the agent's `Running` report of that
//!    revision. `podman ps` is checked afterwards to run what was reported.
//! 3. **Agent, by digest**: the same with the score pinned to the digest
//!    the push returned.
//!
//! Podman's event times (its `pull`, `create` and `start` events, read
//! back after each deploy) are used rather than polling `podman ps`, whose
//! every call is a process that would compete with the agent for the two
//! cores; `podman ps` is asked once at the end. With the times at which
//! the agent asked for each runtime operation (its debug log) they say
//! where the time goes: the pull against what the agent or the CLI adds.
//! The registry's access log says how many bytes each pull moved.
//!
//! Needs podman, runc, nats-server, docker-registry and htpasswd
//! (`cargo xtask provision`).

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::ConnectOptions;
use e2e::agent::{reported, running, tokio_runtime, Broker, Device};
use e2e::registry::{variant_image, Registry};
use e2e::{eventually, unique_prefix, NatsServer, PodmanService};
use futures_util::StreamExt;
use podfleet_core::wire::{DeploymentState, Phase};
use serde_json::json;

const AGENT: &str = env!("CARGO_BIN_EXE_podfleet-agent-e2e");
const ROUNDS: usize = 5;
/// The image's noise layer: a realistic application image's size.
const PADDING: usize = 24 * 1024 * 1024;
/// The workload's command, the same for podman and the agent.
const COMMAND: [&str; 2] = ["sleep", "100000"];
/// How long any single wait may take before the bench gives up.
const GIVE_UP: Duration = Duration::from_secs(300);
/// A pause after a store or an agent is started, so that its start-up
/// work is not in the figures.
const SETTLE: Duration = Duration::from_secs(1);

/// Podman's own account of one first deploy, from its event log: times
/// since the deploy was asked for.
///
/// podman 4.3 writes its `pull` event when a pull begins (libimage stamps
/// it before copying; later versions stamp it at the end), and nothing
/// when it ends; the container's `create` event is the first sign of its
/// end.
#[derive(Debug, Clone, Copy)]
struct Events {
    pull_began: Duration,
    created: Duration,
    started: Duration,
}

/// The baseline: `podman pull`, then `podman run -d`.
#[derive(Debug, Clone, Copy)]
struct Plain {
    /// `podman pull` returned.
    pulled: Duration,
    /// `podman run -d` returned, the container running.
    done: Duration,
    podman: Events,
}

/// A first deploy through the agent, times since the put.
#[derive(Debug, Clone)]
struct Deploy {
    /// The first state the agent reported for the revision.
    first_report: Option<Duration>,
    /// The first state saying the image is being pulled.
    pulling_reported: Option<Duration>,
    podman: Events,
    /// The `Running` report of the revision.
    done: Duration,
    /// The messages of the revision's states, in order, without repeats.
    messages: Vec<String>,
    /// The runtime operations the agent asked for after the put, with
    /// their times (from its debug log).
    ops: Vec<(Duration, String)>,
}

impl Deploy {
    /// When the agent first asked for the operation `name`.
    fn asked(&self, name: &str) -> Option<Duration> {
        self.ops
            .iter()
            .find(|(_, op)| op == name)
            .map(|(at, _)| *at)
    }
}

#[derive(Debug, Clone)]
struct Round {
    plain: Plain,
    by_tag: Deploy,
    by_digest: Deploy,
}

fn score(image: &str) -> String {
    json!({"services": [{"name": "app", "image": image, "args": COMMAND}]}).to_string()
}

fn unix_nanos(at: SystemTime) -> u128 {
    at.duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

/// The unix nanos of a log line's RFC 3339 UTC timestamp
/// (`2026-12-01T00:25:52.123456Z ...`, tracing's text format).
fn log_time(line: &str) -> Option<u128> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut date = date.split('-').map(str::parse::<i64>);
    let (year, month, day) = (date.next()?.ok()?, date.next()?.ok()?, date.next()?.ok()?);
    let (clock, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut clock = clock.split(':').map(str::parse::<i64>);
    let (hour, minute, second) = (
        clock.next()?.ok()?,
        clock.next()?.ok()?,
        clock.next()?.ok()?,
    );
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
    // days_from_civil).
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let of_era = year - era * 400;
    let of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + of_era * 365 + of_era / 4 - of_era / 100 + of_year - 719_468;
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second;
    let nanos: u128 = format!("{fraction:0<9}").get(..9)?.parse().ok()?;
    Some(u128::try_from(seconds).ok()? * 1_000_000_000 + nanos)
}

/// The runtime operations in an agent's `log` from `since` (unix nanos)
/// on, as times since then and names.
fn runtime_ops(log: &str, since: u128) -> Vec<(Duration, String)> {
    log.lines()
        .filter(|line| line.contains("runtime op"))
        .filter_map(|line| {
            let at = log_time(line)?.checked_sub(since)?;
            let op = line.split("op=\"").nth(1)?.split('"').next()?;
            Some((Duration::from_nanos(u64::try_from(at).ok()?), op.to_owned()))
        })
        .collect()
}

/// The first `pull` event, and `container`'s `create` and `start` events, on
/// `podman`'s store (which has seen one pull and one container), as times
/// since `since` (unix nanos).
fn podman_events(podman: &PodmanService, since: u128, container: &str) -> Events {
    let output = podman
        .podman()
        .args(["events", "--stream=false", "--format"])
        .arg("{{.Type}}\t{{.Status}}\t{{.Time.UnixNano}}\t{{.ID}}")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    let first = |kind: &str, status: &str, id: Option<&str>| -> Duration {
        let nanos: u128 = text
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split('\t').collect();
                let [k, s, at, i] = fields[..] else {
                    return None;
                };
                (k == kind && s == status && id.is_none_or(|id| i == id))
                    .then(|| at.parse::<u128>().ok())?
            })
            .min()
            .unwrap_or_else(|| panic!("no {kind} {status} event in:\n{text}"));
        Duration::from_nanos(u64::try_from(nanos.saturating_sub(since)).unwrap())
    };
    Events {
        // `podman run` writes a `pull` event of its own, for an image it
        // then finds in the store: the first one is the pull's.
        pull_began: first("image", "pull", None),
        created: first("container", "create", Some(container)),
        started: first("container", "start", Some(container)),
    }
}

/// `podman pull` + `podman run -d` of `image` on a fresh store.
fn baseline(registry: &Registry, image: &str, name: &str) -> Plain {
    let store = PodmanService::start_isolated_with_registries(&[], &registry.registries_conf());
    std::thread::sleep(SETTLE);
    let wall = unix_nanos(SystemTime::now());
    let started = Instant::now();
    let pull = store
        .podman()
        .args(["pull", "--quiet", "--authfile"])
        .arg(registry.auth_file())
        .arg(image)
        .output()
        .unwrap();
    let pulled = started.elapsed();
    assert!(pull.status.success(), "{pull:?}");
    let run = store
        .podman()
        .args(["run", "-d", "--name", name, image])
        .args(COMMAND)
        .output()
        .unwrap();
    let done = started.elapsed();
    assert!(run.status.success(), "{run:?}");
    let id = String::from_utf8_lossy(&run.stdout).trim().to_owned();
    let state = store
        .podman()
        .args(["inspect", "--format", "{{.State.Status}}", &id])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&state.stdout).trim(), "running");
    Plain {
        pulled,
        done,
        podman: podman_events(&store, wall, &id),
    }
}

/// A first deploy of `image` through an agent on a fresh store.
async fn deploy(
    registry: &Registry,
    nats: &NatsServer,
    broker: &Broker,
    id: &str,
    image: &str,
) -> Deploy {
    let podman = PodmanService::start_isolated_with_registries(&[], &registry.registries_conf());
    let auth = registry.auth_file().display().to_string();
    let mut device = Device::on(
        Path::new(AGENT),
        id,
        &nats.url(),
        &["--registry-auth-file", &auth],
        podman,
    );
    device.start_agent();
    eventually!("the agent's first heartbeat", GIVE_UP, {
        broker.heartbeat(id).await
    });
    tokio::time::sleep(SETTLE).await;

    let dep = format!("{id}-app");
    let mut watch = broker
        .state_store()
        .watch(format!("{id}.{dep}"))
        .await
        .unwrap();
    let wall = unix_nanos(SystemTime::now());
    let started = Instant::now();
    let rev = broker.put(id, &dep, score(image)).await;
    let (mut first_report, mut pulling_reported) = (None, None);
    let mut messages: Vec<String> = Vec::new();
    let state = tokio::time::timeout(GIVE_UP, async {
        loop {
            let entry = watch.next().await.unwrap().unwrap();
            let Ok(state) = serde_json::from_slice::<DeploymentState>(&entry.value) else {
                continue;
            };
            if state.revision != rev {
                continue;
            }
            let at = started.elapsed();
            first_report.get_or_insert(at);
            // The message quotes the image, shortened if long.
            if state.message.contains(": pulling \"") {
                pulling_reported.get_or_insert(at);
            }
            if messages.last() != Some(&state.message) {
                messages.push(state.message.clone());
            }
            if state.phase == Phase::Running {
                return state;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{id}: no Running report within {GIVE_UP:?}"));
    let done = started.elapsed();

    let ps = device.containers(&dep);
    assert!(!running(&ps).is_empty(), "{ps:#?}");
    assert_eq!(
        running(&ps),
        reported(&state),
        "podman runs what was reported"
    );
    Deploy {
        first_report,
        pulling_reported,
        podman: podman_events(device.podman(), wall, &state.container_ids["app"]),
        done,
        messages,
        ops: runtime_ops(&device.agent().log(), wall),
    }
}

fn millis(d: Duration) -> u128 {
    d.as_millis()
}

/// `median (min-max)` of `samples`, in milliseconds.
fn span(samples: &[Duration]) -> String {
    let mut sorted = samples.to_vec();
    sorted.sort();
    match (sorted.first(), sorted.get(sorted.len() / 2), sorted.last()) {
        (Some(min), Some(median), Some(max)) => {
            format!("{} ms ({}-{})", millis(*median), millis(*min), millis(*max))
        }
        _ => "-".into(),
    }
}

/// `median (min-max)` of `samples[i] / baselines[i]`.
fn ratio(samples: &[Duration], baselines: &[Duration]) -> String {
    let mut ratios: Vec<f64> = samples
        .iter()
        .zip(baselines)
        .map(|(sample, baseline)| sample.as_secs_f64() / baseline.as_secs_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    format!(
        "{:.2} ({:.2}-{:.2})",
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1]
    )
}

fn main() {
    let registry = Registry::start();
    let local = variant_image("pull", PADDING);
    let digest = registry.push(&local, "podfleet/pull:1");
    let by_tag = registry.image("podfleet/pull:1");
    let by_digest = registry.image(&format!("podfleet/pull@{digest}"));
    let size = e2e::podman()
        .args(["image", "inspect", "--format", "{{.Size}}", &local])
        .output()
        .unwrap();
    let size = String::from_utf8_lossy(&size.stdout).trim().to_owned();
    eprintln!("{by_tag} is {local}, {size} bytes, pushed as {digest}");

    let nats = NatsServer::start();
    let prefix = unique_prefix("pull");
    let rounds: Vec<Round> = tokio_runtime().block_on(async {
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let mut rounds = Vec::new();
        for index in 0..ROUNDS {
            let (mut plain, mut tagged, mut pinned) = (None, None, None);
            // The order rotates, so that none of the three always goes first.
            for step in 0..3 {
                match (index + step) % 3 {
                    0 => {
                        let name = format!("{prefix}-plain{index}");
                        plain = Some(baseline(&registry, &by_tag, &name));
                    }
                    1 => {
                        let id = format!("{prefix}-tag{index}");
                        tagged = Some(deploy(&registry, &nats, &broker, &id, &by_tag).await);
                    }
                    _ => {
                        let id = format!("{prefix}-digest{index}");
                        pinned = Some(deploy(&registry, &nats, &broker, &id, &by_digest).await);
                    }
                }
            }
            let round = Round {
                plain: plain.unwrap(),
                by_tag: tagged.unwrap(),
                by_digest: pinned.unwrap(),
            };
            eprintln!("round {index}: {round:?}");
            rounds.push(round);
        }
        rounds
    });

    // What went over the wire: the blobs the registry served, from its
    // access log (`"GET /v2/<name>/blobs/<digest> HTTP/1.1" 200 <bytes>`).
    let blobs: Vec<u64> = registry
        .log()
        .lines()
        .filter(|line| line.contains("\"GET /v2/podfleet/pull/blobs/"))
        .filter_map(|line| {
            line.split("\" 200 ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let pulls = u64::try_from(3 * ROUNDS).unwrap();
    let plain: Vec<Plain> = rounds.iter().map(|r| r.plain).collect();
    let tagged: Vec<&Deploy> = rounds.iter().map(|r| &r.by_tag).collect();
    let pinned: Vec<&Deploy> = rounds.iter().map(|r| &r.by_digest).collect();
    let baselines: Vec<Duration> = plain.iter().map(|p| p.done).collect();
    let of_plain = |f: fn(&Plain) -> Duration| span(&plain.iter().map(f).collect::<Vec<_>>());
    let times = |deploys: &[&Deploy], f: fn(&Deploy) -> Duration| -> Vec<Duration> {
        deploys.iter().map(|d| f(d)).collect()
    };
    let of_agent = |f: fn(&Deploy) -> Duration| {
        format!(
            "{} | {}",
            span(&times(&tagged, f)),
            span(&times(&pinned, f))
        )
    };
    let first_seen = |deploys: &[&Deploy], f: fn(&Deploy) -> Option<Duration>| -> String {
        let seen: Vec<Duration> = deploys.iter().filter_map(|d| f(d)).collect();
        match seen.len() {
            n if n == deploys.len() => span(&seen),
            n => format!("{n} of {} rounds: {}", deploys.len(), span(&seen)),
        }
    };

    println!(
        "first deploy of a {by_tag} ({} MiB of noise, {size} bytes unpacked) from a loopback \
         docker-registry, each on a fresh isolated podman store; median (min-max) of {ROUNDS} rounds:",
        PADDING / (1024 * 1024)
    );
    println!(
        "{} blobs served over {pulls} pulls: {} bytes a pull, the largest blob {} bytes",
        blobs.len(),
        blobs.iter().sum::<u64>() / pulls,
        blobs.iter().max().copied().unwrap_or_default()
    );
    println!();
    println!("| from the start (`podman pull` starts / the score is put) to | podman CLI: `pull` + `run -d` (baseline) | agent, by tag | agent, by digest |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| the agent's first report of the revision | | {} | {} |",
        first_seen(&tagged, |d| d.first_report),
        first_seen(&pinned, |d| d.first_report)
    );
    println!(
        "| its first `pulling` report | | {} | {} |",
        first_seen(&tagged, |d| d.pulling_reported),
        first_seen(&pinned, |d| d.pulling_reported)
    );
    println!(
        "| podman's `pull` event (the pull begins) | {} | {} |",
        of_plain(|p| p.podman.pull_began),
        of_agent(|d| d.podman.pull_began)
    );
    println!("| `podman pull` returns | {} | | |", of_plain(|p| p.pulled));
    println!(
        "| the agent asks podman for the pull | | {} | {} |",
        first_seen(&tagged, |d| d.asked("pull")),
        first_seen(&pinned, |d| d.asked("pull"))
    );
    println!(
        "| the agent asks podman to create the container (the pull and the agent's image inspect are over) | | {} | {} |",
        first_seen(&tagged, |d| d.asked("create")),
        first_seen(&pinned, |d| d.asked("create"))
    );
    println!(
        "| podman's `create` event (the container is created) | {} | {} |",
        of_plain(|p| p.podman.created),
        of_agent(|d| d.podman.created)
    );
    println!(
        "| podman's `start` event (the container runs) | {} | {} |",
        of_plain(|p| p.podman.started),
        of_agent(|d| d.podman.started)
    );
    println!(
        "| **done: `podman run -d` returns / the `Running` report** | **{}** | **{}** | **{}** |",
        span(&baselines),
        span(&times(&tagged, |d| d.done)),
        span(&times(&pinned, |d| d.done))
    );
    println!(
        "| **ratio: to podman's `start` event / baseline done** | | **{}** | **{}** |",
        ratio(&times(&tagged, |d| d.podman.started), &baselines),
        ratio(&times(&pinned, |d| d.podman.started), &baselines)
    );
    println!(
        "| **ratio: done / baseline done** | 1 | **{}** | **{}** |",
        ratio(&times(&tagged, |d| d.done), &baselines),
        ratio(&times(&pinned, |d| d.done), &baselines)
    );
    println!(
        "| of which: pull begins → `create` event (the pull, and what comes between it and the create) | {} | {} |",
        of_plain(|p| p.podman.created.saturating_sub(p.podman.pull_began)),
        of_agent(|d| d.podman.created.saturating_sub(d.podman.pull_began))
    );
    println!(
        "| of which: `create` → `start` event | {} | {} |",
        of_plain(|p| p.podman.started.saturating_sub(p.podman.created)),
        of_agent(|d| d.podman.started.saturating_sub(d.podman.created))
    );
    println!(
        "| of which: `start` event → done | {} | {} |",
        of_plain(|p| p.done.saturating_sub(p.podman.started)),
        of_agent(|d| d.done.saturating_sub(d.podman.started))
    );
    println!(
        "| of which, in the agent: its pull request → its create request (the pull, then an image inspect) | | {} | {} |",
        first_seen(&tagged, |d| Some(d.asked("create")?.saturating_sub(d.asked("pull")?))),
        first_seen(&pinned, |d| Some(d.asked("create")?.saturating_sub(d.asked("pull")?)))
    );
    for (label, deploy) in [
        ("by tag", tagged[ROUNDS - 1]),
        ("by digest", pinned[ROUNDS - 1]),
    ] {
        let ops: Vec<String> = deploy
            .ops
            .iter()
            .map(|(at, op)| format!("{op} {}", millis(*at)))
            .collect();
        println!();
        println!(
            "last round, {label}: the agent's reports {:?}; its runtime operations (ms after the put) [{}]",
            deploy.messages,
            ops.join(", ")
        );
    }
}
