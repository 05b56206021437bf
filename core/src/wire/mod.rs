//! Everything that crosses a process boundary, as serde types.
//!
//! JSON with snake_case fields. Decoding tolerates unknown fields so that an
//! agent older than its operator keeps working; fields added after the first
//! release carry defaults so that older payloads keep parsing. The field-by-field
//! reference is docs/wire-format.md.

pub mod command;
pub mod ids;
pub mod names;
pub mod report;
pub mod score;
pub mod text;

pub use command::{
    CommandError, CommandReply, ErrorCode, ExecReply, ExecRequest, LogsReply, LogsRequest,
    PingReply,
};
pub use ids::{InitName, Revision, ServiceName};
pub use names::{CommandSubject, DeploymentKey, DeploymentName, DeviceId, NameError, Verb};
pub use report::{
    DeploymentState, FailureCause, Heartbeat, Phase, PullFailure, RestartRecord, RuntimeHealth,
    RuntimeOperation, Verification, VerifiedStatus,
};
pub use score::{
    InitContainer, LifecyclePolicy, Lifetime, PodmanService, PodmanV0Score, PortMapping, Protocol,
    PullPolicy, ScoreError, Signal, VolumeMount, DEFAULT_INIT_CONTAINER_TIMEOUT, SCORE_FEATURES,
    SETUP_SCRIPT_MAX_BYTES,
};

/// The JSON Schema of [`PodmanV0Score`], as checked into docs/score.schema.json.
pub fn score_json_schema() -> String {
    let schema = schemars::schema_for!(PodmanV0Score);
    let mut text = serde_json::to_string_pretty(&schema).expect("a schema always serialises");
    text.push('\n');
    text
}
