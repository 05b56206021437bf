//! Image garbage collection: which images of the device's store to remove.
//!
//! Two rules, applied to images no container uses (of any owner, in any
//! state) and that no deployment keeps (the images of its target, of the
//! spec it last rolled out and of the one before):
//!
//! 1. an image podfleet itself asked for earlier (a deployment's older
//!    revision, a deleted deployment) is removed;
//! 2. while the store's filesystem is at or above the high threshold,
//!    other unused images are removed too, oldest first, until the
//!    estimate falls below the low threshold.
//!
//! The choice is a pure function of a `list images` answer; the reconciler
//! drives the pass (list, then one removal at a time, re-checking what is
//! kept before each) only while no rollout or teardown is under way.

use std::time::Duration;

use crate::image::ImageReference;
use crate::runtime::{DiskUsage, ImageSummary};

/// When and how hard image garbage collection works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageGcPolicy {
    /// Whether the reconciler removes images at all.
    pub enabled: bool,
    /// At or above this share of the store's filesystem in use (percent),
    /// unused images podfleet never asked for are removed too.
    pub high_percent: u8,
    /// Removal under disk pressure stops below this share (percent).
    pub low_percent: u8,
    /// How often a pass runs when nothing else asks for one (a finished
    /// rollout or a deleted deployment asks at once).
    pub interval: Duration,
}

impl Default for ImageGcPolicy {
    /// On; pressure from 85 % down to 70 % (the kubelet's defaults); a pass
    /// at least every 10 minutes.
    fn default() -> Self {
        Self {
            enabled: true,
            high_percent: 85,
            low_percent: 70,
            interval: Duration::from_secs(600),
        }
    }
}

/// Why an image is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// podfleet asked for it once and no deployment keeps it.
    Retired,
    /// The disk is above the high threshold and nobody uses it.
    DiskPressure,
}

/// One image chosen for removal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    /// Its id.
    pub id: String,
    /// Its names, to re-check against what is kept before removing it.
    pub names: Vec<String>,
    /// Why.
    pub reason: Reason,
}

/// Whether any of `references` names the image known by `names`.
pub fn named_by<'a>(references: impl IntoIterator<Item = &'a str>, names: &[String]) -> bool {
    references.into_iter().any(|reference| {
        ImageReference::parse(reference).is_ok_and(|r| r.names_image(names))
            // A reference the grammar refuses can still be a name verbatim.
            || names.iter().any(|n| n == reference)
    })
}

/// The images to remove from `images`, in order: those podfleet asked for
/// (`referenced`) that nobody uses and nothing in `keep` names, then,
/// while `disk` is at or above `policy.high_percent`, other unused images
/// not kept, oldest first, until the estimate is below
/// `policy.low_percent`.
pub fn choose(
    images: &[ImageSummary],
    disk: Option<DiskUsage>,
    keep: &[&str],
    referenced: &[&str],
    policy: &ImageGcPolicy,
) -> Vec<Removal> {
    let removable = |image: &&ImageSummary| {
        image.containers == 0 && !named_by(keep.iter().copied(), &image.names)
    };
    let mut chosen: Vec<Removal> = Vec::new();
    for image in images.iter().filter(removable) {
        if named_by(referenced.iter().copied(), &image.names) {
            chosen.push(Removal {
                id: image.id.clone(),
                names: image.names.clone(),
                reason: Reason::Retired,
            });
        }
    }
    let Some(disk) = disk else {
        return chosen;
    };
    let freed: u64 = images
        .iter()
        .filter(|i| chosen.iter().any(|c| c.id == i.id))
        .map(|i| i.size)
        .sum();
    let mut used = disk.used.saturating_sub(freed);
    let at = |used: u64| DiskUsage { used, ..disk }.percent();
    if at(disk.used) < u64::from(policy.high_percent) {
        return chosen;
    }
    let mut others: Vec<&ImageSummary> = images
        .iter()
        .filter(removable)
        .filter(|i| !chosen.iter().any(|c| c.id == i.id))
        .collect();
    others.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
    for image in others {
        if at(used) < u64::from(policy.low_percent) {
            break;
        }
        used = used.saturating_sub(image.size);
        chosen.push(Removal {
            id: image.id.clone(),
            names: image.names.clone(),
            reason: Reason::DiskPressure,
        });
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str, names: &[&str], size: u64, created: i64, containers: u32) -> ImageSummary {
        ImageSummary {
            id: id.to_owned(),
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            size,
            created,
            containers,
        }
    }

    fn ids(removals: &[Removal]) -> Vec<(&str, Reason)> {
        removals.iter().map(|r| (r.id.as_str(), r.reason)).collect()
    }

    const DIGEST: &str = "sha256:4b825dc642cb6eb9a060e54bf8d69288fbee4904b825dc642cb6eb9a060e54bf";

    #[test]
    fn retired_images_go_and_kept_or_used_ones_stay() {
        let pinned = format!("registry.local:5000/team/app@{DIGEST}");
        let images = [
            image("a1", &["registry.local:5000/team/app:1"], 10, 1, 0),
            image("a2", &["registry.local:5000/team/app:2"], 10, 2, 0),
            image("a3", &[&pinned, "registry.local:5000/team/app:3"], 10, 3, 0),
            image("old-used", &["docker.io/library/redis:7"], 10, 0, 1),
            image("theirs", &["docker.io/library/alpine:3.20"], 10, 0, 0),
        ];
        let keep = ["registry.local:5000/team/app:2", &pinned];
        let referenced = [
            "registry.local:5000/team/app:1",
            "registry.local:5000/team/app:2",
            "redis:7",
            &pinned,
        ];
        let chosen = choose(&images, None, &keep, &referenced, &ImageGcPolicy::default());
        // app:1 is retired; app:2 and the pinned one are kept; redis is in
        // use; alpine was never podfleet's and the disk is not full.
        assert_eq!(ids(&chosen), [("a1", Reason::Retired)]);
    }

    #[test]
    fn disk_pressure_removes_unused_images_oldest_first_down_to_the_low_mark() {
        let images = [
            image("new", &["docker.io/library/alpine:3.21"], 100, 30, 0),
            image("oldest", &["docker.io/library/alpine:3.19"], 100, 10, 0),
            image("older", &["docker.io/library/alpine:3.20"], 100, 20, 0),
            image("used", &["docker.io/library/redis:7"], 400, 0, 2),
            image("kept", &["docker.io/library/nginx:1"], 100, 0, 0),
        ];
        let disk = DiskUsage {
            used: 900,
            total: 1_000,
        };
        let chosen = choose(
            &images,
            Some(disk),
            &["nginx:1"],
            &[],
            &ImageGcPolicy::default(),
        );
        // 90 % -> 80 % -> 70 %: still not below 70, so a third goes.
        assert_eq!(
            ids(&chosen),
            [
                ("oldest", Reason::DiskPressure),
                ("older", Reason::DiskPressure),
                ("new", Reason::DiskPressure)
            ]
        );
        let calm = DiskUsage {
            used: 840,
            total: 1_000,
        };
        assert!(choose(&images, Some(calm), &[], &[], &ImageGcPolicy::default()).is_empty());
    }

    #[test]
    fn retired_images_count_toward_the_low_mark() {
        let images = [
            image("retired", &["docker.io/library/app:1"], 200, 50, 0),
            image("other", &["docker.io/library/alpine:3.19"], 100, 10, 0),
        ];
        let disk = DiskUsage {
            used: 860,
            total: 1_000,
        };
        let chosen = choose(
            &images,
            Some(disk),
            &[],
            &["app:1"],
            &ImageGcPolicy::default(),
        );
        // Removing the retired image brings it to 66 %: nothing else goes.
        assert_eq!(ids(&chosen), [("retired", Reason::Retired)]);
    }

    #[test]
    fn short_names_match_their_qualified_forms() {
        let names = vec!["localhost/podfleet-test:latest".to_owned()];
        assert!(named_by(["podfleet-test"], &names));
        assert!(named_by(["localhost/podfleet-test:latest"], &names));
        assert!(!named_by(["localhost/podfleet-test:2"], &names));
        let by_digest = vec![format!("registry.local/app@{DIGEST}")];
        assert!(named_by(
            [format!("registry.local/app:1@{DIGEST}").as_str()],
            &by_digest
        ));
        assert!(!named_by(["registry.local/app:1"], &by_digest));
    }
}
