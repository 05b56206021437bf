//! The kube-runtime side: the FleetDeployment reconciler with its finalizer,
//! the status patches, the events, the error policy, and the Device
//! writer.
//!
//! The reconciler decides nothing about devices. It tells the engine that
//! the object changed ([`Touched::Deployment`]), keeps the finalizer on
//! while the object lives, shows what the fleet controller aggregated
//! ([`crate::status::fleet_status`]) with one server-side-apply patch when
//! it changed, and releases the finalizer once the engine reports every
//! desired key of the deployment deleted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::finalizer::{finalizer, Event};
use kube::{Api, Client, Resource, ResourceExt};
use podfleet_core::time::Backoff;
use podfleet_core::wire::DeploymentName;
use tokio::sync::mpsc;

use crate::engine::{lock, rfc3339, wall_seconds, DeviceWrite, Hub, Touched};
use crate::metrics::Metrics;
use crate::resources::{Device, DeviceSpec, FleetDeployment, FleetDeploymentStatus, FINALIZER};
use crate::status::{fleet_status, notes};

/// The field manager of every write the operator makes.
pub const MANAGER: &str = "podfleet-operator";

/// What every reconcile shares.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// The namespace of the FleetDeployments.
    pub namespace: String,
    /// The engine's hub.
    pub hub: Arc<Hub>,
    /// Publishes events; `None` to publish none.
    pub recorder: Option<Recorder>,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// How long a deletion waits for the engine before it is retried.
    pub teardown_wait: Duration,
    /// The delay after a failed reconcile, by failures in a row.
    pub backoff: Backoff,
    /// How often an unchanged FleetDeployment is looked at again.
    pub resync: Duration,
    failures: Mutex<HashMap<String, u32>>,
    written: Mutex<HashMap<String, FleetDeploymentStatus>>,
}

impl Context {
    /// A context with no failures counted and no status written yet.
    pub fn new(
        client: Client,
        namespace: String,
        hub: Arc<Hub>,
        recorder: Option<Recorder>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            namespace,
            hub,
            recorder,
            metrics,
            teardown_wait: Duration::from_secs(5),
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(300)),
            resync: Duration::from_secs(300),
            failures: Mutex::default(),
            written: Mutex::default(),
        }
    }
}

/// Why a reconcile failed; it is retried with capped backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused a write.
    #[error("the Kubernetes API refused to {action}: {source}")]
    Kube {
        /// What the operator tried.
        action: &'static str,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// A deleted FleetDeployment still has desired keys in NATS (NATS
    /// unreachable, or its writes refused): the finalizer stays.
    #[error(
        "FleetDeployment {name}: desired keys are still in NATS; the finalizer stays until every one is deleted"
    )]
    TeardownPending {
        /// The FleetDeployment.
        name: String,
    },
    /// Adding or removing the finalizer failed.
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

/// Reconciles one FleetDeployment.
///
/// # Errors
/// [`Error`]; the error policy retries it.
pub async fn reconcile(fd: Arc<FleetDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let name = fd.name_any();
    ctx.hub.touch(Touched::Deployment(name.clone()));
    let api = Api::<FleetDeployment>::namespaced(ctx.client.clone(), &ctx.namespace);
    let result = finalizer(&api, FINALIZER, fd, |event| async {
        match event {
            Event::Apply(fd) => apply(&api, &fd, &ctx).await,
            Event::Cleanup(fd) => cleanup(&fd, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(Box::new(other)),
    });
    ctx.metrics.reconciled(result.is_ok(), started.elapsed());
    if result.is_ok() {
        lock(&ctx.failures).remove(&name);
    }
    result
}

/// The delay before a failed FleetDeployment is reconciled again: the
/// context's backoff by failures in a row.
pub fn error_policy(fd: Arc<FleetDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    let name = fd.name_any();
    let failures = {
        let mut failures = lock(&ctx.failures);
        let count = failures.entry(name.clone()).or_insert(0);
        *count += 1;
        *count
    };
    let delay = ctx.backoff.delay(failures - 1);
    tracing::warn!(fleetdeployment = %name, %error, failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

async fn apply(
    api: &Api<FleetDeployment>,
    fd: &FleetDeployment,
    ctx: &Context,
) -> Result<Action, Error> {
    let name = fd.name_any();
    let Some(known) = ctx.hub.known(&name) else {
        // The engine has not read it yet; it asks for a reconcile when it has.
        return Ok(Action::requeue(ctx.resync));
    };
    let previous = lock(&ctx.written)
        .get(&name)
        .cloned()
        .or_else(|| fd.status.clone());
    let now = rfc3339(wall_seconds());
    let next = fleet_status(&known, previous.as_ref(), &now);
    if previous.as_ref() == Some(&next) {
        return Ok(Action::requeue(ctx.resync));
    }
    let patch = serde_json::json!({
        "apiVersion": FleetDeployment::api_version(&()),
        "kind": FleetDeployment::kind(&()),
        "status": next,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::Kube {
        action: "patch a FleetDeployment's status",
        source,
    })?;
    ctx.metrics.status_patched();
    lock(&ctx.written).insert(name.clone(), next.clone());
    for note in notes(previous.as_ref(), &next) {
        publish(ctx, fd, note.warning, note.reason, note.message).await;
    }
    Ok(Action::requeue(ctx.resync))
}

async fn cleanup(fd: &FleetDeployment, ctx: &Context) -> Result<Action, Error> {
    let name = fd.name_any();
    lock(&ctx.written).remove(&name);
    if DeploymentName::new(&name).is_err() {
        // Nothing was ever written for it.
        return Ok(Action::await_change());
    }
    if ctx.hub.wait_torn_down(&name, ctx.teardown_wait).await {
        publish(
            ctx,
            fd,
            false,
            "TornDown",
            "every device's desired key is deleted; releasing the finalizer".into(),
        )
        .await;
        Ok(Action::await_change())
    } else {
        Err(Error::TeardownPending { name })
    }
}

async fn publish(
    ctx: &Context,
    fd: &FleetDeployment,
    warning: bool,
    reason: &str,
    message: String,
) {
    let Some(recorder) = &ctx.recorder else {
        return;
    };
    let event = KubeEvent {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_owned(),
        note: Some(message),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, &fd.object_ref(&())).await {
        tracing::warn!(fleetdeployment = %fd.name_any(), %error, reason, "cannot publish an event");
    }
}

/// Carries out the engine's Device writes (statuses by server-side apply,
/// creations), `parallel` at a time, until the engine is gone. A write that
/// fails is logged and handed back to the engine to try at its next sweep.
pub async fn write_devices(
    client: Client,
    writes: mpsc::UnboundedReceiver<DeviceWrite>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    parallel: usize,
) {
    let api = Api::<Device>::all(client);
    let writes = futures_util::stream::unfold(writes, |mut rx| async move {
        rx.recv().await.map(|write| (write, rx))
    });
    writes
        .map(|write| {
            let api = api.clone();
            async move {
                let result = match &write {
                    DeviceWrite::Status { name, status } => {
                        let patch = serde_json::json!({
                            "apiVersion": Device::api_version(&()),
                            "kind": Device::kind(&()),
                            "status": status,
                        });
                        api.patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
                            .await
                            .map(drop)
                    }
                    DeviceWrite::Create { name } => {
                        match api.create(&PostParams::default(), &Device::new(name, DeviceSpec::default())).await {
                            Ok(_) => {
                                tracing::info!(device = %name, "created a Device for a device that heartbeats");
                                Ok(())
                            }
                            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
                            Err(e) => Err(e),
                        }
                    }
                };
                (write, result)
            }
        })
        .buffer_unordered(parallel.max(1))
        .for_each(|(write, result)| {
            match result {
                Ok(()) => metrics.device_written(),
                Err(error) => {
                    let name = match &write {
                        DeviceWrite::Status { name, .. } | DeviceWrite::Create { name } => name.clone(),
                    };
                    tracing::warn!(device = %name, %error, "a Device write failed; retried at the next sweep");
                    hub.unsent(name);
                }
            }
            async {}
        })
        .await;
}
