#![allow(clippy::unwrap_used)]
//! What the agent reports around its own restarts and for values too large
//! to quote, against a real nats-server and podman (issue 10's two bugs).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::ConnectOptions;
use e2e::agent::{tokio_runtime, AgentProcess, Broker};
use e2e::{eventually, unique_prefix, NatsServer, PodmanService, TEST_IMAGE};
use futures_util::StreamExt;
use podfleet_agent::buckets::{ensure_bucket, BucketSettings, Ensured};
use podfleet_core::wire::{DeploymentState, FailureCause, Phase, RuntimeHealth};
use serde_json::json;

const AGENT: &str = env!("CARGO_BIN_EXE_podfleet-agent-e2e");
/// Generous: two cores shared with compilers.
const SETTLE: Duration = Duration::from_secs(45);

fn agent_args(device: &str, nats: &str, socket: &Path, state: &Path) -> Vec<String> {
    [
        "--device-id",
        device,
        "--nats-urls",
        nats,
        "--podman-socket",
        &socket.display().to_string(),
        "--state-dir",
        &state.display().to_string(),
        "--tick-interval",
        "1s",
        "--heartbeat-interval",
        "1s",
    ]
    .iter()
    .map(|&a| a.to_owned())
    .collect()
}

/// A device of its own (an isolated podman service) whose agent runs
/// against `nats`: the podman service, the agent's directory (kept while
/// the test runs), the device id and the agent.
fn device_with_agent(
    tag: &str,
    nats: &NatsServer,
) -> (PodmanService, tempfile::TempDir, String, AgentProcess) {
    let podman = PodmanService::start_isolated();
    let dir = tempfile::tempdir().unwrap();
    let dev = unique_prefix(tag);
    let args = agent_args(
        &dev,
        &nats.url(),
        podman.socket(),
        &dir.path().join("state"),
    );
    let agent = AgentProcess::spawn(Path::new(AGENT), &args, &dir.path().join("a.log"));
    (podman, dir, dev, agent)
}

fn sleeper(name: &str) -> serde_json::Value {
    json!({"name": name, "image": TEST_IMAGE, "args": ["sleep", "1000"]})
}

#[test]
fn a_restarted_agent_never_reports_healthy_deployments_as_failed() {
    tokio_runtime().block_on(async {
        let nats = NatsServer::start();
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let podman = PodmanService::start_isolated();
        let dir = tempfile::tempdir().unwrap();
        let (state_dir, log) = (dir.path().join("state"), dir.path().join("agent.log"));
        let dev = unique_prefix("restart");
        let up = agent_args(&dev, &nats.url(), podman.socket(), &state_dir);
        let down = agent_args(
            &dev,
            &nats.url(),
            &dir.path().join("absent.sock"),
            &state_dir,
        );

        let mut agent = AgentProcess::spawn(Path::new(AGENT), &up, &log);
        let dep = format!("{dev}-app");
        let score = json!({
            "services": [sleeper("web"), sleeper("db")],
            "init_containers": [{"name": "migrate", "image": TEST_IMAGE, "args": ["true"]}],
        });
        let revision = broker.put(&dev, &dep, score.to_string()).await;
        let first = broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.phase == Phase::Running && s.revision == revision
            })
            .await;

        // Every report published from here on, across three restarts.
        let seen: Arc<Mutex<Vec<DeploymentState>>> = Arc::default();
        let mut watch = broker
            .state_store()
            .watch(format!("{dev}.{dep}"))
            .await
            .unwrap();
        let recorder = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Some(Ok(entry)) = watch.next().await {
                if let Ok(state) = serde_json::from_slice(&entry.value) {
                    recorder.lock().unwrap().push(state);
                }
            }
        });

        // 1. kill -9, back with podman reachable.
        agent.kill9();
        agent = AgentProcess::spawn(Path::new(AGENT), &up, &log);
        tokio::time::sleep(Duration::from_secs(4)).await;
        // 2. SIGTERM, back with podman unreachable for a while.
        assert!(agent
            .signal_and_wait("TERM", Duration::from_secs(10))
            .success());
        agent = AgentProcess::spawn(Path::new(AGENT), &down, &log);
        eventually!("a heartbeat saying podman is unreachable", SETTLE, {
            broker
                .heartbeat(&dev)
                .await
                .filter(|h| matches!(h.runtime, RuntimeHealth::Unreachable { .. }))
        });
        tokio::time::sleep(Duration::from_secs(8)).await;
        // 3. Back with podman.
        assert!(agent
            .signal_and_wait("TERM", Duration::from_secs(10))
            .success());
        let mut agent = AgentProcess::spawn(Path::new(AGENT), &up, &log);
        eventually!("a heartbeat saying podman answers", SETTLE, {
            broker
                .heartbeat(&dev)
                .await
                .filter(|h| h.runtime == RuntimeHealth::Ok && h.uptime_s >= 2)
        });
        tokio::time::sleep(Duration::from_secs(2)).await;

        let seen = seen.lock().unwrap().clone();
        assert!(
            seen.iter().all(|s| s.phase == Phase::Running),
            "only Running may be reported for a deployment that ran all along: {seen:#?}\n{}",
            agent.log()
        );
        let last = broker.state(&dev, &dep).await.unwrap();
        assert_eq!(
            (
                last.phase,
                last.revision.get(),
                &last.container_ids,
                last.attempt
            ),
            (Phase::Running, revision, &first.container_ids, 1),
            "adopted, not recreated, and the attempt kept"
        );
        assert!(agent.is_running());
    });
}

#[test]
fn a_value_too_large_to_quote_gets_a_bounded_report_and_holds_up_nobody() {
    tokio_runtime().block_on(async {
        let nats = NatsServer::start();
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let (_podman, _dir, dev, mut agent) = device_with_agent("huge", &nats);

        // A 1,000,000-character service name: under NATS's 1 MiB payload
        // limit as a score, but twice over it when quoted twice in a report.
        let huge = json!({"services": [{"name": "w".repeat(1_000_000), "image": TEST_IMAGE}]});
        let (first, after) = (format!("{dev}-a-huge"), format!("{dev}-b-fine"));
        let bad = broker.put(&dev, &first, huge.to_string()).await;
        let good = broker
            .put(
                &dev,
                &after,
                json!({"services": [sleeper("web")]}).to_string(),
            )
            .await;

        let failed = broker
            .wait_state(&dev, &first, SETTLE, |s| s.revision == bad)
            .await;
        assert_eq!(failed.phase, Phase::Failed);
        assert!(
            matches!(failed.cause, Some(FailureCause::InvalidScore { .. })),
            "{failed:?}"
        );
        assert!(
            failed.message.contains("(1000000 bytes)"),
            "{}",
            failed.message
        );
        assert!(serde_json::to_vec(&failed).unwrap().len() < 4096);
        broker
            .wait_state(&dev, &after, SETTLE, |s| {
                s.phase == Phase::Running && s.revision == good
            })
            .await;
        assert!(agent.is_running(), "{}", agent.log());
    });
}

#[test]
fn a_state_over_the_buckets_value_limit_is_summarised_and_holds_up_nobody() {
    tokio_runtime().block_on(async {
        let nats = NatsServer::start();
        // An operator bounded the state bucket's values to 600 bytes.
        let admin = ConnectOptions::new().connect(nats.url()).await.unwrap();
        let made = ensure_bucket(
            &admin,
            &BucketSettings::new("podfleet-state").max_value_size(600),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(made, Ensured::Created);
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let (podman, _dir, dev, mut agent) = device_with_agent("wide", &nats);

        // Twelve services with long names: the Running report, with a
        // 64-character id each, is well over 600 bytes.
        let services: Vec<serde_json::Value> = (0..12)
            .map(|i| sleeper(&format!("service-{i:02}-{}", "x".repeat(30))))
            .collect();
        let (wide, after) = (format!("{dev}-a-wide"), format!("{dev}-b-fine"));
        let wide_rev = broker
            .put(&dev, &wide, json!({ "services": services }).to_string())
            .await;
        let fine_rev = broker
            .put(
                &dev,
                &after,
                json!({"services": [sleeper("web")]}).to_string(),
            )
            .await;

        let summary = broker
            .wait_state(&dev, &wide, SETTLE, |s| {
                s.phase == Phase::Running && s.revision == wide_rev
            })
            .await;
        assert!(summary.summarised, "{summary:?}");
        assert!(summary.container_ids.is_empty());
        assert!(
            summary.message.contains("over the broker's size limit"),
            "{}",
            summary.message
        );
        broker
            .wait_state(&dev, &after, SETTLE, |s| {
                s.phase == Phase::Running && s.revision == fine_rev
            })
            .await;
        eventually!("the twelve services to run", SETTLE, {
            let running = podman
                .podman()
                .args([
                    "ps",
                    "--filter",
                    &format!("label=io.podfleet.deployment={wide}"),
                    "-q",
                ])
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).lines().count());
            running.filter(|&n| n == 12)
        });
        assert!(
            agent.log().contains("publishing its summary instead"),
            "{}",
            agent.log()
        );
        assert!(agent.is_running());
    });
}
