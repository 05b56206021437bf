//! The request/reply protocol on `device-commands.<device_id>.<verb>`.
//!
//! A request's body is the verb's request type as JSON (`ping` takes any body,
//! usually empty); the reply is a [`CommandReply`]: `{"ok": ...}` or
//! `{"error": {"code": ..., "message": ...}}`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::wire::names::{DeploymentName, DeviceId};

/// Default number of log lines a `logs` request returns.
pub const DEFAULT_TAIL_LINES: u32 = 100;
/// Default seconds an `exec` may run before it is abandoned.
pub const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 10;

/// Reply to `ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PingReply {
    /// The answering device.
    pub device_id: DeviceId,
    /// The agent's version.
    pub agent_version: String,
    /// Seconds since the agent started.
    pub uptime_s: u64,
}

/// Request for `logs`: the tail of one service's container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LogsRequest {
    /// The deployment.
    pub deployment: DeploymentName,
    /// The service within it.
    pub service: String,
    /// How many lines from the end; the agent also caps the reply's size.
    #[serde(default = "default_tail")]
    pub tail_lines: u32,
}

fn default_tail() -> u32 {
    DEFAULT_TAIL_LINES
}

/// Reply to `logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LogsReply {
    /// The container the lines came from.
    pub container_id: String,
    /// stdout and stderr, interleaved as the runtime returned them.
    pub text: String,
    /// True when the agent cut the text to its size limit (the oldest part goes).
    pub truncated: bool,
}

/// Request for `exec`: run an argv inside a service's container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ExecRequest {
    /// The deployment.
    pub deployment: DeploymentName,
    /// The service within it.
    pub service: String,
    /// The program and its arguments; not interpreted by a shell.
    pub argv: Vec<String>,
    /// Seconds before the agent gives up waiting.
    #[serde(default = "default_exec_timeout")]
    pub timeout_secs: u64,
}

fn default_exec_timeout() -> u64 {
    DEFAULT_EXEC_TIMEOUT_SECS
}

/// Reply to `exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ExecReply {
    /// The program's exit code; `None` when it timed out.
    pub exit_code: Option<i64>,
    /// Its standard output (lossy UTF-8).
    pub stdout: String,
    /// Its standard error (lossy UTF-8).
    pub stderr: String,
    /// True when output was cut to the agent's size limit.
    pub truncated: bool,
    /// True when the timeout ran out before the program finished.
    pub timed_out: bool,
}

/// Every reply: the verb's value or an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommandReply<T> {
    /// The verb succeeded.
    Ok(T),
    /// The verb failed.
    Error(CommandError),
}

/// Why a command failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct CommandError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Details for people.
    pub message: String,
}

/// The kinds of command failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request body did not decode or broke a rule.
    BadRequest,
    /// The deployment, service or container does not exist.
    NotFound,
    /// `exec` is switched off in the agent's configuration.
    ExecDisabled,
    /// The runtime did not answer in time.
    Timeout,
    /// The container runtime could not be reached.
    RuntimeUnavailable,
    /// Anything else.
    Internal,
}

impl CommandError {
    /// Builds an error reply.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}
