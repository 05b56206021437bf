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
