#![allow(clippy::unwrap_used)]
//! The shipped nats-server configuration (deploy/nats/podfleet.conf), run
//! as it is: device rpi-01's agent works with its own credentials, and
//! those credentials are refused on device rpi-02's keys and subjects.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::push::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::{ConnectOptions, Event};
use e2e::agent::{tokio_runtime, Broker, Device};
use e2e::{eventually, unique_prefix, NatsServer, TEST_IMAGE};
use podfleet_core::wire::Phase;
use serde_json::json;

const AGENT: &str = env!("CARGO_BIN_EXE_podfleet-agent-e2e");
const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nats/podfleet.conf");
const SETTLE: Duration = Duration::from_secs(45);

fn device_login(device: &str) -> ConnectOptions {
    ConnectOptions::with_user_and_password(device.to_owned(), format!("change-me-{device}"))
        .custom_inbox_prefix(format!("_INBOX.{device}"))
        .request_timeout(Some(Duration::from_secs(2)))
}

#[test]
fn device_credentials_reach_only_their_own_keys_and_subjects() {
    tokio_runtime().block_on(async {
        let nats = NatsServer::start_with_config(CONFIG);
        let admin = Broker::connect(
            &nats.url(),
            ConnectOptions::with_user_and_password(
                "podfleet-operator".into(),
                "change-me-operator".into(),
            ),
        )
        .await;
        let stem = unique_prefix("perm");
        let (mine, theirs) = (format!("{stem}-mine"), format!("{stem}-theirs"));
        let score = json!({"services": [{"name": "web", "image": TEST_IMAGE, "args": ["sleep", "1000"]}]});
        admin.put("rpi-02", &theirs, score.to_string()).await;

        // rpi-01's agent runs with rpi-01's credentials only.
        let mut device = Device::new(
            std::path::Path::new(AGENT),
            "rpi-01",
            &nats.url(),
            &["--nats-user", "rpi-01", "--nats-password", "change-me-rpi-01"],
        );
        device.start_agent();
        let rev = admin.put("rpi-01", &mine, score.to_string()).await;
        let state = admin
            .wait_state("rpi-01", &mine, SETTLE, |s| s.phase == Phase::Running && s.revision == rev)
            .await;
        assert_eq!(device.containers(&mine).len(), state.container_ids.len());
        assert!(device.containers(&theirs).is_empty());
        assert!(admin.heartbeat("rpi-01").await.is_some());
        let ping = admin.command("rpi-01", "ping", "").await;
        assert_eq!(ping["ok"]["device_id"], json!("rpi-01"), "{ping}");
        // It may not check or create the buckets: told once, and it carries on.
        let warning = "cannot make sure the NATS KV buckets exist";
        eventually!("the agent's warning about the buckets", SETTLE, {
            device.agent().log().contains(warning).then_some(())
        });
        let log = device.agent().log();
        assert_eq!(log.matches(warning).count(), 1, "{log}");
        assert!(
            log.contains("this user may not publish to $JS.API.STREAM.INFO.KV_podfleet-desired"),
            "{log}"
        );
        assert!(log.contains("$JS.API.STREAM.CREATE.KV_podfleet-state"), "{log}");
        assert!(!log.contains("NATS server error"), "warned once, not per refusal: {log}");
        admin.delete("rpi-01", &mine).await;
        eventually!("rpi-01's teardown to clear its state", SETTLE, {
            admin.state("rpi-01", &mine).await.is_none().then_some(())
        });

        // A client holding rpi-01's credentials, trying rpi-02's things.
        let violations = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen = violations.clone();
        let spy = device_login("rpi-01")
            .event_callback(move |event| {
                let seen = seen.clone();
                async move {
                    if let Event::ServerError(error) = event {
                        seen.lock().unwrap().push(error.to_string());
                    }
                }
            })
            .connect(nats.url())
            .await
            .unwrap();
        let js = async_nats::jetstream::new(spy.clone());
        let watch = |filter: &str, name: Option<&str>| OrderedConfig {
            deliver_subject: spy.new_inbox(),
            name: name.map(str::to_owned),
            filter_subject: filter.to_owned(),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..OrderedConfig::default()
        };
        // The agent's own kind of watch works on its own keys...
        js.create_consumer_on_stream(
            watch("$KV.podfleet-desired.rpi-01.*", Some("own")),
            "KV_podfleet-desired",
        )
        .await
        .unwrap();
        // ...and not on rpi-02's, nor unfiltered, nor by direct get.
        let denied = [
            js.create_consumer_on_stream(
                watch("$KV.podfleet-desired.rpi-02.*", Some("spy")),
                "KV_podfleet-desired",
            )
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
            js.create_consumer_on_stream(
                watch("$KV.podfleet-desired.rpi-02.*", None),
                "KV_podfleet-desired",
            )
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
            spy.request(
                format!("$JS.API.DIRECT.GET.KV_podfleet-desired.$KV.podfleet-desired.rpi-02.{theirs}"),
                "".into(),
            )
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
        ];
        for (i, result) in denied.iter().enumerate() {
            assert!(result.is_err(), "read attempt {i} went through");
        }
        // Own filter in the subject, rpi-02's in the body: the server
        // refuses the mismatch.
        let smuggled = json!({
            "stream_name": "KV_podfleet-desired",
            "config": {"name": "smuggle", "deliver_subject": spy.new_inbox(), "filter_subject": "$KV.podfleet-desired.rpi-02.*",
                       "deliver_policy": "last_per_subject", "ack_policy": "none", "flow_control": true, "idle_heartbeat": 5_000_000_000_u64},
        });
        let answer = spy
            .request(
                "$JS.API.CONSUMER.CREATE.KV_podfleet-desired.smuggle.$KV.podfleet-desired.rpi-01.*",
                smuggled.to_string().into(),
            )
            .await
            .unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
        assert!(answer.get("error").is_some(), "a mismatched filter was accepted: {answer}");

        // Writes to rpi-02's state and heartbeat are refused.
        for subject in [
            format!("$KV.podfleet-state.rpi-02.{theirs}"),
            "$KV.podfleet-heartbeats.rpi-02".to_owned(),
        ] {
            let published = async {
                js.publish(subject.clone(), "{}".into()).await?.await?;
                Ok::<(), async_nats::Error>(())
            };
            assert!(
                published.await.is_err(),
                "publish to {subject} went through"
            );
        }
        assert!(admin.state("rpi-02", &theirs).await.is_none());
        assert!(admin.heartbeat("rpi-02").await.is_none());

        // Subscriptions to rpi-02's commands, its inbox and the raw bucket are refused.
        let subscriptions = [
            "device-commands.rpi-02.*",
            "_INBOX.rpi-02.>",
            "$KV.podfleet-desired.>",
        ];
        for subject in subscriptions {
            let _refused = spy.subscribe(subject).await.unwrap();
        }
        spy.flush().await.unwrap();

        let expected = [
            "Publish to \"$JS.API.CONSUMER.CREATE.KV_podfleet-desired.spy.$KV.podfleet-desired.rpi-02.*\"",
            "Publish to \"$JS.API.CONSUMER.CREATE.KV_podfleet-desired\"",
            "Publish to \"$JS.API.DIRECT.GET.KV_podfleet-desired.",
            "Publish to \"$KV.podfleet-state.rpi-02.",
            "Publish to \"$KV.podfleet-heartbeats.rpi-02\"",
            "Subscription to \"device-commands.rpi-02.*\"",
            "Subscription to \"_INBOX.rpi-02.>\"",
            "Subscription to \"$KV.podfleet-desired.>\"",
        ];
        eventually!("a permissions violation for each attempt", Duration::from_secs(10), {
            let seen = violations.lock().unwrap().join("\n");
            expected.iter().all(|e| seen.contains(e)).then_some(())
        });
        let seen = violations.lock().unwrap().join("\n");
        assert!(seen.contains("Permissions Violation"), "{seen}");
        assert!(!seen.contains("rpi-01.*\""), "nothing of its own was refused: {seen}");
    });
}
