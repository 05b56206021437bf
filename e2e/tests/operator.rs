#![allow(clippy::unwrap_used, missing_docs)]
//! The operator against a mocked Kubernetes API server ([`FakeApi`]) and a
//! real nats-server: the exact requests of a reconcile (finalizer, status,
//! teardown, release), a NATS outage during a deletion, two replicas under
//! leader election, and real agents on isolated podman following
//! FleetDeployments and Device labels.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use e2e::agent::{tokio_runtime, Device as AgentDevice};
use e2e::kube_fake::{FakeApi, RunningOperator as Operator};
use e2e::{eventually, NatsServer, TEST_IMAGE};
use futures_util::StreamExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use podfleet_core::wire::names::{DESIRED_BUCKET, HEARTBEAT_BUCKET, STATE_BUCKET};
use podfleet_operator::resources::{Device, DeviceSpec, FleetDeployment, FleetDeploymentSpec};
use podfleet_operator::{LeaseOptions, Options};
use serde_json::{json, Value};

const NS: &str = "podfleet";
const FDS: &str = "/apis/podfleet.io/v1alpha1/namespaces/podfleet/fleetdeployments";
/// Generous: two cores shared with compilers.
const SETTLE: Duration = Duration::from_secs(60);

fn options() -> Options {
    let mut options = Options::new(NS);
    options.engine.device_status_every = Duration::from_millis(300);
    options.controller.config.status_interval = Duration::from_millis(100);
    options
}

fn score(image: &str) -> Value {
    json!({"services": [{"name": "web", "image": image, "args": ["sleep", "3600"]}],
           "lifecycle": {"grace_period_secs": 1}})
}

fn fleet_deployment(name: &str, target: Value, image: &str) -> FleetDeployment {
    FleetDeployment::new(
        name,
        FleetDeploymentSpec(json!({"target": target, "score": score(image)})),
    )
}

fn device(name: &str, labels: &[(&str, &str)]) -> Device {
    let mut device = Device::new(name, DeviceSpec::default());
    device.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    );
    device
}

async fn kv_store(url: &str, bucket: &str) -> kv::Store {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    eventually!(
        format!("the bucket {bucket}"),
        SETTLE,
        js.get_key_value(bucket).await.ok()
    )
}

/// Every live key of `store` with its revision and value.
async fn live(store: &kv::Store) -> BTreeMap<String, (u64, Vec<u8>)> {
    let keys: Vec<String> = match store.keys().await {
        Ok(keys) => keys.filter_map(|k| async move { k.ok() }).collect().await,
        Err(_) => Vec::new(),
    };
    let mut live = BTreeMap::new();
    for key in keys {
        if let Ok(Some(entry)) = store.entry(key.clone()).await {
            if entry.operation == kv::Operation::Put {
                live.insert(key, (entry.revision, entry.value.to_vec()));
            }
        }
    }
    live
}

async fn keys(store: &kv::Store) -> Vec<String> {
    live(store).await.into_keys().collect()
}

fn condition(fd: &Value, type_: &str) -> Option<(String, String)> {
    fd["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_owned(),
                c["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
}

#[test]
fn a_reconcile_adds_the_finalizer_shows_status_and_releases_it_after_the_teardown() {
    let nats = NatsServer::start();
    let fake = FakeApi::new();
    let runtime = tokio_runtime();
    let client = runtime.block_on(async { fake.client() });
    let devices = Api::<Device>::all(client.clone());
    let fds = Api::<FleetDeployment>::namespaced(client.clone(), NS);
    runtime.block_on(async {
        for (name, site) in [("rpi-01", "lyon"), ("rpi-02", "lyon"), ("rpi-03", "paris")] {
            devices
                .create(&PostParams::default(), &device(name, &[("site", site)]))
                .await
                .unwrap();
        }
    });
    let operator = Operator::start(&fake, "operator", &nats.url(), options());
    runtime.block_on(async {
        let desired = kv_store(&nats.url(), DESIRED_BUCKET).await;
        let states = kv_store(&nats.url(), STATE_BUCKET).await;
        let heartbeats = kv_store(&nats.url(), HEARTBEAT_BUCKET).await;
        fds.create(
            &PostParams::default(),
            &fleet_deployment("web", json!({"selector": "site=lyon"}), "localhost/web:1"),
        )
        .await
        .unwrap();
        let held = eventually!("the keys of site=lyon", SETTLE, {
            let held = live(&desired).await;
            (held.len() == 2).then_some(held)
        });
        assert_eq!(held.keys().collect::<Vec<_>>(), ["rpi-01.web", "rpi-02.web"]);
        let score_json: Value = serde_json::from_slice(&held["rpi-01.web"].1).unwrap();
        assert_eq!(score_json["services"][0]["image"], "localhost/web:1");

        // The finalizer went on (a JSON patch) before any key was written,
        // and the status is a server-side apply of the status subresource.
        let writes: Vec<String> = fake
            .writes_of("operator")
            .into_iter()
            .filter(|w| w.contains("/fleetdeployments/"))
            .collect();
        assert_eq!(writes[..2], [format!("PATCH {FDS}/web"), format!("PATCH {FDS}/web/status")], "{writes:#?}");
        let first = &fake
            .requests()
            .into_iter()
            .find(|r| r.client == "operator" && r.path == format!("{FDS}/web"))
            .unwrap();
        assert_eq!(first.content_type.as_deref(), Some("application/json-patch+json"));
        assert_eq!(first.body.as_ref().unwrap()[1]["value"], json!(["podfleet.io/desired-keys"]));
        let fd = eventually!("a status", SETTLE, {
            let fd = fake.object(FDS, "web").unwrap();
            (fd["status"]["targeted"] == 2).then_some(fd)
        });
        assert_eq!(condition(&fd, "Available"), Some(("False".into(), "NotAllRunning".into())));
        assert_eq!(condition(&fd, "Progressing"), Some(("True".into(), "RollingOut".into())));
        let status_patch = fake
            .requests()
            .into_iter()
            .find(|r| r.path == format!("{FDS}/web/status"))
            .unwrap();
        assert_eq!(status_patch.method, "PATCH");
        assert_eq!(status_patch.content_type.as_deref(), Some("application/apply-patch+yaml"));

        // The devices report Running on their keys' revisions, and beat.
        for id in ["rpi-01", "rpi-02"] {
            let revision = held[&format!("{id}.web")].0;
            states
                .put(format!("{id}.web"), json!({"phase": "running", "revision": revision}).to_string().into())
                .await
                .unwrap();
            heartbeats
                .put(
                    id,
                    json!({"device_id": id, "agent_version": "9.9.9", "uptime_s": 5, "arch": "aarch64",
                           "runtime_version": "5.4.2"})
                    .to_string()
                    .into(),
                )
                .await
                .unwrap();
        }
        let fd = eventually!("Available", SETTLE, {
            let fd = fake.object(FDS, "web").unwrap();
            (condition(&fd, "Available") == Some(("True".into(), "AllRunning".into()))).then_some(fd)
        });
        assert_eq!(fd["status"]["running"], 2);
        assert_eq!(fd["status"]["observedGeneration"], 1);
        assert_eq!(condition(&fd, "Degraded"), Some(("False".into(), "Healthy".into())));
        let device = eventually!("rpi-01's status", SETTLE, {
            let device = fake.object("/apis/podfleet.io/v1alpha1/devices", "rpi-01").unwrap();
            (device["status"]["online"] == true).then_some(device)
        });
        assert_eq!(device["status"]["arch"], "aarch64");
        assert_eq!(device["status"]["agentVersion"], "9.9.9");
        assert_eq!(device["status"]["deployments"]["web"]["phase"], "running");
        // The operator publishes a status change's events after the patch.
        eventually!("the rollout's events", SETTLE, {
            let events = fake.objects("/apis/events.k8s.io/v1/namespaces/podfleet/events");
            let reasons: Vec<String> = events
                .iter()
                .filter_map(|e| e["reason"].as_str().map(str::to_owned))
                .collect();
            (reasons.iter().any(|r| r == "RolloutStarted")
                && reasons.iter().any(|r| r == "RolloutComplete"))
            .then_some(())
        });

        // Relabelling rpi-03 re-targets; patching a status changes no key.
        devices
            .patch(
                "rpi-03",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"site": "lyon"}}})),
            )
            .await
            .unwrap();
        eventually!("rpi-03 to be targeted", SETTLE, {
            (keys(&desired).await == ["rpi-01.web", "rpi-02.web", "rpi-03.web"]).then_some(())
        });

        // A spec change is a new generation: every key gets the new score.
        fds.patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"score": score("localhost/web:2")}})),
        )
        .await
        .unwrap();
        eventually!("generation 2 everywhere", SETTLE, {
            let held = live(&desired).await;
            held.values()
                .all(|(_, v)| String::from_utf8_lossy(v).contains("localhost/web:2"))
                .then_some(())
        });
        eventually!("observedGeneration 2", SETTLE, {
            (fake.object(FDS, "web").unwrap()["status"]["observedGeneration"] == 2).then_some(())
        });

        // Deleting: the object stays, with its finalizer, until every key
        // is gone; then the finalizer is released and the object goes.
        fds.delete("web", &DeleteParams::default()).await.unwrap();
        eventually!("the object to go", SETTLE, fake.object(FDS, "web").is_none().then_some(()));
        assert_eq!(keys(&desired).await, Vec::<String>::new(), "keys left after the finalizer was released");
        let last = fake
            .requests()
            .into_iter()
            .rfind(|r| r.client == "operator" && r.path == format!("{FDS}/web") && r.method == "PATCH")
            .unwrap();
        assert_eq!(last.body.as_ref().unwrap()[1]["op"], "remove");
    });
    operator.stop().unwrap();
}

#[test]
fn a_bad_spec_degrades_its_own_fleet_deployment_only() {
    let nats = NatsServer::start();
    let fake = FakeApi::new();
    let runtime = tokio_runtime();
    let client = runtime.block_on(async { fake.client() });
    let fds = Api::<FleetDeployment>::namespaced(client.clone(), NS);
    let _operator = Operator::start(&fake, "operator", &nats.url(), options());
    runtime.block_on(async {
        let desired = kv_store(&nats.url(), DESIRED_BUCKET).await;
        // Blank image: the API server's schema would refuse it; the core's
        // parser refuses it here, with the field path.
        fds.create(
            &PostParams::default(),
            &fleet_deployment("bad", json!({"devices": ["rpi-01"]}), " "),
        )
        .await
        .unwrap();
        fds.create(
            &PostParams::default(),
            &fleet_deployment("good", json!({"devices": ["rpi-01"]}), "localhost/web:1"),
        )
        .await
        .unwrap();
        let bad = eventually!("bad to be Degraded", SETTLE, {
            let fd = fake.object(FDS, "bad").unwrap();
            (condition(&fd, "Degraded").is_some_and(|(s, _)| s == "True")).then_some(fd)
        });
        let message = bad["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Degraded")
            .unwrap()["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            message.contains("spec.score.services[0].image"),
            "{message}"
        );
        assert_eq!(condition(&bad, "Degraded").unwrap().1, "SpecRefused");
        eventually!(
            "good's key",
            SETTLE,
            (keys(&desired).await == ["rpi-01.good"]).then_some(())
        );
    });
}

#[test]
fn a_nats_outage_keeps_the_finalizer_until_the_keys_are_deleted() {
    let mut nats = NatsServer::start();
    let fake = FakeApi::new();
    let runtime = tokio_runtime();
    let client = runtime.block_on(async { fake.client() });
    let fds = Api::<FleetDeployment>::namespaced(client.clone(), NS);
    let mut opts = options();
    opts.controller.restart_backoff =
        podfleet_core::time::Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
    let _operator = Operator::start(&fake, "operator", &nats.url(), opts);
    runtime.block_on(async {
        let desired = kv_store(&nats.url(), DESIRED_BUCKET).await;
        fds.create(
            &PostParams::default(),
            &fleet_deployment(
                "web",
                json!({"devices": ["rpi-01", "rpi-02"]}),
                "localhost/web:1",
            ),
        )
        .await
        .unwrap();
        eventually!(
            "both keys",
            SETTLE,
            (keys(&desired).await.len() == 2).then_some(())
        );
    });
    nats.stop();
    runtime.block_on(async {
        fds.delete("web", &DeleteParams::default()).await.unwrap();
        // Several reconciles fail while NATS is down; the object stays.
        eventually!("a failed teardown", SETTLE, {
            let failed = fake
                .requests()
                .iter()
                .filter(|r| {
                    r.client == "operator" && r.path == format!("{FDS}/web") && r.method == "PATCH"
                })
                .count()
                == 1;
            (failed && fake.object(FDS, "web").is_some()).then_some(())
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        let fd = fake.object(FDS, "web").expect("kept while NATS is down");
        assert_eq!(
            fd["metadata"]["finalizers"],
            json!(["podfleet.io/desired-keys"])
        );
    });
    nats.resume();
    runtime.block_on(async {
        eventually!(
            "the object to go once NATS is back",
            SETTLE,
            fake.object(FDS, "web").is_none().then_some(())
        );
        let desired = kv_store(&nats.url(), DESIRED_BUCKET).await;
        assert_eq!(keys(&desired).await, Vec::<String>::new());
    });
}

#[test]
fn two_replicas_never_both_lead_and_a_standby_takes_over() {
    let nats = NatsServer::start();
    let fake = FakeApi::new();
    let runtime = tokio_runtime();
    let client = runtime.block_on(async { fake.client() });
    let fds = Api::<FleetDeployment>::namespaced(client.clone(), NS);
    let replica = |identity: &str| {
        let mut options = options();
        options.identity = identity.to_owned();
        options.lease = Some(LeaseOptions {
            name: "podfleet-operator".into(),
            duration: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(2),
            retry: Duration::from_millis(300),
        });
        Operator::start(&fake, identity, &nats.url(), options)
    };
    let a = replica("a");
    let lease = |fake: &FakeApi| {
        fake.object(
            "/apis/coordination.k8s.io/v1/namespaces/podfleet/leases",
            "podfleet-operator",
        )
        .map(|l| {
            l["spec"]["holderIdentity"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
    };
    runtime.block_on(async {
        eventually!(
            "a to lead",
            SETTLE,
            (lease(&fake).as_deref() == Some("a")).then_some(())
        );
    });
    let b = replica("b");
    runtime.block_on(async {
        let desired = kv_store(&nats.url(), DESIRED_BUCKET).await;
        fds.create(
            &PostParams::default(),
            &fleet_deployment("web", json!({"devices": ["rpi-01"]}), "localhost/web:1"),
        )
        .await
        .unwrap();
        eventually!(
            "a to write the key",
            SETTLE,
            (keys(&desired).await.len() == 1).then_some(())
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
    let standby_writes: Vec<String> = fake
        .writes_of("b")
        .into_iter()
        .filter(|w| !w.contains("/leases"))
        .collect();
    assert_eq!(standby_writes, Vec::<String>::new(), "the standby wrote");
    assert_eq!(lease(&fake).as_deref(), Some("a"));
    // a stops (SIGTERM): it releases the lease, b takes over and works.
    a.stop().unwrap();
    runtime.block_on(async {
        eventually!(
            "b to lead",
            SETTLE,
            (lease(&fake).as_deref() == Some("b")).then_some(())
        );
        let desired = kv_store(&nats.url(), DESIRED_BUCKET).await;
        fds.patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"target": {"devices": ["rpi-01", "rpi-02"]}}})),
        )
        .await
        .unwrap();
        eventually!(
            "b to write the new key",
            SETTLE,
            (keys(&desired).await.len() == 2).then_some(())
        );
    });
    let lease_object = fake
        .object(
            "/apis/coordination.k8s.io/v1/namespaces/podfleet/leases",
            "podfleet-operator",
        )
        .unwrap();
    assert_eq!(lease_object["spec"]["leaseTransitions"], 1);
    drop(b);
}

/// Real agents on isolated podman, driven only through the resources.
#[test]
fn agents_follow_fleet_deployments_and_device_labels_through_the_operator() {
    let started = Instant::now();
    let nats = NatsServer::start();
    let fake = FakeApi::new();
    let runtime = tokio_runtime();
    let client = runtime.block_on(async { fake.client() });
    let devices = Api::<Device>::all(client.clone());
    let fds = Api::<FleetDeployment>::namespaced(client.clone(), NS);
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_podfleet-agent-e2e"));
    let mut fleet: BTreeMap<&str, AgentDevice> = BTreeMap::new();
    for id in ["rpi-01", "rpi-02"] {
        let mut device = AgentDevice::with_images(&agent, id, &nats.url(), &[], &[TEST_IMAGE]);
        device.start_agent();
        fleet.insert(id, device);
    }
    let mut opts = options();
    opts.engine.create_devices = true;
    let _operator = Operator::start(&fake, "operator", &nats.url(), opts);
    let device_path = "/apis/podfleet.io/v1alpha1/devices";
    runtime.block_on(async {
        // Devices that heartbeat get a Device resource, with their facts.
        let created = eventually!("Devices for both agents", SETTLE, {
            let all = fake.objects(device_path);
            (all.len() == 2 && all.iter().all(|d| d["status"]["online"] == true)).then_some(all)
        });
        assert_eq!(created[0]["status"]["arch"], std::env::consts::ARCH);
        for id in ["rpi-01", "rpi-02"] {
            devices
                .patch(
                    id,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {"site": "lyon"}}})),
                )
                .await
                .unwrap();
        }
        fds.create(
            &PostParams::default(),
            &fleet_deployment("web", json!({"selector": "site=lyon"}), TEST_IMAGE),
        )
        .await
        .unwrap();
        eventually!("Available on both", SETTLE, {
            let fd = fake.object(FDS, "web").unwrap();
            (condition(&fd, "Available") == Some(("True".into(), "AllRunning".into())))
                .then_some(())
        });
        for id in ["rpi-01", "rpi-02"] {
            assert_eq!(fleet[id].containers("web").len(), 1, "{id} runs web");
        }
        eprintln!("rolled out after {:?}", started.elapsed());

        // rpi-02 leaves site=lyon: its container goes, rpi-01's stays.
        let web01 = fleet["rpi-01"].containers("web")[0].id.clone();
        devices
            .patch(
                "rpi-02",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"site": "paris"}}})),
            )
            .await
            .unwrap();
        eventually!(
            "rpi-02 to remove web",
            SETTLE,
            fleet["rpi-02"].containers("web").is_empty().then_some(())
        );
        eventually!("rpi-02's Device to list no deployment", SETTLE, {
            let device = fake.object(device_path, "rpi-02").unwrap();
            (device["status"]["deploymentCount"] == 0
                && device["status"].get("deployments").is_none())
            .then_some(())
        });
        assert_eq!(fleet["rpi-01"].containers("web")[0].id, web01);
        eventually!(
            "targeted 1",
            SETTLE,
            (fake.object(FDS, "web").unwrap()["status"]["targeted"] == 1).then_some(())
        );
    });
    // rpi-03 joins: labelled before its agent ever ran, it gets web then.
    runtime.block_on(async {
        devices
            .create(
                &PostParams::default(),
                &device("rpi-03", &[("site", "lyon")]),
            )
            .await
            .unwrap();
    });
    let mut joining = AgentDevice::with_images(&agent, "rpi-03", &nats.url(), &[], &[TEST_IMAGE]);
    joining.start_agent();
    fleet.insert("rpi-03", joining);
    runtime.block_on(async {
        eventually!(
            "rpi-03 to run web",
            SETTLE,
            (fleet["rpi-03"].containers("web").len() == 1).then_some(())
        );
        eventually!("Available on rpi-01 and rpi-03", SETTLE, {
            let fd = fake.object(FDS, "web").unwrap();
            (fd["status"]["running"] == 2
                && condition(&fd, "Available").is_some_and(|(s, _)| s == "True"))
            .then_some(())
        });
        // Delete: nothing left on any device, then the object is gone.
        fds.delete("web", &DeleteParams::default()).await.unwrap();
        eventually!(
            "the object to go",
            SETTLE,
            fake.object(FDS, "web").is_none().then_some(())
        );
        for (id, device) in &fleet {
            eventually!(
                format!("{id} to have no web"),
                SETTLE,
                device.containers("web").is_empty().then_some(())
            );
        }
    });
    eprintln!("done after {:?}", started.elapsed());
}

/// One FleetDeployment over two thousand Devices: every key written, and
/// the reports aggregated into a handful of status patches, not one per
/// device.
/// An all-or-nothing FleetDeployment over three fake devices (heartbeats
/// and reports written to NATS directly): the cold start writes every key;
/// a new generation while one device does not run it is refused
/// (Degraded, PartialPlacement, the devices listed, no key written); the
/// `podfleet.io/force-generation` annotation naming that generation writes
/// it everywhere.
#[test]
fn an_all_or_nothing_rollout_is_refused_on_a_partial_placement_until_forced() {
    let nats = NatsServer::start();
    let fake = FakeApi::new();
    let runtime = tokio_runtime();
    let client = runtime.block_on(async { fake.client() });
    let fds = Api::<FleetDeployment>::namespaced(client.clone(), NS);
    let _operator = Operator::start(&fake, "operator", &nats.url(), options());
    runtime.block_on(async {
        let desired = kv_store(&nats.url(), DESIRED_BUCKET).await;
        let heartbeats = kv_store(&nats.url(), HEARTBEAT_BUCKET).await;
        let states = kv_store(&nats.url(), STATE_BUCKET).await;
        let devices = ["rpi-01", "rpi-02", "rpi-03"];
        let beat = || async {
            for device in devices {
                let heartbeat =
                    json!({"device_id": device, "agent_version": "0.1.0", "uptime_s": 5});
                heartbeats
                    .put(device, heartbeat.to_string().into())
                    .await
                    .unwrap();
            }
        };
        beat().await;
        fds.create(
            &PostParams::default(),
            &FleetDeployment::new(
                "cluster",
                FleetDeploymentSpec(json!({
                    "target": {"devices": devices},
                    "placement": "AllOrNothing",
                    "score": score("localhost/web:1"),
                })),
            ),
        )
        .await
        .unwrap();
        let held = eventually!("the cold start", SETTLE, {
            let held = live(&desired).await;
            (held.len() == 3).then_some(held)
        });
        // rpi-01 and rpi-02 run it; rpi-03 never reports.
        for device in ["rpi-01", "rpi-02"] {
            let key = format!("{device}.cluster");
            let state = json!({"phase": "running", "revision": held[&key].0});
            states.put(key, state.to_string().into()).await.unwrap();
        }
        eventually!("two running", SETTLE, {
            (fake.object(FDS, "cluster").unwrap()["status"]["running"] == 2).then_some(())
        });
        beat().await;
        fds.patch(
            "cluster",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"score": score("localhost/web:2")}})),
        )
        .await
        .unwrap();
        let refused = eventually!("the refusal", SETTLE, {
            let fd = fake.object(FDS, "cluster").unwrap();
            (condition(&fd, "Degraded") == Some(("True".into(), "PartialPlacement".into())))
                .then_some(fd)
        });
        assert_eq!(refused["metadata"]["generation"], 2);
        let placement = &refused["status"]["placement"];
        assert_eq!(placement["reason"], "partial_placement", "{placement:#}");
        assert_eq!(placement["running"]["devices"], json!(["rpi-01", "rpi-02"]));
        assert_eq!(placement["notRunning"]["devices"], json!(["rpi-03"]));
        assert_eq!(
            condition(&refused, "Progressing"),
            Some(("False".into(), "PartialPlacement".into()))
        );
        assert_eq!(live(&desired).await, held, "a key was written");

        // Forced: the annotation names generation 2.
        beat().await;
        fds.patch(
            "cluster",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"podfleet.io/force-generation": "2"}}}),
            ),
        )
        .await
        .unwrap();
        eventually!("web:2 on every device", SETTLE, {
            let now = live(&desired).await;
            (now.len() == 3
                && now
                    .values()
                    .all(|(_, v)| String::from_utf8_lossy(v).contains("localhost/web:2")))
            .then_some(())
        });
        eventually!("no refusal any more", SETTLE, {
            let fd = fake.object(FDS, "cluster").unwrap();
            (fd["status"]["placement"].is_null()
                && condition(&fd, "Degraded").is_some_and(|(s, _)| s == "False"))
            .then_some(())
        });
    });
}

#[test]
fn one_fleet_deployment_fans_out_to_two_thousand_devices_with_few_status_patches() {
    const DEVICES: usize = 2_000;
    let nats = NatsServer::start();
    let fake = FakeApi::new();
    let runtime = tokio_runtime();
    let client = runtime.block_on(async { fake.client() });
    let devices = Api::<Device>::all(client.clone());
    let fds = Api::<FleetDeployment>::namespaced(client.clone(), NS);
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("dev-{i:05}")).collect();
    runtime.block_on(async {
        for id in &ids {
            devices
                .create(&PostParams::default(), &device(id, &[("site", "lyon")]))
                .await
                .unwrap();
        }
    });
    let mut opts = options();
    opts.engine.device_status_every = Duration::from_secs(3600);
    let _operator = Operator::start(&fake, "operator", &nats.url(), opts);
    runtime.block_on(async {
        let desired = kv_store(&nats.url(), DESIRED_BUCKET).await;
        let states = kv_store(&nats.url(), STATE_BUCKET).await;
        fds.create(
            &PostParams::default(),
            &fleet_deployment("web", json!({"selector": "site=lyon"}), "localhost/web:1"),
        )
        .await
        .unwrap();
        let held = eventually!("every key", SETTLE, {
            let held = live(&desired).await;
            (held.len() == DEVICES).then_some(held)
        });
        let patches = |fake: &FakeApi| {
            fake.requests()
                .iter()
                .filter(|r| r.path == format!("{FDS}/web/status"))
                .count()
        };
        let before = patches(&fake);
        for id in &ids {
            let revision = held[&format!("{id}.web")].0;
            states
                .put(
                    format!("{id}.web"),
                    json!({"phase": "running", "revision": revision})
                        .to_string()
                        .into(),
                )
                .await
                .unwrap();
        }
        eventually!("all running", SETTLE, {
            (fake.object(FDS, "web").unwrap()["status"]["running"] == DEVICES).then_some(())
        });
        let during = patches(&fake) - before;
        assert!(
            (1..=30).contains(&during),
            "{during} status patches for {DEVICES} reports"
        );
    });
}
