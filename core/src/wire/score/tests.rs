use super::*;

mod cases;
mod schema;

use cases::CASES;

fn service(name: &str) -> PodmanService {
    PodmanService {
        name: name.into(),
        image: "localhost/app:1".into(),
        args: vec![],
        env: BTreeMap::new(),
        volumes: vec![],
        ports: vec![],
        pull_policy: None,
        container: None,
        setup_script: None,
    }
}

fn init(name: &str) -> InitContainer {
    InitContainer {
        name: name.into(),
        image: "localhost/migrate:1".into(),
        args: vec![],
        env: BTreeMap::new(),
        volumes: vec![],
        timeout: DEFAULT_INIT_CONTAINER_TIMEOUT,
        pull_policy: None,
    }
}

fn score(services: Vec<PodmanService>, inits: Vec<InitContainer>) -> PodmanV0Score {
    PodmanV0Score {
        services,
        init_containers: inits,
        lifecycle: None,
        lifetime: None,
        restart: None,
    }
}

#[test]
fn legacy_payload_without_init_or_lifecycle_parses_to_defaults() {
    let legacy = br#"{"services":[{"name":"web","image":"localhost/web:1"}]}"#;
    let parsed = PodmanV0Score::from_json(legacy).unwrap();
    assert!(parsed.init_containers.is_empty());
    assert_eq!(parsed.lifecycle, None);
    assert_eq!(parsed.lifecycle_or_default(), LifecyclePolicy::default());
    assert_eq!(parsed.lifecycle_or_default().stop_signal, Signal::Term);
    assert_eq!(parsed.lifecycle_or_default().grace_period_secs, 30);
    assert_eq!(
        parsed,
        score(vec![service_with_image("web", "localhost/web:1")], vec![])
    );
}

fn service_with_image(name: &str, image: &str) -> PodmanService {
    PodmanService {
        image: image.into(),
        ..service(name)
    }
}

#[test]
fn default_timeout_is_hydrated_and_encoded_in_whole_seconds() {
    let json = br#"{"services":[{"name":"web","image":"i"}],
                    "init_containers":[{"name":"migrate","image":"m"},
                                       {"name":"warm","image":"w","timeout":7}]}"#;
    let parsed = PodmanV0Score::from_json(json).unwrap();
    assert_eq!(parsed.init_containers[0].timeout, Duration::from_secs(300));
    assert_eq!(parsed.init_containers[1].timeout, Duration::from_secs(7));
    let mut sub_second = init("x");
    sub_second.timeout = Duration::from_millis(7_900);
    let value = serde_json::to_value(&sub_second).unwrap();
    assert_eq!(value["timeout"], serde_json::json!(7));
}

#[test]
fn init_container_order_survives_a_round_trip() {
    let names = ["zeta", "alpha", "mid", "beta"];
    let s = score(
        vec![service("web")],
        names.iter().map(|n| init(n)).collect(),
    );
    let back = PodmanV0Score::from_json(&s.to_json()).unwrap();
    let order: Vec<_> = back
        .init_containers
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    assert_eq!(order, names);
}

#[test]
fn unknown_fields_are_tolerated() {
    let json = br#"{"services":[{"name":"web","image":"i","healthcheck":{"cmd":"x"}}],
                    "future_field":true,"lifecycle":{"stop_signal":"SIGINT","drain":1}}"#;
    let parsed = PodmanV0Score::from_json(json).unwrap();
    assert_eq!(parsed.services[0].name, "web");
    let lifecycle = parsed.lifecycle.unwrap();
    assert_eq!(lifecycle.stop_signal, Signal::Int);
    assert_eq!(
        lifecycle.grace_period_secs, 30,
        "missing grace takes its default"
    );
}

#[test]
fn signals_round_trip_by_name_and_number() {
    for sig in Signal::ALL {
        assert_eq!(sig.name().parse::<Signal>().unwrap(), sig);
        assert_eq!(Signal::from_number(sig.number()), Some(sig));
        let json = serde_json::to_string(&sig).unwrap();
        assert_eq!(json, format!("\"{}\"", sig.name()));
    }
    assert_eq!(Signal::from_number(99), None);
}

#[test]
fn every_case_gets_the_agents_verdict_and_message() {
    let mut wrong = Vec::new();
    for &(what, json, verdict) in CASES {
        let result = PodmanV0Score::from_json(json.as_bytes());
        match (verdict.agent_error(), result) {
            (None, Ok(_)) => {}
            (None, Err(err)) => wrong.push(format!("{what}: rejected with {err}")),
            (Some(_), Ok(_)) => wrong.push(format!("{what}: accepted")),
            (Some(expected), Err(err)) => {
                let message = err.to_string();
                let malformed = matches!(err, ScoreError::Malformed { .. });
                let matches = if expected.starts_with("malformed score: ") {
                    malformed && message.starts_with(expected)
                } else {
                    !malformed && message == expected
                };
                if !matches {
                    wrong.push(format!(
                        "{what}:\n  expected {expected}\n  got      {message}"
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_default_pull_policy_follows_the_reference_as_in_kubernetes() {
    let cases = [
        ("localhost/app:1.2", PullPolicy::IfNotPresent),
        ("localhost:5000/app:1", PullPolicy::IfNotPresent),
        ("localhost:5000/app", PullPolicy::Always),
        ("app", PullPolicy::Always),
        ("app:latest", PullPolicy::Always),
        ("registry.example:443/team/app:latest", PullPolicy::Always),
        ("app@sha256:0123abcd", PullPolicy::IfNotPresent),
        ("app:latest@sha256:0123abcd", PullPolicy::IfNotPresent),
    ];
    for (image, want) in cases {
        assert_eq!(PullPolicy::default_for(image), want, "{image}");
    }
    let set = br#"{"services":[{"name":"web","image":"app:latest","pull_policy":"never"}],
                   "init_containers":[{"name":"m","image":"m:1","pull_policy":"always"}]}"#;
    let parsed = PodmanV0Score::from_json(set).unwrap();
    assert_eq!(parsed.services[0].pull_policy(), PullPolicy::Never);
    assert_eq!(parsed.init_containers[0].pull_policy(), PullPolicy::Always);
    let bad = br#"{"services":[{"name":"web","image":"app:1","pull_policy":"sometimes"}]}"#;
    let error = PodmanV0Score::from_json(bad).unwrap_err().to_string();
    assert!(error.contains("sometimes"), "{error}");
}
