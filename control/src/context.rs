//! Where the `podfleet` CLI and controller connect, like a kubeconfig.
//!
//! A TOML file names contexts; one of them is current:
//!
//! ```toml
//! current-context = "lab"
//! [contexts.lab]
//! server = "nats://10.0.0.5:4222"          # or servers = ["nats://a:4222", "nats://b:4222"]
//! user = "podfleet-admin"
//! password-file = "lab.password"            # or password, creds, token, nkey-seed-file
//! inbox-prefix = "_INBOX.podfleet-admin"    # optional
//! ```
//!
//! [`resolve`] turns the file and the command line's [`Overrides`] into one
//! [`Connection`]. Relative paths in the file are relative to the file's
//! directory. This module reads the config file and the secret files it
//! names; it never connects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use podfleet_agent::nats::Credentials;
use serde::Deserialize;

/// The server used when neither a flag nor a context names one.
pub const DEFAULT_SERVER: &str = "nats://127.0.0.1:4222";

/// What [`Connection::context`] says when no context of the file was used.
pub const NO_CONTEXT: &str = "(flags)";

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

impl Connection {
    /// A local server without credentials.
    pub fn local() -> Self {
        Self::new(vec![DEFAULT_SERVER.to_owned()])
    }

    /// `urls` without credentials, outside any context.
    pub fn new(urls: Vec<String>) -> Self {
        Self {
            context: NO_CONTEXT.to_owned(),
            urls,
            credentials: Credentials::None,
            inbox_prefix: None,
        }
    }

    /// The URLs as one comma-separated string, as shown in messages and
    /// handed to the client.
    pub fn url_list(&self) -> String {
        self.urls.join(",")
    }
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
    /// The config file named by `--config` / `PODFLEET_CONFIG` does not exist.
    #[error("config file {} does not exist", path.display())]
    ConfigNotFound {
        /// The file.
        path: PathBuf,
    },
    /// The config file exists but cannot be read.
    #[error("cannot read config file {}: {source}", path.display())]
    ConfigUnreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML, or not a podfleet config.
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    ConfigInvalid {
        /// The file.
        path: PathBuf,
        /// The 1-based line of the problem, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// The context asked for is not in the file.
    #[error("{}: no context named {name:?}; known contexts: {}", path.display(), known_list(known))]
    UnknownContext {
        /// The file.
        path: PathBuf,
        /// The context asked for.
        name: String,
        /// The contexts the file has.
        known: Vec<String>,
    },
    /// A context was asked for with `--context`, but there is no config file.
    #[error("context {name:?} was asked for, but there is no config file at {}", path.display())]
    NoConfigFile {
        /// Where the file was looked for.
        path: PathBuf,
        /// The context asked for.
        name: String,
    },
    /// Settings that exclude each other are both set.
    #[error("{origin}: {} cannot be used together; set one", fields.join(" and "))]
    Conflict {
        /// `<file>, context <name>`, or `(flags)`.
        origin: String,
        /// The settings, as spelled in the file or on the command line.
        fields: Vec<&'static str>,
    },
    /// A setting needs another one that is missing.
    #[error("{origin}: {field} is set without {needs}")]
    Incomplete {
        /// `<file>, context <name>`, or `(flags)`.
        origin: String,
        /// The setting that is set.
        field: &'static str,
        /// What it needs.
        needs: &'static str,
    },
    /// A context names no server (`servers = []`).
    #[error("{origin}: servers is empty")]
    NoServers {
        /// `<file>, context <name>`.
        origin: String,
    },
    /// A secret file (`password-file`, `nkey-seed-file`) cannot be read.
    #[error("{origin}: cannot read {field} {}: {source}", path.display())]
    SecretUnreadable {
        /// `<file>, context <name>`.
        origin: String,
        /// The setting.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn known_list(known: &[String]) -> String {
    if known.is_empty() {
        "none".to_owned()
    } else {
        known.join(", ")
    }
}

/// The config file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ConfigFile {
    current_context: Option<String>,
    #[serde(default)]
    contexts: BTreeMap<String, ContextEntry>,
}

/// One `[contexts.<name>]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ContextEntry {
    server: Option<String>,
    servers: Option<Vec<String>>,
    user: Option<String>,
    password: Option<String>,
    password_file: Option<PathBuf>,
    creds: Option<PathBuf>,
    token: Option<String>,
    nkey_seed_file: Option<PathBuf>,
    inbox_prefix: Option<String>,
}

/// Resolves the connection: flags, then environment, then the named (or
/// current) context of the config file, then `nats://127.0.0.1:4222`
/// without credentials.
///
/// A missing default config file is no error; a missing file named with
/// `--config` is. Without `--context` and without `current-context`, no
/// context is used.
///
/// # Errors
/// A [`ContextError`] naming the file, the context and what is wrong.
pub fn resolve(overrides: &Overrides) -> Result<Connection, ContextError> {
    resolve_with(overrides, |name| std::env::var_os(name).map(PathBuf::from))
}

/// [`resolve`] with the environment (`XDG_CONFIG_HOME`, `HOME`) given.
fn resolve_with(
    overrides: &Overrides,
    env: impl Fn(&str) -> Option<PathBuf>,
) -> Result<Connection, ContextError> {
    let (path, explicit) = match &overrides.config {
        Some(path) => (path.clone(), true),
        None => (default_config_path(&env), false),
    };
    let file = read_config(&path, explicit)?;
    let mut connection = match file {
        Some(file) => {
            let name = overrides
                .context
                .clone()
                .or_else(|| file.current_context.clone());
            match name {
                Some(name) => from_context(&path, &file, &name)?,
                None => Connection::local(),
            }
        }
        None => match &overrides.context {
            Some(name) => {
                return Err(ContextError::NoConfigFile {
                    path,
                    name: name.clone(),
                })
            }
            None => Connection::local(),
        },
    };
    // An empty `--server` or PODFLEET_SERVER is unset, as an empty
    // KUBECONFIG is to kubectl: the context's servers stay.
    if let Some(server) = overrides.server.as_deref().filter(|s| !s.trim().is_empty()) {
        connection.urls = split_servers(server);
    }
    if let Some(credentials) = override_credentials(overrides)? {
        connection.credentials = credentials;
    }
    Ok(connection)
}

/// `$XDG_CONFIG_HOME/podfleet/config.toml`, else `~/.config/podfleet/config.toml`.
fn default_config_path(env: &impl Fn(&str) -> Option<PathBuf>) -> PathBuf {
    let base = env("XDG_CONFIG_HOME")
        .filter(|p| p.is_absolute())
        .or_else(|| env("HOME").map(|home| home.join(".config")))
        .unwrap_or_else(|| PathBuf::from(".config"));
    base.join("podfleet").join("config.toml")
}

fn read_config(path: &Path, explicit: bool) -> Result<Option<ConfigFile>, ContextError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return if explicit {
                Err(ContextError::ConfigNotFound {
                    path: path.to_owned(),
                })
            } else {
                Ok(None)
            };
        }
        Err(source) => {
            return Err(ContextError::ConfigUnreadable {
                path: path.to_owned(),
                source,
            })
        }
    };
    toml::from_str(&text)
        .map(Some)
        .map_err(|e| ContextError::ConfigInvalid {
            path: path.to_owned(),
            line: e
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1),
            message: e.message().to_owned(),
        })
}

fn from_context(path: &Path, file: &ConfigFile, name: &str) -> Result<Connection, ContextError> {
    let Some(entry) = file.contexts.get(name) else {
        return Err(ContextError::UnknownContext {
            path: path.to_owned(),
            name: name.to_owned(),
            known: file.contexts.keys().cloned().collect(),
        });
    };
    let origin = format!("{}, context {name}", path.display());
    let base = path.parent().unwrap_or(Path::new("."));
    let urls = match (&entry.server, &entry.servers) {
        (Some(_), Some(_)) => {
            return Err(ContextError::Conflict {
                origin,
                fields: vec!["server", "servers"],
            })
        }
        (Some(server), None) => split_servers(server),
        (None, Some(servers)) if servers.is_empty() => {
            return Err(ContextError::NoServers { origin })
        }
        (None, Some(servers)) => servers.clone(),
        (None, None) => vec![DEFAULT_SERVER.to_owned()],
    };
    let credentials = context_credentials(entry, &origin, base)?;
    Ok(Connection {
        context: name.to_owned(),
        urls,
        credentials,
        inbox_prefix: entry.inbox_prefix.clone(),
    })
}

fn context_credentials(
    entry: &ContextEntry,
    origin: &str,
    base: &Path,
) -> Result<Credentials, ContextError> {
    let set: Vec<&'static str> = [
        ("user", entry.user.is_some()),
        ("creds", entry.creds.is_some()),
        ("token", entry.token.is_some()),
        ("nkey-seed-file", entry.nkey_seed_file.is_some()),
    ]
    .into_iter()
    .filter_map(|(field, set)| set.then_some(field))
    .collect();
    if set.len() > 1 {
        return Err(ContextError::Conflict {
            origin: origin.to_owned(),
            fields: set,
        });
    }
    if entry.password.is_some() && entry.password_file.is_some() {
        return Err(ContextError::Conflict {
            origin: origin.to_owned(),
            fields: vec!["password", "password-file"],
        });
    }
    let has_password = entry.password.is_some() || entry.password_file.is_some();
    if has_password && entry.user.is_none() {
        return Err(ContextError::Incomplete {
            origin: origin.to_owned(),
            field: if entry.password.is_some() {
                "password"
            } else {
                "password-file"
            },
            needs: "user",
        });
    }
    let read_secret = |field: &'static str, file: &Path| {
        let path = base.join(file);
        std::fs::read_to_string(&path)
            .map(|text| text.trim().to_owned())
            .map_err(|source| ContextError::SecretUnreadable {
                origin: origin.to_owned(),
                field,
                path,
                source,
            })
    };
    Ok(if let Some(user) = &entry.user {
        let password = match (&entry.password, &entry.password_file) {
            (Some(password), _) => password.clone(),
            (None, Some(file)) => read_secret("password-file", file)?,
            (None, None) => {
                return Err(ContextError::Incomplete {
                    origin: origin.to_owned(),
                    field: "user",
                    needs: "password or password-file",
                })
            }
        };
        Credentials::UserPassword {
            user: user.clone(),
            password,
        }
    } else if let Some(creds) = &entry.creds {
        Credentials::CredsFile(base.join(creds))
    } else if let Some(token) = &entry.token {
        Credentials::Token(token.clone())
    } else if let Some(file) = &entry.nkey_seed_file {
        Credentials::NKeySeed(read_secret("nkey-seed-file", file)?)
    } else {
        Credentials::None
    })
}

/// The credentials the flags ask for, if any.
fn override_credentials(overrides: &Overrides) -> Result<Option<Credentials>, ContextError> {
    let origin = || NO_CONTEXT.to_owned();
    match (&overrides.user, &overrides.password, &overrides.creds) {
        (Some(_), _, Some(_)) => Err(ContextError::Conflict {
            origin: origin(),
            fields: vec!["--user", "--creds"],
        }),
        (None, Some(_), Some(_)) => Err(ContextError::Conflict {
            origin: origin(),
            fields: vec!["--password", "--creds"],
        }),
        (Some(user), Some(password), None) => Ok(Some(Credentials::UserPassword {
            user: user.clone(),
            password: password.clone(),
        })),
        (Some(_), None, None) => Err(ContextError::Incomplete {
            origin: origin(),
            field: "--user",
            needs: "--password",
        }),
        (None, Some(_), None) => Err(ContextError::Incomplete {
            origin: origin(),
            field: "--password",
            needs: "--user",
        }),
        (None, None, Some(creds)) => Ok(Some(Credentials::CredsFile(creds.clone()))),
        (None, None, None) => Ok(None),
    }
}

/// `a,b` → `["a", "b"]`, as the CLI's `--server` takes a list too.
fn split_servers(server: &str) -> Vec<String> {
    server
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    struct Dir(tempfile::TempDir);

    impl Dir {
        fn new() -> Self {
            Self(tempfile::tempdir().unwrap())
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        }

        /// Resolves with `$XDG_CONFIG_HOME` in this directory.
        fn resolve(&self, overrides: &Overrides) -> Result<Connection, ContextError> {
            let home = self.0.path().to_owned();
            resolve_with(overrides, |name| {
                (name == "XDG_CONFIG_HOME").then(|| home.clone())
            })
        }

        fn default_file(&self, text: &str) -> PathBuf {
            std::fs::create_dir_all(self.0.path().join("podfleet")).unwrap();
            self.write("podfleet/config.toml", text)
        }
    }

    const LAB: &str = r#"
current-context = "lab"
[contexts.lab]
server = "nats://10.0.0.5:4222"
user = "podfleet-admin"
password = "s3cret"
inbox-prefix = "_INBOX.podfleet-admin"

[contexts.prod]
servers = ["nats://a:4222", "nats://b:4222"]
creds = "prod.creds"
"#;

    #[test]
    fn no_file_means_a_local_server_without_credentials() {
        let dir = Dir::new();
        let connection = dir.resolve(&Overrides::default()).unwrap();
        assert_eq!(connection.urls, vec![DEFAULT_SERVER]);
        assert_eq!(connection.credentials, Credentials::None);
        assert_eq!(connection.context, NO_CONTEXT);
        assert_eq!(connection.inbox_prefix, None);
    }

    #[test]
    fn an_empty_server_flag_is_unset() {
        let dir = Dir::new();
        let overrides = Overrides {
            server: Some("  ".into()),
            ..Overrides::default()
        };
        assert_eq!(dir.resolve(&overrides).unwrap().urls, vec![DEFAULT_SERVER]);
    }

    #[test]
    fn the_default_file_lives_under_xdg_config_home_or_home() {
        let xdg = |name: &str| match name {
            "XDG_CONFIG_HOME" => Some(PathBuf::from("/x")),
            "HOME" => Some(PathBuf::from("/home/u")),
            _ => None,
        };
        assert_eq!(
            default_config_path(&xdg),
            Path::new("/x/podfleet/config.toml")
        );
        let home = |name: &str| (name == "HOME").then(|| PathBuf::from("/home/u"));
        assert_eq!(
            default_config_path(&home),
            Path::new("/home/u/.config/podfleet/config.toml")
        );
    }

    #[test]
    fn the_current_context_of_the_default_file_is_used() {
        let dir = Dir::new();
        dir.default_file(LAB);
        let connection = dir.resolve(&Overrides::default()).unwrap();
        assert_eq!(connection.context, "lab");
        assert_eq!(connection.urls, vec!["nats://10.0.0.5:4222"]);
        assert_eq!(
            connection.credentials,
            Credentials::UserPassword {
                user: "podfleet-admin".into(),
                password: "s3cret".into()
            }
        );
        assert_eq!(
            connection.inbox_prefix.as_deref(),
            Some("_INBOX.podfleet-admin")
        );
    }

    #[test]
    fn a_named_context_wins_and_relative_paths_are_the_files() {
        let dir = Dir::new();
        let file = dir.default_file(LAB);
        let connection = dir
            .resolve(&Overrides {
                context: Some("prod".into()),
                ..Overrides::default()
            })
            .unwrap();
        assert_eq!(connection.urls, vec!["nats://a:4222", "nats://b:4222"]);
        assert_eq!(
            connection.credentials,
            Credentials::CredsFile(file.parent().unwrap().join("prod.creds"))
        );
    }

    #[test]
    fn flags_override_the_context() {
        let dir = Dir::new();
        let file = dir.write("other.toml", LAB);
        let connection = dir
            .resolve(&Overrides {
                config: Some(file),
                server: Some("nats://x:1,nats://y:2".into()),
                user: Some("me".into()),
                password: Some("pw".into()),
                ..Overrides::default()
            })
            .unwrap();
        assert_eq!(connection.context, "lab");
        assert_eq!(connection.urls, vec!["nats://x:1", "nats://y:2"]);
        assert_eq!(
            connection.credentials,
            Credentials::UserPassword {
                user: "me".into(),
                password: "pw".into()
            }
        );
        let creds = dir
            .resolve(&Overrides {
                creds: Some("/c.creds".into()),
                ..Overrides::default()
            })
            .unwrap();
        assert_eq!(creds.credentials, Credentials::CredsFile("/c.creds".into()));
    }

    #[test]
    fn a_missing_explicit_file_is_an_error() {
        let dir = Dir::new();
        let missing = dir.0.path().join("nope.toml");
        let error = dir
            .resolve(&Overrides {
                config: Some(missing.clone()),
                ..Overrides::default()
            })
            .unwrap_err();
        assert!(matches!(&error, ContextError::ConfigNotFound { path } if *path == missing));
        assert!(error.to_string().contains("nope.toml does not exist"));
    }

    #[test]
    fn an_unknown_context_lists_the_known_ones() {
        let dir = Dir::new();
        dir.default_file(LAB);
        let error = dir
            .resolve(&Overrides {
                context: Some("stage".into()),
                ..Overrides::default()
            })
            .unwrap_err();
        assert!(
            matches!(&error, ContextError::UnknownContext { name, known, .. } if name == "stage" && known == &["lab", "prod"])
        );
        assert!(error
            .to_string()
            .ends_with("no context named \"stage\"; known contexts: lab, prod"));
    }

    #[test]
    fn a_context_without_a_file_is_an_error() {
        let dir = Dir::new();
        let error = dir
            .resolve(&Overrides {
                context: Some("lab".into()),
                ..Overrides::default()
            })
            .unwrap_err();
        assert!(matches!(error, ContextError::NoConfigFile { .. }));
    }

    #[test]
    fn bad_toml_names_the_file_and_line() {
        let dir = Dir::new();
        let file = dir.default_file("current-context = \"lab\"\n[contexts.lab]\nserver = \n");
        let error = dir.resolve(&Overrides::default()).unwrap_err();
        let ContextError::ConfigInvalid { path, line, .. } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(path, &file);
        assert_eq!(*line, Some(3));
        assert!(error
            .to_string()
            .starts_with(&format!("{}:3: ", file.display())));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let dir = Dir::new();
        dir.default_file("[contexts.lab]\nsever = \"nats://x\"\n");
        let error = dir.resolve(&Overrides::default()).unwrap_err();
        assert!(
            matches!(&error, ContextError::ConfigInvalid { line: Some(2), message, .. } if message.contains("sever")),
            "{error:?}"
        );
    }

    #[test]
    fn conflicting_credentials_name_the_context_and_fields() {
        let dir = Dir::new();
        dir.default_file(
            "current-context = \"lab\"\n[contexts.lab]\nuser = \"u\"\npassword = \"p\"\ntoken = \"t\"\n",
        );
        let error = dir.resolve(&Overrides::default()).unwrap_err();
        assert!(
            matches!(&error, ContextError::Conflict { fields, .. } if fields == &["user", "token"])
        );
        assert!(error.to_string().contains("context lab: user and token"));
        let flags = dir
            .resolve(&Overrides {
                user: Some("u".into()),
                creds: Some("c".into()),
                ..Overrides::default()
            })
            .unwrap_err();
        assert!(matches!(flags, ContextError::Conflict { .. }));
    }

    #[test]
    fn incomplete_credentials_are_refused() {
        let dir = Dir::new();
        dir.default_file("current-context = \"lab\"\n[contexts.lab]\nuser = \"u\"\n");
        let error = dir.resolve(&Overrides::default()).unwrap_err();
        assert!(matches!(
            error,
            ContextError::Incomplete { field: "user", .. }
        ));
        let flags = Dir::new()
            .resolve(&Overrides {
                password: Some("p".into()),
                ..Overrides::default()
            })
            .unwrap_err();
        assert!(matches!(
            flags,
            ContextError::Incomplete {
                field: "--password",
                ..
            }
        ));
    }

    #[test]
    fn secrets_are_read_from_files_next_to_the_config() {
        let dir = Dir::new();
        dir.default_file(
            "current-context = \"a\"\n[contexts.a]\nuser = \"u\"\npassword-file = \"pw\"\n[contexts.b]\nnkey-seed-file = \"seed\"\n",
        );
        dir.write("podfleet/pw", "hunter2\n");
        let a = dir.resolve(&Overrides::default()).unwrap();
        assert_eq!(
            a.credentials,
            Credentials::UserPassword {
                user: "u".into(),
                password: "hunter2".into()
            }
        );
        let b = dir
            .resolve(&Overrides {
                context: Some("b".into()),
                ..Overrides::default()
            })
            .unwrap_err();
        assert!(
            matches!(&b, ContextError::SecretUnreadable { field: "nkey-seed-file", path, .. } if path.ends_with("podfleet/seed"))
        );
    }

    #[test]
    fn server_and_servers_exclude_each_other() {
        let dir = Dir::new();
        dir.default_file(
            "current-context = \"a\"\n[contexts.a]\nserver = \"nats://x\"\nservers = [\"nats://y\"]\n",
        );
        assert!(matches!(
            dir.resolve(&Overrides::default()).unwrap_err(),
            ContextError::Conflict { .. }
        ));
    }
}
