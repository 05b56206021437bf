//! What a pull's answer means: podman's progress stream read line by line,
//! the progress figures kept for the loop to look at, and the mapping of
//! podman's and the registries' error texts onto [`PullFailure`]s.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use podfleet_core::runtime::PullProgress;
use podfleet_core::wire::PullFailure;
use serde::Deserialize;

/// The progress of the pulls under way, by image reference as the
/// operation names it. Shared by the clones of a runtime.
#[derive(Debug, Clone, Default)]
pub(super) struct PullsUnderWay(Arc<Mutex<BTreeMap<String, PullProgress>>>);

impl PullsUnderWay {
    pub(super) fn get(&self, image: &str) -> Option<PullProgress> {
        self.lock().get(image).copied()
    }

    /// Records `image`'s progress until the returned guard is dropped (the
    /// pull ended, or its future was dropped at the reconciler's deadline).
    pub(super) fn track(&self, image: &str) -> PullTracker {
        self.lock()
            .insert(image.to_owned(), PullProgress::default());
        PullTracker {
            pulls: self.clone(),
            image: image.to_owned(),
            layers: BTreeMap::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PullProgress>> {
        // The map holds plain figures: a panic elsewhere leaves none half-written.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One pull's entry in [`PullsUnderWay`].
pub(super) struct PullTracker {
    pulls: PullsUnderWay,
    image: String,
    /// Per layer id: (downloaded, total, done). A layer of unknown size
    /// counts for nothing in the total until it reports one.
    layers: BTreeMap<String, (u64, u64, bool)>,
}

impl PullTracker {
    /// Takes in one line of the stream's progress.
    pub(super) fn record(&mut self, message: &PullMessage) {
        let Some(id) = &message.id else {
            return;
        };
        let done = matches!(
            message.status.as_deref(),
            Some("Download complete" | "Pull complete" | "Already exists")
        );
        let current = message
            .progress_detail
            .as_ref()
            .and_then(|d| d.current)
            .and_then(|c| u64::try_from(c).ok());
        let total = message
            .progress_detail
            .as_ref()
            .and_then(|d| d.total)
            .and_then(|t| u64::try_from(t).ok());
        if current.is_none() && !done {
            // "Pulling fs layer", "Waiting", the image's own lines.
            return;
        }
        let layer = self.layers.entry(id.clone()).or_default();
        if let Some(current) = current {
            layer.0 = current;
            layer.1 = total.unwrap_or_default();
        }
        layer.2 |= done;
        let progress =
            self.layers
                .values()
                .fold(PullProgress::default(), |sum, (current, total, done)| {
                    PullProgress {
                        downloaded: sum.downloaded.saturating_add(*current),
                        total: sum.total.saturating_add(*total),
                        layers_done: sum.layers_done + u32::from(*done),
                        layers: sum.layers + 1,
                    }
                });
        self.pulls.lock().insert(self.image.clone(), progress);
    }
}

impl Drop for PullTracker {
    fn drop(&mut self) {
        self.pulls.lock().remove(&self.image);
    }
}

/// One line of `POST /images/create`'s answer (Docker's JSON message).
#[derive(Debug, Default, Deserialize)]
pub(super) struct PullMessage {
    /// The layer (or, at the end, the image) the line is about.
    #[serde(default)]
    id: Option<String>,
    /// What happens to it: `Downloading`, `Download complete`...
    #[serde(default)]
    status: Option<String>,
    #[serde(default, rename = "progressDetail")]
    progress_detail: Option<ProgressDetail>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default, rename = "errorDetail")]
    error_detail: Option<ErrorDetail>,
}

#[derive(Debug, Default, Deserialize)]
struct ProgressDetail {
    #[serde(default)]
    current: Option<i64>,
    #[serde(default)]
    total: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: Option<String>,
}

impl PullMessage {
    /// The error this line reports, if it reports one.
    pub(super) fn error(&self) -> Option<&str> {
        self.error_detail
            .as_ref()
            .and_then(|detail| detail.message.as_deref())
            .or(self.error.as_deref())
            .filter(|message| !message.is_empty())
    }
}

/// Why a pull failed, from podman's HTTP status (when it refused the
/// request outright) and its message (the registry's words wrapped in
/// containers/image's, e.g. `initializing source docker://h/x:1: reading
/// manifest 1 in h/x: manifest unknown`).
///
/// The disk comes first (a full disk can fail any step), then reachability
/// (a dial error can quote a host that looks like anything), then what
/// the registry said about the credentials, then about the name.
pub(super) fn pull_failure(status: Option<u16>, message: &str) -> PullFailure {
    let message = message.to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|needle| message.contains(needle));
    if has(&["no space left on device", "disk quota exceeded"]) {
        PullFailure::NoSpace
    } else if has(&[
        "connection refused",
        "no such host",
        "i/o timeout",
        "network is unreachable",
        "no route to host",
        "connection reset",
        "tls handshake timeout",
        "server misbehaving",
        "temporary failure in name resolution",
        "unexpected eof",
        "broken pipe",
        "timeout exceeded while awaiting headers",
    ]) {
        PullFailure::Network
    } else if matches!(status, Some(401 | 403))
        || has(&[
            "unauthorized",
            "authentication required",
            "denied",
            "incorrect username or password",
            "invalid username/password",
        ])
    {
        PullFailure::Unauthorized
    } else if status == Some(404)
        || has(&[
            "manifest unknown",
            "name unknown",
            "not found",
            "no such image",
            "repository name not known",
        ])
    {
        PullFailure::NotFound
    } else {
        PullFailure::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn podmans_messages_map_onto_pull_failures() {
        // Observed from podman 4.3.1's POST /images/create (the registry
        // answers from a stand-in speaking the distribution API's errors).
        let observed = [
            (
                "initializing source docker://127.0.0.1:1/nothing:1: pinging container registry 127.0.0.1:1: Get \"https://127.0.0.1:1/v2/\": dial tcp 127.0.0.1:1: connect: connection refused",
                PullFailure::Network,
            ),
            (
                "initializing source docker://alpine:3.19: pinging container registry registry-1.docker.io: Get \"https://registry-1.docker.io/v2/\": dial tcp: lookup registry-1.docker.io on 10.255.255.53:53: no such host",
                PullFailure::Network,
            ),
            (
                "initializing source docker://127.0.0.1:5999/missing:1: reading manifest 1 in 127.0.0.1:5999/missing: manifest unknown",
                PullFailure::NotFound,
            ),
            (
                "initializing source docker://127.0.0.1:5999/noname:1: reading manifest 1 in 127.0.0.1:5999/noname: name unknown",
                PullFailure::NotFound,
            ),
            (
                "initializing source docker://127.0.0.1:5999/secret:1: reading manifest 1 in 127.0.0.1:5999/secret: unauthorized",
                PullFailure::Unauthorized,
            ),
            (
                "initializing source docker://127.0.0.1:5999/denied:1: reading manifest 1 in 127.0.0.1:5999/denied: denied",
                PullFailure::Unauthorized,
            ),
            (
                "normalizing image: normalizing name for compat API: invalid reference format",
                PullFailure::Other,
            ),
        ];
        for (message, failure) in observed {
            assert_eq!(pull_failure(Some(200), message), failure, "{message}");
        }
        // containers/image's texts for cases not reproduced here.
        let known = [
            (
                "reading manifest latest in docker.io/library/nope: errors:\ndenied: requested access to the resource is denied\nunauthorized: authentication required",
                PullFailure::Unauthorized,
            ),
            (
                "pinging container registry h:5000: Get \"https://h:5000/v2/\": dial tcp 10.0.0.9:5000: i/o timeout",
                PullFailure::Network,
            ),
            (
                "writing blob: storing blob to file \"/var/tmp/storage123/1\": write /var/tmp/storage123/1: no space left on device",
                PullFailure::NoSpace,
            ),
            (
                "reading blob sha256:abc: Get \"https://h/v2/x/blobs/sha256:abc\": unexpected EOF",
                PullFailure::Network,
            ),
        ];
        for (message, failure) in known {
            assert_eq!(pull_failure(Some(200), message), failure, "{message}");
        }
        assert_eq!(pull_failure(Some(401), ""), PullFailure::Unauthorized);
        assert_eq!(pull_failure(Some(404), ""), PullFailure::NotFound);
        assert_eq!(pull_failure(Some(500), "something odd"), PullFailure::Other);
    }

    #[test]
    fn stream_lines_yield_errors_and_progress() {
        let line = r#"{"progressDetail":{},"errorDetail":{"message":"reading manifest 1 in h/x: manifest unknown"},"error":"reading manifest 1 in h/x: manifest unknown"}"#;
        let message: PullMessage = serde_json::from_str(line).unwrap();
        assert_eq!(
            message.error(),
            Some("reading manifest 1 in h/x: manifest unknown")
        );
        let done: PullMessage = serde_json::from_str(
            r#"{"status":"Download complete","progressDetail":{},"id":"1557193b85c8"}"#,
        )
        .unwrap();
        assert_eq!(done.error(), None);

        let pulls = PullsUnderWay::default();
        let mut tracker = pulls.track("h/x:1");
        assert_eq!(pulls.get("h/x:1"), Some(PullProgress::default()));
        for line in [
            r#"{"status":"Downloading","progressDetail":{"current":100,"total":1000},"id":"aaaaaaaaaaaa"}"#,
            r#"{"status":"Downloading","progressDetail":{"current":50,"total":-1},"id":"bbbbbbbbbbbb"}"#,
            r#"{"status":"Downloading","progressDetail":{"current":400,"total":1000},"id":"aaaaaaaaaaaa"}"#,
            r#"{"status":"Pulling fs layer","progressDetail":{},"id":"cccccccccccc"}"#,
            r#"{"status":"Download complete","progressDetail":{},"id":"dddddddddddd"}"#,
        ] {
            tracker.record(&serde_json::from_str(line).unwrap());
        }
        assert_eq!(
            pulls.get("h/x:1"),
            Some(PullProgress {
                downloaded: 450,
                total: 1000,
                layers_done: 1,
                layers: 3,
            })
        );
        drop(tracker);
        assert_eq!(pulls.get("h/x:1"), None);
    }
}
