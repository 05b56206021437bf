//! Every name that crosses the wire: KV buckets, keys, subjects, and the
//! identifiers inside them.
//!
//! This module owns the one function that builds and the one function that
//! parses each key and subject, so the operator, the agent and the simulator
//! can never disagree on a format. It never touches a network: it only turns
//! strings into typed names and back.
//!
//! Identifiers (device ids, deployment names, service and init-container
//! names) follow one rule, [`LABEL_RULE`]: 1 to 63 characters of lowercase
//! ASCII letters, digits and `-`, starting and ending with a letter or digit.
//! Dots are rejected because NATS uses them to separate subject tokens, so a
//! dotted device id could read or write another device's keys.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::wire::text::Quoted;

/// The JetStream KV bucket the operator writes desired state into.
pub const DESIRED_BUCKET: &str = "podfleet-desired";
/// The JetStream KV bucket agents write per-deployment reported state into.
pub const STATE_BUCKET: &str = "podfleet-state";
/// The JetStream KV bucket agents write heartbeats into, one key per device.
pub const HEARTBEAT_BUCKET: &str = "podfleet-heartbeats";
/// The JetStream KV bucket fleet deployments are kept in, one key per
/// deployment name. Written by administrators (the `podfleet` CLI), read by
/// the fleet controller; devices cannot read it.
pub const DEPLOYMENTS_BUCKET: &str = "podfleet-deployments";
/// The JetStream KV bucket device records (administrator-set labels) are kept
/// in, one key per device id. Devices cannot read it.
pub const DEVICES_BUCKET: &str = "podfleet-devices";
/// The JetStream KV bucket the fleet controller writes each fleet
/// deployment's aggregated status into, one key per deployment name.
pub const STATUS_BUCKET: &str = "podfleet-status";
/// The first token of every command subject.
pub const COMMAND_SUBJECT_PREFIX: &str = "device-commands";

/// The rule every identifier must follow, as shown in error messages.
pub const LABEL_RULE: &str =
    "1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit";

/// Longest identifier accepted.
pub const MAX_LABEL_LEN: usize = 63;

/// [`LABEL_RULE`] as a JSON Schema (ECMA-262) pattern, to be paired with a
/// `maxLength` of [`MAX_LABEL_LEN`]: together they accept exactly what
/// [`validate_label`] accepts.
pub const LABEL_PATTERN: &str = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$";

/// Which kind of identifier a [`NameError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A device id.
    DeviceId,
    /// A deployment name.
    Deployment,
    /// A service name inside a score.
    Service,
    /// An init-container name inside a score.
    InitContainer,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::DeviceId => "device id",
            NameKind::Deployment => "deployment name",
            NameKind::Service => "service name",
            NameKind::InitContainer => "init container name",
        })
    }
}

/// Why a name, key or subject was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// An identifier broke [`LABEL_RULE`].
    #[error("invalid {kind} {}: {problem}; the rule is {LABEL_RULE}", Quoted(.value))]
    InvalidLabel {
        /// What the identifier names.
        kind: NameKind,
        /// The offending value, verbatim.
        value: String,
        /// The part of the rule it broke.
        problem: &'static str,
    },
    /// A KV key did not have the `<device_id>.<deployment>` shape.
    #[error("invalid key {}: expected <device_id>.<deployment>", Quoted(.value))]
    InvalidKey {
        /// The offending key.
        value: String,
    },
    /// A subject did not have the `device-commands.<device_id>.<verb>` shape.
    #[error(
        "invalid command subject {}: expected {COMMAND_SUBJECT_PREFIX}.<device_id>.<verb>", Quoted(.value)
    )]
    InvalidSubject {
        /// The offending subject.
        value: String,
    },
    /// A subject named a verb this agent does not know.
    #[error("unknown command verb {}: expected one of ping, logs, exec", Quoted(.value))]
    UnknownVerb {
        /// The offending verb.
        value: String,
    },
}

/// Checks `value` against [`LABEL_RULE`].
///
/// # Errors
/// [`NameError::InvalidLabel`] naming the value, its kind and the broken part
/// of the rule.
pub fn validate_label(kind: NameKind, value: &str) -> Result<(), NameError> {
    let problem = if value.is_empty() {
        Some("it is empty")
    } else if value.len() > MAX_LABEL_LEN {
        Some("it is longer than 63 characters")
    } else if value.contains('.') {
        Some("it contains '.', the NATS token separator")
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("it contains a character other than a-z, 0-9 or '-'")
    } else if value.starts_with('-') || value.ends_with('-') {
        Some("it starts or ends with '-'")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(NameError::InvalidLabel {
            kind,
            value: value.to_owned(),
            problem,
        }),
        None => Ok(()),
    }
}

macro_rules! label_type {
    ($(#[$doc:meta])* $name:ident, $kind:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `value`.
            ///
            /// # Errors
            /// [`NameError::InvalidLabel`] when `value` breaks [`LABEL_RULE`].
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                validate_label($kind, &value)?;
                Ok(Self(value))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                Self::new(raw).map_err(serde::de::Error::custom)
            }
        }

        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_LABEL_LEN,
                    "pattern": LABEL_PATTERN,
                    "description": LABEL_RULE,
                })
            }
        }
    };
}

label_type!(
    /// A device's id: the first token of its keys and subjects.
    DeviceId,
    NameKind::DeviceId
);
label_type!(
    /// A deployment's name, unique per device.
    DeploymentName,
    NameKind::Deployment
);

/// A `<device_id>.<deployment>` key, used in both the desired-state and the
/// reported-state bucket.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeploymentKey {
    /// The device the deployment runs on.
    pub device: DeviceId,
    /// The deployment's name.
    pub deployment: DeploymentName,
}

impl DeploymentKey {
    /// Builds the key string.
    pub fn to_key(&self) -> String {
        format!("{}.{}", self.device, self.deployment)
    }

    /// Parses a key string.
    ///
    /// # Errors
    /// [`NameError::InvalidKey`] when it is not two dot-separated tokens, or
    /// [`NameError::InvalidLabel`] when a token breaks [`LABEL_RULE`].
    pub fn parse(key: &str) -> Result<Self, NameError> {
        let mut tokens = key.split('.');
        match (tokens.next(), tokens.next(), tokens.next()) {
            (Some(device), Some(deployment), None) => Ok(Self {
                device: DeviceId::new(device)?,
                deployment: DeploymentName::new(deployment)?,
            }),
            _ => Err(NameError::InvalidKey {
                value: key.to_owned(),
            }),
        }
    }
}

/// `$KV.<bucket>.<key>`: the subject a KV entry is stored under.
pub fn kv_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// The KV key filter that watches every deployment of `device` and nothing else.
pub fn device_key_filter(device: &DeviceId) -> String {
    format!("{device}.*")
}

/// The heartbeat key of `device` in [`HEARTBEAT_BUCKET`].
pub fn heartbeat_key(device: &DeviceId) -> String {
    device.to_string()
}

/// A request/reply verb on the command subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verb {
    /// Liveness probe: replies with the device id, version and uptime.
    Ping,
    /// Tail of a service container's logs.
    Logs,
    /// Runs an argv inside a service container (off unless the agent allows it).
    Exec,
}

impl Verb {
    /// Every verb, in a stable order.
    pub const ALL: [Verb; 3] = [Verb::Ping, Verb::Logs, Verb::Exec];

    /// The verb as its subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Ping => "ping",
            Verb::Logs => "logs",
            Verb::Exec => "exec",
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Verb {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Verb::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| NameError::UnknownVerb {
                value: s.to_owned(),
            })
    }
}

/// A `device-commands.<device_id>.<verb>` subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CommandSubject {
    /// The device that answers.
    pub device: DeviceId,
    /// What is asked.
    pub verb: Verb,
}

impl CommandSubject {
    /// Builds the subject string.
    pub fn to_subject(&self) -> String {
        format!("{COMMAND_SUBJECT_PREFIX}.{}.{}", self.device, self.verb)
    }

    /// Parses a subject string.
    ///
    /// # Errors
    /// [`NameError::InvalidSubject`] for the wrong shape or prefix,
    /// [`NameError::InvalidLabel`] for a bad device id and
    /// [`NameError::UnknownVerb`] for a verb this agent does not know.
    pub fn parse(subject: &str) -> Result<Self, NameError> {
        let mut tokens = subject.split('.');
        match (tokens.next(), tokens.next(), tokens.next(), tokens.next()) {
            (Some(COMMAND_SUBJECT_PREFIX), Some(device), Some(verb), None) => Ok(Self {
                device: DeviceId::new(device)?,
                verb: verb.parse()?,
            }),
            _ => Err(NameError::InvalidSubject {
                value: subject.to_owned(),
            }),
        }
    }
}

/// The subject filter an agent subscribes to: every verb for `device`.
pub fn device_command_filter(device: &DeviceId) -> String {
    format!("{COMMAND_SUBJECT_PREFIX}.{device}.*")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(kind: NameKind, value: &str) -> String {
        validate_label(kind, value)
            .expect_err("value should be rejected")
            .to_string()
    }

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "rpi-01", "0", "x".repeat(63).as_str()] {
            assert!(DeviceId::new(ok).is_ok(), "{ok} should be accepted");
        }
    }

    #[test]
    fn every_rule_violation_is_named() {
        let cases = [
            ("", "it is empty"),
            (&"a".repeat(64), "longer than 63"),
            ("rpi.01", "contains '.'"),
            ("RPI", "other than a-z"),
            ("rpi_01", "other than a-z"),
            ("-rpi", "starts or ends with '-'"),
            ("rpi-", "starts or ends with '-'"),
        ];
        for (value, expected) in cases {
            let msg = problem(NameKind::DeviceId, value);
            assert!(msg.contains(expected), "{value:?}: {msg}");
            assert!(
                msg.contains(&format!("{value:?}")),
                "names the value: {msg}"
            );
            assert!(msg.contains(LABEL_RULE), "states the rule: {msg}");
        }
        assert_eq!(
            problem(NameKind::Deployment, "Web"),
            format!(
                "invalid deployment name \"Web\": it contains a character other than a-z, 0-9 or '-'; the rule is {LABEL_RULE}"
            )
        );
    }

    #[test]
    fn key_round_trips() {
        let key = DeploymentKey {
            device: DeviceId::new("rpi-01").unwrap(),
            deployment: DeploymentName::new("web").unwrap(),
        };
        assert_eq!(key.to_key(), "rpi-01.web");
        assert_eq!(DeploymentKey::parse("rpi-01.web").unwrap(), key);
    }

    #[test]
    fn bad_keys_are_typed_errors() {
        assert_eq!(
            DeploymentKey::parse("rpi-01").unwrap_err().to_string(),
            "invalid key \"rpi-01\": expected <device_id>.<deployment>"
        );
        assert!(matches!(
            DeploymentKey::parse("rpi-01.web.extra"),
            Err(NameError::InvalidKey { .. })
        ));
        assert!(matches!(
            DeploymentKey::parse("rpi-01.Web"),
            Err(NameError::InvalidLabel {
                kind: NameKind::Deployment,
                ..
            })
        ));
    }

    #[test]
    fn subject_round_trips_for_every_verb() {
        for verb in Verb::ALL {
            let subject = CommandSubject {
                device: DeviceId::new("rpi-01").unwrap(),
                verb,
            };
            let text = subject.to_subject();
            assert_eq!(text, format!("device-commands.rpi-01.{verb}"));
            assert_eq!(CommandSubject::parse(&text).unwrap(), subject);
        }
    }

    #[test]
    fn bad_subjects_are_typed_errors() {
        assert_eq!(
            CommandSubject::parse("device-commands.rpi-01.reboot")
                .unwrap_err()
                .to_string(),
            "unknown command verb \"reboot\": expected one of ping, logs, exec"
        );
        assert_eq!(
            CommandSubject::parse("other.rpi-01.ping").unwrap_err().to_string(),
            "invalid command subject \"other.rpi-01.ping\": expected device-commands.<device_id>.<verb>"
        );
        assert!(matches!(
            CommandSubject::parse("device-commands.rpi-01.ping.x"),
            Err(NameError::InvalidSubject { .. })
        ));
    }

    #[test]
    fn filters_stay_inside_one_device() {
        let device = DeviceId::new("rpi-01").unwrap();
        assert_eq!(device_key_filter(&device), "rpi-01.*");
        assert_eq!(device_command_filter(&device), "device-commands.rpi-01.*");
        assert_eq!(heartbeat_key(&device), "rpi-01");
    }

    #[test]
    fn serde_validates_names() {
        let err = serde_json::from_str::<DeviceId>("\"a.b\"").unwrap_err();
        assert!(err.to_string().contains("NATS token separator"), "{err}");
    }
}
