#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::fleet::model::{API_VERSION, FLEET_DEPLOYMENT_KIND};

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn name(s: &str) -> DeploymentName {
    DeploymentName::new(s).unwrap()
}

fn key(device: &str, deployment: &str) -> DeploymentKey {
    DeploymentKey {
        device: id(device),
        deployment: name(deployment),
    }
}

fn manifest(deployment: &str, target: serde_json::Value, image: &str) -> Vec<u8> {
    json!({
        "apiVersion": API_VERSION,
        "kind": FLEET_DEPLOYMENT_KIND,
        "metadata": {"name": deployment},
        "spec": {"target": target, "score": {"services": [{"name": "app", "image": image}]}},
    })
    .to_string()
    .into_bytes()
}

fn score(image: &str) -> Vec<u8> {
    crate::wire::PodmanV0Score::from_json(
        json!({"services": [{"name": "app", "image": image}]})
            .to_string()
            .as_bytes(),
    )
    .unwrap()
    .to_json()
}

fn record(labels: &[(&str, &str)]) -> Vec<u8> {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    json!({ "labels": labels }).to_string().into_bytes()
}

/// The heartbeat of an agent of this version: it understands every score
/// feature.
fn heartbeat(device: &str) -> Vec<u8> {
    json!({
        "device_id": device,
        "agent_version": "0.1.0",
        "uptime_s": 5,
        "score_features": crate::wire::SCORE_FEATURES,
    })
    .to_string()
    .into_bytes()
}

/// The heartbeat of an agent older than the score features.
fn old_heartbeat(device: &str) -> Vec<u8> {
    json!({"device_id": device, "agent_version": "0.0.9", "uptime_s": 5})
        .to_string()
        .into_bytes()
}

fn report(phase: &str, revision: u64, cause: Option<serde_json::Value>) -> Vec<u8> {
    let mut state = json!({"phase": phase, "revision": revision});
    if let Some(cause) = cause {
        state["cause"] = cause;
    }
    state.to_string().into_bytes()
}

/// The buckets the controller reads and writes, in memory: the desired
/// bucket applies the controller's writes and feeds them back as a watch
/// would.
struct Buckets {
    now: Timestamp,
    revision: u64,
    deployments: BTreeMap<DeploymentName, (u64, Option<Vec<u8>>)>,
    devices: BTreeMap<DeviceId, Vec<u8>>,
    desired: BTreeMap<DeploymentKey, (u64, Vec<u8>)>,
    /// Delete markers of the desired bucket.
    desired_deleted: BTreeMap<DeploymentKey, u64>,
    states: BTreeMap<DeploymentKey, Vec<u8>>,
    heartbeats: BTreeMap<DeviceId, Vec<u8>>,
    controller: Controller,
    /// Every desired write the controller asked for.
    writes: Vec<Output>,
    statuses: BTreeMap<DeploymentName, FleetDeploymentStatus>,
    /// Every status put or delete the controller asked for.
    status_writes: usize,
    /// Refuse the next this many desired writes.
    refuse: u32,
}

impl Buckets {
    fn new() -> Self {
        Self {
            now: Timestamp::ZERO,
            revision: 0,
            deployments: BTreeMap::new(),
            devices: BTreeMap::new(),
            desired: BTreeMap::new(),
            desired_deleted: BTreeMap::new(),
            states: BTreeMap::new(),
            heartbeats: BTreeMap::new(),
            controller: Controller::new(Config::default(), Timestamp::ZERO),
            writes: Vec::new(),
            statuses: BTreeMap::new(),
            status_writes: 0,
            refuse: 0,
        }
    }

    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    /// Feeds one input and carries out every output, feeding the desired
    /// bucket's changes back.
    fn feed(&mut self, input: Input) {
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            self.controller.handle(self.now, input);
            while let Some(output) = self.controller.poll_output() {
                match &output {
                    Output::PutDesired { key, payload } => {
                        self.writes.push(output.clone());
                        if self.refuse > 0 {
                            self.refuse -= 1;
                            inputs.push_back(Input::WriteFailed {
                                key: key.clone(),
                                error: "refused".into(),
                            });
                            continue;
                        }
                        let revision = self.next_revision();
                        self.desired
                            .insert(key.clone(), (revision, payload.to_vec()));
                        self.desired_deleted.remove(key);
                        inputs.push_back(Input::Desired(Change::Put {
                            key: key.clone(),
                            revision: Revision::new(revision),
                            value: payload.to_vec(),
                        }));
                    }
                    Output::DeleteDesired { key } => {
                        self.writes.push(output.clone());
                        if self.refuse > 0 {
                            self.refuse -= 1;
                            inputs.push_back(Input::WriteFailed {
                                key: key.clone(),
                                error: "refused".into(),
                            });
                            continue;
                        }
                        let revision = self.next_revision();
                        self.desired.remove(key);
                        self.desired_deleted.insert(key.clone(), revision);
                        inputs.push_back(Input::Desired(Change::Delete {
                            key: key.clone(),
                            revision: Revision::new(revision),
                        }));
                    }
                    Output::DeleteState { key } => {
                        self.states.remove(key);
                        inputs.push_back(Input::State(Change::Delete {
                            key: key.clone(),
                            revision: Revision::new(0),
                        }));
                    }
                    Output::PutStatus { name, status } => {
                        self.status_writes += 1;
                        self.statuses.insert(name.clone(), (**status).clone());
                        inputs.push_back(Input::Status {
                            name: name.clone(),
                            value: Some(serde_json::to_vec(status).unwrap()),
                        });
                    }
                    Output::DeleteStatus { name } => {
                        self.status_writes += 1;
                        self.statuses.remove(name);
                        inputs.push_back(Input::Status {
                            name: name.clone(),
                            value: None,
                        });
                    }
                }
            }
        }
    }

    fn apply(&mut self, deployment: &str, value: Vec<u8>) {
        let generation = self.next_revision();
        self.deployments
            .insert(name(deployment), (generation, Some(value.clone())));
        self.feed(Input::DeploymentPut {
            name: name(deployment),
            generation,
            value,
        });
    }

    fn delete(&mut self, deployment: &str) {
        let generation = self.next_revision();
        self.deployments
            .insert(name(deployment), (generation, None));
        self.feed(Input::DeploymentDeleted {
            name: name(deployment),
        });
    }

    fn label(&mut self, device: &str, labels: &[(&str, &str)]) {
        self.devices.insert(id(device), record(labels));
        self.feed(Input::DevicePut {
            device: id(device),
            value: record(labels),
        });
    }

    fn beat(&mut self, device: &str) {
        self.beat_with(device, heartbeat(device));
    }

    fn beat_with(&mut self, device: &str, value: Vec<u8>) {
        self.heartbeats.insert(id(device), value.clone());
        self.feed(Input::Heartbeat {
            device: id(device),
            value: Some(value),
            age: Duration::ZERO,
        });
    }

    fn report(&mut self, device: &str, deployment: &str, value: Vec<u8>) {
        self.states.insert(key(device, deployment), value.clone());
        let revision = Revision::new(self.next_revision());
        self.feed(Input::State(Change::Put {
            key: key(device, deployment),
            revision,
            value,
        }));
    }

    /// A desired key's revision.
    fn revision_of(&self, device: &str, deployment: &str) -> u64 {
        self.desired[&key(device, deployment)].0
    }

    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        while let Some(wake) = self.controller.poll_timeout() {
            if wake.at > until {
                break;
            }
            self.now = self.now.max(wake.at);
            self.feed(Input::Timeout);
        }
        self.now = until;
        self.feed(Input::Timeout);
    }

    /// A new controller fed what the buckets hold, as after a restart.
    fn restart(&mut self) {
        self.controller = Controller::new(Config::default(), self.now);
        self.writes.clear();
        self.status_writes = 0;
        let mut inputs = Vec::new();
        for (deployment, (generation, value)) in &self.deployments {
            inputs.push(match value {
                Some(value) => Input::DeploymentPut {
                    name: deployment.clone(),
                    generation: *generation,
                    value: value.clone(),
                },
                None => Input::DeploymentDeleted {
                    name: deployment.clone(),
                },
            });
        }
        for (device, value) in &self.devices {
            inputs.push(Input::DevicePut {
                device: device.clone(),
                value: value.clone(),
            });
        }
        for (key, (revision, value)) in &self.desired {
            inputs.push(Input::Desired(Change::Put {
                key: key.clone(),
                revision: Revision::new(*revision),
                value: value.clone(),
            }));
        }
        for (key, revision) in &self.desired_deleted {
            inputs.push(Input::Desired(Change::Delete {
                key: key.clone(),
                revision: Revision::new(*revision),
            }));
        }
        for (key, value) in &self.states {
            inputs.push(Input::State(Change::Put {
                key: key.clone(),
                revision: Revision::new(1),
                value: value.clone(),
            }));
        }
        for (name, status) in &self.statuses {
            inputs.push(Input::Status {
                name: name.clone(),
                value: Some(serde_json::to_vec(status).unwrap()),
            });
        }
        for (device, value) in &self.heartbeats {
            inputs.push(Input::Heartbeat {
                device: device.clone(),
                value: Some(value.clone()),
                age: Duration::ZERO,
            });
        }
        for input in inputs {
            self.feed(input);
            assert!(self.writes.is_empty(), "wrote before it was synced");
        }
        self.feed(Input::Synced);
    }

    fn desired_keys(&self, deployment: &str) -> Vec<String> {
        self.desired
            .keys()
            .filter(|k| k.deployment.as_str() == deployment)
            .map(|k| k.device.to_string())
            .collect()
    }

    fn status(&self, deployment: &str) -> &FleetDeploymentStatus {
        &self.statuses[&name(deployment)]
    }
}

/// Three devices labelled as the demo labels them: two in lyon, one in paris.
fn three_devices() -> Buckets {
    let mut fleet = Buckets::new();
    fleet.feed(Input::Synced);
    fleet.label("rpi-01", &[("site", "lyon")]);
    fleet.label("rpi-02", &[("site", "lyon"), ("tier", "gw")]);
    fleet.label("rpi-03", &[("site", "paris")]);
    for device in ["rpi-01", "rpi-02", "rpi-03"] {
        fleet.beat(device);
    }
    fleet
}

#[test]
fn nothing_is_written_before_the_buckets_were_read() {
    let mut fleet = Buckets::new();
    fleet.label("rpi-01", &[("site", "lyon")]);
    fleet.apply(
        "web",
        manifest("web", json!({"selector": "site=lyon"}), "web:1"),
    );
    assert!(fleet.writes.is_empty());
    // Nor is there any reason to wake: a shell looping on the deadline
    // would spin.
    assert_eq!(fleet.controller.poll_timeout(), None);
    fleet.feed(Input::Synced);
    assert_eq!(fleet.desired_keys("web"), ["rpi-01"]);
}

#[test]
fn a_selector_picks_the_matching_devices_and_follows_their_labels() {
    let mut fleet = three_devices();
    fleet.apply(
        "web",
        manifest("web", json!({"selector": "site=lyon"}), "web:1"),
    );
    assert_eq!(fleet.desired_keys("web"), ["rpi-01", "rpi-02"]);
    assert_eq!(fleet.desired[&key("rpi-01", "web")].1, score("web:1"));

    // Relabelled away: the key goes. A new matching device: it comes.
    fleet.label("rpi-02", &[("site", "paris")]);
    assert_eq!(fleet.desired_keys("web"), ["rpi-01"]);
    fleet.label("rpi-04", &[("site", "lyon")]);
    assert_eq!(fleet.desired_keys("web"), ["rpi-01", "rpi-04"]);
    // A device whose record is deleted has no labels any more.
    fleet.devices.remove(&id("rpi-04"));
    fleet.feed(Input::DeviceDeleted {
        device: id("rpi-04"),
    });
    assert_eq!(fleet.desired_keys("web"), ["rpi-01"]);
}

#[test]
fn a_device_list_targets_devices_not_known_yet() {
    let mut fleet = three_devices();
    fleet.apply(
        "db",
        manifest("db", json!({"devices": ["rpi-03", "rpi-09"]}), "db:1"),
    );
    assert_eq!(fleet.desired_keys("db"), ["rpi-03", "rpi-09"]);
}

#[test]
fn applying_the_same_spec_again_writes_nothing() {
    let mut fleet = three_devices();
    let web = manifest("web", json!({"selector": "site=lyon"}), "web:1");
    fleet.apply("web", web.clone());
    let writes = fleet.writes.len();
    fleet.apply("web", web);
    fleet.label("rpi-01", &[("site", "lyon")]);
    fleet.beat("rpi-01");
    assert_eq!(fleet.writes.len(), writes);
    // A new image is a write per targeted device, and only that.
    fleet.apply(
        "web",
        manifest("web", json!({"selector": "site=lyon"}), "web:2"),
    );
    assert_eq!(fleet.writes.len(), writes + 2);
}

#[test]
fn a_restarted_controller_rewrites_nothing_and_finishes_what_was_missed() {
    let mut fleet = three_devices();
    fleet.apply(
        "web",
        manifest("web", json!({"selector": "site=lyon"}), "web:1"),
    );
    fleet.apply("db", manifest("db", json!({"devices": ["rpi-03"]}), "db:1"));
    fleet.advance(Duration::from_secs(2));
    fleet.restart();
    fleet.advance(Duration::from_secs(2));
    assert_eq!(fleet.writes, []);
    assert_eq!(fleet.status_writes, 0, "a status was rewritten");

    // While it was down: a relabel, and a deployment deleted.
    fleet
        .devices
        .insert(id("rpi-01"), record(&[("site", "paris")]));
    fleet.deployments.insert(name("db"), (99, None));
    fleet.restart();
    assert_eq!(fleet.desired_keys("web"), ["rpi-02"]);
    assert_eq!(fleet.desired_keys("db"), Vec::<String>::new());
    assert_eq!(fleet.writes.len(), 2);
    assert!(
        !fleet.statuses.contains_key(&name("db")),
        "a deleted deployment's status stays"
    );
}

#[test]
fn a_deleted_deployment_is_torn_down_and_hand_written_keys_are_left_alone() {
    let mut fleet = three_devices();
    fleet.apply("web", manifest("web", json!({"selector": ""}), "web:1"));
    assert_eq!(fleet.desired_keys("web"), ["rpi-01", "rpi-02", "rpi-03"]);
    assert!(fleet.statuses.contains_key(&name("web")));
    // A key someone wrote by hand, under a name no fleet deployment has.
    fleet.feed(Input::Desired(Change::Put {
        key: key("rpi-01", "manual"),
        revision: Revision::new(500),
        value: score("x:1"),
    }));
    fleet.delete("web");
    assert_eq!(fleet.desired_keys("web"), Vec::<String>::new());
    assert!(!fleet.statuses.contains_key(&name("web")));
    assert!(!fleet
        .writes
        .iter()
        .any(|w| matches!(w, Output::PutDesired { key, .. } | Output::DeleteDesired { key } if key.deployment.as_str() == "manual")));
}

#[test]
fn a_teardown_holds_keys_until_every_delete_is_seen() {
    let mut fleet = Buckets::new();
    assert!(
        !fleet.controller.holds_no_keys(&name("web")),
        "not synced yet"
    );
    fleet = three_devices();
    assert!(fleet.controller.holds_no_keys(&name("web")));
    fleet.apply("web", manifest("web", json!({"selector": ""}), "web:1"));
    assert!(!fleet.controller.holds_no_keys(&name("web")));
    // The broker refuses the first delete: the key stays, and so does the
    // answer, until the retry went through.
    fleet.refuse = 1;
    fleet.delete("web");
    assert_eq!(fleet.desired_keys("web"), ["rpi-01"]);
    assert!(!fleet.controller.holds_no_keys(&name("web")));
    fleet.advance(Duration::from_secs(2));
    assert_eq!(fleet.desired_keys("web"), Vec::<String>::new());
    assert!(fleet.controller.holds_no_keys(&name("web")));
}

#[test]
fn a_heartbeat_older_than_the_clock_is_offline() {
    // A controller whose clock starts at zero reads a heartbeat written
    // an hour before: the device is offline, not fresh for a minute.
    let mut fleet = Buckets::new();
    fleet.feed(Input::Heartbeat {
        device: id("rpi-01"),
        value: Some(heartbeat("rpi-01")),
        age: Duration::from_secs(3600),
    });
    fleet.feed(Input::Synced);
    let view = fleet.controller.device(&id("rpi-01")).unwrap();
    assert!(!view.online);
    assert_eq!(fleet.controller.poll_timeout(), None);
}

#[test]
fn a_refused_manifest_leaves_the_devices_alone_and_says_why() {
    let mut fleet = three_devices();
    fleet.apply(
        "web",
        manifest("web", json!({"selector": "site=lyon"}), "web:1"),
    );
    let writes = fleet.writes.len();
    fleet.apply(
        "web",
        manifest("web", json!({"selector": "site=lyon"}), " "),
    );
    fleet.advance(Duration::from_secs(2));
    assert_eq!(fleet.writes.len(), writes);
    assert_eq!(fleet.desired_keys("web"), ["rpi-01", "rpi-02"]);
    let error = fleet.status("web").error.clone().unwrap();
    assert!(
        error.contains("was refused: spec.score.services[0].image: "),
        "{error}"
    );
    // It keeps following the last valid manifest.
    fleet.label("rpi-03", &[("site", "lyon")]);
    assert_eq!(fleet.desired_keys("web"), ["rpi-01", "rpi-02", "rpi-03"]);
    assert_eq!(fleet.desired[&key("rpi-03", "web")].1, score("web:1"));
    // A manifest stored under another name than its own.
    fleet.apply("api", manifest("web", json!({"selector": ""}), "web:1"));
    fleet.advance(Duration::from_secs(2));
    assert!(fleet
        .status("api")
        .error
        .as_ref()
        .unwrap()
        .contains("differs from the key"));
    assert_eq!(fleet.desired_keys("api"), Vec::<String>::new());
}

#[test]
fn a_refused_write_is_retried_with_backoff() {
    let mut fleet = three_devices();
    fleet.refuse = 2;
    fleet.apply(
        "web",
        manifest("web", json!({"devices": ["rpi-01"]}), "web:1"),
    );
    assert_eq!(fleet.desired_keys("web"), Vec::<String>::new());
    let wake = fleet.controller.poll_timeout().unwrap();
    assert_eq!(wake.reason, WakeReason::WriteRetry);
    assert_eq!(wake.at, Timestamp::from_millis(1_000));
    fleet.advance(Duration::from_secs(1));
    assert_eq!(fleet.desired_keys("web"), Vec::<String>::new());
    fleet.advance(Duration::from_secs(2));
    assert_eq!(fleet.desired_keys("web"), ["rpi-01"]);
    assert_eq!(fleet.writes.len(), 3);
}

#[test]
fn a_key_changed_by_hand_is_put_back() {
    let mut fleet = three_devices();
    fleet.apply(
        "web",
        manifest("web", json!({"devices": ["rpi-01"]}), "web:1"),
    );
    fleet.feed(Input::Desired(Change::Put {
        key: key("rpi-01", "web"),
        revision: Revision::new(700),
        value: score("evil:1"),
    }));
    assert_eq!(fleet.desired[&key("rpi-01", "web")].1, score("web:1"));
}

#[test]
fn the_status_counts_phases_offline_devices_and_groups_failures() {
    let mut fleet = three_devices();
    fleet.label("rpi-03", &[("site", "lyon")]);
    fleet.apply(
        "web",
        manifest("web", json!({"selector": "site=lyon"}), "web:1"),
    );
    let status = fleet.status("web").clone();
    assert_eq!(
        (status.targeted, status.updated, status.phases.pending),
        (3, 0, 3)
    );

    let rev = |fleet: &Buckets, d: &str| fleet.revision_of(d, "web");
    let (r1, r2, r3) = (
        rev(&fleet, "rpi-01"),
        rev(&fleet, "rpi-02"),
        rev(&fleet, "rpi-03"),
    );
    fleet.report("rpi-01", "web", report("running", r1, None));
    let exited = json!({"kind": "init_container_exited", "name": "migrate", "exit_code": 5});
    fleet.report("rpi-02", "web", report("failed", r2, Some(exited.clone())));
    // A report about an older revision is not about this one.
    fleet.report("rpi-03", "web", report("running", r3 - 1, None));
    fleet.advance(Duration::from_secs(1));
    let status = fleet.status("web").clone();
    assert_eq!(
        status.observed_generation,
        fleet.deployments[&name("web")].0
    );
    assert_eq!((status.targeted, status.updated), (3, 2));
    assert_eq!(
        (
            status.phases.running,
            status.phases.failed,
            status.phases.pending
        ),
        (1, 1, 1)
    );
    assert_eq!(status.failures.len(), 1);
    assert_eq!(status.failures[0].devices, [id("rpi-02")]);
    assert_eq!(
        status.failures[0].message,
        "init container \"migrate\" exited with code 5"
    );
    assert!(!status.is_complete());

    // Heartbeats stop: after a minute every device is offline.
    fleet.advance(Duration::from_secs(61));
    assert_eq!(fleet.status("web").offline, 3);
    fleet.beat("rpi-01");
    fleet.advance(Duration::from_secs(1));
    assert_eq!(fleet.status("web").offline, 2);

    fleet.report("rpi-02", "web", report("running", r2, None));
    fleet.report("rpi-03", "web", report("running", r3, None));
    fleet.advance(Duration::from_secs(1));
    assert!(fleet.status("web").is_complete());
}

#[test]
fn ten_thousand_reports_make_a_handful_of_status_writes() {
    let mut fleet = Buckets::new();
    fleet.feed(Input::Synced);
    for n in 0..200 {
        fleet.beat(&format!("d{n}"));
    }
    fleet.apply("web", manifest("web", json!({"selector": ""}), "web:1"));
    let mut writes = 0;
    for n in 0..200 {
        let device = format!("d{n}");
        let revision = fleet.revision_of(&device, "web");
        fleet.report(&device, "web", report("running", revision, None));
        let before = fleet.statuses[&name("web")].clone();
        if fleet
            .controller
            .poll_timeout()
            .is_some_and(|w| w.reason == WakeReason::Status)
        {
            fleet.now = fleet.now + Duration::from_millis(10);
        }
        writes += usize::from(fleet.statuses[&name("web")] != before);
    }
    fleet.advance(Duration::from_secs(1));
    assert!(fleet.status("web").is_complete());
    assert!(writes <= 3, "{writes} status writes in 2 s");
}

#[test]
fn a_report_outliving_its_desired_key_is_deleted_after_the_grace() {
    let mut fleet = three_devices();
    fleet.report("rpi-01", "gone", report("running", 3, None));
    fleet.beat("rpi-01");
    assert!(fleet.states.contains_key(&key("rpi-01", "gone")));
    fleet.advance(Duration::from_secs(599));
    fleet.beat("rpi-01");
    assert!(fleet.states.contains_key(&key("rpi-01", "gone")));
    fleet.advance(Duration::from_secs(2));
    fleet.beat("rpi-01");
    assert!(!fleet.states.contains_key(&key("rpi-01", "gone")));
}

#[test]
fn views_show_each_device_and_each_targeted_device() {
    let mut fleet = three_devices();
    fleet.apply(
        "web",
        manifest("web", json!({"selector": "site=lyon"}), "web:1"),
    );
    let r1 = fleet.revision_of("rpi-01", "web");
    fleet.report("rpi-01", "web", report("running", r1, None));
    let rows = fleet.controller.rollout(&name("web"));
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].device.as_str(), rows[0].phase()),
        ("rpi-01", Phase::Running)
    );
    assert_eq!(
        (rows[1].device.as_str(), rows[1].phase()),
        ("rpi-02", Phase::Pending)
    );
    let devices: Vec<_> = fleet.controller.devices().collect();
    assert_eq!(devices.len(), 3);
    assert_eq!(devices[0].deployments, [&name("web")]);
    assert!(devices[2].deployments.is_empty());
    assert_eq!(
        devices[1].labels.get("tier").map(String::as_str),
        Some("gw")
    );
}

// ---- all or nothing ----

/// Why `web`'s writes are refused, as of now (the status bucket may lag
/// by the status interval).
fn refusal_now(fleet: &Buckets) -> Option<crate::fleet::PlacementRefusal> {
    fleet.controller.status(&name("web")).placement
}

/// A `web` manifest for `devices`, with `placement` (`None`: the field
/// left out) and the score's `lifetime`, forced when `force`.
fn placed(
    placement: Option<&str>,
    devices: &[&str],
    image: &str,
    lifetime: Option<&str>,
    force: bool,
) -> Vec<u8> {
    let mut score = json!({"services": [{"name": "app", "image": image}]});
    if let Some(lifetime) = lifetime {
        score["lifetime"] = json!(lifetime);
    }
    let mut spec = json!({"target": {"devices": devices}, "score": score});
    if let Some(placement) = placement {
        spec["placement"] = json!(placement);
    }
    let mut manifest = crate::fleet::FleetDeployment::from_value(json!({
        "apiVersion": API_VERSION,
        "kind": FLEET_DEPLOYMENT_KIND,
        "metadata": {"name": "web"},
        "spec": spec,
    }))
    .unwrap();
    if force {
        manifest.spec = manifest.spec.forced();
    }
    manifest.to_json()
}

fn scored(image: &str, lifetime: Option<&str>) -> Vec<u8> {
    let mut score = json!({"services": [{"name": "app", "image": image}]});
    if let Some(lifetime) = lifetime {
        score["lifetime"] = json!(lifetime);
    }
    crate::wire::PodmanV0Score::from_json(score.to_string().as_bytes())
        .unwrap()
        .to_json()
}

/// What a targeted device does before the next revision is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Before {
    /// Reports `running`.
    Runs,
    /// Reports `succeeded` (a run to completion).
    Succeeded,
    /// Reports `pending`.
    Pending,
    /// Reports `failed`.
    Failed,
    /// Online, reports nothing.
    Silent,
    /// Reported `running`, then its heartbeat went away.
    Offline,
    /// Never sent a heartbeat nor has a record.
    NeverSeen,
}

const DEVICES: [&str; 3] = ["rpi-01", "rpi-02", "rpi-03"];

/// Three devices that got `web` with image `web:1` (written without
/// asking), then each did what `before` says; returns them before `web:2`.
fn placed_fleet(before: [Before; 3], lifetime: Option<&str>) -> Buckets {
    let mut fleet = Buckets::new();
    fleet.feed(Input::Synced);
    for (device, before) in DEVICES.iter().zip(before) {
        if before != Before::NeverSeen {
            fleet.label(device, &[("site", "lyon")]);
            fleet.beat(device);
        }
    }
    fleet.apply("web", placed(None, &DEVICES, "web:1", lifetime, false));
    assert_eq!(fleet.desired_keys("web"), DEVICES);
    for (device, before) in DEVICES.iter().zip(before) {
        let revision = fleet.revision_of(device, "web");
        let phase = match before {
            Before::Runs | Before::Offline => "running",
            Before::Succeeded => "succeeded",
            Before::Pending => "pending",
            Before::Failed => "failed",
            Before::Silent | Before::NeverSeen => continue,
        };
        let cause = (before == Before::Failed).then(
            || json!({"kind": "crash_loop", "service": "app", "restarts": 3, "last_exit_code": 1}),
        );
        fleet.report(device, "web", report(phase, revision, cause));
        if before == Before::Offline {
            fleet.heartbeats.remove(&id(device));
            fleet.feed(Input::Heartbeat {
                device: id(device),
                value: None,
                age: Duration::ZERO,
            });
        }
    }
    fleet.advance(Duration::from_secs(1));
    fleet
}

/// The devices whose key holds `web:2`.
fn on_second(fleet: &Buckets, lifetime: Option<&str>) -> Vec<String> {
    let second = scored("web:2", lifetime);
    fleet
        .desired
        .iter()
        .filter(|(k, (_, v))| k.deployment.as_str() == "web" && *v == second)
        .map(|(k, _)| k.device.to_string())
        .collect()
}

/// The truth table of docs/lifetimes.md ("All or nothing"), row by row: what the
/// targeted devices do when `web:2` is applied, and what is written.
#[test]
fn all_or_nothing_writes_to_every_device_or_to_none() {
    use Before::*;
    use PlacementReason::*;
    /// Placement, lifetime, forced, the devices, written, refused because.
    type Row = (
        Option<&'static str>,
        Option<&'static str>,
        bool,
        [Before; 3],
        bool,
        Option<PlacementReason>,
    );
    #[rustfmt::skip]
    let table: [Row; 26] = [
        // Independent (and absent): every device on its own, always.
        (None,                 None, false, [Runs, Runs, Runs],           true,  None),
        (None,                 None, false, [Silent, Silent, Silent],     true,  None),
        (None,                 None, false, [Runs, Silent, Failed],       true,  None),
        (None,                 None, false, [Runs, Runs, Offline],        true,  None),
        (Some("Independent"),  None, false, [Runs, Pending, NeverSeen],   true,  None),
        // All run it: attach.
        (Some("AllOrNothing"), None, false, [Runs, Runs, Runs],           true,  None),
        // None runs it and each can be asked: cold start.
        (Some("AllOrNothing"), None, false, [Silent, Silent, Silent],     true,  None),
        (Some("AllOrNothing"), None, false, [Pending, Failed, Silent],    true,  None),
        // Some run it, some do not: refused.
        (Some("AllOrNothing"), None, false, [Runs, Runs, Silent],         false, Some(PartialPlacement)),
        (Some("AllOrNothing"), None, false, [Runs, Failed, Runs],         false, Some(PartialPlacement)),
        (Some("AllOrNothing"), None, false, [Pending, Runs, Runs],        false, Some(PartialPlacement)),
        (Some("AllOrNothing"), None, false, [Runs, Silent, Offline],      false, Some(PartialPlacement)),
        // Any device that cannot be asked: refused, never a cold start.
        (Some("AllOrNothing"), None, false, [Runs, Runs, Offline],        false, Some(UnknownDevices)),
        (Some("AllOrNothing"), None, false, [Silent, Silent, Offline],    false, Some(UnknownDevices)),
        (Some("AllOrNothing"), None, false, [Silent, Silent, NeverSeen],  false, Some(UnknownDevices)),
        (Some("AllOrNothing"), None, false, [Offline, Offline, Offline],  false, Some(UnknownDevices)),
        // `succeeded` is having run it for a run to completion only.
        (Some("AllOrNothing"), Some("per_run"), false, [Succeeded, Runs, Succeeded], true, None),
        (Some("AllOrNothing"), Some("per_run"), false, [Succeeded, Silent, Silent],  false, Some(PartialPlacement)),
        (Some("AllOrNothing"), None, false, [Succeeded, Succeeded, Silent], true,  None),
        (Some("AllOrNothing"), None, false, [Succeeded, Runs, Runs],        false, Some(PartialPlacement)),
        // Forced: written whatever the devices do.
        (Some("AllOrNothing"), None, true,  [Runs, Runs, Runs],           true,  None),
        (Some("AllOrNothing"), None, true,  [Silent, Silent, Silent],     true,  None),
        (Some("AllOrNothing"), None, true,  [Runs, Silent, Failed],       true,  None),
        (Some("AllOrNothing"), None, true,  [Runs, Runs, Offline],        true,  None),
        (Some("AllOrNothing"), None, true,  [Silent, Silent, NeverSeen],  true,  None),
        (Some("AllOrNothing"), Some("per_run"), true, [Succeeded, Silent, Offline], true, None),
    ];
    for (placement, lifetime, force, before, written, refused) in table {
        let case = format!("{placement:?} {lifetime:?} forced={force} {before:?}");
        let mut fleet = placed_fleet(before, lifetime);
        let writes = fleet.writes.len();
        fleet.apply("web", placed(placement, &DEVICES, "web:2", lifetime, force));
        fleet.advance(Duration::from_secs(1));
        let status = fleet.status("web").clone();
        if written {
            assert_eq!(on_second(&fleet, lifetime), DEVICES, "{case}");
            assert_eq!(fleet.writes.len(), writes + 3, "{case}");
            assert_eq!(status.placement, None, "{case}");
        } else {
            // Nothing written, nothing deleted: every key keeps web:1.
            assert_eq!(fleet.writes.len(), writes, "{case}");
            assert_eq!(fleet.desired_keys("web"), DEVICES, "{case}");
            assert!(on_second(&fleet, lifetime).is_empty(), "{case}");
            let refusal = status
                .placement
                .as_ref()
                .unwrap_or_else(|| panic!("{case}"));
            assert_eq!(Some(refusal.reason), refused, "{case}");
            let count = |wanted: &[Before]| before.iter().filter(|b| wanted.contains(b)).count();
            let ran: &[Before] = if lifetime == Some("per_run") {
                &[Runs, Succeeded]
            } else {
                &[Runs]
            };
            assert_eq!(refusal.running.count as usize, count(ran), "{case}");
            assert_eq!(
                refusal.unknown.count as usize,
                count(&[Offline, NeverSeen]),
                "{case}"
            );
            assert_eq!(
                (refusal.running.count + refusal.not_running.count + refusal.unknown.count),
                3,
                "{case}"
            );
            assert!(!status.is_complete(), "{case}");
        }
    }
}

#[test]
fn a_refusal_holds_until_the_devices_agree_and_unknown_never_cold_starts() {
    use Before::*;
    let mut fleet = placed_fleet([Runs, Runs, Silent], None);
    let all_or_nothing = |image| placed(Some("AllOrNothing"), &DEVICES, image, None, false);
    fleet.apply("web", all_or_nothing("web:2"));
    let refusal = refusal_now(&fleet).unwrap();
    assert_eq!(refusal.running.devices, [id("rpi-01"), id("rpi-02")]);
    assert_eq!(refusal.not_running.devices, [id("rpi-03")]);
    // Time alone changes nothing.
    let writes = fleet.writes.len();
    for _ in 0..5 {
        fleet.advance(Duration::from_secs(30));
        DEVICES.iter().for_each(|d| fleet.beat(d));
    }
    assert_eq!(fleet.writes.len(), writes);
    // rpi-03 turns out to run it too: all run it, the new revision goes out.
    let revision = fleet.revision_of("rpi-03", "web");
    fleet.report("rpi-03", "web", report("running", revision, None));
    assert_eq!(on_second(&fleet, None), DEVICES);
    fleet.advance(Duration::from_secs(1));
    assert_eq!(refusal_now(&fleet), None);

    // Unknown devices: the two that can be asked run nothing, the third
    // is away. Not a cold start, however long it is away.
    let mut fleet = placed_fleet([Silent, Silent, Offline], None);
    fleet.apply("web", all_or_nothing("web:2"));
    let writes = fleet.writes.len();
    for _ in 0..10 {
        fleet.advance(Duration::from_secs(30));
        fleet.beat("rpi-01");
        fleet.beat("rpi-02");
    }
    assert_eq!(fleet.writes.len(), writes);
    assert_eq!(
        refusal_now(&fleet).map(|p| p.reason),
        Some(PlacementReason::UnknownDevices)
    );
    // It comes back, still running the old revision: partial now.
    fleet.beat("rpi-03");
    fleet.advance(Duration::from_secs(1));
    assert_eq!(fleet.writes.len(), writes);
    assert_eq!(
        refusal_now(&fleet).map(|p| p.reason),
        Some(PlacementReason::PartialPlacement)
    );
    // Its container went away meanwhile: it reports nothing any more, so
    // none runs it and all can be asked: cold start.
    fleet.states.remove(&key("rpi-03", "web"));
    fleet.feed(Input::State(Change::Delete {
        key: key("rpi-03", "web"),
        revision: Revision::new(0),
    }));
    assert_eq!(on_second(&fleet, None), DEVICES);

    // A device that goes offline while refused is looked at again too.
    let mut fleet = placed_fleet([Runs, Runs, Silent], None);
    fleet.apply("web", all_or_nothing("web:2"));
    fleet.advance(Duration::from_secs(61));
    fleet.beat("rpi-01");
    fleet.beat("rpi-02");
    fleet.advance(Duration::from_secs(1));
    let refusal = refusal_now(&fleet).unwrap();
    assert_eq!(refusal.unknown.devices, [id("rpi-03")]);
    assert_eq!(refusal.reason, PlacementReason::UnknownDevices);
}

#[test]
fn a_forced_spec_is_written_everywhere_and_a_new_spec_asks_again() {
    use Before::*;
    let mut fleet = placed_fleet([Runs, Silent, Offline], None);
    let manifest = |image, force| placed(Some("AllOrNothing"), &DEVICES, image, None, force);
    fleet.apply("web", manifest("web:2", false));
    assert!(on_second(&fleet, None).is_empty());
    fleet.apply("web", manifest("web:2", true));
    assert_eq!(on_second(&fleet, None), DEVICES);
    fleet.advance(Duration::from_secs(1));
    assert_eq!(refusal_now(&fleet), None);
    // A restarted controller reads the same forced spec: nothing to do.
    fleet.restart();
    fleet.advance(Duration::from_secs(1));
    assert_eq!(fleet.writes, []);
    // The next spec is not forced: the devices are asked again. rpi-01
    // runs web:2, rpi-02 does not, rpi-03 is away.
    let revision = fleet.revision_of("rpi-01", "web");
    fleet.report("rpi-01", "web", report("running", revision, None));
    fleet.apply("web", manifest("web:3", false));
    assert!(fleet.writes.is_empty());
    assert_eq!(
        refusal_now(&fleet).map(|p| p.reason),
        Some(PlacementReason::PartialPlacement)
    );
    // A stale token (the forced web:2 spec's) forces nothing.
    let stale = {
        let forced: crate::fleet::FleetDeployment =
            serde_json::from_slice(&manifest("web:2", true)).unwrap();
        let mut next: crate::fleet::FleetDeployment =
            serde_json::from_slice(&manifest("web:3", false)).unwrap();
        next.spec.force = forced.spec.force;
        next.to_json()
    };
    fleet.apply("web", stale);
    assert!(fleet.writes.is_empty());
}

#[test]
fn a_device_joining_a_running_all_or_nothing_deployment_is_refused() {
    let mut fleet = three_devices();
    let selector = |force| {
        let mut manifest: crate::fleet::FleetDeployment =
            serde_json::from_slice(&manifest("web", json!({"selector": "site=lyon"}), "web:1"))
                .unwrap();
        manifest.spec.placement = crate::fleet::Placement::AllOrNothing;
        if force {
            manifest.spec = manifest.spec.forced();
        }
        manifest.to_json()
    };
    // Cold start on rpi-01 and rpi-02; both come to run it.
    fleet.apply("web", selector(false));
    assert_eq!(fleet.desired_keys("web"), ["rpi-01", "rpi-02"]);
    for device in ["rpi-01", "rpi-02"] {
        let revision = fleet.revision_of(device, "web");
        fleet.report(device, "web", report("running", revision, None));
    }
    // rpi-03 joins lyon: it would run it alone beside two that do.
    let writes = fleet.writes.len();
    fleet.label("rpi-03", &[("site", "lyon")]);
    fleet.advance(Duration::from_secs(1));
    assert_eq!(fleet.writes.len(), writes);
    let refusal = refusal_now(&fleet).unwrap();
    assert_eq!(refusal.not_running.devices, [id("rpi-03")]);
    // While refused, rpi-02 leaves lyon: its delete waits too.
    fleet.label("rpi-02", &[("site", "paris")]);
    assert_eq!(fleet.writes.len(), writes);
    assert_eq!(fleet.desired_keys("web"), ["rpi-01", "rpi-02"]);
    // rpi-03 leaves again: rpi-01 alone runs it, rpi-02's delete goes out.
    fleet.label("rpi-03", &[("site", "paris")]);
    assert_eq!(fleet.desired_keys("web"), ["rpi-01"]);
    fleet.advance(Duration::from_secs(1));
    assert_eq!(refusal_now(&fleet), None);
    // Forced, a joining device gets it while the forced spec stands.
    fleet.apply("web", selector(true));
    fleet.label("rpi-03", &[("site", "lyon")]);
    assert_eq!(fleet.desired_keys("web"), ["rpi-01", "rpi-03"]);
}

#[test]
fn deleting_an_all_or_nothing_deployment_is_never_refused() {
    use Before::*;
    let mut fleet = placed_fleet([Runs, Silent, Offline], None);
    fleet.apply(
        "web",
        placed(Some("AllOrNothing"), &DEVICES, "web:2", None, false),
    );
    assert!(refusal_now(&fleet).is_some());
    fleet.delete("web");
    assert_eq!(fleet.desired_keys("web"), Vec::<String>::new());
    assert!(!fleet.statuses.contains_key(&name("web")));
}

#[test]
fn a_refused_write_is_retried_without_asking_the_devices_again() {
    let mut fleet = three_devices();
    let manifest = placed(Some("AllOrNothing"), &DEVICES, "web:1", None, false);
    // A cold start whose write to rpi-01 the broker refuses.
    fleet.refuse = 1;
    fleet.apply("web", manifest);
    assert_eq!(fleet.desired_keys("web"), ["rpi-02", "rpi-03"]);
    // Meanwhile the others run it: asked now, the devices would refuse.
    for device in ["rpi-02", "rpi-03"] {
        let revision = fleet.revision_of(device, "web");
        fleet.report(device, "web", report("running", revision, None));
    }
    assert_eq!(refusal_now(&fleet), None, "a retry is not a refusal");
    fleet.advance(Duration::from_secs(2));
    assert_eq!(fleet.desired_keys("web"), DEVICES);
}

#[test]
fn a_restarted_controller_refuses_what_it_refused() {
    use Before::*;
    let mut fleet = placed_fleet([Runs, Runs, Silent], None);
    fleet.apply(
        "web",
        placed(Some("AllOrNothing"), &DEVICES, "web:2", None, false),
    );
    fleet.advance(Duration::from_secs(1));
    let before = fleet.status("web").clone();
    fleet.restart();
    fleet.advance(Duration::from_secs(1));
    assert_eq!(fleet.writes, []);
    assert_eq!(fleet.status_writes, 0, "the status was rewritten");
    assert_eq!(fleet.status("web"), &before);
}

#[test]
fn the_status_accounts_for_every_targeted_device_s_digest() {
    let running = |revision: u64, digest: Option<&str>| {
        let mut state = json!({"phase": "running", "revision": revision,
                               "container_ids": {"app": "c1"}});
        if let Some(digest) = digest {
            state["image_digests"] = json!({"app": digest});
        }
        state.to_string().into_bytes()
    };
    let mut fleet = three_devices();
    fleet.apply(
        "web",
        manifest(
            "web",
            json!({"devices": ["rpi-01", "rpi-02", "rpi-03", "rpi-09"]}),
            "registry.example/web:1",
        ),
    );
    let rev = |fleet: &Buckets, d: &str| fleet.revision_of(d, "web");
    let r = rev(&fleet, "rpi-01");
    fleet.report("rpi-01", "web", running(r, Some("sha256:a")));
    let r = rev(&fleet, "rpi-02");
    fleet.report("rpi-02", "web", running(r, Some("sha256:b")));
    let r = rev(&fleet, "rpi-03");
    fleet.report("rpi-03", "web", running(r, None));
    fleet.advance(Duration::from_secs(1));
    let skew = &fleet.status("web").skew;
    assert_eq!(skew.len(), 1, "{skew:?}");
    let groups: Vec<(Option<&str>, bool, Vec<&str>)> = skew[0]
        .digests
        .iter()
        .map(|g| {
            (
                g.digest.as_deref(),
                g.missing,
                g.devices.iter().map(DeviceId::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        // Largest first; among equals, not reported first, missing last.
        [
            (None, false, vec!["rpi-03"]),
            (Some("sha256:a"), false, vec!["rpi-01"]),
            (Some("sha256:b"), false, vec!["rpi-02"]),
            (None, true, vec!["rpi-09"]),
        ]
    );

    // Every device agrees: no skew.
    let mut fleet = three_devices();
    fleet.apply(
        "web",
        manifest("web", json!({"selector": ""}), "registry.example/web:1"),
    );
    for device in DEVICES {
        let r = rev(&fleet, device);
        fleet.report(device, "web", running(r, Some("sha256:a")));
    }
    fleet.advance(Duration::from_secs(1));
    assert!(fleet.status("web").skew.is_empty());
    // One of them ran it to completion: it has nothing left to compare.
    let r = rev(&fleet, "rpi-03");
    fleet.report("rpi-03", "web", report("succeeded", r, None));
    fleet.advance(Duration::from_secs(1));
    assert!(fleet.status("web").skew.is_empty());
}

/// The outputs of an all-or-nothing rollout, as a reviewed transcript:
/// cold start, attach, a refusal, and the forced rollout.
#[test]
fn all_or_nothing_transcript() {
    let mut fleet = three_devices();
    let mut transcript = String::new();
    let mut step = |fleet: &mut Buckets, what: &str| {
        fleet.advance(Duration::from_secs(1));
        transcript.push_str(&format!("## {what}\n"));
        for write in fleet.writes.drain(..) {
            let line = match write {
                Output::PutDesired { key, payload } => {
                    let score: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                    format!(
                        "put    {}.{} {}",
                        key.device, key.deployment, score["services"][0]["image"]
                    )
                }
                Output::DeleteDesired { key } => {
                    format!("delete {}.{}", key.device, key.deployment)
                }
                other => format!("{other:?}"),
            };
            transcript.push_str(&line);
            transcript.push('\n');
        }
        match &fleet.status("web").placement {
            Some(refusal) => transcript.push_str(&format!(
                "status: {}: {}\n",
                refusal.reason.as_str(),
                refusal.message()
            )),
            None => transcript.push_str("status: written\n"),
        }
    };
    let manifest = |image, force| placed(Some("AllOrNothing"), &DEVICES, image, None, force);
    let run_all = |fleet: &mut Buckets| {
        for device in DEVICES {
            let revision = fleet.revision_of(device, "web");
            fleet.report(device, "web", report("running", revision, None));
        }
    };
    fleet.apply("web", manifest("web:1", false));
    step(&mut fleet, "web:1, nothing runs: cold start");
    run_all(&mut fleet);
    fleet.apply("web", manifest("web:2", false));
    step(&mut fleet, "web:2, all run web:1: attach");
    for device in ["rpi-01", "rpi-02"] {
        let revision = fleet.revision_of(device, "web");
        fleet.report(device, "web", report("running", revision, None));
    }
    let revision = fleet.revision_of("rpi-03", "web");
    fleet.report(
        "rpi-03",
        "web",
        report(
            "failed",
            revision,
            Some(
                json!({"kind": "crash_loop", "service": "app", "restarts": 3, "last_exit_code": 1}),
            ),
        ),
    );
    fleet.apply("web", manifest("web:3", false));
    step(&mut fleet, "web:3, rpi-03 failed: refused");
    fleet.heartbeats.remove(&id("rpi-02"));
    fleet.feed(Input::Heartbeat {
        device: id("rpi-02"),
        value: None,
        age: Duration::ZERO,
    });
    step(&mut fleet, "rpi-02 goes away: still refused");
    fleet.apply("web", manifest("web:3", true));
    step(&mut fleet, "web:3 forced");
    insta::assert_snapshot!(transcript);
}

// ---- the property ----

#[derive(Debug, Clone)]
enum Op {
    /// Device `d` gets labels `site=s` (and `canary` when `c`).
    Label(u8, u8, bool),
    Unlabel(u8),
    Join(u8),
    Leave(u8),
    /// Deployment `n` targets `site=s`, or devices `mask`, with image `i`.
    ApplySelector(u8, u8, u8),
    ApplyDevices(u8, u8, u8),
    ApplyBroken(u8),
    Delete(u8),
    Report(u8, u8),
    Refuse(u8),
    Restart,
    Advance(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..6u8, 0..3u8, any::<bool>()).prop_map(|(d, s, c)| Op::Label(d, s, c)),
        (0..6u8).prop_map(Op::Unlabel),
        (0..6u8).prop_map(Op::Join),
        (0..6u8).prop_map(Op::Leave),
        (0..3u8, 0..3u8, 0..3u8).prop_map(|(n, s, i)| Op::ApplySelector(n, s, i)),
        (0..3u8, any::<u8>(), 0..3u8).prop_map(|(n, m, i)| Op::ApplyDevices(n, m, i)),
        (0..3u8).prop_map(Op::ApplyBroken),
        (0..3u8).prop_map(Op::Delete),
        (0..6u8, 0..3u8).prop_map(|(d, n)| Op::Report(d, n)),
        (0..4u8).prop_map(Op::Refuse),
        Just(Op::Restart),
        (0..120u16).prop_map(Op::Advance),
    ]
}

fn dev(n: u8) -> String {
    format!("d{n}")
}

fn dep(n: u8) -> String {
    format!("app{n}")
}

/// What the model says each deployment's keys should be: the resolved
/// target of its last valid manifest, or nothing once deleted.
fn expected(
    fleet: &Buckets,
    intended: &BTreeMap<String, Option<(serde_json::Value, String)>>,
) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for (deployment, intent) in intended {
        let mut keys = BTreeMap::new();
        if let Some((target, image)) = intent {
            for n in 0..6u8 {
                let device = dev(n);
                let labels = fleet
                    .devices
                    .get(&id(&device))
                    .map(|r| DeviceRecord::from_json(r).unwrap().labels);
                let known = labels.is_some() || fleet.heartbeats.contains_key(&id(&device));
                let hit = if let Some(ids) = target.get("devices") {
                    ids.as_array().unwrap().iter().any(|v| v == &json!(device))
                } else {
                    let selector: crate::fleet::Selector =
                        target["selector"].as_str().unwrap().parse().unwrap();
                    known && selector.matches(&labels.unwrap_or_default())
                };
                if hit {
                    keys.insert(device, score(image));
                }
            }
        }
        out.insert(deployment.clone(), keys);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// After any sequence of label changes, joins, leaves, applies, deletes,
    /// reports, refused writes and restarts, once the controller is quiet
    /// the desired keys of every fleet deployment are exactly its resolved
    /// target, each holding its score; and the statuses count exactly them.
    #[test]
    fn after_quiescence_the_keys_are_exactly_the_resolved_targets(ops in proptest::collection::vec(op(), 1..40)) {
        let mut fleet = Buckets::new();
        fleet.feed(Input::Synced);
        let mut intended: BTreeMap<String, Option<(serde_json::Value, String)>> = BTreeMap::new();
        let mut broken = std::collections::BTreeSet::new();
        for op in ops {
            match op {
                Op::Label(d, s, canary) => {
                    let site = format!("s{s}");
                    let mut labels = vec![("site", site.as_str())];
                    if canary { labels.push(("canary", "")); }
                    fleet.label(&dev(d), &labels);
                }
                Op::Unlabel(d) => {
                    fleet.devices.remove(&id(&dev(d)));
                    fleet.feed(Input::DeviceDeleted { device: id(&dev(d)) });
                }
                Op::Join(d) => fleet.beat(&dev(d)),
                Op::Leave(d) => {
                    fleet.heartbeats.remove(&id(&dev(d)));
                    fleet.feed(Input::Heartbeat { device: id(&dev(d)), value: None, age: Duration::ZERO });
                }
                Op::ApplySelector(n, s, i) => {
                    let target = json!({"selector": format!("site=s{s},!canary")});
                    let image = format!("img:{i}");
                    fleet.apply(&dep(n), manifest(&dep(n), target.clone(), &image));
                    intended.insert(dep(n), Some((target, image)));
                    broken.remove(&dep(n));
                }
                Op::ApplyDevices(n, mask, i) => {
                    let ids: Vec<String> = (0..6u8).filter(|b| mask & (1 << b) != 0).map(dev).collect();
                    let image = format!("img:{i}");
                    let target = json!({"devices": ids});
                    let value = manifest(&dep(n), target.clone(), &image);
                    fleet.apply(&dep(n), value);
                    if ids.is_empty() {
                        broken.insert(dep(n));
                    } else {
                        intended.insert(dep(n), Some((target, image)));
                        broken.remove(&dep(n));
                    }
                }
                Op::ApplyBroken(n) => {
                    fleet.apply(&dep(n), b"{not json".to_vec());
                    broken.insert(dep(n));
                }
                Op::Delete(n) => {
                    fleet.delete(&dep(n));
                    intended.insert(dep(n), None);
                    broken.remove(&dep(n));
                }
                Op::Report(d, n) => {
                    if let Some((revision, _)) = fleet.desired.get(&key(&dev(d), &dep(n))).cloned() {
                        fleet.report(&dev(d), &dep(n), report("running", revision, None));
                    }
                }
                Op::Refuse(n) => fleet.refuse = u32::from(n),
                Op::Restart => {
                    // A restarted controller never saw the last valid
                    // manifest of a deployment whose newest one is broken:
                    // it leaves that deployment's keys alone.
                    for deployment in &broken {
                        intended.remove(deployment);
                    }
                    fleet.restart();
                }
                Op::Advance(s) => fleet.advance(Duration::from_secs(u64::from(s))),
            }
        }
        fleet.refuse = 0;
        fleet.advance(Duration::from_secs(120));
        let want = expected(&fleet, &intended);
        for (deployment, keys) in &want {
            let got: BTreeMap<String, Vec<u8>> = fleet
                .desired
                .iter()
                .filter(|(k, _)| k.deployment.as_str() == deployment)
                .map(|(k, (_, v))| (k.device.to_string(), v.clone()))
                .collect();
            prop_assert_eq!(&got, keys, "keys of {}", deployment);
            if fleet.deployments.get(&name(deployment)).is_some_and(|(_, v)| v.is_none()) {
                prop_assert!(
                    !fleet.statuses.contains_key(&name(deployment)),
                    "{} is deleted and still has a status", deployment
                );
            }
            if let Some(status) = fleet.statuses.get(&name(deployment)) {
                if status.error.is_none() {
                    prop_assert_eq!(status.targeted as usize, keys.len());
                }
            }
        }
        // Quiet means quiet: nothing more to write.
        let writes = fleet.writes.len();
        fleet.advance(Duration::from_secs(300));
        prop_assert_eq!(fleet.writes.len(), writes);
    }
}

#[test]
fn a_score_feature_is_written_only_to_agents_that_understand_it() {
    let mut fleet = three_devices();
    fleet.beat_with("rpi-02", old_heartbeat("rpi-02"));
    let devices = ["rpi-01", "rpi-02", "rpi-04"];
    // A persistent score uses no feature: every device takes it.
    fleet.apply("web", placed(None, &devices, "web:1", None, false));
    assert_eq!(fleet.desired_keys("web"), devices);
    assert_eq!(fleet.controller.status(&name("web")).outdated_agents, None);
    // A per_run one: not the old agent's device, which keeps what it had;
    // rpi-04 was never heard from, and gets it.
    fleet.apply(
        "web",
        placed(None, &devices, "web:2", Some("per_run"), false),
    );
    assert_eq!(
        fleet.desired[&key("rpi-01", "web")].1,
        scored("web:2", Some("per_run"))
    );
    assert_eq!(
        fleet.desired[&key("rpi-04", "web")].1,
        scored("web:2", Some("per_run"))
    );
    assert_eq!(
        fleet.desired[&key("rpi-02", "web")].1,
        scored("web:1", None)
    );
    let outdated = fleet
        .controller
        .status(&name("web"))
        .outdated_agents
        .unwrap();
    assert_eq!(outdated.features, ["lifetime"]);
    assert_eq!(outdated.devices, DeviceGroup::of(&[id("rpi-02")]));
    assert_eq!(
        outdated.message(),
        "rpi-02 runs an agent that does not understand lifetime: upgrade it (nothing of this generation is written to it)"
    );
    // Its heartbeat deleted, it is still known to be old.
    fleet.heartbeats.remove(&id("rpi-02"));
    fleet.feed(Input::Heartbeat {
        device: id("rpi-02"),
        value: None,
        age: Duration::ZERO,
    });
    assert_eq!(
        fleet.desired[&key("rpi-02", "web")].1,
        scored("web:1", None)
    );
    // Upgraded, it takes it at once.
    fleet.beat("rpi-02");
    assert_eq!(
        fleet.desired[&key("rpi-02", "web")].1,
        scored("web:2", Some("per_run"))
    );
    assert_eq!(fleet.controller.status(&name("web")).outdated_agents, None);
}

#[test]
fn one_outdated_agent_holds_an_all_or_nothing_deployment_everywhere() {
    let mut fleet = three_devices();
    fleet.beat_with("rpi-03", old_heartbeat("rpi-03"));
    let devices = ["rpi-01", "rpi-02", "rpi-03"];
    fleet.apply(
        "web",
        placed(
            Some("AllOrNothing"),
            &devices,
            "web:1",
            Some("per_run"),
            false,
        ),
    );
    assert_eq!(fleet.desired_keys("web"), Vec::<String>::new());
    let status = fleet.controller.status(&name("web"));
    assert_eq!(status.placement, None, "the devices agree: none runs it");
    assert_eq!(
        status.outdated_agents.unwrap().devices,
        DeviceGroup::of(&[id("rpi-03")])
    );
    // Forcing does not write to an agent that would misread the score.
    fleet.apply(
        "web",
        placed(
            Some("AllOrNothing"),
            &devices,
            "web:1",
            Some("per_run"),
            true,
        ),
    );
    assert_eq!(fleet.desired_keys("web"), ["rpi-01", "rpi-02"]);
    fleet.apply(
        "web",
        placed(
            Some("AllOrNothing"),
            &devices,
            "web:1",
            Some("per_run"),
            false,
        ),
    );
    // Upgraded: every device gets it (they had it or take it now).
    fleet.beat("rpi-03");
    assert_eq!(fleet.desired_keys("web"), devices);
    assert_eq!(fleet.controller.status(&name("web")).outdated_agents, None);
}
