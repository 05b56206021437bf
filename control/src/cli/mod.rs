//! The `podfleet` verbs: how they are parsed, and how their output reads.
//!
//! Every verb is split in two: [`shell`] does the IO (connect, read, write,
//! print) and hands what it read to a pure function of the verb's module,
//! which returns the text to print and the exit code. The pure parts never
//! read a clock: ages are computed from an explicit `now` (the snapshot's
//! timestamp), so their output is snapshot-tested.
//!
//! - [`args`]: the command line (clap), and the [`Exit`] codes.
//! - [`table`]: aligned, width-bounded tables and kubectl-style ages.
//! - [`apply`]: reading manifests (YAML or JSON, several documents),
//!   `apply`'s outcome lines and its `--dry-run` plan.
//! - [`get`]: `get devices|deployments` tables, list objects, watch diffs.
//! - [`describe`]: `describe device|deployment`.
//! - [`label`]: `label device`'s argument rules.
//! - [`rollout`]: `rollout status`'s progress lines and verdict.
//! - [`command`]: `ping`, `logs` and `exec` replies.
//! - [`shell`]: the IO edge that runs a parsed command.
//! - [`entry`]: the `podfleet` binary's `main`.
//!
//! The reference for people is docs/cli.md.

pub mod apply;
pub mod args;
pub mod command;
pub mod describe;
pub mod entry;
pub mod get;
pub mod label;
pub mod rollout;
pub mod shell;
pub mod table;

#[cfg(test)]
mod fixtures;

pub use args::Exit;

/// A verb that could not do what it was asked: what to print on stderr and
/// the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The exit code.
    pub exit: Exit,
    /// For people, without the leading `error: `.
    pub message: String,
}

impl Failure {
    /// A failure with [`Exit::Failed`].
    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            exit: Exit::Failed,
            message: message.into(),
        }
    }

    /// A failure with [`Exit::Usage`].
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            exit: Exit::Usage,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}
