//! The resolver against a registry stand-in on loopback: a tokio listener
//! answering each request with a hand-written HTTP/1.1 answer, one
//! connection per request, recording what it was asked.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use podfleet_core::image::LoginSource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const USER: &str = "u";
const PASSWORD: &str = "pw-s3cret";

/// A request as the stand-in read it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    /// With the query.
    target: String,
    /// Names lowercased.
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// What the stand-in answers: a status, headers and a body (left out for
/// `HEAD`, its `Content-Length` kept), or nothing ever.
enum Reply {
    Answer(u16, Vec<(&'static str, String)>, String),
    Hang,
}

fn answer(status: u16, headers: &[(&'static str, &str)], body: &str) -> Reply {
    Reply::Answer(
        status,
        headers.iter().map(|(n, v)| (*n, (*v).to_owned())).collect(),
        body.to_owned(),
    )
}

struct Stand {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Stand {
    async fn start(reply: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let reply = Arc::new(reply);
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let reply = reply.clone();
                let log = log.clone();
                tokio::spawn(async move { serve(stream, &*reply, &log).await });
            }
        });
        Self { addr, seen }
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

async fn serve(
    mut stream: TcpStream,
    reply: &(dyn Fn(&Seen) -> Reply + Sync),
    log: &Mutex<Vec<Seen>>,
) {
    let mut head = Vec::new();
    let mut buffer = [0_u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let seen = Seen {
        method: first.next().unwrap_or_default().to_owned(),
        target: first.next().unwrap_or_default().to_owned(),
        headers: lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect(),
    };
    log.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(seen.clone());
    match reply(&seen) {
        Reply::Answer(status, headers, body) => {
            let mut out = format!("HTTP/1.1 {status} X\r\n");
            for (name, value) in headers {
                out.push_str(&format!("{name}: {value}\r\n"));
            }
            out.push_str(&format!(
                "Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            ));
            if seen.method != "HEAD" {
                out.push_str(&body);
            }
            let _ = stream.write_all(out.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    }
}

fn auth() -> RegistryAuth {
    let mut auth = RegistryAuth::new();
    auth.insert(
        "127.0.0.1",
        RegistryLogin::new(USER, PASSWORD),
        LoginSource::AuthFile,
    );
    auth
}

/// A resolver for `stand`, over plain HTTP.
fn resolver(stand: &Stand, auth: RegistryAuth) -> Resolver {
    // Logins are kept by host:port; the stand-in's port is known only now.
    let mut keyed = RegistryAuth::new();
    for (_, login, source) in auth.logins() {
        keyed.insert(&stand.host(), login.clone(), source);
    }
    Resolver::new(keyed).insecure_registry(stand.host())
}

fn basic_of(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

fn no_secret(error: &ResolveError) {
    for text in [error.to_string(), format!("{error:?}")] {
        assert!(!text.contains(PASSWORD), "{text}");
    }
}

#[tokio::test]
async fn the_digest_comes_from_the_header_of_a_head() {
    let stand = Stand::start(|_| answer(200, &[("Docker-Content-Digest", DIGEST)], "{}")).await;
    let digest = resolver(&stand, RegistryAuth::new())
        .resolve(&format!("{}/team/app:1", stand.host()))
        .await
        .unwrap();
    assert_eq!(digest, DIGEST);
    let seen = stand.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, "HEAD");
    assert_eq!(seen[0].target, "/v2/team/app/manifests/1");
    assert_eq!(seen[0].all("accept"), MANIFEST_TYPES);
    assert_eq!(seen[0].header("authorization"), None);
}

#[tokio::test]
async fn an_untagged_image_resolves_latest() {
    let stand = Stand::start(|_| answer(200, &[("Docker-Content-Digest", DIGEST)], "")).await;
    let digest = resolver(&stand, RegistryAuth::new())
        .resolve(&format!("{}/app", stand.host()))
        .await
        .unwrap();
    assert_eq!(digest, DIGEST);
    assert_eq!(stand.seen()[0].target, "/v2/app/manifests/latest");
}

#[tokio::test]
async fn without_the_header_the_digest_is_the_sha256_of_the_manifest() {
    const MANIFEST: &str =
        r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
    let stand = Stand::start(|_| {
        answer(
            200,
            &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
            MANIFEST,
        )
    })
    .await;
    let digest = resolver(&stand, RegistryAuth::new())
        .resolve(&format!("{}/team/app:1", stand.host()))
        .await
        .unwrap();
    // `printf '%s' "$MANIFEST" | sha256sum`
    assert_eq!(
        digest,
        "sha256:b22c7289dd3b4785a3795c90e15d16bd66bd29b444b8974fe29ed0443ce50405"
    );
    let methods: Vec<String> = stand.seen().into_iter().map(|s| s.method).collect();
    assert_eq!(methods, ["HEAD", "GET"]);
}

#[tokio::test]
async fn a_registry_without_head_is_asked_with_get() {
    let stand = Stand::start(|seen| match seen.method.as_str() {
        "HEAD" => answer(405, &[], ""),
        _ => answer(200, &[], "{}"),
    })
    .await;
    let digest = resolver(&stand, RegistryAuth::new())
        .resolve(&format!("{}/app:1", stand.host()))
        .await
        .unwrap();
    // `printf '{}' | sha256sum`
    assert_eq!(
        digest,
        "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    );
}

#[tokio::test]
async fn a_basic_challenge_is_answered_with_the_login() {
    let stand = Stand::start(|seen| {
        if seen.header("authorization") == Some(basic_of(USER, PASSWORD).as_str()) {
            answer(200, &[("Docker-Content-Digest", DIGEST)], "")
        } else {
            answer(401, &[("WWW-Authenticate", "Basic realm=\"registry\"")], "")
        }
    })
    .await;
    let digest = resolver(&stand, auth())
        .resolve(&format!("{}/team/app:1", stand.host()))
        .await
        .unwrap();
    assert_eq!(digest, DIGEST);
    let seen = stand.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].header("authorization"), None, "anonymous first");
    assert_eq!(seen[1].method, "HEAD");
}

#[tokio::test]
async fn a_wrong_password_is_unauthorized_and_never_printed() {
    let stand = Stand::start(|seen| {
        if seen.header("authorization") == Some(basic_of(USER, "right").as_str()) {
            answer(200, &[("Docker-Content-Digest", DIGEST)], "")
        } else {
            answer(401, &[("WWW-Authenticate", "Basic realm=\"registry\"")], "")
        }
    })
    .await;
    let image = format!("{}/team/app:1", stand.host());
    let error = resolver(&stand, auth()).resolve(&image).await.unwrap_err();
    let ResolveError::Unauthorized {
        image: named, user, ..
    } = &error
    else {
        panic!("not unauthorized: {error:?}");
    };
    assert_eq!((named, user.as_deref()), (&image, Some(USER)));
    assert_eq!(stand.seen().len(), 2, "asked once more, with the login");
    assert!(
        error
            .to_string()
            .contains("refused the login of user \"u\""),
        "{error}"
    );
    no_secret(&error);

    // Without a login there is nothing to answer Basic with.
    let error = resolver(&stand, RegistryAuth::new())
        .resolve(&image)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ResolveError::Unauthorized { user: None, .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_bearer_challenge_gets_a_token_for_its_scope_with_the_login() {
    let stand = Stand::start(|seen| {
        if seen.target.starts_with("/token?") {
            return if seen.header("authorization") == Some(basic_of(USER, PASSWORD).as_str()) {
                answer(200, &[("Content-Type", "application/json")], r#"{"token":"t0k3n","expires_in":300}"#)
            } else {
                answer(401, &[], "")
            };
        }
        if seen.header("authorization") == Some("Bearer t0k3n") {
            return answer(200, &[("Docker-Content-Digest", DIGEST)], "");
        }
        let host = seen.header("host").unwrap_or_default();
        answer(
            401,
            &[(
                "WWW-Authenticate",
                &format!(
                    "Bearer realm=\"http://{host}/token\",service=\"stand in\",scope=\"repository:team/app:pull,push\""
                ),
            )],
            "",
        )
    })
    .await;
    let digest = resolver(&stand, auth())
        .resolve(&format!("{}/team/app:1", stand.host()))
        .await
        .unwrap();
    assert_eq!(digest, DIGEST);
    let seen = stand.seen();
    let targets: Vec<&str> = seen.iter().map(|s| s.target.as_str()).collect();
    assert_eq!(
        targets,
        [
            "/v2/team/app/manifests/1",
            "/token?service=stand%20in&scope=repository%3Ateam%2Fapp%3Apull%2Cpush",
            "/v2/team/app/manifests/1",
        ]
    );
}

#[tokio::test]
async fn without_a_login_the_token_is_asked_for_anonymously() {
    let stand = Stand::start(|seen| {
        if seen.target.starts_with("/token") {
            return match seen.header("authorization") {
                None => answer(200, &[], r#"{"access_token":"anon"}"#),
                Some(_) => answer(400, &[], ""),
            };
        }
        if seen.header("authorization") == Some("Bearer anon") {
            return answer(200, &[("Docker-Content-Digest", DIGEST)], "");
        }
        let host = seen.header("host").unwrap_or_default();
        // No scope in the challenge: the resolver asks for pull.
        answer(
            401,
            &[(
                "WWW-Authenticate",
                &format!("Bearer realm=\"http://{host}/token\""),
            )],
            "",
        )
    })
    .await;
    let digest = resolver(&stand, RegistryAuth::new())
        .resolve(&format!("{}/team/app:1", stand.host()))
        .await
        .unwrap();
    assert_eq!(digest, DIGEST);
    let token = &stand.seen()[1];
    assert_eq!(token.target, "/token?scope=repository%3Ateam%2Fapp%3Apull");
    assert_eq!(token.header("authorization"), None);
}

#[tokio::test]
async fn a_refused_token_is_unauthorized() {
    let stand = Stand::start(|seen| {
        if seen.target.starts_with("/token") {
            return answer(401, &[], r#"{"details":"incorrect username or password"}"#);
        }
        let host = seen.header("host").unwrap_or_default();
        answer(
            401,
            &[(
                "WWW-Authenticate",
                &format!("Bearer realm=\"http://{host}/token\",service=\"r\""),
            )],
            "",
        )
    })
    .await;
    let error = resolver(&stand, auth())
        .resolve(&format!("{}/team/app:1", stand.host()))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ResolveError::Unauthorized { user: Some(u), reason, .. }
            if u == USER && reason.contains("token service answered HTTP 401")),
        "{error:?}"
    );
    no_secret(&error);
}

#[tokio::test]
async fn an_unknown_tag_is_not_found() {
    let stand = Stand::start(|_| {
        answer(
            404,
            &[("Content-Type", "application/json")],
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#,
        )
    })
    .await;
    let image = format!("{}/team/app:9", stand.host());
    let error = resolver(&stand, RegistryAuth::new())
        .resolve(&image)
        .await
        .unwrap_err();
    assert_eq!(
        error,
        ResolveError::NotFound {
            image: image.clone(),
            registry: stand.host(),
            repository: "team/app".into(),
            tag: "9".into(),
        }
    );
    assert_eq!(
        error.to_string(),
        format!(
            "image {image:?}: not found: the registry {} has no manifest \"9\" in \"team/app\"",
            stand.host()
        )
    );
}

#[tokio::test]
async fn other_statuses_are_bad_responses_with_their_status() {
    let stand = Stand::start(|_| answer(503, &[], "")).await;
    let error = resolver(&stand, RegistryAuth::new())
        .resolve(&format!("{}/app:1", stand.host()))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ResolveError::BadResponse { status: 503, .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_refused_connection_is_a_network_error() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let host = format!("127.0.0.1:{port}");
    let error = Resolver::new(RegistryAuth::new())
        .insecure_registry(&host)
        .resolve(&format!("{host}/app:1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ResolveError::Network { scheme: "HTTP", reason, .. }
            if reason.to_lowercase().contains("connection refused")),
        "{error:?}"
    );
    eprintln!("{error}");
}

#[tokio::test]
async fn a_registry_that_never_answers_times_out() {
    let stand = Stand::start(|_| Reply::Hang).await;
    let waited = Duration::from_millis(300);
    let error = resolver(&stand, RegistryAuth::new())
        .request_timeout(waited)
        .resolve(&format!("{}/app:1", stand.host()))
        .await
        .unwrap_err();
    assert_eq!(
        error,
        ResolveError::TimedOut {
            image: format!("{}/app:1", stand.host()),
            registry: stand.host(),
            waited,
        }
    );
    assert_eq!(
        stand.seen().len(),
        1,
        "the request was sent, the answer never came"
    );
}

/// A registry not named insecure is spoken to over TLS: the first bytes
/// the stand-in gets are a TLS handshake record, and its plain-HTTP answer
/// fails the handshake with a hint.
#[tokio::test]
async fn registries_are_spoken_to_over_tls_unless_named_insecure() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let first_byte = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut first = [0_u8; 1];
        stream.read_exact(&mut first).await.unwrap();
        let _ = stream
            .write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await;
        first[0]
    });
    let error = Resolver::new(RegistryAuth::new())
        .resolve(&format!("{host}/app:1"))
        .await
        .unwrap_err();
    assert_eq!(first_byte.await.unwrap(), 0x16, "a TLS handshake record");
    let ResolveError::Network { scheme, reason, .. } = &error else {
        panic!("not a network error: {error:?}");
    };
    assert_eq!(*scheme, "HTTPS");
    eprintln!("{error}");
    // Without trusted roots (a bare build host) the request stops before
    // connecting; with them, the handshake fails on the HTTP answer.
    assert!(
        reason.contains("--insecure-registry") || reason.contains("CA certificates"),
        "{error}"
    );
}

#[tokio::test]
async fn invalid_references_are_refused_before_any_request() {
    let error = Resolver::new(RegistryAuth::new())
        .resolve("Not An Image")
        .await
        .unwrap_err();
    assert!(
        matches!(error, ResolveError::InvalidReference(_)),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_pinned_image_is_not_asked_for() {
    let digest = Resolver::new(RegistryAuth::new())
        .resolve(&format!("127.0.0.1:1/app:1@{DIGEST}"))
        .await
        .unwrap();
    assert_eq!(digest, DIGEST);
}

#[test]
fn challenges_are_parsed_with_quoted_commas_and_several_schemes() {
    let parsed = challenges(
        [
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
            r#"Basic realm="x", Newauth realm="y", title="Login to \"apps\"""#,
            "Bearer service=no-realm",
        ]
        .into_iter(),
    );
    assert_eq!(
        parsed,
        [
            Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            },
            Challenge::Basic,
        ]
    );
    assert_eq!(
        challenges(["basic", "Bearer realm=https://t/x"].into_iter()),
        [
            Challenge::Basic,
            Challenge::Bearer {
                realm: "https://t/x".into(),
                service: None,
                scope: None
            }
        ]
    );
}

#[test]
fn docker_hub_is_asked_on_its_api_host() {
    assert_eq!(api_host("docker.io"), "registry-1.docker.io");
    assert_eq!(api_host("ghcr.io"), "ghcr.io");
    assert_eq!(api_host("localhost:5000"), "localhost:5000");
}

#[test]
fn auth_files_are_searched_as_podman_does_and_merged_earliest_first() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| OsString::from(v))
        }
    };
    assert_eq!(
        default_auth_files(env(&[
            ("REGISTRY_AUTH_FILE", "/etc/auth.json"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
            ("HOME", "/home/pi"),
        ])),
        [
            "/etc/auth.json",
            "/run/user/1000/containers/auth.json",
            "/home/pi/.config/containers/auth.json",
            "/home/pi/.docker/config.json",
        ]
        .map(PathBuf::from)
    );
    assert_eq!(
        default_auth_files(env(&[("REGISTRY_AUTH_FILE", ""), ("HOME", "/root")])),
        [
            "/root/.config/containers/auth.json",
            "/root/.docker/config.json"
        ]
        .map(PathBuf::from)
    );

    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.json");
    let second = dir.path().join("second.json");
    let missing = dir.path().join("missing.json");
    let entry = |user: &str| STANDARD.encode(format!("{user}:{PASSWORD}"));
    std::fs::write(
        &first,
        format!(
            r#"{{"auths": {{"a.example": {{"auth": "{}"}}}}}}"#,
            entry("first")
        ),
    )
    .unwrap();
    std::fs::write(
        &second,
        format!(
            r#"{{"auths": {{"a.example": {{"auth": "{}"}}, "https://index.docker.io/v1/": {{"auth": "{}"}}}}, "credsStore": "desktop"}}"#,
            entry("second"),
            entry("hub")
        ),
    )
    .unwrap();
    let (auth, read) = read_auth_files(&[missing.clone(), first.clone(), second.clone()]).unwrap();
    assert_eq!(read, [first.clone(), second]);
    let user = |image: &str| {
        auth.login_for(&ImageReference::parse(image).unwrap())
            .map(|(_, login)| login.username().to_owned())
    };
    assert_eq!(user("a.example/x:1").as_deref(), Some("first"));
    assert_eq!(user("alpine").as_deref(), Some("hub"));

    std::fs::write(
        &first,
        format!(r#"{{"auths": {{"a.example": {{"auth": ["{PASSWORD}"]}}}}}}"#),
    )
    .unwrap();
    let error = read_auth_files(std::slice::from_ref(&first)).unwrap_err();
    assert_eq!(error.path, first);
    assert!(!error.to_string().contains(PASSWORD), "{error}");
    assert!(read_auth_file(&missing).is_err(), "a named file must exist");
}
