//! `cargo bench -p e2e --bench operator`: the Kubernetes operator at 10,000
//! Devices, against the mocked API server ([`FakeApi`]) and a real
//! nats-server (docs/performance.md). A benchmark, not a test: it asserts
//! only that the work was done, never how long it took, and prints a
//! markdown table of medians, each next to a baseline of the same run.
//!
//! Each round starts a fresh nats-server and fake, creates 10,000 Devices
//! labelled `site=lyon`, runs the operator in a runtime of its own (no
//! lease, no metrics endpoint, Device statuses swept once at start and then
//! hourly, so that they stay out of the figures), waits until it has
//! written those statuses and converged a one-device warm-up
//! FleetDeployment, then takes:
//!
//! 1. **Baselines**: 10,000 raw pipelined KV puts of the desired payload
//!    into a fresh bucket with the desired bucket's settings, at most 512
//!    unacknowledged (the controller's `max_in_flight`), from a client in a
//!    two-worker runtime like the operator's (the baseline of the control
//!    plane's bench too), and from a current-thread client (the cheapest
//!    way to publish, shown for reference).
//! 2. **Fan-out**: from the reconcile start of one FleetDeployment `web`
//!    selecting `site=lyon` (the operator's first request about it, the
//!    finalizer patch, as the fake received it) until the desired bucket's
//!    stream holds the 10,000 `*.web` puts. Aim: ≤ 2× the baseline. Also
//!    from the create call, as a user sees it.
//! 3. **Aggregation**: 10,000 `running` state reports on the keys'
//!    revisions, pipelined, from the first write until the fake shows
//!    `status.running == 10000` with Available True, and the status patches
//!    made meanwhile. Aim: ≤ 2 s, one patch, not 10,000.
//!
//! With `PODFLEET_BENCH_TRACE=1` it prints each round's API requests during
//! the fan-out with their times since the create call.
//!
//! Needs nats-server (Debian's `nats-server`), started here on a free port.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::push::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::Context as JetStream;
use e2e::agent::tokio_runtime;
use e2e::kube_fake::{FakeApi, RunningOperator};
use e2e::NatsServer;
use futures_util::StreamExt;
use kube::api::{Api, PostParams};
use podfleet_agent::buckets::{ensure_bucket, BucketSettings, DESIRED_HISTORY};
use podfleet_core::fleet::{API_VERSION, FLEET_DEPLOYMENT_KIND};
use podfleet_core::wire::names::{DESIRED_BUCKET, HEARTBEAT_BUCKET, STATE_BUCKET};
use podfleet_operator::resources::{Device, DeviceSpec, FleetDeployment, FleetDeploymentSpec};
use podfleet_operator::Options;
use serde_json::{json, Value};

const DEVICES: usize = 10_000;
const ROUNDS: usize = 5;
/// The controller's own bound (`ControllerOptions::max_in_flight`).
const IN_FLIGHT: usize = 512;
/// Device creations in flight while setting up.
const CREATES: usize = 64;
const NS: &str = "podfleet";
const FDS: &str = "/apis/podfleet.io/v1alpha1/namespaces/podfleet/fleetdeployments";
const DEVICE_PATH: &str = "/apis/podfleet.io/v1alpha1/devices";
/// How long any single wait may take before the bench gives up.
const GIVE_UP: Duration = Duration::from_secs(300);
/// How long the bench watches for status patches after the aggregation.
const SETTLE: Duration = Duration::from_secs(2);

fn score() -> Value {
    json!({"services": [
        {"name": "web", "image": "localhost/web:1", "env": {"MODE": "edge"}},
        {"name": "worker", "image": "localhost/worker:3"}]})
}

/// The desired value the controller writes for [`score`]: its canonical JSON.
fn payload() -> Vec<u8> {
    let manifest = json!({
        "apiVersion": API_VERSION,
        "kind": FLEET_DEPLOYMENT_KIND,
        "metadata": {"name": "web"},
        "spec": {"target": {"selector": "site=lyon"}, "score": score()},
    });
    podfleet_core::fleet::FleetDeployment::from_value(manifest)
        .expect("a valid manifest")
        .spec
        .score
        .to_json()
}

fn device_name(n: usize) -> String {
    format!("rpi-{n:05}")
}

/// The operator against `fake`, its first Device sweep at start and the
/// next only after the bench.
fn operator(fake: &FakeApi, nats: &str) -> RunningOperator {
    let mut options = Options::new(NS);
    options.engine.device_status_every = Duration::from_secs(3600);
    RunningOperator::start(fake, "operator", nats, options)
}

/// Times [`pipelined`] puts of `payload` to `<device>.web` of a fresh
/// bucket `bucket` (with the desired bucket's settings), from a client of
/// its own in a runtime of its own: current-thread for `workers` 0, else a
/// multi-thread one with that many workers (as the operator's).
fn raw_puts(url: &str, bucket: &str, payload: &[u8], workers: usize) -> Duration {
    let runtime = if workers == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
    .unwrap();
    runtime.block_on(async {
        let client = async_nats::connect(url).await.unwrap();
        let js = async_nats::jetstream::new(client.clone());
        ensure_bucket(
            &client,
            &BucketSettings::new(bucket).history(DESIRED_HISTORY),
            Duration::from_secs(10),
        )
        .await
        .expect("a bucket");
        let items: Vec<(String, Vec<u8>)> = (0..DEVICES)
            .map(|n| {
                (
                    format!("$KV.{bucket}.{}.web", device_name(n)),
                    payload.to_vec(),
                )
            })
            .collect();
        let started = Instant::now();
        e2e::pipelined_puts(&js, items, IN_FLIGHT).await;
        let elapsed = started.elapsed();
        assert_eq!(stream_state(&js, bucket).await.0, DEVICES as u64);
        elapsed
    })
}

/// [`raw_puts`] on a thread of its own, so that it may block.
fn raw_puts_aside(url: &str, bucket: String, payload: &[u8], workers: usize) -> Duration {
    let (url, payload) = (url.to_owned(), payload.to_vec());
    std::thread::spawn(move || raw_puts(&url, &bucket, &payload, workers))
        .join()
        .unwrap()
}

/// `(messages, last sequence)` of the bucket's stream.
async fn stream_state(js: &JetStream, bucket: &str) -> (u64, u64) {
    let mut stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .expect("the stream");
    let state = &stream.info().await.expect("stream info").state;
    (state.messages, state.last_sequence)
}

/// Waits until `probe` yields a value, looking every `every`.
async fn wait_for<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    every: Duration,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + GIVE_UP;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(every).await;
    }
}

fn condition(fd: &Value, type_: &str) -> Option<String> {
    fd["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

fn status_patches(fake: &FakeApi, name: &str) -> usize {
    let path = format!("{FDS}/{name}/status");
    fake.requests()
        .iter()
        .filter(|r| r.method == "PATCH" && r.path == path)
        .count()
}

fn operator_requests(fake: &FakeApi) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.client == "operator" && !r.path.ends_with("?watch"))
        .count()
}

/// One round's figures.
#[derive(Debug, Clone)]
struct Round {
    create_devices: Duration,
    device_sweep: Option<Duration>,
    raw: Duration,
    raw_single: Duration,
    fan_out: Duration,
    from_reconcile: Duration,
    finalizer: Duration,
    first_key: Duration,
    fan_out_requests: usize,
    fan_out_status_patches: usize,
    reports_written: Duration,
    aggregation: Duration,
    aggregation_patches: usize,
    patches_after_settle: usize,
}

fn round(index: usize) -> Round {
    let nats = NatsServer::start();
    let fake = FakeApi::new();
    let runtime = tokio_runtime();
    let client = runtime.block_on(async { fake.client() });
    let devices = Api::<Device>::all(client.clone());
    let fds = Api::<FleetDeployment>::namespaced(client, NS);
    let payload = payload();

    // Setup: 10,000 Devices labelled site=lyon.
    let create_devices = runtime.block_on(async {
        let started = Instant::now();
        futures_util::stream::iter(0..DEVICES)
            .map(|n| {
                let devices = devices.clone();
                async move {
                    let mut device = Device::new(&device_name(n), DeviceSpec::default());
                    device.metadata.labels = Some([("site".into(), "lyon".into())].into());
                    devices
                        .create(&PostParams::default(), &device)
                        .await
                        .unwrap();
                }
            })
            .buffer_unordered(CREATES)
            .collect::<Vec<()>>()
            .await;
        started.elapsed()
    });
    fake.clear_requests();

    let started = Instant::now();
    let operator = operator(&fake, &nats.url());
    let figures = runtime.block_on(async {
        let nats_client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(nats_client.clone());
        for bucket in [DESIRED_BUCKET, STATE_BUCKET, HEARTBEAT_BUCKET] {
            wait_for(bucket, Duration::from_millis(50), || async {
                js.get_key_value(bucket).await.ok()
            })
            .await;
        }
        // The first sweep gives every Device a status; wait for all of
        // them, or for nothing to move for 3 s.
        let mut last = (0, Instant::now());
        let device_sweep = loop {
            let with_status = fake
                .objects(DEVICE_PATH)
                .iter()
                .filter(|d| d.get("status").is_some())
                .count();
            if with_status == DEVICES {
                break Some(started.elapsed());
            }
            if with_status != last.0 {
                last = (with_status, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(3) {
                eprintln!("round {index}: {with_status} Device statuses written at start");
                break None;
            }
            assert!(started.elapsed() < GIVE_UP, "the Device sweep never ended");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        // A warm-up FleetDeployment: its status shows that the engine has
        // handled everything touched before it.
        fds.create(
            &PostParams::default(),
            &FleetDeployment::new(
                "warmup",
                FleetDeploymentSpec(
                    json!({"target": {"devices": [device_name(0)]}, "score": score()}),
                ),
            ),
        )
        .await
        .unwrap();
        wait_for("the warm-up status", Duration::from_millis(20), || async {
            let fd = fake.object(FDS, "warmup")?;
            (fd["status"]["targeted"] == 1).then_some(())
        })
        .await;

        // 1. Baselines: raw pipelined puts of the same payloads, from a
        // current-thread client and from a two-worker runtime like the
        // operator's. Blocking this runtime meanwhile is fine: nothing of
        // the bench's runs.
        let url = nats.url();
        let raw_single = raw_puts_aside(&url, format!("bench-raw-{index}-single"), &payload, 0);
        let raw = raw_puts_aside(&url, format!("bench-raw-{index}-pool"), &payload, 2);

        // 2. Fan-out: one FleetDeployment, 10,000 desired keys.
        let (messages_before, before) = stream_state(&js, DESIRED_BUCKET).await;
        fake.clear_requests();
        let mut desired = js
            .get_stream(format!("KV_{DESIRED_BUCKET}"))
            .await
            .expect("the stream");
        let fan_out_started = Instant::now();
        fds.create(
            &PostParams::default(),
            &FleetDeployment::new(
                "web",
                FleetDeploymentSpec(json!({"target": {"selector": "site=lyon"}, "score": score()})),
            ),
        )
        .await
        .unwrap();
        let (mut finalizer, mut first_key) = (None, None);
        loop {
            if finalizer.is_none()
                && fake
                    .object(FDS, "web")
                    .is_some_and(|fd| fd["metadata"]["finalizers"].is_array())
            {
                finalizer = Some(fan_out_started.elapsed());
            }
            let state = &desired.info().await.expect("stream info").state;
            if first_key.is_none() && state.last_sequence > before {
                first_key = Some(fan_out_started.elapsed());
            }
            if state.last_sequence >= before + DEVICES as u64 {
                break;
            }
            assert!(
                fan_out_started.elapsed() < GIVE_UP,
                "the desired bucket never got its 10,000 keys"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let fan_out = fan_out_started.elapsed();
        let first_key = first_key.unwrap_or(fan_out);
        let finalizer = finalizer.unwrap_or(first_key);
        assert_eq!(
            stream_state(&js, DESIRED_BUCKET).await.0,
            messages_before + DEVICES as u64,
            "one put per device"
        );
        // The reconcile starts with the operator's first request about
        // `web` (the finalizer patch).
        let reconcile_started = fake
            .requests()
            .iter()
            .find(|r| r.client == "operator" && r.path.starts_with(&format!("{FDS}/web")))
            .expect("the operator's first request about web")
            .at;
        let from_reconcile =
            (fan_out_started + fan_out).saturating_duration_since(reconcile_started);
        if std::env::var_os("PODFLEET_BENCH_TRACE").is_some() {
            for r in fake.requests() {
                eprintln!(
                    "{:>8.1?} {} {} {} {}",
                    r.at.saturating_duration_since(fan_out_started),
                    r.client,
                    r.method,
                    r.path,
                    r.status
                );
            }
            eprintln!("first key {first_key:.1?}, done {fan_out:.1?}");
        }
        let fan_out_requests = operator_requests(&fake);
        let fan_out_status_patches = status_patches(&fake, "web");

        // The keys' revisions, which the reports name.
        let consumer = desired
            .create_consumer(OrderedConfig {
                deliver_subject: nats_client.new_inbox(),
                filter_subject: format!("$KV.{DESIRED_BUCKET}.*.web"),
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..OrderedConfig::default()
            })
            .await
            .expect("a consumer");
        let mut entries = consumer.messages().await.expect("messages");
        let mut reports = Vec::with_capacity(DEVICES);
        let prefix = format!("$KV.{DESIRED_BUCKET}.");
        for _ in 0..DEVICES {
            let message = entries.next().await.expect("an entry").expect("a message");
            let revision = message.info().expect("a JetStream message").stream_sequence;
            let key = message
                .subject
                .as_str()
                .strip_prefix(prefix.as_str())
                .expect("a desired key")
                .to_owned();
            let report = json!({"phase": "running", "revision": revision});
            reports.push((
                format!("$KV.{STATE_BUCKET}.{key}"),
                report.to_string().into_bytes(),
            ));
        }
        drop(entries);

        // 3. Aggregation: 10,000 reports, one status.
        fake.clear_requests();
        let aggregation_started = Instant::now();
        e2e::pipelined_puts(&js, reports, IN_FLIGHT).await;
        let reports_written = aggregation_started.elapsed();
        wait_for("running == 10000", Duration::from_millis(5), || async {
            let fd = fake.object(FDS, "web")?;
            (fd["status"]["running"] == DEVICES
                && condition(&fd, "Available").as_deref() == Some("True"))
            .then_some(())
        })
        .await;
        let aggregation = aggregation_started.elapsed();
        let aggregation_patches = status_patches(&fake, "web");
        tokio::time::sleep(SETTLE).await;
        let patches_after_settle = status_patches(&fake, "web");
        Round {
            create_devices,
            device_sweep,
            raw,
            raw_single,
            fan_out,
            from_reconcile,
            finalizer,
            first_key,
            fan_out_requests,
            fan_out_status_patches,
            reports_written,
            aggregation,
            aggregation_patches,
            patches_after_settle,
        }
    });
    drop(operator);
    drop(nats);
    figures
}

fn median(samples: impl Iterator<Item = Duration>) -> Duration {
    let mut samples: Vec<Duration> = samples.collect();
    samples.sort();
    samples[samples.len() / 2]
}

fn median_count(samples: impl Iterator<Item = usize>) -> usize {
    let mut samples: Vec<usize> = samples.collect();
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn main() {
    let rounds: Vec<Round> = (0..ROUNDS)
        .map(|index| {
            let figures = round(index);
            eprintln!("round {index}: {figures:?}");
            figures
        })
        .collect();
    let all = |f: fn(&Round) -> Duration| -> Vec<Duration> { rounds.iter().map(f).collect() };
    let med = |f: fn(&Round) -> Duration| median(rounds.iter().map(f));
    let (fan_out, raw) = (med(|r| r.fan_out), med(|r| r.raw));
    let from_reconcile = med(|r| r.from_reconcile);
    let raw_single = med(|r| r.raw_single);
    let ratios = |figure: fn(&Round) -> Duration, baseline: fn(&Round) -> Duration| -> String {
        rounds
            .iter()
            .map(|r| format!("{:.2}", figure(r).as_secs_f64() / baseline(r).as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let sweeps: Vec<String> = rounds
        .iter()
        .map(|r| r.device_sweep.map_or("-".into(), |d| format!("{d:.1?}")))
        .collect();
    let sweep = rounds
        .iter()
        .map(|r| r.device_sweep)
        .collect::<Option<Vec<Duration>>>()
        .map_or("-".into(), |all| format!("{:.1?}", median(all.into_iter())));

    println!(
        "operator, {DEVICES} Devices, mocked API server, real nats-server, median of {ROUNDS} rounds:"
    );
    println!();
    println!("| figure | median | rounds | aim |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| setup: create {DEVICES} Devices through the fake, {CREATES} at a time | {:.1?} | {:.1?} | |",
        med(|r| r.create_devices),
        all(|r| r.create_devices)
    );
    println!(
        "| operator start → every Device has a status (its first sweep) | {sweep} | [{}] | |",
        sweeps.join(", ")
    );
    println!(
        "| baseline: {DEVICES} raw pipelined KV puts, ≤ {IN_FLIGHT} unacked, two-worker runtime | {raw:.1?} | {:.1?} | |",
        all(|r| r.raw)
    );
    println!(
        "| the same from a current-thread client | {raw_single:.1?} | {:.1?} | |",
        all(|r| r.raw_single)
    );
    println!(
        "| fan-out: reconcile start (the finalizer patch) → {DEVICES} desired puts | {from_reconcile:.1?} | {:.1?} | |",
        all(|r| r.from_reconcile)
    );
    println!(
        "| **ratio reconcile start → puts / raw (two-worker)** | **{:.2}×** | {} | ≤ 2× |",
        from_reconcile.as_secs_f64() / raw.as_secs_f64(),
        ratios(|r| r.from_reconcile, |r| r.raw)
    );
    println!(
        "| the same / raw (current-thread) | {:.2}× | {} | |",
        from_reconcile.as_secs_f64() / raw_single.as_secs_f64(),
        ratios(|r| r.from_reconcile, |r| r.raw_single)
    );
    println!(
        "| fan-out as a user sees it: FleetDeployment create call → {DEVICES} desired puts | {fan_out:.1?} | {:.1?} | |",
        all(|r| r.fan_out)
    );
    println!(
        "| of which create → finalizer on (watch, reconcile, patch) | {:.1?} | {:.1?} | |",
        med(|r| r.finalizer),
        all(|r| r.finalizer)
    );
    println!(
        "| of which create → first desired put | {:.1?} | {:.1?} | |",
        med(|r| r.first_key),
        all(|r| r.first_key)
    );
    println!(
        "| ratio create call → puts / raw (two-worker) | {:.2}× | {} | |",
        fan_out.as_secs_f64() / raw.as_secs_f64(),
        ratios(|r| r.fan_out, |r| r.raw)
    );
    println!(
        "| operator API requests during the fan-out (watches excluded) | {} | {:?} | |",
        median_count(rounds.iter().map(|r| r.fan_out_requests)),
        rounds
            .iter()
            .map(|r| r.fan_out_requests)
            .collect::<Vec<_>>()
    );
    println!(
        "| `web` status patches during the fan-out | {} | {:?} | |",
        median_count(rounds.iter().map(|r| r.fan_out_status_patches)),
        rounds
            .iter()
            .map(|r| r.fan_out_status_patches)
            .collect::<Vec<_>>()
    );
    println!(
        "| {DEVICES} state reports written, pipelined | {:.1?} | {:.1?} | |",
        med(|r| r.reports_written),
        all(|r| r.reports_written)
    );
    println!(
        "| **aggregation: first report → status `running: {DEVICES}`, Available** | **{:.1?}** | {:.1?} | ≤ 2 s |",
        med(|r| r.aggregation),
        all(|r| r.aggregation)
    );
    println!(
        "| of which last report acked → that status (written at most once per `status_interval`, 1 s) | {:.1?} | {:.1?} | |",
        med(|r| r.aggregation.saturating_sub(r.reports_written)),
        all(|r| r.aggregation.saturating_sub(r.reports_written))
    );
    println!(
        "| **`web` status patches during the aggregation** | **{}** | {:?} | 1, not {DEVICES} |",
        median_count(rounds.iter().map(|r| r.aggregation_patches)),
        rounds
            .iter()
            .map(|r| r.aggregation_patches)
            .collect::<Vec<_>>()
    );
    println!(
        "| … and {SETTLE:?} later | {} | {:?} | |",
        median_count(rounds.iter().map(|r| r.patches_after_settle)),
        rounds
            .iter()
            .map(|r| r.patches_after_settle)
            .collect::<Vec<_>>()
    );
}
