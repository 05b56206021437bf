#![allow(clippy::unwrap_used)]
//! `cargo bench -p e2e --bench agent`: the agent's performance figures on
//! this machine (docs/performance.md), against a real nats-server and an
//! isolated podman service. A benchmark, not a test: it asserts nothing
//! about the numbers and prints them as a markdown table.
//!
//! 1. Time from a desired-state put to the Running report, one service,
//!    against a plain `podman run -d` of the same image on the same store.
//! 2. Idle resident memory (VmRSS) with 10 deployments.
//! 3. CPU time per liveness tick, and runtime API calls per tick, with
//!    those 10 services.

use std::time::{Duration, Instant};

use async_nats::ConnectOptions;
use e2e::agent::{tokio_runtime, Broker, Device};
use e2e::{unique_prefix, NatsServer, TEST_IMAGE};
use futures_util::StreamExt;
use podfleet_core::wire::{DeploymentState, Phase};
use serde_json::json;

const AGENT: &str = env!("CARGO_BIN_EXE_podfleet-agent-e2e");
const ROUNDS: usize = 7;
const IDLE: Duration = Duration::from_secs(20);

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// `(VmRSS in KiB, utime + stime in clock ticks)` of `pid`.
fn usage(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let cpu = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    (rss, cpu)
}

fn main() {
    tokio_runtime().block_on(async {
        let nats = NatsServer::start();
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let dev = unique_prefix("bench");
        let mut device = Device::new(std::path::Path::new(AGENT), &dev, &nats.url(), &[]);
        device.start_agent();
        let score =
            json!({"services": [{"name": "web", "image": TEST_IMAGE, "args": ["sleep", "1000"]}]})
                .to_string();

        // 1. put -> Running, against podman run.
        let mut agent_times = Vec::new();
        let mut podman_times = Vec::new();
        for round in 0..ROUNDS {
            let dep = format!("{dev}-r{round}");
            let mut watch = broker
                .state_store()
                .watch(format!("{dev}.{dep}"))
                .await
                .unwrap();
            let started = Instant::now();
            broker.put(&dev, &dep, score.clone()).await;
            loop {
                let entry = watch.next().await.unwrap().unwrap();
                let state: Option<DeploymentState> = serde_json::from_slice(&entry.value).ok();
                if state.is_some_and(|s| s.phase == Phase::Running) {
                    break;
                }
            }
            agent_times.push(started.elapsed());
            broker.delete(&dev, &dep).await;

            let started = Instant::now();
            let status = device
                .podman()
                .podman()
                .args([
                    "run",
                    "-d",
                    "--name",
                    &format!("{dev}-plain{round}"),
                    TEST_IMAGE,
                    "sleep",
                    "1000",
                ])
                .output()
                .unwrap();
            podman_times.push(started.elapsed());
            assert!(status.status.success(), "{status:?}");
        }
        let (agent, plain) = (median(agent_times.clone()), median(podman_times.clone()));

        // 2. and 3.: ten deployments, then idle.
        let mut states = Vec::new();
        for n in 0..10 {
            let dep = format!("{dev}-idle{n}");
            let rev = broker.put(&dev, &dep, score.clone()).await;
            states.push((dep, rev));
        }
        for (dep, rev) in &states {
            broker
                .wait_state(&dev, dep, Duration::from_secs(60), |s| {
                    s.phase == Phase::Running && s.revision == *rev
                })
                .await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let pid = device.agent().pid();
        let log_before = device.agent().log().len();
        let (rss_before, cpu_before) = usage(pid);
        tokio::time::sleep(IDLE).await;
        let (rss, cpu_after) = usage(pid);
        let log = device.agent().log()[log_before..].to_owned();
        let ops: Vec<&str> = log.lines().filter(|l| l.contains("runtime op")).collect();
        let lists = ops.iter().filter(|l| l.contains("op=\"list\"")).count();
        let ticks = IDLE.as_secs();
        let clock_tick_ms = 10; // USER_HZ is 100 on Linux
        let cpu_ms = (cpu_after - cpu_before) * clock_tick_ms;

        println!("| figure | value |");
        println!("| --- | --- |");
        println!("| put -> Running report, one service (median of {ROUNDS}) | {agent:.0?} |");
        println!("| plain `podman run -d` of the same image (median of {ROUNDS}) | {plain:.0?} |");
        println!(
            "| ratio | {:.2} |",
            agent.as_secs_f64() / plain.as_secs_f64()
        );
        println!("| agent samples | {agent_times:.0?} |");
        println!("| podman samples | {podman_times:.0?} |");
        println!(
            "| idle VmRSS, 10 deployments | {} KiB ({:.1} MiB; {} KiB before the idle window) |",
            rss,
            rss as f64 / 1024.0,
            rss_before
        );
        println!(
            "| CPU over {ticks} idle 1 s ticks | {cpu_ms} ms ({:.1} ms per tick) |",
            cpu_ms as f64 / ticks as f64
        );
        println!(
            "| runtime API calls in {ticks} ticks, 10 services | {} ({} list) |",
            ops.len(),
            lists
        );
    });
}
