//! `podfleet apply -f FILE [--dry-run]`: reading manifests, which images
//! are pinned to digests, what each apply did, and what a dry run would do.
//!
//! A file is JSON when it starts with `{`, YAML otherwise; YAML may hold
//! several documents (`---`). Every document is checked before anything is
//! written: one bad document and nothing is applied.
//!
//! Image tags are resolved to digests at apply time ([`images_to_pin`],
//! then [`pin_images`] with the digests the shell got from the registries,
//! `crate::registry`): the written manifest names `image:tag@sha256:...`,
//! so a tag pushed again reaches no device until someone applies again. An
//! image that cannot be resolved fails its manifest alone
//! ([`unresolved`]); the file's other manifests still apply.

use std::collections::BTreeMap;
use std::fmt;

use podfleet_core::fleet::controller::{Input, Output};
use podfleet_core::fleet::{Controller, FleetDeployment, PlacementRefusal};
use podfleet_core::image::{self, ImageReference};
use podfleet_core::wire::{DeploymentKey, PullPolicy};
use podfleet_core::Timestamp;
use serde::Deserialize;

use crate::cli::Failure;
use crate::registry::ResolveError;

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

/// A container of a score, as messages name it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Container {
    /// `service "web"`.
    Service(String),
    /// `init container "migrate"`.
    Init(String),
}

impl fmt::Display for Container {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Container::Service(name) => write!(f, "service {name:?}"),
            Container::Init(name) => write!(f, "init container {name:?}"),
        }
    }
}

/// An image of a manifest that `apply` resolves to a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageToPin {
    /// The container that names it.
    pub container: Container,
    /// The image, as written.
    pub image: String,
}

/// An image `apply` pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedImage {
    /// The container that names it.
    pub container: Container,
    /// What the file says: `registry.example/web:1`.
    pub written: String,
    /// What is written instead: `registry.example/web:1@sha256:...`.
    pub pinned: String,
}

/// The images of `manifest` that `apply` resolves to digests, init
/// containers first, in the score's order. Left as written are images
/// that
/// - already pin a digest (`...@sha256:...`);
/// - are local-only (`localhost/...`, built or loaded on the device; no
///   registry has them);
/// - belong to a container whose pull policy is `never`: the device never
///   asks a registry for them, and an image loaded into its store may not
///   know its registry digest.
///
/// A text that is not an image reference is listed: resolving it fails
/// with the reason.
pub fn images_to_pin(manifest: &FleetDeployment) -> Vec<ImageToPin> {
    let score = &manifest.spec.score;
    let inits = score.init_containers.iter().map(|init| {
        (
            Container::Init(init.name.to_string()),
            &init.image,
            init.pull_policy(),
        )
    });
    let services = score.services.iter().map(|service| {
        (
            Container::Service(service.name.to_string()),
            &service.image,
            service.pull_policy(),
        )
    });
    inits
        .chain(services)
        .filter(|(_, image, policy)| {
            let resolvable = ImageReference::parse(image)
                .map_or(true, |r| r.digest().is_none() && !r.is_local_only());
            resolvable && *policy != PullPolicy::Never
        })
        .map(|(container, image, _)| ImageToPin {
            container,
            image: image.clone(),
        })
        .collect()
}

/// `manifest` with every image of [`images_to_pin`] pinned to its digest
/// in `digests` (by image as written), keeping its name and tag
/// ([`image::pin`]); and what was pinned.
///
/// # Errors
///
/// A [`Failure`] naming the manifest and the container when an image to
/// pin has no digest in `digests`, or cannot be pinned to it.
pub fn pin_images(
    manifest: &FleetDeployment,
    digests: &BTreeMap<String, String>,
) -> Result<(FleetDeployment, Vec<PinnedImage>), Failure> {
    let mut pinned_manifest = manifest.clone();
    let mut pinned = Vec::new();
    for ImageToPin { container, image } in images_to_pin(manifest) {
        let failure = |why: String| {
            Failure::failed(format!(
                "fleetdeployment/{}: {container}: {why}; nothing of fleetdeployment/{} was written",
                manifest.metadata.name, manifest.metadata.name
            ))
        };
        let digest = digests
            .get(&image)
            .ok_or_else(|| failure(format!("image {image:?} was not resolved")))?;
        let reference = image::pin(&image, digest).map_err(|e| failure(e.to_string()))?;
        let score = &mut pinned_manifest.spec.score;
        let slot = match &container {
            Container::Service(name) => score
                .services
                .iter_mut()
                .find(|s| s.name.as_str() == name)
                .map(|s| &mut s.image),
            Container::Init(name) => score
                .init_containers
                .iter_mut()
                .find(|i| i.name.as_str() == name)
                .map(|i| &mut i.image),
        };
        if let Some(slot) = slot {
            *slot = reference.clone();
        }
        pinned.push(PinnedImage {
            container,
            written: image,
            pinned: reference,
        });
    }
    Ok((pinned_manifest, pinned))
}

/// The error `apply` prints when `container`'s image of `manifest` could
/// not be resolved.
pub fn unresolved(
    manifest: &FleetDeployment,
    container: &Container,
    error: &ResolveError,
) -> Failure {
    let name = &manifest.metadata.name;
    Failure::failed(format!(
        "fleetdeployment/{name}: {container}: {error}; nothing of fleetdeployment/{name} was written"
    ))
}

/// `manifest` as `apply` stores it over `stored`: what the rollout verbs
/// wrote and the file does not say is kept. A score without `restart`
/// keeps the stored restart count (so applying the same file after
/// `podfleet rollout restart` restarts nothing again), and a spec without
/// `force` keeps the stored token while it still names this very spec
/// (a changed spec is never forced by an old token).
pub fn keep_rollout_verbs(
    stored: Option<&FleetDeployment>,
    mut manifest: FleetDeployment,
) -> FleetDeployment {
    let Some(stored) = stored else {
        return manifest;
    };
    if manifest.spec.score.restart.is_none() {
        manifest.spec.score.restart = stored.spec.score.restart;
    }
    if manifest.spec.force.is_none() {
        manifest.spec.force.clone_from(&stored.spec.force);
        if !manifest.spec.is_forced() {
            manifest.spec.force = None;
        }
    }
    manifest
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
    /// The images pinned to digests, as they would be written.
    pub pinned: Vec<PinnedImage>,
    /// Why an all-or-nothing deployment would be written to no device.
    pub refused: Option<PlacementRefusal>,
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
        plan.refused = controller.status(name).placement;
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
        for image in &self.pinned {
            out.push_str(&format!(
                "  image   {}: {}\n",
                image.container, image.pinned
            ));
        }
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
        if let Some(refused) = &self.refused {
            out.push_str(&format!(
                "  refused ({}): {}\n",
                refused.reason.as_str(),
                refused.message()
            ));
            out.push_str(&format!(
                "  once applied, `podfleet rollout force {name}` writes it to every targeted device anyway\n"
            ));
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

    use podfleet_core::fleet::Placement;

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

    /// Every kind of image a score may name.
    fn mixed() -> FleetDeployment {
        FleetDeployment::from_value(json!({
            "apiVersion": "podfleet.io/v1alpha1",
            "kind": "FleetDeployment",
            "metadata": {"name": "mixed"},
            "spec": {"target": {"devices": ["rpi-01"]}, "score": {
                "init_containers": [
                    {"name": "migrate", "image": "registry.example/team/migrate:2"},
                    {"name": "local", "image": "localhost/seed:1"},
                ],
                "services": [
                    {"name": "web", "image": "registry.example/team/web:1"},
                    {"name": "hub", "image": "alpine"},
                    {"name": "pinned", "image": format!("ghcr.io/x/y:3@{DIGEST_A}")},
                    {"name": "loaded", "image": "registry.example/team/big:1", "pull_policy": "never"},
                    {"name": "port", "image": "localhost:5000/web:1"},
                    {"name": "again", "image": "registry.example/team/web:1"},
                ],
            }},
        }))
        .unwrap()
    }

    const DIGEST_A: &str =
        "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const DIGEST_B: &str =
        "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn tags_are_pinned_but_digests_local_images_and_never_pulled_ones_are_not() {
        let manifest = mixed();
        let to_pin: Vec<String> = images_to_pin(&manifest)
            .iter()
            .map(|i| format!("{}={}", i.container, i.image))
            .collect();
        assert_eq!(
            to_pin,
            [
                "init container \"migrate\"=registry.example/team/migrate:2",
                "service \"web\"=registry.example/team/web:1",
                "service \"hub\"=alpine",
                "service \"port\"=localhost:5000/web:1",
                "service \"again\"=registry.example/team/web:1",
            ]
        );
        let digests: BTreeMap<String, String> = [
            ("registry.example/team/migrate:2", DIGEST_A),
            ("registry.example/team/web:1", DIGEST_B),
            ("alpine", DIGEST_A),
            ("localhost:5000/web:1", DIGEST_B),
        ]
        .into_iter()
        .map(|(i, d)| (i.to_owned(), d.to_owned()))
        .collect();
        let (pinned, images) = pin_images(&manifest, &digests).unwrap();
        let score = &pinned.spec.score;
        let services: Vec<&str> = score.services.iter().map(|s| s.image.as_str()).collect();
        assert_eq!(
            services,
            [
                format!("registry.example/team/web:1@{DIGEST_B}").as_str(),
                &format!("alpine:latest@{DIGEST_A}"),
                &format!("ghcr.io/x/y:3@{DIGEST_A}"),
                "registry.example/team/big:1",
                &format!("localhost:5000/web:1@{DIGEST_B}"),
                &format!("registry.example/team/web:1@{DIGEST_B}"),
            ]
        );
        assert_eq!(
            score.init_containers[0].image,
            format!("registry.example/team/migrate:2@{DIGEST_A}")
        );
        assert_eq!(score.init_containers[1].image, "localhost/seed:1");
        assert_eq!(images.len(), 5);
        assert_eq!(images[2].written, "alpine");
        // The pinned manifest is one the controller accepts.
        assert_eq!(
            FleetDeployment::from_json(&pinned.to_json()).unwrap(),
            pinned
        );
        // Nothing else changed.
        let mut unpinned = pinned.clone();
        for (service, original) in unpinned
            .spec
            .score
            .services
            .iter_mut()
            .zip(&manifest.spec.score.services)
        {
            service.image.clone_from(&original.image);
        }
        for (init, original) in unpinned
            .spec
            .score
            .init_containers
            .iter_mut()
            .zip(&manifest.spec.score.init_containers)
        {
            init.image.clone_from(&original.image);
        }
        assert_eq!(unpinned, manifest);
    }

    #[test]
    fn apply_keeps_what_the_rollout_verbs_wrote() {
        let file = |image: &str| manifest("web", json!({"devices": ["rpi-01"]}), image);
        assert_eq!(keep_rollout_verbs(None, file("web:1")), file("web:1"));
        // After `rollout restart` and `rollout force`, the same file is
        // what is stored: unchanged.
        let mut stored = file("web:1");
        stored.spec.placement = Placement::AllOrNothing;
        stored.spec.score.restart = Some(2);
        stored.spec = stored.spec.forced();
        let mut applied = file("web:1");
        applied.spec.placement = Placement::AllOrNothing;
        let kept = keep_rollout_verbs(Some(&stored), applied.clone());
        assert_eq!(kept, stored);
        assert_eq!(Outcome::of(Some(&stored), &kept), Outcome::Unchanged);
        // A changed file keeps the restart count, never a stale force.
        let mut changed = applied.clone();
        changed.spec.score.services[0].image = "web:2".into();
        let kept = keep_rollout_verbs(Some(&stored), changed);
        assert_eq!(kept.spec.score.restart, Some(2));
        assert_eq!(kept.spec.force, None);
        // What the file says wins.
        let mut reset = applied;
        reset.spec.score.restart = Some(0);
        let kept = keep_rollout_verbs(Some(&stored), reset);
        assert_eq!(kept.spec.score.restart, Some(0));
    }

    #[test]
    fn the_same_digest_again_is_unchanged_and_a_moved_tag_is_configured() {
        let manifest = mixed();
        let digests = |digest: &str| -> BTreeMap<String, String> {
            images_to_pin(&manifest)
                .into_iter()
                .map(|i| (i.image, digest.to_owned()))
                .collect()
        };
        let (first, _) = pin_images(&manifest, &digests(DIGEST_A)).unwrap();
        let (again, _) = pin_images(&manifest, &digests(DIGEST_A)).unwrap();
        let (moved, _) = pin_images(&manifest, &digests(DIGEST_B)).unwrap();
        assert_eq!(Outcome::of(Some(&first), &again), Outcome::Unchanged);
        assert_eq!(Outcome::of(Some(&first), &moved), Outcome::Configured);
    }

    #[test]
    fn an_unresolved_image_names_the_manifest_the_container_and_the_image() {
        let manifest = mixed();
        let error = ResolveError::NotFound {
            image: "registry.example/team/web:1".into(),
            registry: "registry.example".into(),
            repository: "team/web".into(),
            tag: "1".into(),
        };
        let failure = unresolved(&manifest, &Container::Service("web".into()), &error);
        assert_eq!(failure.exit, Exit::Failed);
        assert_eq!(
            failure.message,
            "fleetdeployment/mixed: service \"web\": image \"registry.example/team/web:1\": \
             not found: the registry registry.example has no manifest \"1\" in \"team/web\"; \
             nothing of fleetdeployment/mixed was written"
        );
        let missing = pin_images(&manifest, &BTreeMap::new()).unwrap_err();
        assert!(missing.message.contains("was not resolved"), "{missing}");
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
        // Pinned images are listed before the devices.
        let mut plan = DryRun::plan(&fleet.controller, NOW, &new);
        plan.pinned = vec![PinnedImage {
            container: Container::Service("app".into()),
            written: "registry.example/probe:1".into(),
            pinned: format!("registry.example/probe:1@{DIGEST_A}"),
        }];
        let pinned = plan.render(&new, Outcome::of(None, &new));
        assert_eq!(
            pinned.lines().take(3).collect::<Vec<_>>(),
            [
                "fleetdeployment/probe would be created (dry run)",
                &format!("  image   service \"app\": registry.example/probe:1@{DIGEST_A}"),
                "  put     ghost  (never seen: its agent applies it when it first connects)",
            ]
        );
        // An all-or-nothing deployment rpi-01 runs and rpi-02 does not: the
        // plan says nothing would be written, and why.
        let sample = Fleet::sample();
        let mut aon = manifest(
            "web",
            json!({"selector": "site=lyon,!canary"}),
            "localhost/web:3",
        );
        aon.spec.placement = podfleet_core::fleet::Placement::AllOrNothing;
        let plan = DryRun::plan(&sample.controller, NOW, &aon);
        assert!(plan.put.is_empty(), "{plan:?}");
        let text = plan.render(&aon, Outcome::Configured);
        assert!(
            text.contains("  refused (partial_placement): of 2 targeted devices, 1 runs it (rpi-01), 1 does not (rpi-02)"),
            "{text}"
        );
        assert!(text.contains("`podfleet rollout force web`"), "{text}");
        aon.spec = aon.spec.forced();
        let plan = DryRun::plan(&sample.controller, NOW, &aon);
        assert_eq!(plan.put.len(), 2, "{plan:?}");
        assert_eq!(plan.refused, None);
        // The snapshot itself is untouched.
        assert_eq!(
            fleet.controller.status(&new.metadata.name),
            Default::default()
        );
    }
}
