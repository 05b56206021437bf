use super::*;

fn service(name: &str) -> PodmanService {
    PodmanService {
        name: name.into(),
        image: "localhost/app:1".into(),
        args: vec![],
        env: BTreeMap::new(),
        volumes: vec![],
        ports: vec![],
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
    }
}

fn score(services: Vec<PodmanService>, inits: Vec<InitContainer>) -> PodmanV0Score {
    PodmanV0Score {
        services,
        init_containers: inits,
        lifecycle: None,
    }
}

fn error_of(s: &PodmanV0Score) -> String {
    s.validate()
        .expect_err("score should be invalid")
        .to_string()
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
fn malformed_payloads_are_typed() {
    for bad in [&b"not json"[..], b"{}", b"{\"services\":3}", b""] {
        let err = PodmanV0Score::from_json(bad).unwrap_err();
        assert!(matches!(err, ScoreError::Malformed { .. }), "{err}");
        assert!(err.to_string().starts_with("malformed score: "), "{err}");
    }
    let err = PodmanV0Score::from_json(
        br#"{"services":[{"name":"web","image":"i"}],"lifecycle":{"stop_signal":"TERM"}}"#,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("unknown stop signal \"TERM\""),
        "{err}"
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
fn every_validation_error_is_reachable_with_its_message() {
    assert_eq!(
        error_of(&score(vec![], vec![])),
        "the score has no services: at least one is required"
    );
    assert_eq!(
        error_of(&score(vec![service("")], vec![])),
        format!(
            "invalid service name \"\": it is empty; the rule is {}",
            crate::wire::names::LABEL_RULE
        )
    );
    assert!(
        error_of(&score(vec![service("web")], vec![init("Bad_Name")]))
            .starts_with("invalid init container name \"Bad_Name\"")
    );
    assert_eq!(
        error_of(&score(vec![service("web"), service("web")], vec![])),
        "duplicate service name \"web\": service names must be unique"
    );
    assert_eq!(
        error_of(&score(vec![service("web")], vec![init("m"), init("m")])),
        "duplicate init container name \"m\": init container names must be unique"
    );
    assert_eq!(
        error_of(&score(vec![service("web")], vec![init("web")])),
        "\"web\" names both a service and an init container: names must be distinct"
    );
    assert_eq!(
        error_of(&score(vec![service_with_image("web", " ")], vec![])),
        "\"web\" has an empty image: every container needs an image reference"
    );
    let mut no_image_init = init("m");
    no_image_init.image = String::new();
    assert_eq!(
        error_of(&score(vec![service("web")], vec![no_image_init])),
        "\"m\" has an empty image: every container needs an image reference"
    );
    let mut zero = init("m");
    zero.timeout = Duration::ZERO;
    assert_eq!(
        error_of(&score(vec![service("web")], vec![zero])),
        "init container \"m\" has a timeout of 0 s: the timeout must be at least 1 s"
    );
    let mut env = service("web");
    env.env.insert("A=B".into(), "x".into());
    assert_eq!(
        error_of(&score(vec![env], vec![])),
        "\"web\" has invalid environment variable name \"A=B\": names must be non-empty and contain neither '=' nor NUL"
    );
    let mut vol = service("web");
    vol.volumes.push(VolumeMount {
        source: "/data".into(),
        target: "relative".into(),
        read_only: false,
    });
    assert_eq!(
        error_of(&score(vec![vol], vec![])),
        "\"web\" has invalid volume \"/data\" -> \"relative\": the target must be an absolute path"
    );
    let mut vol = service("web");
    vol.volumes.push(VolumeMount {
        source: String::new(),
        target: "/x".into(),
        read_only: false,
    });
    assert!(error_of(&score(vec![vol], vec![])).ends_with("the source must not be empty"));
    let mut vol = service("web");
    vol.volumes.push(VolumeMount {
        source: "/a:b".into(),
        target: "/x".into(),
        read_only: true,
    });
    assert!(error_of(&score(vec![vol], vec![])).ends_with("paths must not contain ':'"));
    let mut port = service("web");
    port.ports.push(PortMapping {
        host_port: 0,
        container_port: 80,
        protocol: Protocol::Tcp,
    });
    assert_eq!(
        error_of(&score(vec![port], vec![])),
        "service \"web\" publishes port 0: ports must be 1-65535"
    );
    let published = |name: &str| {
        let mut s = service(name);
        s.ports.push(PortMapping {
            host_port: 8080,
            container_port: 80,
            protocol: Protocol::Tcp,
        });
        s
    };
    assert_eq!(
        error_of(&score(vec![published("a"), published("b")], vec![])),
        "host port 8080/tcp is published by both \"a\" and \"b\": a host port can be published once"
    );
}

#[test]
fn same_port_on_different_protocols_is_fine() {
    let mut a = service("a");
    a.ports.push(PortMapping {
        host_port: 53,
        container_port: 53,
        protocol: Protocol::Tcp,
    });
    let mut b = service("b");
    b.ports.push(PortMapping {
        host_port: 53,
        container_port: 53,
        protocol: Protocol::Udp,
    });
    score(vec![a, b], vec![]).validate().unwrap();
}
