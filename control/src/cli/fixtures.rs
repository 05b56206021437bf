//! A fleet in memory for the CLI's tests: a synced [`Controller`] fed the
//! way the buckets would feed it, with its desired writes carried out.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use podfleet_core::fleet::controller::{Config, Input, Output};
use podfleet_core::fleet::{Controller, FleetDeployment};
use podfleet_core::session::Change;
use podfleet_core::wire::{DeploymentKey, DeploymentName, DeviceId, Revision};
use podfleet_core::Timestamp;
use serde_json::json;

/// The fixtures' `now`: a day after the controller's origin.
pub const NOW: Timestamp = Timestamp::from_millis(86_400_000);

pub fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

pub fn name(s: &str) -> DeploymentName {
    DeploymentName::new(s).unwrap()
}

/// A manifest with one service `app` (and an init container when `init`).
pub fn manifest(deployment: &str, target: serde_json::Value, image: &str) -> FleetDeployment {
    FleetDeployment::from_value(json!({
        "apiVersion": "podfleet.io/v1alpha1",
        "kind": "FleetDeployment",
        "metadata": {"name": deployment},
        "spec": {"target": target, "score": {
            "services": [{"name": "app", "image": image}],
            "init_containers": [{"name": "migrate", "image": "localhost/migrate:1"}],
        }},
    }))
    .unwrap()
}

pub struct Fleet {
    pub controller: Controller,
    revision: u64,
    pub desired: BTreeMap<DeploymentKey, u64>,
    pub manifests: BTreeMap<DeploymentName, (u64, FleetDeployment)>,
}

impl Fleet {
    pub fn new() -> Self {
        let mut fleet = Self {
            controller: Controller::new(Config::default(), NOW),
            revision: 0,
            desired: BTreeMap::new(),
            manifests: BTreeMap::new(),
        };
        fleet.feed(Input::Synced);
        fleet
    }

    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    pub fn feed(&mut self, input: Input) {
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            self.controller.handle(NOW, input);
            while let Some(output) = self.controller.poll_output() {
                match output {
                    Output::PutDesired { key, payload } => {
                        let revision = self.next_revision();
                        self.desired.insert(key.clone(), revision);
                        inputs.push_back(Input::Desired(Change::Put {
                            key,
                            revision: Revision::new(revision),
                            value: payload.to_vec(),
                        }));
                    }
                    Output::DeleteDesired { key } => {
                        let revision = self.next_revision();
                        self.desired.remove(&key);
                        inputs.push_back(Input::Desired(Change::Delete {
                            key,
                            revision: Revision::new(revision),
                        }));
                    }
                    _ => {}
                }
            }
        }
    }

    pub fn apply(&mut self, manifest: FleetDeployment) {
        let generation = self.next_revision();
        let name = manifest.metadata.name.clone();
        self.manifests
            .insert(name.clone(), (generation, manifest.clone()));
        self.feed(Input::DeploymentPut {
            name,
            generation,
            value: manifest.to_json(),
        });
    }

    pub fn label(&mut self, device: &str, labels: &[(&str, &str)]) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        self.feed(Input::DevicePut {
            device: id(device),
            value: json!({ "labels": labels }).to_string().into_bytes(),
        });
    }

    /// A heartbeat written `age_s` seconds before [`NOW`].
    pub fn heartbeat(&mut self, device: &str, version: &str, uptime_s: u64, age_s: u64) {
        self.feed(Input::Heartbeat {
            device: id(device),
            value: Some(
                json!({"device_id": device, "agent_version": version, "uptime_s": uptime_s,
                       "deployments": 1})
                .to_string()
                .into_bytes(),
            ),
            age: Duration::from_secs(age_s),
        });
    }

    /// The device reports `state` (phase, cause...) on its current desired
    /// revision of `deployment`, or on `revision` when given.
    pub fn report(
        &mut self,
        device: &str,
        deployment: &str,
        mut state: serde_json::Value,
        revision: Option<u64>,
    ) {
        let key = DeploymentKey {
            device: id(device),
            deployment: name(deployment),
        };
        let revision = revision.unwrap_or_else(|| self.desired[&key]);
        state["revision"] = revision.into();
        self.feed(Input::State(Change::Put {
            key,
            revision: Revision::new(self.revision + 1),
            value: state.to_string().into_bytes(),
        }));
    }

    /// Three devices in two sites, `web` on site lyon: rpi-01 running,
    /// rpi-02 failed in its init container, rpi-03 offline and pending;
    /// `db` on explicit devices, one of them (ghost) never seen.
    pub fn sample() -> Self {
        let mut fleet = Fleet::new();
        fleet.label("rpi-01", &[("site", "lyon"), ("tier", "edge")]);
        fleet.label("rpi-02", &[("site", "lyon")]);
        fleet.label("rpi-03", &[("site", "lyon"), ("canary", "")]);
        fleet.label("nuc-01", &[("site", "paris")]);
        fleet.heartbeat("rpi-01", "0.1.0", 3 * 3600 + 5, 12);
        fleet.heartbeat("rpi-02", "0.1.0", 340, 4);
        fleet.heartbeat("rpi-03", "0.0.9", 90_000, 2 * 3600);
        fleet.heartbeat("nuc-01", "0.1.0", 59, 30);
        fleet.apply(manifest(
            "web",
            json!({"selector": "site=lyon"}),
            "localhost/web:2",
        ));
        fleet.apply(manifest(
            "db",
            json!({"devices": ["nuc-01", "ghost"]}),
            "localhost/postgres:16",
        ));
        fleet.report(
            "rpi-01",
            "web",
            json!({"phase": "running", "container_ids": {"app": "3f2a9c1d"},
                   "message": "1 init container completed, 1 service running",
                   "restarts": {"app": {"count": 2, "last_exit_code": 137}}}),
            None,
        );
        fleet.report(
            "rpi-02",
            "web",
            json!({"phase": "failed", "attempt": 1,
                   "cause": {"kind": "init_container_exited", "name": "migrate", "exit_code": 5}}),
            None,
        );
        fleet.report("rpi-03", "web", json!({"phase": "running"}), Some(1));
        fleet.report(
            "nuc-01",
            "db",
            json!({"phase": "pending", "message": "pulling"}),
            None,
        );
        fleet
    }
}
