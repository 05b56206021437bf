use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use podfleet_control::registry::ResolveError;
use serde_json::{json, Value};

use super::*;
use crate::resources::{FleetDeploymentSpec, FleetDeploymentStatus};

const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

fn fd(generation: i64, score: Value) -> FleetDeployment {
    let mut fd = FleetDeployment::new(
        "web",
        FleetDeploymentSpec(json!({"target": {"devices": ["rpi-01"]}, "score": score})),
    );
    fd.metadata.generation = Some(generation);
    fd
}

/// A service `web` of `registry.example/web:1`, an init container
/// `migrate` of `registry.example/migrate` (untagged), a sidecar of a local
/// image and one already pinned.
fn mixed() -> Value {
    json!({
        "init_containers": [{"name": "migrate", "image": "registry.example/migrate"}],
        "services": [
            {"name": "web", "image": "registry.example/web:1"},
            {"name": "local", "image": "localhost/tool:1"},
            {"name": "pinned", "image": format!("registry.example/db:2@{D2}")},
            {"name": "loaded", "image": "registry.example/loaded:1", "pull_policy": "never"},
        ],
    })
}

fn with_record(mut fd: FleetDeployment, record: ResolvedImages) -> FleetDeployment {
    fd.status = Some(FleetDeploymentStatus {
        resolved_images: Some(record),
        ..FleetDeploymentStatus::default()
    });
    fd
}

fn digests(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(image, digest)| ((*image).to_owned(), (*digest).to_owned()))
        .collect()
}

fn to_pin(fd: &FleetDeployment) -> Vec<ImageToPin> {
    match plan(fd) {
        Plan::Pin { images, .. } => images,
        Plan::AsWritten => Vec::new(),
    }
}

fn images_fed(feed: &Feed) -> Vec<String> {
    let Feed::Manifest(bytes) = feed else {
        panic!("nothing is fed: {feed:?}");
    };
    let manifest: Value = serde_json::from_slice(bytes).unwrap();
    let score = &manifest["spec"]["score"];
    score["init_containers"]
        .as_array()
        .into_iter()
        .chain(score["services"].as_array())
        .flatten()
        .map(|c| c["image"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_images_pinned_are_apply_s_tags_init_containers_first() {
    let fd = fd(1, mixed());
    let images = to_pin(&fd);
    let pairs: Vec<(String, &str)> = images
        .iter()
        .map(|i| (i.container.to_string(), i.image.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            (
                "init container \"migrate\"".to_owned(),
                "registry.example/migrate"
            ),
            ("service \"web\"".to_owned(), "registry.example/web:1"),
        ]
    );
}

#[test]
fn nothing_to_pin_keep_tags_and_an_unparsable_spec_go_as_written() {
    let local = fd(
        1,
        json!({"services": [{"name": "web", "image": "localhost/web:1"}]}),
    );
    assert_eq!(plan(&local), Plan::AsWritten);
    assert_eq!(
        feed(&local),
        Feed::Manifest(manifest_value(&local).to_string().into_bytes())
    );

    let mut kept = fd(1, mixed());
    kept.metadata.annotations = Some([(KEEP_TAGS.to_owned(), "true".to_owned())].into());
    assert!(keeps_tags(&kept));
    assert_eq!(plan(&kept), Plan::AsWritten);
    assert_eq!(
        images_fed(&feed(&kept))[..2],
        ["registry.example/migrate", "registry.example/web:1"]
    );
    // Only "true" keeps tags; anything else pins, the safe side.
    kept.metadata.annotations = Some([(KEEP_TAGS.to_owned(), "yes".to_owned())].into());
    assert!(!keeps_tags(&kept));
    assert_eq!(feed(&kept), Feed::Unpinned);

    // A blank image: the fleet controller refuses it with the field path,
    // so it is handed in as written.
    let broken = fd(
        1,
        json!({"services": [{"name": "web", "image": " "}, {"name": "b", "image": "r.example/b:1"}]}),
    );
    assert_eq!(plan(&broken), Plan::AsWritten);
    assert!(matches!(feed(&broken), Feed::Manifest(_)));
}

#[test]
fn the_same_yaml_with_the_annotation_is_a_manifest_for_podfleet_apply() {
    let yaml = r#"
apiVersion: podfleet.io/v1alpha1
kind: FleetDeployment
metadata:
  name: web
  annotations:
    podfleet.io/keep-tags: "true"
spec:
  target: {devices: [rpi-01]}
  score:
    services: [{name: web, image: "registry.example/web:1"}]
"#;
    let value: Value = serde_norway::from_str(yaml).unwrap();
    let manifest = Manifest::from_value(value).unwrap();
    assert_eq!(manifest.metadata.name.as_str(), "web");
}

#[test]
fn a_record_of_the_generation_pins_the_manifest_and_any_other_waits() {
    let unpinned = fd(3, mixed());
    assert_eq!(feed(&unpinned), Feed::Unpinned, "no record yet");
    let resolved = digests(&[
        ("registry.example/migrate", D1),
        ("registry.example/web:1", D2),
    ]);
    let record = record(3, &to_pin(&unpinned), &resolved).unwrap();
    assert_eq!(
        record,
        ResolvedImages {
            generation: 3,
            images: vec![
                ResolvedImage {
                    container: "migrate".into(),
                    init_container: true,
                    image: "registry.example/migrate".into(),
                    pinned: format!("registry.example/migrate:latest@{D1}"),
                },
                ResolvedImage {
                    container: "web".into(),
                    init_container: false,
                    image: "registry.example/web:1".into(),
                    pinned: format!("registry.example/web:1@{D2}"),
                },
            ],
        }
    );
    let pinned = with_record(unpinned.clone(), record.clone());
    assert_eq!(
        images_fed(&feed(&pinned)),
        [
            format!("registry.example/migrate:latest@{D1}"),
            format!("registry.example/web:1@{D2}"),
            "localhost/tool:1".to_owned(),
            format!("registry.example/db:2@{D2}"),
            "registry.example/loaded:1".to_owned(),
        ]
    );

    // The next generation: the old record does not pin it.
    let mut next = pinned.clone();
    next.metadata.generation = Some(4);
    assert_eq!(feed(&next), Feed::Unpinned);

    // A record that misses a container, or whose digest is not one, is no
    // record of this spec.
    let mut partial = record.clone();
    partial.images.remove(0);
    assert_eq!(
        feed(&with_record(unpinned.clone(), partial)),
        Feed::Unpinned
    );
    let mut bogus = record.clone();
    bogus.images[1].pinned = "registry.example/web:1@sha256:nope".into();
    assert_eq!(feed(&with_record(unpinned.clone(), bogus)), Feed::Unpinned);

    // The record gives digests, never names: an edited `pinned` cannot
    // swap the image.
    let mut swapped = record;
    swapped.images[1].pinned = format!("evil.example/other:6@{D1}");
    assert_eq!(
        images_fed(&feed(&with_record(unpinned, swapped)))[1],
        format!("registry.example/web:1@{D1}")
    );
}

#[test]
fn a_record_needs_every_digest() {
    let fd = fd(1, mixed());
    let failure = record(1, &to_pin(&fd), &digests(&[("registry.example/web:1", D1)])).unwrap_err();
    assert_eq!(
        failure.to_string(),
        "init container \"migrate\": image \"registry.example/migrate\" cannot be pinned: it was not resolved"
    );
}

fn secret(type_: Option<&str>, data: Option<(&str, &[u8])>) -> Secret {
    let mut secret = Secret::default();
    secret.metadata.name = Some("regcred".into());
    secret.metadata.namespace = Some("podfleet".into());
    secret.type_ = type_.map(str::to_owned);
    secret.data = data.map(|(key, value)| [(key.to_owned(), ByteString(value.to_vec()))].into());
    secret
}

#[test]
fn logins_come_from_a_dockerconfigjson_secret_and_its_faults_quote_nothing() {
    // base64("podfleet:hunter2")
    let good = br#"{"auths": {"127.0.0.1:5000": {"auth": "cG9kZmxlZXQ6aHVudGVyMg=="}}}"#;
    let auth = registry_auth(&secret(
        Some(DOCKER_CONFIG_JSON_TYPE),
        Some((DOCKER_CONFIG_JSON_KEY, good)),
    ))
    .unwrap();
    let logins: Vec<(&str, &str)> = auth
        .logins()
        .map(|(key, login, _)| (key, login.username()))
        .collect();
    assert_eq!(logins, [("127.0.0.1:5000", "podfleet")]);

    let error = |s: Secret| registry_auth(&s).unwrap_err().to_string();
    assert_eq!(
        error(secret(None, Some((DOCKER_CONFIG_JSON_KEY, good)))),
        "the Secret podfleet/regcred is of type \"Opaque\", not kubernetes.io/dockerconfigjson"
    );
    assert_eq!(
        error(secret(
            Some(DOCKER_CONFIG_JSON_TYPE),
            Some(("config.json", good))
        )),
        "the Secret podfleet/regcred has no \".dockerconfigjson\" key"
    );
    let leaky = br#"{"auths": {"r.example": {"auth": "hunter2 is not base64"}}}"#;
    let message = error(secret(
        Some(DOCKER_CONFIG_JSON_TYPE),
        Some((DOCKER_CONFIG_JSON_KEY, leaky)),
    ));
    assert!(
        message.starts_with("the Secret podfleet/regcred's \".dockerconfigjson\" is unusable: "),
        "{message}"
    );
    assert!(!message.contains("hunter2"), "{message}");
    let broken = br#"{"auths": {"r.example": {"auth": hunter2}}}"#;
    let message = error(secret(
        Some(DOCKER_CONFIG_JSON_TYPE),
        Some((DOCKER_CONFIG_JSON_KEY, broken)),
    ));
    assert!(!message.contains("hunter2"), "{message}");
}

#[test]
fn a_failure_names_the_container_the_image_the_rule_and_what_runs() {
    let refused = ResolveError::Unauthorized {
        image: "127.0.0.1:5000/web:1".into(),
        registry: "127.0.0.1:5000".into(),
        user: None,
        reason: "the manifest request was answered HTTP 401".into(),
    };
    let container = Container::Service("web".into());
    let hint = |logins: Logins| {
        PinFailure::unresolved(container.clone(), refused.clone(), &logins).to_string()
    };
    assert!(
        hint(Logins::NotConfigured).ends_with("(no --registry-auth-secret is set)"),
        "{}",
        hint(Logins::NotConfigured)
    );
    assert!(hint(Logins::SecretMissing("podfleet/regcred".into()))
        .ends_with("(the Secret podfleet/regcred does not exist)"));
    let failure = PinFailure::unresolved(
        container.clone(),
        refused,
        &Logins::Secret("podfleet/regcred".into()),
    );
    let running = ResolvedImages {
        generation: 2,
        images: Vec::new(),
    };
    assert_eq!(
        unresolved_message(&failure, 3, Some(&running)),
        "service \"web\": image \"127.0.0.1:5000/web:1\": unauthorized: the registry 127.0.0.1:5000 \
         refused anonymous access (no login for it was found): the manifest request was answered \
         HTTP 401 (the Secret podfleet/regcred has no login for it); generation 3 reaches no \
         device until each of its image tags is pinned to the digest its registry serves (or \
         the FleetDeployment is annotated podfleet.io/keep-tags: \"true\"); the devices keep \
         the images of generation 2"
    );
    // A refused login names its user, and needs no hint.
    let with_user = PinFailure::unresolved(
        container,
        ResolveError::Unauthorized {
            image: "127.0.0.1:5000/web:1".into(),
            registry: "127.0.0.1:5000".into(),
            user: Some("podfleet".into()),
            reason: "the manifest request was answered HTTP 401".into(),
        },
        &Logins::Secret("podfleet/regcred".into()),
    );
    let message = unresolved_message(&with_user, 1, None);
    assert!(
        message.contains("refused the login of user \"podfleet\""),
        "{message}"
    );
    assert!(!message.contains("(the Secret"), "{message}");
    assert!(
        message.ends_with("the devices keep what they were handed before"),
        "{message}"
    );
}

#[test]
fn the_force_annotation_forces_the_generation_it_names() {
    let manifest = |feed: Feed| -> podfleet_core::fleet::FleetDeployment {
        let Feed::Manifest(bytes) = feed else {
            panic!("nothing is fed: {feed:?}");
        };
        podfleet_core::fleet::FleetDeployment::from_json(&bytes).unwrap()
    };
    let mut web = fd(
        4,
        json!({"services": [{"name": "web", "image": "localhost/web:1"}]}),
    );
    web.spec.0["placement"] = json!("AllOrNothing");
    assert!(!forces(&web));
    assert!(!manifest(feed(&web)).spec.is_forced());
    let annotate = |fd: &mut FleetDeployment, value: &str| {
        fd.metadata.annotations = Some([(FORCE_GENERATION.to_owned(), value.to_owned())].into());
    };
    annotate(&mut web, "4");
    assert!(forces(&web));
    let forced = manifest(feed(&web));
    assert!(forced.spec.is_forced());
    assert_eq!(
        forced.spec.placement,
        podfleet_core::fleet::Placement::AllOrNothing
    );
    // The next change of the spec is a new generation: not forced.
    web.metadata.generation = Some(5);
    assert!(!forces(&web));
    assert!(!manifest(feed(&web)).spec.is_forced());
    for value in ["", "four", "-1", "true"] {
        annotate(&mut web, value);
        assert!(!forces(&web), "{value:?}");
    }
    annotate(&mut web, " 5 ");
    assert!(forces(&web));

    // Pinned images: forced with the digests in, as the controller sees it.
    let mut pinned = with_record(
        fd(2, mixed()),
        record(
            2,
            &to_pin(&fd(2, mixed())),
            &digests(&[
                ("registry.example/migrate", D1),
                ("registry.example/web:1", D2),
            ]),
        )
        .unwrap(),
    );
    annotate(&mut pinned, "2");
    let forced = manifest(feed(&pinned));
    assert!(forced.spec.is_forced());
    assert!(forced.spec.score.services[0].image.ends_with(D2));
    // Not yet pinned: nothing is fed, forced or not.
    let mut unpinned = fd(3, mixed());
    annotate(&mut unpinned, "3");
    assert_eq!(feed(&unpinned), Feed::Unpinned);
}
