//! Parsing keys, subjects and identifiers from untrusted strings.
//!
//! Every parse either fails with the typed [`NameError`] that names the
//! offending value, or gives a value that the matching build function turns
//! back into the very same string, which parses again to an equal value.
//! Identifiers are also checked against a second, independent reading of
//! [`LABEL_RULE`], and every parsed key and subject stays inside its own
//! device's filter (invariant 5, isolation).

use podfleet_core::wire::names::{
    device_command_filter, device_key_filter, heartbeat_key, NameKind, LABEL_RULE, MAX_LABEL_LEN,
};
use podfleet_core::wire::{
    CommandSubject, DeploymentKey, DeploymentName, DeviceId, NameError, Verb,
};

/// [`LABEL_RULE`], read independently of the implementation under test.
fn follows_label_rule(value: &str) -> bool {
    let chars: Vec<char> = value.chars().collect();
    let inner = |c: char| matches!(c, 'a'..='z' | '0'..='9' | '-');
    let edge = |c: char| matches!(c, 'a'..='z' | '0'..='9');
    (1..=MAX_LABEL_LEN).contains(&chars.len())
        && chars.iter().all(|c| inner(*c))
        && chars.first().copied().is_some_and(edge)
        && chars.last().copied().is_some_and(edge)
}

fn check_label_error(error: &NameError, kind: NameKind, value: &str) {
    match error {
        NameError::InvalidLabel {
            kind: got,
            value: named,
            ..
        } => {
            assert_eq!(*got, kind, "wrong kind in {error:?}");
            assert_eq!(named, value, "the error does not name the value: {error:?}");
            let text = error.to_string();
            assert!(
                text.contains(LABEL_RULE),
                "{text:?} does not state the rule"
            );
        }
        other => panic!("a bad {kind} {value:?} gave {other:?}, not InvalidLabel"),
    }
}

/// Checks one identifier type: `new` agrees with the rule, round-trips
/// through `Display` and through JSON, and refuses with `InvalidLabel`.
macro_rules! check_label_type {
    ($ty:ty, $kind:expr, $value:expr) => {{
        let value: &str = $value;
        match <$ty>::new(value) {
            Ok(name) => {
                assert!(
                    follows_label_rule(value),
                    "{} accepted {value:?}, which breaks the rule",
                    stringify!($ty)
                );
                assert_eq!(name.as_str(), value);
                assert_eq!(name.to_string(), value);
                assert_eq!(value.parse::<$ty>().ok().as_ref(), Some(&name));
                let json = serde_json::to_string(&name).unwrap_or_default();
                let back: Option<$ty> = serde_json::from_str(&json).ok();
                assert_eq!(back.as_ref(), Some(&name), "JSON round trip via {json}");
                Some(name)
            }
            Err(error) => {
                assert!(
                    !follows_label_rule(value),
                    "{} refused {value:?}, which follows the rule: {error}",
                    stringify!($ty)
                );
                check_label_error(&error, $kind, value);
                let json = serde_json::to_string(value).unwrap_or_default();
                assert!(
                    serde_json::from_str::<$ty>(&json).is_err(),
                    "JSON decoding accepted {json}, which new refuses"
                );
                None
            }
        }
    }};
}

/// Parses `data` (lossily as UTF-8) as every kind of name, and also builds
/// names from its two halves.
///
/// # Panics
/// When a parse and its build function disagree, a refusal is not the
/// typed error for the problem, or a key or subject escapes its device.
pub fn names(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let text = text.as_ref();
    check_label_type!(DeviceId, NameKind::DeviceId, text);
    check_label_type!(DeploymentName, NameKind::Deployment, text);
    deployment_key(text);
    command_subject(text);
    match text.parse::<Verb>() {
        Ok(verb) => assert_eq!(verb.as_str(), text),
        Err(NameError::UnknownVerb { value }) => assert_eq!(value, text),
        Err(other) => panic!("verb {text:?} gave {other:?}, not UnknownVerb"),
    }
    // Build side: names from the two halves, joined by the build functions.
    let split = text
        .char_indices()
        .nth(text.chars().count() / 2)
        .map_or(text.len(), |(at, _)| at);
    let (left, right) = text.split_at(split);
    let device = check_label_type!(DeviceId, NameKind::DeviceId, left);
    let deployment = check_label_type!(DeploymentName, NameKind::Deployment, right);
    if let Some(device) = device {
        assert_eq!(heartbeat_key(&device), left);
        for verb in Verb::ALL {
            let subject = CommandSubject {
                device: device.clone(),
                verb,
            };
            let built = subject.to_subject();
            assert_eq!(
                CommandSubject::parse(&built).as_ref(),
                Ok(&subject),
                "{built:?}"
            );
        }
        if let Some(deployment) = deployment {
            let key = DeploymentKey { device, deployment };
            let built = key.to_key();
            assert_eq!(DeploymentKey::parse(&built).as_ref(), Ok(&key), "{built:?}");
        }
    }
}

fn deployment_key(text: &str) {
    match DeploymentKey::parse(text) {
        Ok(key) => {
            assert_eq!(
                key.to_key(),
                text,
                "a parsed key does not rebuild its string"
            );
            assert_eq!(DeploymentKey::parse(&key.to_key()).as_ref(), Ok(&key));
            let filter = device_key_filter(&key.device);
            let prefix = filter.trim_end_matches('*');
            assert!(
                text.starts_with(prefix) && !text[prefix.len()..].contains('.'),
                "key {text:?} escapes its device's filter {filter:?}"
            );
        }
        Err(NameError::InvalidKey { value }) => {
            assert_eq!(value, text);
            assert_ne!(
                text.matches('.').count(),
                1,
                "{text:?} has the <device>.<deployment> shape but was refused as InvalidKey"
            );
        }
        Err(error @ NameError::InvalidLabel { kind, .. }) => {
            let (device, deployment) = text
                .split_once('.')
                .unwrap_or_else(|| panic!("{text:?} has no '.' but was refused as {error:?}"));
            let value = if kind == NameKind::DeviceId {
                device
            } else {
                deployment
            };
            check_label_error(&error, kind, value);
        }
        Err(other) => panic!("key {text:?} gave {other:?}"),
    }
}

fn command_subject(text: &str) {
    match CommandSubject::parse(text) {
        Ok(subject) => {
            assert_eq!(
                subject.to_subject(),
                text,
                "a parsed subject does not rebuild its string"
            );
            assert_eq!(
                CommandSubject::parse(&subject.to_subject()).as_ref(),
                Ok(&subject)
            );
            let filter = device_command_filter(&subject.device);
            let prefix = filter.trim_end_matches('*');
            assert!(
                text.starts_with(prefix) && !text[prefix.len()..].contains('.'),
                "subject {text:?} escapes its device's filter {filter:?}"
            );
        }
        Err(NameError::InvalidSubject { value }) => assert_eq!(value, text),
        Err(error @ NameError::InvalidLabel { .. }) => {
            let device = text.split('.').nth(1).unwrap_or_default();
            check_label_error(&error, NameKind::DeviceId, device);
        }
        Err(NameError::UnknownVerb { value }) => {
            assert!(
                text.ends_with(&format!(".{value}")),
                "UnknownVerb {value:?} is not the verb of {text:?}"
            );
            assert!(value.parse::<Verb>().is_err());
        }
        Err(other) => panic!("subject {text:?} gave {other:?}"),
    }
}
