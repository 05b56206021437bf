//! The agent cache on the device's disk: [`FileCacheStore`].
//!
//! This module owns the one file that survives an agent crash,
//! `<state dir>/cache.json`, and the way it is replaced: write a temporary
//! file, fsync it, rename it over the old one, fsync the directory. After a
//! power cut the old or the new cache is found, never a torn mix. It never
//! decides what goes into the cache; the reconciler does.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use podfleet_core::reconciler::AgentCache;

use crate::event_loop::{CacheError, CacheStore};

/// The cache file's name inside the state directory.
pub const CACHE_FILE: &str = "cache.json";
const TEMP_FILE: &str = "cache.json.tmp";

/// A [`CacheStore`] in a state directory (by default `/var/lib/podfleet`).
#[derive(Debug, Clone)]
pub struct FileCacheStore {
    dir: PathBuf,
}

impl FileCacheStore {
    /// A store in `dir`, which is created (with its parents) if missing.
    ///
    /// # Errors
    /// The directory cannot be created, or it exists but is not writable:
    /// the error names the path, so a misconfigured state dir is caught at
    /// start rather than at the first write.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, CacheError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| {
            CacheError(format!(
                "cannot create the state directory {}: {e}",
                dir.display()
            ))
        })?;
        let probe = dir.join(TEMP_FILE);
        File::create(&probe)
            .and_then(|_| fs::remove_file(&probe))
            .map_err(|e| {
                CacheError(format!(
                    "the state directory {} is not writable: {e}",
                    dir.display()
                ))
            })?;
        Ok(Self { dir })
    }

    /// The directory the cache lives in.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache file's path.
    #[must_use]
    pub fn path(&self) -> PathBuf {
        self.dir.join(CACHE_FILE)
    }

    fn write_atomically(&self, bytes: &[u8]) -> std::io::Result<()> {
        let temp = self.dir.join(TEMP_FILE);
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temp, self.path())?;
        // The rename is durable only once the directory entry is.
        File::open(&self.dir)?.sync_all()
    }
}

impl CacheStore for FileCacheStore {
    fn load(&mut self) -> Result<Option<AgentCache>, CacheError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError(format!("cannot read {}: {e}", path.display()))),
        };
        AgentCache::from_json(&bytes)
            .map(Some)
            .map_err(|e| CacheError(format!("cannot decode {}: {e}", path.display())))
    }

    fn store(&mut self, cache: &AgentCache) -> Result<(), CacheError> {
        self.write_atomically(&cache.to_json())
            .map_err(|e| CacheError(format!("cannot write {}: {e}", self.path().display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podfleet_core::reconciler::CachedDeployment;
    use podfleet_core::wire::DeploymentName;
    use std::collections::BTreeMap;

    fn cache(revision: u64) -> AgentCache {
        let mut cache = AgentCache::default();
        cache.deployments.insert(
            DeploymentName::new("shop").unwrap(),
            CachedDeployment {
                revision: revision.into(),
                score: Some("{}".into()),
                applied: true,
                attempt: 1,
                container_ids: BTreeMap::from([("web".into(), "abc".into())]),
                applied_images: Vec::new(),
                previous_images: Vec::new(),
                exit_codes: BTreeMap::new(),
            },
        );
        cache
    }

    #[test]
    fn an_empty_dir_has_no_cache_and_a_stored_one_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileCacheStore::open(dir.path().join("state")).unwrap();
        assert_eq!(store.load().unwrap(), None);
        store.store(&cache(3)).unwrap();
        store.store(&cache(4)).unwrap();
        assert_eq!(store.load().unwrap(), Some(cache(4)));
        let names: Vec<_> = fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(CACHE_FILE)]);
    }

    #[test]
    fn a_torn_temp_file_does_not_replace_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileCacheStore::open(dir.path()).unwrap();
        store.store(&cache(5)).unwrap();
        // A crash between write and rename leaves only the temp file behind.
        fs::write(dir.path().join(TEMP_FILE), b"{\"deploym").unwrap();
        assert_eq!(store.load().unwrap(), Some(cache(5)));
    }

    #[test]
    fn a_corrupt_cache_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CACHE_FILE), b"not json").unwrap();
        let mut store = FileCacheStore::open(dir.path()).unwrap();
        let error = store.load().unwrap_err().to_string();
        assert!(error.contains(CACHE_FILE), "{error}");
    }

    #[test]
    fn an_unusable_state_dir_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        let error = FileCacheStore::open(file.join("state"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("cannot create the state directory"),
            "{error}"
        );
    }
}
