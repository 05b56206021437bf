//! A mocked Kubernetes API server, in process, for the operator's tests.
//!
//! [`FakeApi::client`] is a [`kube::Client`] whose requests are served from
//! memory, the way kube's own tests and controller-rs mock the API server,
//! but stateful: objects are created, replaced, patched (JSON patch, merge
//! patch and server-side apply, the latter as a merge), deleted with
//! finalizers and deletion timestamps (an apply of a status replaces it,
//! as server-side apply does for its one field manager), listed and watched (a watch streams
//! every later change), with resource versions, generations and
//! conflicts. Every request is logged ([`FakeApi::requests`]) so tests can
//! assert the exact writes an operator made, and [`FakeApi::fail`] makes
//! the next requests matching a method and path fail.
//!
//! What it is not: no admission, no schema validation, no RBAC, no field
//! ownership (an apply merges), no label or field selectors.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// The body the fake answers with.
type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// One request as the fake saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Logged {
    /// The name of the client that sent it ([`FakeApi::client_as`]).
    pub client: String,
    /// `GET`, `POST`, `PUT`, `PATCH`, `DELETE`.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The `content-type` of a patch.
    pub content_type: Option<String>,
    /// The JSON body, if any.
    pub body: Option<Value>,
    /// The status answered.
    pub status: u16,
    /// When the request arrived.
    pub at: std::time::Instant,
}

/// Where an object lives: the collection's path (`/apis/g/v/namespaces/ns/plural`
/// or `/apis/g/v/plural`) and its name.
type Key = (String, String);

#[derive(Default)]
struct State {
    version: u64,
    uid: u64,
    objects: BTreeMap<Key, Value>,
    watches: Vec<(String, mpsc::UnboundedSender<Value>)>,
    log: Vec<Logged>,
    failures: Vec<(Method, String, u16)>,
}

/// The mocked API server; clones share the state.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

impl FakeApi {
    /// An empty API server.
    pub fn new() -> Self {
        Self::default()
    }

    /// A client served by this fake, with `default` as its namespace; its
    /// requests are logged as `"test"`'s.
    pub fn client(&self) -> kube::Client {
        self.client_as("test")
    }

    /// A client whose requests are logged as `name`'s.
    pub fn client_as(&self, name: &str) -> kube::Client {
        let fake = self.clone();
        let name = name.to_owned();
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            let fake = fake.clone();
            let name = name.clone();
            async move { Ok::<_, Infallible>(fake.serve(&name, request).await) }
        });
        kube::Client::new(service, "default")
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.lock().log.clone()
    }

    /// Forgets the requests logged so far.
    pub fn clear_requests(&self) {
        self.lock().log.clear();
    }

    /// The writes so far (every request but `GET`) of `client`, as
    /// `METHOD path`.
    pub fn writes_of(&self, client: &str) -> Vec<String> {
        self.lock()
            .log
            .iter()
            .filter(|l| l.method != "GET" && l.client == client)
            .map(|l| format!("{} {}", l.method, l.path))
            .collect()
    }

    /// Makes the next `times` requests with `method` whose path ends with
    /// `path_suffix` answer `status`.
    pub fn fail(&self, method: Method, path_suffix: &str, status: u16, times: usize) {
        let mut state = self.lock();
        for _ in 0..times {
            state
                .failures
                .push((method.clone(), path_suffix.to_owned(), status));
        }
    }

    /// The object at `collection`/`name`, if any.
    pub fn object(&self, collection: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(collection.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every object of `collection`, by name.
    pub fn objects(&self, collection: &str) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|((c, _), _)| c == collection)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn serve(&self, client: &str, request: Request<kube::client::Body>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body: Option<Value> = if bytes.is_empty() {
            None
        } else {
            serde_json::from_slice(&bytes).ok()
        };
        let at = std::time::Instant::now();
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or("").to_owned();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let watch = parts.method == Method::GET && query.split('&').any(|q| q == "watch=true");
        let mut state = self.lock();
        let injected = state
            .failures
            .iter()
            .position(|(m, p, _)| *m == parts.method && path.ends_with(p.as_str()));
        let (status, answer) = if let Some(i) = injected {
            let (_, _, status) = state.failures.remove(i);
            (status, status_body(status, "injected failure"))
        } else if watch {
            let (sender, receiver) = mpsc::unbounded_channel();
            state.watches.push((path.clone(), sender));
            state.log.push(Logged {
                client: client.to_owned(),
                method: "GET".into(),
                path: format!("{path}?watch"),
                content_type: None,
                body: None,
                status: 200,
                at,
            });
            let events = futures_util::stream::unfold(receiver, |mut r| async move {
                r.recv().await.map(|event| (event, r))
            })
            .map(|event: Value| {
                let mut line = serde_json::to_vec(&event).unwrap_or_default();
                line.push(b'\n');
                Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(line)))
            });
            return respond(200, BodyExt::boxed_unsync(StreamBody::new(events)));
        } else {
            state.handle(&parts.method, &path, content_type.as_deref(), body.clone())
        };
        state.log.push(Logged {
            client: client.to_owned(),
            method: parts.method.to_string(),
            path,
            content_type,
            body,
            status,
            at,
        });
        respond(status, full(&answer))
    }
}

impl State {
    fn handle(
        &mut self,
        method: &Method,
        path: &str,
        content_type: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let Some(route) = Route::parse(path) else {
            return (404, status_body(404, &format!("no route for {path}")));
        };
        let key = route.name.clone().map(|n| (route.collection.clone(), n));
        match (method, key) {
            (&Method::GET, None) => {
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|((c, _), _)| route.matches(c))
                    .map(|(_, v)| v.clone())
                    .collect();
                (
                    200,
                    json!({
                        "apiVersion": route.api_version,
                        "kind": "List",
                        "metadata": {"resourceVersion": self.version.to_string()},
                        "items": items,
                    }),
                )
            }
            (&Method::GET, Some(key)) => match self.objects.get(&key) {
                Some(object) => (200, object.clone()),
                None => (404, not_found(&key)),
            },
            (&Method::POST, None) => {
                let Some(mut object) = body else {
                    return (400, status_body(400, "no body"));
                };
                let name = match object["metadata"]["name"].as_str() {
                    Some(name) => name.to_owned(),
                    None => {
                        let prefix = object["metadata"]["generateName"]
                            .as_str()
                            .unwrap_or("object-");
                        let name = format!("{prefix}{}", self.uid + 1);
                        object["metadata"]["name"] = json!(name);
                        name
                    }
                };
                let key = (route.collection.clone(), name);
                if self.objects.contains_key(&key) {
                    return (
                        409,
                        status_with(409, "AlreadyExists", &format!("{} already exists", key.1)),
                    );
                }
                self.uid += 1;
                let metadata = &mut object["metadata"];
                metadata["uid"] = json!(format!("uid-{}", self.uid));
                metadata["generation"] = json!(1);
                metadata["creationTimestamp"] = json!("2026-11-30T00:00:00Z");
                if let Some(namespace) = &route.namespace {
                    metadata["namespace"] = json!(namespace);
                }
                self.store(key, object, "ADDED")
            }
            (&Method::PUT, Some(key)) => {
                let Some(object) = body else {
                    return (400, status_body(400, "no body"));
                };
                let Some(current) = self.objects.get(&key).cloned() else {
                    return (404, not_found(&key));
                };
                let expected = object["metadata"]["resourceVersion"].as_str();
                if expected
                    .is_some_and(|v| Some(v) != current["metadata"]["resourceVersion"].as_str())
                {
                    return (
                        409,
                        status_with(409, "Conflict", "the object has been modified"),
                    );
                }
                let mut next = object;
                for field in [
                    "uid",
                    "creationTimestamp",
                    "generation",
                    "namespace",
                    "deletionTimestamp",
                ] {
                    next["metadata"][field] = current["metadata"][field].clone();
                }
                if route.subresource.as_deref() == Some("status") {
                    let mut merged = current.clone();
                    merged["status"] = next["status"].clone();
                    next = merged;
                } else if current.get("status").is_some() {
                    next["status"] = current["status"].clone();
                }
                self.commit(key, current, next)
            }
            (&Method::PATCH, Some(key)) => {
                let Some(patch) = body else {
                    return (400, status_body(400, "no body"));
                };
                let apply = content_type.is_some_and(|c| c.contains("apply-patch"));
                let current = self.objects.get(&key).cloned();
                let Some(current) = current else {
                    return (404, not_found(&key));
                };
                let mut next = current.clone();
                // The API server reads an absent list as null, which the
                // finalizer helper's `test` relies on.
                if next["metadata"].get("finalizers").is_none() {
                    next["metadata"]["finalizers"] = Value::Null;
                }
                if content_type.is_some_and(|c| c.contains("json-patch")) {
                    let Ok(operations) = serde_json::from_value::<json_patch::Patch>(patch) else {
                        return (422, status_body(422, "not a JSON patch"));
                    };
                    if let Err(error) = json_patch::patch(&mut next, &operations) {
                        return (422, status_with(422, "Invalid", &error.to_string()));
                    }
                } else if apply && route.subresource.as_deref() == Some("status") {
                    // One field manager owns a status: what it no longer
                    // applies is removed, as server-side apply does.
                    next["status"] = patch.get("status").cloned().unwrap_or(Value::Null);
                } else {
                    let patch = if route.subresource.as_deref() == Some("status") {
                        json!({"status": patch.get("status").cloned().unwrap_or(Value::Null)})
                    } else {
                        patch
                    };
                    json_patch::merge(&mut next, &patch);
                }
                if next["metadata"]["finalizers"].is_null() {
                    if let Some(metadata) = next["metadata"].as_object_mut() {
                        metadata.remove("finalizers");
                    }
                }
                if route.subresource.as_deref() == Some("status") {
                    let status = next["status"].clone();
                    next = current.clone();
                    next["status"] = status;
                } else if current.get("status").is_some() {
                    next["status"] = current["status"].clone();
                }
                self.commit(key, current, next)
            }
            (&Method::DELETE, Some(key)) => {
                let Some(current) = self.objects.get(&key).cloned() else {
                    return (404, not_found(&key));
                };
                let finalizers = current["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty());
                if finalizers {
                    let mut next = current.clone();
                    if next["metadata"]["deletionTimestamp"].is_null() {
                        next["metadata"]["deletionTimestamp"] = json!("2026-11-30T00:00:01Z");
                    }
                    self.commit(key, current, next)
                } else {
                    self.objects.remove(&key);
                    self.broadcast(&key.0, "DELETED", &current);
                    (200, current)
                }
            }
            _ => (405, status_body(405, "method not allowed")),
        }
    }

    /// Stores `next` in place of `current`, bumping the generation when
    /// anything but metadata and status changed; removes an object being
    /// deleted once its finalizers are gone.
    fn commit(&mut self, key: Key, current: Value, mut next: Value) -> (u16, Value) {
        let spec = |v: &Value| {
            let mut v = v.clone();
            if let Some(map) = v.as_object_mut() {
                map.remove("metadata");
                map.remove("status");
            }
            v
        };
        let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
        next["metadata"]["generation"] = json!(if spec(&current) == spec(&next) {
            generation
        } else {
            generation + 1
        });
        let deleting = !next["metadata"]["deletionTimestamp"].is_null();
        let finalized = next["metadata"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty);
        if deleting && finalized {
            self.version += 1;
            next["metadata"]["resourceVersion"] = json!(self.version.to_string());
            self.objects.remove(&key);
            self.broadcast(&key.0, "DELETED", &next);
            return (200, next);
        }
        if next == current {
            return (200, current);
        }
        self.store(key, next, "MODIFIED")
    }

    fn store(&mut self, key: Key, mut object: Value, event: &str) -> (u16, Value) {
        self.version += 1;
        object["metadata"]["resourceVersion"] = json!(self.version.to_string());
        self.objects.insert(key.clone(), object.clone());
        self.broadcast(&key.0, event, &object);
        (if event == "ADDED" { 201 } else { 200 }, object)
    }

    fn broadcast(&mut self, collection: &str, event: &str, object: &Value) {
        let message = json!({"type": event, "object": object});
        self.watches.retain(|(watched, sender)| {
            if Route::parse(watched).is_some_and(|route| route.matches(collection)) {
                sender.send(message.clone()).is_ok()
            } else {
                !sender.is_closed()
            }
        });
    }
}

/// A parsed API path.
struct Route {
    /// `group/version` (or `v1`).
    api_version: String,
    /// The collection's path, namespace included.
    collection: String,
    /// The plural, to match cluster-wide lists against namespaced objects.
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

impl Route {
    fn parse(path: &str) -> Option<Self> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (api_version, rest) = match parts.as_slice() {
            ["api", version, rest @ ..] => ((*version).to_owned(), rest),
            ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
            _ => return None,
        };
        let prefix = if parts[0] == "api" {
            format!("/api/{api_version}")
        } else {
            format!("/apis/{api_version}")
        };
        let (namespace, rest) = match rest {
            ["namespaces", namespace, rest @ ..] if !rest.is_empty() => {
                (Some((*namespace).to_owned()), rest)
            }
            rest => (None, rest),
        };
        let (plural, name, subresource) = match rest {
            [plural] => (*plural, None, None),
            [plural, name] => (*plural, Some((*name).to_owned()), None),
            [plural, name, sub] => (*plural, Some((*name).to_owned()), Some((*sub).to_owned())),
            _ => return None,
        };
        let collection = match &namespace {
            Some(namespace) => format!("{prefix}/namespaces/{namespace}/{plural}"),
            None => format!("{prefix}/{plural}"),
        };
        Some(Self {
            api_version,
            collection,
            plural: plural.to_owned(),
            namespace,
            name,
            subresource,
        })
    }

    /// Whether objects of `collection` are in this (list or watch) route.
    fn matches(&self, collection: &str) -> bool {
        collection == self.collection
            || (self.namespace.is_none()
                && collection.ends_with(&format!("/{}", self.plural))
                && collection.starts_with(self.collection.trim_end_matches(&self.plural)))
    }
}

fn full(value: &Value) -> Body {
    let bytes = Bytes::from(serde_json::to_vec(value).unwrap_or_default());
    BodyExt::boxed_unsync(http_body_util::Full::new(bytes))
}

fn respond(status: u16, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn status_body(code: u16, message: &str) -> Value {
    let reason = match code {
        404 => "NotFound",
        409 => "Conflict",
        403 => "Forbidden",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        _ => "BadRequest",
    };
    status_with(code, reason, message)
}

fn status_with(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn not_found(key: &Key) -> Value {
    status_with(404, "NotFound", &format!("{} {:?} not found", key.0, key.1))
}
/// The operator in a tokio runtime of its own (two workers, as in
/// production) on a thread, with a client of a [`FakeApi`]; stopped (as by
/// SIGTERM) by [`stop`](Self::stop) or on drop.
pub struct RunningOperator {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl RunningOperator {
    /// Runs it with a client of `fake` logged as `identity`, on the NATS
    /// server at `nats`.
    pub fn start(
        fake: &FakeApi,
        identity: &str,
        nats: &str,
        options: podfleet_operator::Options,
    ) -> Self {
        let fake = fake.clone();
        let identity = identity.to_owned();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let connection = podfleet_control::context::Connection::new(vec![nats.to_owned()]);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a tokio runtime for the operator");
            // The client's buffer task lives in this runtime.
            let client = runtime.block_on(async { fake.client_as(&identity) });
            runtime.block_on(podfleet_operator::run(client, connection, options, async {
                let _ = stopped.await;
            }))
        });
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stops it and returns how it ended.
    ///
    /// # Errors
    ///
    /// The operator's own, if it ended with one.
    ///
    /// # Panics
    ///
    /// If the operator panicked.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.halt()
    }

    fn halt(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(thread) => thread.join().expect("the operator panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for RunningOperator {
    fn drop(&mut self) {
        if let Err(error) = self.halt() {
            eprintln!("the operator ended with: {error:#}");
        }
    }
}
