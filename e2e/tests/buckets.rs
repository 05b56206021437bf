#![allow(clippy::unwrap_used)]
//! podfleet makes its own KV buckets: on a fresh nats-server without any,
//! an agent whose NATS user may create the three streams creates them with
//! the documented settings (docs/operations.md, section 6), leaves one that
//! an admin made with other settings as it is, and deploys.

use std::path::Path;
use std::time::Duration;

use async_nats::ConnectOptions;
use e2e::agent::{tokio_runtime, Broker, Device};
use e2e::{eventually, unique_prefix, NatsServer, TEST_IMAGE};
use podfleet_agent::buckets::{ensure_bucket, BucketSettings, Ensured};
use podfleet_core::wire::Phase;
use serde_json::{json, Value};

const AGENT: &str = env!("CARGO_BIN_EXE_podfleet-agent-e2e");
const SETTLE: Duration = Duration::from_secs(45);
const DEVICE: &str = "boot-01";

/// An admin, and a device user with a device's permissions plus the two
/// stream subjects of each bucket (docs/operations.md, section 6).
fn server_config(dir: &Path) -> std::path::PathBuf {
    let streams: Vec<String> = ["podfleet-desired", "podfleet-state", "podfleet-heartbeats"]
        .iter()
        .flat_map(|bucket| {
            [
                format!("\"$JS.API.STREAM.INFO.KV_{bucket}\""),
                format!("\"$JS.API.STREAM.CREATE.KV_{bucket}\""),
            ]
        })
        .collect();
    let config = format!(
        r#"
jetstream {{}}
authorization {{
  users = [
    {{ user: "admin", password: "admin", permissions: {{ publish: ">", subscribe: ">" }} }}
    {{
      user: "{DEVICE}"
      password: "secret"
      permissions: {{
        publish: {{
          allow: [
            "$JS.API.CONSUMER.CREATE.KV_podfleet-desired.*.$KV.podfleet-desired.{DEVICE}.*"
            "$JS.FC.KV_podfleet-desired.>"
            "$KV.podfleet-state.{DEVICE}.*"
            "$KV.podfleet-heartbeats.{DEVICE}"
            {}
          ]
        }}
        subscribe: {{ allow: ["_INBOX.{DEVICE}.>", "device-commands.{DEVICE}.*"] }}
        allow_responses: true
      }}
    }}
  ]
}}
"#,
        streams.join("\n            ")
    );
    let path = dir.join("nats.conf");
    std::fs::write(&path, config).unwrap();
    path
}

/// The stream configuration nats-server holds for `bucket`, if any.
async fn stream_config(admin: &async_nats::Client, bucket: &str) -> Option<Value> {
    let answer = admin
        .request(format!("$JS.API.STREAM.INFO.KV_{bucket}"), "".into())
        .await
        .unwrap();
    let answer: Value = serde_json::from_slice(&answer.payload).unwrap();
    answer.get("config").cloned()
}

#[test]
fn the_agent_creates_missing_buckets_with_the_documented_settings() {
    tokio_runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let nats = NatsServer::start_with_config(server_config(dir.path()));
        let admin = ConnectOptions::with_user_and_password("admin".into(), "admin".into())
            .connect(nats.url())
            .await
            .unwrap();
        for bucket in ["podfleet-desired", "podfleet-state", "podfleet-heartbeats"] {
            assert_eq!(stream_config(&admin, bucket).await, None, "{bucket}");
        }
        // An admin made the heartbeat bucket already, with more history.
        let made = ensure_bucket(
            &admin,
            &BucketSettings::new("podfleet-heartbeats").history(3),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(made, Ensured::Created);

        let mut device = Device::new(
            Path::new(AGENT),
            DEVICE,
            &nats.url(),
            &["--nats-user", DEVICE, "--nats-password", "secret"],
        );
        device.start_agent();
        let desired = eventually!("the agent to create podfleet-desired", SETTLE, {
            stream_config(&admin, "podfleet-desired").await
        });
        let state = eventually!("the agent to create podfleet-state", SETTLE, {
            stream_config(&admin, "podfleet-state").await
        });
        for (bucket, config, history) in [
            ("podfleet-desired", &desired, 5),
            ("podfleet-state", &state, 1),
        ] {
            let expected = json!({
                "name": format!("KV_{bucket}"),
                "subjects": [format!("$KV.{bucket}.>")],
                "retention": "limits",
                "max_consumers": -1,
                "max_msgs": -1,
                "max_bytes": -1,
                "max_age": 0,
                "max_msgs_per_subject": history,
                "max_msg_size": 1_048_576,
                "storage": "file",
                "discard": "new",
                "num_replicas": 1,
                "duplicate_window": 120_000_000_000_i64,
                "allow_rollup_hdrs": true,
                "deny_delete": true,
                "deny_purge": false,
                "allow_direct": true,
            });
            for (field, value) in expected.as_object().unwrap() {
                assert_eq!(config.get(field), Some(value), "{bucket} {field}: {config}");
            }
        }
        let heartbeats = stream_config(&admin, "podfleet-heartbeats").await.unwrap();
        assert_eq!(
            heartbeats["max_msgs_per_subject"],
            json!(3),
            "left as it was"
        );

        // The device deploys into the buckets it made.
        let broker = Broker::open(admin).await;
        let dep = unique_prefix("boot");
        let score =
            json!({"services": [{"name": "web", "image": TEST_IMAGE, "args": ["sleep", "1000"]}]});
        let rev = broker.put(DEVICE, &dep, score.to_string()).await;
        let reported = broker
            .wait_state(DEVICE, &dep, SETTLE, |s| {
                s.phase == Phase::Running && s.revision == rev
            })
            .await;
        let running: Vec<_> = device
            .containers(&dep)
            .into_iter()
            .filter(|c| c.state == "running")
            .map(|c| c.id)
            .collect();
        assert_eq!(
            running,
            reported.container_ids.values().cloned().collect::<Vec<_>>()
        );
        eventually!("a heartbeat", SETTLE, broker.heartbeat(DEVICE).await);

        let log = device.agent().log();
        assert_eq!(
            log.matches("created the NATS KV bucket").count(),
            2,
            "{log}"
        );
        assert!(
            log.contains("exists with other settings") && log.contains("history is 3 (wanted 1)"),
            "{log}"
        );
        assert!(!log.contains("cannot make sure"), "{log}");
        assert!(!log.contains(" WARN "), "nothing to warn about: {log}");
    });
}
