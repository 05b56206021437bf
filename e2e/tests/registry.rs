#![allow(clippy::unwrap_used)]
//! Images from a registry: the production agent, on a device of its own
//! (an isolated podman service and store that start without the images),
//! pulling from a real `docker-registry` on loopback with htpasswd
//! authentication ([`e2e::registry::Registry`]). Ground truth is podman's
//! (`ps`, `events`, `image inspect`) and the registry's own API, never the
//! agent's reports alone.
//!
//! Image garbage collection keeps the images of the current and previous
//! revision and removes older ones podfleet pulled, never an image it did
//! not pull while the disk has room.

use std::path::Path;
use std::time::Duration;

use async_nats::ConnectOptions;
use e2e::agent::{reported, running, tokio_runtime, Broker, Device};
use e2e::registry::{variant_image, Registry, REGISTRY_USER};
use e2e::{eventually, unique_prefix, NatsServer, PodmanService, TEST_IMAGE};
use podfleet_core::wire::{DeploymentState, FailureCause, Phase, PullFailure};
use serde_json::{json, Value};

const AGENT: &str = env!("CARGO_BIN_EXE_podfleet-agent-e2e");
/// Generous: two cores shared with compilers.
const SETTLE: Duration = Duration::from_secs(45);
/// The noise in the upgrade's image: a layer that takes a while at
/// [`SLOW_RATE`].
const BULK: usize = 512 * 1024;
/// Bytes per second the registry sends while the upgrade pulls: about
/// four seconds for [`BULK`].
const SLOW_RATE: u64 = 128 * 1024;

/// A service of `image` that exits at once on SIGTERM.
fn score(image: &str) -> String {
    json!({
        "services": [{
            "name": "app",
            "image": image,
            "args": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.2; done"],
        }],
    })
    .to_string()
}

/// A device whose podman reads `registry`'s registries.conf, its agent
/// started with `args`.
fn device(registry: &Registry, nats: &NatsServer, id: &str, args: &[&str]) -> Device {
    let podman = PodmanService::start_isolated_with_registries(&[], &registry.registries_conf());
    let mut device = Device::on(Path::new(AGENT), id, &nats.url(), args, podman);
    device.start_agent();
    device
}

fn image_exists(device: &Device, image: &str) -> bool {
    device
        .podman()
        .podman()
        .args(["image", "exists", image])
        .status()
        .unwrap()
        .success()
}

/// `(type, status, unix nanos, id, name)` of every event of the device's
/// podman so far.
fn events(device: &Device) -> Vec<(String, String, u128, String, String)> {
    let output = device
        .podman()
        .podman()
        .args(["events", "--stream=false", "--format"])
        .arg("{{.Type}}\t{{.Status}}\t{{.Time.UnixNano}}\t{{.ID}}\t{{.Name}}")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            Some((
                fields.next()?.to_owned(),
                fields.next()?.to_owned(),
                fields.next()?.parse().ok()?,
                fields.next()?.to_owned(),
                fields.next().unwrap_or_default().to_owned(),
            ))
        })
        .collect()
}

fn is_pulling(state: &DeploymentState, image: &str) -> bool {
    state
        .message
        .contains(&format!("pulling {}", Value::from(image)))
}

fn pull_failure(state: &DeploymentState) -> Option<(&str, PullFailure, &str)> {
    match state.cause.as_ref()? {
        FailureCause::ImagePull {
            image,
            reason,
            error,
        } => Some((image, *reason, error)),
        _ => None,
    }
}

/// (a) A first deploy pulls the absent image and reports the registry's
/// digest; (b, f) an upgrade pulls the new image while the old container
/// still runs, says so in the state, and stops the old container only
/// after the pull ended (podman's own event times).
#[test]
fn first_deploy_pulls_and_an_upgrade_pulls_before_stopping() {
    tokio_runtime().block_on(async {
        let registry = Registry::start();
        let one = registry.push(&variant_image("one", 0), "podfleet/app:1");
        let two = registry.push(&variant_image("two", BULK), "podfleet/app:2");
        let nats = NatsServer::start();
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let dev = unique_prefix("pull");
        let auth = registry.auth_file().display().to_string();
        let device = device(&registry, &nats, &dev, &["--registry-auth-file", &auth]);
        let dep = format!("{dev}-app");
        let v1 = registry.image("podfleet/app:1");
        let v2 = registry.image("podfleet/app:2");
        assert!(!image_exists(&device, &v1), "the device starts without it");

        // (a) First deploy.
        let rev1 = broker.put(&dev, &dep, score(&v1)).await;
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.phase == Phase::Running && s.revision == rev1
            })
            .await;
        assert_eq!(running(&device.containers(&dep)), reported(&state));
        assert_eq!(state.image_digests["app"], one, "the registry's digest");
        assert!(image_exists(&device, &v1));
        let old = state.container_ids["app"].clone();

        // (b, f) Upgrade over a slow link.
        registry.throttle(Some(SLOW_RATE));
        let rev2 = broker.put(&dev, &dep, score(&v2)).await;
        let pulling = broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.revision == rev2 && is_pulling(s, &v2)
            })
            .await;
        assert_eq!(pulling.phase, Phase::Pending, "{pulling:?}");
        // podman's progress stream, as the report shows it while the pull runs.
        let progress = broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.revision == rev2 && is_pulling(s, &v2) && s.message.contains(" MB")
            })
            .await;
        eprintln!("while pulling: {}", progress.message);
        let ps = device.containers(&dep);
        assert!(
            ps.iter().any(|c| c.id == old && c.state == "running"),
            "the old container runs while the new image is pulled: {ps:#?}"
        );
        registry.throttle(None);
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.phase == Phase::Running && s.revision == rev2
            })
            .await;
        let new = state.container_ids["app"].clone();
        assert_ne!(new, old);
        assert_eq!(state.image_digests["app"], two);
        let ps = device.containers(&dep);
        assert_eq!(running(&ps), reported(&state));
        assert_eq!(ps.len(), 1, "the old container is gone: {ps:#?}");

        // podman 4.3 stamps its `pull` event when a pull begins: the end of
        // the transfer is the registry's last byte, as its proxy saw it.
        let transferred = registry.last_answer_at();
        let events = events(&device);
        let stopped = events
            .iter()
            .filter(|(kind, status, _, id, _)| {
                kind == "container"
                    && *id == old
                    && ["kill", "stop", "died"].contains(&status.as_str())
            })
            .map(|(_, _, at, _, _)| *at)
            .min()
            .unwrap_or_else(|| panic!("no stop event for {old}: {events:#?}"));
        assert!(
            transferred > 0 && transferred < stopped,
            "the registry sent its last byte {} ms after the old container was stopped: {events:#?}",
            (transferred.saturating_sub(stopped)) / 1_000_000
        );
        eprintln!(
            "the old container stopped {} ms after the registry sent the last byte of {v2}",
            (stopped - transferred) / 1_000_000
        );
    });
}

/// (c) A login the registry refuses fails the revision with a typed cause,
/// retried, and never touches the running revision; the password is never
/// logged.
#[test]
fn a_refused_login_fails_the_revision_and_leaves_the_old_one_running() {
    tokio_runtime().block_on(async {
        let registry = Registry::start();
        registry.push(&variant_image("one", 0), "podfleet/app:1");
        let nats = NatsServer::start();
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let dev = unique_prefix("deny");
        let config = tempfile::tempdir().unwrap();
        let toml = config.path().join("agent.toml");
        let wrong = "not-the-registry-password";
        std::fs::write(
            &toml,
            format!(
                "[registries.\"{}\"]\nusername = \"{REGISTRY_USER}\"\npassword = \"{wrong}\"\n",
                registry.host()
            ),
        )
        .unwrap();
        let config_arg = toml.display().to_string();
        let mut device = device(
            &registry,
            &nats,
            &dev,
            &["--config", &config_arg, "--retry-backoff-initial", "1s"],
        );
        let dep = format!("{dev}-app");

        let rev1 = broker.put(&dev, &dep, score(TEST_IMAGE)).await;
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.phase == Phase::Running && s.revision == rev1
            })
            .await;
        let old = state.container_ids["app"].clone();
        let started = device.inspect(&old, "{{.State.StartedAt}}");

        let v1 = registry.image("podfleet/app:1");
        let rev2 = broker.put(&dev, &dep, score(&v1)).await;
        let failed = broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.phase == Phase::Failed && s.revision == rev2 && s.attempt >= 2
            })
            .await;
        let (image, reason, error) = pull_failure(&failed)
            .unwrap_or_else(|| panic!("not an image pull failure: {failed:#?}"));
        assert_eq!((image, reason), (v1.as_str(), PullFailure::Unauthorized));
        eprintln!("a refused login: {error}");
        assert_eq!(failed.container_ids["app"], old, "{failed:#?}");
        let ps = device.containers(&dep);
        assert_eq!(ps.len(), 1, "{ps:#?}");
        assert!(ps[0].id == old && ps[0].state == "running", "{ps:#?}");
        assert_eq!(device.inspect(&old, "{{.State.StartedAt}}"), started);
        assert!(!image_exists(&device, &v1));
        assert!(
            !device.agent().log().contains(wrong),
            "the password reached the agent's log"
        );
    });
}

/// (d) With the registry down, a device whose image is present by digest
/// starts its workload again after a reboot (containers stopped, podman
/// and the agent restarted) and recreates a lost container, without a
/// pull; an image it does not have fails as `network`.
#[test]
fn a_digest_pinned_workload_starts_with_the_registry_down() {
    tokio_runtime().block_on(async {
        let mut registry = Registry::start();
        let digest = registry.push(&variant_image("one", 0), "podfleet/app:1");
        let pinned = registry.image(&format!("podfleet/app@{digest}"));
        let nats = NatsServer::start();
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let dev = unique_prefix("down");
        let auth = registry.auth_file().display().to_string();
        let mut device = device(
            &registry,
            &nats,
            &dev,
            &[
                "--registry-auth-file",
                &auth,
                "--restart-backoff-initial",
                "1s",
            ],
        );
        let dep = format!("{dev}-app");
        let rev = broker.put(&dev, &dep, score(&pinned)).await;
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.phase == Phase::Running && s.revision == rev
            })
            .await;
        assert_eq!(state.image_digests["app"], digest);
        let first = state.container_ids["app"].clone();

        registry.stop();
        // Reboot: the agent dies, the containers stop, podman comes back.
        device.agent().kill9();
        let stopped = device
            .podman()
            .podman()
            .args(["stop", "--all", "--time", "0"])
            .output()
            .unwrap();
        assert!(stopped.status.success(), "{stopped:?}");
        device.podman_mut().restart();
        let pulls_before = pulls(&device);
        device.start_agent();
        let state = eventually!("the workload to run again", SETTLE, {
            let ps = device.containers(&dep);
            let state = broker.state(&dev, &dep).await;
            state.filter(|s| {
                s.phase == Phase::Running && !running(&ps).is_empty() && running(&ps) == reported(s)
            })
        });
        assert_eq!(state.image_digests["app"], digest);

        // A lost container is made again from the image in the store.
        let gone = device
            .podman()
            .podman()
            .args(["rm", "--force", "--time", "0", &state.container_ids["app"]])
            .output()
            .unwrap();
        assert!(gone.status.success(), "{gone:?}");
        let state = eventually!("the container to be recreated", SETTLE, {
            let ps = device.containers(&dep);
            let state = broker.state(&dev, &dep).await;
            state.filter(|s| {
                s.phase == Phase::Running
                    && !s.container_ids.values().any(|id| *id == first)
                    && running(&ps) == reported(s)
                    && !running(&ps).is_empty()
            })
        });
        assert_eq!(state.image_digests["app"], digest);
        assert_eq!(pulls(&device), pulls_before, "nothing was pulled");

        // What the device cannot have: a typed network failure.
        let other = format!("{dev}-other");
        let missing = registry.image("podfleet/app:2");
        let rev = broker.put(&dev, &other, score(&missing)).await;
        let failed = broker
            .wait_state(&dev, &other, SETTLE, |s| {
                s.phase == Phase::Failed && s.revision == rev
            })
            .await;
        let (image, reason, error) = pull_failure(&failed)
            .unwrap_or_else(|| panic!("not an image pull failure: {failed:#?}"));
        assert_eq!((image, reason), (missing.as_str(), PullFailure::Network));
        eprintln!("the registry down: {error}");
    });
}

/// The number of image pull events the device's podman recorded.
fn pulls(device: &Device) -> usize {
    events(device)
        .iter()
        .filter(|(kind, status, ..)| kind == "image" && status == "pull")
        .count()
}

/// (e) A tag pushed again changes nothing on the device, not even when
/// the same score is put again: it runs what it pulled until a revision
/// names the new digest.
#[test]
fn a_re_pushed_tag_changes_nothing_until_a_revision_names_it() {
    tokio_runtime().block_on(async {
        let registry = Registry::start();
        let first = registry.push(&variant_image("one", 0), "podfleet/app:1");
        let nats = NatsServer::start();
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let dev = unique_prefix("retag");
        let auth = registry.auth_file().display().to_string();
        let mut device = device(&registry, &nats, &dev, &["--registry-auth-file", &auth]);
        let dep = format!("{dev}-app");
        let tagged = registry.image("podfleet/app:1");
        let rev = broker.put(&dev, &dep, score(&tagged)).await;
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.phase == Phase::Running && s.revision == rev
            })
            .await;
        let id = state.container_ids["app"].clone();
        let started = device.inspect(&id, "{{.State.StartedAt}}");

        let second = registry.push(&variant_image("two", 0), "podfleet/app:1");
        assert_ne!(second, first, "the tag moved");
        let rev = broker.put(&dev, &dep, score(&tagged)).await;
        let seen = format!("revision={rev}");
        eventually!("the agent to see the re-put", SETTLE, {
            device.agent().log().contains(&seen).then_some(())
        });
        let uptime = broker.heartbeat(&dev).await.unwrap().uptime_s;
        eventually!("three more ticks", SETTLE, {
            broker
                .heartbeat(&dev)
                .await
                .filter(|h| h.uptime_s >= uptime + 3)
        });
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.phase == Phase::Running && s.revision == rev
            })
            .await;
        assert_eq!(state.container_ids["app"], id);
        assert_eq!(state.image_digests["app"], first);
        assert_eq!(device.inspect(&id, "{{.State.StartedAt}}"), started);
        assert_eq!(running(&device.containers(&dep)), reported(&state));

        let pinned = registry.image(&format!("podfleet/app@{second}"));
        let rev = broker.put(&dev, &dep, score(&pinned)).await;
        let state = broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.phase == Phase::Running && s.revision == rev
            })
            .await;
        assert_ne!(state.container_ids["app"], id);
        assert_eq!(state.image_digests["app"], second);
        assert_eq!(running(&device.containers(&dep)), reported(&state));
    });
}

/// (g) Garbage collection: after three revisions the first one's image is
/// gone from the device's store, the current and previous ones stay (going
/// back needs no registry), and an image podfleet never asked for stays.
#[test]
fn garbage_collection_keeps_the_current_and_previous_revisions() {
    tokio_runtime().block_on(async {
        let mut registry = Registry::start();
        for (n, variant) in [(1, "one"), (2, "two"), (3, "three")] {
            registry.push(&variant_image(variant, 0), &format!("podfleet/app:{n}"));
        }
        registry.push(&variant_image("four", 0), "podfleet/tool:1");
        let nats = NatsServer::start();
        let broker = Broker::connect(&nats.url(), ConnectOptions::new()).await;
        let dev = unique_prefix("gc");
        let auth = registry.auth_file().display().to_string();
        let device = device(&registry, &nats, &dev, &["--registry-auth-file", &auth]);
        let dep = format!("{dev}-app");
        let images: Vec<String> = (1..=3)
            .map(|n| registry.image(&format!("podfleet/app:{n}")))
            .collect();
        // Somebody else's image on the device, pulled by hand.
        let theirs = registry.image("podfleet/tool:1");
        let pulled = device
            .podman()
            .podman()
            .args(["pull", "--tls-verify=false", "--authfile", &auth, &theirs])
            .output()
            .unwrap();
        assert!(pulled.status.success(), "{pulled:?}");
        for image in &images {
            let rev = broker.put(&dev, &dep, score(image)).await;
            broker
                .wait_state(&dev, &dep, SETTLE, |s| {
                    s.phase == Phase::Running && s.revision == rev
                })
                .await;
        }
        eventually!("the first revision's image to be removed", SETTLE, {
            (!image_exists(&device, &images[0])).then_some(())
        });
        assert!(
            image_exists(&device, &images[1]),
            "the previous revision's image stays"
        );
        assert!(image_exists(&device, &images[2]), "the current one stays");
        assert!(
            image_exists(&device, &theirs),
            "an image podfleet never asked for stays"
        );

        // Back to the previous revision, with the registry down: no pull.
        registry.stop();
        let pulls_before = pulls(&device);
        let rev = broker.put(&dev, &dep, score(&images[1])).await;
        broker
            .wait_state(&dev, &dep, SETTLE, |s| {
                s.phase == Phase::Running && s.revision == rev
            })
            .await;
        assert_eq!(pulls(&device), pulls_before, "nothing was pulled");
        assert_eq!(running(&device.containers(&dep)).len(), 1);
    });
}
