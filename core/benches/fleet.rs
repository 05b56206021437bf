//! What the fleet controller costs at 10,000 devices.
//!
//! `cargo bench -p podfleet-core --bench fleet`. A plain timing loop (no
//! harness crate), median of 5 rounds, each on a fresh controller:
//! - **fan-out**: one fleet deployment applied to 10,000 labelled devices,
//!   until every desired put is out;
//! - **aggregation**: 10,000 state reports fed one by one (each followed by
//!   draining the outputs, as a shell does), until the status that counts
//!   them all is out;
//! - the floor of the aggregation: decoding the same 10,000 reports with
//!   serde_json and nothing else, in the same run, so the ratio says what
//!   the controller adds.

use std::hint::black_box;
use std::time::{Duration, Instant};

use podfleet_core::fleet::controller::{Config, Controller, Input, Output};
use podfleet_core::fleet::{FleetDeploymentStatus, API_VERSION, FLEET_DEPLOYMENT_KIND};
use podfleet_core::session::Change;
use podfleet_core::wire::{DeploymentKey, DeploymentName, DeploymentState, DeviceId, Revision};
use podfleet_core::Timestamp;

const DEVICES: usize = 10_000;
const ROUNDS: usize = 5;

fn device(n: usize) -> DeviceId {
    DeviceId::new(format!("rpi-{n:05}")).expect("valid")
}

fn manifest() -> Vec<u8> {
    format!(
        r#"{{"apiVersion":"{API_VERSION}","kind":"{FLEET_DEPLOYMENT_KIND}","metadata":{{"name":"web"}},
        "spec":{{"target":{{"selector":"site=lyon"}},"score":{{"services":[
        {{"name":"web","image":"localhost/web:2","env":{{"A":"1"}}}},
        {{"name":"worker","image":"localhost/worker:2"}}]}}}}}}"#
    )
    .into_bytes()
}

/// A synced controller that knows 10,000 devices labelled site=lyon, each
/// with a fresh heartbeat.
fn fleet(now: Timestamp) -> Controller {
    let mut c = Controller::new(Config::default(), now);
    for n in 0..DEVICES {
        c.handle(
            now,
            Input::DevicePut {
                device: device(n),
                value: br#"{"labels":{"site":"lyon"}}"#.to_vec(),
            },
        );
        c.handle(
            now,
            Input::Heartbeat {
                device: device(n),
                value: Some(
                    format!(
                        r#"{{"device_id":"{}","agent_version":"0.1.0","uptime_s":9}}"#,
                        device(n)
                    )
                    .into_bytes(),
                ),
                age: Duration::ZERO,
            },
        );
    }
    c.handle(now, Input::Synced);
    while c.poll_output().is_some() {}
    c
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let name = DeploymentName::new("web").expect("valid");
    let now = Timestamp::from_millis(1_000);
    let mut fan_out = Vec::new();
    let mut aggregate = Vec::new();
    let mut decode = Vec::new();
    for _ in 0..ROUNDS {
        let mut c = fleet(now);
        let started = Instant::now();
        c.handle(
            now,
            Input::DeploymentPut {
                name: name.clone(),
                generation: 1,
                value: manifest(),
            },
        );
        let mut puts = Vec::with_capacity(DEVICES);
        while let Some(output) = c.poll_output() {
            if let Output::PutDesired { key, payload } = output {
                puts.push((key, payload));
            }
        }
        fan_out.push(started.elapsed());
        assert_eq!(puts.len(), DEVICES, "every device gets the deployment");

        // The puts land; the devices report Running on their revisions.
        for (n, (key, payload)) in puts.into_iter().enumerate() {
            c.handle(
                now,
                Input::Desired(Change::Put {
                    key,
                    revision: Revision::new(100 + n as u64),
                    value: payload.to_vec(),
                }),
            );
        }
        while c.poll_output().is_some() {}
        let reports: Vec<(DeploymentKey, Vec<u8>)> = (0..DEVICES)
            .map(|n| {
                let key = DeploymentKey {
                    device: device(n),
                    deployment: name.clone(),
                };
                let state = format!(
                    r#"{{"phase":"running","revision":{},"container_ids":{{"web":"{:064x}","worker":"{:064x}"}},"message":"2 services running"}}"#,
                    100 + n,
                    n,
                    n + 1
                );
                (key, state.into_bytes())
            })
            .collect();

        let started = Instant::now();
        for (key, value) in &reports {
            let _: DeploymentState = black_box(serde_json::from_slice(value).expect("a report"));
            black_box(key);
        }
        decode.push(started.elapsed());

        let later = Timestamp::from_millis(3_000);
        let started = Instant::now();
        let mut last: Option<FleetDeploymentStatus> = None;
        for (key, value) in reports {
            c.handle(
                later,
                Input::State(Change::Put {
                    key,
                    revision: Revision::new(1),
                    value,
                }),
            );
            while let Some(output) = c.poll_output() {
                if let Output::PutStatus { status, .. } = output {
                    last = Some(*status);
                }
            }
        }
        // The status interval has passed: the status counting every report.
        c.handle(later + Duration::from_secs(1), Input::Timeout);
        while let Some(output) = c.poll_output() {
            if let Output::PutStatus { status, .. } = output {
                last = Some(*status);
            }
        }
        aggregate.push(started.elapsed());
        let status = last.expect("a status");
        assert!(status.is_complete(), "{status:?}");
        assert_eq!(status.phases.running as usize, DEVICES);
    }
    let (fan_out, aggregate, decode) = (median(fan_out), median(aggregate), median(decode));
    println!("fleet controller, {DEVICES} devices, median of {ROUNDS}:");
    println!("  fan-out of one apply (decisions only)  {fan_out:>10.1?}");
    println!("  aggregation of {DEVICES} reports           {aggregate:>10.1?}");
    println!("  decoding the same reports alone        {decode:>10.1?}");
    println!(
        "  aggregation / decoding                 {:>10.2}x",
        aggregate.as_secs_f64() / decode.as_secs_f64()
    );
}
