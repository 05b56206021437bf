#![allow(clippy::unwrap_used, missing_docs)]
//! An all-or-nothing fleet deployment (`spec.placement: AllOrNothing`) on
//! real agents, real podman and a real nats-server, driven through the
//! `podfleet` CLI and `podfleet controller` as a person would, through the
//! truth table of docs/lifetimes.md:
//!
//! - none runs it: cold start on every targeted device;
//! - all run it: a new generation, applied while the controller is down,
//!   is attached by the restarted controller;
//! - some run it (a fourth device joins the target): refused, nothing
//!   written and nothing touched on any device, until `podfleet rollout
//!   force` writes it to every targeted device;
//! - the deployment is deleted while an agent is down (never refused), and
//!   re-created while that agent's heartbeat is stale and its containers
//!   still run the deleted copy: the device is unknown, never "not
//!   running", and nothing is cold-started until the agent is back and
//!   has cleaned up.
//!
//! Ground truth is podman's (container ids and start times) and the desired
//! bucket's revisions, never the agents' own reports. The same decisions
//! against fake devices are control/tests/nats.rs; the whole truth table,
//! in virtual time, is the fleet controller's unit tests in core.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use e2e::agent::{tokio_runtime, Device};
use e2e::fleet::{desired_revisions, Binaries, Fleet, Podfleet};
use e2e::{demo_image, eventually};
use podfleet_control::client::{BucketPlan, FleetClient};
use podfleet_control::context::Connection;
use podfleet_core::fleet::{DeviceGroup, FleetDeploymentStatus, PlacementReason, PlacementRefusal};
use podfleet_core::wire::names::DESIRED_BUCKET;
use podfleet_core::wire::{DeploymentName, DeviceId};
use serde_json::Value;

/// Generous: two cores shared with compilers.
const SETTLE: Duration = Duration::from_secs(60);
const ROLLOUT_TIMEOUT: &str = "120s";
/// The controller's `--offline-after`: long enough that a loaded machine's
/// late heartbeat (every second) never makes a device offline, short
/// enough that a stopped agent's device goes offline in the test's time.
const OFFLINE_AFTER: &str = "8s";

const NAME: &str = "cluster";
const MEMBERS: [&str; 3] = ["node-1", "node-2", "node-3"];
const ALL: [&str; 4] = ["node-1", "node-2", "node-3", "node-4"];

fn binaries() -> Binaries {
    Binaries {
        podfleet: PathBuf::from(env!("CARGO_BIN_EXE_podfleet-e2e")),
        agent: PathBuf::from(env!("CARGO_BIN_EXE_podfleet-agent-e2e")),
    }
}

/// The `cluster` deployment on the devices labelled `role=cluster`, all or
/// nothing: one `member` service on `image`, told its peers.
fn manifest(image: &str, peers: &[&str]) -> String {
    format!(
        r#"apiVersion: podfleet.io/v1alpha1
kind: FleetDeployment
metadata:
  name: {NAME}
spec:
  target:
    selector: "role=cluster"
  placement: AllOrNothing
  score:
    services:
      - name: member
        image: {image}
        env:
          PEERS: "{}"
    lifecycle:
      grace_period_secs: 1
"#,
        peers.join(",")
    )
}

/// Writes the manifest to `file` and applies it (with `--dry-run` first
/// when `dry_run`): what each printed.
fn apply(cli: &Podfleet, file: &Path, manifest: &str, dry_run: bool) -> (Option<String>, String) {
    fs::write(file, manifest).unwrap();
    let file = file.display().to_string();
    let plan = dry_run.then(|| cli.ok(&["apply", "-f", &file, "--dry-run"]));
    (plan, cli.ok(&["apply", "-f", &file]))
}

/// `podfleet rollout status`, which must report the rollout complete on
/// `devices` devices.
fn rollout_complete(cli: &Podfleet, devices: usize) {
    let run = cli.run(&["rollout", "status", NAME, "--timeout", ROLLOUT_TIMEOUT]);
    assert_eq!(run.code(), Some(0), "{run}");
    assert!(
        run.stdout.contains(&format!(
            "rollout of {NAME} complete: {devices}/{devices} device(s)"
        )),
        "{run}"
    );
}

/// `podfleet rollout status`, which must say that `generation` is
/// refused, why (`reason`, then `ways`: the targeted devices each way) and
/// how to force it.
fn rollout_refused(cli: &Podfleet, generation: u64, reason: &str, ways: &str) {
    let run = cli.run(&["rollout", "status", NAME, "--timeout", ROLLOUT_TIMEOUT]);
    assert_eq!(run.code(), Some(1), "{run}");
    for expected in [
        format!("rollout of {NAME} is refused ({reason}): {ways}: an all-or-nothing deployment"),
        format!("to write generation {generation} to every targeted device anyway: podfleet rollout force {NAME}"),
    ] {
        assert!(run.stderr.contains(&expected), "{expected:?}: {run}");
    }
}

fn name() -> DeploymentName {
    DeploymentName::new(NAME).unwrap()
}

/// The controller's status (the status bucket, as `podfleet rollout
/// status` reads it) once it has observed the stored generation.
async fn observed(client: &FleetClient) -> Option<FleetDeploymentStatus> {
    let (generation, _) = client.deployment(&name()).await.unwrap()?;
    client
        .status(&name())
        .await
        .unwrap()
        .filter(|s| s.observed_generation == generation)
}

/// Waits until the controller's status of the stored generation refuses
/// the deployment for `reason`, and returns the refusal; meanwhile the
/// desired bucket must keep holding exactly `held`: nothing is written.
async fn refusal(
    client: &FleetClient,
    desired: &kv::Store,
    held: &BTreeMap<String, u64>,
    reason: PlacementReason,
) -> PlacementRefusal {
    eventually!(
        format!("the controller to refuse ({})", reason.as_str()),
        SETTLE,
        {
            assert_eq!(&desired_revisions(desired).await, held, "a key was written");
            observed(client)
                .await
                .and_then(|s| s.placement)
                .filter(|p| p.reason == reason)
        }
    )
}

fn group(devices: &[&str]) -> DeviceGroup {
    let ids: Vec<DeviceId> = devices.iter().map(|d| DeviceId::new(*d).unwrap()).collect();
    DeviceGroup::of(&ids)
}

/// One container of the deployment, as podman sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Container {
    id: String,
    image: String,
    state: String,
    started_at: String,
    peers: String,
}

/// Every container of the deployment on `device`, by id: podman's ground
/// truth.
fn containers(device: &Device) -> Vec<Container> {
    let mut all: Vec<Container> = device
        .containers(NAME)
        .iter()
        .map(|c| {
            let text = device.inspect(
                &c.id,
                "{{.Id}}|{{.ImageName}}|{{.State.Status}}|{{.State.StartedAt}}|{{range .Config.Env}}{{.}};{{end}}",
            );
            let fields: Vec<&str> = text.splitn(5, '|').collect();
            assert_eq!(fields.len(), 5, "podman inspect said {text:?}");
            let peers = fields[4]
                .split(';')
                .find_map(|v| v.strip_prefix("PEERS="))
                .unwrap_or_default();
            Container {
                id: fields[0].to_owned(),
                image: fields[1].to_owned(),
                state: fields[2].to_owned(),
                started_at: fields[3].to_owned(),
                peers: peers.to_owned(),
            }
        })
        .collect();
    all.sort_by(|a, b| a.id.cmp(&b.id));
    all
}

/// The one container `device` runs of the deployment, which must be on
/// `image` with `peers`.
fn member(device: &Device, image: &str, peers: &[&str]) -> Container {
    let all = containers(device);
    assert_eq!(all.len(), 1, "{}: {all:#?}", device.id);
    let member = all[0].clone();
    assert_eq!(member.state, "running", "{}: {member:#?}", device.id);
    assert_eq!(member.image, image, "{}: {member:#?}", device.id);
    assert_eq!(member.peers, peers.join(","), "{}: {member:#?}", device.id);
    member
}

/// Podman's ground truth on every device of the fleet.
fn ground_truth(fleet: &Fleet) -> BTreeMap<String, Vec<Container>> {
    fleet
        .devices()
        .map(|d| (d.id.clone(), containers(d)))
        .collect()
}

fn keys(devices: &[&str]) -> Vec<String> {
    devices.iter().map(|d| format!("{d}.{NAME}")).collect()
}

/// Whether `podfleet get devices` shows `id` online.
fn online(cli: &Podfleet, id: &str) -> bool {
    let text = cli.ok(&["get", "devices", "-o", "json"]);
    let list: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"));
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["metadata"]["name"] == id)
        .is_some_and(|i| i["status"]["phase"] == "Online")
}

#[test]
fn an_all_or_nothing_deployment_runs_on_every_device_or_none_until_forced() {
    let started = Instant::now();
    let images = [demo_image(1), demo_image(2)];
    // Image garbage collection would remove the images of the deleted
    // deployment below, and the local-only test images cannot be pulled
    // back for its re-creation.
    let mut fleet = Fleet::start_with_controller_args(
        &binaries(),
        &images,
        &["--image-gc=false"],
        &["--offline-after", OFFLINE_AFTER],
    );
    let cli = fleet.cli().clone();
    let file = fleet.dir().join("cluster.yaml");
    let runtime = tokio_runtime();
    let (client, desired) = runtime.block_on(async {
        let url = fleet.nats().url();
        let client = FleetClient::connect(
            &Connection::new(vec![url.clone()]),
            &BucketPlan::default(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let nats = async_nats::connect(url).await.unwrap();
        let desired = async_nats::jetstream::new(nats)
            .get_key_value(DESIRED_BUCKET)
            .await
            .unwrap();
        (client, desired)
    });
    let generation = || {
        runtime
            .block_on(client.deployment(&name()))
            .unwrap()
            .map(|(g, _)| g)
            .unwrap()
    };
    for id in MEMBERS {
        fleet.add_device(id, &["role=cluster"]).start_agent();
    }
    fleet.add_device("node-4", &["role=spare"]).start_agent();
    runtime.block_on(async {
        for id in ALL {
            eventually!(format!("{id} to be online"), SETTLE, {
                online(&cli, id).then_some(())
            });
        }
    });
    eprintln!("fleet up after {:?}", started.elapsed());

    // None runs it, every device can be asked: cold start on all three.
    let (_, created) = apply(&cli, &file, &manifest(&images[0], &MEMBERS), false);
    assert_eq!(created.trim(), "fleetdeployment/cluster created");
    rollout_complete(&cli, 3);
    for id in MEMBERS {
        let _ = member(fleet.device(id), &images[0], &MEMBERS);
    }
    assert_eq!(containers(fleet.device("node-4")), []);
    let status = runtime.block_on(observed(&client)).unwrap();
    assert_eq!(
        (status.targeted, status.phases.running),
        (3, 3),
        "{status:#?}"
    );
    assert_eq!(status.placement, None);
    eprintln!("cold-started after {:?}", started.elapsed());

    // All run it: generation 2, applied while the controller is down, is
    // attached by the restarted controller, which learns from the buckets
    // alone that every device runs generation 1.
    let before = runtime.block_on(desired_revisions(&desired));
    assert_eq!(before.keys().cloned().collect::<Vec<_>>(), keys(&MEMBERS));
    let v1 = ground_truth(&fleet);
    fleet.kill_controller();
    let (_, configured) = apply(&cli, &file, &manifest(&images[1], &MEMBERS), false);
    assert_eq!(configured.trim(), "fleetdeployment/cluster configured");
    assert_eq!(runtime.block_on(desired_revisions(&desired)), before);
    fleet.start_controller();
    rollout_complete(&cli, 3);
    for id in MEMBERS {
        let now = member(fleet.device(id), &images[1], &MEMBERS);
        assert!(v1[id].iter().all(|c| c.id != now.id), "{id} kept {now:#?}");
    }
    let status = runtime.block_on(observed(&client)).unwrap();
    assert_eq!(status.placement, None);
    eprintln!(
        "attached after a controller restart after {:?}",
        started.elapsed()
    );

    // Some run it: node-4 joins the target and would run it beside three
    // that do. Refused; nothing written, nothing touched.
    let v2 = ground_truth(&fleet);
    let held = runtime.block_on(desired_revisions(&desired));
    let relabelled = cli.ok(&["label", "device", "node-4", "role=cluster", "--overwrite"]);
    assert_eq!(relabelled.trim(), "device/node-4 labeled");
    let refused = runtime.block_on(refusal(
        &client,
        &desired,
        &held,
        PlacementReason::PartialPlacement,
    ));
    assert_eq!(refused.running, group(&MEMBERS));
    assert_eq!(refused.not_running, group(&["node-4"]));
    assert_eq!(refused.unknown, group(&[]));
    let partial = "of 4 targeted devices, 3 run it (node-1, node-2, node-3), 1 does not (node-4)";
    rollout_refused(&cli, generation(), "partial_placement", partial);
    let described = cli.ok(&["describe", "deployment", NAME]);
    for expected in [
        "Refused:",
        "running:      3 device(s) (node-1, node-2, node-3)",
        "not running:  1 device(s) (node-4)",
        "unknown:      0 device(s)",
    ] {
        assert!(described.contains(expected), "{expected:?}:\n{described}");
    }
    assert_eq!(runtime.block_on(desired_revisions(&desired)), held);
    assert_eq!(ground_truth(&fleet), v2);

    // The cluster's next generation names four peers: the dry run says it
    // would be refused, and it is, with nothing touched on any device.
    let (plan, configured) = apply(&cli, &file, &manifest(&images[1], &ALL), true);
    let plan = plan.unwrap();
    assert!(
        plan.contains(&format!("  refused (partial_placement): {partial}: ")),
        "{plan}"
    );
    assert!(
        plan.contains("0 devices to put, 0 devices to delete"),
        "{plan}"
    );
    assert_eq!(configured.trim(), "fleetdeployment/cluster configured");
    let refused = runtime.block_on(refusal(
        &client,
        &desired,
        &held,
        PlacementReason::PartialPlacement,
    ));
    assert_eq!(refused.running, group(&MEMBERS));
    assert_eq!(refused.not_running, group(&["node-4"]));
    rollout_refused(&cli, generation(), "partial_placement", partial);
    assert_eq!(runtime.block_on(desired_revisions(&desired)), held);
    assert_eq!(ground_truth(&fleet), v2);
    eprintln!("refused a partial set after {:?}", started.elapsed());

    // Forced: written to every targeted device, whatever they run.
    let forced = cli.ok(&["rollout", "force", NAME]);
    assert_eq!(
        forced,
        format!(
            "fleetdeployment/cluster forced: generation {} is written to every targeted device, whatever they run\n",
            generation()
        )
    );
    rollout_complete(&cli, 4);
    let written = runtime.block_on(desired_revisions(&desired));
    assert_eq!(written.keys().cloned().collect::<Vec<_>>(), keys(&ALL));
    for key in keys(&MEMBERS) {
        assert!(written[&key] > held[&key], "{key} was not rewritten");
    }
    let mut v3 = BTreeMap::new();
    for id in ALL {
        let now = member(fleet.device(id), &images[1], &ALL);
        assert!(v2[id].iter().all(|c| c.id != now.id), "{id} kept {now:#?}");
        v3.insert(id, now);
    }
    let status = runtime.block_on(observed(&client)).unwrap();
    assert_eq!(status.placement, None);
    eprintln!("forced after {:?}", started.elapsed());

    // node-3's agent goes down; its container keeps running. The
    // deployment is deleted (never refused): the others tear it down,
    // node-3 cannot.
    fleet.device_mut("node-3").agent().kill9();
    let deleted = cli.ok(&["delete", "deployment", NAME]);
    assert_eq!(deleted.trim(), "fleetdeployment/cluster deleted");
    runtime.block_on(async {
        for id in ["node-1", "node-2", "node-4"] {
            let device = fleet.device(id);
            // `podman ps` alone: a container being removed may be gone
            // before it could be inspected.
            eventually!(format!("{id} to tear {NAME} down"), SETTLE, {
                device.containers(NAME).is_empty().then_some(())
            });
        }
    });
    assert_eq!(
        runtime.block_on(desired_revisions(&desired)),
        BTreeMap::new()
    );
    let left = ground_truth(&fleet);
    assert_eq!(left["node-3"], [v3["node-3"].clone()]);

    // Re-created: the three devices that can be asked run nothing, and
    // node-3 runs its old copy. Refused while node-3's last heartbeat is
    // fresh (partial), and once it is stale (unknown, never "not
    // running"): no cold start either way.
    let (_, created) = apply(&cli, &file, &manifest(&images[1], &ALL), false);
    assert_eq!(created.trim(), "fleetdeployment/cluster created");
    let refused = runtime.block_on(refusal(
        &client,
        &desired,
        &BTreeMap::new(),
        PlacementReason::UnknownDevices,
    ));
    assert_eq!(refused.running, group(&[]));
    assert_eq!(refused.not_running, group(&["node-1", "node-2", "node-4"]));
    assert_eq!(refused.unknown, group(&["node-3"]));
    rollout_refused(
        &cli,
        generation(),
        "unknown_devices",
        "of 4 targeted devices, 3 do not (node-1, node-2, node-4), 1 cannot be asked (node-3)",
    );
    assert_eq!(
        runtime.block_on(desired_revisions(&desired)),
        BTreeMap::new()
    );
    assert_eq!(ground_truth(&fleet), left);
    eprintln!(
        "refused with an unknown device after {:?}",
        started.elapsed()
    );

    // node-3's agent is back: it tears down its copy of the deleted
    // deployment and clears its report. Now none runs it and every device
    // can be asked: cold start on all four, by itself.
    fleet.device_mut("node-3").start_agent();
    runtime.block_on(async {
        eventually!("the cold start on all four", SETTLE, {
            observed(&client)
                .await
                .filter(|s| s.phases.running == 4 && s.placement.is_none())
        })
    });
    rollout_complete(&cli, 4);
    assert_eq!(
        runtime
            .block_on(desired_revisions(&desired))
            .into_keys()
            .collect::<Vec<_>>(),
        keys(&ALL)
    );
    for id in ALL {
        let now = member(fleet.device(id), &images[1], &ALL);
        assert_ne!(
            now.id, v3[id].id,
            "{id} kept its copy of the deleted deployment"
        );
    }
    assert!(
        fleet.controller().is_running(),
        "{}",
        fleet.controller_output()
    );
    eprintln!("done after {:?}", started.elapsed());
}
