//! `podfleet get devices|deployments`: tables, `List` objects, names, and
//! the rows `-w` prints as they change.
//!
//! Everything here reads a snapshot's [`Controller`] at the snapshot's
//! `now`; nothing reads a clock.
//!
//! `-l` selects devices by their labels. Fleet deployments have no labels,
//! so `get deployments -l` is refused rather than guessed at.

use std::collections::BTreeMap;

use podfleet_core::fleet::controller::DeviceView;
use podfleet_core::fleet::{Controller, FleetDeployment, Selector, API_VERSION};
use podfleet_core::wire::{DeploymentName, RuntimeHealth};
use podfleet_core::Timestamp;
use serde_json::{json, Value};

use crate::cli::args::{Kind, OutputFormat};
use crate::cli::table::{self, Table};
use crate::cli::Failure;

/// Stored manifests and their generations, by name, as the shell read them.
pub type Manifests = BTreeMap<DeploymentName, (u64, FleetDeployment)>;

/// Checks `get`'s flags against each other and parses `-l`.
///
/// # Errors
/// A usage [`Failure`] for `-l` on deployments or a malformed selector.
pub fn selector(kind: Kind, selector: Option<&str>) -> Result<Option<Selector>, Failure> {
    match (kind, selector) {
        (_, None) => Ok(None),
        (Kind::Deployments, Some(_)) => Err(Failure::usage(
            "fleet deployments have no labels, so -l does not apply to them; \
             `podfleet get devices -l SELECTOR` lists the devices a selector picks",
        )),
        (Kind::Devices, Some(text)) => Selector::parse(text)
            .map(Some)
            .map_err(|e| Failure::usage(format!("-l {text:?}: {e}"))),
    }
}

fn heartbeat_age(device: &DeviceView<'_>, now: Timestamp) -> Option<std::time::Duration> {
    device.seen_at.map(|seen| now.saturating_since(seen))
}

fn status_word(device: &DeviceView<'_>) -> &'static str {
    match (device.heartbeat, device.online) {
        (None, _) => "Unknown",
        (Some(_), true) => "Online",
        (Some(_), false) => "Offline",
    }
}

fn selected<'a>(
    controller: &'a Controller,
    selector: Option<&'a Selector>,
) -> impl Iterator<Item = DeviceView<'a>> + 'a {
    controller
        .devices()
        .filter(move |d| selector.is_none_or(|s| s.matches(d.labels)))
}

/// The devices table: NAME, STATUS, HEARTBEAT (its age), AGENT,
/// DEPLOYMENTS; `wide` adds RUNTIME, UPTIME and LABELS.
pub fn devices_table(
    controller: &Controller,
    now: Timestamp,
    selector: Option<&Selector>,
    wide: bool,
) -> Table {
    let mut headers = vec!["NAME", "STATUS", "HEARTBEAT", "AGENT", "DEPLOYMENTS"];
    if wide {
        headers.extend(["RUNTIME", "UPTIME", "LABELS"]);
    }
    let mut table = Table::new(headers);
    for device in selected(controller, selector) {
        let mut row = vec![
            device.id.to_string(),
            status_word(&device).to_owned(),
            heartbeat_age(&device, now).map_or_else(|| "<unknown>".to_owned(), table::age),
            device
                .heartbeat
                .map_or_else(|| "<unknown>".to_owned(), |h| h.agent_version.clone()),
            device.deployments.len().to_string(),
        ];
        if wide {
            row.push(
                device
                    .heartbeat
                    .map_or_else(|| "<unknown>".to_owned(), |h| runtime_health(&h.runtime)),
            );
            row.push(device.heartbeat.map_or_else(
                || "<unknown>".to_owned(),
                |h| table::age(std::time::Duration::from_secs(h.uptime_s)),
            ));
            row.push(table::labels(device.labels));
        }
        table.row(row);
    }
    table
}

/// The columns of [`devices_table`] that change on every heartbeat, which
/// `-w` does not count as a change.
pub const DEVICE_VOLATILE_COLUMNS: &[usize] = &[2, 6];

/// A runtime's health in a word or a few.
pub fn runtime_health(health: &RuntimeHealth) -> String {
    match health {
        RuntimeHealth::Ok => "ok".to_owned(),
        RuntimeHealth::Unreachable { error } => format!("unreachable: {error}"),
    }
}

/// Every fleet deployment's name: those the snapshot holds and those read
/// from the deployments bucket.
fn deployment_names<'a>(
    controller: &'a Controller,
    manifests: &'a Manifests,
) -> std::collections::BTreeSet<&'a DeploymentName> {
    controller
        .deployment_names()
        .chain(manifests.keys())
        .collect()
}

/// A manifest's strategy's name (`AllAtOnce`).
pub fn strategy_name(manifest: &FleetDeployment) -> String {
    serde_json::to_value(manifest.spec.strategy)
        .ok()
        .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "<unknown>".to_owned())
}

/// The deployments table: NAME, TARGET, READY (running/targeted),
/// UP-TO-DATE, FAILED, OFFLINE, GENERATION (observed/current); `wide` adds
/// STRATEGY and MESSAGE (the manifest's refusal, an all-or-nothing
/// deployment's refusal, or the largest failure group).
pub fn deployments_table(controller: &Controller, manifests: &Manifests, wide: bool) -> Table {
    let mut headers = vec![
        "NAME",
        "TARGET",
        "READY",
        "UP-TO-DATE",
        "FAILED",
        "OFFLINE",
        "GENERATION",
    ];
    if wide {
        headers.extend(["STRATEGY", "MESSAGE"]);
    }
    let mut table = Table::new(headers);
    for name in deployment_names(controller, manifests) {
        let status = controller.status(name);
        let manifest = manifests.get(name);
        let generation = controller
            .deployment(name)
            .map(|(g, _)| g)
            .or(manifest.map(|(g, _)| *g))
            .unwrap_or_default();
        let mut row = vec![
            name.to_string(),
            manifest.map_or_else(
                || "<unknown>".to_owned(),
                |(_, m)| m.spec.target.to_string(),
            ),
            format!("{}/{}", status.phases.running, status.targeted),
            status.updated.to_string(),
            status.phases.failed.to_string(),
            status.offline.to_string(),
            format!("{}/{}", status.observed_generation, generation),
        ];
        if wide {
            row.push(manifest.map_or_else(|| "<unknown>".to_owned(), |(_, m)| strategy_name(m)));
            let message = match (&status.error, &status.placement, status.failures.first()) {
                (Some(error), _, _) => error.clone(),
                (None, Some(refusal), _) => {
                    format!(
                        "refused ({}): {}",
                        refusal.reason.as_str(),
                        refusal.message()
                    )
                }
                (None, None, Some(group)) => {
                    format!("{} device(s): {}", group.count, group.message)
                }
                (None, None, None) => String::new(),
            };
            row.push(message);
        }
        table.row(row);
    }
    table
}

/// The devices as a `List` object: each item a `Device` with its labels,
/// last heartbeat (and its age in seconds at `now`), online flag and the
/// deployments whose desired key it holds; in id order.
pub fn devices_list(controller: &Controller, now: Timestamp, selector: Option<&Selector>) -> Value {
    let items: Vec<Value> = selected(controller, selector)
        .map(|device| {
            json!({
                "apiVersion": API_VERSION,
                "kind": "Device",
                "metadata": {"name": device.id, "labels": device.labels},
                "status": {
                    "phase": status_word(&device),
                    "online": device.online,
                    "heartbeat": device.heartbeat,
                    "heartbeatAgeSeconds": heartbeat_age(&device, now).map(|a| a.as_secs()),
                    "deployments": device.deployments,
                },
            })
        })
        .collect();
    list(items)
}

/// The fleet deployments as a `List` object: each item the stored manifest
/// with `metadata.generation` and the `status` computed from the snapshot;
/// in name order.
pub fn deployments_list(controller: &Controller, manifests: &Manifests) -> Value {
    let items: Vec<Value> = deployment_names(controller, manifests)
        .into_iter()
        .map(|name| {
            let mut item = match manifests.get(name) {
                Some((generation, manifest)) => {
                    let mut item = serde_json::to_value(manifest).unwrap_or(Value::Null);
                    item["metadata"]["generation"] = (*generation).into();
                    item
                }
                None => json!({
                    "apiVersion": API_VERSION,
                    "kind": "FleetDeployment",
                    "metadata": {
                        "name": name,
                        "generation": controller.deployment(name).map(|(g, _)| g),
                    },
                }),
            };
            item["status"] = serde_json::to_value(controller.status(name)).unwrap_or(Value::Null);
            item
        })
        .collect();
    list(items)
}

fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// `kind/name` lines for `-o name`.
pub fn names(list: &Value) -> String {
    let mut out = String::new();
    for item in list["items"].as_array().into_iter().flatten() {
        let kind = item["kind"].as_str().unwrap_or_default().to_lowercase();
        let name = item["metadata"]["name"].as_str().unwrap_or_default();
        out.push_str(&format!("{kind}/{name}\n"));
    }
    out
}

/// A `List` object in `format` (json, yaml or name).
///
/// # Errors
/// When the YAML emitter refuses the value (it does not for JSON values).
pub fn render_list(list: &Value, format: OutputFormat) -> Result<String, Failure> {
    match format {
        OutputFormat::Json => serde_json::to_string_pretty(list)
            .map(|s| s + "\n")
            .map_err(|e| Failure::failed(e.to_string())),
        OutputFormat::Yaml => {
            serde_norway::to_string(list).map_err(|e| Failure::failed(e.to_string()))
        }
        OutputFormat::Name => Ok(names(list)),
        OutputFormat::Wide => Err(Failure::usage("-o wide is a table, not a list")),
    }
}

/// What `get -w` has printed: the first table, then only rows that changed.
#[derive(Debug, Clone, Default)]
pub struct Watch {
    widths: Option<Vec<usize>>,
    seen: BTreeMap<String, Vec<String>>,
    volatile: Vec<usize>,
}

impl Watch {
    /// A watch that ignores changes in the `volatile` columns (ages).
    pub fn new(volatile: &[usize]) -> Self {
        Self {
            volatile: volatile.to_vec(),
            ..Self::default()
        }
    }

    /// What to print for the latest `table`: all of it the first time,
    /// then each new or changed row (by its first cell), laid out like
    /// the first table.
    pub fn next(&mut self, table: &Table, width: usize) -> String {
        let stable = |row: &[String]| -> Vec<String> {
            row.iter()
                .enumerate()
                .filter(|(i, _)| !self.volatile.contains(i))
                .map(|(_, c)| c.clone())
                .collect()
        };
        let first = self.widths.is_none();
        let widths = self
            .widths
            .get_or_insert_with(|| table.widths(width))
            .clone();
        let mut out = if first {
            table.render(width)
        } else {
            String::new()
        };
        for row in table.rows() {
            let Some(key) = row.first() else { continue };
            let cells = stable(row);
            if self.seen.get(key) != Some(&cells) {
                if !first {
                    out.push_str(&Table::render_row(row, &widths));
                }
                self.seen.insert(key.clone(), cells);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;
    use crate::cli::fixtures::{self, Fleet, NOW};

    #[test]
    fn devices_table() {
        let fleet = Fleet::sample();
        let table = super::devices_table(&fleet.controller, NOW, None, false);
        insta::assert_snapshot!(table.render(120));
    }

    #[test]
    fn devices_table_wide() {
        let fleet = Fleet::sample();
        let table = super::devices_table(&fleet.controller, NOW, None, true);
        insta::assert_snapshot!(table.render(120));
    }

    #[test]
    fn a_narrow_terminal_cuts_the_labels() {
        let fleet = Fleet::sample();
        let text = super::devices_table(&fleet.controller, NOW, None, true).render(72);
        assert!(text.lines().all(|l| l.chars().count() <= 72), "{text}");
        assert!(text.contains('…'), "{text}");
    }

    #[test]
    fn a_selector_picks_devices_by_label() {
        let fleet = Fleet::sample();
        let selector = selector(Kind::Devices, Some("site=lyon,!canary")).unwrap();
        let table = super::devices_table(&fleet.controller, NOW, selector.as_ref(), false);
        let names: Vec<&str> = table.rows().iter().map(|r| r[0].as_str()).collect();
        assert_eq!(names, ["rpi-01", "rpi-02"]);
    }

    #[test]
    fn a_selector_on_deployments_or_a_bad_one_is_a_usage_error() {
        let error = selector(Kind::Deployments, Some("site=lyon")).unwrap_err();
        assert_eq!(error.exit, crate::cli::Exit::Usage);
        assert!(error.message.contains("no labels"), "{error}");
        let error = selector(Kind::Devices, Some("site in (")).unwrap_err();
        assert_eq!(error.exit, crate::cli::Exit::Usage);
        assert!(error.message.starts_with("-l \"site in (\": "), "{error}");
    }

    #[test]
    fn deployments_table() {
        let fleet = Fleet::sample();
        let table = super::deployments_table(&fleet.controller, &fleet.manifests, false);
        insta::assert_snapshot!(table.render(120));
    }

    #[test]
    fn deployments_table_wide() {
        let fleet = Fleet::sample();
        let table = super::deployments_table(&fleet.controller, &fleet.manifests, true);
        insta::assert_snapshot!(table.render(120));
    }

    #[test]
    fn lists_are_sorted_and_name_their_kinds() {
        let fleet = Fleet::sample();
        let devices = devices_list(&fleet.controller, NOW, None);
        assert_eq!(
            names(&devices),
            "device/nuc-01\ndevice/rpi-01\ndevice/rpi-02\ndevice/rpi-03\n"
        );
        assert_eq!(devices["items"][1]["status"]["heartbeatAgeSeconds"], 12);
        assert_eq!(devices["items"][1]["metadata"]["labels"]["tier"], "edge");
        let deployments = deployments_list(&fleet.controller, &fleet.manifests);
        assert_eq!(
            names(&deployments),
            "fleetdeployment/db\nfleetdeployment/web\n"
        );
        let web = &deployments["items"][1];
        assert_eq!(web["spec"]["target"], json!({"selector": "site=lyon"}));
        assert_eq!(
            web["status"]["phases"],
            json!({"pending": 1, "running": 1, "failed": 1})
        );
        assert_eq!(
            web["metadata"]["generation"],
            fleet.manifests[&fixtures::name("web")].0
        );
        insta::assert_snapshot!(render_list(&devices, OutputFormat::Yaml).unwrap());
        let back: Value =
            serde_norway::from_str(&render_list(&deployments, OutputFormat::Yaml).unwrap())
                .unwrap();
        assert_eq!(back, deployments);
    }

    #[test]
    fn watch_prints_the_table_then_only_changed_rows() {
        let mut fleet = Fleet::sample();
        let mut watch = Watch::new(DEVICE_VOLATILE_COLUMNS);
        let first = watch.next(
            &super::devices_table(&fleet.controller, NOW, None, false),
            120,
        );
        assert_eq!(first.lines().count(), 5);
        // A fresh heartbeat changes only the age: nothing to print.
        fleet.heartbeat("rpi-01", "0.1.0", 3 * 3600 + 5, 1);
        let table = super::devices_table(&fleet.controller, NOW, None, false);
        assert_eq!(watch.next(&table, 120), "");
        // An upgrade prints the row, aligned with the first table.
        fleet.heartbeat("rpi-02", "0.2.0", 1, 1);
        let table = super::devices_table(&fleet.controller, NOW, None, false);
        let line = watch.next(&table, 120);
        assert_eq!(line, "rpi-02  Online   1s         0.2.0  1\n");
        assert!(
            first.contains("rpi-02  Online   4s         0.1.0  1\n"),
            "{first}"
        );
    }
}
