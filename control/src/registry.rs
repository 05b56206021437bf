//! Resolving image tags to the digests their registries serve, over the
//! registries' HTTP API (the OCI distribution spec), for `podfleet apply`'s
//! pinning.
//!
//! [`Resolver::resolve`] asks `HEAD /v2/<repository>/manifests/<tag>` for
//! the manifest a tag names, taking image indexes and Docker manifest
//! lists as they are (a multi-architecture image is pinned to its index, and
//! each device's podman picks its own architecture from it), and reads the
//! digest from `Docker-Content-Digest`; a registry that does not send the
//! header is asked again with `GET`, and the digest is the SHA-256 of the
//! manifest's bytes. A `401` is answered as the distribution spec has it:
//! `Basic` with the registry's login, `Bearer` with a token from the
//! challenge's realm (asked with the login when there is one, anonymously
//! otherwise).
//!
//! Registries are spoken to over HTTPS, verified against the system's
//! trusted roots; over plain HTTP only when their host is named with
//! [`Resolver::insecure_registry`]. Which login an image is resolved with
//! and what a name means are `podfleet_core::image`'s decisions, shared
//! with the agent.
//!
//! Passwords and tokens leave this module only inside the one request that
//! carries them: no error or log line built here quotes a credential, a
//! token, or the body of an answer that may hold one.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use podfleet_core::image::{
    is_sha256_digest, ImageReference, InvalidAuthFile, InvalidReference, RegistryAuth,
    RegistryLogin, DEFAULT_REGISTRY,
};
use sha2::{Digest, Sha256};

/// The manifest types a tag may name, most wanted first: a
/// multi-architecture index (OCI, then Docker's list), then a single
/// image's manifest (Docker v2, then OCI), as podman asks for them.
pub const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
];

/// How long each request to a registry may take when no other is set.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest manifest read when a registry sends no digest header (the
/// limit containers/image sets).
const MANIFEST_MAX_BYTES: usize = 4 * 1024 * 1024;
/// The largest token answer read.
const TOKEN_MAX_BYTES: usize = 1024 * 1024;
/// The host Docker Hub's API answers on, for images of `docker.io`.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// Why a tag could not be resolved to a digest. Every variant names the
/// image as written; none quotes a password, a token or an answer's body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// The text is not an image reference.
    #[error(transparent)]
    InvalidReference(#[from] InvalidReference),
    /// The registry has no manifest for the tag (404).
    #[error("image {image:?}: not found: the registry {registry} has no manifest {tag:?} in {repository:?}")]
    NotFound {
        /// The image, as written.
        image: String,
        /// The registry, as the image names it (`docker.io`, `host:5000`).
        registry: String,
        /// The repository below the registry.
        repository: String,
        /// The tag asked for.
        tag: String,
    },
    /// The registry refused the login, or anonymous access (401, 403).
    #[error("image {image:?}: unauthorized: the registry {registry} refused {}: {reason}", who(.user.as_deref()))]
    Unauthorized {
        /// The image, as written.
        image: String,
        /// The registry.
        registry: String,
        /// The user name of the login it was asked with; `None` when it was
        /// asked anonymously (no login matched the image).
        user: Option<String>,
        /// What the registry or the token service answered.
        reason: String,
    },
    /// The registry (or its token service) could not be reached: refused
    /// connection, unknown host, a TLS failure, a connection cut short.
    #[error("image {image:?}: cannot reach the registry {registry} over {scheme}: {reason}")]
    Network {
        /// The image, as written.
        image: String,
        /// The registry.
        registry: String,
        /// `HTTPS`, or `HTTP` for an insecure registry.
        scheme: &'static str,
        /// The cause, from the connection's errors.
        reason: String,
    },
    /// A request got no complete answer in time.
    #[error("image {image:?}: the registry {registry} did not answer within {waited:?}")]
    TimedOut {
        /// The image, as written.
        image: String,
        /// The registry.
        registry: String,
        /// How long the request was given.
        waited: Duration,
    },
    /// The registry answered something the distribution spec does not
    /// allow for, or an error status other than the above.
    #[error("image {image:?}: the registry {registry} answered HTTP {status}: {reason}")]
    BadResponse {
        /// The image, as written.
        image: String,
        /// The registry.
        registry: String,
        /// The answer's HTTP status.
        status: u16,
        /// What is wrong with it.
        reason: String,
    },
}

fn who(user: Option<&str>) -> String {
    match user {
        Some(user) => format!("the login of user {user:?}"),
        None => "anonymous access (no login for it was found)".to_owned(),
    }
}

/// Resolves image tags to digests. Cheap to share: one connection pool
/// for every registry it asks.
///
/// ```no_run
/// # async fn f() -> Result<(), podfleet_control::registry::ResolveError> {
/// use podfleet_control::registry::Resolver;
/// use podfleet_core::image::RegistryAuth;
///
/// let resolver = Resolver::new(RegistryAuth::new()).insecure_registry("127.0.0.1:5000");
/// let digest = resolver.resolve("127.0.0.1:5000/team/app:1").await?;
/// assert!(digest.starts_with("sha256:"));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Resolver {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    auth: RegistryAuth,
    insecure: BTreeSet<String>,
    request_timeout: Duration,
    /// Why HTTPS cannot work on this machine, if it cannot: no trusted
    /// roots were found.
    roots_missing: Option<String>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("auth", &self.auth)
            .field("insecure", &self.insecure)
            .field("request_timeout", &self.request_timeout)
            .field("roots_missing", &self.roots_missing)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// A resolver asking with `auth`'s logins, over HTTPS with the
    /// system's trusted roots (rustls-native-certs: `SSL_CERT_FILE`,
    /// `SSL_CERT_DIR`, else the distribution's bundle), each request
    /// limited to [`DEFAULT_REQUEST_TIMEOUT`].
    #[must_use]
    pub fn new(auth: RegistryAuth) -> Self {
        let loaded = rustls_native_certs::load_native_certs();
        let mut roots = rustls::RootCertStore::empty();
        let (added, _unparsable) = roots.add_parsable_certificates(loaded.certs);
        let roots_missing = (added == 0).then(|| {
            let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
            if errors.is_empty() {
                "no trusted CA certificates were found on this machine".to_owned()
            } else {
                format!(
                    "no trusted CA certificates could be loaded: {}",
                    errors.join("; ")
                )
            }
        });
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring's provider supports rustls's default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        // Connecting counts against each request's timeout (`send`).
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            auth,
            insecure: BTreeSet::new(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            roots_missing,
        }
    }

    /// Speaks plain HTTP to the registry `host` (`host` or `host:port`,
    /// exactly as image references name it).
    #[must_use]
    pub fn insecure_registry(mut self, host: impl Into<String>) -> Self {
        self.insecure.insert(host.into());
        self
    }

    /// Gives every request (connecting, sending, reading the answer) at
    /// most `timeout`.
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The digest (`sha256:...`) the registry serves now for `image`'s tag
    /// (`latest` when it names none). An image that already pins a digest
    /// is not asked for: its digest is returned.
    ///
    /// # Errors
    ///
    /// A [`ResolveError`] naming the image and what went wrong.
    pub async fn resolve(&self, image: &str) -> Result<String, ResolveError> {
        let reference = ImageReference::parse(image)?;
        if let Some(digest) = reference.digest() {
            return Ok(digest.to_owned());
        }
        let scheme = if self.insecure.contains(reference.host()) {
            Scheme::Http
        } else {
            Scheme::Https
        };
        let lookup = Lookup {
            resolver: self,
            image,
            reference: &reference,
            scheme,
        };
        lookup.digest().await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Https,
    Http,
}

impl Scheme {
    fn name(self) -> &'static str {
        match self {
            Scheme::Https => "HTTPS",
            Scheme::Http => "HTTP",
        }
    }
}

/// A challenge of a `401`'s `WWW-Authenticate`, as far as the
/// distribution spec uses them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// One answer: its status and headers, and its body when it was read.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// Why a request got no answer, before the request timeout ran out.
enum Transport {
    Network(String),
    TooLarge,
}

/// A token service's answer: the distribution spec's `token`, or OAuth 2's
/// `access_token`.
#[derive(serde::Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

/// One image's resolution.
struct Lookup<'a> {
    resolver: &'a Resolver,
    image: &'a str,
    reference: &'a ImageReference,
    scheme: Scheme,
}

impl Lookup<'_> {
    async fn digest(&self) -> Result<String, ResolveError> {
        let mut answer = self.manifest(Method::HEAD, None).await?;
        let mut authorization = None;
        if answer.status == StatusCode::UNAUTHORIZED {
            let granted = self.authorize(&answer.headers).await?;
            answer = self.manifest(Method::HEAD, Some(&granted)).await?;
            authorization = Some(granted);
        }
        match answer.status {
            StatusCode::OK => {
                if let Some(digest) = header_digest(&answer.headers) {
                    return Ok(digest);
                }
            }
            // A registry that does not do HEAD is asked with GET.
            StatusCode::METHOD_NOT_ALLOWED => {}
            status => return Err(self.refused(status)),
        }
        // No usable Docker-Content-Digest: the digest is the manifest's own hash.
        let answer = self.manifest(Method::GET, authorization.as_ref()).await?;
        match answer.status {
            StatusCode::OK if !answer.body.is_empty() => {
                Ok(format!("sha256:{:x}", Sha256::digest(&answer.body)))
            }
            StatusCode::OK => Err(self.bad(
                answer.status,
                "the manifest's body is empty and no Docker-Content-Digest was sent".to_owned(),
            )),
            status => Err(self.refused(status)),
        }
    }

    /// The error for a manifest request answered `status` (not 200).
    fn refused(&self, status: StatusCode) -> ResolveError {
        match status {
            StatusCode::NOT_FOUND => self.not_found(),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => self.unauthorized(format!(
                "the manifest request was answered HTTP {}",
                status.as_u16()
            )),
            status => self.bad(status, status_reason(status)),
        }
    }

    /// `HEAD` or `GET` of the tag's manifest, with `authorization`.
    async fn manifest(
        &self,
        method: Method,
        authorization: Option<&HeaderValue>,
    ) -> Result<Answer, ResolveError> {
        let uri = format!(
            "{}://{}/v2/{}/manifests/{}",
            match self.scheme {
                Scheme::Https => "https",
                Scheme::Http => "http",
            },
            api_host(self.reference.host()),
            self.reference.path(),
            self.tag(),
        );
        let uri: Uri = uri.parse().map_err(|_| InvalidReference {
            reference: self.image.to_owned(),
            reason: "its repository or tag cannot be written into a URL",
        })?;
        let mut headers = HeaderMap::new();
        for media_type in MANIFEST_TYPES {
            headers.append(ACCEPT, HeaderValue::from_static(media_type));
        }
        if let Some(authorization) = authorization {
            headers.insert(AUTHORIZATION, authorization.clone());
        }
        let read_body = method == Method::GET;
        self.send(method, uri, headers, read_body, MANIFEST_MAX_BYTES)
            .await
    }

    /// The `Authorization` to ask again with, from a `401`'s challenges.
    async fn authorize(&self, headers: &HeaderMap) -> Result<HeaderValue, ResolveError> {
        let challenges = challenges(
            headers
                .get_all(WWW_AUTHENTICATE)
                .iter()
                .filter_map(|value| value.to_str().ok()),
        );
        let login = self.login();
        let bearer = challenges.iter().find_map(|c| match c {
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => Some((realm, service, scope)),
            Challenge::Basic => None,
        });
        if let Some((realm, service, scope)) = bearer {
            let token = self
                .token(realm, service.as_deref(), scope.as_deref(), login)
                .await?;
            return secret(&format!("Bearer {token}")).ok_or_else(|| {
                self.bad(
                    StatusCode::OK,
                    "the token service's token is not a valid header value".to_owned(),
                )
            });
        }
        if challenges.contains(&Challenge::Basic) {
            return match login {
                Some(login) => Ok(basic(login)),
                None => {
                    Err(self
                        .unauthorized("it asks for a user name and password (Basic)".to_owned()))
                }
            };
        }
        Err(self.unauthorized("it answered 401 without a Basic or Bearer challenge".to_owned()))
    }

    /// A token from the Bearer challenge's `realm`, asked with `login`
    /// when there is one.
    async fn token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
        login: Option<&RegistryLogin>,
    ) -> Result<String, ResolveError> {
        let default_scope = format!("repository:{}:pull", self.reference.path());
        let mut query = Vec::new();
        if let Some(service) = service {
            query.push(format!("service={}", percent_encode(service)));
        }
        query.push(format!(
            "scope={}",
            percent_encode(scope.unwrap_or(&default_scope))
        ));
        let separator = if realm.contains('?') { '&' } else { '?' };
        let url = format!("{realm}{separator}{}", query.join("&"));
        let realm_problem = |why: &str| {
            self.bad(
                StatusCode::UNAUTHORIZED,
                format!("its Bearer challenge's realm {realm:?} {why}"),
            )
        };
        let uri: Uri = url.parse().map_err(|_| realm_problem("is not a URL"))?;
        match uri.scheme_str() {
            Some("https") => {}
            // A login or token sent in the clear only where plain HTTP was asked for.
            Some("http") if self.scheme == Scheme::Http => {}
            Some("http") => {
                return Err(realm_problem(
                    "is plain HTTP, and the registry is not named with --insecure-registry",
                ))
            }
            _ => return Err(realm_problem("is not an http(s) URL")),
        }
        let mut headers = HeaderMap::new();
        if let Some(login) = login {
            headers.insert(AUTHORIZATION, basic(login));
        }
        let answer = self
            .send(Method::GET, uri, headers, true, TOKEN_MAX_BYTES)
            .await?;
        match answer.status {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(self.unauthorized(format!(
                    "its token service answered HTTP {}",
                    answer.status.as_u16()
                )))
            }
            status => {
                return Err(self.bad(
                    status,
                    format!("its token service failed: {}", status_reason(status)),
                ))
            }
        }
        serde_json::from_slice::<TokenAnswer>(&answer.body)
            .ok()
            .and_then(|t| t.token.filter(|t| !t.is_empty()).or(t.access_token))
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                self.bad(
                    answer.status,
                    "its token service's answer has no \"token\" nor \"access_token\"".to_owned(),
                )
            })
    }

    /// One request, its answer's body read (up to `limit` bytes) when
    /// `read_body`, all within the request timeout.
    async fn send(
        &self,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        read_body: bool,
        limit: usize,
    ) -> Result<Answer, ResolveError> {
        if uri.scheme_str() == Some("https") {
            if let Some(problem) = &self.resolver.roots_missing {
                return Err(self.network(Scheme::Https, problem.clone()));
            }
        }
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::Http,
            _ => Scheme::Https,
        };
        let mut request = Request::new(Empty::new());
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        let exchange = async {
            let response = self
                .resolver
                .client
                .request(request)
                .await
                .map_err(|e| Transport::Network(causes(&e)))?;
            let (parts, body) = response.into_parts();
            let body = if read_body {
                Limited::new(body, limit)
                    .collect()
                    .await
                    .map_err(|e| {
                        if e.is::<http_body_util::LengthLimitError>() {
                            Transport::TooLarge
                        } else {
                            Transport::Network(causes(&*e))
                        }
                    })?
                    .to_bytes()
            } else {
                Bytes::new()
            };
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(self.resolver.request_timeout, exchange).await {
            Ok(Ok(answer)) => Ok(answer),
            Err(_) => Err(ResolveError::TimedOut {
                image: self.image.to_owned(),
                registry: self.registry(),
                waited: self.resolver.request_timeout,
            }),
            Ok(Err(Transport::Network(reason))) => Err(self.network(scheme, reason)),
            Ok(Err(Transport::TooLarge)) => Err(self.bad(
                StatusCode::OK,
                format!("an answer is larger than {limit} bytes"),
            )),
        }
    }

    fn tag(&self) -> &str {
        self.reference.tag().unwrap_or("latest")
    }

    fn registry(&self) -> String {
        self.reference.host().to_owned()
    }

    fn login(&self) -> Option<&RegistryLogin> {
        self.resolver
            .auth
            .login_for(self.reference)
            .map(|(_, login)| login)
    }

    fn not_found(&self) -> ResolveError {
        ResolveError::NotFound {
            image: self.image.to_owned(),
            registry: self.registry(),
            repository: self.reference.path().to_owned(),
            tag: self.tag().to_owned(),
        }
    }

    fn unauthorized(&self, reason: String) -> ResolveError {
        ResolveError::Unauthorized {
            image: self.image.to_owned(),
            registry: self.registry(),
            user: self.login().map(|login| login.username().to_owned()),
            reason,
        }
    }

    fn network(&self, scheme: Scheme, reason: String) -> ResolveError {
        // rustls's words for a plain-HTTP server answering a TLS hello.
        let hint = if scheme == Scheme::Https
            && (reason.contains("InvalidContentType") || reason.contains("corrupt message"))
        {
            " (if it speaks plain HTTP, name it with --insecure-registry)"
        } else {
            ""
        };
        ResolveError::Network {
            image: self.image.to_owned(),
            registry: self.registry(),
            scheme: scheme.name(),
            reason: format!("{reason}{hint}"),
        }
    }

    fn bad(&self, status: StatusCode, reason: String) -> ResolveError {
        ResolveError::BadResponse {
            image: self.image.to_owned(),
            registry: self.registry(),
            status: status.as_u16(),
            reason,
        }
    }
}

/// The host a registry's API answers on: Docker Hub's is not `docker.io`.
fn api_host(registry: &str) -> &str {
    if registry == DEFAULT_REGISTRY {
        DOCKER_HUB_API
    } else {
        registry
    }
}

/// The `Docker-Content-Digest` header, when it is a SHA-256 digest.
fn header_digest(headers: &HeaderMap) -> Option<String> {
    let digest = headers.get("docker-content-digest")?.to_str().ok()?.trim();
    is_sha256_digest(digest).then(|| digest.to_owned())
}

fn status_reason(status: StatusCode) -> String {
    match status {
        StatusCode::TOO_MANY_REQUESTS => "too many requests: the registry's rate limit".to_owned(),
        status if status.is_redirection() => {
            "a redirect, which manifest requests do not follow".to_owned()
        }
        status => status
            .canonical_reason()
            .unwrap_or("an unexpected status")
            .to_lowercase(),
    }
}

/// `Basic base64(user:password)`, marked sensitive.
fn basic(login: &RegistryLogin) -> HeaderValue {
    let encoded = STANDARD.encode(format!("{}:{}", login.username(), login.password()));
    secret(&format!("Basic {encoded}"))
        .expect("base64 and a scheme name are always a valid header value")
}

/// A header value that carries a secret: never printed by hyper's `Debug`.
fn secret(text: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(text).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// An error and its causes, as one line: hyper's outer errors say only
/// "client error (Connect)"; the cause says what happened.
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(error) = next {
        let text = error.to_string();
        // hyper-util's "client error (Connect)" says less than its cause.
        let wrapper = text.starts_with("client error (") && error.source().is_some();
        if !wrapper && !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
        next = error.source();
    }
    parts.join(": ")
}

/// Query-string encoding: everything but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The challenges of `WWW-Authenticate` values (RFC 7235: a scheme, then
/// `name=value` or `name="quoted, value"` parameters, commas between
/// them and between challenges). Schemes other than Basic and Bearer, and
/// Bearer without a realm, are left out.
fn challenges<'a>(values: impl Iterator<Item = &'a str>) -> Vec<Challenge> {
    let mut found = Vec::new();
    for value in values {
        let mut rest = value;
        loop {
            rest = rest.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
            if rest.is_empty() {
                break;
            }
            let end = rest
                .find(|c: char| c == ',' || c.is_whitespace())
                .unwrap_or(rest.len());
            let (scheme, after) = rest.split_at(end);
            let (params, after) = auth_params(after);
            rest = after;
            if scheme.eq_ignore_ascii_case("basic") {
                found.push(Challenge::Basic);
            } else if scheme.eq_ignore_ascii_case("bearer") {
                let param = |name: &str| {
                    params
                        .iter()
                        .find(|(n, _)| n.eq_ignore_ascii_case(name))
                        .map(|(_, v)| v.clone())
                };
                if let Some(realm) = param("realm").filter(|r| !r.is_empty()) {
                    found.push(Challenge::Bearer {
                        realm,
                        service: param("service"),
                        scope: param("scope"),
                    });
                }
            }
        }
    }
    found
}

/// The `name=value` parameters at the start of `text`, and what follows
/// them (the next challenge, if any).
fn auth_params(mut text: &str) -> (Vec<(String, String)>, &str) {
    let mut params = Vec::new();
    loop {
        let trimmed = text.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        let name_end = trimmed
            .find(|c: char| c == '=' || c == ',' || c.is_whitespace())
            .unwrap_or(trimmed.len());
        let (name, after_name) = trimmed.split_at(name_end);
        let Some(value_text) = after_name.trim_start().strip_prefix('=') else {
            // Not a parameter: the next challenge's scheme, or the end.
            return (params, trimmed);
        };
        if name.is_empty() {
            return (params, trimmed);
        }
        let value_text = value_text.trim_start();
        let (value, after_value) = match value_text.strip_prefix('"') {
            Some(quoted) => {
                let mut value = String::new();
                let mut chars = quoted.char_indices();
                let mut end = quoted.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, escaped)) = chars.next() {
                                value.push(escaped);
                            }
                        }
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                (value, quoted.get(end..).unwrap_or_default())
            }
            None => {
                let end = value_text
                    .find(|c: char| c == ',' || c.is_whitespace())
                    .unwrap_or(value_text.len());
                let (value, rest) = value_text.split_at(end);
                (value.to_owned(), rest)
            }
        };
        params.push((name.to_owned(), value));
        text = after_value;
    }
}

/// Why the registry logins could not be read. Never quotes the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the registry auth file {} is unusable: {reason}", .path.display())]
pub struct AuthFileError {
    /// The file.
    pub path: PathBuf,
    /// Why: it cannot be read, or its contents ([`InvalidAuthFile`]).
    pub reason: String,
}

/// Where `apply` looks for registry logins when no file is named, most
/// preferred first, as podman looks: `$REGISTRY_AUTH_FILE`,
/// `$XDG_RUNTIME_DIR/containers/auth.json`,
/// `$HOME/.config/containers/auth.json`, `$HOME/.docker/config.json`.
/// `var` reads the environment.
pub fn default_auth_files(var: impl Fn(&str) -> Option<OsString>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let set = |name: &str| {
        var(name)
            .filter(|value| !value.is_empty())
            .map(PathBuf::from)
    };
    if let Some(file) = set("REGISTRY_AUTH_FILE") {
        files.push(file);
    }
    if let Some(dir) = set("XDG_RUNTIME_DIR") {
        files.push(dir.join("containers/auth.json"));
    }
    if let Some(home) = set("HOME") {
        files.push(home.join(".config/containers/auth.json"));
        files.push(home.join(".docker/config.json"));
    }
    files
}

/// The logins of `files`, merged: for a key in several, the earliest
/// file's login. Files that do not exist are skipped.
///
/// # Errors
///
/// [`AuthFileError`] for a file that exists but cannot be read or is not
/// a containers-auth.json (or Docker config.json) file.
pub fn read_auth_files(files: &[PathBuf]) -> Result<(RegistryAuth, Vec<PathBuf>), AuthFileError> {
    let mut merged = RegistryAuth::new();
    let mut read = Vec::new();
    for path in files {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(AuthFileError {
                    path: path.clone(),
                    reason: e.to_string(),
                })
            }
        };
        let auth = parse_auth_file(path, &text)?;
        let known: BTreeSet<String> = merged.logins().map(|(key, ..)| key.to_owned()).collect();
        for (key, login, source) in auth.logins() {
            if !known.contains(key) {
                merged.insert(key, login.clone(), source);
            }
        }
        read.push(path.clone());
    }
    Ok((merged, read))
}

/// The logins of the one file `path`, which must exist.
///
/// # Errors
///
/// [`AuthFileError`] when it cannot be read or is not a
/// containers-auth.json file.
pub fn read_auth_file(path: &Path) -> Result<RegistryAuth, AuthFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| AuthFileError {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    parse_auth_file(path, &text)
}

fn parse_auth_file(path: &Path, text: &str) -> Result<RegistryAuth, AuthFileError> {
    RegistryAuth::from_auth_json(text).map_err(|e: InvalidAuthFile| AuthFileError {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests;
