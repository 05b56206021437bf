//! How long one reconciler decision takes, with a 20-service score.
//!
//! `cargo bench -p podfleet-core --bench decisions`. A plain timing loop (no
//! harness crate): it reports nanoseconds per input for
//! - a liveness tick's list result with 20 healthy containers (the hot path),
//! - a redelivered, unchanged desired put (a no-op),
//! - a full rollout of 20 services, per input fed.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use podfleet_core::reconciler::{AgentCache, CachedDeployment, Input, Output};
use podfleet_core::runtime::{ContainerState, ContainerSummary, RuntimeOp, RuntimeReply};
use podfleet_core::wire::{DeploymentName, DeviceId, Revision};
use podfleet_core::{Config, Reconciler, Timestamp};

fn score(version: u32) -> String {
    let services: Vec<String> = (0..20)
        .map(|i| {
            format!(
                r#"{{"name":"svc-{i}","image":"localhost/app:{version}","env":{{"A":"1","B":"2"}},"args":["--port","{}"]}}"#,
                8000 + i
            )
        })
        .collect();
    format!(r#"{{"services":[{}]}}"#, services.join(","))
}

fn config() -> Config {
    Config::new(DeviceId::new("bench").expect("valid"), "bench")
}

/// Answers every runtime op at once; returns how many inputs were fed.
fn settle(r: &mut Reconciler, now: Timestamp, containers: &mut Vec<ContainerSummary>) -> u64 {
    let mut inputs = 0;
    let mut next = 0u64;
    while let Some(output) = r.poll_output() {
        let Output::Runtime { id, op } = output else {
            continue;
        };
        let reply = match op {
            RuntimeOp::List => RuntimeReply::Listed {
                containers: containers.clone(),
            },
            RuntimeOp::Create { spec } => {
                next += 1;
                let id = format!("c{next}");
                containers.push(ContainerSummary {
                    id: id.clone(),
                    name: spec.name,
                    state: ContainerState::Running,
                    labels: spec.labels,
                });
                RuntimeReply::Created { id }
            }
            RuntimeOp::Start { .. } => RuntimeReply::Started,
            RuntimeOp::Remove { container, .. } => {
                containers.retain(|c| c.id != container);
                RuntimeReply::Removed
            }
            other => panic!("unexpected {other:?}"),
        };
        r.handle(
            now,
            Input::RuntimeResult {
                id,
                result: Ok(reply),
            },
        );
        inputs += 1;
    }
    inputs
}

fn report(name: &str, total: Duration, inputs: u64) {
    let per = total.as_nanos() as f64 / inputs.max(1) as f64;
    println!("{name:<44} {per:>10.0} ns/input  ({inputs} inputs)");
}

fn main() {
    let deployment = DeploymentName::new("shop").expect("valid");
    let json = score(1);

    // A converged device: 20 running containers, applied from the cache.
    let mut r = Reconciler::new(config(), None, Timestamp::ZERO);
    let mut containers = Vec::new();
    r.handle(
        Timestamp::ZERO,
        Input::DesiredPut {
            deployment: deployment.clone(),
            revision: Revision::new(1),
            value: json.as_bytes(),
        },
    );
    settle(&mut r, Timestamp::ZERO, &mut containers);
    settle(&mut r, Timestamp::ZERO, &mut containers);
    assert_eq!(containers.len(), 20);
    let cache = AgentCache {
        deployments: BTreeMap::from([(
            deployment.clone(),
            CachedDeployment {
                revision: Revision::new(1),
                score: Some(json.clone()),
                applied: true,
                attempt: 1,
                container_ids: BTreeMap::new(),
                applied_images: Vec::new(),
                previous_images: Vec::new(),
                exit_codes: BTreeMap::new(),
            },
        )]),
        tombstones: BTreeMap::new(),
    };

    // 1. Liveness tick: the list result of 20 healthy containers.
    let rounds = 20_000u64;
    let mut r = Reconciler::new(config(), Some(cache), Timestamp::ZERO);
    settle(&mut r, Timestamp::ZERO, &mut containers);
    let mut total = Duration::ZERO;
    let mut inputs = 0;
    for i in 1..=rounds {
        let now = Timestamp::from_millis(i * 30_000);
        r.handle(now, Input::Timeout);
        let mut list = None;
        while let Some(o) = r.poll_output() {
            if let Output::Runtime {
                id,
                op: RuntimeOp::List,
            } = o
            {
                list = Some(id);
            }
        }
        let Some(id) = list else { continue };
        let reply = Ok(RuntimeReply::Listed {
            containers: containers.clone(),
        });
        let started = Instant::now();
        r.handle(
            now,
            Input::RuntimeResult {
                id,
                result: black_box(reply),
            },
        );
        while let Some(o) = r.poll_output() {
            assert!(
                !matches!(o, Output::Runtime { .. }),
                "a healthy tick mutates nothing"
            );
        }
        total += started.elapsed();
        inputs += 1;
    }
    report("tick: list of 20 healthy containers", total, inputs);

    // 2. An unchanged desired put.
    let started = Instant::now();
    for _ in 0..rounds {
        r.handle(
            Timestamp::from_millis(1),
            Input::DesiredPut {
                deployment: deployment.clone(),
                revision: Revision::new(1),
                value: black_box(json.as_bytes()),
            },
        );
        while r.poll_output().is_some() {}
    }
    report("unchanged desired put", started.elapsed(), rounds);

    // 3. Full rollouts of a changed 20-service score, per input.
    let mut total = Duration::ZERO;
    let mut inputs = 0;
    for round in 0..500u64 {
        let mut r = Reconciler::new(config(), None, Timestamp::ZERO);
        let mut containers = Vec::new();
        let text = score(round as u32);
        let started = Instant::now();
        r.handle(
            Timestamp::ZERO,
            Input::DesiredPut {
                deployment: deployment.clone(),
                revision: Revision::new(1),
                value: text.as_bytes(),
            },
        );
        inputs += 1 + settle(&mut r, Timestamp::ZERO, &mut containers);
        inputs += settle(&mut r, Timestamp::ZERO, &mut containers);
        total += started.elapsed();
        assert_eq!(containers.len(), 20);
    }
    report("rollout of 20 services (fake answers)", total, inputs);
}
