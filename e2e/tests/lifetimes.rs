#![allow(clippy::unwrap_used)]
//! Lifetimes on real podman, through the production agent and a real
//! nats-server: `no_launch` verifies a container the device's base system
//! runs and touches nothing; `per_run` runs a job once and reports its exit
//! codes; `persistent` restarts the stopped containers of a rebooted
//! podman, never recreates them.

use std::path::Path;
use std::time::Duration;

use async_nats::ConnectOptions;
use e2e::agent::{tokio_runtime, Broker, Device};
use e2e::{eventually, unique_prefix, NatsServer, TEST_IMAGE};
use podfleet_core::wire::{FailureCause, Phase, VerifiedStatus};
use serde_json::json;

const AGENT: &str = env!("CARGO_BIN_EXE_podfleet-agent-e2e");
/// Generous: two cores shared with compilers.
const SETTLE: Duration = Duration::from_secs(45);

fn podman(device: &Device, args: &[&str]) -> String {
    let out = device.podman().podman().args(args).output().unwrap();
    assert!(out.status.success(), "podman {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `podman inspect` of a container: id, state and start count.
fn ground_truth(device: &Device, name: &str) -> (String, String, String) {
    let text = podman(
        device,
        &[
            "inspect",
            "--format",
            "{{.Id}} {{.State.Status}} {{.State.StartedAt}}",
            name,
        ],
    );
    let mut parts = text.splitn(3, ' ');
    let mut next = || parts.next().unwrap_or_default().to_owned();
    (next(), next(), next())
}

#[test]
fn no_launch_verifies_what_the_base_system_runs_and_touches_nothing() {
    tokio_runtime().block_on(async {
        let nats = NatsServer::start();
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let dev = unique_prefix("nolaunch");
        let mut device = Device::new(Path::new(AGENT), &dev, &nats.url(), &[]);
        device.start_agent();
        // The base system's container, without podfleet's labels.
        let id = podman(
            &device,
            &[
                "run", "-d", "--name", "base_web", TEST_IMAGE, "sleep", "1000",
            ],
        );
        let dep = format!("{dev}-edge");
        let score = json!({
            "lifetime": "no_launch",
            "services": [{"name": "web", "image": TEST_IMAGE, "container": "base_web"}],
        });
        let rev = broker.put(&dev, &dep, score.to_string()).await;
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.phase == Phase::Running && s.revision == rev
            })
            .await;
        assert_eq!(state.container_ids["web"], id);
        assert_eq!(state.verified["web"].status, VerifiedStatus::Running);

        // The base system stops it: reported, not restarted.
        podman(&device, &["stop", "--time", "0", "base_web"]);
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| s.phase == Phase::Failed)
            .await;
        assert!(
            matches!(
                &state.cause,
                Some(FailureCause::Unverified {
                    status: VerifiedStatus::Stopped,
                    ..
                })
            ),
            "{state:#?}"
        );
        std::thread::sleep(Duration::from_secs(3));
        let (same, status, _) = ground_truth(&device, "base_web");
        assert_eq!((same.as_str(), status.as_str()), (id.as_str(), "exited"));

        // Back up: running again. Gone: missing, and nothing made in its place.
        podman(&device, &["start", "base_web"]);
        broker
            .wait_state(&dev, &dep, SETTLE, |s| s.phase == Phase::Running)
            .await;
        podman(&device, &["rm", "--force", "--time", "0", "base_web"]);
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.verified
                    .get("web")
                    .is_some_and(|v| v.status == VerifiedStatus::Missing)
            })
            .await;
        assert_eq!(state.phase, Phase::Failed);
        let all = podman(&device, &["ps", "-a", "--format", "{{.Names}}"]);
        assert!(all.is_empty(), "nothing was created: {all}");

        // Running again, then deleted: the deployment goes, the container stays.
        let again = podman(
            &device,
            &[
                "run", "-d", "--name", "base_web", TEST_IMAGE, "sleep", "1000",
            ],
        );
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| s.phase == Phase::Running)
            .await;
        assert_eq!(state.container_ids["web"], again);
        let (_, _, started) = ground_truth(&device, "base_web");
        broker.delete(&dev, &dep).await;
        eventually!("the report to go", SETTLE, {
            broker.state(&dev, &dep).await.is_none().then_some(())
        });
        std::thread::sleep(Duration::from_secs(3));
        // Untouched: the same container, running since it was started by hand.
        assert_eq!(
            ground_truth(&device, "base_web"),
            (again, "running".to_owned(), started)
        );
    });
}

#[test]
fn per_run_runs_once_reports_exit_codes_and_keeps_logs() {
    tokio_runtime().block_on(async {
        let nats = NatsServer::start();
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let dev = unique_prefix("perrun");
        let mut device = Device::new(Path::new(AGENT), &dev, &nats.url(), &[]);
        device.start_agent();
        let dep = format!("{dev}-batch");
        let score = json!({
            "lifetime": "per_run",
            "services": [
                {"name": "fetch", "image": TEST_IMAGE, "args": ["sh", "-c", "echo fetched; sleep 1"]},
                {"name": "index", "image": TEST_IMAGE, "args": ["sh", "-c", "echo broken >&2; exit 3"]},
            ],
        });
        let rev = broker.put(&dev, &dep, score.to_string()).await;
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.revision == rev && s.exit_codes.len() == 2
            })
            .await;
        assert_eq!(state.phase, Phase::Failed, "{state:#?}");
        assert_eq!(
            state.cause,
            Some(FailureCause::RunFailed {
                service: "index".into(),
                exit_code: 3
            })
        );
        assert_eq!(state.exit_codes["fetch"], 0);
        // Ran once: no restart, no retry.
        std::thread::sleep(Duration::from_secs(5));
        let ps = device.containers(&dep);
        assert_eq!(ps.len(), 2, "{ps:#?}");
        assert!(ps.iter().all(|c| c.state == "exited"), "{ps:#?}");
        let fetch = ps.iter().find(|c| c.service() == "fetch").unwrap();
        let started = ground_truth(&device, &fetch.id).2;
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(ground_truth(&device, &fetch.id).2, started);
        // Its logs are still there for people to read.
        let logs = broker
            .command(
                &dev,
                "logs",
                &json!({"deployment": dep, "service": "fetch", "tail_lines": 10}).to_string(),
            )
            .await;
        assert_eq!(logs["ok"]["text"], json!("fetched\n"), "{logs}");

        // A new revision runs again; a success reads succeeded.
        let ok = json!({
            "lifetime": "per_run",
            "services": [{"name": "fetch", "image": TEST_IMAGE, "args": ["true"]}],
        });
        let rev = broker.put(&dev, &dep, ok.to_string()).await;
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.revision == rev && s.phase == Phase::Succeeded
            })
            .await;
        assert_eq!(state.exit_codes["fetch"], 0);
        let ps = device.containers(&dep);
        assert_eq!(ps.len(), 1, "the old run's containers went: {ps:#?}");
        let first = ps[0].id.clone();

        // `podfleet rollout restart`: the same spec, restarted once, runs
        // again in a container of its own; put again, it does not.
        let mut restarted = ok.clone();
        restarted["restart"] = json!(1);
        let rev = broker.put(&dev, &dep, restarted.to_string()).await;
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.revision == rev && s.phase == Phase::Succeeded
            })
            .await;
        assert_eq!(state.exit_codes["fetch"], 0);
        let ps = device.containers(&dep);
        assert_eq!(ps.len(), 1, "{ps:#?}");
        assert_ne!(ps[0].id, first, "the restart ran in a new container");
        let second = ps[0].id.clone();
        let rev = broker.put(&dev, &dep, restarted.to_string()).await;
        broker
            .wait_state(&dev, &dep, SETTLE, |s| s.revision == rev)
            .await;
        let ps = device.containers(&dep);
        assert_eq!(
            ps.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            [second.as_str()],
            "a re-put of the same spec is the same run"
        );
    });
}

#[test]
fn persistent_containers_stopped_by_a_reboot_are_restarted_never_recreated() {
    tokio_runtime().block_on(async {
        let nats = NatsServer::start();
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let dev = unique_prefix("reboot");
        let mut device = Device::new(Path::new(AGENT), &dev, &nats.url(), &[]);
        device.start_agent();
        let dep = format!("{dev}-svc");
        let score = json!({
            "services": [{"name": "web", "image": TEST_IMAGE, "args": ["sleep", "1000"]}],
        });
        let rev = broker.put(&dev, &dep, score.to_string()).await;
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.phase == Phase::Running && s.revision == rev
            })
            .await;
        let id = state.container_ids["web"].clone();
        // The reboot: the agent dies, the containers stop, podman restarts.
        device.agent().kill9();
        podman(&device, &["stop", "--all", "--time", "0"]);
        device.podman_mut().restart();
        device.start_agent();
        eventually!("the same container to run again", SETTLE, {
            let (same, status, _) = ground_truth(&device, &id);
            (same == id && status == "running").then_some(())
        });
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| s.phase == Phase::Running)
            .await;
        assert_eq!(state.container_ids["web"], id, "restarted, not recreated");
        assert_eq!(device.containers(&dep).len(), 1);
    });
}

#[test]
fn a_setup_script_runs_from_a_file_in_each_fresh_container_and_its_failure_is_typed() {
    tokio_runtime().block_on(async {
        let nats = NatsServer::start();
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let dev = unique_prefix("setup");
        let mut device = Device::new(Path::new(AGENT), &dev, &nats.url(), &[]);
        device.start_agent();
        let dep = format!("{dev}-svc");
        // `cat` reads stdin: fed on stdin, it would swallow the rest and
        // the script would still exit 0 without writing /ran.
        let script = "cat\necho provisioned > /ran\nfalse | true\n";
        let score = json!({"services": [{
            "name": "web", "image": TEST_IMAGE, "args": ["sleep", "1000"], "setup_script": script,
        }]});
        let rev = broker.put(&dev, &dep, score.to_string()).await;
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.revision == rev && s.phase != Phase::Pending
            })
            .await;
        // With pipefail, `false | true` fails the script.
        match &state.cause {
            Some(FailureCause::SetupScriptFailed { exit_code, .. }) => {
                assert_eq!(*exit_code, Some(1), "{state:#?}");
            }
            other => panic!("{other:?}"),
        }
        eventually!("the failed container to go", SETTLE, {
            device.containers(&dep).is_empty().then_some(())
        });

        let script = "cat\necho provisioned > /ran\necho done\n";
        let score = json!({"services": [{
            "name": "web", "image": TEST_IMAGE, "args": ["sleep", "1000"], "setup_script": script,
        }]});
        let rev = broker.put(&dev, &dep, score.to_string()).await;
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.revision == rev && s.phase == Phase::Running
            })
            .await;
        let id = &state.container_ids["web"];
        assert_eq!(podman(&device, &["exec", id, "cat", "/ran"]), "provisioned");
        // The agent restarts: the container shows its marker and is kept.
        device.agent().kill9();
        device.start_agent();
        std::thread::sleep(Duration::from_secs(5));
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| s.phase == Phase::Running)
            .await;
        assert_eq!(&state.container_ids["web"], id);
        assert_eq!(device.containers(&dep).len(), 1);
    });
}
