//! The checked-in manifests: the CRDs are the ones the Rust types make,
//! and the kustomization renders.

use std::path::Path;

fn deploy() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/operator"))
}

#[test]
fn checked_in_crds_are_current() {
    let path = deploy().join("crds.yaml");
    let current = podfleet_operator::crd::crds_yaml();
    if std::env::var_os("PODFLEET_BLESS").is_some() {
        std::fs::write(&path, &current).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == current,
        "deploy/operator/crds.yaml is stale: run `PODFLEET_BLESS=1 cargo test -p podfleet-operator --test manifests` and commit it"
    );
}

/// `kubectl kustomize deploy/operator` renders, and what it renders hangs
/// together: one namespace, the CRDs as generated, the Deployment running
/// as the ServiceAccount the RBAC binds, mounting the Secret it ships.
/// The server-side dry run against a real API server is `cargo xtask e2e
/// --k8s`.
#[test]
fn the_kustomization_renders_and_hangs_together() {
    let output = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run kubectl ({e}): this test needs kubectl on PATH (Debian: kubernetes-client)")
        });
    assert!(
        output.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rendered = String::from_utf8(output.stdout).unwrap();
    let documents: Vec<serde_json::Value> = rendered
        .split("\n---\n")
        .map(|doc| serde_norway::from_str(doc).unwrap())
        .collect();
    let named = |kind: &str| -> Vec<&serde_json::Value> {
        documents.iter().filter(|d| d["kind"] == kind).collect()
    };
    for kind in [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Deployment",
        "Secret",
    ] {
        for object in named(kind) {
            assert_eq!(object["metadata"]["namespace"], "podfleet", "{kind}");
        }
    }
    let deployment = named("Deployment")[0];
    let pod = &deployment["spec"]["template"]["spec"];
    let account = named("ServiceAccount")[0]["metadata"]["name"].clone();
    assert_eq!(pod["serviceAccountName"], account);
    for binding in named("RoleBinding")
        .into_iter()
        .chain(named("ClusterRoleBinding"))
    {
        assert_eq!(binding["subjects"][0]["name"], account);
    }
    let secret = named("Secret")[0]["metadata"]["name"].clone();
    assert!(pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["secret"]["secretName"] == secret));
    // The Secret of registry logins the operator is told to read is the one
    // Secret the Role lets it get, and only get.
    let args: Vec<&str> = pod["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    let registry_secret = args
        .iter()
        .find_map(|a| a.strip_prefix("--registry-auth-secret="))
        .expect("deployment.yaml names --registry-auth-secret");
    let secret_rules: Vec<&serde_json::Value> = named("Role")
        .into_iter()
        .flat_map(|role| role["rules"].as_array().unwrap())
        .filter(|rule| {
            rule["resources"]
                .as_array()
                .unwrap()
                .contains(&"secrets".into())
        })
        .collect();
    assert_eq!(secret_rules.len(), 1, "{secret_rules:#?}");
    assert_eq!(
        secret_rules[0]["resourceNames"],
        serde_json::json!([registry_secret])
    );
    assert_eq!(secret_rules[0]["verbs"], serde_json::json!(["get"]));
    for role in named("ClusterRole") {
        let rules = role["rules"].as_array().unwrap();
        assert!(
            rules.iter().all(|r| !r["resources"]
                .as_array()
                .unwrap()
                .contains(&"secrets".into())),
            "a ClusterRole grants Secrets"
        );
    }
    // crds.yaml is the generated file (the test above); kustomize only
    // includes it.
    let mut crds: Vec<&str> = named("CustomResourceDefinition")
        .iter()
        .filter_map(|crd| crd["metadata"]["name"].as_str())
        .collect();
    crds.sort_unstable();
    assert_eq!(
        crds,
        ["devices.podfleet.io", "fleetdeployments.podfleet.io"]
    );
}
