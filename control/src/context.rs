//! Where the `podfleet` CLI and controller connect, like a kubeconfig.
//!
//! SKELETON: the signatures are the contract between the CLI and the NATS
//! side; the bodies are being written.

use std::path::PathBuf;

use podfleet_agent::nats::Credentials;

/// One resolved connection: server URLs and credentials.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The context's name, for messages (`"(flags)"` when none was used).
    pub context: String,
    /// Server URLs, tried in turn.
    pub urls: Vec<String>,
    /// How to log in.
    pub credentials: Credentials,
    /// The inbox prefix (server permissions may require one per user).
    pub inbox_prefix: Option<String>,
}

/// What the user asked for on the command line or in the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--config` / `PODFLEET_CONFIG`; default `$XDG_CONFIG_HOME/podfleet/config.toml`
    /// (`~/.config/podfleet/config.toml`).
    pub config: Option<PathBuf>,
    /// `--context` / `PODFLEET_CONTEXT`; default the file's `current-context`.
    pub context: Option<String>,
    /// `--server` / `PODFLEET_SERVER`: overrides the context's URLs.
    pub server: Option<String>,
    /// `--user`/`--password` (`PODFLEET_USER`/`PODFLEET_PASSWORD`), or
    /// `--creds` (`PODFLEET_CREDS`): override the context's credentials.
    pub user: Option<String>,
    /// See `user`.
    pub password: Option<String>,
    /// See `user`.
    pub creds: Option<PathBuf>,
}

/// Why no connection could be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// Placeholder while the skeleton is filled in.
    #[error("{0}")]
    Other(String),
}

/// Resolves the connection: flags, then environment, then the named (or
/// current) context of the config file, then `nats://127.0.0.1:4222`
/// without credentials.
///
/// # Errors
/// A [`ContextError`] naming the file, the context and what is wrong.
pub fn resolve(_overrides: &Overrides) -> Result<Connection, ContextError> {
    unimplemented!("skeleton")
}
