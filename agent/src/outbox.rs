//! The report outbox: which report goes out next, and what a failed publish
//! leads to. Sans-IO: the event loop hands it reports and publish results,
//! with the time, and asks it what to send and when to wake.
//!
//! # Guarantees
//!
//! - Bounded: the newest report per key (deployment state or heartbeat)
//!   replaces an older one, so it holds at most one report per deployment
//!   plus the heartbeat.
//! - One publish at a time; reports that wait longest go first, states
//!   before the heartbeat when they wait equally long (a reconnect reports
//!   deployments first).
//! - A report that fails waits out its own capped backoff; it never holds up
//!   another key's report.
//! - A state the broker refuses as too large is replaced by its
//!   [summary](DeploymentState::summarised) and logged at warn, so the
//!   deployment's state is never missing. A key that keeps failing is logged
//!   at warn once, after [`WARN_AFTER_FAILURES`] failures in a row.
//!
//! # Drive loop
//!
//! 1. [`push`](Outbox::push) every report the reconciler hands out.
//! 2. [`poll_transmit`](Outbox::poll_transmit): publish what it returns,
//!    and hand the result to [`handle_result`](Outbox::handle_result).
//! 3. Sleep until [`poll_timeout`](Outbox::poll_timeout) (or anything else).

use std::collections::BTreeMap;

use podfleet_core::time::{Backoff, Timestamp};
use podfleet_core::wire::{DeploymentName, DeploymentState};

use crate::event_loop::{PublishError, Report};

/// Failures in a row after which a key's trouble is logged at warn.
pub const WARN_AFTER_FAILURES: u32 = 3;

/// What the outbox orders reports by: states before the heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Deployment(DeploymentName),
    Heartbeat,
}

impl Report {
    fn key(&self) -> Key {
        match self {
            Report::State { deployment, .. } | Report::Clear { deployment } => {
                Key::Deployment(deployment.clone())
            }
            Report::Heartbeat(_) => Key::Heartbeat,
        }
    }
}

#[derive(Debug)]
struct Queued {
    report: Report,
    not_before: Timestamp,
    failures: u32,
    /// The report is already a summary: if that is still too large, it is
    /// dropped rather than summarised again.
    summarised: bool,
}

/// Reports on their way to the broker. See the [module docs](self).
#[derive(Debug)]
pub struct Outbox {
    pending: BTreeMap<Key, Queued>,
    in_flight: Option<(Key, u32, bool)>,
    backoff: Backoff,
    #[cfg(feature = "bugs")]
    head_of_line: bool,
}

impl Outbox {
    /// An empty outbox whose failed reports wait `backoff`.
    pub fn new(backoff: Backoff) -> Self {
        Self {
            pending: BTreeMap::new(),
            in_flight: None,
            backoff,
            #[cfg(feature = "bugs")]
            head_of_line: false,
        }
    }

    /// Switches on the deliberate head-of-line bug (`Bugs::head_of_line_reports`),
    /// for the tests that prove the simulator catches it.
    #[cfg(feature = "bugs")]
    pub fn with_head_of_line_bug(mut self, on: bool) -> Self {
        self.head_of_line = on;
        self
    }

    /// Whether the deliberate head-of-line bug is on: never without the
    /// `bugs` feature.
    fn head_of_line(&self) -> bool {
        #[cfg(feature = "bugs")]
        let on = self.head_of_line;
        #[cfg(not(feature = "bugs"))]
        let on = false;
        on
    }

    /// Queues `report`, replacing an older one for the same key (which keeps
    /// its backoff).
    pub fn push(&mut self, now: Timestamp, report: Report) {
        match self.pending.get_mut(&report.key()) {
            Some(queued) => {
                queued.report = report;
                queued.summarised = false;
            }
            None => {
                self.pending.insert(
                    report.key(),
                    Queued {
                        report,
                        not_before: now,
                        failures: 0,
                        summarised: false,
                    },
                );
            }
        }
    }

    /// Drops the queued states of deployments for which `keep` is false
    /// (their state no longer holds; a clear follows).
    pub fn retain_states(&mut self, keep: impl Fn(&DeploymentName) -> bool) {
        self.pending.retain(|_, q| match &q.report {
            Report::State { deployment, .. } => keep(deployment),
            _ => true,
        });
    }

    /// The next report to publish now, if one is due and none is in flight.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Timestamp) -> Option<Report> {
        if self.in_flight.is_some() {
            return None;
        }
        let key = if self.head_of_line() {
            self.pending
                .iter()
                .next()
                .filter(|(_, q)| q.not_before <= now)
                .map(|(k, _)| k.clone())?
        } else {
            self.pending
                .iter()
                .filter(|(_, q)| q.not_before <= now)
                .min_by_key(|(k, q)| (q.not_before, (*k).clone()))
                .map(|(k, _)| k.clone())?
        };
        let queued = self.pending.remove(&key)?;
        self.in_flight = Some((key, queued.failures, queued.summarised));
        Some(queued.report)
    }

    /// The publish of `report` (from [`poll_transmit`](Self::poll_transmit))
    /// finished with `result`.
    pub fn handle_result(
        &mut self,
        now: Timestamp,
        report: Report,
        result: Result<(), PublishError>,
    ) {
        let Some((key, failures, summarised)) = self.in_flight.take() else {
            return;
        };
        let error = match result {
            Ok(()) => return,
            Err(error) => error,
        };
        if let (PublishError::TooLarge { size, .. }, false) = (&error, self.head_of_line()) {
            self.too_large(now, key, report, *size, summarised, &error);
            return;
        }
        let failures = failures.saturating_add(1);
        if failures == WARN_AFTER_FAILURES {
            tracing::warn!(%error, failures, "report still not published; retrying with backoff");
        } else {
            tracing::debug!(%error, failures, "report not published; will retry");
        }
        let not_before = now + self.backoff.delay(failures - 1);
        // A newer report for the same key supersedes the failed one, and
        // inherits its backoff.
        let queued = self.pending.entry(key).or_insert(Queued {
            report,
            not_before,
            failures,
            summarised,
        });
        queued.not_before = not_before;
        queued.failures = failures;
    }

    fn too_large(
        &mut self,
        now: Timestamp,
        key: Key,
        report: Report,
        size: usize,
        summarised: bool,
        error: &PublishError,
    ) {
        let Report::State { deployment, state } = report else {
            tracing::warn!(%error, "report dropped: the broker refuses it as too large");
            return;
        };
        if summarised || self.pending.contains_key(&key) {
            if summarised {
                tracing::warn!(%deployment, %error, "even the summary of this state is too large; dropped");
            }
            return;
        }
        tracing::warn!(
            %deployment,
            %error,
            "state too large for the broker; publishing its summary instead"
        );
        let summary: DeploymentState = state.summarised(size);
        self.pending.insert(
            key,
            Queued {
                report: Report::State {
                    deployment,
                    state: summary,
                },
                not_before: now,
                failures: 0,
                summarised: true,
            },
        );
    }

    /// When a queued report next falls due, while none is in flight.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        if self.in_flight.is_some() {
            return None;
        }
        if self.head_of_line() {
            return self.pending.values().next().map(|q| q.not_before);
        }
        self.pending.values().map(|q| q.not_before).min()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use podfleet_core::wire::{FailureCause, Phase};

    use super::*;

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    fn outbox() -> Outbox {
        Outbox::new(Backoff::new(
            Duration::from_millis(500),
            Duration::from_secs(30),
        ))
    }

    fn state(deployment: &str, message: &str) -> Report {
        Report::State {
            deployment: DeploymentName::new(deployment).unwrap(),
            state: DeploymentState {
                phase: Phase::Failed,
                revision: 7.into(),
                container_ids: BTreeMap::from([("web".into(), "c".repeat(64))]),
                message: message.into(),
                cause: Some(FailureCause::InvalidScore {
                    error: message.into(),
                }),
                attempt: 2,
                restarts: BTreeMap::new(),
                image_digests: BTreeMap::new(),
                exit_codes: BTreeMap::new(),
                verified: BTreeMap::new(),
                summarised: false,
            },
        }
    }

    fn name(report: &Report) -> String {
        match report {
            Report::State { deployment, .. } | Report::Clear { deployment } => {
                deployment.to_string()
            }
            Report::Heartbeat(_) => "heartbeat".into(),
        }
    }

    fn transient() -> Result<(), PublishError> {
        Err(PublishError::Failed("no acknowledgement".into()))
    }

    #[test]
    fn a_failing_report_never_holds_up_the_others() {
        let mut o = outbox();
        for d in ["a", "b", "c"] {
            o.push(at(0), state(d, "x"));
        }
        let first = o.poll_transmit(at(0)).unwrap();
        assert_eq!(name(&first), "a");
        o.handle_result(at(0), first, transient());
        let mut sent = Vec::new();
        while let Some(r) = o.poll_transmit(at(0)) {
            sent.push(name(&r));
            o.handle_result(at(0), r, Ok(()));
        }
        assert_eq!(sent, ["b", "c"]);
        assert_eq!(o.poll_timeout(), Some(at(500)));
        assert!(o.poll_transmit(at(499)).is_none());
        assert_eq!(name(&o.poll_transmit(at(500)).unwrap()), "a");
    }

    #[cfg(feature = "bugs")]
    #[test]
    fn the_head_of_line_bug_holds_up_the_others() {
        let mut o = outbox().with_head_of_line_bug(true);
        for d in ["a", "b"] {
            o.push(at(0), state(d, "x"));
        }
        let first = o.poll_transmit(at(0)).unwrap();
        o.handle_result(at(0), first, transient());
        assert!(o.poll_transmit(at(0)).is_none());
    }

    #[test]
    fn backoff_is_per_key_and_capped() {
        let mut o = outbox();
        o.push(at(0), state("a", "x"));
        let mut now = at(0);
        let mut gaps = Vec::new();
        for _ in 0..10 {
            let r = o.poll_transmit(now).unwrap();
            o.handle_result(now, r, transient());
            let next = o.poll_timeout().unwrap();
            gaps.push(next.saturating_since(now).as_millis());
            now = next;
        }
        assert_eq!(
            gaps,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000]
        );
    }

    #[test]
    fn a_newer_report_replaces_a_failed_one_and_keeps_its_backoff() {
        let mut o = outbox();
        o.push(at(0), state("a", "old"));
        let r = o.poll_transmit(at(0)).unwrap();
        o.push(at(10), state("a", "new"));
        o.handle_result(at(20), r, transient());
        assert!(o.poll_transmit(at(20)).is_none());
        let r = o.poll_transmit(at(520)).unwrap();
        assert_eq!(r, state("a", "new"));
    }

    #[test]
    fn a_state_too_large_is_replaced_by_its_summary() {
        let mut o = outbox();
        o.push(at(0), state("a", &"m".repeat(5000)));
        o.push(at(0), state("b", "fine"));
        let r = o.poll_transmit(at(0)).unwrap();
        let too_large = PublishError::TooLarge {
            size: 10_200,
            limit: Some(4096),
        };
        o.handle_result(at(0), r, Err(too_large.clone()));
        let Some(Report::State { deployment, state }) = o.poll_transmit(at(0)) else {
            panic!("the summary is due at once");
        };
        assert_eq!(deployment.as_str(), "a");
        assert_eq!(
            (state.phase, state.revision.get(), state.attempt),
            (Phase::Failed, 7, 2)
        );
        assert!(state.container_ids.is_empty());
        assert!(state.message.contains("10200 bytes"), "{}", state.message);
        assert!(serde_json::to_vec(&state).unwrap().len() < 1024);
        // A summary that is still too large is dropped, not retried forever.
        o.handle_result(at(0), Report::State { deployment, state }, Err(too_large));
        assert_eq!(name(&o.poll_transmit(at(0)).unwrap()), "b");
    }
}
