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
//!
//! It is also where image tags are resolved to digests, the one place
//! the operator speaks to registries: once per `metadata.generation`,
//! before the engine hands that generation to the fleet controller
//! ([`crate::images`]). The digests go into the status
//! (`resolvedImages`), which the engine reads back; a generation whose
//! tags cannot be resolved shows Degraded (`ImageResolveFailed`) and is
//! retried with the context's backoff, without holding up any other
//! FleetDeployment.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::finalizer::{finalizer, Event};
use kube::{Api, Client, Resource, ResourceExt};
use podfleet_control::cli::apply::ImageToPin;
use podfleet_control::registry::{Resolver, DEFAULT_REQUEST_TIMEOUT};
use podfleet_core::image::RegistryAuth;
use podfleet_core::time::Backoff;
use podfleet_core::wire::DeploymentName;
use tokio::sync::mpsc;

use crate::engine::{lock, rfc3339, wall_seconds, DeviceWrite, Hub, Touched};
use crate::images::{self, Logins, PinFailure, Plan};
use crate::metrics::Metrics;
use crate::resources::{Device, DeviceSpec, FleetDeployment, FleetDeploymentStatus, FINALIZER};
use crate::status::{fleet_status, notes, with_images, Images};

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
    /// How image tags are resolved to digests.
    pub registry: RegistryOptions,
    failures: Mutex<HashMap<String, u32>>,
    written: Mutex<HashMap<String, FleetDeploymentStatus>>,
    /// The last failed resolution of each FleetDeployment's images.
    unresolved: Mutex<HashMap<String, Unresolved>>,
}

/// How the reconciler resolves image tags to digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryOptions {
    /// The Secret, in the operator's namespace, of type
    /// `kubernetes.io/dockerconfigjson` whose logins the registries are
    /// asked with; read at each resolution, so a fixed Secret is used at
    /// the next retry. `None`: every registry is asked anonymously.
    pub auth_secret: Option<String>,
    /// Registries asked over plain HTTP (`host` or `host:port`, as image
    /// references name them).
    pub insecure: Vec<String>,
    /// How long each request to a registry may take.
    pub request_timeout: Duration,
}

impl Default for RegistryOptions {
    /// No Secret, no plain-HTTP registry, the resolver's request timeout.
    fn default() -> Self {
        Self {
            auth_secret: None,
            insecure: Vec::new(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// A failed resolution: of which generation and images, how many in a row,
/// and when the next one is due.
#[derive(Debug, Clone)]
struct Unresolved {
    generation: i64,
    images: Vec<ImageToPin>,
    failures: u32,
    retry_at: Instant,
    message: String,
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
            registry: RegistryOptions::default(),
            failures: Mutex::default(),
            written: Mutex::default(),
            unresolved: Mutex::default(),
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
    /// The images of the FleetDeployment's generation could not be pinned
    /// to digests: that generation reaches no device yet.
    #[error("FleetDeployment {name}: {message}")]
    ImagesUnresolved {
        /// The FleetDeployment.
        name: String,
        /// What failed, and the rule.
        message: String,
        /// When the images are resolved again.
        retry_in: Duration,
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
    if let Error::ImagesUnresolved { retry_in, .. } = error {
        // Its own backoff, counted by resolutions, not by reconciles: a
        // status change in between does not ask the registries again.
        tracing::debug!(fleetdeployment = %name, %error, retry_in = ?retry_in, "images unresolved");
        return Action::requeue(*retry_in);
    }
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
    let previous = lock(&ctx.written)
        .get(&name)
        .cloned()
        .or_else(|| fd.status.clone());
    let (pinning, retry_in) = pin(fd, previous.as_ref(), ctx).await;
    let now = rfc3339(wall_seconds());
    // Without a known aggregate the engine has not read the object yet; it
    // asks for a reconcile when it has.
    let status = ctx
        .hub
        .known(&name)
        .map(|known| fleet_status(&known, previous.as_ref(), &now));
    let next = with_images(status, &pinning, previous.as_ref(), &now);
    if let Some(next) = next.filter(|next| previous.as_ref() != Some(next)) {
        patch_status(api, fd, ctx, previous.as_ref(), next).await?;
    }
    match (pinning, retry_in) {
        (Images::Unresolved { message, .. }, Some(retry_in)) => Err(Error::ImagesUnresolved {
            name,
            message,
            retry_in,
        }),
        _ => Ok(Action::requeue(ctx.resync)),
    }
}

/// Writes `next` as `fd`'s status and publishes the events worth a line
/// from `previous` to it.
async fn patch_status(
    api: &Api<FleetDeployment>,
    fd: &FleetDeployment,
    ctx: &Context,
    previous: Option<&FleetDeploymentStatus>,
    next: FleetDeploymentStatus,
) -> Result<(), Error> {
    let name = fd.name_any();
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
    lock(&ctx.written).insert(name, next.clone());
    for note in notes(previous, &next) {
        publish(ctx, fd, note.warning, note.reason, note.message).await;
    }
    Ok(())
}

/// Where `fd`'s images stand for its generation, resolving them when
/// `previous` holds no record of it and no failed resolution of it is
/// still backing off; with the delay before the next resolution when they
/// are unresolved.
async fn pin(
    fd: &FleetDeployment,
    previous: Option<&FleetDeploymentStatus>,
    ctx: &Context,
) -> (Images, Option<Duration>) {
    let name = fd.name_any();
    let generation = fd.metadata.generation.unwrap_or(0);
    let Plan::Pin {
        manifest,
        images: wanted,
    } = images::plan(fd)
    else {
        lock(&ctx.unresolved).remove(&name);
        return (Images::AsWritten, None);
    };
    let record = previous.and_then(|p| p.resolved_images.as_ref());
    if let Some(record) =
        record.filter(|r| images::pinned(&manifest, &wanted, Some(r), generation).is_some())
    {
        lock(&ctx.unresolved).remove(&name);
        return (Images::Pinned(record.clone()), None);
    }
    // What the devices were handed stays, whatever happens to this generation.
    let running = record.filter(|r| r.generation != generation).cloned();
    let unresolved = |message: String| Images::Unresolved {
        generation,
        running: running.clone(),
        message,
    };
    let started = Instant::now();
    let earlier = lock(&ctx.unresolved)
        .get(&name)
        .filter(|u| u.generation == generation && u.images == wanted)
        .cloned();
    if let Some(earlier) = earlier.as_ref().filter(|u| u.retry_at > started) {
        return (
            unresolved(earlier.message.clone()),
            Some(earlier.retry_at - started),
        );
    }
    let resolved = resolve(ctx, &wanted)
        .await
        .and_then(|digests| images::record(generation, &wanted, &digests));
    let failure = match resolved {
        Ok(record) => {
            lock(&ctx.unresolved).remove(&name);
            tracing::info!(fleetdeployment = %name, generation, images = record.images.len(), took = ?started.elapsed(), "pinned the images to digests");
            return (Images::Pinned(record), None);
        }
        Err(failure) => failure,
    };
    let failures = earlier.map_or(1, |u| u.failures.saturating_add(1));
    let retry_in = ctx.backoff.delay(failures - 1);
    let message = images::unresolved_message(&failure, generation, running.as_ref());
    tracing::warn!(fleetdeployment = %name, generation, failures, retry_in = ?retry_in, "cannot pin the images: {failure}");
    lock(&ctx.unresolved).insert(
        name,
        Unresolved {
            generation,
            images: wanted,
            failures,
            retry_at: Instant::now() + retry_in,
            message: message.clone(),
        },
    );
    (unresolved(message), Some(retry_in))
}

/// The digest of each image of `images` (by image as written), each asked
/// once, with the logins of the configured Secret.
async fn resolve(
    ctx: &Context,
    images: &[ImageToPin],
) -> Result<BTreeMap<String, String>, PinFailure> {
    let (auth, logins) = registry_logins(ctx).await?;
    let mut resolver = Resolver::new(auth).request_timeout(ctx.registry.request_timeout);
    for host in &ctx.registry.insecure {
        resolver = resolver.insecure_registry(host);
    }
    let mut digests = BTreeMap::new();
    for wanted in images {
        if digests.contains_key(&wanted.image) {
            continue;
        }
        let digest = resolver
            .resolve(&wanted.image)
            .await
            .map_err(|error| PinFailure::unresolved(wanted.container.clone(), error, &logins))?;
        digests.insert(wanted.image.clone(), digest);
    }
    Ok(digests)
}

/// The registry logins of the configured Secret, and where they came from.
async fn registry_logins(ctx: &Context) -> Result<(RegistryAuth, Logins), PinFailure> {
    let Some(secret) = &ctx.registry.auth_secret else {
        return Ok((RegistryAuth::new(), Logins::NotConfigured));
    };
    let place = format!("{}/{secret}", ctx.namespace);
    let api = Api::<Secret>::namespaced(ctx.client.clone(), &ctx.namespace);
    match api.get_opt(secret).await {
        Ok(Some(object)) => images::registry_auth(&object)
            .map(|auth| (auth, Logins::Secret(place)))
            .map_err(|e| PinFailure::Logins(e.to_string())),
        Ok(None) => Ok((RegistryAuth::new(), Logins::SecretMissing(place))),
        Err(error) => Err(PinFailure::Logins(format!(
            "cannot read the Secret {place}: {error}"
        ))),
    }
}

async fn cleanup(fd: &FleetDeployment, ctx: &Context) -> Result<Action, Error> {
    let name = fd.name_any();
    lock(&ctx.written).remove(&name);
    lock(&ctx.unresolved).remove(&name);
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
