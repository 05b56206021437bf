#![allow(clippy::unwrap_used)]
//! The production agent, as a child process, against a real nats-server
//! and a podman service of its own per test (a device whose containers no
//! other test sees). Every scenario checks the reported KV state and
//! podman's own ground truth.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use async_nats::ConnectOptions;
use e2e::agent::{reported, running, tokio_runtime, AgentProcess, Broker, Device, PsEntry};
use e2e::{eventually, unique_prefix, NatsServer, TEST_IMAGE};
use podfleet_core::wire::{FailureCause, Phase, RuntimeHealth};
use serde_json::{json, Value};

const AGENT: &str = env!("CARGO_BIN_EXE_podfleet-agent-e2e");
/// Generous: two cores shared with compilers.
const SETTLE: Duration = Duration::from_secs(45);

fn agent_binary() -> &'static Path {
    Path::new(AGENT)
}

/// A device id (and deployment-name stem) no other run uses.
fn unique_id(tag: &str) -> String {
    unique_prefix(tag)
}

fn ids_by_service(ps: &[PsEntry]) -> BTreeSet<(String, String)> {
    ps.iter()
        .map(|c| (c.service().to_owned(), c.id.clone()))
        .collect()
}

/// A service that records the signal that stops it, with its hostname
/// (podman's short container id), in `<dir>/signals`.
fn trapping_service(name: &str, env: Value, dir: &Path) -> Value {
    json!({
        "name": name,
        "image": TEST_IMAGE,
        "args": ["sh", "-c", "trap 'echo TERM $(hostname) >> /signals/log; exit 0' TERM; echo ready; while true; do sleep 0.2; done"],
        "env": env,
        "volumes": [{"source": dir.display().to_string(), "target": "/signals"}],
    })
}

fn sleeper(name: &str, env: Value) -> Value {
    json!({"name": name, "image": TEST_IMAGE, "args": ["sleep", "1000"], "env": env})
}

#[test]
fn deploy_tick_reput_upgrade_drop_and_delete() {
    tokio_runtime().block_on(async {
        let nats = NatsServer::start();
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let dev = unique_id("life");
        let mut device = Device::new(agent_binary(), &dev, &nats.url(), &[]);
        device.start_agent();
        let dep = format!("{dev}-shop");
        let signals = device.scratch("signals");
        let lifecycle = json!({"stop_signal": "SIGTERM", "grace_period_secs": 10});

        // Deploy.
        let v1 = json!({
            "services": [trapping_service("web", json!({"MODE": "one"}), &signals), sleeper("worker", json!({}))],
            "lifecycle": lifecycle,
        });
        let rev1 = broker.put(&dev, &dep, v1.to_string()).await;
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| s.phase == Phase::Running && s.revision == rev1)
            .await;
        let ps = device.containers(&dep);
        assert_eq!(running(&ps), reported(&state), "podman runs what is reported");
        assert_eq!(ps.len(), 2, "{ps:#?}");
        let web1 = state.container_ids["web"].clone();
        let worker1 = state.container_ids["worker"].clone();
        let env = device.inspect(&web1, "{{range .Config.Env}}{{.}} {{end}}");
        assert!(env.contains("MODE=one"), "{env}");
        let started = device.inspect(&web1, "{{.State.StartedAt}}");

        // Three ticks (1 s each) recreate and restart nothing.
        let uptime = broker.heartbeat(&dev).await.unwrap().uptime_s;
        eventually!("three more seconds of agent uptime", SETTLE, {
            broker
                .heartbeat(&dev)
                .await
                .filter(|h| h.uptime_s >= uptime + 3)
        });
        assert_eq!(ids_by_service(&device.containers(&dep)), reported(&state));
        assert_eq!(device.inspect(&web1, "{{.State.StartedAt}}"), started);

        // The same score again: a new revision, nothing touched.
        let rev2 = broker.put(&dev, &dep, v1.to_string()).await;
        let seen = format!("revision={rev2}");
        eventually!("the agent to see the re-put", SETTLE, {
            device.agent().log().contains(&seen).then_some(())
        });
        let after_tick = device.agent().log().len();
        eventually!("a tick after the re-put", SETTLE, {
            device.agent().log()[after_tick..]
                .contains("runtime op")
                .then_some(())
        });
        assert_eq!(ids_by_service(&device.containers(&dep)), reported(&state));
        assert_eq!(device.inspect(&web1, "{{.State.StartedAt}}"), started);
        assert!(!signals.join("log").exists(), "nothing was stopped");

        // Upgrade web's env: the old container is stopped by id with SIGTERM.
        let v2 = json!({
            "services": [trapping_service("web", json!({"MODE": "two"}), &signals), sleeper("worker", json!({}))],
            "lifecycle": lifecycle,
        });
        let rev3 = broker.put(&dev, &dep, v2.to_string()).await;
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| s.phase == Phase::Running && s.revision == rev3)
            .await;
        let web2 = state.container_ids["web"].clone();
        assert_ne!(web2, web1, "web was replaced");
        assert_eq!(state.container_ids["worker"], worker1, "worker did not change");
        let log = std::fs::read_to_string(signals.join("log")).unwrap();
        assert_eq!(log.trim(), format!("TERM {}", &web1[..12]), "old web got SIGTERM");
        let ps = device.containers(&dep);
        assert_eq!(running(&ps), reported(&state));
        assert_eq!(ps.len(), 2, "the old web is gone: {ps:#?}");
        let env = device.inspect(&web2, "{{range .Config.Env}}{{.}} {{end}}");
        assert!(env.contains("MODE=two"), "{env}");

        // Commands with the default configuration: ping answers, exec is refused.
        let ping = broker.command(&dev, "ping", "").await;
        assert_eq!(ping["ok"]["device_id"], json!(dev), "{ping}");
        assert_eq!(ping["ok"]["agent_version"], json!(env!("CARGO_PKG_VERSION")));
        let exec = json!({"deployment": dep, "service": "web", "argv": ["true"]});
        let refused = broker.command(&dev, "exec", &exec.to_string()).await;
        assert_eq!(refused["error"]["code"], json!("exec_disabled"), "{refused}");

        // Drop worker.
        let v3 = json!({
            "services": [trapping_service("web", json!({"MODE": "two"}), &signals)],
            "lifecycle": lifecycle,
        });
        let rev4 = broker.put(&dev, &dep, v3.to_string()).await;
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| s.phase == Phase::Running && s.revision == rev4)
            .await;
        assert_eq!(state.container_ids.len(), 1, "{state:?}");
        assert_eq!(state.container_ids["web"], web2, "web kept");
        let ps = device.containers(&dep);
        assert_eq!(running(&ps), reported(&state), "worker removed: {ps:#?}");
        assert_eq!(ps.len(), 1);

        // Delete: everything goes, and so does the reported state.
        broker.delete(&dev, &dep).await;
        eventually!("the state to be cleared", SETTLE, {
            broker.state(&dev, &dep).await.is_none().then_some(())
        });
        assert_eq!(device.containers(&dep), Vec::new());
        let log = std::fs::read_to_string(signals.join("log")).unwrap();
        assert!(log.contains(&format!("TERM {}", &web2[..12])), "{log}");
        assert!(device.agent().is_running());
    });
}

#[test]
fn init_containers_malformed_payloads_logs_and_exec() {
    tokio_runtime().block_on(async {
        let nats = NatsServer::start();
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let dev = unique_id("init");
        let mut device = Device::new(agent_binary(), &dev, &nats.url(), &["--allow-exec"]);
        device.start_agent();
        let work = device.scratch("work");
        let volume = json!([{"source": work.display().to_string(), "target": "/work"}]);
        let init = |name: &str, script: &str, timeout: u64| {
            json!({"name": name, "image": TEST_IMAGE, "args": ["sh", "-c", script], "volumes": volume, "timeout": timeout})
        };
        let web = json!({"name": "web", "image": TEST_IMAGE, "args": ["sh", "-c", "echo hello-web; sleep 1000"], "env": {"MODE": "e2e"}});

        let ordered = format!("{dev}-ordered");
        let exits = format!("{dev}-exits");
        let slow = format!("{dev}-slow");
        let bad = format!("{dev}-bad");
        let ok_rev = broker
            .put(&dev, &ordered, json!({
                "services": [web],
                "init_containers": [init("one", "echo one >> /work/order", 30), init("two", "echo two >> /work/order", 30)],
            }).to_string())
            .await;
        broker
            .put(&dev, &exits, json!({"services": [sleeper("web", json!({}))], "init_containers": [init("migrate", "exit 3", 30)]}).to_string())
            .await;
        broker
            .put(&dev, &slow, json!({"services": [sleeper("web", json!({}))], "init_containers": [init("hang", "sleep 1000", 1)]}).to_string())
            .await;
        broker.put(&dev, &bad, "{\"services\": [").await;
        // A key that is not <device>.<deployment> is skipped.
        broker.put_key(&format!("{dev}.Not_A_Name"), "{}").await;

        // In order, then the service.
        let state = broker
            .wait_state(&dev, &ordered, SETTLE, |s| s.phase == Phase::Running && s.revision == ok_rev)
            .await;
        assert_eq!(std::fs::read_to_string(work.join("order")).unwrap(), "one\ntwo\n");
        let ps = device.containers(&ordered);
        assert!(ps.iter().all(|c| !c.is_init()), "init containers removed: {ps:#?}");
        assert_eq!(running(&ps), reported(&state));

        // Exit code 3 fails the deployment; its service is never created.
        let state = broker
            .wait_state(&dev, &exits, SETTLE, |s| s.phase == Phase::Failed)
            .await;
        assert!(
            matches!(&state.cause, Some(FailureCause::InitContainerExited { name, exit_code: 3 }) if name == "migrate"),
            "{state:#?}"
        );
        assert!(device.containers(&exits).iter().all(PsEntry::is_init));

        // A timeout fails it and force-removes the init container.
        let state = broker
            .wait_state(&dev, &slow, SETTLE, |s| s.phase == Phase::Failed)
            .await;
        assert!(
            matches!(&state.cause, Some(FailureCause::InitContainerTimedOut { name, .. }) if name == "hang"),
            "{state:#?}"
        );
        assert!(device.containers(&slow).iter().all(PsEntry::is_init));
        eventually!("the timed-out init container to be removed", SETTLE, {
            device.containers(&slow).is_empty().then_some(())
        });

        // A malformed payload fails only its own deployment.
        let state = broker
            .wait_state(&dev, &bad, SETTLE, |s| s.phase == Phase::Failed)
            .await;
        assert!(
            matches!(&state.cause, Some(FailureCause::InvalidScore { .. })),
            "{state:#?}"
        );
        assert!(state.message.contains("line 1"), "{}", state.message);
        assert_eq!(device.containers(&bad), Vec::new());
        let state = broker.state(&dev, &ordered).await.unwrap();
        assert_eq!(state.phase, Phase::Running);
        assert!(device.agent().log().contains("Not_A_Name"), "the bad key is logged");

        // Logs and exec (allowed on this device).
        let logs = broker
            .command(&dev, "logs", &json!({"deployment": ordered, "service": "web", "tail_lines": 10}).to_string())
            .await;
        assert_eq!(logs["ok"]["text"], json!("hello-web\n"), "{logs}");
        assert_eq!(logs["ok"]["container_id"], json!(state.container_ids["web"]));
        let exec = broker
            .command(&dev, "exec", &json!({"deployment": ordered, "service": "web", "argv": ["sh", "-c", "echo $MODE; exit 4"]}).to_string())
            .await;
        assert_eq!(exec["ok"]["stdout"], json!("e2e\n"), "{exec}");
        assert_eq!(exec["ok"]["exit_code"], json!(4), "{exec}");
        let missing = broker
            .command(&dev, "logs", &json!({"deployment": ordered, "service": "nope"}).to_string())
            .await;
        assert_eq!(missing["error"]["code"], json!("not_found"), "{missing}");
    });
}

#[test]
fn kill_9_mid_upgrade_then_sigterm_leave_workloads_alone() {
    tokio_runtime().block_on(async {
        let nats = NatsServer::start();
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let dev = unique_id("kill");
        let mut device = Device::new(agent_binary(), &dev, &nats.url(), &[]);
        device.start_agent();
        let dep = format!("{dev}-app");
        let v1 = json!({"services": [sleeper("web", json!({"V": "1"})), sleeper("db", json!({}))]});
        let rev1 = broker.put(&dev, &dep, v1.to_string()).await;
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| s.phase == Phase::Running && s.revision == rev1)
            .await;
        let db = state.container_ids["db"].clone();

        // Upgrade web behind a slow init container; kill -9 while it runs.
        let v2 = json!({
            "services": [sleeper("web", json!({"V": "2"})), sleeper("db", json!({}))],
            "init_containers": [{"name": "migrate", "image": TEST_IMAGE, "args": ["sleep", "3"], "timeout": 60}],
        });
        let rev2 = broker.put(&dev, &dep, v2.to_string()).await;
        eventually!("the init container to run", SETTLE, {
            device
                .containers(&dep)
                .iter()
                .any(|c| c.is_init() && c.state == "running")
                .then_some(())
        });
        device.agent().kill9();
        device.start_agent();

        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| s.phase == Phase::Running && s.revision == rev2)
            .await;
        let ps = device.containers(&dep);
        assert_eq!(running(&ps), reported(&state), "{ps:#?}");
        assert_eq!(ps.len(), 2, "one container per service, no init left: {ps:#?}");
        assert_eq!(state.container_ids["db"], db, "the healthy db was not recreated");
        let env = device.inspect(&state.container_ids["web"], "{{range .Config.Env}}{{.}} {{end}}");
        assert!(env.contains("V=2"), "{env}");

        // SIGTERM: a clean exit, containers keep running.
        let status = device.agent().signal_and_wait("TERM", Duration::from_secs(10));
        assert!(status.success(), "{status:?}");
        assert_eq!(running(&device.containers(&dep)), reported(&state));

        // A restarted agent adopts them and recreates nothing.
        let started = device.inspect(&db, "{{.State.StartedAt}}");
        device.start_agent();
        let uptime_seen = eventually!("a heartbeat of the new agent after two ticks", SETTLE, {
            broker.heartbeat(&dev).await.filter(|h| h.uptime_s >= 3)
        });
        assert_eq!(uptime_seen.deployments, 1);
        assert_eq!(ids_by_service(&device.containers(&dep)), reported(&state));
        assert_eq!(device.inspect(&db, "{{.State.StartedAt}}"), started);
        let status = device.agent().signal_and_wait("INT", Duration::from_secs(10));
        assert!(status.success(), "SIGINT stops it cleanly too: {status:?}");
    });
}

#[test]
fn offline_boot_nats_restart_and_a_delete_made_while_away() {
    tokio_runtime().block_on(async {
        let mut nats = NatsServer::start();
        nats.stop();
        let dev = unique_id("away");
        let mut device = Device::new(agent_binary(), &dev, &nats.url(), &[]);
        device.start_agent();
        // It boots and keeps running without a broker.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(device.agent().is_running(), "{}", device.agent().log());

        nats.resume();
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let (gone, kept, late) = (
            format!("{dev}-gone"),
            format!("{dev}-kept"),
            format!("{dev}-late"),
        );
        let score = json!({"services": [sleeper("web", json!({}))]}).to_string();
        broker.put(&dev, &gone, score.clone()).await;
        broker.put(&dev, &kept, score.clone()).await;
        let kept_state = broker
            .wait_state(&dev, &kept, SETTLE, |s| s.phase == Phase::Running)
            .await;
        broker
            .wait_state(&dev, &gone, SETTLE, |s| s.phase == Phase::Running)
            .await;

        // A broker restart: the agent reconnects and keeps converging.
        nats.restart();
        broker.wait_connected().await;
        broker.put(&dev, &late, score.clone()).await;
        broker
            .wait_state(&dev, &late, SETTLE, |s| s.phase == Phase::Running)
            .await;

        // A delete made while the agent cannot reach the broker.
        let away = nats.move_away();
        let other = Broker::connect(&away, ConnectOptions::new()).await;
        other.delete(&dev, &gone).await;
        drop(other);
        assert!(
            !device.containers(&gone).is_empty(),
            "nothing changes while the agent is cut off"
        );
        nats.come_home();
        broker.wait_connected().await;
        eventually!(
            "the deployment deleted while away to be torn down",
            SETTLE,
            {
                (device.containers(&gone).is_empty() && broker.state(&dev, &gone).await.is_none())
                    .then_some(())
            }
        );
        assert_eq!(
            ids_by_service(&device.containers(&kept)),
            reported(&kept_state),
            "the kept deployment was not recreated"
        );
        assert!(device.agent().log().contains("desired state in sync"));
    });
}

#[test]
fn a_podman_socket_that_is_down_is_reported_in_heartbeats() {
    tokio_runtime().block_on(async {
        let nats = NatsServer::start();
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let dev = unique_id("nopod");
        let dir = tempfile::tempdir().unwrap();
        let args: Vec<String> = [
            "--device-id",
            &dev,
            "--nats-urls",
            &nats.url(),
            "--podman-socket",
            &dir.path().join("absent.sock").display().to_string(),
            "--state-dir",
            &dir.path().join("state").display().to_string(),
            "--heartbeat-interval",
            "1s",
        ]
        .iter()
        .map(|&a| a.to_owned())
        .collect();
        let mut agent = AgentProcess::spawn(agent_binary(), &args, &dir.path().join("agent.log"));
        let heartbeat = eventually!("a heartbeat saying podman is unreachable", SETTLE, {
            broker
                .heartbeat(&dev)
                .await
                .filter(|h| matches!(h.runtime, RuntimeHealth::Unreachable { .. }))
        });
        let RuntimeHealth::Unreachable { error } = heartbeat.runtime else {
            unreachable!()
        };
        assert!(error.contains("absent.sock"), "{error}");
        let ping = broker.command(&dev, "ping", "").await;
        assert_eq!(ping["ok"]["device_id"], json!(dev), "{ping}");
        assert!(agent.is_running());
    });
}

/// The first deployment after a start is not held up by the connection to
/// podman: the agent connects at start, in the background, with a call
/// podman answers at once. Once the agent is in sync with NATS, two
/// one-service deployments are put one after the other and each is timed
/// from the put to its `Running` report; the figures are printed (an
/// observation, not a timed assertion: `cargo test -p e2e --test agent
/// first_deployment -- --nocapture`). What is asserted is the order: podman
/// was connected before the first put arrived.
#[test]
fn the_first_deployment_after_start_finds_podman_connected() {
    tokio_runtime().block_on(async {
        let nats = NatsServer::start();
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let dev = unique_id("first");
        let mut device = Device::new(agent_binary(), &dev, &nats.url(), &[]);
        device.start_agent();
        eventually!("the agent to be in sync", SETTLE, {
            device
                .agent()
                .log()
                .contains("desired state in sync")
                .then_some(())
        });
        let score = json!({"services": [sleeper("web", json!({}))]}).to_string();
        let mut figures = Vec::new();
        for n in ["first", "second"] {
            let dep = format!("{dev}-{n}");
            let started = std::time::Instant::now();
            let rev = broker.put(&dev, &dep, score.clone()).await;
            broker
                .wait_state(&dev, &dep, SETTLE, |s| {
                    s.phase == Phase::Running && s.revision == rev
                })
                .await;
            figures.push(started.elapsed());
        }
        eprintln!(
            "put -> Running after start: first {:?}, second {:?}",
            figures[0], figures[1]
        );
        let log = device.agent().log();
        let at = |line: &str| {
            log.find(line)
                .unwrap_or_else(|| panic!("no {line:?} in\n{log}"))
        };
        assert!(
            at("connected to the container runtime") < at("desired put"),
            "the first put waited for podman:\n{log}"
        );
    });
}
