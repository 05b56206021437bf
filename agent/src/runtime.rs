//! The container runtime as the agent's loop drives it.
//!
//! [`ContainerRuntime`] executes the reconciler's primitive operations,
//! states its version for the heartbeat, and serves the `logs` and `exec`
//! commands. It is implemented by the podman adapter (bollard, behind the
//! `podman` feature) and by the simulator's fake.

use std::future::Future;
use std::time::Duration;

use podfleet_core::runtime::{PullProgress, RuntimeError, RuntimeOp, RuntimeResult};

/// Output of [`ContainerRuntime::logs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogsOutput {
    /// stdout and stderr interleaved, lossy UTF-8, at most the requested bytes
    /// (the newest part is kept).
    pub text: String,
    /// True when older output was cut to fit.
    pub truncated: bool,
}

/// Output of [`ContainerRuntime::exec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// The exit code; `None` when the timeout ran out first.
    pub exit_code: Option<i64>,
    /// Standard output, lossy UTF-8, cut to the byte limit.
    pub stdout: String,
    /// Standard error, lossy UTF-8, cut to the byte limit.
    pub stderr: String,
    /// True when either stream was cut.
    pub truncated: bool,
    /// True when the timeout ran out.
    pub timed_out: bool,
}

/// A container runtime: podman over its API socket, or a fake.
///
/// Operations may run concurrently; `Wait` may block for as long as the
/// container runs (the reconciler keeps the deadline and force-removes the
/// container when it passes, which ends the wait).
pub trait ContainerRuntime: Clone + Send + Sync + 'static {
    /// Executes one primitive operation.
    fn execute(&self, op: RuntimeOp) -> impl Future<Output = RuntimeResult> + Send;

    /// How far the pull of `image` (as the [`RuntimeOp::Pull`] in flight
    /// names it) has got, if the runtime can tell; `None` by default.
    fn pull_progress(&self, image: &str) -> Option<PullProgress> {
        let _ = image;
        None
    }

    /// The runtime's version as it states it (podman's `/version` answer's
    /// `Version`, e.g. `"4.3.1"`), for the heartbeat.
    fn version(&self) -> impl Future<Output = Result<String, RuntimeError>> + Send;

    /// The last `tail_lines` lines of a container's output, at most `max_bytes`.
    fn logs(
        &self,
        container: &str,
        tail_lines: u32,
        max_bytes: usize,
    ) -> impl Future<Output = Result<LogsOutput, RuntimeError>> + Send;

    /// Runs `argv` in a running container, giving up after `timeout`, keeping at
    /// most `max_bytes` of each output stream.
    fn exec(
        &self,
        container: &str,
        argv: &[String],
        timeout: Duration,
        max_bytes: usize,
    ) -> impl Future<Output = Result<ExecOutput, RuntimeError>> + Send;
}
