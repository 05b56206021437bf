//! Image references and registry logins: which registry and repository an
//! image name means (as podman reads it), how a tag is pinned to a digest,
//! and which login of a containers-auth.json file an image is fetched with.
//!
//! The agent (pulling through podman) and the control plane (resolving tags
//! to digests at apply time) both decide these things here, so a name means
//! the same registry, repository and login on both sides.
//!
//! This module reads text it is given; it never opens a file or a socket.
//! Passwords leave it only through [`RegistryLogin::password`]: the `Debug`
//! of every type here masks them, and no error built here quotes a
//! credential or the text of a credentials file.

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;

/// The registry of a reference without a host, as podman's Docker-compatible
/// API has it (it ignores registries.conf's search list).
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// An image reference taken apart: `localhost:5000/team/app:1`,
/// `alpine`, `ghcr.io/x/y@sha256:...`, `ghcr.io/x/y:1@sha256:...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference {
    /// `docker.io` when the reference names none.
    host: String,
    /// Whether the reference named its host.
    explicit_host: bool,
    /// The repository below the host: `library/alpine`, `team/app`.
    path: String,
    tag: Option<String>,
    /// `sha256:...`
    digest: Option<String>,
}

/// Why a text is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {reference:?}: {reason}")]
pub struct InvalidReference {
    /// The text, as written.
    pub reference: String,
    /// Which rule it breaks.
    pub reason: &'static str,
}

impl ImageReference {
    /// Takes `reference` apart the way the Docker reference grammar does: the
    /// first component is a host when it has a `.` or a `:` or is
    /// `localhost`; a Docker Hub name of one component is under `library/`.
    ///
    /// # Errors
    ///
    /// [`InvalidReference`] for an empty text, whitespace, an empty
    /// component or tag, or a digest that is not `algorithm:hex`.
    pub fn parse(reference: &str) -> Result<Self, InvalidReference> {
        let bad = |reason| InvalidReference {
            reference: reference.to_owned(),
            reason,
        };
        if reference.is_empty() || reference.chars().any(char::is_whitespace) {
            return Err(bad("empty or has whitespace"));
        }
        let (name, digest) = match reference.split_once('@') {
            Some((name, digest)) => {
                if !digest.contains(':') || digest.ends_with(':') {
                    return Err(bad("the digest is not algorithm:hex"));
                }
                (name, Some(digest.to_owned()))
            }
            None => (reference, None),
        };
        let (host, explicit_host, rest) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), true, rest)
            }
            _ => (DEFAULT_REGISTRY.to_owned(), false, name),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (path, tag) = match rest.get(last_slash..).and_then(|last| last.rfind(':')) {
            Some(colon) => {
                let at = last_slash + colon;
                (
                    rest.get(..at).unwrap_or_default(),
                    rest.get(at + 1..).map(str::to_owned),
                )
            }
            None => (rest, None),
        };
        if path.is_empty() || path.split('/').any(str::is_empty) {
            return Err(bad("an empty repository component"));
        }
        if tag.as_deref() == Some("") {
            return Err(bad("an empty tag"));
        }
        let path = if host == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_owned()
        };
        Ok(Self {
            host,
            explicit_host,
            path,
            tag,
            digest,
        })
    }

    /// The registry: `docker.io`, `localhost:5000`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The repository below the host, as the distribution API names it:
    /// `library/alpine`, `team/app`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `host/path`, e.g. `docker.io/library/alpine`.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.host, self.path)
    }

    /// The tag as written, if any (`latest` is implied when none is).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest the reference pins, if any.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// What a pull names: the digest when pinned, else the tag
    /// (`latest` when none is written).
    pub fn tag_or_digest(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// Whether this is one of podman's local-only names, `localhost/...`:
    /// images built or loaded on the machine, with no registry behind them.
    /// `localhost:5000/...` names a registry and is not local-only.
    pub fn is_local_only(&self) -> bool {
        self.host == "localhost"
    }

    /// The fully qualified reference: `docker.io/library/alpine:latest`,
    /// `host/x@sha256:...`.
    pub fn canonical(&self) -> String {
        match &self.digest {
            Some(digest) => format!("{}@{digest}", self.repository()),
            None => format!("{}:{}", self.repository(), self.tag_or_digest()),
        }
    }

    /// The manifest digest among an image's `RepoDigests`
    /// (`repository@sha256:...`) that belongs to this reference's
    /// repository. A reference without a host also matches a repository
    /// ending in its path (podman resolves `app:1` to a local
    /// `localhost/app:1` before Docker Hub).
    pub fn digest_among<'a>(&self, repo_digests: &'a [String]) -> Option<&'a str> {
        let repository = self.repository();
        let split = |entry: &'a String| entry.split_once('@');
        repo_digests
            .iter()
            .filter_map(split)
            .find(|(repo, _)| *repo == repository)
            .or_else(|| {
                if self.explicit_host {
                    return None;
                }
                let written = self.path.strip_prefix("library/").unwrap_or(&self.path);
                let suffix = format!("/{written}");
                repo_digests
                    .iter()
                    .filter_map(split)
                    .find(|(repo, _)| repo.ends_with(&suffix))
            })
            .map(|(_, digest)| digest)
    }

    /// Whether an image the store knows by `names` (its fully qualified
    /// tags and digests, as `list images` gives them) is the one this
    /// reference names: the same repository, and the same digest when
    /// this one pins one, else the same tag. A reference without a host
    /// also matches a repository ending in its path, as in
    /// [`digest_among`](Self::digest_among).
    pub fn names_image(&self, names: &[String]) -> bool {
        let written = self.path.strip_prefix("library/").unwrap_or(&self.path);
        let suffix = format!("/{written}");
        names
            .iter()
            .filter_map(|n| Self::parse(n).ok())
            .any(|name| {
                let same_repository = name.host == self.host && name.path == self.path
                    || !self.explicit_host && name.repository().ends_with(&suffix);
                let same_image = match (&self.digest, &name.digest) {
                    (Some(mine), Some(theirs)) => mine == theirs,
                    (Some(_), None) => false,
                    (None, Some(_)) => false,
                    (None, None) => self.tag_or_digest() == name.tag_or_digest(),
                };
                same_repository && same_image
            })
    }

    /// The keys credentials may be stored under for this reference, most
    /// specific first: `host/a/b`, `host/a`, `host` (containers-auth.json's
    /// lookup order).
    fn credential_keys(&self) -> impl Iterator<Item = String> + '_ {
        let components: Vec<&str> = self.path.split('/').collect();
        (0..=components.len()).rev().map(move |n| {
            let mut key = self.host.clone();
            for component in components.iter().take(n) {
                key.push('/');
                key.push_str(component);
            }
            key
        })
    }
}

/// Whether `digest` is a manifest digest as registries give them:
/// `sha256:` and 64 lowercase hex digits.
pub fn is_sha256_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// `written` (a reference without a digest, as the manifest has it) pinned
/// to `digest`, keeping its name and tag for people to read:
/// `registry.example/web:1` → `registry.example/web:1@sha256:...`;
/// an untagged `web` → `web:latest@sha256:...`, naming the tag that was
/// resolved.
///
/// # Errors
///
/// [`InvalidReference`] when `written` is not a reference, already pins a
/// digest, or `digest` is not `sha256:<64 hex>`.
pub fn pin(written: &str, digest: &str) -> Result<String, InvalidReference> {
    let reference = ImageReference::parse(written)?;
    let bad = |reason| InvalidReference {
        reference: written.to_owned(),
        reason,
    };
    if reference.digest.is_some() {
        return Err(bad("it already pins a digest"));
    }
    if !is_sha256_digest(digest) {
        return Err(bad("the digest to pin is not sha256:<64 hex digits>"));
    }
    Ok(match reference.tag {
        Some(_) => format!("{written}@{digest}"),
        None => format!("{written}:latest@{digest}"),
    })
}

/// A user name and password for one registry. Its `Debug` masks the
/// password.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryLogin {
    username: String,
    password: String,
}

impl RegistryLogin {
    /// A login.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            password: password.into(),
        }
    }

    /// The user name.
    #[must_use]
    pub fn username(&self) -> &str {
        &self.username
    }

    /// The password, to be written into the one request that carries it;
    /// never into a message or a log.
    #[must_use]
    pub fn password(&self) -> &str {
        &self.password
    }
}

impl fmt::Debug for RegistryLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryLogin")
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

/// Where a registry's login came from, for the agent's `--check-config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginSource {
    /// A containers-auth.json file.
    AuthFile,
    /// A `[registries."host"]` table of the agent's configuration.
    Inline,
}

/// Registry logins, by registry (`localhost:5000`, `docker.io`) or
/// repository namespace (`ghcr.io/team`).
///
/// An image is fetched with the login of the most specific key its
/// reference falls under, as containers-auth.json(5) has it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryAuth {
    logins: BTreeMap<String, (RegistryLogin, LoginSource)>,
}

/// Why a text is not a usable containers-auth.json file. Never quotes a
/// value of the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidAuthFile {
    /// Not JSON, or not the shape of a containers-auth.json file.
    #[error("not a containers-auth.json file ({category} error at line {line}, column {column})")]
    NotAuthJson {
        /// serde_json's category: `Syntax`, `Data`, `Eof`.
        category: &'static str,
        /// 1-based.
        line: usize,
        /// 1-based.
        column: usize,
    },
    /// An entry's `auth` is not base64 of `user:password`.
    #[error("the \"auth\" of {key:?} is not base64 of \"user:password\"")]
    BadAuth {
        /// The entry's key (a registry or namespace; not a secret).
        key: String,
    },
}

/// containers-auth.json, as much as podfleet reads of it.
#[derive(Deserialize)]
struct AuthJson {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
}

impl RegistryAuth {
    /// No logins: every image is fetched anonymously.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads podman's containers-auth.json format:
    /// `{"auths": {"registry:port": {"auth": base64("user:password")}}}`.
    /// Entries without an `auth` (a credential helper's) are skipped.
    ///
    /// # Errors
    ///
    /// [`InvalidAuthFile`], naming the JSON position or the entry's key,
    /// never a value from the file.
    pub fn from_auth_json(text: &str) -> Result<Self, InvalidAuthFile> {
        let file: AuthJson = serde_json::from_str(text).map_err(|e| {
            // serde's messages can quote the offending value: a password.
            InvalidAuthFile::NotAuthJson {
                category: match e.classify() {
                    serde_json::error::Category::Io => "Io",
                    serde_json::error::Category::Syntax => "Syntax",
                    serde_json::error::Category::Data => "Data",
                    serde_json::error::Category::Eof => "Eof",
                },
                line: e.line(),
                column: e.column(),
            }
        })?;
        let mut auth = Self::new();
        for (key, entry) in file.auths {
            let Some(encoded) = entry.auth.filter(|a| !a.is_empty()) else {
                continue;
            };
            let login = STANDARD
                .decode(encoded.trim())
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .and_then(|text| {
                    let (user, password) = text.split_once(':')?;
                    (!user.is_empty()).then(|| RegistryLogin::new(user, password))
                })
                .ok_or_else(|| InvalidAuthFile::BadAuth { key: key.clone() })?;
            auth.insert(&key, login, LoginSource::AuthFile);
        }
        Ok(auth)
    }

    /// Adds (or replaces) the login for `key`: a registry (`host:port`) or a
    /// repository namespace under one (`host/team`). A Docker config's
    /// `https://index.docker.io/v1/` is read as `docker.io`.
    pub fn insert(&mut self, key: &str, login: RegistryLogin, source: LoginSource) {
        self.logins.insert(normalize_key(key), (login, source));
    }

    /// The logins by key, with where each came from.
    pub fn logins(&self) -> impl Iterator<Item = (&str, &RegistryLogin, LoginSource)> + '_ {
        self.logins
            .iter()
            .map(|(key, (login, source))| (key.as_str(), login, *source))
    }

    /// Whether there are no logins.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.logins.is_empty()
    }

    /// The login to fetch `reference` with, and the key it is stored under.
    pub fn login_for(&self, reference: &ImageReference) -> Option<(&str, &RegistryLogin)> {
        reference.credential_keys().find_map(|key| {
            self.logins
                .get_key_value(&key)
                .map(|(key, (login, _))| (key.as_str(), login))
        })
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `host:5000/` → `host:5000`.
fn normalize_key(key: &str) -> String {
    let key = key.trim();
    let (key, had_scheme) = match key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
    {
        Some(rest) => (rest, true),
        None => (key, false),
    };
    // A key with a scheme is Docker's legacy form: a registry URL, whose
    // path (`/v1/`) is not a namespace.
    let key = if had_scheme {
        key.split('/').next().unwrap_or_default()
    } else {
        key.trim_end_matches('/')
    };
    let (host, rest) = key.split_once('/').unwrap_or((key, ""));
    let host = match host {
        "index.docker.io" | "registry-1.docker.io" => DEFAULT_REGISTRY,
        other => other,
    };
    if rest.is_empty() {
        host.to_owned()
    } else {
        format!("{host}/{rest}")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parts(reference: &str) -> (String, String, String) {
        let r = ImageReference::parse(reference).unwrap();
        (r.host().to_owned(), r.repository(), r.canonical())
    }

    #[test]
    fn references_split_into_host_repository_tag_and_digest() {
        assert_eq!(
            parts("alpine"),
            (
                "docker.io".into(),
                "docker.io/library/alpine".into(),
                "docker.io/library/alpine:latest".into()
            )
        );
        assert_eq!(
            parts("team/app:1.2"),
            (
                "docker.io".into(),
                "docker.io/team/app".into(),
                "docker.io/team/app:1.2".into()
            )
        );
        assert_eq!(
            parts("localhost:5000/x"),
            (
                "localhost:5000".into(),
                "localhost:5000/x".into(),
                "localhost:5000/x:latest".into()
            )
        );
        assert_eq!(
            parts("localhost/podfleet-demo:1"),
            (
                "localhost".into(),
                "localhost/podfleet-demo".into(),
                "localhost/podfleet-demo:1".into()
            )
        );
        assert_eq!(
            parts("registry.example.com/a/b/c:v2"),
            (
                "registry.example.com".into(),
                "registry.example.com/a/b/c".into(),
                "registry.example.com/a/b/c:v2".into()
            )
        );
        let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let pinned = ImageReference::parse(&format!("127.0.0.1:1/nothing:1@{digest}")).unwrap();
        assert_eq!(pinned.host(), "127.0.0.1:1");
        assert_eq!(pinned.path(), "nothing");
        assert_eq!(pinned.tag(), Some("1"));
        assert_eq!(pinned.tag_or_digest(), digest);
        assert_eq!(pinned.digest(), Some(digest));
        assert_eq!(pinned.canonical(), format!("127.0.0.1:1/nothing@{digest}"));
        assert_eq!(
            ImageReference::parse("127.0.0.1:1/nothing:1")
                .unwrap()
                .tag_or_digest(),
            "1"
        );
        for bad in ["", "a b", "x:", "/x", "host.io//x", "x@sha256", "x@"] {
            assert!(ImageReference::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            ImageReference::parse("x:").unwrap_err().to_string(),
            "invalid image reference \"x:\": an empty tag"
        );
    }

    #[test]
    fn only_localhost_without_a_port_is_local_only() {
        let local = |r: &str| ImageReference::parse(r).unwrap().is_local_only();
        assert!(local("localhost/web:1"));
        assert!(!local("localhost:5000/web:1"));
        assert!(!local("web:1"));
        assert!(!local("registry.example.com/localhost/web"));
    }

    #[test]
    fn pinning_keeps_the_name_and_tag_as_written() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            pin("registry.example.com/web:1", &digest).unwrap(),
            format!("registry.example.com/web:1@{digest}")
        );
        assert_eq!(
            pin("localhost:5000/web", &digest).unwrap(),
            format!("localhost:5000/web:latest@{digest}")
        );
        assert_eq!(
            pin("alpine:3", &digest).unwrap(),
            format!("alpine:3@{digest}")
        );
        assert!(pin(&format!("web:1@{digest}"), &digest).is_err());
        assert!(pin("web:1", "sha256:abc").is_err());
        assert!(pin("web:1", &digest.to_uppercase()).is_err());
        assert!(is_sha256_digest(&digest));
        assert!(!is_sha256_digest(&format!("sha512:{}", "ab".repeat(32))));
    }

    #[test]
    fn the_digest_comes_from_the_references_repository() {
        let digests = vec![
            "quay.io/other/app@sha256:aaa".to_owned(),
            "localhost:5000/app@sha256:bbb".to_owned(),
            "localhost/podfleet-demo@sha256:ccc".to_owned(),
        ];
        let digest = |r: &str| {
            ImageReference::parse(r)
                .unwrap()
                .digest_among(&digests)
                .map(str::to_owned)
        };
        assert_eq!(
            digest("localhost:5000/app:1").as_deref(),
            Some("sha256:bbb")
        );
        assert_eq!(digest("quay.io/other/app").as_deref(), Some("sha256:aaa"));
        assert_eq!(digest("ghcr.io/app:1"), None);
        // A short name podman resolved to a local image.
        assert_eq!(digest("podfleet-demo:1").as_deref(), Some("sha256:ccc"));
        assert_eq!(digest("docker.io/podfleet-demo:1"), None);
    }

    #[test]
    fn the_most_specific_login_is_chosen() {
        let mut auth = RegistryAuth::new();
        auth.insert(
            "localhost:5000",
            RegistryLogin::new("a", "1"),
            LoginSource::Inline,
        );
        auth.insert(
            "ghcr.io/team",
            RegistryLogin::new("b", "2"),
            LoginSource::Inline,
        );
        auth.insert("ghcr.io", RegistryLogin::new("c", "3"), LoginSource::Inline);
        auth.insert(
            "https://index.docker.io/v1/",
            RegistryLogin::new("d", "4"),
            LoginSource::AuthFile,
        );
        let user = |r: &str| {
            auth.login_for(&ImageReference::parse(r).unwrap())
                .map(|(key, login)| format!("{key}={}", login.username()))
        };
        assert_eq!(
            user("localhost:5000/x:1").as_deref(),
            Some("localhost:5000=a")
        );
        assert_eq!(user("ghcr.io/team/app").as_deref(), Some("ghcr.io/team=b"));
        assert_eq!(user("ghcr.io/teamx/app").as_deref(), Some("ghcr.io=c"));
        assert_eq!(user("alpine").as_deref(), Some("docker.io=d"));
        assert_eq!(user("team/app").as_deref(), Some("docker.io=d"));
        assert_eq!(user("localhost:5001/x"), None);
        assert_eq!(user("localhost/x"), None);
    }

    #[test]
    fn auth_json_is_read_without_quoting_secrets() {
        let text = r#"{"auths": {
            "localhost:5000": {"auth": "dTpwKz8v"},
            "quay.io": {},
            "docker.io": {"auth": "dXNlcjpwYTpzcw=="}
        }, "credHelpers": {"gcr.io": "gcloud"}}"#;
        let auth = RegistryAuth::from_auth_json(text).unwrap();
        let keys: Vec<_> = auth.logins().map(|(k, ..)| k).collect();
        assert_eq!(keys, ["docker.io", "localhost:5000"]);
        let login = |r: &str| {
            auth.login_for(&ImageReference::parse(r).unwrap())
                .map(|(_, l)| l.clone())
        };
        assert_eq!(
            login("localhost:5000/x"),
            Some(RegistryLogin::new("u", "p+?/"))
        );
        // Only the first colon separates the user from the password.
        assert_eq!(login("alpine"), Some(RegistryLogin::new("user", "pa:ss")));
        assert!(!format!("{auth:?}").contains("p+?/"));

        let bad = RegistryAuth::from_auth_json(r#"{"auths": {"h": {"auth": "not base64!"}}}"#)
            .unwrap_err();
        assert_eq!(
            bad.to_string(),
            "the \"auth\" of \"h\" is not base64 of \"user:password\""
        );
        let wrong_type = RegistryAuth::from_auth_json(r#"{"auths": {"h": {"auth": ["s3cret"]}}}"#)
            .unwrap_err()
            .to_string();
        assert!(wrong_type.starts_with("not a containers-auth.json file"));
        assert!(!wrong_type.contains("s3cret"), "{wrong_type}");
        assert!(RegistryAuth::from_auth_json("{").is_err());
    }
}
