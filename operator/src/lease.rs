//! Leader election over a `coordination.k8s.io/v1` Lease, so that two
//! replicas never both write.
//!
//! [`Election`] decides (sans-IO); [`round`] reads and writes the Lease, [`release`] hands it over.
//! The rules are client-go's:
//! - A replica takes the Lease when it does not exist, names no holder, or
//!   has not changed for its `leaseDurationSeconds` as measured on this
//!   replica's own clock since it last saw it change (so clocks need not
//!   agree).
//! - Every write carries the `resourceVersion` read, so of two replicas
//!   writing at once the API server refuses one.
//! - The holder renews every `retry` and counts itself leader only until
//!   `renew_deadline` after the start of its last successful write, which
//!   is shorter than the lease duration: it stops leading before anyone
//!   else may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::Api;
use podfleet_core::time::Timestamp;

/// What a Lease says, as far as the election cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The holder's identity; empty when released.
    pub holder: String,
    /// How long the holder's claim lasts without renewal.
    pub duration: Duration,
    /// How many times the Lease changed hands.
    pub transitions: i32,
    /// When the holder last renewed, by its clock (for people only).
    pub renewed: Option<String>,
    /// The object's `resourceVersion`.
    pub resource_version: Option<String>,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create the Lease with this record, naming this replica.
    Create(Record),
    /// Replace the Lease with this record (the resourceVersion read).
    Update(Record),
    /// Someone else holds it: read it again after the retry period.
    Wait,
}

/// The election as one replica sees it.
#[derive(Debug, Clone)]
pub struct Election {
    identity: String,
    duration: Duration,
    renew_deadline: Duration,
    /// The Lease last read (without its resourceVersion) and when it was
    /// last seen change.
    observed: Option<(Record, Timestamp)>,
    /// Until when this replica leads.
    leading_until: Option<Timestamp>,
}

impl Election {
    /// `identity` must be unique per replica (the pod name); `duration` is
    /// the claim written to the Lease; `renew_deadline < duration`.
    pub fn new(identity: String, duration: Duration, renew_deadline: Duration) -> Self {
        Self {
            identity,
            duration,
            renew_deadline: renew_deadline.min(duration),
            observed: None,
            leading_until: None,
        }
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Whether this replica leads at `now`.
    pub fn is_leader(&self, now: Timestamp) -> bool {
        self.leading_until.is_some_and(|until| now < until)
    }

    /// What to do, having read `lease` (`None`: it does not exist) at
    /// `now`; `renewed` is the time to write, for people.
    pub fn read(&mut self, now: Timestamp, lease: Option<Record>, renewed: String) -> Step {
        let Some(lease) = lease else {
            self.observed = None;
            return Step::Create(self.mine(None, 0, renewed));
        };
        let unversioned = Record {
            resource_version: None,
            ..lease.clone()
        };
        let seen_at = match &self.observed {
            Some((record, at)) if *record == unversioned => *at,
            _ => now,
        };
        self.observed = Some((unversioned, seen_at));
        let version = lease.resource_version.clone();
        if lease.holder == self.identity {
            return Step::Update(self.mine(version, lease.transitions, renewed));
        }
        let expired = lease.holder.is_empty() || seen_at + lease.duration <= now;
        if expired {
            Step::Update(self.mine(version, lease.transitions + 1, renewed))
        } else {
            Step::Wait
        }
    }

    /// The write started at `started` (before the request was sent)
    /// succeeded: this replica leads until `started + renew_deadline`.
    pub fn written(&mut self, started: Timestamp) {
        self.leading_until = Some(started + self.renew_deadline);
    }

    /// The record releasing the Lease (no holder), from the one last read,
    /// for a replica that stops.
    pub fn release(&mut self, renewed: String) -> Option<Record> {
        let leading = self.leading_until.take().is_some();
        let (record, _) = self.observed.as_ref()?;
        leading.then(|| Record {
            holder: String::new(),
            renewed: Some(renewed),
            ..record.clone()
        })
    }

    fn mine(&self, resource_version: Option<String>, transitions: i32, renewed: String) -> Record {
        Record {
            holder: self.identity.clone(),
            duration: self.duration,
            transitions,
            renewed: Some(renewed),
            resource_version,
        }
    }
}

fn record(lease: &Lease) -> Record {
    let spec = lease.spec.clone().unwrap_or_default();
    Record {
        holder: spec.holder_identity.unwrap_or_default(),
        duration: Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15),
        ),
        transitions: spec.lease_transitions.unwrap_or(0),
        renewed: spec.renew_time.map(|t| t.0.to_string()),
        resource_version: lease.metadata.resource_version.clone(),
    }
}

fn lease(name: &str, record: &Record) -> Lease {
    let time = record
        .renewed
        .as_deref()
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(MicroTime);
    Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            resource_version: record.resource_version.clone(),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(record.holder.clone()),
            lease_duration_seconds: Some(i32::try_from(record.duration.as_secs()).unwrap_or(15)),
            lease_transitions: Some(record.transitions),
            renew_time: time.clone(),
            acquire_time: time,
            ..LeaseSpec::default()
        }),
    }
}

/// One round: reads the Lease, writes it if the election says so; whether
/// this replica leads afterwards. API errors (a conflict included) count as
/// a failed write.
pub async fn round(
    api: &Api<Lease>,
    name: &str,
    election: &mut Election,
    now: impl Fn() -> Timestamp,
) -> bool {
    let started = now();
    let renewed = crate::engine::rfc3339(crate::engine::wall_seconds());
    let read = match api.get_opt(name).await {
        Ok(lease) => lease.as_ref().map(record),
        Err(error) => {
            tracing::warn!(lease = name, %error, "cannot read the lease");
            return election.is_leader(now());
        }
    };
    let result = match election.read(started, read, renewed) {
        Step::Wait => return election.is_leader(now()),
        Step::Create(record) => {
            api.create(&PostParams::default(), &lease(name, &record))
                .await
        }
        Step::Update(record) => {
            api.replace(name, &PostParams::default(), &lease(name, &record))
                .await
        }
    };
    match result {
        Ok(_) => election.written(started),
        Err(error) => tracing::debug!(lease = name, %error, "lease write refused"),
    }
    election.is_leader(now())
}

/// Writes the release of the Lease if this replica leads.
pub async fn release(api: &Api<Lease>, name: &str, election: &mut Election) {
    let renewed = crate::engine::rfc3339(crate::engine::wall_seconds());
    if let Some(record) = election.release(renewed) {
        let Ok(Some(current)) = api.get_opt(name).await else {
            return;
        };
        let mut record = record;
        record.resource_version = current.metadata.resource_version.clone();
        if record_holder(&current) == Some(election.identity().to_owned()) {
            if let Err(error) = api
                .replace(name, &PostParams::default(), &lease(name, &record))
                .await
            {
                tracing::warn!(lease = name, %error, "cannot release the lease");
            } else {
                tracing::info!(lease = name, "released the lease");
            }
        }
    }
}

fn record_holder(lease: &Lease) -> Option<String> {
    lease.spec.as_ref().and_then(|s| s.holder_identity.clone())
}

#[cfg(test)]
mod tests;
