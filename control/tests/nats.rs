#![allow(clippy::unwrap_used, missing_docs)]
//! The control plane against a real nats-server: the buckets it makes, the
//! deployments and device records it keeps, the snapshot it reads, and the
//! controller process converging fake devices (heartbeats and records
//! written directly; no agents).

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::kv;
use e2e::{eventually, NatsServer};
use podfleet_agent::buckets::{ensure_bucket, Ensured};
use podfleet_control::client::{BucketPlan, ClientError, FleetClient};
use podfleet_control::context::Connection;
use podfleet_control::run::{run_controller, ControllerOptions};
use podfleet_core::fleet::controller::{Config, Output};
use podfleet_core::fleet::{FleetDeployment, API_VERSION, FLEET_DEPLOYMENT_KIND};
use podfleet_core::time::Backoff;
use podfleet_core::wire::names::{DESIRED_BUCKET, HEARTBEAT_BUCKET, STATE_BUCKET, STATUS_BUCKET};
use podfleet_core::wire::{DeploymentKey, DeploymentName, DeviceId, Verb};
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const SETTLE: Duration = Duration::from_secs(20);
const TIMEOUT: Duration = Duration::from_secs(5);

fn name(s: &str) -> DeploymentName {
    DeploymentName::new(s).unwrap()
}

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn manifest(deployment: &str, target: serde_json::Value) -> FleetDeployment {
    FleetDeployment::from_value(json!({
        "apiVersion": API_VERSION,
        "kind": FLEET_DEPLOYMENT_KIND,
        "metadata": {"name": deployment},
        "spec": {"target": target, "score": {"services": [{"name": "app", "image": "web:1"}]}},
    }))
    .unwrap()
}

async fn connect(server: &NatsServer) -> FleetClient {
    FleetClient::connect(
        &Connection::new(vec![server.url()]),
        &BucketPlan::default(),
        TIMEOUT,
    )
    .await
    .unwrap()
}

async fn store(server: &NatsServer, bucket: &str) -> kv::Store {
    let client = async_nats::connect(server.url()).await.unwrap();
    async_nats::jetstream::new(client)
        .get_key_value(bucket)
        .await
        .unwrap()
}

/// The keys of `store` that hold a value, with their revisions.
async fn live_keys(store: &kv::Store) -> Vec<(String, u64)> {
    use futures_util::StreamExt;
    let mut keys: Vec<String> = match store.keys().await {
        Ok(keys) => keys.filter_map(|k| async move { k.ok() }).collect().await,
        Err(_) => Vec::new(),
    };
    keys.sort();
    let mut live = Vec::new();
    for key in keys {
        if let Ok(Some(entry)) = store.entry(key.clone()).await {
            if entry.operation == kv::Operation::Put {
                live.push((key, entry.revision));
            }
        }
    }
    live
}

async fn key_names(store: &kv::Store) -> Vec<String> {
    live_keys(store).await.into_iter().map(|(k, _)| k).collect()
}

fn heartbeat(device: &str) -> String {
    json!({"device_id": device, "agent_version": "0.1.0", "uptime_s": 5}).to_string()
}

/// A controller task and the way to stop it.
struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    fn start(server: &NatsServer) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let options = ControllerOptions {
            config: Config {
                status_interval: Duration::from_millis(100),
                ..Config::default()
            },
            restart_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
            ..ControllerOptions::default()
        };
        let task = tokio::spawn(run_controller(
            Connection::new(vec![server.url()]),
            BucketPlan::default(),
            options,
            async {
                let _ = stopped.await;
            },
        ));
        Self { stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(TIMEOUT, self.task)
            .await
            .expect("the controller stops on shutdown")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_creates_the_six_buckets() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    let nats = async_nats::connect(server.url()).await.unwrap();
    for settings in BucketPlan::default().buckets {
        assert_eq!(
            ensure_bucket(&nats, &settings, TIMEOUT).await.unwrap(),
            Ensured::Existing {
                differences: vec![]
            },
            "{}",
            settings.name()
        );
    }
    // A second connect finds them and changes nothing.
    drop(client);
    connect(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_named() {
    let mut server = NatsServer::start();
    let url = server.url();
    server.stop();
    let error = FleetClient::connect(
        &Connection::new(vec![url.clone()]),
        &BucketPlan::default(),
        Duration::from_secs(2),
    )
    .await
    .unwrap_err();
    assert!(error.to_string().contains(&url), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_are_put_read_and_deleted() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    let web = manifest("web", json!({"selector": "site=lyon"}));
    let first = client.put_deployment(&web).await.unwrap();
    let second = client.put_deployment(&web).await.unwrap();
    assert!(second > first);
    let (generation, stored) = client.deployment(&name("web")).await.unwrap().unwrap();
    assert_eq!(generation, second);
    assert_eq!(stored, web);
    assert!(client.delete_deployment(&name("web")).await.unwrap());
    assert!(!client.delete_deployment(&name("web")).await.unwrap());
    assert!(!client.delete_deployment(&name("never")).await.unwrap());
    assert_eq!(client.deployment(&name("web")).await.unwrap(), None);
    // A deleted deployment can be applied again.
    assert!(client.put_deployment(&web).await.unwrap() > second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_to_an_absent_agent_says_so() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    let error = client
        .command(&id("rpi-01"), Verb::Ping, json!({}), TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ClientError::AgentNotConnected { device, subject } if device.as_str() == "rpi-01" && subject == "device-commands.rpi-01.ping"),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_labels_all_land() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    let device = id("rpi-01");
    assert!(client
        .device_record(&device)
        .await
        .unwrap()
        .labels
        .is_empty());
    let labels: Vec<(String, String)> =
        (0..8).map(|i| (format!("k{i}"), format!("v{i}"))).collect();
    let calls = labels.iter().map(|label| {
        let client = client.clone();
        let device = device.clone();
        let label = label.clone();
        tokio::spawn(async move { client.label_device(&device, &[label], &[]).await })
    });
    for call in futures_util::future::join_all(calls).await {
        call.unwrap().unwrap();
    }
    let record = client.device_record(&device).await.unwrap();
    assert_eq!(record.labels.len(), 8, "{:?}", record.labels);
    let record = client
        .label_device(&device, &[("site".into(), "lyon".into())], &["k0".into()])
        .await
        .unwrap();
    assert_eq!(record.labels.get("site").map(String::as_str), Some("lyon"));
    assert!(!record.labels.contains_key("k0"));
    assert_eq!(client.device_record(&device).await.unwrap(), record);
    assert!(client
        .label_device(&device, &[("bad key!".into(), "x".into())], &[])
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_sees_every_bucket() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    client
        .put_deployment(&manifest("web", json!({"selector": "site=lyon"})))
        .await
        .unwrap();
    client
        .put_deployment(&manifest("gone", json!({"devices": ["rpi-01"]})))
        .await
        .unwrap();
    client.delete_deployment(&name("gone")).await.unwrap();
    client
        .label_device(&id("rpi-01"), &[("site".into(), "lyon".into())], &[])
        .await
        .unwrap();
    let desired = store(&server, DESIRED_BUCKET).await;
    let score = manifest("web", json!({"devices": ["rpi-01"]}))
        .spec
        .score
        .to_json();
    desired.put("rpi-01.web", score.into()).await.unwrap();
    desired.put("rpi-01.gone", "{}".into()).await.unwrap();
    let state = store(&server, STATE_BUCKET).await;
    state
        .put(
            "rpi-01.web",
            json!({"phase": "running", "revision": 1})
                .to_string()
                .into(),
        )
        .await
        .unwrap();
    let heartbeats = store(&server, HEARTBEAT_BUCKET).await;
    heartbeats
        .put("rpi-01", heartbeat("rpi-01").into())
        .await
        .unwrap();
    heartbeats
        .put("rpi-02", heartbeat("rpi-02").into())
        .await
        .unwrap();

    let (mut controller, _now) = client.snapshot().await.unwrap();
    assert!(controller.is_synced());
    assert!(controller.deployment(&name("web")).is_some());
    assert!(controller.deployment(&name("gone")).is_none());
    let devices: Vec<(String, bool)> = controller
        .devices()
        .map(|d| (d.id.to_string(), d.online))
        .collect();
    assert_eq!(
        devices,
        [("rpi-01".to_owned(), true), ("rpi-02".to_owned(), true)]
    );
    assert!(controller.report(&name("web"), &id("rpi-01")).is_some());
    let mut writes = Vec::new();
    while let Some(output) = controller.poll_output() {
        writes.push(output);
    }
    // The desired key of the deleted deployment is torn down (it is known
    // as a tombstone); the right key is left alone.
    let gone = DeploymentKey {
        device: id("rpi-01"),
        deployment: name("gone"),
    };
    assert!(
        writes.contains(&Output::DeleteDesired { key: gone }),
        "{writes:?}"
    );
    assert!(
        !writes
            .iter()
            .any(|w| matches!(w, Output::PutDesired { key, .. } | Output::DeleteDesired { key } if key.deployment.as_str() == "web")),
        "{writes:?}"
    );
}

/// Keys rewritten while a snapshot is read (heartbeats, every second on
/// every device) are all in it. A rewritten key loses its older entry and
/// comes only at its new sequence, after entries of other keys and after
/// an entry the server said nothing was pending behind: a snapshot that
/// ended at a stream sequence it read first, or at nothing pending, left
/// keys out (two of eight devices, once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_taken_while_keys_are_rewritten_misses_none() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    let heartbeats = store(&server, HEARTBEAT_BUCKET).await;
    let devices: Vec<String> = (1..=8).map(|n| format!("rpi-{n:02}")).collect();
    for device in &devices {
        heartbeats
            .put(device, heartbeat(device).into())
            .await
            .unwrap();
    }
    let (stop, mut stopped) = oneshot::channel::<()>();
    let writer = tokio::spawn({
        let devices = devices.clone();
        async move {
            for device in devices.iter().cycle() {
                if stopped.try_recv().is_ok() {
                    break;
                }
                heartbeats
                    .put(device, heartbeat(device).into())
                    .await
                    .unwrap();
            }
        }
    });
    for attempt in 0..40 {
        let (controller, _now) = client.snapshot().await.unwrap();
        let seen: Vec<String> = controller.devices().map(|d| d.id.to_string()).collect();
        assert_eq!(seen, devices, "snapshot {attempt}");
    }
    let _ = stop.send(());
    writer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_converges_survives_restarts_and_writes_statuses() {
    let mut server = NatsServer::start();
    let client = connect(&server).await;
    let heartbeats = store(&server, HEARTBEAT_BUCKET).await;
    for (device, site) in [("d1", "lyon"), ("d2", "lyon"), ("d3", "paris")] {
        client
            .label_device(&id(device), &[("site".into(), site.into())], &[])
            .await
            .unwrap();
        heartbeats
            .put(device, heartbeat(device).into())
            .await
            .unwrap();
    }
    let desired = store(&server, DESIRED_BUCKET).await;
    let running = Running::start(&server);

    client
        .put_deployment(&manifest("web", json!({"selector": "site=lyon"})))
        .await
        .unwrap();
    eventually!("web on d1 and d2", SETTLE, {
        let keys = key_names(&desired).await;
        (keys == ["d1.web", "d2.web"]).then_some(())
    });
    let status = eventually!("a status for web", SETTLE, {
        client
            .status(&name("web"))
            .await
            .unwrap()
            .filter(|s| s.targeted == 2)
    });
    assert_eq!(status.offline, 0);

    // Relabelled away: the key goes.
    client
        .label_device(&id("d2"), &[("site".into(), "paris".into())], &[])
        .await
        .unwrap();
    eventually!("web on d1 only", SETTLE, {
        (key_names(&desired).await == ["d1.web"]).then_some(())
    });

    // A restarted controller rewrites nothing that is right.
    let before = live_keys(&desired).await;
    running.stop().await;
    let running = Running::start(&server);
    client
        .put_deployment(&manifest("db", json!({"devices": ["d3"]})))
        .await
        .unwrap();
    eventually!("db on d3", SETTLE, {
        let keys = key_names(&desired).await;
        keys.contains(&"d3.db".to_owned()).then_some(())
    });
    let after: Vec<(String, u64)> = live_keys(&desired)
        .await
        .into_iter()
        .filter(|(k, _)| k != "d3.db")
        .collect();
    assert_eq!(before, after, "a restarted controller rewrote a key");

    // nats-server restarts; the controller carries on.
    tokio::task::block_in_place(|| server.restart());
    let late = manifest("late", json!({"devices": ["d1"]}));
    eventually!("late applied after the restart", SETTLE, {
        client.put_deployment(&late).await.ok()
    });
    eventually!("late on d1", SETTLE, {
        let keys = key_names(&desired).await;
        keys.contains(&"d1.late".to_owned()).then_some(())
    });

    // Deleted: its keys and status go.
    client.delete_deployment(&name("web")).await.unwrap();
    eventually!("web torn down", SETTLE, {
        let keys: BTreeSet<String> = key_names(&desired).await.into_iter().collect();
        let status = store(&server, STATUS_BUCKET).await;
        (!keys.contains("d1.web") && status.get("web").await.unwrap().is_none()).then_some(())
    });
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_made_against_an_old_generation_is_refused() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    let web = manifest("web", json!({"devices": ["d1"]}));
    let first = client.put_deployment(&web).await.unwrap();
    let second = client.update_deployment(&web, first).await.unwrap();
    assert!(second > first);
    let error = client.update_deployment(&web, first).await.unwrap_err();
    assert!(
        matches!(&error, ClientError::Changed { name, generation } if name.as_str() == "web" && *generation == first),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!(
            "fleetdeployment/web changed since generation {first} was read; nothing was written"
        )
    );
    client.delete_deployment(&name("web")).await.unwrap();
    assert!(matches!(
        client.update_deployment(&web, second).await,
        Err(ClientError::Changed { .. })
    ));
}

/// Three fake devices (heartbeats and reports written directly) under an
/// all-or-nothing deployment, through the controller process and the
/// `rollout force` verb: none runs it (cold start), all run it (attach),
/// some run it (refused, nothing written), forced (written everywhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_all_or_nothing_deployment_goes_to_every_device_or_none_until_forced() {
    use podfleet_control::cli::args::{Command, GlobalArgs, RolloutAction, RolloutArgs};
    use podfleet_control::cli::{shell, Exit};
    use podfleet_core::fleet::{Placement, PlacementReason};

    let server = NatsServer::start();
    let client = connect(&server).await;
    let heartbeats = store(&server, HEARTBEAT_BUCKET).await;
    let states = store(&server, STATE_BUCKET).await;
    let desired = store(&server, DESIRED_BUCKET).await;
    let devices = ["d1", "d2", "d3"];
    let beat = || async {
        for device in devices {
            heartbeats
                .put(device, heartbeat(device).into())
                .await
                .unwrap();
        }
    };
    beat().await;
    let running = Running::start(&server);
    let cluster = |image: &str| {
        let mut manifest = manifest("cluster", json!({"devices": devices}));
        manifest.spec.placement = Placement::AllOrNothing;
        manifest.spec.score.services[0].image = image.into();
        manifest
    };
    let images = || async {
        let mut images = BTreeSet::new();
        for (key, _) in live_keys(&desired).await {
            let entry = desired.get(key).await.unwrap().unwrap();
            let score: serde_json::Value = serde_json::from_slice(&entry).unwrap();
            images.insert(score["services"][0]["image"].as_str().unwrap().to_owned());
        }
        images
    };
    // The key listing may name a key twice while it is written: by name.
    let live = || async {
        live_keys(&desired)
            .await
            .into_iter()
            .collect::<std::collections::BTreeMap<String, u64>>()
    };
    let report = |keys: std::collections::BTreeMap<String, u64>, on: &'static [&'static str]| {
        let states = states.clone();
        async move {
            for (key, revision) in keys {
                if on.iter().any(|d| key.starts_with(&format!("{d}."))) {
                    let state = json!({"phase": "running", "revision": revision});
                    states.put(key, state.to_string().into()).await.unwrap();
                }
            }
        }
    };

    // None runs it: cold start.
    client.put_deployment(&cluster("web:1")).await.unwrap();
    let keys = eventually!("the cold start", SETTLE, {
        let keys = live().await;
        (keys.len() == 3).then_some(keys)
    });
    // All run it: a new image is attached everywhere.
    report(keys, &["d1", "d2", "d3"]).await;
    eventually!("three running", SETTLE, {
        client
            .status(&name("cluster"))
            .await
            .unwrap()
            .filter(|s| s.phases.running == 3)
    });
    client.put_deployment(&cluster("web:2")).await.unwrap();
    let keys = eventually!("web:2 everywhere", SETTLE, {
        let keys = live().await;
        (images().await == BTreeSet::from(["web:2".to_owned()])).then_some(keys)
    });
    // Some run it: web:3 is refused and nothing is written. (d3 still
    // runs web:1 until it says otherwise: it fails on web:2.)
    report(keys.clone(), &["d1", "d2"]).await;
    let d3 = keys["d3.cluster"];
    let failed = json!({"phase": "failed", "revision": d3,
        "cause": {"kind": "crash_loop", "service": "app", "restarts": 3, "last_exit_code": 1}});
    states
        .put("d3.cluster", failed.to_string().into())
        .await
        .unwrap();
    beat().await;
    eventually!("two running, one failed", SETTLE, {
        client
            .status(&name("cluster"))
            .await
            .unwrap()
            .filter(|s| s.phases.running == 2 && s.phases.failed == 1)
    });
    client.put_deployment(&cluster("web:3")).await.unwrap();
    let status = eventually!("the refusal", SETTLE, {
        client
            .status(&name("cluster"))
            .await
            .unwrap()
            .filter(|s| s.placement.is_some())
    });
    let refusal = status.placement.unwrap();
    assert_eq!(refusal.reason, PlacementReason::PartialPlacement);
    assert_eq!(refusal.not_running.devices, [id("d3")]);
    assert_eq!(live().await, keys, "a key was written");

    // Forced with the CLI verb: written everywhere.
    let global = GlobalArgs {
        config: None,
        context: None,
        server: Some(server.url()),
        user: None,
        password: None,
        creds: None,
        request_timeout: TIMEOUT,
        offline_after: Duration::from_secs(60),
        verbose: 0,
    };
    let force = || {
        Command::Rollout(RolloutArgs {
            action: RolloutAction::Force {
                name: name("cluster"),
            },
        })
    };
    assert_eq!(shell::run(&global, force()).await, Ok(Exit::Success));
    let (_, stored) = client.deployment(&name("cluster")).await.unwrap().unwrap();
    assert!(stored.spec.is_forced());
    eventually!("web:3 everywhere", SETTLE, {
        (images().await == BTreeSet::from(["web:3".to_owned()])).then_some(())
    });
    eventually!("no refusal", SETTLE, {
        client
            .status(&name("cluster"))
            .await
            .unwrap()
            .filter(|s| s.placement.is_none())
    });
    // Forcing again writes nothing.
    let generation = client
        .deployment(&name("cluster"))
        .await
        .unwrap()
        .unwrap()
        .0;
    assert_eq!(shell::run(&global, force()).await, Ok(Exit::Success));
    assert_eq!(
        client
            .deployment(&name("cluster"))
            .await
            .unwrap()
            .unwrap()
            .0,
        generation
    );
    // A restart raises the score's restart count: a new generation, asked
    // about like any change, never forced by the old token.
    let restart = Command::Rollout(RolloutArgs {
        action: RolloutAction::Restart {
            name: name("cluster"),
        },
    });
    assert_eq!(shell::run(&global, restart).await, Ok(Exit::Success));
    let (restarted, stored) = client.deployment(&name("cluster")).await.unwrap().unwrap();
    assert_eq!(restarted, generation + 1);
    assert_eq!(stored.spec.score.restart, Some(1));
    assert!(!stored.spec.is_forced());
    running.stop().await;
}
