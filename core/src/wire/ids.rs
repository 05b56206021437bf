//! Small typed values that would otherwise travel as bare strings and
//! numbers: a KV [`Revision`], and the [`ServiceName`] and [`InitName`]
//! of a score's entries.
//!
//! They serialise exactly as the bare value does, so the JSON on the wire
//! is unchanged. The names are not checked when built: a score's names are
//! checked by [`PodmanV0Score::validate`](crate::wire::PodmanV0Score::validate),
//! which reports every broken rule with its value; these types only keep a
//! service's name from being mistaken for an init container's, a container
//! id or a deployment name.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

use std::borrow::Cow;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

use crate::wire::names::{LABEL_PATTERN, MAX_LABEL_LEN};

/// A desired-state key's revision: the KV stream sequence of the put or
/// delete. Revisions only grow; 0 means none seen.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct Revision(u64);

impl Revision {
    /// Revision `n`.
    pub const fn new(n: u64) -> Self {
        Self(n)
    }

    /// Its number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl From<u64> for Revision {
    fn from(n: u64) -> Self {
        Self(n)
    }
}

impl PartialEq<u64> for Revision {
    fn eq(&self, other: &u64) -> bool {
        self.0 == *other
    }
}

/// As the bare number, so traces read the same as before the type.
impl fmt::Debug for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

macro_rules! entry_name {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Clone,
            PartialEq,
            Eq,
            PartialOrd,
            Ord,
            Hash,
            Default,
            Serialize,
            Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(String);

        /// A string following [`LABEL_RULE`](crate::wire::names::LABEL_RULE),
        /// inlined where it is used.
        impl JsonSchema for $name {
            fn inline_schema() -> bool {
                true
            }

            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_LABEL_LEN,
                    "pattern": LABEL_PATTERN,
                })
            }
        }

        impl $name {
            /// The name `text`, unchecked (see the [module docs](self)).
            pub fn new(text: impl Into<String>) -> Self {
                Self(text.into())
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(text: &str) -> Self {
                Self(text.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(text: String) -> Self {
                Self(text)
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        /// As the bare string, so traces read the same as before the type.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

entry_name! {
    /// The name of a service in a score.
    ServiceName
}

entry_name! {
    /// The name of an init container in a score.
    InitName
}
