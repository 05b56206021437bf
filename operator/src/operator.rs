//! Wiring: the metrics endpoint, the leader election, and while leading,
//! the reconciler, the Device watch, the Device writer and the engine.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, Controller, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use podfleet_agent::buckets::fleet_buckets;
use podfleet_control::client::BucketPlan;
use podfleet_control::context::Connection;
use podfleet_control::run::{run_with, ControllerOptions};
use tokio::sync::mpsc;

use crate::engine::{EngineOptions, Hub, KubeSide, Touched};
use crate::lease::{self, Election};
use crate::metrics::{self, Metrics};
use crate::reconcile::{error_policy, reconcile, write_devices, Context, RegistryOptions};
use crate::resources::{Device, FleetDeployment};

/// How the operator runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The engine's knobs (namespace, Device statuses).
    pub engine: EngineOptions,
    /// The fleet controller's knobs and the passes'.
    pub controller: ControllerOptions,
    /// The buckets created when missing: desired, state and heartbeats.
    pub plan: BucketPlan,
    /// Leader election; `None` runs as the only replica.
    pub lease: Option<LeaseOptions>,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`.
    pub metrics_addr: Option<SocketAddr>,
    /// Publish events for `kubectl describe`.
    pub events: bool,
    /// Device writes in flight at once.
    pub device_writers: usize,
    /// The identity in events and the Lease (the pod name).
    pub identity: String,
    /// How image tags are resolved to digests: the Secret of registry
    /// logins, plain-HTTP registries.
    pub registry: RegistryOptions,
}

impl Options {
    /// The defaults for FleetDeployments in `namespace`: Device statuses
    /// every 10 s with `lastSeen` to 5 min, no Device creation, no leader
    /// election, no metrics endpoint, events on, registries asked
    /// anonymously over HTTPS.
    pub fn new(namespace: &str) -> Self {
        Self {
            engine: EngineOptions {
                namespace: namespace.to_owned(),
                device_status_every: Duration::from_secs(10),
                last_seen_every: Duration::from_secs(300),
                create_devices: false,
            },
            controller: ControllerOptions::default(),
            plan: BucketPlan {
                buckets: fleet_buckets().to_vec(),
            },
            lease: None,
            metrics_addr: None,
            events: true,
            device_writers: 16,
            identity: default_identity(),
            registry: RegistryOptions::default(),
        }
    }
}

/// The Lease and its timings.
#[derive(Debug, Clone)]
pub struct LeaseOptions {
    /// The Lease's name, in the operator's namespace.
    pub name: String,
    /// The claim written to the Lease.
    pub duration: Duration,
    /// How long the leader leads after its last successful renewal.
    pub renew_deadline: Duration,
    /// How often the Lease is read (and renewed).
    pub retry: Duration,
}

impl Default for LeaseOptions {
    /// `podfleet-operator`, 15 s, 10 s, 2 s (client-go's defaults).
    fn default() -> Self {
        Self {
            name: "podfleet-operator".into(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// `$POD_NAME`, else the host name and process id.
fn default_identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "podfleet-operator".into());
        format!("{host}-{}", std::process::id())
    })
}

/// Runs the operator until `shutdown` completes.
///
/// # Errors
/// When the metrics endpoint cannot listen, when leadership is lost (the
/// process should exit and be restarted as a standby), or what
/// [`podfleet_control::run::run_with`] cannot mend (NATS credentials
/// refused).
pub async fn run(
    client: Client,
    connection: Connection,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let hub_slot: Arc<OnceLock<Arc<Hub>>> = Arc::default();
    if let Some(addr) = options.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        tokio::spawn(metrics::serve(
            listener,
            Arc::clone(&metrics),
            Arc::clone(&hub_slot),
        ));
    }
    tokio::pin!(shutdown);
    let Some(lease_options) = options.lease.clone() else {
        metrics.set_leader(true);
        return lead(client, connection, options, metrics, hub_slot, shutdown).await;
    };
    let api = Api::<Lease>::namespaced(client.clone(), &options.engine.namespace);
    let origin = tokio::time::Instant::now();
    let now = move || {
        podfleet_core::time::Timestamp::from_millis(
            u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX),
        )
    };
    let election = Arc::new(tokio::sync::Mutex::new(Election::new(
        options.identity.clone(),
        lease_options.duration,
        lease_options.renew_deadline,
    )));
    metrics.set_ready(true);
    tracing::info!(lease = %lease_options.name, identity = %options.identity, "waiting to lead");
    loop {
        if lease::round(&api, &lease_options.name, &mut *election.lock().await, now).await {
            break;
        }
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep(lease_options.retry) => {}
        }
    }
    tracing::info!(lease = %lease_options.name, identity = %options.identity, "leading");
    metrics.set_leader(true);
    metrics.set_ready(false);
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
    let renew = async {
        loop {
            tokio::time::sleep(lease_options.retry).await;
            if !lease::round(&api, &lease_options.name, &mut *election.lock().await, now).await {
                let _ = lost_tx.send(());
                return;
            }
        }
    };
    let leading = lead(
        client,
        connection,
        options,
        Arc::clone(&metrics),
        hub_slot,
        async {
            let _ = lost_rx.await;
        },
    );
    enum End {
        Shutdown,
        Lost,
        Ended(anyhow::Result<()>),
    }
    // The losing futures are dropped when `select!` returns: nothing is
    // written after it.
    let end = tokio::select! {
        () = &mut shutdown => End::Shutdown,
        () = renew => End::Lost,
        result = leading => End::Ended(result),
    };
    metrics.set_leader(false);
    metrics.set_ready(false);
    match end {
        End::Shutdown => {
            tracing::info!("shutting down; handing the lease over");
            lease::release(&api, &lease_options.name, &mut *election.lock().await).await;
            Ok(())
        }
        End::Lost => Err(anyhow::anyhow!(
            "lost the lease {}: another replica may lead now; exiting",
            lease_options.name
        )),
        End::Ended(result) => {
            lease::release(&api, &lease_options.name, &mut *election.lock().await).await;
            result
        }
    }
}

/// Everything a leader runs, until `stop` completes.
async fn lead(
    client: Client,
    connection: Connection,
    options: Options,
    metrics: Arc<Metrics>,
    hub_slot: Arc<OnceLock<Arc<Hub>>>,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let namespace = options.engine.namespace.clone();
    let (hub, touched) = Hub::new();
    let _ = hub_slot.set(Arc::clone(&hub));
    let deployments = Api::<FleetDeployment>::namespaced(client.clone(), &namespace);
    let devices = Api::<Device>::all(client.clone());

    let (device_store, device_writer) = reflector::store();
    let device_watch = {
        let hub = Arc::clone(&hub);
        reflector::reflector(
            device_writer,
            watcher(devices, watcher::Config::default()).default_backoff(),
        )
        .for_each(move |event| {
            match event {
                Ok(
                    watcher::Event::Apply(d)
                    | watcher::Event::Delete(d)
                    | watcher::Event::InitApply(d),
                ) => {
                    hub.touch(Touched::Device(d.name_any()));
                }
                Ok(watcher::Event::InitDone) => hub.touch(Touched::Devices),
                Ok(watcher::Event::Init) => {}
                Err(error) => tracing::warn!(%error, "the Device watch failed; retrying"),
            }
            async {}
        })
    };

    let (trigger_tx, trigger_rx) = mpsc::unbounded_channel::<ObjectRef<FleetDeployment>>();
    let triggers = futures_util::stream::unfold(trigger_rx, |mut rx| async move {
        rx.recv().await.map(|r| (r, rx))
    });
    let controller =
        Controller::new(deployments, watcher::Config::default()).reconcile_on(triggers);
    let deployment_store = controller.store();

    let (writes_tx, writes_rx) = mpsc::unbounded_channel();
    let recorder = options.events.then(|| {
        Recorder::new(
            client.clone(),
            Reporter {
                controller: "podfleet-operator".into(),
                instance: Some(options.identity.clone()),
            },
        )
    });
    let mut context = Context::new(
        client.clone(),
        namespace.clone(),
        Arc::clone(&hub),
        recorder,
        Arc::clone(&metrics),
    );
    context.registry = options.registry.clone();
    let context = Arc::new(context);
    let reconciler = controller
        .run(reconcile, error_policy, context)
        .for_each(|result| {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile");
            }
            async {}
        });
    let writer = write_devices(
        client.clone(),
        writes_rx,
        Arc::clone(&hub),
        Arc::clone(&metrics),
        options.device_writers,
    );
    let (engine_stop_tx, engine_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let engine = {
        let metrics = Arc::clone(&metrics);
        async move {
            if deployment_store.wait_until_ready().await.is_err()
                || device_store.wait_until_ready().await.is_err()
            {
                return Err(anyhow::anyhow!(
                    "the resource watches ended before they listed"
                ));
            }
            tracing::info!(
                "listed the FleetDeployments and Devices; starting the fleet controller"
            );
            let side = KubeSide::new(
                options.engine,
                hub,
                (deployment_store, device_store),
                touched,
                trigger_tx,
                writes_tx,
                metrics,
            );
            run_with(connection, options.plan, options.controller, side, async {
                let _ = engine_stop_rx.await;
            })
            .await
        }
    };
    tokio::pin!(stop);
    tokio::select! {
        () = &mut stop => {
            let _ = engine_stop_tx.send(());
            Ok(())
        }
        result = engine => result,
        () = reconciler => Err(anyhow::anyhow!("the FleetDeployment controller ended")),
        () = device_watch => Err(anyhow::anyhow!("the Device watch ended")),
        () = writer => Err(anyhow::anyhow!("the Device writer ended")),
    }
}
