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

fn heartbeat(device: &str) -> Vec<u8> {
    json!({"device_id": device, "agent_version": "0.1.0", "uptime_s": 5})
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
                        self.statuses.insert(name.clone(), status.clone());
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
        self.heartbeats.insert(id(device), heartbeat(device));
        self.feed(Input::Heartbeat {
            device: id(device),
            value: Some(heartbeat(device)),
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
