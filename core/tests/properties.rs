//! A state-machine property test of the reconciler alone: random desired
//! states, random runtime faults, crashes, restarts and time, with the
//! harness checking after every operation that
//! - no service ever has two containers,
//! - no running container whose spec did not change is stopped or removed,
//! - no container of an older spec is created or started once a newer
//!   valid revision was seen,
//! - no input panics.

use std::time::Duration;

use podfleet_core::reconciler::{Bugs, Config};
use podfleet_core::runtime::RuntimeErrorKind;
use podfleet_core::wire::DeviceId;
use podfleet_testkit::{images, Harness, Invariant, OpFault};
use proptest::prelude::*;

const DEPLOYMENTS: [&str; 2] = ["shop", "cam"];

#[derive(Debug, Clone)]
enum Step {
    /// Put a score built from `variant`'s bits.
    Put {
        deployment: usize,
        variant: u16,
    },
    /// Put bytes that are not a valid score.
    PutInvalid {
        deployment: usize,
    },
    /// Deliver what the bucket holds for a deployment again, as a watch
    /// does after a reconnect.
    Redeliver {
        deployment: usize,
    },
    Delete {
        deployment: usize,
    },
    Advance {
        millis: u32,
    },
    /// Crash whatever runs as this service.
    Crash {
        deployment: usize,
        service: usize,
        code: i64,
    },
    /// The next runtime operation of this kind fails.
    Fault {
        op: usize,
        after_effect: bool,
        kind: usize,
    },
    RestartAgent {
        keep_cache: bool,
    },
    ToggleImage {
        image: usize,
    },
}

const OPS: [&str; 7] = [
    "list", "create", "start", "wait", "inspect", "stop", "remove",
];
const KINDS: [RuntimeErrorKind; 4] = [
    RuntimeErrorKind::NotFound,
    RuntimeErrorKind::NameConflict,
    RuntimeErrorKind::Unavailable,
    RuntimeErrorKind::Other,
];
const SERVICES: [&str; 3] = ["web", "worker", "db"];
const IMAGES: [&str; 4] = [images::A_1, images::A_2, images::CRASH, images::SLOW_STOP];

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..2usize, any::<u16>()).prop_map(|(deployment, variant)| Step::Put { deployment, variant }),
        1 => (0..2usize).prop_map(|deployment| Step::PutInvalid { deployment }),
        1 => (0..2usize).prop_map(|deployment| Step::Redeliver { deployment }),
        1 => (0..2usize).prop_map(|deployment| Step::Delete { deployment }),
        4 => (0..90_000u32).prop_map(|millis| Step::Advance { millis }),
        2 => (0..2usize, 0..3usize, 0..3i64).prop_map(|(deployment, service, code)| Step::Crash { deployment, service, code }),
        2 => (0..7usize, any::<bool>(), 0..4usize).prop_map(|(op, after_effect, kind)| Step::Fault { op, after_effect, kind }),
        1 => any::<bool>().prop_map(|keep_cache| Step::RestartAgent { keep_cache }),
        1 => (0..4usize).prop_map(|image| Step::ToggleImage { image }),
    ]
}

/// A score from 16 bits: which services, their images and env, the init
/// containers, and the stop policy.
fn score_of(variant: u16) -> String {
    let bit = |n: u16| variant >> n & 1 == 1;
    let mut services = Vec::new();
    for (i, name) in SERVICES.iter().enumerate() {
        let i = i as u16;
        if i == 0 || bit(i) {
            let image = IMAGES[usize::from(variant >> (3 + 2 * i) & 3)];
            let env = if bit(9 + i) { "x" } else { "y" };
            services.push(format!(
                r#"{{"name":"{name}","image":"{image}","env":{{"V":"{env}"}}}}"#
            ));
        }
    }
    let inits = match variant >> 12 & 3 {
        0 => "",
        // Through the libpod race, as img/init-ok:1 did here before the catalogue.
        1 => r#"{"name":"migrate","image":"img/init-race:1","timeout":20}"#,
        2 => {
            r#"{"name":"migrate","image":"img/init-ok:1","timeout":20},{"name":"seed","image":"img/init-fail:1","timeout":20}"#
        }
        _ => r#"{"name":"hang","image":"img/init-hang:1","timeout":3}"#,
    };
    let grace = 1 + (variant >> 14 & 3);
    format!(
        r#"{{"services":[{}],"init_containers":[{inits}],"lifecycle":{{"grace_period_secs":{grace}}}}}"#,
        services.join(",")
    )
}

fn world() -> Harness {
    let config = Config::new(DeviceId::new("prop").expect("valid"), "prop")
        .tick_interval(Duration::from_secs(30));
    let mut h = Harness::new(config);
    images::install(&mut h.runtime);
    h
}

type Bucket = std::collections::BTreeMap<usize, (u64, String)>;

fn apply(h: &mut Harness, step: &Step, revision: &mut u64, kv: &mut Bucket) {
    match step {
        Step::Put {
            deployment,
            variant,
        } => {
            *revision += 1;
            let json = score_of(*variant);
            h.put(DEPLOYMENTS[*deployment], *revision, &json);
            kv.insert(*deployment, (*revision, json));
        }
        Step::PutInvalid { deployment } => {
            *revision += 1;
            let json = r#"{"services":[{"name":"Bad!","image":""}]}"#;
            h.put(DEPLOYMENTS[*deployment], *revision, json);
            kv.insert(*deployment, (*revision, json.to_owned()));
        }
        Step::Redeliver { deployment } => {
            if let Some((revision, json)) = kv.get(deployment).cloned() {
                h.put(DEPLOYMENTS[*deployment], revision, &json);
            }
        }
        Step::Delete { deployment } => {
            *revision += 1;
            h.delete(DEPLOYMENTS[*deployment], *revision);
            kv.remove(deployment);
        }
        Step::Advance { millis } => h.run_for(Duration::from_millis(u64::from(*millis))),
        Step::Crash {
            deployment,
            service,
            code,
        } => {
            let name = format!("{}_{}", DEPLOYMENTS[*deployment], SERVICES[*service]);
            if let Some(id) = h.runtime.by_name(&name).map(|c| c.id.clone()) {
                let now = h.now;
                h.runtime.crash(now, &id, *code);
            }
        }
        Step::Fault {
            op,
            after_effect,
            kind,
        } => {
            let mut kind = KINDS[*kind];
            if OPS[*op] == "stop" && kind == RuntimeErrorKind::NotFound {
                // Podman says 404 to a stop only when the container is gone;
                // a lying 404 would make any agent remove it without grace.
                kind = RuntimeErrorKind::Other;
            }
            let fault = if *after_effect {
                OpFault::FailAfterEffect(kind)
            } else {
                OpFault::Fail(kind)
            };
            h.faults.entry(OPS[*op]).or_default().push_back(fault);
        }
        Step::RestartAgent { keep_cache } => h.restart_agent(*keep_cache),
        Step::ToggleImage { image } => {
            let image = IMAGES[*image];
            if h.runtime.containers().is_empty() || image.ends_with(":2") {
                h.runtime.remove_image(image);
            } else {
                h.runtime.add_image(image);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn reconciler_keeps_its_invariants(steps in proptest::collection::vec(step(), 1..40)) {
        let mut h = world();
        let mut revision = 0;
        let mut kv = Bucket::new();
        for step in &steps {
            apply(&mut h, step, &mut revision, &mut kv);
            prop_assert!(h.violations.is_empty(), "after {step:?}: {:?}\n{}", h.violations, h.transcript);
        }
        // Heal every fault and let it settle: still no violation.
        h.faults.clear();
        h.run_for(Duration::from_secs(600));
        prop_assert!(h.violations.is_empty(), "{:?}\n{}", h.violations, h.transcript);
    }
}

/// The property checks must be able to fail: each deliberate bug is caught.
#[test]
fn property_checks_catch_injected_bugs() {
    let bug_config =
        |bugs| Config::new(DeviceId::new("prop").expect("valid"), "prop").inject_bugs(bugs);

    // The 30 s redeploy loop: a steady deployment, ticks going by.
    let mut h = Harness::new(bug_config(Bugs {
        recreate_on_tick: true,
        ..Bugs::default()
    }));
    h.put(
        "shop",
        1,
        r#"{"services":[{"name":"web","image":"img/a:1","env":{"A":"1"}}]}"#,
    );
    h.run_for(Duration::from_secs(61));
    assert!(
        h.violations
            .iter()
            .any(|v| v.invariant == Invariant::HealthyContainerRecreated),
        "{:?}\n{}",
        h.violations,
        h.transcript
    );

    // Revert: a newer revision fails, then the old container crashes.
    let mut h = Harness::new(bug_config(Bugs {
        revert_on_failure: true,
        ..Bugs::default()
    }));
    images::install(&mut h.runtime);
    h.put(
        "shop",
        1,
        r#"{"services":[{"name":"web","image":"img/a:1"}]}"#,
    );
    h.run_for(Duration::from_secs(1));
    h.put(
        "shop",
        2,
        r#"{"services":[{"name":"web","image":"img/a:2"}],"init_containers":[{"name":"m","image":"img/init-fail:1"}]}"#,
    );
    h.run_for(Duration::from_secs(3));
    let id = h
        .runtime
        .by_name("shop_web")
        .map(|c| c.id.clone())
        .expect("old web still there");
    let now = h.now;
    h.runtime.crash(now, &id, 1);
    h.run_for(Duration::from_secs(120));
    assert!(
        h.violations
            .iter()
            .any(|v| v.invariant == Invariant::NoRevert),
        "{:?}\n{}",
        h.violations,
        h.transcript
    );
}
