#![allow(clippy::unwrap_used)]
//! The shipped nats-server configuration (deploy/nats/podfleet.conf), run
//! as it is, with real async-nats clients holding each role's credentials:
//!
//! - device rpi-01's agent works with its own credentials, and those
//!   credentials are refused on device rpi-02's keys and subjects and on
//!   the control plane's buckets;
//! - the controller can make, watch, read and write what the control plane
//!   needs, and cannot write deployments or device records or command a
//!   device;
//! - the admin can manage deployments and device records, read every
//!   bucket and command devices, and nothing outside podfleet's subjects.
//!
//! A refusal is checked where nats-server reports it: the `Permissions
//! Violation` errors the client receives, collected from its event
//! callback. Each role's test asserts the exact set of refusals, so an
//! operation that is meant to work and was refused fails the test too.

use std::collections::BTreeSet;
use std::fmt::Display;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::push::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::kv::{self, Operation};
use async_nats::jetstream::{self, ContextBuilder};
use async_nats::{ConnectOptions, Event, RequestErrorKind};
use e2e::agent::{tokio_runtime, Broker, Device};
use e2e::{eventually, unique_prefix, NatsServer, TEST_IMAGE};
use futures_util::future::{join_all, LocalBoxFuture};
use futures_util::{StreamExt, TryFutureExt, TryStreamExt};
use podfleet_agent::buckets::{ensure_bucket, BucketSettings, Ensured};
use podfleet_core::wire::names::{
    DEPLOYMENTS_BUCKET, DESIRED_BUCKET, DEVICES_BUCKET, HEARTBEAT_BUCKET, STATE_BUCKET,
    STATUS_BUCKET,
};
use podfleet_core::wire::Phase;
use serde_json::json;

const AGENT: &str = env!("CARGO_BIN_EXE_podfleet-agent-e2e");
const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nats/podfleet.conf");
const SETTLE: Duration = Duration::from_secs(45);
/// How long a request or a publish ack is waited for. A refused one is
/// dropped by the server, so each refusal costs this long.
const REFUSAL_WAIT: Duration = Duration::from_secs(2);
/// How long a watch may take to deliver an entry that is there.
const DELIVERY: Duration = Duration::from_secs(10);

/// Every bucket podfleet has: the agent's three and the control plane's three.
const BUCKETS: [&str; 6] = [
    DESIRED_BUCKET,
    STATE_BUCKET,
    HEARTBEAT_BUCKET,
    DEPLOYMENTS_BUCKET,
    DEVICES_BUCKET,
    STATUS_BUCKET,
];

fn device_login(device: &str) -> ConnectOptions {
    ConnectOptions::with_user_and_password(device.to_owned(), format!("change-me-{device}"))
        .custom_inbox_prefix(format!("_INBOX.{device}"))
        .request_timeout(Some(REFUSAL_WAIT))
}

/// A client of one user whose refusals are collected: the text after
/// `Permissions Violation for ` of each server error (`Publish to "<subject>"`,
/// `Subscription to "<subject>"`), or the whole error if it is not one.
struct Spy {
    client: async_nats::Client,
    js: jetstream::Context,
    refusals: Arc<Mutex<Vec<String>>>,
}

impl Spy {
    async fn connect(nats: &NatsServer, options: ConnectOptions) -> Self {
        let refusals = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen = refusals.clone();
        let client = options
            .event_callback(move |event| {
                let seen = seen.clone();
                async move {
                    if let Event::ServerError(error) = event {
                        let text = error.to_string();
                        let refusal = text
                            .split_once("Permissions Violation for ")
                            .map_or(text.as_str(), |(_, what)| what);
                        seen.lock().unwrap().push(refusal.to_owned());
                    }
                }
            })
            .connect(nats.url())
            .await
            .unwrap();
        let js = ContextBuilder::new()
            .timeout(REFUSAL_WAIT)
            .build(client.clone());
        Self {
            client,
            js,
            refusals,
        }
    }

    /// Logs in as the controller or the admin, with the inbox prefix the
    /// configuration gives that user.
    async fn login(nats: &NatsServer, user: &str, password: &str) -> Self {
        let options = ConnectOptions::with_user_and_password(user.into(), password.into())
            .custom_inbox_prefix(format!("_INBOX.{user}"))
            .request_timeout(Some(REFUSAL_WAIT));
        Self::connect(nats, options).await
    }

    fn refused(&self) -> BTreeSet<String> {
        self.refusals.lock().unwrap().iter().cloned().collect()
    }

    /// Waits for the server to have refused everything in `expected`, then
    /// checks it refused nothing else.
    async fn assert_refused_exactly(&self, expected: impl IntoIterator<Item = String>) {
        self.client.flush().await.unwrap();
        let expected: BTreeSet<String> = expected.into_iter().collect();
        eventually!("the expected permissions violations", DELIVERY, {
            expected.is_subset(&self.refused()).then_some(())
        });
        assert_eq!(self.refused(), expected, "refused vs expected");
    }

    /// Reads `entry` back every way async-nats can, and checks the consumer
    /// API a watch may use besides creating it:
    /// - single keys: by key (`DIRECT.GET.<stream>.<subject>`), by revision
    ///   (`DIRECT.GET.<stream>`) and from the stream leader
    ///   (`STREAM.MSG.GET.<stream>`, what a bucket without direct get uses);
    /// - a named consumer with its filter in the subject (how an ordered
    ///   consumer recreates itself), its info and its deletion;
    /// - a flow-control answer. The server asks for one only under
    ///   backpressure, so this proves the permission, not the exchange.
    async fn reads(&self, bucket: &str, store: &kv::Store, entry: &kv::Entry) {
        let (key, value) = (entry.key.as_str(), entry.value.as_ref());
        let got = store.get(key).await.unwrap();
        assert_eq!(got.as_deref(), Some(value), "{bucket}");
        let by_revision = store.entry_for_revision(key, entry.revision).await.unwrap();
        assert_eq!(
            by_revision.map(|e| e.value).as_deref(),
            Some(value),
            "{bucket}"
        );
        let stream_name = format!("KV_{bucket}");
        let stream = self.js.get_stream(&stream_name).await.unwrap();
        let raw = stream
            .get_last_raw_message_by_subject(&format!("$KV.{bucket}.{key}"))
            .await
            .unwrap();
        assert_eq!(&raw.payload[..], value, "{bucket}");

        let probe = OrderedConfig {
            deliver_subject: self.client.new_inbox(),
            name: Some("probe".to_owned()),
            filter_subject: format!("$KV.{bucket}.>"),
            ..OrderedConfig::default()
        };
        let created = self.js.create_consumer_on_stream(probe, &stream_name).await;
        assert_eq!(created.unwrap().cached_info().num_pending, 1, "{bucket}");
        let info = stream.consumer_info("probe").await.unwrap();
        assert_eq!(info.name, "probe");
        assert!(
            stream.delete_consumer("probe").await.unwrap().success,
            "{bucket}"
        );
        let fc = format!("$JS.FC.{stream_name}.probe.1");
        self.client.publish(fc, "".into()).await.unwrap();
    }

    /// The six buckets, in the order of [`BUCKETS`].
    async fn stores(&self) -> [kv::Store; 6] {
        let mut stores = Vec::new();
        for bucket in BUCKETS {
            let store = self.js.get_key_value(bucket).await;
            stores.push(store.unwrap_or_else(|e| panic!("cannot open {bucket}: {e}")));
        }
        stores
            .try_into()
            .unwrap_or_else(|_| unreachable!("one store per bucket"))
    }
}

fn publish_to(subject: &str) -> String {
    format!("Publish to {subject:?}")
}

fn subscription_to(subject: &str) -> String {
    format!("Subscription to {subject:?}")
}

/// The break-glass user, seeding what the role under test reads.
async fn operator(nats: &NatsServer) -> async_nats::Client {
    ConnectOptions::with_user_and_password("podfleet-operator".into(), "change-me-operator".into())
        .connect(nats.url())
        .await
        .unwrap()
}

/// Creates the six buckets as the operator and puts `(bucket, key, value)`.
async fn seed(nats: &NatsServer, entries: &[(&str, &str, &str)]) -> async_nats::Client {
    let client = operator(nats).await;
    for bucket in BUCKETS {
        ensure_bucket(&client, &BucketSettings::new(bucket), DELIVERY)
            .await
            .unwrap();
    }
    let js = jetstream::new(client.clone());
    for (bucket, key, value) in entries {
        let store = js.get_key_value(*bucket).await.unwrap();
        store.put(*key, value.to_string().into()).await.unwrap();
    }
    client
}

/// The newest value of `key` in `bucket`, read as the operator.
async fn peek(operator: &async_nats::Client, bucket: &str, key: &str) -> Option<String> {
    let store = jetstream::new(operator.clone())
        .get_key_value(bucket)
        .await
        .unwrap();
    let value = store.get(key).await.unwrap()?;
    Some(String::from_utf8(value.to_vec()).unwrap())
}

/// The next entry of `watch`, which must come within [`DELIVERY`].
async fn next_entry(watch: &mut kv::Watch, bucket: &str) -> kv::Entry {
    tokio::time::timeout(DELIVERY, watch.next())
        .await
        .unwrap_or_else(|_| panic!("the watch of {bucket} delivered nothing in {DELIVERY:?}"))
        .unwrap_or_else(|| panic!("the watch of {bucket} ended"))
        .unwrap_or_else(|e| panic!("the watch of {bucket} failed: {e}"))
}

/// A read attempt, for [`join_all`]: its outcome without the value.
type Attempt<'a> = LocalBoxFuture<'a, Result<(), String>>;

fn attempt<'a, T: 'a, E: Display>(read: impl Future<Output = Result<T, E>> + 'a) -> Attempt<'a> {
    Box::pin(read.map_ok(drop).map_err(|e| e.to_string()))
}

/// The value of `entry`, as text.
fn text(entry: &kv::Entry) -> String {
    String::from_utf8(entry.value.to_vec()).unwrap()
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

#[test]
fn controller_credentials_run_the_control_plane_and_nothing_more() {
    tokio_runtime().block_on(async {
        let nats = NatsServer::start_with_config(CONFIG);
        let controller = Spy::login(&nats, "podfleet-controller", "change-me-controller").await;

        // It makes all six buckets on a fresh server (STREAM.INFO, then
        // STREAM.CREATE), and finds them made the next time.
        for bucket in BUCKETS {
            let settings = BucketSettings::new(bucket);
            let made = ensure_bucket(&controller.client, &settings, REFUSAL_WAIT).await;
            assert_eq!(made.unwrap(), Ensured::Created, "{bucket}");
            let again = ensure_bucket(&controller.client, &settings, REFUSAL_WAIT).await;
            let found = Ensured::Existing {
                differences: Vec::new(),
            };
            assert_eq!(again.unwrap(), found, "{bucket}");
        }
        // What the admin and a device wrote.
        let operator = seed(
            &nats,
            &[
                (DEPLOYMENTS_BUCKET, "web", r#"{"selector":"role=kiosk"}"#),
                (DEVICES_BUCKET, "rpi-01", r#"{"labels":{"role":"kiosk"}}"#),
                (STATE_BUCKET, "rpi-01.gone", r#"{"phase":"running"}"#),
                (HEARTBEAT_BUCKET, "rpi-01", r#"{"seq":1}"#),
            ],
        )
        .await;
        let stores = controller.stores().await;
        let [desired, state, _, deployments, devices, status] = &stores;

        // It watches all six from the newest entry of each key on, and
        // desired state for new changes too.
        let mut watches = Vec::new();
        for (bucket, store) in BUCKETS.iter().zip(&stores) {
            let watch = store.watch_with_history(">").await;
            watches.push(watch.unwrap_or_else(|e| panic!("cannot watch {bucket}: {e}")));
        }
        let mut desired_changes = desired.watch_all().await.unwrap();

        // It writes desired state and status.
        let spec = r#"{"services":[]}"#;
        desired.put("rpi-01.web", spec.into()).await.unwrap();
        status.put("web", r#"{"ready":0}"#.into()).await.unwrap();

        let newest = [
            ("rpi-01.web", spec),
            ("rpi-01.gone", r#"{"phase":"running"}"#),
            ("rpi-01", r#"{"seq":1}"#),
            ("web", r#"{"selector":"role=kiosk"}"#),
            ("rpi-01", r#"{"labels":{"role":"kiosk"}}"#),
            ("web", r#"{"ready":0}"#),
        ];
        for (((bucket, store), watch), (key, value)) in
            BUCKETS.iter().zip(&stores).zip(&mut watches).zip(newest)
        {
            let entry = next_entry(watch, bucket).await;
            assert_eq!(
                (entry.key.as_str(), text(&entry).as_str()),
                (key, value),
                "{bucket}"
            );
            controller.reads(bucket, store, &entry).await;
        }
        let keys: Vec<String> = state.keys().await.unwrap().try_collect().await.unwrap();
        assert_eq!(keys, ["rpi-01.gone"]);

        // It deletes desired state and status, and orphaned state.
        desired.delete("rpi-01.web").await.unwrap();
        status.delete("web").await.unwrap();
        state.delete("rpi-01.gone").await.unwrap();
        assert_eq!(desired.get("rpi-01.web").await.unwrap(), None);
        assert_eq!(status.get("web").await.unwrap(), None);
        assert_eq!(peek(&operator, STATE_BUCKET, "rpi-01.gone").await, None);
        let put = next_entry(&mut desired_changes, DESIRED_BUCKET).await;
        let deleted = next_entry(&mut desired_changes, DESIRED_BUCKET).await;
        assert_eq!(
            [(put.key, put.operation), (deleted.key, deleted.operation)],
            [
                ("rpi-01.web".to_owned(), Operation::Put),
                ("rpi-01.web".to_owned(), Operation::Delete)
            ]
        );

        // It may not write deployments or device records, nor command a device.
        let (new_deployment, changed_deployment, new_device) = tokio::join!(
            deployments.put("api", "{}".into()),
            deployments.delete("web"),
            devices.put("rpi-02", "{}".into()),
        );
        assert!(new_deployment.is_err(), "a deployment was written");
        assert!(changed_deployment.is_err(), "a deployment was deleted");
        assert!(new_device.is_err(), "a device record was written");
        let ping = "device-commands.rpi-01.ping";
        controller.client.publish(ping, "".into()).await.unwrap();
        controller
            .assert_refused_exactly([
                publish_to("$KV.podfleet-deployments.api"),
                publish_to("$KV.podfleet-deployments.web"),
                publish_to("$KV.podfleet-devices.rpi-02"),
                publish_to(ping),
            ])
            .await;
        assert_eq!(peek(&operator, DEPLOYMENTS_BUCKET, "api").await, None);
        assert_eq!(
            peek(&operator, DEPLOYMENTS_BUCKET, "web").await.as_deref(),
            Some(r#"{"selector":"role=kiosk"}"#)
        );
        assert_eq!(peek(&operator, DEVICES_BUCKET, "rpi-02").await, None);
    });
}

#[test]
fn admin_credentials_manage_the_fleet_within_podfleets_subjects() {
    tokio_runtime().block_on(async {
        let nats = NatsServer::start_with_config(CONFIG);
        let admin = Spy::login(&nats, "podfleet-admin", "change-me-admin").await;

        // It may make the buckets.
        for bucket in BUCKETS {
            let settings = BucketSettings::new(bucket);
            let made = ensure_bucket(&admin.client, &settings, REFUSAL_WAIT).await;
            assert_eq!(made.unwrap(), Ensured::Created, "{bucket}");
        }
        // What the controller and a device wrote.
        let operator = seed(
            &nats,
            &[
                (DESIRED_BUCKET, "rpi-01.web", r#"{"services":[]}"#),
                (STATE_BUCKET, "rpi-01.web", r#"{"phase":"running"}"#),
                (HEARTBEAT_BUCKET, "rpi-01", r#"{"seq":1}"#),
                (STATUS_BUCKET, "web", r#"{"ready":1}"#),
            ],
        )
        .await;
        let stores = admin.stores().await;
        let [desired, _, _, deployments, devices, status] = &stores;

        // It writes deployments and device records...
        let deployment = r#"{"selector":"role=kiosk"}"#;
        let device = r#"{"labels":{"role":"kiosk"}}"#;
        deployments.put("web", deployment.into()).await.unwrap();
        devices.put("rpi-01", device.into()).await.unwrap();
        assert_eq!(
            peek(&operator, DEPLOYMENTS_BUCKET, "web").await.as_deref(),
            Some(deployment)
        );
        assert_eq!(
            peek(&operator, DEVICES_BUCKET, "rpi-01").await.as_deref(),
            Some(device)
        );

        // ...and reads every bucket: watches and single keys.
        let newest = [
            ("rpi-01.web", r#"{"services":[]}"#),
            ("rpi-01.web", r#"{"phase":"running"}"#),
            ("rpi-01", r#"{"seq":1}"#),
            ("web", deployment),
            ("rpi-01", device),
            ("web", r#"{"ready":1}"#),
        ];
        for ((bucket, store), (key, value)) in BUCKETS.iter().zip(&stores).zip(newest) {
            let mut watch = store.watch_with_history(">").await.unwrap();
            let entry = next_entry(&mut watch, bucket).await;
            assert_eq!(
                (entry.key.as_str(), text(&entry).as_str()),
                (key, value),
                "{bucket}"
            );
            admin.reads(bucket, store, &entry).await;
        }
        let keys: Vec<String> = desired.keys().await.unwrap().try_collect().await.unwrap();
        assert_eq!(keys, ["rpi-01.web"]);

        // It deletes deployments and device records.
        deployments.delete("web").await.unwrap();
        devices.delete("rpi-01").await.unwrap();
        assert_eq!(deployments.get("web").await.unwrap(), None);
        assert_eq!(devices.get("rpi-01").await.unwrap(), None);

        // It commands a device; a stand-in for rpi-01's agent answers.
        let agent = device_login("rpi-01").connect(nats.url()).await.unwrap();
        let mut commands = agent.subscribe("device-commands.rpi-01.*").await.unwrap();
        let answering = tokio::spawn(async move {
            let command = commands.next().await?;
            let answered = agent.publish(command.reply?, r#"{"ok":"pong"}"#.into());
            answered.await.ok()?;
            agent.flush().await.ok()?;
            Some(command.subject.to_string())
        });
        let ping = "device-commands.rpi-01.ping";
        // The stand-in's subscription may reach the server after the
        // request (a flush is no round trip): no responders until it does.
        let reply = eventually!("rpi-01's stand-in to answer", DELIVERY, {
            match admin.client.request(ping, "".into()).await {
                Err(e) if e.kind() == RequestErrorKind::NoResponders => None,
                answered => Some(answered),
            }
        });
        assert_eq!(&reply.unwrap().payload[..], br#"{"ok":"pong"}"#);
        assert_eq!(answering.await.unwrap().as_deref(), Some(ping));

        // Nothing outside podfleet's subjects; no desired state or status
        // (the controller's); no commands or inboxes of devices to listen to.
        admin.client.publish("foo.bar", "".into()).await.unwrap();
        let (new_desired, new_status) = tokio::join!(
            desired.put("rpi-01.web", "{}".into()),
            status.put("web", "{}".into()),
        );
        assert!(new_desired.is_err(), "desired state was written");
        assert!(new_status.is_err(), "a status was written");
        let mut refused_subscriptions = Vec::new();
        for subject in ["device-commands.>", "_INBOX.rpi-01.>"] {
            refused_subscriptions.push(admin.client.subscribe(subject).await.unwrap());
        }
        admin
            .assert_refused_exactly([
                publish_to("foo.bar"),
                publish_to("$KV.podfleet-desired.rpi-01.web"),
                publish_to("$KV.podfleet-status.web"),
                subscription_to("device-commands.>"),
                subscription_to("_INBOX.rpi-01.>"),
            ])
            .await;
        assert_eq!(
            peek(&operator, DESIRED_BUCKET, "rpi-01.web")
                .await
                .as_deref(),
            Some(r#"{"services":[]}"#)
        );
        assert_eq!(
            peek(&operator, STATUS_BUCKET, "web").await.as_deref(),
            Some(r#"{"ready":1}"#)
        );
    });
}

#[test]
fn device_credentials_cannot_read_the_control_planes_buckets() {
    tokio_runtime().block_on(async {
        let nats = NatsServer::start_with_config(CONFIG);
        let control_plane = [
            (DEPLOYMENTS_BUCKET, "web"),
            (DEVICES_BUCKET, "rpi-01"),
            (STATUS_BUCKET, "web"),
        ];
        let seeded: Vec<_> = control_plane.iter().map(|&(b, k)| (b, k, "{}")).collect();
        let _operator = seed(&nats, &seeded).await;
        let device = Spy::connect(&nats, device_login("rpi-01")).await;

        // Every way async-nats reads or watches a bucket, on each of the
        // three, even rpi-01's own device record.
        let mut attempts = Vec::new();
        let mut expected = Vec::new();
        let mut refused_subscriptions = Vec::new();
        for (bucket, key) in control_plane {
            let stream = format!("KV_{bucket}");
            let subject = format!("$KV.{bucket}.{key}");
            let filter = format!("$KV.{bucket}.>");
            let watch = |name: Option<&str>| OrderedConfig {
                deliver_subject: device.client.new_inbox(),
                name: name.map(str::to_owned),
                filter_subject: filter.clone(),
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..OrderedConfig::default()
            };
            let request = |subject: &str, body: String| {
                let (client, subject) = (device.client.clone(), subject.to_owned());
                async move { client.request(subject, body.into()).await }
            };
            let direct_get = format!("$JS.API.DIRECT.GET.{stream}");
            let msg_get = format!("$JS.API.STREAM.MSG.GET.{stream}");
            let last = json!({ "last_by_subj": subject }).to_string();
            let tries = [
                (
                    format!("$JS.API.STREAM.INFO.{stream}"),
                    attempt(device.js.get_key_value(bucket)),
                ),
                (
                    format!("{direct_get}.{subject}"),
                    attempt(request(&format!("{direct_get}.{subject}"), String::new())),
                ),
                (
                    direct_get.clone(),
                    attempt(request(&direct_get, r#"{"seq":1}"#.into())),
                ),
                (msg_get.clone(), attempt(request(&msg_get, last))),
                (
                    format!("$JS.API.CONSUMER.CREATE.{stream}"),
                    attempt(device.js.create_consumer_on_stream(watch(None), stream.clone())),
                ),
                (
                    format!("$JS.API.CONSUMER.CREATE.{stream}.spy.{filter}"),
                    attempt(device.js.create_consumer_on_stream(watch(Some("spy")), stream.clone())),
                ),
            ];
            for (subject, attempt) in tries {
                expected.push(publish_to(&subject));
                attempts.push(async move { (subject, attempt.await) });
            }
            refused_subscriptions.push(device.client.subscribe(filter.clone()).await.unwrap());
            expected.push(subscription_to(&filter));

            // The device's own watch subject, with this bucket's stream and
            // filter in the body: the server goes by the subject's stream
            // and refuses the mismatch.
            let smuggled = json!({
                "stream_name": stream,
                "config": {"name": "smuggle", "deliver_subject": device.client.new_inbox(), "filter_subject": filter,
                           "deliver_policy": "last_per_subject", "ack_policy": "none", "flow_control": true, "idle_heartbeat": 5_000_000_000_u64},
            });
            let answer = device
                .client
                .request(
                    "$JS.API.CONSUMER.CREATE.KV_podfleet-desired.smuggle.$KV.podfleet-desired.rpi-01.*",
                    smuggled.to_string().into(),
                )
                .await
                .unwrap();
            let answer: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
            // 10056: "stream name in subject does not match request".
            assert_eq!(
                answer["error"]["err_code"],
                json!(10056),
                "{bucket} was watched through rpi-01's own subject: {answer}"
            );
        }
        for (subject, result) in join_all(attempts).await {
            assert!(result.is_err(), "{subject} went through");
        }
        device.assert_refused_exactly(expected).await;
    });
}
