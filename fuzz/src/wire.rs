//! Decoding the wire types from untrusted bytes.
//!
//! For every type: bytes that do not decode are refused with an error (never
//! a panic); bytes that do decode give a value whose validation does not
//! panic, which encodes, decodes back to an equal value, and encodes again
//! to the same bytes (the encoding is canonical, so a report republished
//! unchanged is byte-for-byte unchanged).

use std::collections::BTreeSet;
use std::fmt::Debug;

use podfleet_core::reconciler::{init_container_spec, service_container_spec, service_spec_hash};
use podfleet_core::runtime::{init_container_name, service_container_name};
use podfleet_core::wire::{
    CommandError, CommandReply, DeploymentState, ExecReply, ExecRequest, FailureCause, Heartbeat,
    LogsReply, LogsRequest, PingReply, PodmanV0Score, RestartRecord, Revision, RuntimeHealth,
    ScoreError,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Decodes `data` as a `T` and, when that succeeds, checks the round trip.
///
/// # Panics
/// When a decoded value does not encode, does not decode back to an equal
/// value, or encodes to different bytes the second time.
pub fn round_trip<T>(type_name: &str, data: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let value: T = serde_json::from_slice(data).ok()?;
    let encoded = serde_json::to_vec(&value).unwrap_or_else(|e| {
        panic!(
            "a {type_name} decoded from {:?} does not encode: {e}\nvalue: {value:?}",
            String::from_utf8_lossy(data)
        )
    });
    let again: T = serde_json::from_slice(&encoded).unwrap_or_else(|e| {
        panic!(
            "a {type_name} does not decode its own encoding {:?}: {e}\ninput: {:?}\nvalue: {value:?}",
            String::from_utf8_lossy(&encoded),
            String::from_utf8_lossy(data)
        )
    });
    assert_eq!(
        again,
        value,
        "a {type_name} changed across encode -> decode; input {:?}, encoding {:?}",
        String::from_utf8_lossy(data),
        String::from_utf8_lossy(&encoded)
    );
    let re_encoded = serde_json::to_vec(&again)
        .unwrap_or_else(|e| panic!("a {type_name} does not encode the second time: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&re_encoded),
        String::from_utf8_lossy(&encoded),
        "a {type_name}'s encoding is not canonical; input {:?}",
        String::from_utf8_lossy(data)
    );
    Some(value)
}

/// The desired-state score, as the agent receives it from the KV watch.
///
/// Beyond the round trip: [`PodmanV0Score::from_json`] accepts exactly what
/// decodes and passes [`PodmanV0Score::validate`], with the same error;
/// a refused payload's error displays; a valid score re-encodes to a valid,
/// equal score, and everything the reconciler derives from it (container
/// names, specs, spec hashes) is computed without a panic, with one
/// container name per service and init container.
///
/// # Panics
/// When any of that does not hold.
pub fn score(data: &[u8]) {
    let decoded = round_trip::<PodmanV0Score>("PodmanV0Score", data);
    let parsed = PodmanV0Score::from_json(data);
    let shown = || String::from_utf8_lossy(data).into_owned();
    match (&decoded, &parsed) {
        (None, Ok(score)) => panic!(
            "from_json accepted {:?}, which serde refuses, as {score:?}",
            shown()
        ),
        (None, Err(error)) => assert!(
            matches!(error, ScoreError::Malformed { .. }),
            "bytes that do not decode must be Malformed, got {error:?} for {:?}",
            shown()
        ),
        (Some(raw), _) => {
            let verdict = raw.validate();
            assert_eq!(
                verdict.as_ref().err(),
                parsed.as_ref().err(),
                "from_json and decode-then-validate disagree on {:?}",
                shown()
            );
        }
    }
    match parsed {
        Err(error) => assert!(
            !error.to_string().is_empty(),
            "{error:?} displays as nothing"
        ),
        Ok(score) => derived_from_valid(&score, data),
    }
}

fn derived_from_valid(score: &PodmanV0Score, data: &[u8]) {
    let again = PodmanV0Score::from_json(&score.to_json()).unwrap_or_else(|e| {
        panic!(
            "a valid score re-encodes to an invalid one ({e}); input {:?}",
            String::from_utf8_lossy(data)
        )
    });
    assert_eq!(
        &again, score,
        "a valid score changed across to_json -> from_json"
    );
    let mut names = BTreeSet::new();
    for service in &score.services {
        let hash = service_spec_hash(score, service);
        let spec = service_container_spec("fuzz", score, service, Revision::new(1));
        assert_eq!(spec.name, service_container_name("fuzz", &service.name));
        assert_eq!(
            spec.labels.get(podfleet_core::runtime::LABEL_SPEC_HASH),
            Some(&hash),
            "the spec hash label of {:?} is not its spec hash",
            service.name
        );
        assert!(
            names.insert(spec.name.clone()),
            "two containers named {:?}",
            spec.name
        );
    }
    for init in &score.init_containers {
        let spec = init_container_spec("fuzz", init, Revision::new(1));
        assert_eq!(spec.name, init_container_name("fuzz", &init.name));
        assert!(
            names.insert(spec.name.clone()),
            "two containers named {:?}",
            spec.name
        );
    }
}

/// What agents report: per-deployment state (with its failure cause and
/// restart records) and the heartbeat, as the operator reads them.
///
/// # Panics
/// When a decoded value does not survive the round trip.
pub fn report(data: &[u8]) {
    if let Some(state) = round_trip::<DeploymentState>("DeploymentState", data) {
        if let Some(cause) = &state.cause {
            let encoded = serde_json::to_vec(cause)
                .unwrap_or_else(|e| panic!("the cause {cause:?} does not encode: {e}"));
            round_trip::<FailureCause>("FailureCause", &encoded)
                .unwrap_or_else(|| panic!("the cause of {state:?} does not decode on its own"));
        }
    }
    round_trip::<FailureCause>("FailureCause", data);
    round_trip::<RestartRecord>("RestartRecord", data);
    if let Some(heartbeat) = round_trip::<Heartbeat>("Heartbeat", data) {
        let encoded = serde_json::to_vec(&heartbeat.runtime)
            .unwrap_or_else(|e| panic!("{:?} does not encode: {e}", heartbeat.runtime));
        round_trip::<RuntimeHealth>("RuntimeHealth", &encoded)
            .unwrap_or_else(|| panic!("the runtime health of {heartbeat:?} does not decode"));
    }
    round_trip::<RuntimeHealth>("RuntimeHealth", data);
}

/// The command protocol on `device-commands.<device>.<verb>`: both requests
/// (`logs`, `exec`; `ping` has no body) and every reply, bare and wrapped in
/// [`CommandReply`].
///
/// # Panics
/// When a decoded value does not survive the round trip, or an error reply
/// does not display.
pub fn command(data: &[u8]) {
    round_trip::<LogsRequest>("LogsRequest", data);
    round_trip::<ExecRequest>("ExecRequest", data);
    round_trip::<PingReply>("PingReply", data);
    round_trip::<LogsReply>("LogsReply", data);
    round_trip::<ExecReply>("ExecReply", data);
    if let Some(error) = round_trip::<CommandError>("CommandError", data) {
        assert!(
            !error.to_string().is_empty(),
            "{error:?} displays as nothing"
        );
    }
    round_trip::<CommandReply<PingReply>>("CommandReply<PingReply>", data);
    round_trip::<CommandReply<LogsReply>>("CommandReply<LogsReply>", data);
    round_trip::<CommandReply<ExecReply>>("CommandReply<ExecReply>", data);
}
