//! Which images of a FleetDeployment are pinned to registry digests, what
//! the fleet controller is handed once they are, and the registry logins
//! from a Secret. Pure: the reconciler asks the registries
//! ([`podfleet_control::registry::Resolver`]) and writes the record; the
//! engine reads it back from the object's status.
//!
//! The rules are `podfleet apply`'s ([`images_to_pin`]): every tag is
//! resolved, except images already pinned, local-only images
//! (`localhost/...`) and containers whose pull policy is `never`. A
//! FleetDeployment annotated `podfleet.io/keep-tags: "true"` ([`KEEP_TAGS`])
//! is handed in as written, as `podfleet apply --keep-tags` writes it.
//!
//! The digests are resolved once per `metadata.generation` and recorded in
//! `status.resolvedImages` ([`ResolvedImages`]); [`feed`] hands the
//! controller the spec with those digests, and nothing while the record is
//! of another generation. This module never asks a registry, reads a
//! Secret or looks at a clock.
//!
//! [`feed`] also carries the one other annotation that changes what the
//! controller is handed: `podfleet.io/force-generation` ([`FORCE_GENERATION`])
//! naming the current generation hands the spec in forced, as `podfleet
//! rollout force` stores it ([`forces`]).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use podfleet_control::cli::apply::{images_to_pin, pin_images, Container, ImageToPin};
use podfleet_control::registry::ResolveError;
use podfleet_core::fleet::{
    pinned_digest, FleetDeployment as Manifest, API_VERSION, FLEET_DEPLOYMENT_KIND,
};
use podfleet_core::image::{self, InvalidAuthFile, RegistryAuth};

use crate::resources::{
    FleetDeployment, ResolvedImage, ResolvedImages, FORCE_GENERATION, KEEP_TAGS,
};

/// The type of Secret the registry logins are read from.
pub const DOCKER_CONFIG_JSON_TYPE: &str = "kubernetes.io/dockerconfigjson";
/// Its key holding a Docker config (containers-auth.json) file.
pub const DOCKER_CONFIG_JSON_KEY: &str = ".dockerconfigjson";

/// How a FleetDeployment's images reach the devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// As the spec writes them: no image needs a digest, the
    /// FleetDeployment keeps its tags ([`KEEP_TAGS`]), or the spec does
    /// not parse (the fleet controller refuses it, with the field path).
    AsWritten,
    /// Pinned to digests first.
    Pin {
        /// The spec, parsed, as a manifest.
        manifest: Box<Manifest>,
        /// The images to resolve, init containers first, in the score's
        /// order.
        images: Vec<ImageToPin>,
    },
}

/// Whether `fd` is annotated to deploy its tags as written.
pub fn keeps_tags(fd: &FleetDeployment) -> bool {
    fd.annotations().get(KEEP_TAGS).map(String::as_str) == Some("true")
}

/// `fd` as the manifest `podfleet apply` would store: its name and spec.
pub fn manifest_value(fd: &FleetDeployment) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": FLEET_DEPLOYMENT_KIND,
        "metadata": {"name": fd.name_any()},
        "spec": fd.spec.0,
    })
}

/// How `fd`'s images reach the devices.
pub fn plan(fd: &FleetDeployment) -> Plan {
    if keeps_tags(fd) {
        return Plan::AsWritten;
    }
    let Ok(manifest) = Manifest::from_value(manifest_value(fd)) else {
        return Plan::AsWritten;
    };
    let images = images_to_pin(&manifest);
    if images.is_empty() {
        Plan::AsWritten
    } else {
        Plan::Pin {
            manifest: Box::new(manifest),
            images,
        }
    }
}

/// `manifest` with `images` pinned as `record` says, when `record` is of
/// `generation` and pins every one of them to a SHA-256 digest; `None`
/// otherwise (the images are to be resolved).
pub fn pinned(
    manifest: &Manifest,
    images: &[ImageToPin],
    record: Option<&ResolvedImages>,
    generation: i64,
) -> Option<Manifest> {
    let record = record.filter(|r| r.generation == generation)?;
    let mut digests = BTreeMap::new();
    for wanted in images {
        let (name, init) = container(&wanted.container);
        let entry = record
            .images
            .iter()
            .find(|e| e.container == name && e.init_container == init && e.image == wanted.image)?;
        let digest = pinned_digest(&entry.pinned)?;
        // One image, one digest: a record that says otherwise was not made here.
        if digests
            .insert(wanted.image.clone(), digest.to_owned())
            .is_some_and(|other| other != digest)
        {
            return None;
        }
    }
    pin_images(manifest, &digests)
        .ok()
        .map(|(pinned, _)| pinned)
}

/// What the engine hands the fleet controller for a FleetDeployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feed {
    /// This manifest (JSON).
    Manifest(Vec<u8>),
    /// Nothing yet: its images are not pinned for its generation.
    Unpinned,
}

/// Whether `fd` is annotated to force its current generation: its
/// [`FORCE_GENERATION`] annotation names its `metadata.generation`.
pub fn forces(fd: &FleetDeployment) -> bool {
    let named = fd
        .annotations()
        .get(FORCE_GENERATION)
        .and_then(|value| value.trim().parse::<i64>().ok());
    named.is_some() && named == fd.metadata.generation
}

/// `manifest` (JSON) with `spec.force` set to its spec's fingerprint; as
/// it was when it does not parse (the controller refuses it anyway).
fn forced(manifest: Vec<u8>) -> Vec<u8> {
    match Manifest::from_json(&manifest) {
        Ok(mut parsed) => {
            parsed.spec = parsed.spec.forced();
            parsed.to_json()
        }
        Err(_) => manifest,
    }
}

/// What the engine hands the fleet controller for `fd`: the manifest with
/// the images of `status.resolvedImages` when they are of its generation;
/// the manifest as written when no image needs a digest; forced when
/// [`forces`] says so.
pub fn feed(fd: &FleetDeployment) -> Feed {
    match unforced_feed(fd) {
        Feed::Manifest(manifest) if forces(fd) => Feed::Manifest(forced(manifest)),
        feed => feed,
    }
}

fn unforced_feed(fd: &FleetDeployment) -> Feed {
    match plan(fd) {
        Plan::AsWritten => Feed::Manifest(manifest_value(fd).to_string().into_bytes()),
        Plan::Pin { manifest, images } => {
            let record = fd.status.as_ref().and_then(|s| s.resolved_images.as_ref());
            let generation = fd.metadata.generation.unwrap_or(0);
            match pinned(&manifest, &images, record, generation) {
                Some(pinned) => Feed::Manifest(pinned.to_json()),
                None => Feed::Unpinned,
            }
        }
    }
}

/// The record of `images`, of `generation`, resolved to `digests` (by
/// image as written).
///
/// # Errors
/// [`PinFailure::Unpinnable`] for an image without a digest in `digests`
/// or that cannot be pinned to it.
pub fn record(
    generation: i64,
    images: &[ImageToPin],
    digests: &BTreeMap<String, String>,
) -> Result<ResolvedImages, PinFailure> {
    let mut record = ResolvedImages {
        generation,
        images: Vec::with_capacity(images.len()),
    };
    for wanted in images {
        let unpinnable = |reason: String| PinFailure::Unpinnable {
            container: wanted.container.clone(),
            image: wanted.image.clone(),
            reason,
        };
        let digest = digests
            .get(&wanted.image)
            .ok_or_else(|| unpinnable("it was not resolved".into()))?;
        let pinned = image::pin(&wanted.image, digest).map_err(|e| unpinnable(e.to_string()))?;
        let (name, init) = container(&wanted.container);
        record.images.push(ResolvedImage {
            container: name.to_owned(),
            init_container: init,
            image: wanted.image.clone(),
            pinned,
        });
    }
    Ok(record)
}

fn container(container: &Container) -> (&str, bool) {
    match container {
        Container::Service(name) => (name, false),
        Container::Init(name) => (name, true),
    }
}

/// Where the registry logins came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Logins {
    /// No Secret is configured: registries are asked anonymously.
    NotConfigured,
    /// The configured Secret (`namespace/name`) does not exist: registries
    /// are asked anonymously.
    SecretMissing(String),
    /// The logins of the Secret `namespace/name`.
    Secret(String),
}

/// Why a Secret holds no usable registry logins. Never quotes a value of
/// the Secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthSecretError {
    /// The Secret is of another type.
    #[error("the Secret {secret} is of type {found:?}, not {DOCKER_CONFIG_JSON_TYPE}")]
    WrongType {
        /// `namespace/name`.
        secret: String,
        /// Its type (`Opaque` when it has none).
        found: String,
    },
    /// The Secret has no `.dockerconfigjson` key.
    #[error("the Secret {secret} has no {DOCKER_CONFIG_JSON_KEY:?} key")]
    MissingKey {
        /// `namespace/name`.
        secret: String,
    },
    /// The key's value is not a containers-auth.json (Docker config) file.
    #[error("the Secret {secret}'s {DOCKER_CONFIG_JSON_KEY:?} is unusable: {reason}")]
    Invalid {
        /// `namespace/name`.
        secret: String,
        /// Why, naming no value of the file.
        reason: String,
    },
}

/// The registry logins of `secret`, a `kubernetes.io/dockerconfigjson`
/// Secret (the format `kubectl create secret docker-registry` and
/// `podman login` write).
///
/// # Errors
/// [`AuthSecretError`], naming the Secret and what is wrong with it.
pub fn registry_auth(secret: &Secret) -> Result<RegistryAuth, AuthSecretError> {
    let name = format!(
        "{}/{}",
        secret.namespace().unwrap_or_default(),
        secret.name_any()
    );
    let found = secret.type_.as_deref().unwrap_or("Opaque");
    if found != DOCKER_CONFIG_JSON_TYPE {
        return Err(AuthSecretError::WrongType {
            secret: name,
            found: found.to_owned(),
        });
    }
    let bytes = secret
        .data
        .as_ref()
        .and_then(|data| data.get(DOCKER_CONFIG_JSON_KEY))
        .ok_or_else(|| AuthSecretError::MissingKey {
            secret: name.clone(),
        })?;
    let invalid = |reason: String| AuthSecretError::Invalid {
        secret: name.clone(),
        reason,
    };
    let text = std::str::from_utf8(&bytes.0).map_err(|_| invalid("it is not UTF-8".into()))?;
    RegistryAuth::from_auth_json(text).map_err(|e: InvalidAuthFile| invalid(e.to_string()))
}

/// Why the images of a generation could not be pinned. Quotes no
/// password, token or Secret value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PinFailure {
    /// The Secret of registry logins could not be read or used.
    Logins(String),
    /// A registry did not resolve an image's tag.
    Unresolved {
        /// The container naming the image.
        container: Container,
        /// The registry's or the network's answer (names the image).
        error: Box<ResolveError>,
        /// Where the logins came from, when that may explain the error.
        hint: Option<String>,
    },
    /// A resolved digest cannot be written into the image.
    Unpinnable {
        /// The container naming the image.
        container: Container,
        /// The image, as written.
        image: String,
        /// Why.
        reason: String,
    },
}

impl PinFailure {
    /// An image of `container` that `error` says could not be resolved,
    /// with the logins of `logins`.
    pub fn unresolved(container: Container, error: ResolveError, logins: &Logins) -> Self {
        let anonymous = matches!(&error, ResolveError::Unauthorized { user: None, .. });
        let hint = anonymous.then(|| match logins {
            Logins::NotConfigured => "no --registry-auth-secret is set".to_owned(),
            Logins::SecretMissing(secret) => format!("the Secret {secret} does not exist"),
            Logins::Secret(secret) => format!("the Secret {secret} has no login for it"),
        });
        Self::Unresolved {
            container,
            error: Box::new(error),
            hint,
        }
    }
}

impl fmt::Display for PinFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinFailure::Logins(why) => write!(f, "registry logins: {why}"),
            PinFailure::Unresolved {
                container,
                error,
                hint,
            } => {
                write!(f, "{container}: {error}")?;
                match hint {
                    Some(hint) => write!(f, " ({hint})"),
                    None => Ok(()),
                }
            }
            PinFailure::Unpinnable {
                container,
                image,
                reason,
            } => write!(f, "{container}: image {image:?} cannot be pinned: {reason}"),
        }
    }
}

/// The Degraded condition's message for `failure` of `generation`, with
/// the rule it breaks and what the devices run meanwhile (`running`: the
/// record of the generation they were handed, if any).
pub fn unresolved_message(
    failure: &PinFailure,
    generation: i64,
    running: Option<&ResolvedImages>,
) -> String {
    let meanwhile = match running {
        Some(record) => format!(
            "the devices keep the images of generation {}",
            record.generation
        ),
        None => "the devices keep what they were handed before".to_owned(),
    };
    format!(
        "{failure}; generation {generation} reaches no device until each of its image tags is \
         pinned to the digest its registry serves (or the FleetDeployment is annotated \
         {KEEP_TAGS}: \"true\"); {meanwhile}"
    )
}

#[cfg(test)]
mod tests;
