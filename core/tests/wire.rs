//! The wire contract: every type's JSON form is snapshotted, round-trips, and
//! older payloads keep parsing.

#![allow(clippy::unwrap_used)] // a panic is how a test fails
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::Duration;

use podfleet_core::wire::*;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T) {
    let json = serde_json::to_vec(value).unwrap();
    let back: T = serde_json::from_slice(&json).unwrap();
    assert_eq!(
        &back,
        value,
        "round trip of {}",
        String::from_utf8_lossy(&json)
    );
}

fn full_score() -> PodmanV0Score {
    PodmanV0Score {
        services: vec![
            PodmanService {
                name: "web".into(),
                image: "localhost/web:2".into(),
                args: vec!["--port".into(), "8080".into()],
                env: BTreeMap::from([("MODE".into(), "prod".into()), ("A".into(), "1".into())]),
                volumes: vec![VolumeMount {
                    source: "/srv/web".into(),
                    target: "/data".into(),
                    read_only: true,
                }],
                ports: vec![PortMapping {
                    host_port: 8080,
                    container_port: 8080,
                    protocol: Protocol::Tcp,
                }],
                pull_policy: None,
                container: None,
                setup_script: None,
            },
            PodmanService {
                name: "worker".into(),
                image: "localhost/worker:2".into(),
                args: vec![],
                env: BTreeMap::new(),
                volumes: vec![VolumeMount {
                    source: "cache".into(),
                    target: "/cache".into(),
                    read_only: false,
                }],
                ports: vec![],
                pull_policy: None,
                container: None,
                setup_script: None,
            },
        ],
        init_containers: vec![
            InitContainer {
                name: "migrate".into(),
                image: "localhost/migrate:2".into(),
                args: vec!["up".into()],
                env: BTreeMap::from([("DB".into(), "/data/db".into())]),
                volumes: vec![],
                timeout: Duration::from_secs(120),
                pull_policy: None,
            },
            InitContainer {
                name: "warm-cache".into(),
                image: "localhost/warm:2".into(),
                args: vec![],
                env: BTreeMap::new(),
                volumes: vec![],
                timeout: DEFAULT_INIT_CONTAINER_TIMEOUT,
                pull_policy: None,
            },
        ],
        lifecycle: Some(LifecyclePolicy {
            stop_signal: Signal::Int,
            grace_period_secs: 10,
        }),
        lifetime: None,
        restart: Some(2),
    }
}

fn device() -> DeviceId {
    DeviceId::new("rpi-01").unwrap()
}

fn deployment() -> DeploymentName {
    DeploymentName::new("shop").unwrap()
}

fn running_state() -> DeploymentState {
    DeploymentState {
        phase: Phase::Running,
        revision: Revision::new(7),
        container_ids: BTreeMap::from([
            ("web".into(), "4f1c".into()),
            ("worker".into(), "9a2b".into()),
        ]),
        message: "2 init containers completed, 2 services running".into(),
        cause: None,
        attempt: 1,
        restarts: BTreeMap::from([(
            "worker".into(),
            RestartRecord {
                count: 2,
                last_exit_code: Some(137),
            },
        )]),
        image_digests: BTreeMap::from([(
            "web".into(),
            "sha256:4b825dc642cb6eb9a060e54bf8d69288fbee4904b825dc642cb6eb9a060e54bf".into(),
        )]),
        exit_codes: BTreeMap::new(),
        verified: BTreeMap::new(),
        summarised: false,
    }
}

fn failure_causes() -> Vec<FailureCause> {
    vec![
        FailureCause::InvalidScore {
            error: "the score has no services: at least one is required".into(),
        },
        FailureCause::InitContainerExited {
            name: "migrate".into(),
            exit_code: 3,
        },
        FailureCause::InitContainerTimedOut {
            name: "migrate".into(),
            waited_secs: 120,
        },
        FailureCause::StillRunningAfterWait {
            name: "migrate".into(),
        },
        FailureCause::Runtime {
            container: "shop_web".into(),
            operation: RuntimeOperation::Create,
            error: "image not known".into(),
        },
        FailureCause::CrashLoop {
            service: "worker".into(),
            restarts: 5,
            last_exit_code: Some(1),
        },
        FailureCause::Unverified {
            service: "web".into(),
            container: "nginx".into(),
            status: VerifiedStatus::Drifted,
            evidence: "runs image sha256:1111, the score's image names sha256:2222".into(),
        },
        FailureCause::RunFailed {
            service: "worker".into(),
            exit_code: 2,
        },
        FailureCause::SetupScriptFailed {
            service: "web".into(),
            exit_code: Some(127),
            output: "setup.sh: line 3: apt-get: not found".into(),
        },
    ]
}

#[test]
fn score_json_is_stable() {
    let score = full_score();
    score.validate().unwrap();
    round_trip(&score);
    insta::assert_json_snapshot!("score_full", score);
    let minimal =
        PodmanV0Score::from_json(br#"{"services":[{"name":"web","image":"i"}]}"#).unwrap();
    round_trip(&minimal);
    insta::assert_json_snapshot!("score_minimal", minimal);
}

#[test]
fn legacy_score_equals_explicit_defaults() {
    let legacy = PodmanV0Score::from_json(
        br#"{"services":[{"name":"web","image":"localhost/web:1","env":{"A":"1"}}]}"#,
    )
    .unwrap();
    let explicit = PodmanV0Score::from_json(
        br#"{"services":[{"name":"web","image":"localhost/web:1","env":{"A":"1"},"args":[],"volumes":[],"ports":[]}],
             "init_containers":[],"lifecycle":null}"#,
    )
    .unwrap();
    assert_eq!(legacy, explicit);
    assert!(legacy.init_containers.is_empty());
    assert!(legacy.lifecycle.is_none());
    // Re-encoding a legacy score writes no new fields but the empty list.
    insta::assert_json_snapshot!("score_legacy_reencoded", legacy);
}

#[test]
fn deployment_state_json_is_stable() {
    let running = running_state();
    round_trip(&running);
    insta::assert_json_snapshot!("state_running", running);
    let failed = DeploymentState {
        phase: Phase::Failed,
        revision: Revision::new(8),
        container_ids: running.container_ids.clone(),
        message: "init container \"migrate\" exited with code 3".into(),
        cause: Some(FailureCause::InitContainerExited {
            name: "migrate".into(),
            exit_code: 3,
        }),
        attempt: 3,
        restarts: BTreeMap::new(),
        image_digests: BTreeMap::new(),
        exit_codes: BTreeMap::new(),
        verified: BTreeMap::new(),
        summarised: false,
    };
    round_trip(&failed);
    insta::assert_json_snapshot!("state_failed", failed);
    // A per_run revision that ran to completion, and a no_launch one whose
    // container was found stopped.
    let succeeded = DeploymentState {
        phase: Phase::Succeeded,
        message: "2 services ran to completion".into(),
        cause: None,
        container_ids: BTreeMap::new(),
        exit_codes: BTreeMap::from([("web".into(), 0), ("worker".into(), 0)]),
        ..failed.clone()
    };
    round_trip(&succeeded);
    insta::assert_json_snapshot!("state_succeeded", succeeded);
    let verified = DeploymentState {
        phase: Phase::Failed,
        message: "service \"web\": container \"nginx\" is stopped: exited with code 0".into(),
        cause: Some(FailureCause::Unverified {
            service: "web".into(),
            container: "nginx".into(),
            status: VerifiedStatus::Stopped,
            evidence: "exited with code 0".into(),
        }),
        container_ids: BTreeMap::new(),
        verified: BTreeMap::from([(
            "web".into(),
            Verification {
                container: "nginx".into(),
                status: VerifiedStatus::Stopped,
                evidence: "exited with code 0".into(),
            },
        )]),
        ..failed.clone()
    };
    round_trip(&verified);
    insta::assert_json_snapshot!("state_verified", verified);
    let pending: DeploymentState =
        serde_json::from_str(r#"{"phase":"pending","revision":1}"#).unwrap();
    assert!(pending.container_ids.is_empty() && pending.cause.is_none() && pending.attempt == 0);
}

#[test]
fn every_failure_cause_is_stable() {
    let causes = failure_causes();
    for cause in &causes {
        round_trip(cause);
    }
    insta::assert_json_snapshot!("failure_causes", causes);
}

#[test]
fn heartbeat_json_is_stable() {
    // Without device facts a heartbeat is what it was before they existed.
    let ok = Heartbeat {
        device_id: device(),
        agent_version: "0.1.0".into(),
        uptime_s: 3600,
        deployments: 2,
        runtime: RuntimeHealth::Ok,
        arch: String::new(),
        os: String::new(),
        kernel: String::new(),
        runtime_version: None,
        score_features: Vec::new(),
    };
    let down = Heartbeat {
        runtime: RuntimeHealth::Unreachable {
            error: "connection refused: /run/podman/podman.sock".into(),
        },
        ..ok.clone()
    };
    round_trip(&ok);
    round_trip(&down);
    insta::assert_json_snapshot!("heartbeats", [ok, down]);
    let oldest: Heartbeat =
        serde_json::from_str(r#"{"device_id":"rpi-01","agent_version":"0.0.1","uptime_s":5}"#)
            .unwrap();
    assert_eq!(oldest.runtime, RuntimeHealth::Ok);
    assert!(serde_json::from_str::<Heartbeat>(
        r#"{"device_id":"RPI","agent_version":"x","uptime_s":1}"#
    )
    .is_err());
}

fn full_heartbeat() -> Heartbeat {
    Heartbeat {
        device_id: device(),
        agent_version: "0.2.0".into(),
        uptime_s: 3600,
        deployments: 2,
        runtime: RuntimeHealth::Ok,
        arch: "aarch64".into(),
        os: "Debian GNU/Linux 12 (bookworm)".into(),
        kernel: "6.1.0-rpi7-rpi-v8".into(),
        runtime_version: Some("4.3.1".into()),
        score_features: podfleet_core::wire::SCORE_FEATURES
            .iter()
            .map(|f| (*f).to_owned())
            .collect(),
    }
}

#[test]
fn a_full_heartbeat_round_trips() {
    let full = full_heartbeat();
    round_trip(&full);
    insta::assert_json_snapshot!("heartbeat_full", full);
    let json: serde_json::Value = serde_json::to_value(&full).unwrap();
    assert_eq!(json["arch"], "aarch64");
    assert_eq!(json["os"], "Debian GNU/Linux 12 (bookworm)");
    assert_eq!(json["kernel"], "6.1.0-rpi7-rpi-v8");
    assert_eq!(json["runtime_version"], "4.3.1");
}

#[test]
fn a_heartbeat_without_device_facts_parses() {
    // What every agent before the facts wrote.
    let older = r#"{"device_id":"rpi-01","agent_version":"0.1.0","uptime_s":3600,"deployments":2,"runtime":{"status":"ok"}}"#;
    let heartbeat: Heartbeat = serde_json::from_str(older).unwrap();
    assert_eq!(
        heartbeat,
        Heartbeat {
            agent_version: "0.1.0".into(),
            arch: String::new(),
            os: String::new(),
            kernel: String::new(),
            runtime_version: None,
            score_features: Vec::new(),
            ..full_heartbeat()
        }
    );
    // Unknown facts are left out, so an older reader sees what it always did.
    assert_eq!(serde_json::to_string(&heartbeat).unwrap(), older);
    // Facts known but the runtime's version not yet.
    let starting: Heartbeat = serde_json::from_str(
        r#"{"device_id":"rpi-01","agent_version":"0.2.0","uptime_s":0,"arch":"x86_64","os":"linux","kernel":""}"#,
    )
    .unwrap();
    assert_eq!(
        (
            starting.arch.as_str(),
            starting.os.as_str(),
            starting.kernel.as_str()
        ),
        ("x86_64", "linux", "")
    );
    assert_eq!(starting.runtime_version, None);
}

#[test]
fn command_protocol_json_is_stable() {
    let ping = CommandReply::Ok(PingReply {
        device_id: device(),
        agent_version: "0.1.0".into(),
        uptime_s: 12,
    });
    round_trip(&ping);
    insta::assert_json_snapshot!("reply_ping", ping);

    let logs_req: LogsRequest =
        serde_json::from_str(r#"{"deployment":"shop","service":"web"}"#).unwrap();
    assert_eq!(logs_req.tail_lines, 100, "default tail");
    round_trip(&logs_req);
    insta::assert_json_snapshot!("request_logs", logs_req);
    let logs = CommandReply::Ok(LogsReply {
        container_id: "4f1c".into(),
        text: "listening on :8080\n".into(),
        truncated: false,
    });
    round_trip(&logs);
    insta::assert_json_snapshot!("reply_logs", logs);

    let exec_req = ExecRequest {
        deployment: deployment(),
        service: "web".into(),
        argv: vec!["cat".into(), "/etc/hostname".into()],
        timeout_secs: 5,
    };
    round_trip(&exec_req);
    insta::assert_json_snapshot!("request_exec", exec_req);
    let defaulted: ExecRequest =
        serde_json::from_str(r#"{"deployment":"shop","service":"web","argv":["true"]}"#).unwrap();
    assert_eq!(defaulted.timeout_secs, 10);
    let exec = CommandReply::Ok(ExecReply {
        exit_code: Some(0),
        stdout: "rpi-01\n".into(),
        stderr: String::new(),
        truncated: false,
        timed_out: false,
    });
    round_trip(&exec);
    insta::assert_json_snapshot!("reply_exec", exec);

    let error: CommandReply<PingReply> = CommandReply::Error(CommandError::new(
        ErrorCode::ExecDisabled,
        "exec is disabled on rpi-01",
    ));
    round_trip(&error);
    insta::assert_json_snapshot!("reply_error", error);
}

#[test]
fn checked_in_json_schema_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/score.schema.json");
    let current = score_json_schema();
    if std::env::var_os("PODFLEET_BLESS").is_some() {
        std::fs::write(path, &current).unwrap();
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == current,
        "docs/score.schema.json is stale: run `PODFLEET_BLESS=1 cargo test -p podfleet-core --test wire` and commit it"
    );
}

#[test]
fn schema_describes_the_defaults() {
    let schema: serde_json::Value = serde_json::from_str(&score_json_schema()).unwrap();
    let text = schema.to_string();
    assert!(
        text.contains("\"default\":300"),
        "init timeout default in schema"
    );
    assert!(text.contains("SIGTERM"));
    assert_eq!(schema["required"], serde_json::json!(["services"]));
}
