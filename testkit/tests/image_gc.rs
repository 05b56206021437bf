#![allow(clippy::unwrap_used)]
//! Image garbage collection against the fake's store: the images of the
//! current and the previous revision stay (going back one revision needs
//! no registry), older ones podfleet pulled go, an image another owner's
//! container uses stays, and a full disk loses unused images of others,
//! oldest first, never one a deployment keeps.

use std::collections::BTreeMap;
use std::time::Duration;

use podfleet_core::reconciler::{Bugs, Config, ImageGcPolicy};
use podfleet_core::runtime::{ContainerSpec, ImageInfo, RuntimeOp};
use podfleet_core::wire::{DeploymentName, DeviceId, Phase, Signal};
use podfleet_testkit::images::{self, APP_1, A_1, A_2, INIT_OK};
use podfleet_testkit::registry::{Layer, StoredImage};
use podfleet_testkit::{Harness, ImageStore, Invariant};

fn score(image: &str) -> String {
    format!(r#"{{"services":[{{"name":"web","image":"{image}"}}]}}"#)
}

/// A device whose store starts empty: every image comes from the registry.
fn device(policy: ImageGcPolicy) -> Harness {
    let config = Config::new(DeviceId::new("dev-0").unwrap(), "test").image_gc(policy);
    let mut h = Harness::new(config);
    h.runtime = images::runtime();
    *h.runtime.images_mut() = ImageStore::empty();
    h.run_for(Duration::from_secs(1));
    h
}

fn roll_out(h: &mut Harness, revision: u64, image: &str) {
    h.put("shop", revision, &score(image));
    h.run_for(Duration::from_secs(30));
    let state = &h.states[&DeploymentName::new("shop").unwrap()];
    assert_eq!(
        (state.phase, state.revision.get()),
        (Phase::Running, revision),
        "{}",
        h.transcript
    );
}

fn pulls_since(h: &Harness, from: usize) -> Vec<String> {
    h.ops[from..]
        .iter()
        .filter_map(|(_, op)| match op {
            RuntimeOp::Pull { image } => Some(image.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn the_current_and_previous_revisions_stay_and_older_ones_go() {
    let mut h = device(ImageGcPolicy::default());
    roll_out(&mut h, 1, A_1);
    roll_out(&mut h, 2, A_2);
    // Both kept: A_2 runs, A_1 is the previous revision.
    assert!(h.runtime.image(A_1).is_some() && h.runtime.image(A_2).is_some());
    roll_out(&mut h, 3, APP_1);
    assert!(h.runtime.image(A_1).is_none(), "{}", h.transcript);
    assert!(h.runtime.image(A_2).is_some() && h.runtime.image(APP_1).is_some());
    // Going back one revision needs no pull.
    let from = h.ops.len();
    roll_out(&mut h, 4, A_2);
    assert_eq!(pulls_since(&h, from), Vec::<String>::new());
    assert!(h.violations.is_empty(), "{:?}", h.violations);
    // Deleting the deployment retires all of its images.
    h.delete("shop", 5);
    h.run_for(Duration::from_secs(30));
    assert!(h.runtime.images().list().is_empty(), "{}", h.transcript);
}

#[test]
fn an_image_another_owners_container_uses_stays() {
    let mut h = device(ImageGcPolicy::default());
    roll_out(&mut h, 1, A_1);
    // Somebody else runs a container from the same image, by hand.
    h.runtime.create_quietly(ContainerSpec {
        name: "by-hand".into(),
        image: A_1.into(),
        args: Vec::new(),
        env: BTreeMap::new(),
        volumes: Vec::new(),
        ports: Vec::new(),
        labels: BTreeMap::new(),
        stop_signal: Signal::Term,
    });
    roll_out(&mut h, 2, A_2);
    roll_out(&mut h, 3, APP_1);
    assert!(h.runtime.image(A_1).is_some(), "{}", h.transcript);
    // It was never even asked for: the list said a container uses it.
    assert!(!h.ops.iter().any(|(_, op)| matches!(
        op,
        RuntimeOp::RemoveImage { id } if *id == h.runtime.image(A_1).unwrap().id
    )));
}

#[test]
fn a_full_disk_loses_unused_images_of_others_oldest_first() {
    let mut h = device(ImageGcPolicy::default());
    let tool = |name: &str| StoredImage {
        info: ImageInfo {
            id: format!("sha256:{name}"),
            digest: None,
        },
        layers: vec![Layer::named(name, 32_000_000)],
    };
    h.runtime.images_mut().set_capacity(Some(100_000_000));
    h.runtime.images_mut().insert("other/tool:1", tool("tool1"));
    h.runtime.images_mut().insert("other/tool:2", tool("tool2"));
    // 64 MB of others', then 20 MB of A_1: 84 %, below the high mark.
    roll_out(&mut h, 1, A_1);
    assert!(h.runtime.image("other/tool:1").is_some());
    assert_eq!(h.runtime.images().used(), 84_000_000);
    // A_2 shares A_1's base layer: 4 MB more, 88 %. The others' images go,
    // oldest first, until below 70 %: one is enough. A_1 is the previous
    // revision and stays.
    roll_out(&mut h, 2, A_2);
    assert!(
        h.runtime.image("other/tool:1").is_none(),
        "{}",
        h.transcript
    );
    assert!(
        h.runtime.image("other/tool:2").is_some(),
        "{}",
        h.transcript
    );
    assert!(h.runtime.image(A_1).is_some() && h.runtime.image(A_2).is_some());
    assert_eq!(h.runtime.images().used(), 56_000_000);
}

#[test]
fn switched_off_it_removes_nothing() {
    let mut h = device(ImageGcPolicy {
        enabled: false,
        ..ImageGcPolicy::default()
    });
    roll_out(&mut h, 1, A_1);
    roll_out(&mut h, 2, A_2);
    roll_out(&mut h, 3, APP_1);
    assert!(h.runtime.image(A_1).is_some());
    assert!(!h
        .ops
        .iter()
        .any(|(_, op)| matches!(op, RuntimeOp::ListImages | RuntimeOp::RemoveImage { .. })));
}

#[test]
fn removing_an_image_the_current_revision_names_is_caught() {
    let with_init = format!(
        r#"{{"services":[{{"name":"web","image":"{A_1}"}}],"init_containers":[{{"name":"setup","image":"{INIT_OK}"}}]}}"#
    );
    for (bugs, caught) in [
        (Bugs::default(), false),
        (
            Bugs {
                gc_ignores_keep: true,
                ..Bugs::default()
            },
            true,
        ),
    ] {
        let config = Config::new(DeviceId::new("dev-0").unwrap(), "test").inject_bugs(bugs);
        let mut h = Harness::new(config);
        h.runtime = images::runtime();
        *h.runtime.images_mut() = ImageStore::empty();
        h.run_for(Duration::from_secs(1));
        // The init container's image is unused once it has run, but the
        // revision still names it.
        h.put("shop", 1, &with_init);
        h.run_for(Duration::from_secs(30));
        h.put("shop", 2, &score(A_2));
        h.run_for(Duration::from_secs(30));
        h.put("shop", 3, &with_init);
        h.run_for(Duration::from_secs(30));
        let found = h
            .violations
            .iter()
            .any(|v| v.invariant == Invariant::ImageGcKeepsNeeded);
        assert_eq!(found, caught, "{:?}\n{}", h.violations, h.transcript);
    }
}

#[test]
fn a_revision_the_agent_forgot_with_its_cache_keeps_no_image() {
    // Found by the `reconciler` fuzz target in CI. `cam` had a valid
    // revision naming A_2 and then an invalid one; the agent lost its cache
    // and the watch handed it only the invalid one. The agent cannot know
    // the valid revision any more, so once `shop` (A_2's only user) is
    // deleted, A_2 is unneeded as far as anyone can tell, and goes. With
    // the cache kept, `cam`'s revision is rolled out and A_2 stays.
    let invalid = format!(
        r#"{{"services":[{{"name":"web","image":"{A_2}","ports":[{{"container_port":0,"host_port":8080}}]}}]}}"#
    );
    for keep_cache in [false, true] {
        let mut h = device(ImageGcPolicy::default());
        roll_out(&mut h, 1, A_2);
        h.put("cam", 2, &score(A_2));
        h.put("cam", 3, &invalid);
        h.restart_agent(keep_cache);
        h.put("shop", 1, &score(A_2));
        h.put("cam", 3, &invalid);
        h.run_for(Duration::from_secs(30));
        h.delete("shop", 4);
        h.run_for(Duration::from_secs(30));
        assert_eq!(
            h.runtime.image(A_2).is_some(),
            keep_cache,
            "{}",
            h.transcript
        );
        assert!(
            h.violations.is_empty(),
            "keep_cache {keep_cache}: {:?}\n{}",
            h.violations,
            h.transcript
        );
    }
}
