//! From score entries to container specs, and the spec hash that lets a
//! restarted agent adopt a healthy container without recreating it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::runtime::{
    init_container_name, service_container_name, ContainerSpec, LABEL_DEPLOYMENT, LABEL_GRACE,
    LABEL_INIT, LABEL_MANAGED, LABEL_REVISION, LABEL_SERVICE, LABEL_SPEC_HASH, LABEL_STOP_SIGNAL,
};
use crate::wire::{InitContainer, PodmanService, PodmanV0Score, Revision, Signal};

/// The hash of everything that is baked into a service's container: the
/// service spec, the score's stop signal and its restart count (when not
/// 0, so that scores written before the field existed keep their hashes).
/// The grace period is not included: it is applied at stop time, so
/// changing it recreates nothing.
pub fn service_spec_hash(score: &PodmanV0Score, service: &PodmanService) -> String {
    #[derive(Serialize)]
    struct Hashed<'a> {
        service: &'a PodmanService,
        stop_signal: Signal,
        #[serde(skip_serializing_if = "is_zero")]
        restart: u64,
    }
    fn is_zero(n: &u64) -> bool {
        *n == 0
    }
    let canonical = serde_json::to_vec(&Hashed {
        service,
        stop_signal: score.lifecycle_or_default().stop_signal,
        restart: score.restart(),
    })
    .expect("a service always serialises: its maps have string keys");
    format!("{:016x}", fnv1a64(&canonical))
}

/// FNV-1a, 64 bit: stable across platforms and releases, which `std`'s
/// hasher does not promise. For spec hashes, collisions only cost a missed
/// recreate of a container whose spec changed to one with the same hash,
/// vanishingly rare for edited specs. The simulator folds its traces with it.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn base_labels(deployment: &str, name: &str, revision: Revision) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_DEPLOYMENT.to_owned(), deployment.to_owned()),
        (LABEL_SERVICE.to_owned(), name.to_owned()),
        (LABEL_REVISION.to_owned(), revision.to_string()),
    ])
}

/// The container spec of `service` of `score` at `revision`.
pub fn service_container_spec(
    deployment: &str,
    score: &PodmanV0Score,
    service: &PodmanService,
    revision: Revision,
) -> ContainerSpec {
    let lifecycle = score.lifecycle_or_default();
    let mut labels = base_labels(deployment, &service.name, revision);
    labels.insert(
        LABEL_SPEC_HASH.to_owned(),
        service_spec_hash(score, service),
    );
    labels.insert(
        LABEL_GRACE.to_owned(),
        lifecycle.grace_period_secs.to_string(),
    );
    labels.insert(
        LABEL_STOP_SIGNAL.to_owned(),
        lifecycle.stop_signal.name().to_owned(),
    );
    ContainerSpec {
        name: service_container_name(deployment, &service.name),
        image: service.image.clone(),
        args: service.args.clone(),
        env: service.env.clone(),
        volumes: service.volumes.clone(),
        ports: service.ports.clone(),
        labels,
        stop_signal: lifecycle.stop_signal,
    }
}

/// The container spec of an init container of `revision`.
pub fn init_container_spec(
    deployment: &str,
    init: &InitContainer,
    revision: Revision,
) -> ContainerSpec {
    let mut labels = base_labels(deployment, &init.name, revision);
    labels.insert(LABEL_INIT.to_owned(), "true".to_owned());
    ContainerSpec {
        name: init_container_name(deployment, &init.name),
        image: init.image.clone(),
        args: init.args.clone(),
        env: init.env.clone(),
        volumes: init.volumes.clone(),
        ports: Vec::new(),
        labels,
        stop_signal: Signal::Term,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> PodmanService {
        PodmanService {
            name: "web".into(),
            image: "img:1".into(),
            args: vec![],
            env: BTreeMap::from([("A".into(), "1".into())]),
            volumes: vec![],
            ports: vec![],
            pull_policy: None,
            container: None,
            setup_script: None,
        }
    }

    /// A score of `service` alone, stopped with `signal`, restarted
    /// `restart` times.
    fn score_of(service: PodmanService, signal: Signal, restart: Option<u64>) -> PodmanV0Score {
        PodmanV0Score {
            services: vec![service],
            init_containers: vec![],
            lifecycle: Some(crate::wire::LifecyclePolicy {
                stop_signal: signal,
                grace_period_secs: 30,
            }),
            lifetime: None,
            restart,
        }
    }

    /// The hash of `service` in a score of its own.
    fn hash(service: PodmanService, signal: Signal) -> String {
        let score = score_of(service, signal, None);
        service_spec_hash(&score, &score.services[0])
    }

    #[test]
    fn hash_is_stable_and_sensitive_to_what_is_baked_in() {
        let h = hash(web(), Signal::Term);
        assert_eq!(h.len(), 16);
        assert_eq!(h, hash(web(), Signal::Term));
        let mut env = web();
        env.env.insert("A".into(), "2".into());
        assert_ne!(h, hash(env, Signal::Term));
        assert_ne!(h, hash(web(), Signal::Int));
    }

    #[test]
    fn a_restart_changes_the_hash_and_no_restart_keeps_the_old_one() {
        let at = |restart| {
            let score = score_of(web(), Signal::Term, restart);
            service_spec_hash(&score, &score.services[0])
        };
        // The hash every container created before the field existed
        // carries: an upgraded agent must adopt them, not recreate them.
        let before = {
            #[derive(Serialize)]
            struct Hashed<'a> {
                service: &'a PodmanService,
                stop_signal: Signal,
            }
            let canonical = serde_json::to_vec(&Hashed {
                service: &web(),
                stop_signal: Signal::Term,
            })
            .unwrap();
            format!("{:016x}", fnv1a64(&canonical))
        };
        assert_eq!(at(None), before);
        assert_eq!(at(Some(0)), before);
        assert_ne!(at(Some(1)), before);
        assert_ne!(at(Some(2)), at(Some(1)));
    }

    #[test]
    fn the_spec_hash_covers_every_field_of_the_service() {
        use crate::wire::{PortMapping, Protocol, PullPolicy, VolumeMount};
        let base = hash(web(), Signal::Term);
        type Change = Box<dyn Fn(&mut PodmanService)>;
        let changes: Vec<(&str, Change)> = vec![
            ("image", Box::new(|s| s.image = "img:2".into())),
            ("args", Box::new(|s| s.args = vec!["--x".into()])),
            ("env", Box::new(|s| s.env.clear())),
            (
                "volumes",
                Box::new(|s| {
                    s.volumes = vec![VolumeMount {
                        source: "/srv".into(),
                        target: "/data".into(),
                        read_only: false,
                    }];
                }),
            ),
            (
                "volume read-only",
                Box::new(|s| {
                    s.volumes = vec![VolumeMount {
                        source: "/srv".into(),
                        target: "/data".into(),
                        read_only: true,
                    }];
                }),
            ),
            (
                "ports",
                Box::new(|s| {
                    s.ports = vec![PortMapping {
                        host_port: 80,
                        container_port: 8080,
                        protocol: Protocol::Tcp,
                    }];
                }),
            ),
            (
                "pull policy",
                Box::new(|s| s.pull_policy = Some(PullPolicy::Always)),
            ),
            (
                "setup script",
                Box::new(|s| s.setup_script = Some("apk add curl".into())),
            ),
        ];
        let mut seen = std::collections::BTreeSet::from([base]);
        for (what, change) in changes {
            let mut service = web();
            change(&mut service);
            assert!(
                seen.insert(hash(service, Signal::Term)),
                "changing the {what} left the hash as it was"
            );
        }
        assert_eq!(seen.len(), 9, "every change gives a hash of its own");
    }

    #[test]
    fn service_spec_carries_every_label() {
        let mut score = score_of(web(), Signal::Int, None);
        score.lifecycle = Some(crate::wire::LifecyclePolicy {
            stop_signal: Signal::Int,
            grace_period_secs: 7,
        });
        let spec = service_container_spec("shop", &score, &web(), Revision::new(4));
        assert_eq!(spec.name, "shop_web");
        assert_eq!(spec.stop_signal, Signal::Int);
        assert_eq!(spec.labels[LABEL_MANAGED], "true");
        assert_eq!(spec.labels[LABEL_DEPLOYMENT], "shop");
        assert_eq!(spec.labels[LABEL_SERVICE], "web");
        assert_eq!(spec.labels[LABEL_REVISION], "4");
        assert_eq!(spec.labels[LABEL_GRACE], "7");
        assert_eq!(spec.labels[LABEL_STOP_SIGNAL], "SIGINT");
        assert_eq!(spec.labels[LABEL_SPEC_HASH], hash(web(), Signal::Int));
        assert!(!spec.labels.contains_key(LABEL_INIT));
    }
}
