//! The Kubernetes API server the operator's cluster tests run against,
//! proven the way the operator will use it, with kubectl: a namespaced
//! custom resource with a structural schema and a status subresource, its
//! status written with server-side apply by the operator's ServiceAccount,
//! a finalizer that holds a deleted object until the operator removes it,
//! and RBAC that refuses the ServiceAccount until a RoleBinding lets it in.
//!
//! It needs the kube-apiserver `cargo xtask k8s-apiserver` builds, so it
//! only runs when asked:
//! `PODFLEET_KUBE_APISERVER=$(cargo xtask k8s-apiserver) cargo test -p e2e --test k8s_apiserver -- --ignored`.
//! Asked without the variable, it fails saying how to build it.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use e2e::k8s::{apiserver_from_env, Cluster, ServiceAccountUser};
use serde_json::Value;

const NAMESPACE: &str = "podfleet-system";
const CRD_NAME: &str = "widgets.e2e.podfleet.dev";
const FINALIZER: &str = "e2e.podfleet.dev/cleanup";
/// How long RBAC changes may take to reach the authorizer's cache.
const RBAC_DEADLINE: Duration = Duration::from_secs(15);

const CRD: &str = "
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.e2e.podfleet.dev
spec:
  group: e2e.podfleet.dev
  scope: Namespaced
  names:
    kind: Widget
    listKind: WidgetList
    plural: widgets
    singular: widget
  versions:
    - name: v1alpha1
      served: true
      storage: true
      subresources:
        status: {}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [replicas]
              properties:
                replicas:
                  type: integer
                  minimum: 0
            status:
              type: object
              properties:
                phase:
                  type: string
                observedGeneration:
                  type: integer
                  format: int64
";

const WIDGET: &str = "
apiVersion: e2e.podfleet.dev/v1alpha1
kind: Widget
metadata:
  name: w1
  namespace: podfleet-system
  finalizers: [e2e.podfleet.dev/cleanup]
spec:
  replicas: 2
";

const BAD_WIDGET: &str = "
apiVersion: e2e.podfleet.dev/v1alpha1
kind: Widget
metadata:
  name: bad
  namespace: podfleet-system
spec:
  replicas: -1
";

const OPERATOR_RBAC: &str = "
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: podfleet-operator
  namespace: podfleet-system
rules:
  - apiGroups: [e2e.podfleet.dev]
    resources: [widgets]
    verbs: [get, list, watch, patch, update]
  - apiGroups: [e2e.podfleet.dev]
    resources: [widgets/status]
    verbs: [get, patch, update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: podfleet-operator
  namespace: podfleet-system
subjects:
  - kind: ServiceAccount
    name: podfleet-operator
    namespace: podfleet-system
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: podfleet-operator
";

/// What the operator applies to the status subresource (server-side apply).
const STATUS_APPLY: &str = r#"{
  "apiVersion": "e2e.podfleet.dev/v1alpha1",
  "kind": "Widget",
  "metadata": {"name": "w1", "namespace": "podfleet-system"},
  "status": {"phase": "Ready", "observedGeneration": 1}
}"#;

#[test]
#[ignore = "needs a kube-apiserver: PODFLEET_KUBE_APISERVER=$(cargo xtask k8s-apiserver) cargo test -p e2e --test k8s_apiserver -- --ignored"]
fn an_operator_works_against_the_apiserver() {
    let apiserver = apiserver_from_env().unwrap_or_else(|e| panic!("{e}"));
    let operator = ServiceAccountUser::new(NAMESPACE, "podfleet-operator");
    let cluster = Cluster::start(&apiserver, std::slice::from_ref(&operator))
        .unwrap_or_else(|e| panic!("the cluster did not start: {e}"));
    eprintln!(
        "cluster ready in {:.1} s at {} ({})",
        cluster.started_in().as_secs_f64(),
        cluster.server(),
        apiserver.display()
    );
    let admin = || cluster.kubectl();
    let as_operator = || cluster.kubectl_as(&operator);

    // The CRD, the namespace and an object with a finalizer.
    ok(&cluster, admin().args(["apply", "-f", "-"]), Some(CRD));
    ok(
        &cluster,
        admin().args([
            "wait",
            "--for=condition=Established",
            &format!("crd/{CRD_NAME}"),
            "--timeout=60s",
        ]),
        None,
    );
    ok(
        &cluster,
        admin().args(["create", "namespace", NAMESPACE]),
        None,
    );
    ok(&cluster, admin().args(["create", "-f", "-"]), Some(WIDGET));
    // The structural schema is enforced by the server (no client-side
    // validation here).
    let refused = fails(
        &cluster,
        admin().args(["create", "--validate=false", "-f", "-"]),
        Some(BAD_WIDGET),
    );
    assert!(refused.contains("spec.replicas"), "{refused}");

    // The operator's ServiceAccount is refused until it is bound.
    let can_i = [
        "auth",
        "can-i",
        "patch",
        "widgets.e2e.podfleet.dev/status",
        "-n",
        NAMESPACE,
    ];
    let answer = output(as_operator().args(can_i), None);
    assert_eq!(stdout(&answer).trim(), "no", "{}", shown(&answer));
    let forbidden = fails(
        &cluster,
        as_operator().args(["get", "widgets", "-n", NAMESPACE]),
        None,
    );
    assert!(forbidden.contains("Forbidden"), "{forbidden}");
    assert!(forbidden.contains(&operator.user_name()), "{forbidden}");

    ok(
        &cluster,
        admin().args(["apply", "-f", "-"]),
        Some(OPERATOR_RBAC),
    );
    eventually(&cluster, "the RoleBinding to let the operator in", || {
        stdout(&output(as_operator().args(can_i), None)).trim() == "yes"
    });
    let listed = ok(
        &cluster,
        as_operator().args(["get", "widgets", "-n", NAMESPACE, "-o", "name"]),
        None,
    );
    assert_eq!(listed.trim(), "widget.e2e.podfleet.dev/w1");
    let delete = output(
        as_operator().args([
            "auth",
            "can-i",
            "delete",
            "widgets.e2e.podfleet.dev",
            "-n",
            NAMESPACE,
        ]),
        None,
    );
    assert_eq!(stdout(&delete).trim(), "no", "the Role grants no delete");

    // The operator writes the status with server-side apply; the spec and
    // the generation stay as they were.
    ok(
        &cluster,
        as_operator().args([
            "apply",
            "--server-side",
            "--subresource=status",
            "--field-manager=podfleet-operator",
            "-f",
            "-",
        ]),
        Some(STATUS_APPLY),
    );
    let widget = get_widget(&cluster);
    assert_eq!(widget["status"]["phase"], "Ready", "{widget:#}");
    assert_eq!(widget["spec"]["replicas"], 2, "{widget:#}");
    assert_eq!(widget["metadata"]["generation"], 1, "{widget:#}");
    let managers = widget["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        managers
            .iter()
            .any(|m| m["manager"] == "podfleet-operator" && m["operation"] == "Apply"),
        "no server-side apply entry of podfleet-operator: {widget:#}"
    );

    // Writes to the main resource change the spec and the generation,
    // never the status; the status subresource takes merge patches too.
    ok(
        &cluster,
        admin().args([
            "patch",
            "widget",
            "w1",
            "-n",
            NAMESPACE,
            "--type=merge",
            "-p",
            r#"{"spec":{"replicas":3},"status":{"phase":"Bogus"}}"#,
        ]),
        None,
    );
    let widget = get_widget(&cluster);
    assert_eq!(widget["spec"]["replicas"], 3, "{widget:#}");
    assert_eq!(widget["metadata"]["generation"], 2, "{widget:#}");
    assert_eq!(widget["status"]["phase"], "Ready", "{widget:#}");
    ok(
        &cluster,
        as_operator().args([
            "patch",
            "widget",
            "w1",
            "-n",
            NAMESPACE,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"observedGeneration":2}}"#,
        ]),
        None,
    );
    assert_eq!(get_widget(&cluster)["status"]["observedGeneration"], 2);

    // Deleting it only marks it while the finalizer is there; the
    // operator's removal of the finalizer (a JSON patch that tests before
    // it removes, as kube-runtime's finalizer helper does) lets it go.
    ok(
        &cluster,
        admin().args(["delete", "widget", "w1", "-n", NAMESPACE, "--wait=false"]),
        None,
    );
    let widget = get_widget(&cluster);
    assert!(
        widget["metadata"]["deletionTimestamp"].is_string(),
        "{widget:#}"
    );
    assert_eq!(widget["metadata"]["finalizers"][0], FINALIZER, "{widget:#}");
    ok(
        &cluster,
        as_operator().args([
            "patch",
            "widget",
            "w1",
            "-n",
            NAMESPACE,
            "--type=json",
            "-p",
            &format!(
                r#"[{{"op":"test","path":"/metadata/finalizers/0","value":"{FINALIZER}"}},{{"op":"remove","path":"/metadata/finalizers/0"}}]"#
            ),
        ]),
        None,
    );
    eventually(&cluster, "the widget to be deleted", || {
        let answer = output(
            admin().args([
                "get",
                "widget",
                "w1",
                "-n",
                NAMESPACE,
                "--ignore-not-found",
                "-o",
                "name",
            ]),
            None,
        );
        answer.status.success() && stdout(&answer).trim().is_empty()
    });
}

/// The widget `w1` as the administrator reads it.
fn get_widget(cluster: &Cluster) -> Value {
    let json = ok(
        cluster,
        cluster.kubectl().args([
            "get",
            "widget",
            "w1",
            "-n",
            NAMESPACE,
            "-o",
            "json",
            "--show-managed-fields",
        ]),
        None,
    );
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("kubectl printed no JSON ({e}): {json}"))
}

/// Runs `command`, feeding it `stdin`.
fn output(command: &mut Command, stdin: Option<&str>) -> Output {
    let mut child = command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("cannot write to {command:?}: {e}"));
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// `command`'s stdout; panics with its output and the cluster's logs
/// unless it succeeds.
fn ok(cluster: &Cluster, command: &mut Command, stdin: Option<&str>) -> String {
    let answer = output(command, stdin);
    assert!(
        answer.status.success(),
        "{command:?} failed: {}\n{}",
        shown(&answer),
        cluster.log_tails()
    );
    stdout(&answer)
}

/// `command`'s stderr; panics unless it fails.
fn fails(cluster: &Cluster, command: &mut Command, stdin: Option<&str>) -> String {
    let answer = output(command, stdin);
    assert!(
        !answer.status.success(),
        "{command:?} succeeded but should have failed: {}\n{}",
        shown(&answer),
        cluster.log_tails()
    );
    String::from_utf8_lossy(&answer.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn shown(output: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Polls `done` until it holds, for at most [`RBAC_DEADLINE`].
fn eventually(cluster: &Cluster, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < RBAC_DEADLINE,
            "waited {RBAC_DEADLINE:?} for {what}\n{}",
            cluster.log_tails()
        );
        thread::sleep(Duration::from_millis(200));
    }
}
