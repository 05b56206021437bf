#![allow(clippy::unwrap_used, missing_docs)]
//! The operator resolves image tags to digests, once per generation: a
//! mocked Kubernetes API server ([`FakeApi`]) holding the FleetDeployments,
//! Devices and the Secret of registry logins, a real nats-server, and a
//! real `docker-registry` on loopback with htpasswd authentication
//! ([`Registry`]) that images are pushed to with podman. Ground truth is
//! the desired bucket (what devices are handed), the registry's own API
//! and access log, and the requests the operator made.
//!
//! Needs podman, nats-server, docker-registry and htpasswd; a missing one
//! fails the test naming its package. Kept apart from `operator.rs`, whose
//! tests need no registry.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::kv;
use e2e::agent::tokio_runtime;
use e2e::kube_fake::{FakeApi, Logged, RunningOperator};
use e2e::registry::{base64, variant_image, Registry, REGISTRY_PASSWORD, REGISTRY_USER};
use e2e::{eventually, NatsServer};
use futures_util::StreamExt;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use podfleet_core::wire::names::DESIRED_BUCKET;
use podfleet_operator::resources::{Device, DeviceSpec, FleetDeployment, FleetDeploymentSpec};
use podfleet_operator::Options;
use serde_json::{json, Value};

const NS: &str = "podfleet";
const FDS: &str = "/apis/podfleet.io/v1alpha1/namespaces/podfleet/fleetdeployments";
const SECRET: &str = "regcred";
const SECRET_PATH: &str = "/api/v1/namespaces/podfleet/secrets/regcred";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/podfleet/events";
/// Generous: two cores shared with compilers.
const SETTLE: Duration = Duration::from_secs(60);

/// The operator against `fake` as `identity`, resolving with the logins
/// of the Secret [`SECRET`] and `registry` as plain HTTP.
fn operator(fake: &FakeApi, identity: &str, nats: &str, registry: &Registry) -> RunningOperator {
    let mut options = Options::new(NS);
    options.engine.device_status_every = Duration::from_millis(300);
    options.controller.config.status_interval = Duration::from_millis(100);
    options.registry.auth_secret = Some(SECRET.into());
    options.registry.insecure = vec![registry.host()];
    options.identity = identity.to_owned();
    RunningOperator::start(fake, identity, nats, options)
}

/// A service `web` of `image`, with `args`.
fn score(image: &str, args: &[&str]) -> Value {
    json!({"services": [{"name": "web", "image": image, "args": args}],
           "lifecycle": {"grace_period_secs": 1}})
}

fn fleet_deployment(name: &str, image: &str) -> FleetDeployment {
    FleetDeployment::new(
        name,
        FleetDeploymentSpec(json!({
            "target": {"selector": "site=lyon"},
            "score": score(image, &["sleep", "3600"]),
        })),
    )
}

fn device(name: &str) -> Device {
    let mut device = Device::new(name, DeviceSpec::default());
    device.metadata.labels = Some([("site".to_owned(), "lyon".to_owned())].into());
    device
}

fn secrets(client: &kube::Client) -> (Api<DynamicObject>, ApiResource) {
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("", "v1", "Secret"), "secrets");
    (
        Api::namespaced_with(client.clone(), NS, &resource),
        resource,
    )
}

/// A `kubernetes.io/dockerconfigjson` Secret holding `auth_json`.
fn login_secret(resource: &ApiResource, auth_json: &str) -> DynamicObject {
    DynamicObject::new(SECRET, resource).data(json!({
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64(auth_json.as_bytes())},
    }))
}

/// A containers-auth.json with `password` for the registry's user.
fn auth_json(registry: &Registry, password: &str) -> String {
    let auth = base64(format!("{REGISTRY_USER}:{password}").as_bytes());
    json!({"auths": {registry.host(): {"auth": auth}}}).to_string()
}

async fn kv_store(url: &str, bucket: &str) -> kv::Store {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    eventually!(
        format!("the bucket {bucket}"),
        SETTLE,
        js.get_key_value(bucket).await.ok()
    )
}

/// Every live key of `store` with its revision and the image of its
/// score's one service.
async fn images(store: &kv::Store) -> BTreeMap<String, (u64, String)> {
    let keys: Vec<String> = match store.keys().await {
        Ok(keys) => keys.filter_map(|k| async move { k.ok() }).collect().await,
        Err(_) => Vec::new(),
    };
    let mut live = BTreeMap::new();
    for key in keys {
        if let Ok(Some(entry)) = store.entry(key.clone()).await {
            if entry.operation == kv::Operation::Put {
                let score: Value = serde_json::from_slice(&entry.value).unwrap();
                let image = score["services"][0]["image"].as_str().unwrap().to_owned();
                live.insert(key, (entry.revision, image));
            }
        }
    }
    live
}

/// The image of every value `key` ever held, oldest first.
async fn image_history(store: &kv::Store, key: &str) -> Vec<String> {
    let Ok(history) = store.history(key).await else {
        return Vec::new();
    };
    history
        .filter_map(|entry| async move {
            let entry = entry.ok()?;
            let score: Value = serde_json::from_slice(&entry.value).ok()?;
            score["services"][0]["image"].as_str().map(str::to_owned)
        })
        .collect()
        .await
}

fn condition(fd: &Value, type_: &str) -> Option<(String, String, String)> {
    fd["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_owned(),
                c["reason"].as_str().unwrap_or("").to_owned(),
                c["message"].as_str().unwrap_or("").to_owned(),
            )
        })
}

/// The requests `client` made of `path`.
fn requests_of(fake: &FakeApi, client: &str, method: &str, path: &str) -> Vec<Logged> {
    fake.requests()
        .into_iter()
        .filter(|r| r.client == client && r.method == method && r.path == path)
        .collect()
}

/// How many manifest requests of `repository` the registry has logged.
fn manifest_requests(registry: &Registry, repository: &str) -> usize {
    let needle = format!("/v2/{repository}/manifests/");
    registry
        .log()
        .lines()
        .filter(|line| line.contains(&needle) && line.contains("HTTP/1.1\""))
        .count()
}

#[test]
fn a_tag_is_pinned_once_per_generation_and_a_repush_rolls_out_nothing() {
    let nats = NatsServer::start();
    let registry = Registry::start();
    let d1 = registry.push(&variant_image("one", 0), "podfleet/web:1");
    let image = registry.image("podfleet/web:1");
    let fake = FakeApi::new();
    let runtime = tokio_runtime();
    let client = runtime.block_on(async { fake.client() });
    let devices = Api::<Device>::all(client.clone());
    let fds = Api::<FleetDeployment>::namespaced(client.clone(), NS);
    let (secret_api, resource) = secrets(&client);
    runtime.block_on(async {
        let secret = login_secret(&resource, &auth_json(&registry, REGISTRY_PASSWORD));
        secret_api
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        devices
            .create(&PostParams::default(), &device("rpi-01"))
            .await
            .unwrap();
    });
    let first = operator(&fake, "operator", &nats.url(), &registry);
    let pinned_1 = format!("{image}@{d1}");
    let desired = runtime.block_on(async {
        let desired = kv_store(&nats.url(), DESIRED_BUCKET).await;
        fds.create(&PostParams::default(), &fleet_deployment("web", &image))
            .await
            .unwrap();
        let held = eventually!("rpi-01.web", SETTLE, {
            let held = images(&desired).await;
            held.contains_key("rpi-01.web").then_some(held)
        });
        assert_eq!(held["rpi-01.web"].1, pinned_1);
        // The key never held the tag: the record came first.
        assert_eq!(
            image_history(&desired, "rpi-01.web").await,
            std::slice::from_ref(&pinned_1)
        );
        desired
    });
    let fd = fake.object(FDS, "web").unwrap();
    assert_eq!(
        fd["status"]["resolvedImages"],
        json!({"generation": 1, "images": [{"container": "web", "image": image, "pinned": pinned_1}]})
    );
    // The exact writes: the finalizer, then the record in a server-side
    // apply of the status (logins read once, in between), then statuses.
    let writes: Vec<String> = fake
        .writes_of("operator")
        .into_iter()
        .filter(|w| w.contains("/fleetdeployments/"))
        .collect();
    assert_eq!(
        writes[..2],
        [
            format!("PATCH {FDS}/web"),
            format!("PATCH {FDS}/web/status")
        ],
        "{writes:#?}"
    );
    let status_patches = requests_of(&fake, "operator", "PATCH", &format!("{FDS}/web/status"));
    let record_patch = &status_patches[0];
    assert_eq!(
        record_patch.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(
        record_patch.body.as_ref().unwrap()["status"]["resolvedImages"]["images"][0]["pinned"],
        pinned_1
    );
    let secret_reads = requests_of(&fake, "operator", "GET", SECRET_PATH);
    assert_eq!(
        secret_reads.len(),
        1,
        "the logins are read once per resolution"
    );
    assert!(secret_reads[0].at < record_patch.at);
    let events = fake.objects(EVENTS);
    let pinned_event = events
        .iter()
        .find(|e| e["reason"] == "ImagesPinned")
        .expect("an ImagesPinned event");
    assert!(
        pinned_event["note"].as_str().unwrap().contains(&pinned_1),
        "{pinned_event}"
    );

    // The tag moves. Nothing asks the registry again, nothing is rewritten,
    // and a device that joins gets the recorded digest, not the new one.
    let d2 = registry.push(&variant_image("two", 0), "podfleet/web:1");
    assert_ne!(d1, d2);
    let asked = manifest_requests(&registry, "podfleet/web");
    runtime.block_on(async {
        let before = images(&desired).await;
        fds.patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "1"}}})),
        )
        .await
        .unwrap();
        devices
            .create(&PostParams::default(), &device("rpi-02"))
            .await
            .unwrap();
        let held = eventually!("rpi-02.web", SETTLE, {
            let held = images(&desired).await;
            held.contains_key("rpi-02.web").then_some(held)
        });
        assert_eq!(held["rpi-02.web"].1, pinned_1, "the recorded digest");
        assert_eq!(held["rpi-01.web"], before["rpi-01.web"], "rpi-01 untouched");
    });
    assert_eq!(manifest_requests(&registry, "podfleet/web"), asked);
    assert_eq!(requests_of(&fake, "operator", "GET", SECRET_PATH).len(), 1);
    assert_eq!(
        fake.object(FDS, "web").unwrap()["status"]["resolvedImages"]["generation"],
        1
    );

    // A restart reads the record back: no registry, no Secret, and a new
    // device still gets the recorded digest.
    first.stop().unwrap();
    let second = operator(&fake, "operator-2", &nats.url(), &registry);
    runtime.block_on(async {
        devices
            .create(&PostParams::default(), &device("rpi-03"))
            .await
            .unwrap();
        let held = eventually!("rpi-03.web from the restarted operator", SETTLE, {
            let held = images(&desired).await;
            held.contains_key("rpi-03.web").then_some(held)
        });
        assert!(
            held.values().all(|(_, image)| *image == pinned_1),
            "{held:#?}"
        );
    });
    assert_eq!(manifest_requests(&registry, "podfleet/web"), asked);
    assert_eq!(
        requests_of(&fake, "operator-2", "GET", SECRET_PATH).len(),
        0,
        "the restarted operator read the logins"
    );

    // A new generation is resolved anew and rolled out with the new digest.
    let pinned_2 = format!("{image}@{d2}");
    runtime.block_on(async {
        fds.patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"score": score(&image, &["sleep", "7200"])}})),
        )
        .await
        .unwrap();
        eventually!("generation 2's digest on every device", SETTLE, {
            let held = images(&desired).await;
            (held.len() == 3 && held.values().all(|(_, image)| *image == pinned_2)).then_some(())
        });
    });
    let fd = fake.object(FDS, "web").unwrap();
    assert_eq!(fd["metadata"]["generation"], 2);
    assert_eq!(fd["status"]["resolvedImages"]["generation"], 2);
    assert_eq!(
        fd["status"]["resolvedImages"]["images"][0]["pinned"],
        pinned_2
    );
    assert_eq!(
        requests_of(&fake, "operator-2", "GET", SECRET_PATH).len(),
        1
    );
    assert!(manifest_requests(&registry, "podfleet/web") > asked);
    second.stop().unwrap();
}

#[test]
fn a_refused_login_degrades_only_its_own_fleet_deployment_until_the_secret_is_fixed() {
    let nats = NatsServer::start();
    let registry = Registry::start();
    let d1 = registry.push(&variant_image("one", 0), "podfleet/locked:1");
    let image = registry.image("podfleet/locked:1");
    let fake = FakeApi::new();
    let runtime = tokio_runtime();
    let client = runtime.block_on(async { fake.client() });
    let devices = Api::<Device>::all(client.clone());
    let fds = Api::<FleetDeployment>::namespaced(client.clone(), NS);
    let (secret_api, resource) = secrets(&client);
    let wrong = "not-the-password-7f3a";
    runtime.block_on(async {
        let secret = login_secret(&resource, &auth_json(&registry, wrong));
        secret_api
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        devices
            .create(&PostParams::default(), &device("rpi-01"))
            .await
            .unwrap();
    });
    let _operator = operator(&fake, "operator", &nats.url(), &registry);
    runtime.block_on(async {
        let desired = kv_store(&nats.url(), DESIRED_BUCKET).await;
        fds.create(&PostParams::default(), &fleet_deployment("locked", &image))
            .await
            .unwrap();
        // The same tag, annotated to keep it: handed in as written.
        let mut kept = fleet_deployment("kept", &image);
        kept.metadata.annotations =
            Some([("podfleet.io/keep-tags".to_owned(), "true".to_owned())].into());
        fds.create(&PostParams::default(), &kept).await.unwrap();
        fds.create(
            &PostParams::default(),
            &fleet_deployment("local", "localhost/web:1"),
        )
        .await
        .unwrap();

        let locked = eventually!("locked to be Degraded", SETTLE, {
            let fd = fake.object(FDS, "locked").unwrap();
            condition(&fd, "Degraded")
                .is_some_and(|(status, ..)| status == "True")
                .then_some(fd)
        });
        let (_, reason, message) = condition(&locked, "Degraded").unwrap();
        assert_eq!(reason, "ImageResolveFailed");
        for part in [
            "service \"web\"".to_owned(),
            format!("image {image:?}"),
            format!("refused the login of user \"{REGISTRY_USER}\""),
            "generation 1 reaches no device until each of its image tags is pinned".to_owned(),
            "podfleet.io/keep-tags".to_owned(),
        ] {
            assert!(message.contains(&part), "{part:?} not in {message:?}");
        }
        assert_eq!(condition(&locked, "Available").unwrap().0, "False");
        assert!(locked["status"].get("resolvedImages").is_none(), "{locked}");

        // The others are unaffected; locked has no key.
        let held = eventually!("kept's and local's keys", SETTLE, {
            let held = images(&desired).await;
            (held.len() == 2).then_some(held)
        });
        assert_eq!(
            held.iter()
                .map(|(k, (_, i))| (k.as_str(), i.as_str()))
                .collect::<Vec<_>>(),
            [
                ("rpi-01.kept", image.as_str()),
                ("rpi-01.local", "localhost/web:1")
            ]
        );
        let kept = eventually!("kept's status", SETTLE, {
            let fd = fake.object(FDS, "kept").unwrap();
            condition(&fd, "Degraded").is_some().then_some(fd)
        });
        assert!(kept["status"].get("resolvedImages").is_none(), "{kept}");
        assert_eq!(condition(&kept, "Degraded").unwrap().1, "Healthy");

        let events = fake.objects(EVENTS);
        let warning = events
            .iter()
            .find(|e| e["reason"] == "ImageResolveFailed")
            .expect("an ImageResolveFailed event");
        assert_eq!(warning["type"], "Warning");
        assert_eq!(warning["regarding"]["name"], "locked");

        // Retries back off: each resolution reads the Secret, the k-th no
        // sooner than 2^k - 1 s after the first, however often the status
        // changes in between.
        eventually!("a retry", SETTLE, {
            (requests_of(&fake, "operator", "GET", SECRET_PATH).len() >= 2).then_some(())
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        let reads = requests_of(&fake, "operator", "GET", SECRET_PATH);
        let since_first = reads[0].at.elapsed().as_secs_f64();
        let most = 1 + (since_first + 1.0).log2().floor() as usize;
        assert!(
            reads.len() <= most,
            "{} resolutions in {since_first:.1} s: no backoff",
            reads.len()
        );
        assert!(images(&desired).await.keys().all(|k| k != "rpi-01.locked"));
        assert_eq!(
            image_history(&desired, "rpi-01.locked").await,
            Vec::<String>::new()
        );

        // Nothing the operator wrote quotes the wrong password.
        let secret_text = [
            wrong.to_owned(),
            base64(format!("{REGISTRY_USER}:{wrong}").as_bytes()),
        ];
        for request in fake.requests().iter().filter(|r| r.client == "operator") {
            let body = request
                .body
                .as_ref()
                .map(Value::to_string)
                .unwrap_or_default();
            for text in &secret_text {
                assert!(
                    !body.contains(text.as_str()),
                    "{} {} quotes the Secret",
                    request.method,
                    request.path
                );
            }
        }

        // The Secret is fixed: the next retry reads it and rolls out.
        secret_api
            .patch(
                SECRET,
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {".dockerconfigjson":
                    base64(auth_json(&registry, REGISTRY_PASSWORD).as_bytes())}})),
            )
            .await
            .unwrap();
        let held = eventually!("locked's key after the fix", SETTLE, {
            let held = images(&desired).await;
            held.contains_key("rpi-01.locked").then_some(held)
        });
        assert_eq!(held["rpi-01.locked"].1, format!("{image}@{d1}"));
        let locked = eventually!("locked to be healthy", SETTLE, {
            let fd = fake.object(FDS, "locked").unwrap();
            (condition(&fd, "Degraded").unwrap().1 == "Healthy").then_some(fd)
        });
        assert_eq!(locked["status"]["resolvedImages"]["generation"], 1);
    });
}
