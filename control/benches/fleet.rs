//! The control plane at 10,000 devices, against a real nats-server.
//!
//! `cargo bench -p podfleet-control --bench fleet`. A plain timing loop (no
//! harness crate), 3 interleaved rounds, medians, each figure next to its
//! baseline measured in the same run:
//! - **fan-out**: one `FleetDeployment` whose selector picks 10,000
//!   labelled devices, from the moment `put_deployment` is called until the
//!   desired bucket holds the 10,000 new values, with `podfleet
//!   controller`'s loop (`run::run_controller`) running; against 10,000 raw
//!   pipelined KV puts of the same payload (up to 512 unacknowledged, as
//!   the controller allows itself) into a fresh bucket. Aim: ≤ 2×.
//! - **`podfleet get devices`** with 10,000 device records and heartbeats
//!   present: the release CLI binary as a child process, output to a pipe;
//!   against reading the heartbeat bucket alone with one ordered consumer
//!   in this process. Aim: ≤ 1 s.
//!
//! Needs nats-server (Debian's `nats-server`), started here on a free port.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::push::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use e2e::NatsServer;
use futures_util::StreamExt;
use podfleet_agent::buckets::{ensure_bucket, BucketSettings};
use podfleet_control::client::{BucketPlan, FleetClient};
use podfleet_control::context::Connection;
use podfleet_control::run::{run_controller, ControllerOptions};
use podfleet_core::fleet::{FleetDeployment, API_VERSION, FLEET_DEPLOYMENT_KIND};
use podfleet_core::wire::names::{DESIRED_BUCKET, DEVICES_BUCKET, HEARTBEAT_BUCKET};
use serde_json::json;

const DEVICES: usize = 10_000;
const ROUNDS: usize = 3;
const IN_FLIGHT: usize = 512;

fn manifest(name: &str, image: &str) -> FleetDeployment {
    let value = json!({
        "apiVersion": API_VERSION,
        "kind": FLEET_DEPLOYMENT_KIND,
        "metadata": {"name": name},
        "spec": {"target": {"selector": "site=lyon"}, "score": {"services": [
            {"name": "web", "image": image, "env": {"MODE": "edge"}},
            {"name": "worker", "image": "localhost/worker:3"}]}},
    });
    FleetDeployment::from_value(value).expect("a valid manifest")
}

async fn messages(js: &async_nats::jetstream::Context, bucket: &str) -> u64 {
    let mut stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .expect("the stream");
    stream.info().await.expect("stream info").state.messages
}

/// The stream's last sequence: grows by one per put, whatever the history.
async fn last_sequence(js: &async_nats::jetstream::Context, bucket: &str) -> u64 {
    let mut stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .expect("the stream");
    stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence
}

async fn wait_for(js: &async_nats::jetstream::Context, bucket: &str, sequence: u64) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while last_sequence(js, bucket).await < sequence {
        assert!(
            Instant::now() < deadline,
            "{bucket} never reached sequence {sequence}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn podfleet_binary() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "-p",
            "podfleet-control",
            "--bin",
            "podfleet",
        ])
        .current_dir(&root)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the podfleet binary failed");
    root.join("target/release/podfleet")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let binary = podfleet_binary();
    let server = NatsServer::start();
    let connection = Connection::new(vec![server.url()]);
    let client = FleetClient::connect(&connection, &BucketPlan::default(), Duration::from_secs(10))
        .await
        .expect("connected");
    let js = async_nats::jetstream::new(client.nats().clone());

    // 10,000 labelled devices with a heartbeat each.
    let mut setup = Vec::new();
    for n in 0..DEVICES {
        let device = format!("rpi-{n:05}");
        setup.push((
            format!("$KV.{DEVICES_BUCKET}.{device}"),
            br#"{"labels":{"site":"lyon"}}"#.to_vec(),
        ));
        let heartbeat = json!({"device_id": device, "agent_version": "0.1.0", "uptime_s": 60,
            "arch": "aarch64", "os": "Debian GNU/Linux 12 (bookworm)"});
        setup.push((
            format!("$KV.{HEARTBEAT_BUCKET}.{device}"),
            heartbeat.to_string().into_bytes(),
        ));
    }
    e2e::pipelined_puts(&js, setup, IN_FLIGHT).await;
    assert_eq!(messages(&js, HEARTBEAT_BUCKET).await, DEVICES as u64);

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(run_controller(
        connection.clone(),
        BucketPlan::default(),
        ControllerOptions::default(),
        async {
            let _ = stopped.await;
        },
    ));
    // Let it read the 20,000 entries and sync before the first apply.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let mut fleet = Vec::new();
    let mut raw = Vec::new();
    for round in 0..ROUNDS {
        // Baseline: the same 10,000 payloads, raw, into a bucket of their own.
        let bucket = format!("bench-raw-{round}");
        ensure_bucket(
            client.nats(),
            &BucketSettings::new(&bucket),
            Duration::from_secs(10),
        )
        .await
        .expect("a bucket");
        let payload = manifest("web", &format!("localhost/web:{round}"))
            .spec
            .score
            .to_json();
        let items: Vec<(String, Vec<u8>)> = (0..DEVICES)
            .map(|n| (format!("$KV.{bucket}.rpi-{n:05}.web"), payload.clone()))
            .collect();
        let started = Instant::now();
        e2e::pipelined_puts(&js, items, IN_FLIGHT).await;
        raw.push(started.elapsed());

        // The controller: one apply, a new image each round.
        let before = last_sequence(&js, DESIRED_BUCKET).await;
        let started = Instant::now();
        client
            .put_deployment(&manifest("web", &format!("localhost/web:{round}")))
            .await
            .expect("applied");
        wait_for(&js, DESIRED_BUCKET, before + DEVICES as u64).await;
        fleet.push(started.elapsed());
    }
    let (fleet_median, raw_median) = (median(fleet.clone()), median(raw.clone()));

    let mut get = Vec::new();
    let mut read = Vec::new();
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let output = Command::new(&binary)
            .args(["--server", &server.url(), "get", "devices"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("podfleet runs");
        get.push(started.elapsed());
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let rows = output.stdout.iter().filter(|b| **b == b'\n').count();
        assert_eq!(rows, DEVICES + 1, "a header and one row per device");

        let started = Instant::now();
        let consumer = js
            .get_stream(format!("KV_{HEARTBEAT_BUCKET}"))
            .await
            .expect("the stream")
            .create_consumer(OrderedConfig {
                deliver_subject: client.nats().new_inbox(),
                filter_subject: format!("$KV.{HEARTBEAT_BUCKET}.>"),
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..OrderedConfig::default()
            })
            .await
            .expect("a consumer");
        let mut entries = consumer.messages().await.expect("messages");
        for _ in 0..DEVICES {
            entries.next().await.expect("an entry").expect("a message");
        }
        read.push(started.elapsed());
    }
    let _ = stop.send(());
    let _ = controller.await;

    println!(
        "control plane, {DEVICES} devices, real nats-server, median of {ROUNDS} interleaved rounds:"
    );
    println!(
        "  fan-out: apply -> {DEVICES} desired keys   {fleet_median:>9.1?}  (rounds {fleet:.1?})"
    );
    println!("  raw pipelined puts of the same payloads  {raw_median:>9.1?}  (rounds {raw:.1?})");
    println!(
        "  ratio controller / raw                   {:>9.2}x  (aim <= 2)",
        fleet_median.as_secs_f64() / raw_median.as_secs_f64()
    );
    let (get_median, read_median) = (median(get.clone()), median(read.clone()));
    println!("  `podfleet get devices` (release binary)  {get_median:>9.1?}  (rounds {get:.1?}; aim <= 1 s)");
    println!("  reading the heartbeat bucket alone       {read_median:>9.1?}  (rounds {read:.1?})");
    println!(
        "  ratio get devices / read                 {:>9.2}x",
        get_median.as_secs_f64() / read_median.as_secs_f64()
    );
}
