//! Image references and registry credentials as the podman adapter uses
//! them: the decisions (what a name means, which login an image is pulled
//! with, reading containers-auth.json) are `podfleet_core::image`'s, shared
//! with the control plane; this module adds the `X-Registry-Auth` header
//! that lets podman pull with a login.
//!
//! Passwords leave this module only inside that header: its `Debug` is
//! redacted, and no error built here quotes a credential or the text of a
//! credentials file.

use std::fmt;
use std::ops::Deref;

use base64::engine::general_purpose::URL_SAFE;
use base64::Engine;
use podfleet_core::image;

pub use podfleet_core::image::{LoginSource, RegistryLogin, DEFAULT_REGISTRY};

/// An image reference taken apart ([`image::ImageReference`]), whose parse
/// error is the message the adapter's `RuntimeError`s carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageReference(image::ImageReference);

impl ImageReference {
    /// [`image::ImageReference::parse`], its error as a message.
    pub(crate) fn parse(reference: &str) -> Result<Self, String> {
        image::ImageReference::parse(reference)
            .map(Self)
            .map_err(|e| e.to_string())
    }
}

impl Deref for ImageReference {
    type Target = image::ImageReference;

    fn deref(&self) -> &image::ImageReference {
        &self.0
    }
}

/// The device's registry logins ([`image::RegistryAuth`]), whose
/// containers-auth.json error is the message the settings report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryAuth(image::RegistryAuth);

impl RegistryAuth {
    /// No logins: every image is pulled anonymously.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// [`image::RegistryAuth::from_auth_json`].
    ///
    /// # Errors
    ///
    /// A reason naming the JSON position or the entry's key, never a value
    /// from the file.
    pub fn from_auth_json(text: &str) -> Result<Self, String> {
        image::RegistryAuth::from_auth_json(text)
            .map(Self)
            .map_err(|e| e.to_string())
    }

    /// The shared logins.
    #[must_use]
    pub fn logins_by_key(&self) -> &image::RegistryAuth {
        &self.0
    }

    /// [`image::RegistryAuth::insert`].
    pub fn insert(&mut self, key: &str, login: RegistryLogin, source: LoginSource) {
        self.0.insert(key, login, source);
    }

    /// [`image::RegistryAuth::logins`].
    pub fn logins(&self) -> impl Iterator<Item = (&str, &RegistryLogin, LoginSource)> + '_ {
        self.0.logins()
    }

    /// Whether there are no logins.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The login to pull `reference` with, and the key it is stored under.
    pub(crate) fn login_for(&self, reference: &ImageReference) -> Option<(&str, &RegistryLogin)> {
        self.0.login_for(reference)
    }
}

/// The value of an `X-Registry-Auth` header. Its `Debug` is redacted, and
/// nothing formats it into a message.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct RegistryAuthHeader(String);

impl RegistryAuthHeader {
    /// The Docker API's encoding: base64url (padded) of the JSON
    /// `{"username", "password", "serveraddress"}`, which podman decodes
    /// with Go's `base64.URLEncoding`. (bollard's own header uses the
    /// standard alphabet, which podman misreads when `+` or `/` occur.)
    pub(crate) fn new(login: &RegistryLogin, server_address: &str) -> Self {
        let json = serde_json::json!({
            "username": login.username(),
            "password": login.password(),
            "serveraddress": server_address,
        });
        Self(URL_SAFE.encode(json.to_string()))
    }

    /// The header's value, to be written into the request only.
    pub(crate) fn value(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RegistryAuthHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RegistryAuthHeader(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_decisions_keep_the_adapters_messages() {
        assert_eq!(
            ImageReference::parse("x:").unwrap_err(),
            "invalid image reference \"x:\": an empty tag"
        );
        let reference = ImageReference::parse("ghcr.io/team/app:1").unwrap();
        assert_eq!(reference.repository(), "ghcr.io/team/app");
        let mut auth =
            RegistryAuth::from_auth_json(r#"{"auths": {"ghcr.io": {"auth": "dTpw"}}}"#).unwrap();
        auth.insert(
            "ghcr.io/team",
            RegistryLogin::new("bot", "x"),
            LoginSource::Inline,
        );
        let (key, login) = auth.login_for(&reference).unwrap();
        assert_eq!((key, login.username()), ("ghcr.io/team", "bot"));
        assert_eq!(
            RegistryAuth::from_auth_json(r#"{"auths": {"h": {"auth": "not base64!"}}}"#)
                .unwrap_err(),
            "the \"auth\" of \"h\" is not base64 of \"user:password\""
        );
    }

    #[test]
    fn the_header_is_base64url_json_and_redacted() {
        // "p+?/" makes the standard alphabet's '+' and '/' appear.
        let login = RegistryLogin::new("u", ">>>?p+?/");
        let header = RegistryAuthHeader::new(&login, "localhost:5000");
        assert!(!header.value().contains('+') && !header.value().contains('/'));
        let json = URL_SAFE.decode(header.value()).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"username": "u", "password": ">>>?p+?/", "serveraddress": "localhost:5000"})
        );
        assert_eq!(format!("{header:?}"), "RegistryAuthHeader(***)");
        assert!(!format!("{login:?}").contains("p+?/"));
    }
}
