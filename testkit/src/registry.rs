//! The image side of the fake podman: the device's local [`ImageStore`] and
//! the [`FakeRegistry`] it pulls from.
//!
//! Both are plain data the [`FakeRuntime`](crate::FakeRuntime) owns and
//! consults; neither has a clock. A pull's outcome is decided when it
//! begins, from the registry's state then, and lands in the store after its
//! transfer time ([`FakeRegistry::transfer_time`]): the runtime keeps the
//! pull in flight until its time comes.
//!
//! Images are made of [`Layer`]s, named by digest as registries name blobs.
//! Images that share a layer (a common base) share it in the store: a pull
//! fetches only the layers the store does not hold yet, the disk counts each
//! layer once, and removing an image frees only the layers no other image
//! still uses, as containers/storage does.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use podfleet_core::reconciler::fnv1a64;
use podfleet_core::runtime::ImageInfo;
use podfleet_core::wire::PullFailure;

/// The host a reference without one is pulled from, as podman's
/// `unqualified-search-registries` usually says.
pub const DEFAULT_HOST: &str = "docker.io";

/// The registry host of an image reference: its first path component when
/// that names a host (it has a `.` or a `:`, or is `localhost`), else
/// [`DEFAULT_HOST`].
pub fn host_of(reference: &str) -> &str {
    match reference.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => DEFAULT_HOST,
    }
}

/// The repository of an image reference: without its tag or digest.
pub fn repository_of(reference: &str) -> &str {
    if let Some((repository, _)) = reference.split_once('@') {
        return repository;
    }
    // A ':' before the last '/' is a registry's port, not a tag.
    let last = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[last..].rfind(':') {
        Some(i) => &reference[..last + i],
        None => reference,
    }
}

fn sha256_like(seed: &str) -> String {
    let a = fnv1a64(seed.as_bytes());
    let b = fnv1a64(format!("{seed}#").as_bytes());
    format!("sha256:{a:016x}{b:016x}{a:016x}{b:016x}")
}

/// One layer of an image: a blob the registry serves and the store keeps
/// once, however many images use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Its digest (`sha256:...`).
    pub digest: String,
    /// Its size, in bytes.
    pub size: u64,
}

impl Layer {
    /// The layer called `name` of `size` bytes: the same name and size give
    /// the same digest, so images built on one base share it.
    pub fn named(name: &str, size: u64) -> Self {
        Self {
            digest: sha256_like(&format!("layer {name} {size}")),
            size,
        }
    }
}

/// An image in the local store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredImage {
    /// Its id and the digest it was pulled by.
    pub info: ImageInfo,
    /// Its layers (none for a preloaded image: it is not counted against the
    /// disk budget).
    pub layers: Vec<Layer>,
}

impl StoredImage {
    /// Its size, as `podman images` states it: every layer it uses, shared
    /// or not.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

/// The device's local image store.
///
/// By default every reference is present ("preloaded", with an id derived
/// from its name and no digest), as the fake always had it; an image can be
/// taken out ([`remove`](Self::remove)), put back, or arrive by a pull. A
/// store made [`empty`](Self::empty) holds only what is put in or pulled.
#[derive(Debug, Clone)]
pub struct ImageStore {
    /// Images put in or pulled, which take the place of a preloaded one.
    held: BTreeMap<String, StoredImage>,
    /// References taken out.
    removed: BTreeSet<String>,
    /// Whether a reference neither held nor removed is present.
    preloaded: bool,
    /// How many bytes pulled images may take; `None`: no limit.
    capacity: Option<u64>,
}

impl Default for ImageStore {
    fn default() -> Self {
        Self {
            held: BTreeMap::new(),
            removed: BTreeSet::new(),
            preloaded: true,
            capacity: None,
        }
    }
}

impl ImageStore {
    /// A store that has nothing until images are put in or pulled.
    pub fn empty() -> Self {
        Self {
            preloaded: false,
            ..Self::default()
        }
    }

    /// What `inspect image` answers for `reference`.
    pub fn get(&self, reference: &str) -> Option<ImageInfo> {
        if let Some(image) = self.held.get(reference) {
            return Some(image.info.clone());
        }
        (self.preloaded && !self.removed.contains(reference)).then(|| ImageInfo {
            id: sha256_like(reference),
            digest: None,
        })
    }

    /// Whether `reference` is present.
    pub fn contains(&self, reference: &str) -> bool {
        self.get(reference).is_some()
    }

    /// Takes `reference` out (`podman rmi`, a prune).
    pub fn remove(&mut self, reference: &str) {
        self.held.remove(reference);
        self.removed.insert(reference.to_owned());
    }

    /// Puts `reference` back, as preloaded, unless the store already has it.
    pub fn restore(&mut self, reference: &str) {
        self.removed.remove(reference);
        if !self.preloaded && !self.held.contains_key(reference) {
            self.held.insert(
                reference.to_owned(),
                StoredImage {
                    info: ImageInfo {
                        id: sha256_like(reference),
                        digest: None,
                    },
                    layers: Vec::new(),
                },
            );
        }
    }

    /// Stores `image` under `reference`, replacing what it had.
    pub fn insert(&mut self, reference: &str, image: StoredImage) {
        self.removed.remove(reference);
        self.held.insert(reference.to_owned(), image);
    }

    /// The images put in or pulled (preloaded ones are not listed), one
    /// per id: `(id, every reference to it, size)`, by id. The size counts
    /// shared layers in full, as podman's does.
    pub fn list(&self) -> Vec<(String, Vec<String>, u64)> {
        let mut by_id: BTreeMap<&str, (Vec<String>, u64)> = BTreeMap::new();
        for (reference, image) in &self.held {
            let (names, size) = by_id.entry(&image.info.id).or_default();
            names.push(reference.clone());
            if let Some(digest) = &image.info.digest {
                let pinned = format!("{}@{digest}", repository_of(reference));
                if !names.contains(&pinned) {
                    names.push(pinned);
                }
            }
            *size = (*size).max(image.size());
        }
        by_id
            .into_iter()
            .map(|(id, (names, size))| (id.to_owned(), names, size))
            .collect()
    }

    /// Takes out every reference to the image `id` (`podman rmi <id>`);
    /// `false` if none was held.
    pub fn remove_id(&mut self, id: &str) -> bool {
        let references: Vec<String> = self
            .held
            .iter()
            .filter(|(_, image)| image.info.id == id)
            .map(|(reference, _)| reference.clone())
            .collect();
        for reference in &references {
            self.remove(reference);
        }
        !references.is_empty()
    }

    /// Bytes taken by pulled images: each layer once, however many images
    /// share it.
    pub fn used(&self) -> u64 {
        let mut layers: BTreeMap<&str, u64> = BTreeMap::new();
        for layer in self.held.values().flat_map(|i| &i.layers) {
            layers.insert(&layer.digest, layer.size);
        }
        layers.values().sum()
    }

    /// Whether the store holds the layer `digest` (for any image).
    pub fn has_layer(&self, digest: &str) -> bool {
        self.held
            .values()
            .flat_map(|i| &i.layers)
            .any(|l| l.digest == digest)
    }

    /// How many bytes pulled images may take; `None`: no limit.
    pub fn capacity(&self) -> Option<u64> {
        self.capacity
    }

    /// Sets how many bytes pulled images may take.
    pub fn set_capacity(&mut self, capacity: Option<u64>) {
        self.capacity = capacity;
    }

    /// Whether `bytes` more fit, with `reserved` bytes already promised to
    /// pulls in flight.
    pub fn fits(&self, bytes: u64, reserved: u64) -> bool {
        self.capacity
            .is_none_or(|c| self.used().saturating_add(reserved).saturating_add(bytes) <= c)
    }
}

/// A manifest the registry serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Its digest (`sha256:...`).
    pub digest: String,
    /// The image's layers, base first.
    pub layers: Vec<Layer>,
}

impl Manifest {
    /// The image's size: all its layers, in bytes.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

/// The registry the device pulls from.
///
/// It answers at [`DEFAULT_HOST`] and at the host of every reference pushed
/// to it; a pull from any other host finds nobody there (`Network`), as do
/// pulls while it is [down](Self::set_up). A pull it refuses the device's
/// credentials for is `Unauthorized`; one of a reference it never had is
/// `NotFound`. Pushing a tag again moves it to a new digest; the old digest
/// stays pullable by `repository@digest`.
#[derive(Debug, Clone)]
pub struct FakeRegistry {
    hosts: BTreeSet<String>,
    /// Reference as pushed -> its current manifest.
    tags: BTreeMap<String, Manifest>,
    /// Repository -> every digest ever pushed to it, with its manifest.
    digests: BTreeMap<String, BTreeMap<String, Manifest>>,
    pushes: u64,
    up: bool,
    accepts_credentials: bool,
    throughput: u64,
    round_trip: Duration,
}

/// A registry serves this many bytes per second unless told otherwise.
pub const DEFAULT_THROUGHPUT: u64 = 10_000_000;
/// A registry's round trip (the manifest fetch) unless told otherwise.
pub const DEFAULT_ROUND_TRIP: Duration = Duration::from_millis(100);

impl Default for FakeRegistry {
    fn default() -> Self {
        Self {
            hosts: BTreeSet::from([DEFAULT_HOST.to_owned()]),
            tags: BTreeMap::new(),
            digests: BTreeMap::new(),
            pushes: 0,
            up: true,
            accepts_credentials: true,
            throughput: DEFAULT_THROUGHPUT,
            round_trip: DEFAULT_ROUND_TRIP,
        }
    }
}

impl FakeRegistry {
    /// Pushes `reference` as one layer of `size` bytes that no other image
    /// shares, moving its tag to a new digest, which it returns.
    pub fn push(&mut self, reference: &str, size: u64) -> String {
        let layer = Layer::named(&format!("{reference}#{}", self.pushes + 1), size);
        self.push_layers(reference, vec![layer])
    }

    /// Pushes `reference` made of `layers` (base first), moving its tag to a
    /// new digest, which it returns.
    pub fn push_layers(&mut self, reference: &str, layers: Vec<Layer>) -> String {
        self.pushes += 1;
        let digest = sha256_like(&format!("{reference}@{}", self.pushes));
        let manifest = Manifest {
            digest: digest.clone(),
            layers,
        };
        self.hosts.insert(host_of(reference).to_owned());
        self.digests
            .entry(repository_of(reference).to_owned())
            .or_default()
            .insert(digest.clone(), manifest.clone());
        self.tags.insert(reference.to_owned(), manifest);
        digest
    }

    /// The manifest `reference` (a tag or `repository@digest`) names now.
    pub fn manifest(&self, reference: &str) -> Option<&Manifest> {
        match reference.split_once('@') {
            Some((repository, digest)) => self.digests.get(repository)?.get(digest),
            None => self.tags.get(reference),
        }
    }

    /// Whether it answers at all.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Takes it down (`false`) or brings it back.
    pub fn set_up(&mut self, up: bool) {
        self.up = up;
    }

    /// Makes it refuse (`false`) or accept the device's credentials.
    pub fn set_accepts_credentials(&mut self, accepts: bool) {
        self.accepts_credentials = accepts;
    }

    /// Sets its speed: bytes per second (at least 1) and the round trip
    /// every pull pays.
    pub fn set_speed(&mut self, throughput: u64, round_trip: Duration) {
        self.throughput = throughput.max(1);
        self.round_trip = round_trip;
    }

    /// Its speed: bytes per second and round trip.
    pub fn speed(&self) -> (u64, Duration) {
        (self.throughput, self.round_trip)
    }

    /// How long fetching `bytes` takes: the round trip, plus the bytes at
    /// its throughput (rounded up to the millisecond).
    pub fn transfer_time(&self, bytes: u64) -> Duration {
        let ms = u128::from(bytes) * 1000;
        let ms = ms.div_ceil(u128::from(self.throughput));
        self.round_trip + Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    /// What a pull of `reference` finds at the registry: the manifest, or
    /// why not, with the registry's words.
    ///
    /// # Errors
    /// `Network` when nobody answers at its host, `Unauthorized` when the
    /// credentials are refused, `NotFound` when it has no such reference.
    pub fn resolve(&self, reference: &str) -> Result<&Manifest, (PullFailure, String)> {
        let host = host_of(reference);
        if !self.up || !self.hosts.contains(host) {
            return Err((
                PullFailure::Network,
                format!(
                    "initializing source docker://{reference}: pinging container registry {host}: \
                     dial tcp {host}: connect: connection refused"
                ),
            ));
        }
        if !self.accepts_credentials {
            return Err((
                PullFailure::Unauthorized,
                format!(
                    "initializing source docker://{reference}: reading manifest: \
                     unauthorized: authentication required"
                ),
            ));
        }
        self.manifest(reference).ok_or_else(|| {
            (
                PullFailure::NotFound,
                format!(
                    "initializing source docker://{reference}: reading manifest: manifest unknown"
                ),
            )
        })
    }

    /// The store's record of a pulled `manifest`.
    pub fn pulled(manifest: &Manifest) -> StoredImage {
        StoredImage {
            info: ImageInfo {
                id: sha256_like(&format!("config of {}", manifest.digest)),
                digest: Some(manifest.digest.clone()),
            },
            layers: manifest.layers.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_into_host_and_repository() {
        assert_eq!(host_of("img/a:1"), DEFAULT_HOST);
        assert_eq!(host_of("busybox"), DEFAULT_HOST);
        assert_eq!(host_of("127.0.0.1:1/podfleet-nothing:1"), "127.0.0.1:1");
        assert_eq!(host_of("localhost/x:1"), "localhost");
        assert_eq!(host_of("quay.io/a/b:2"), "quay.io");
        assert_eq!(repository_of("img/a:1"), "img/a");
        assert_eq!(repository_of("127.0.0.1:1/x"), "127.0.0.1:1/x");
        assert_eq!(repository_of("127.0.0.1:1/x:3"), "127.0.0.1:1/x");
        assert_eq!(repository_of("img/a@sha256:00"), "img/a");
    }

    #[test]
    fn a_repushed_tag_moves_and_its_old_digest_stays_pullable() {
        let mut r = FakeRegistry::default();
        let first = r.push("img/a:1", 10);
        let second = r.push("img/a:1", 20);
        assert_ne!(first, second);
        assert_eq!(r.resolve("img/a:1").map(Manifest::size), Ok(20));
        assert_eq!(
            r.resolve(&format!("img/a@{first}")).map(Manifest::size),
            Ok(10)
        );
        assert_eq!(
            r.resolve("img/b:1").map_err(|(f, _)| f),
            Err(PullFailure::NotFound)
        );
        assert_eq!(
            r.resolve("10.0.0.1:5000/a:1").map_err(|(f, _)| f),
            Err(PullFailure::Network)
        );
        r.set_accepts_credentials(false);
        assert_eq!(
            r.resolve("img/a:1").map_err(|(f, _)| f),
            Err(PullFailure::Unauthorized)
        );
        r.set_up(false);
        assert_eq!(
            r.resolve("img/a:1").map_err(|(f, _)| f),
            Err(PullFailure::Network)
        );
    }

    #[test]
    fn transfer_time_is_the_round_trip_plus_the_bytes_at_the_throughput() {
        let mut r = FakeRegistry::default();
        r.set_speed(1_000, Duration::from_millis(50));
        assert_eq!(r.transfer_time(0), Duration::from_millis(50));
        assert_eq!(r.transfer_time(2_500), Duration::from_millis(2_550));
    }

    #[test]
    fn the_store_is_preloaded_unless_made_empty() {
        let mut s = ImageStore::default();
        assert!(s.contains("img/a:1"));
        s.remove("img/a:1");
        assert!(!s.contains("img/a:1"));
        s.restore("img/a:1");
        assert_eq!(s.get("img/a:1").map(|i| i.digest), Some(None));
        let mut empty = ImageStore::empty();
        assert!(!empty.contains("img/a:1"));
        empty.restore("img/a:1");
        assert!(empty.contains("img/a:1"));
        empty.set_capacity(Some(100));
        assert!(empty.fits(60, 40) && !empty.fits(61, 40));
    }

    #[test]
    fn shared_layers_count_once_and_go_with_their_last_image() {
        let base = Layer::named("base", 50);
        let mut r = FakeRegistry::default();
        r.push_layers("img/a:1", vec![base.clone(), Layer::named("a", 10)]);
        r.push_layers("img/b:1", vec![base.clone(), Layer::named("b", 20)]);
        let mut s = ImageStore::empty();
        for reference in ["img/a:1", "img/b:1"] {
            let manifest = r.resolve(reference).unwrap().clone();
            s.insert(reference, FakeRegistry::pulled(&manifest));
        }
        // podman states each image's full size; the disk holds the base once.
        let sizes: Vec<u64> = s.list().into_iter().map(|(_, _, size)| size).collect();
        assert_eq!(sizes.iter().sum::<u64>(), 130);
        assert_eq!(s.used(), 80);
        let a = s.get("img/a:1").unwrap().id;
        assert!(s.remove_id(&a));
        assert_eq!(s.used(), 70, "the base stays with img/b");
        assert!(s.has_layer(&base.digest));
        s.remove("img/b:1");
        assert_eq!(s.used(), 0);
        assert!(!s.has_layer(&base.digest));
    }
}
