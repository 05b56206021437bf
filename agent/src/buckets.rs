//! podfleet's NATS KV buckets, made by podfleet itself.
//!
//! [`ensure_bucket`] makes sure one KV bucket exists: it asks for the
//! bucket's stream (`$JS.API.STREAM.INFO.KV_<bucket>`) and, only when there
//! is none, creates it (`$JS.API.STREAM.CREATE.KV_<bucket>`) with the stream
//! configuration a NATS KV bucket has (the one nats.go and async-nats give
//! it, see [`BucketSettings::stream_config`]). A bucket that exists is never
//! altered, whatever its settings: [`Ensured::Existing`] says how they
//! differ from those asked for.
//!
//! Both are raw JetStream API requests on purpose: async-nats 0.51's
//! `create_key_value` cannot decode nats-server 2.9's answer, and a raw
//! request works the same on nats-server 2.9 and 2.10. This module owns the
//! bucket settings and those two requests; it never writes, reads or deletes
//! entries, and never updates or deletes a stream. The agent calls it for
//! its three buckets ([`fleet_buckets`]) at connect; a control plane can
//! call it for its own.

use std::fmt;
use std::time::Duration;

use podfleet_core::wire::names::{DESIRED_BUCKET, HEARTBEAT_BUCKET, STATE_BUCKET};
use serde::Deserialize;
use serde_json::json;

/// The largest history nats-server keeps per key.
pub const MAX_HISTORY: u8 = 64;
/// The most replicas a JetStream stream can have.
pub const MAX_REPLICAS: u8 = 5;
/// The default bound on one value: 1 MiB, nats-server's default
/// `max_payload`.
pub const DEFAULT_MAX_VALUE_SIZE: u32 = 1024 * 1024;
/// The history kept for desired state, so an operator can see what was
/// deployed before.
pub const DESIRED_HISTORY: u8 = 5;

/// The shortest TTL nats-server accepts for a stream's messages.
const MIN_MAX_AGE: Duration = Duration::from_millis(100);
/// The duplicate window nats gives a KV stream without a shorter TTL.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// nats-server's error code for "stream not found".
const STREAM_NOT_FOUND: u64 = 10059;
/// nats-server's error code for "stream name already in use with a
/// different configuration": someone else created it meanwhile.
const STREAM_NAME_IN_USE: u64 = 10058;

/// The settings of one KV bucket. Defaults: one replica, a history of one
/// value per key, values up to 1 MiB, no bound on the bucket's size, no
/// TTL, file storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketSettings {
    name: String,
    replicas: u8,
    history: u8,
    max_value_size: u32,
    max_bytes: Option<u64>,
    max_age: Option<Duration>,
}

impl BucketSettings {
    /// The bucket `name` with the default settings.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            replicas: 1,
            history: 1,
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
            max_bytes: None,
            max_age: None,
        }
    }

    /// How many servers hold the bucket (1 to 5).
    #[must_use]
    pub fn replicas(mut self, replicas: u8) -> Self {
        self.replicas = replicas;
        self
    }

    /// How many values are kept per key (1 to 64).
    #[must_use]
    pub fn history(mut self, history: u8) -> Self {
        self.history = history;
        self
    }

    /// The largest value the bucket accepts, in bytes.
    #[must_use]
    pub fn max_value_size(mut self, bytes: u32) -> Self {
        self.max_value_size = bytes;
        self
    }

    /// The most bytes the whole bucket may hold; past it, puts are refused.
    #[must_use]
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = Some(bytes);
        self
    }

    /// How long a value is kept after it was written (at least 100 ms).
    #[must_use]
    pub fn max_age(mut self, ttl: Duration) -> Self {
        self.max_age = Some(ttl);
        self
    }

    /// The bucket's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `KV_<bucket>`: the stream behind the bucket.
    pub fn stream(&self) -> String {
        format!("KV_{}", self.name)
    }

    /// Checks the settings against nats-server's rules.
    ///
    /// # Errors
    /// [`BucketError::InvalidSettings`] naming the bucket and the rule.
    pub fn validate(&self) -> Result<(), BucketError> {
        let invalid = |rule: String| {
            Err(BucketError::InvalidSettings {
                bucket: self.name.clone(),
                rule,
            })
        };
        let name_ok = !self.name.is_empty()
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            return invalid("a bucket name is one or more of A-Z, a-z, 0-9, '-' and '_'".into());
        }
        if !(1..=MAX_REPLICAS).contains(&self.replicas) {
            return invalid(format!(
                "replicas is {}; it must be 1 to {MAX_REPLICAS}",
                self.replicas
            ));
        }
        if !(1..=MAX_HISTORY).contains(&self.history) {
            return invalid(format!(
                "history is {}; it must be 1 to {MAX_HISTORY}",
                self.history
            ));
        }
        if self.max_value_size == 0 || i32::try_from(self.max_value_size).is_err() {
            return invalid(format!(
                "max value size is {} bytes; it must be 1 to {}",
                self.max_value_size,
                i32::MAX
            ));
        }
        if let Some(max_bytes) = self.max_bytes {
            if max_bytes < u64::from(self.max_value_size) || i64::try_from(max_bytes).is_err() {
                return invalid(format!(
                    "max bytes is {max_bytes}; it must be at least the max value size ({}) and at most {}",
                    self.max_value_size,
                    i64::MAX
                ));
            }
        }
        if let Some(max_age) = self.max_age {
            if max_age < MIN_MAX_AGE || i64::try_from(max_age.as_nanos()).is_err() {
                return invalid(format!(
                    "the TTL is {max_age:?}; it must be at least {MIN_MAX_AGE:?}"
                ));
            }
        }
        Ok(())
    }

    /// The stream configuration that makes this bucket, as sent to
    /// `$JS.API.STREAM.CREATE.KV_<bucket>`: what nats.go (and so the `nats`
    /// CLI) and async-nats send for a KV bucket.
    ///
    /// - `subjects` `["$KV.<bucket>.>"]`, `retention` `limits`, `storage`
    ///   `file`, `discard` `new`;
    /// - `max_msgs_per_subject` = history, `num_replicas` = replicas,
    ///   `max_msg_size` = max value size, `max_bytes` (or -1), `max_age` =
    ///   the TTL in nanoseconds (or 0: none), `max_msgs` and `max_consumers`
    ///   -1;
    /// - `duplicate_window` 2 minutes, or the TTL when that is shorter;
    /// - `allow_rollup_hdrs` true (purge), `deny_delete` true (deletes are
    ///   markers, not message removal), `deny_purge` false, `allow_direct`
    ///   true (direct get).
    pub fn stream_config(&self) -> serde_json::Value {
        let max_age = self.max_age.map_or(0, nanos);
        let duplicate_window = match self.max_age {
            Some(ttl) if ttl < DUPLICATE_WINDOW => nanos(ttl),
            _ => nanos(DUPLICATE_WINDOW),
        };
        json!({
            "name": self.stream(),
            "subjects": [format!("$KV.{}.>", self.name)],
            "retention": "limits",
            "max_consumers": -1,
            "max_msgs": -1,
            "max_bytes": self.max_bytes.map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
            "max_age": max_age,
            "max_msgs_per_subject": i64::from(self.history),
            "max_msg_size": i64::from(self.max_value_size),
            "storage": "file",
            "discard": "new",
            "num_replicas": self.replicas,
            "duplicate_window": duplicate_window,
            "allow_rollup_hdrs": true,
            "deny_delete": true,
            "deny_purge": false,
            "allow_direct": true,
        })
    }

    /// How the configuration of an existing stream differs from these
    /// settings, in the settings' own terms.
    fn differences(&self, found: &FoundConfig) -> Vec<Difference> {
        let wanted_bytes = self
            .max_bytes
            .map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX));
        let wanted_age = self.max_age.map_or(0, nanos);
        let checks: [(&'static str, i64, i64); 5] = [
            (
                "history",
                found.max_msgs_per_subject,
                i64::from(self.history),
            ),
            ("replicas", found.num_replicas, i64::from(self.replicas)),
            (
                "max_value_size",
                found.max_msg_size,
                i64::from(self.max_value_size),
            ),
            ("max_bytes", found.max_bytes, wanted_bytes),
            ("max_age_ns", found.max_age, wanted_age),
        ];
        checks
            .into_iter()
            .filter(|(_, found, wanted)| found != wanted)
            .map(|(setting, found, wanted)| Difference {
                setting,
                found,
                wanted,
            })
            .collect()
    }
}

/// The agent's three buckets: desired state (a history of
/// [`DESIRED_HISTORY`]), reported state and heartbeats (the newest value
/// only), each with one replica and values up to 1 MiB.
pub fn fleet_buckets() -> [BucketSettings; 3] {
    [
        BucketSettings::new(DESIRED_BUCKET).history(DESIRED_HISTORY),
        BucketSettings::new(STATE_BUCKET),
        BucketSettings::new(HEARTBEAT_BUCKET),
    ]
}

/// What [`ensure_bucket`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ensured {
    /// There was no such bucket; it was created with the settings asked for.
    Created,
    /// The bucket exists and was left as it is.
    Existing {
        /// Its settings that differ from those asked for (none when equal).
        differences: Vec<Difference>,
    },
}

/// One setting of an existing bucket that differs from the one asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// `history`, `replicas`, `max_value_size`, `max_bytes` or `max_age_ns`
    /// (-1 and 0 mean unbounded, as in nats-server's stream configuration).
    pub setting: &'static str,
    /// The bucket's value.
    pub found: i64,
    /// The value asked for.
    pub wanted: i64,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is {} (wanted {})",
            self.setting, self.found, self.wanted
        )
    }
}

/// Why [`ensure_bucket`] could not tell that the bucket exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BucketError {
    /// The settings break one of nats-server's rules; nothing was sent.
    #[error("bucket {bucket}: {rule}")]
    InvalidSettings {
        /// The bucket.
        bucket: String,
        /// The rule broken.
        rule: String,
    },
    /// Nothing answered on the JetStream API: JetStream is not enabled for
    /// this account.
    #[error("bucket {bucket}: no JetStream answers on {subject}; is JetStream enabled for this account?")]
    NoJetStream {
        /// The bucket.
        bucket: String,
        /// The request's subject.
        subject: String,
    },
    /// No answer in time. nats-server drops a request that the user may not
    /// publish (and tells the client so in a `Permissions Violation` error),
    /// so this is what a missing permission looks like too.
    #[error("bucket {bucket}: no answer on {subject} within {waited:?} (not permitted for this user, or JetStream is unavailable)")]
    TimedOut {
        /// The bucket.
        bucket: String,
        /// The request's subject.
        subject: String,
        /// How long the request waited.
        waited: Duration,
    },
    /// The request could not be sent (the connection is down...).
    #[error("bucket {bucket}: request on {subject} failed: {message}")]
    Request {
        /// The bucket.
        bucket: String,
        /// The request's subject.
        subject: String,
        /// The client's error.
        message: String,
    },
    /// JetStream answered with an error.
    #[error("bucket {bucket}: {subject} was refused: {description} (code {code}, error code {err_code})")]
    Refused {
        /// The bucket.
        bucket: String,
        /// The request's subject.
        subject: String,
        /// The HTTP-like status.
        code: u16,
        /// nats-server's own error code.
        err_code: u64,
        /// nats-server's description.
        description: String,
    },
    /// The answer is not a JetStream API answer.
    #[error("bucket {bucket}: unreadable answer on {subject}: {message}")]
    BadAnswer {
        /// The bucket.
        bucket: String,
        /// The request's subject.
        subject: String,
        /// Why it does not decode.
        message: String,
    },
}

impl BucketError {
    /// Whether asking again on a later connection may help: the connection
    /// failed under the request. A refusal, a timeout (a missing permission
    /// looks like one) or bad settings will be the same next time.
    pub fn is_transient(&self) -> bool {
        matches!(self, BucketError::Request { .. })
    }
}

/// Makes sure the KV bucket `settings` describes exists, creating it when
/// there is none, and never altering one that exists. Each of the (at most
/// three) requests waits up to `timeout` for its answer.
///
/// The user needs permission to publish to
/// `$JS.API.STREAM.INFO.KV_<bucket>` and, to create the bucket,
/// `$JS.API.STREAM.CREATE.KV_<bucket>`, and to receive on its inbox.
///
/// # Errors
/// [`BucketError`]: invalid settings (nothing is sent), no JetStream, no
/// answer in time (which is also what a missing permission gives), a
/// refusal, a failed request or an unreadable answer.
pub async fn ensure_bucket(
    client: &async_nats::Client,
    settings: &BucketSettings,
    timeout: Duration,
) -> Result<Ensured, BucketError> {
    settings.validate()?;
    if let Some(found) = stream_info(client, settings, timeout).await? {
        return Ok(Ensured::Existing {
            differences: settings.differences(&found),
        });
    }
    let subject = format!("$JS.API.STREAM.CREATE.{}", settings.stream());
    let body = settings.stream_config().to_string();
    let answer = request(client, settings, &subject, body.into_bytes(), timeout).await?;
    match parse_answer(settings, &subject, &answer)? {
        Answer::Config(_) => Ok(Ensured::Created),
        Answer::Error(error) if error.err_code == STREAM_NAME_IN_USE => {
            // Created by someone else since the info request.
            let found = stream_info(client, settings, timeout).await?;
            Ok(Ensured::Existing {
                differences: found
                    .map(|found| settings.differences(&found))
                    .unwrap_or_default(),
            })
        }
        Answer::Error(error) => Err(error.refused(settings, subject)),
    }
}

/// The configuration of the bucket's stream, or `None` when there is none.
async fn stream_info(
    client: &async_nats::Client,
    settings: &BucketSettings,
    timeout: Duration,
) -> Result<Option<FoundConfig>, BucketError> {
    let subject = format!("$JS.API.STREAM.INFO.{}", settings.stream());
    let answer = request(client, settings, &subject, Vec::new(), timeout).await?;
    match parse_answer(settings, &subject, &answer)? {
        Answer::Config(found) => Ok(Some(found)),
        Answer::Error(error) if error.err_code == STREAM_NOT_FOUND => Ok(None),
        Answer::Error(error) => Err(error.refused(settings, subject)),
    }
}

async fn request(
    client: &async_nats::Client,
    settings: &BucketSettings,
    subject: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Vec<u8>, BucketError> {
    use async_nats::RequestErrorKind;
    let request = async_nats::Request::new()
        .payload(body.into())
        .timeout(Some(timeout));
    match client.send_request(subject.to_owned(), request).await {
        Ok(message) => Ok(message.payload.to_vec()),
        Err(error) => {
            let bucket = settings.name.clone();
            let subject = subject.to_owned();
            Err(match error.kind() {
                RequestErrorKind::TimedOut => BucketError::TimedOut {
                    bucket,
                    subject,
                    waited: timeout,
                },
                RequestErrorKind::NoResponders => BucketError::NoJetStream { bucket, subject },
                _ => BucketError::Request {
                    bucket,
                    subject,
                    message: error.to_string(),
                },
            })
        }
    }
}

/// A JetStream API answer about a stream: its configuration, or an error.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Config(FoundConfig),
    Error(ApiError),
}

/// The parts of a stream's configuration that [`BucketSettings`] sets
/// and an existing bucket is compared on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct FoundConfig {
    #[serde(default = "unbounded")]
    max_msgs_per_subject: i64,
    #[serde(default = "one")]
    num_replicas: i64,
    #[serde(default = "unbounded")]
    max_msg_size: i64,
    #[serde(default = "unbounded")]
    max_bytes: i64,
    #[serde(default)]
    max_age: i64,
}

fn unbounded() -> i64 {
    -1
}

fn one() -> i64 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

impl ApiError {
    fn refused(self, settings: &BucketSettings, subject: String) -> BucketError {
        BucketError::Refused {
            bucket: settings.name.clone(),
            subject,
            code: self.code,
            err_code: self.err_code,
            description: self.description,
        }
    }
}

fn parse_answer(
    settings: &BucketSettings,
    subject: &str,
    bytes: &[u8],
) -> Result<Answer, BucketError> {
    #[derive(Deserialize)]
    struct Raw {
        error: Option<ApiError>,
        config: Option<FoundConfig>,
    }
    let bad = |message: String| BucketError::BadAnswer {
        bucket: settings.name.clone(),
        subject: subject.to_owned(),
        message,
    };
    let raw: Raw = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    match (raw.error, raw.config) {
        (Some(error), _) => Ok(Answer::Error(error)),
        (None, Some(config)) => Ok(Answer::Config(config)),
        (None, None) => Err(bad("neither a stream configuration nor an error".into())),
    }
}

fn nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_config_is_a_kv_buckets() {
        let config = BucketSettings::new("podfleet-desired")
            .history(5)
            .stream_config();
        assert_eq!(
            config,
            json!({
                "name": "KV_podfleet-desired",
                "subjects": ["$KV.podfleet-desired.>"],
                "retention": "limits",
                "max_consumers": -1,
                "max_msgs": -1,
                "max_bytes": -1,
                "max_age": 0,
                "max_msgs_per_subject": 5,
                "max_msg_size": 1_048_576,
                "storage": "file",
                "discard": "new",
                "num_replicas": 1,
                "duplicate_window": 120_000_000_000_i64,
                "allow_rollup_hdrs": true,
                "deny_delete": true,
                "deny_purge": false,
                "allow_direct": true,
            })
        );
    }

    #[test]
    fn a_short_ttl_shortens_the_duplicate_window() {
        let config = BucketSettings::new("b")
            .max_age(Duration::from_secs(30))
            .max_bytes(1 << 30)
            .replicas(3)
            .stream_config();
        assert_eq!(config["max_age"], json!(30_000_000_000_i64));
        assert_eq!(config["duplicate_window"], json!(30_000_000_000_i64));
        assert_eq!(config["max_bytes"], json!(1_i64 << 30));
        assert_eq!(config["num_replicas"], json!(3));
        let long = BucketSettings::new("b")
            .max_age(Duration::from_secs(3600))
            .stream_config();
        assert_eq!(long["duplicate_window"], json!(120_000_000_000_i64));
    }

    #[test]
    fn the_fleet_buckets_have_the_documented_settings() {
        let [desired, state, heartbeats] = fleet_buckets();
        assert_eq!(desired.name(), "podfleet-desired");
        assert_eq!(desired.stream_config()["max_msgs_per_subject"], json!(5));
        for bucket in [&state, &heartbeats] {
            assert_eq!(bucket.stream_config()["max_msgs_per_subject"], json!(1));
        }
        assert_eq!(state.stream(), "KV_podfleet-state");
        assert_eq!(heartbeats.stream(), "KV_podfleet-heartbeats");
        for bucket in fleet_buckets() {
            assert_eq!(bucket.validate(), Ok(()));
            assert_eq!(bucket.stream_config()["max_msg_size"], json!(1_048_576));
            assert_eq!(bucket.stream_config()["num_replicas"], json!(1));
        }
    }

    #[test]
    fn invalid_settings_name_the_bucket_and_the_rule() {
        let rule = |settings: BucketSettings| settings.validate().unwrap_err().to_string();
        assert_eq!(
            rule(BucketSettings::new("a.b")),
            "bucket a.b: a bucket name is one or more of A-Z, a-z, 0-9, '-' and '_'"
        );
        assert_eq!(
            rule(BucketSettings::new("b").history(65)),
            "bucket b: history is 65; it must be 1 to 64"
        );
        assert_eq!(
            rule(BucketSettings::new("b").replicas(0)),
            "bucket b: replicas is 0; it must be 1 to 5"
        );
        assert!(rule(BucketSettings::new("b").max_value_size(0)).contains("max value size is 0"));
        assert!(rule(BucketSettings::new("b").max_bytes(10)).contains("max bytes is 10"));
        assert!(rule(BucketSettings::new("b").max_age(Duration::from_millis(10))).contains("TTL"));
    }

    #[test]
    fn answers_are_a_config_or_an_error() {
        let settings = BucketSettings::new("podfleet-state");
        let info = br#"{"type":"io.nats.jetstream.api.v1.stream_info_response","config":{"name":"KV_podfleet-state","max_msgs_per_subject":3,"num_replicas":1,"max_msg_size":-1,"max_bytes":-1,"max_age":0,"deny_delete":true},"state":{"messages":0}}"#;
        let Ok(Answer::Config(found)) = parse_answer(&settings, "s", info) else {
            panic!("not a config");
        };
        assert_eq!(
            settings.differences(&found),
            vec![
                Difference {
                    setting: "history",
                    found: 3,
                    wanted: 1
                },
                Difference {
                    setting: "max_value_size",
                    found: -1,
                    wanted: 1_048_576
                },
            ]
        );
        assert_eq!(
            settings.differences(&found)[0].to_string(),
            "history is 3 (wanted 1)"
        );
        let missing = br#"{"type":"io.nats.jetstream.api.v1.stream_info_response","error":{"code":404,"err_code":10059,"description":"stream not found"}}"#;
        assert_eq!(
            parse_answer(&settings, "s", missing),
            Ok(Answer::Error(ApiError {
                code: 404,
                err_code: STREAM_NOT_FOUND,
                description: "stream not found".into()
            }))
        );
        assert!(matches!(
            parse_answer(&settings, "s", b"{}"),
            Err(BucketError::BadAnswer { .. })
        ));
        assert!(matches!(
            parse_answer(&settings, "s", b"nope"),
            Err(BucketError::BadAnswer { .. })
        ));
    }

    #[test]
    fn only_a_failed_request_is_worth_repeating() {
        let request = BucketError::Request {
            bucket: "b".into(),
            subject: "s".into(),
            message: "disconnected".into(),
        };
        let timed_out = BucketError::TimedOut {
            bucket: "b".into(),
            subject: "s".into(),
            waited: Duration::from_secs(5),
        };
        assert!(request.is_transient());
        assert!(!timed_out.is_transient());
    }
}
