//! `podfleet apply -f FILE [--dry-run]`: reading manifests, what each
//! apply did, and what a dry run would do.
//!
//! A file is JSON when it starts with `{`, YAML otherwise; YAML may hold
//! several documents (`---`). Every document is checked before anything is
//! written: one bad document and nothing is applied.

use std::collections::BTreeMap;

use podfleet_core::fleet::controller::{Input, Output};
use podfleet_core::fleet::{Controller, FleetDeployment};
use podfleet_core::wire::DeploymentKey;
use podfleet_core::Timestamp;
use serde::Deserialize;

use crate::cli::Failure;

/// Reads every manifest of `text`, the contents of `file` (a name for
/// messages: `web.yaml`, or `<stdin>`).
///
/// # Errors
/// A [`Failure`] ([`Exit::Failed`](crate::cli::Exit::Failed)) reading
/// `FILE: <path>: <problem>`, with the document's number (from 1) when the
/// file holds several: `FILE (document 2): spec.target: ...`.
pub fn parse_manifests(file: &str, text: &str) -> Result<Vec<FleetDeployment>, Failure> {
    let values = documents(text).map_err(|e| Failure::failed(format!("{file}: {e}")))?;
    if values.is_empty() {
        return Err(Failure::failed(format!("{file}: no manifest in the file")));
    }
    let several = values.len() > 1;
    let mut manifests: Vec<FleetDeployment> = Vec::with_capacity(values.len());
    for (i, value) in values.into_iter().enumerate() {
        let place = if several {
            format!("{file} (document {})", i + 1)
        } else {
            file.to_owned()
        };
        let manifest = FleetDeployment::from_value(value)
            .map_err(|e| Failure::failed(format!("{place}: {e}")))?;
        if manifests
            .iter()
            .any(|m| m.metadata.name == manifest.metadata.name)
        {
            return Err(Failure::failed(format!(
                "{place}: metadata.name: {:?} is applied twice in this file: each deployment once",
                manifest.metadata.name.as_str()
            )));
        }
        manifests.push(manifest);
    }
    Ok(manifests)
}

/// The documents of a file, as JSON values; empty YAML documents skipped.
fn documents(text: &str) -> Result<Vec<serde_json::Value>, String> {
    if text.trim_start().starts_with('{') {
        return serde_json::from_str(text)
            .map(|v| vec![v])
            .map_err(|e| format!("not valid JSON: {e}"));
    }
    let mut values = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        let value =
            serde_json::Value::deserialize(document).map_err(|e| format!("not valid YAML: {e}"))?;
        if !value.is_null() {
            values.push(value);
        }
    }
    Ok(values)
}

/// What `apply` did to one deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It did not exist.
    Created,
    /// It existed with another manifest.
    Configured,
    /// It existed with this very manifest: nothing was written.
    Unchanged,
}

impl Outcome {
    /// Compares the stored manifest with the one applied.
    pub fn of(stored: Option<&FleetDeployment>, applied: &FleetDeployment) -> Self {
        match stored {
            None => Outcome::Created,
            Some(stored) if stored == applied => Outcome::Unchanged,
            Some(_) => Outcome::Configured,
        }
    }

    /// Whether the manifest has to be written.
    pub fn writes(self) -> bool {
        self != Outcome::Unchanged
    }

    /// The line `apply` prints: `fleetdeployment/web created`.
    pub fn line(self, manifest: &FleetDeployment) -> String {
        let word = match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
        };
        format!("fleetdeployment/{} {word}\n", manifest.metadata.name)
    }
}

/// What applying `manifest` would do, on a clone of a snapshot's
/// controller taken at `now`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DryRun {
    /// Devices whose desired key would be written.
    pub put: Vec<DeploymentKey>,
    /// Devices whose desired key would be deleted.
    pub delete: Vec<DeploymentKey>,
    /// Targeted devices that already hold this score.
    pub holding: Vec<DeploymentKey>,
    /// Targeted devices that are offline (`true`: never seen at all).
    pub offline: BTreeMap<DeploymentKey, bool>,
}

impl DryRun {
    /// Feeds `manifest` to a clone of `snapshot` as the next generation and
    /// collects the writes it asks for.
    pub fn plan(snapshot: &Controller, now: Timestamp, manifest: &FleetDeployment) -> Self {
        let mut controller = snapshot.clone();
        // Whatever the snapshot itself still wanted to write is not ours.
        while controller.poll_output().is_some() {}
        let name = &manifest.metadata.name;
        let generation = controller.deployment(name).map_or(1, |(g, _)| g + 1);
        controller.handle(
            now,
            Input::DeploymentPut {
                name: name.clone(),
                generation,
                value: manifest.to_json(),
            },
        );
        let mut plan = DryRun::default();
        while let Some(output) = controller.poll_output() {
            match output {
                Output::PutDesired { key, .. } => plan.put.push(key),
                Output::DeleteDesired { key } => plan.delete.push(key),
                _ => {}
            }
        }
        for row in controller.rollout(name) {
            let key = DeploymentKey {
                device: row.device.clone(),
                deployment: name.clone(),
            };
            if !row.online {
                plan.offline.insert(key.clone(), row.seen_at.is_none());
            }
            if row.revision.is_some() {
                plan.holding.push(key);
            }
        }
        plan.put.sort();
        plan.delete.sort();
        plan
    }

    /// The dry run's report: one line per device, then a summary.
    pub fn render(&self, manifest: &FleetDeployment, outcome: Outcome) -> String {
        let name = &manifest.metadata.name;
        let verb = match outcome {
            Outcome::Created => "would be created",
            Outcome::Configured => "would be configured",
            Outcome::Unchanged => "is unchanged",
        };
        let mut out = format!("fleetdeployment/{name} {verb} (dry run)\n");
        let offline = |key: &DeploymentKey| match self.offline.get(key) {
            Some(true) => "never seen: its agent applies it when it first connects",
            Some(false) => "offline: its agent applies it when it is back",
            None => "",
        };
        for key in &self.put {
            match offline(key) {
                "" => out.push_str(&format!("  put     {}\n", key.device)),
                note => out.push_str(&format!("  put     {}  ({note})\n", key.device)),
            }
        }
        for key in &self.delete {
            out.push_str(&format!("  delete  {}\n", key.device));
        }
        for key in &self.holding {
            let note = if self.offline.contains_key(key) {
                "already holds it; offline"
            } else {
                "already holds it"
            };
            out.push_str(&format!("  keep    {}  ({note})\n", key.device));
        }
        out.push_str(&format!(
            "{} to put, {} to delete, {} already up to date\n",
            devices(self.put.len()),
            devices(self.delete.len()),
            devices(self.holding.len()),
        ));
        out
    }
}

fn devices(n: usize) -> String {
    match n {
        1 => "1 device".to_owned(),
        n => format!("{n} devices"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;
    use crate::cli::fixtures::{manifest, Fleet, NOW};
    use crate::cli::Exit;

    const WEB: &str = "\
apiVersion: podfleet.io/v1alpha1
kind: FleetDeployment
metadata:
  name: web
spec:
  target:
    selector: site=lyon
  score:
    services:
      - name: app
        image: localhost/web:2
";

    #[test]
    fn yaml_json_and_several_documents_parse() {
        let one = parse_manifests("web.yaml", WEB).unwrap();
        assert_eq!(one[0].metadata.name.as_str(), "web");
        let json = serde_json::to_string(&one[0]).unwrap();
        assert_eq!(parse_manifests("web.json", &json).unwrap(), one);
        let two = format!(
            "---\n{WEB}---\n{}\n---\n",
            WEB.replace("name: web", "name: api")
        );
        let both = parse_manifests("all.yaml", &two).unwrap();
        let names: Vec<&str> = both.iter().map(|m| m.metadata.name.as_str()).collect();
        assert_eq!(names, ["web", "api"]);
    }

    #[test]
    fn a_bad_document_names_the_file_the_document_and_the_field() {
        let bad = WEB.replace("image: localhost/web:2", "image: \" \"");
        let error = parse_manifests("web.yaml", &bad).unwrap_err();
        assert_eq!(error.exit, Exit::Failed);
        let two = format!("{WEB}---\n{}", bad.replace("name: web", "name: api"));
        let several = parse_manifests("all.yaml", &two).unwrap_err();
        let twice = parse_manifests("all.yaml", &format!("{WEB}---\n{WEB}")).unwrap_err();
        let syntax = parse_manifests("web.yaml", "metadata: [").unwrap_err();
        let json = parse_manifests("web.json", "{\"kind\": }").unwrap_err();
        let empty = parse_manifests("<stdin>", "# nothing\n").unwrap_err();
        let wrong_kind =
            parse_manifests("web.yaml", &WEB.replace("FleetDeployment", "Deployment")).unwrap_err();
        insta::assert_snapshot!([error, several, twice, syntax, json, empty, wrong_kind]
            .map(|e| e.message)
            .join("\n"));
    }

    #[test]
    fn outcomes_compare_the_stored_manifest() {
        let web = manifest("web", json!({"selector": "site=lyon"}), "localhost/web:2");
        let web3 = manifest("web", json!({"selector": "site=lyon"}), "localhost/web:3");
        assert_eq!(Outcome::of(None, &web), Outcome::Created);
        assert_eq!(Outcome::of(Some(&web), &web), Outcome::Unchanged);
        assert_eq!(Outcome::of(Some(&web), &web3), Outcome::Configured);
        assert!(!Outcome::Unchanged.writes());
        assert_eq!(
            Outcome::Configured.line(&web3),
            "fleetdeployment/web configured\n"
        );
    }

    #[test]
    fn dry_run() {
        let fleet = Fleet::sample();
        let stored = &fleet.manifests[&crate::cli::fixtures::name("web")].1;
        // A new image for every device not marked canary, in lyon or paris.
        let web3 = manifest(
            "web",
            json!({"selector": "site in (lyon,paris),!canary"}),
            "localhost/web:3",
        );
        let plan = DryRun::plan(&fleet.controller, NOW, &web3);
        let changed = plan.render(&web3, Outcome::of(Some(stored), &web3));
        // The same manifest again: every device already holds it.
        let plan = DryRun::plan(&fleet.controller, NOW, stored);
        let same = plan.render(stored, Outcome::of(Some(stored), stored));
        // A new deployment on a device never seen.
        let new = manifest(
            "probe",
            json!({"devices": ["rpi-01", "ghost"]}),
            "localhost/probe:1",
        );
        let plan = DryRun::plan(&fleet.controller, NOW, &new);
        let created = plan.render(&new, Outcome::of(None, &new));
        insta::assert_snapshot!(format!("{changed}\n{same}\n{created}"));
        // The snapshot itself is untouched.
        assert_eq!(
            fleet.controller.status(&new.metadata.name),
            Default::default()
        );
    }
}
