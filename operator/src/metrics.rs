//! `/metrics` (Prometheus text format), `/healthz` and `/readyz` on a small
//! HTTP endpoint.
//!
//! | metric | kind | what |
//! | --- | --- | --- |
//! | `podfleet_operator_reconciles_total{result}` | counter | reconciles, `ok` or `error` |
//! | `podfleet_operator_reconcile_duration_seconds` | histogram | how long each took |
//! | `podfleet_operator_status_patches_total` | counter | FleetDeployment status patches |
//! | `podfleet_operator_device_writes_total` | counter | Device status patches and creations |
//! | `podfleet_operator_deployment_devices{phase}` | gauge | targeted devices by phase, summed over FleetDeployments |
//! | `podfleet_operator_nats_connected` | gauge | 1 while a pass runs on a live NATS connection |
//! | `podfleet_operator_leader` | gauge | 1 while this replica holds the lease |
//!
//! `/readyz` answers 200 once this replica either leads with the fleet
//! controller synced or stands by; `/healthz` answers 200 while the process
//! runs.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::engine::Hub;

/// The upper bounds of the reconcile duration histogram, in seconds.
const BUCKETS: [f64; 9] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// The operator's counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    reconciles_ok: AtomicU64,
    reconciles_error: AtomicU64,
    /// Per bucket of [`BUCKETS`], then +Inf.
    durations: [AtomicU64; 10],
    duration_micros: AtomicU64,
    status_patches: AtomicU64,
    device_writes: AtomicU64,
    nats_connected: AtomicBool,
    leader: AtomicBool,
    ready: AtomicBool,
}

impl Metrics {
    /// Counts one reconcile.
    pub fn reconciled(&self, ok: bool, took: Duration) {
        let counter = if ok {
            &self.reconciles_ok
        } else {
            &self.reconciles_error
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let seconds = took.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BUCKETS.len());
        self.durations[bucket].fetch_add(1, Ordering::Relaxed);
        self.duration_micros.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Counts one FleetDeployment status patch.
    pub fn status_patched(&self) {
        self.status_patches.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one Device write.
    pub fn device_written(&self) {
        self.device_writes.fetch_add(1, Ordering::Relaxed);
    }

    /// FleetDeployment status patches so far.
    pub fn status_patches(&self) -> u64 {
        self.status_patches.load(Ordering::Relaxed)
    }

    /// Whether a pass runs on a live NATS connection.
    pub fn set_nats_connected(&self, connected: bool) {
        self.nats_connected.store(connected, Ordering::Relaxed);
    }

    /// Whether this replica holds the lease.
    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
    }

    /// Whether `/readyz` answers 200.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every metric; `hub` gives the
    /// devices by phase.
    pub fn render(&self, hub: Option<&Hub>) -> String {
        let mut out = String::new();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let flag = |a: &AtomicBool| u8::from(a.load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "# HELP podfleet_operator_reconciles_total FleetDeployment reconciles by result."
        );
        let _ = writeln!(out, "# TYPE podfleet_operator_reconciles_total counter");
        let _ = writeln!(
            out,
            "podfleet_operator_reconciles_total{{result=\"ok\"}} {}",
            load(&self.reconciles_ok)
        );
        let _ = writeln!(
            out,
            "podfleet_operator_reconciles_total{{result=\"error\"}} {}",
            load(&self.reconciles_error)
        );
        let _ = writeln!(
            out,
            "# HELP podfleet_operator_reconcile_duration_seconds How long each reconcile took."
        );
        let _ = writeln!(
            out,
            "# TYPE podfleet_operator_reconcile_duration_seconds histogram"
        );
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += load(&self.durations[i]);
            let _ = writeln!(out, "podfleet_operator_reconcile_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += load(&self.durations[BUCKETS.len()]);
        let _ = writeln!(
            out,
            "podfleet_operator_reconcile_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "podfleet_operator_reconcile_duration_seconds_sum {}",
            load(&self.duration_micros) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "podfleet_operator_reconcile_duration_seconds_count {cumulative}"
        );
        let _ = writeln!(
            out,
            "# HELP podfleet_operator_status_patches_total FleetDeployment status patches."
        );
        let _ = writeln!(out, "# TYPE podfleet_operator_status_patches_total counter");
        let _ = writeln!(
            out,
            "podfleet_operator_status_patches_total {}",
            load(&self.status_patches)
        );
        let _ = writeln!(
            out,
            "# HELP podfleet_operator_device_writes_total Device status patches and creations."
        );
        let _ = writeln!(out, "# TYPE podfleet_operator_device_writes_total counter");
        let _ = writeln!(
            out,
            "podfleet_operator_device_writes_total {}",
            load(&self.device_writes)
        );
        if let Some(hub) = hub {
            let [pending, running, failed] = hub.phase_totals();
            let _ = writeln!(out, "# HELP podfleet_operator_deployment_devices Targeted devices by phase, summed over FleetDeployments.");
            let _ = writeln!(out, "# TYPE podfleet_operator_deployment_devices gauge");
            let _ = writeln!(
                out,
                "podfleet_operator_deployment_devices{{phase=\"pending\"}} {pending}"
            );
            let _ = writeln!(
                out,
                "podfleet_operator_deployment_devices{{phase=\"running\"}} {running}"
            );
            let _ = writeln!(
                out,
                "podfleet_operator_deployment_devices{{phase=\"failed\"}} {failed}"
            );
        }
        let _ = writeln!(out, "# HELP podfleet_operator_nats_connected 1 while the fleet controller runs on a live NATS connection.");
        let _ = writeln!(out, "# TYPE podfleet_operator_nats_connected gauge");
        let _ = writeln!(
            out,
            "podfleet_operator_nats_connected {}",
            flag(&self.nats_connected)
        );
        let _ = writeln!(
            out,
            "# HELP podfleet_operator_leader 1 while this replica holds the lease."
        );
        let _ = writeln!(out, "# TYPE podfleet_operator_leader gauge");
        let _ = writeln!(out, "podfleet_operator_leader {}", flag(&self.leader));
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the
/// task is dropped. `hub` is read at each scrape (`None` before this
/// replica leads).
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    hub: Arc<std::sync::OnceLock<Arc<Hub>>>,
) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = Arc::clone(&metrics);
        let hub = Arc::clone(&hub);
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let read =
                tokio::time::timeout(Duration::from_secs(5), stream.read(&mut request)).await;
            let Ok(Ok(n)) = read else {
                return;
            };
            let line = String::from_utf8_lossy(&request[..n]);
            let path = line.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/metrics" => ("200 OK", metrics.render(hub.get().map(|h| &**h))),
                "/healthz" => ("200 OK", "ok\n".to_owned()),
                "/readyz" if metrics.ready.load(Ordering::Relaxed) => ("200 OK", "ok\n".to_owned()),
                "/readyz" => ("503 Service Unavailable", "not ready\n".to_owned()),
                _ => ("404 Not Found", "not found\n".to_owned()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
