//! Kubernetes-style label selectors: `site=lyon,tier in (edge,gw),!canary`.
//!
//! This module owns the one parser and the one printer of the selector text,
//! so the operator, the controller and the CLI can never disagree on what a
//! selector means. It follows Kubernetes' label-selector syntax and matching
//! semantics, and never looks anything up: it evaluates a selector against
//! the [`Labels`] it is given.
//!
//! # Syntax
//! A selector is a comma-separated list of requirements, all of which must
//! hold; the empty selector matches everything. Whitespace is allowed around
//! every token.
//!
//! | text              | holds when                                   |
//! |-------------------|----------------------------------------------|
//! | `key=value`       | the key is present with that value           |
//! | `key==value`      | the same                                     |
//! | `key!=value`      | the key is absent or has another value       |
//! | `key in (a,b)`    | the key is present with one of the values    |
//! | `key notin (a,b)` | the key is absent or has none of the values  |
//! | `key`             | the key is present                           |
//! | `!key`            | the key is absent                            |
//!
//! Keys follow [`KEY_RULE`] and values [`VALUE_RULE`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::wire::text::Quoted;

/// The labels of one device: key to value.
pub type Labels = BTreeMap<String, String>;

/// The rule every label key must follow, as shown in error messages.
pub const KEY_RULE: &str = "an optional DNS-subdomain prefix of at most 253 characters and '/', \
     then a name of 1-63 characters of A-Z, a-z, 0-9, '-', '_' and '.', \
     starting and ending with a letter or digit";

/// The rule every label value must follow, as shown in error messages.
pub const VALUE_RULE: &str = "empty, or 1-63 characters of A-Z, a-z, 0-9, '-', '_' and '.', \
     starting and ending with a letter or digit";

/// Longest name part of a key, and longest value.
pub const MAX_NAME_LEN: usize = 63;

/// Longest prefix part of a key.
pub const MAX_PREFIX_LEN: usize = 253;

/// One condition of a [`Selector`] on one label key.
///
/// Requirements inside a [`Selector`] always hold valid keys and values and,
/// for [`In`](Requirement::In) and [`NotIn`](Requirement::NotIn), a
/// non-empty set of non-empty values: a selector is only built by parsing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Requirement {
    /// `key=value` (or `key==value`): present with this value.
    Equals {
        /// The label key.
        key: String,
        /// The required value.
        value: String,
    },
    /// `key!=value`: absent, or present with another value.
    NotEquals {
        /// The label key.
        key: String,
        /// The refused value.
        value: String,
    },
    /// `key in (a,b)`: present with one of the values.
    In {
        /// The label key.
        key: String,
        /// The accepted values.
        values: BTreeSet<String>,
    },
    /// `key notin (a,b)`: absent, or present with none of the values.
    NotIn {
        /// The label key.
        key: String,
        /// The refused values.
        values: BTreeSet<String>,
    },
    /// `key`: present, with any value.
    Exists {
        /// The label key.
        key: String,
    },
    /// `!key`: absent.
    DoesNotExist {
        /// The label key.
        key: String,
    },
}

impl Requirement {
    /// The label key this requirement is about.
    pub fn key(&self) -> &str {
        match self {
            Requirement::Equals { key, .. }
            | Requirement::NotEquals { key, .. }
            | Requirement::In { key, .. }
            | Requirement::NotIn { key, .. }
            | Requirement::Exists { key }
            | Requirement::DoesNotExist { key } => key,
        }
    }

    /// Whether `labels` satisfy this requirement, with Kubernetes semantics:
    /// `!=` and `notin` hold when the key is absent.
    pub fn matches(&self, labels: &Labels) -> bool {
        let found = labels.get(self.key());
        match self {
            Requirement::Equals { value, .. } => found == Some(value),
            Requirement::NotEquals { value, .. } => found != Some(value),
            Requirement::In { values, .. } => found.is_some_and(|v| values.contains(v)),
            Requirement::NotIn { values, .. } => !found.is_some_and(|v| values.contains(v)),
            Requirement::Exists { .. } => found.is_some(),
            Requirement::DoesNotExist { .. } => found.is_none(),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list(f: &mut fmt::Formatter<'_>, values: &BTreeSet<String>) -> fmt::Result {
            f.write_str("(")?;
            for (i, value) in values.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                f.write_str(value)?;
            }
            f.write_str(")")
        }
        match self {
            Requirement::Equals { key, value } => write!(f, "{key}={value}"),
            Requirement::NotEquals { key, value } => write!(f, "{key}!={value}"),
            Requirement::In { key, values } => {
                write!(f, "{key} in ")?;
                list(f, values)
            }
            Requirement::NotIn { key, values } => {
                write!(f, "{key} notin ")?;
                list(f, values)
            }
            Requirement::Exists { key } => f.write_str(key),
            Requirement::DoesNotExist { key } => write!(f, "!{key}"),
        }
    }
}

/// A Kubernetes-style label selector: requirements that must all hold.
///
/// Built by [`Selector::parse`] (or [`FromStr`], or deserializing a string);
/// printed by [`Display`](fmt::Display) in a canonical form (`key=value`,
/// no spaces except around `in` and `notin`, sorted value lists) that parses
/// back to an equal selector. The [`Default`] selector is empty and matches
/// everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// Parses Kubernetes label-selector syntax; see the [module docs](self).
    ///
    /// # Errors
    /// A [`SelectorError`] naming the offending text, its byte position and
    /// the rule it broke.
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        Parser::new(text).selector()
    }

    /// The requirements, in the order they were written.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether this selector has no requirements (and so matches everything).
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, requirement) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{requirement}")?;
        }
        Ok(())
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Selector::parse(&raw).map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for Selector {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Selector".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A Kubernetes label selector: comma-separated requirements \
                (key=value, key==value, key!=value, key in (a,b), key notin (a,b), key, !key); \
                empty matches everything.",
        })
    }
}

/// Why a selector text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// A label key broke [`KEY_RULE`].
    #[error("invalid label key {} at byte {position}: {problem}; the rule is {KEY_RULE}", Quoted(.key))]
    InvalidKey {
        /// The offending key, verbatim.
        key: String,
        /// Where it starts in the selector text.
        position: usize,
        /// The part of the rule it broke.
        problem: &'static str,
    },
    /// A label value broke [`VALUE_RULE`].
    #[error(
        "invalid label value {} for {} at byte {position}: {problem}; the rule is {VALUE_RULE}",
        Quoted(.value), Quoted(.key)
    )]
    InvalidValue {
        /// The key the value is for.
        key: String,
        /// The offending value, verbatim.
        value: String,
        /// Where it starts in the selector text.
        position: usize,
        /// The part of the rule it broke.
        problem: &'static str,
    },
    /// A requirement did not start with a key (or `!` and a key).
    #[error("expected a label key at byte {position}, found {}", Found(.found))]
    ExpectedKey {
        /// Where the key was expected.
        position: usize,
        /// The text found there; `None` at the end of the selector.
        found: Option<String>,
    },
    /// A key was followed by something other than an operator, `,` or the end.
    #[error(
        "expected an operator (=, ==, !=, in, notin), ',' or the end after the key {} at byte {position}, found {}",
        Quoted(.key), Found(.found)
    )]
    ExpectedOperator {
        /// The key before it.
        key: String,
        /// Where the operator was expected.
        position: usize,
        /// The text found there; `None` at the end of the selector.
        found: Option<String>,
    },
    /// `=`, `==` or `!=` was followed by something that is not a value.
    #[error("expected a value for {} at byte {position}, found {}", Quoted(.key), Found(.found))]
    ExpectedValue {
        /// The key the value is for.
        key: String,
        /// Where the value was expected.
        position: usize,
        /// The text found there; `None` at the end of the selector.
        found: Option<String>,
    },
    /// `in` or `notin` was not followed by `(`.
    #[error("expected '(' to open the value list of {} at byte {position}, found {}", Quoted(.key), Found(.found))]
    ExpectedList {
        /// The key the list is for.
        key: String,
        /// Where `(` was expected.
        position: usize,
        /// The text found there; `None` at the end of the selector.
        found: Option<String>,
    },
    /// A value list was empty: `in` and `notin` need at least one value.
    #[error("the value list of {} at byte {position} is empty; 'in' and 'notin' need at least one value", Quoted(.key))]
    EmptyList {
        /// The key the list is for.
        key: String,
        /// Where the list opens.
        position: usize,
    },
    /// A value list had a gap: `(a,)` or `(a,,b)`.
    #[error("expected a value in the value list of {} at byte {position}, found {}", Quoted(.key), Found(.found))]
    ExpectedListValue {
        /// The key the list is for.
        key: String,
        /// Where the value was expected.
        position: usize,
        /// The text found there; `None` at the end of the selector.
        found: Option<String>,
    },
    /// A value list was not closed by `)`.
    #[error("expected ')' to close the value list of {} at byte {position}", Quoted(.key))]
    UnclosedList {
        /// The key the list is for.
        key: String,
        /// Where `)` (or `,`) was expected.
        position: usize,
    },
    /// A complete requirement was followed by something other than `,` or the end.
    #[error("expected ',' or the end after the requirement on {} at byte {position}, found {}", Quoted(.key), Found(.found))]
    ExpectedSeparator {
        /// The key of the requirement before it.
        key: String,
        /// Where `,` was expected.
        position: usize,
        /// The text found there.
        found: Option<String>,
    },
}

/// What an error found: a quoted token, or the end of the selector.
struct Found<'a>(&'a Option<String>);

impl fmt::Display for Found<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(text) => write!(f, "{}", Quoted(text)),
            None => f.write_str("the end"),
        }
    }
}

/// One lexical token of a selector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    /// A run of characters that are neither whitespace nor `=!(),`.
    Word(&'a str),
    Eq,
    DoubleEq,
    NotEq,
    Bang,
    Open,
    Close,
    Comma,
}

impl Token<'_> {
    fn text(&self) -> &str {
        match self {
            Token::Word(word) => word,
            Token::Eq => "=",
            Token::DoubleEq => "==",
            Token::NotEq => "!=",
            Token::Bang => "!",
            Token::Open => "(",
            Token::Close => ")",
            Token::Comma => ",",
        }
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Parser { text, pos: 0 }
    }

    /// The next token and its byte position, without consuming it; `None`
    /// at the end. Skips whitespace before it.
    fn peek(&mut self) -> (usize, Option<Token<'a>>) {
        let rest = &self.text[self.pos..];
        let trimmed = rest.trim_start();
        self.pos += rest.len() - trimmed.len();
        let token = match trimmed.as_bytes().first() {
            None => None,
            Some(b'=') if trimmed.starts_with("==") => Some(Token::DoubleEq),
            Some(b'=') => Some(Token::Eq),
            Some(b'!') if trimmed.starts_with("!=") => Some(Token::NotEq),
            Some(b'!') => Some(Token::Bang),
            Some(b'(') => Some(Token::Open),
            Some(b')') => Some(Token::Close),
            Some(b',') => Some(Token::Comma),
            Some(_) => {
                let end = trimmed
                    .find(|c: char| c.is_whitespace() || "=!(),".contains(c))
                    .unwrap_or(trimmed.len());
                Some(Token::Word(&trimmed[..end]))
            }
        };
        (self.pos, token)
    }

    fn bump(&mut self, token: Token<'_>) {
        self.pos += token.text().len();
    }

    fn found(token: Option<Token<'_>>) -> Option<String> {
        token.map(|t| t.text().to_owned())
    }

    fn selector(mut self) -> Result<Selector, SelectorError> {
        let mut requirements = Vec::new();
        if self.peek().1.is_none() {
            return Ok(Selector { requirements });
        }
        loop {
            let requirement = self.requirement()?;
            let (position, token) = self.peek();
            match token {
                None => {
                    requirements.push(requirement);
                    return Ok(Selector { requirements });
                }
                Some(Token::Comma) => {
                    self.bump(Token::Comma);
                    requirements.push(requirement);
                }
                Some(other) => {
                    return Err(SelectorError::ExpectedSeparator {
                        key: requirement.key().to_owned(),
                        position,
                        found: Some(other.text().to_owned()),
                    })
                }
            }
        }
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        match self.peek() {
            (position, Some(Token::Word(word))) => {
                self.bump(Token::Word(word));
                check_key(word).map_err(|problem| SelectorError::InvalidKey {
                    key: word.to_owned(),
                    position,
                    problem,
                })?;
                Ok(word.to_owned())
            }
            (position, token) => Err(SelectorError::ExpectedKey {
                position,
                found: Self::found(token),
            }),
        }
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        if let (_, Some(Token::Bang)) = self.peek() {
            self.bump(Token::Bang);
            let key = self.key()?;
            return Ok(Requirement::DoesNotExist { key });
        }
        let key = self.key()?;
        let (position, token) = self.peek();
        match token {
            None | Some(Token::Comma) => Ok(Requirement::Exists { key }),
            Some(op @ (Token::Eq | Token::DoubleEq | Token::NotEq)) => {
                self.bump(op);
                let value = self.value(&key)?;
                Ok(if op == Token::NotEq {
                    Requirement::NotEquals { key, value }
                } else {
                    Requirement::Equals { key, value }
                })
            }
            Some(Token::Word(word @ ("in" | "notin"))) => {
                self.bump(Token::Word(word));
                let values = self.list(&key)?;
                Ok(if word == "in" {
                    Requirement::In { key, values }
                } else {
                    Requirement::NotIn { key, values }
                })
            }
            Some(other) => Err(SelectorError::ExpectedOperator {
                key,
                position,
                found: Some(other.text().to_owned()),
            }),
        }
    }

    /// The value after `=`, `==` or `!=`: a word, or empty before `,` or the end.
    fn value(&mut self, key: &str) -> Result<String, SelectorError> {
        match self.peek() {
            (_, None | Some(Token::Comma)) => Ok(String::new()),
            (position, Some(Token::Word(word))) => {
                self.bump(Token::Word(word));
                self.checked_value(key, word, position)
            }
            (position, Some(other)) => Err(SelectorError::ExpectedValue {
                key: key.to_owned(),
                position,
                found: Some(other.text().to_owned()),
            }),
        }
    }

    fn checked_value(
        &self,
        key: &str,
        value: &str,
        position: usize,
    ) -> Result<String, SelectorError> {
        check_value(value).map_err(|problem| SelectorError::InvalidValue {
            key: key.to_owned(),
            value: value.to_owned(),
            position,
            problem,
        })?;
        Ok(value.to_owned())
    }

    /// `( value (, value)* )`.
    fn list(&mut self, key: &str) -> Result<BTreeSet<String>, SelectorError> {
        let open = match self.peek() {
            (position, Some(Token::Open)) => {
                self.bump(Token::Open);
                position
            }
            (position, token) => {
                return Err(SelectorError::ExpectedList {
                    key: key.to_owned(),
                    position,
                    found: Self::found(token),
                })
            }
        };
        if let (_, Some(Token::Close)) = self.peek() {
            return Err(SelectorError::EmptyList {
                key: key.to_owned(),
                position: open,
            });
        }
        let mut values = BTreeSet::new();
        loop {
            match self.peek() {
                (position, Some(Token::Word(word))) => {
                    self.bump(Token::Word(word));
                    values.insert(self.checked_value(key, word, position)?);
                }
                (position, token) => {
                    return Err(SelectorError::ExpectedListValue {
                        key: key.to_owned(),
                        position,
                        found: Self::found(token),
                    })
                }
            }
            match self.peek() {
                (_, Some(Token::Comma)) => self.bump(Token::Comma),
                (_, Some(Token::Close)) => {
                    self.bump(Token::Close);
                    return Ok(values);
                }
                (position, _) => {
                    return Err(SelectorError::UnclosedList {
                        key: key.to_owned(),
                        position,
                    })
                }
            }
        }
    }
}

/// Why a device's label was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LabelError {
    /// A label key broke [`KEY_RULE`].
    #[error("invalid label key {}: {problem}; the rule is {KEY_RULE}", Quoted(.key))]
    InvalidKey {
        /// The offending key, verbatim.
        key: String,
        /// The part of the rule it broke.
        problem: &'static str,
    },
    /// A label value broke [`VALUE_RULE`].
    #[error("invalid value {} for label {}: {problem}; the rule is {VALUE_RULE}", Quoted(.value), Quoted(.key))]
    InvalidValue {
        /// The key the value is for.
        key: String,
        /// The offending value, verbatim.
        value: String,
        /// The part of the rule it broke.
        problem: &'static str,
    },
}

/// Checks one label against [`KEY_RULE`] and [`VALUE_RULE`], the rules a
/// selector's keys and values follow, so every label can be selected.
///
/// # Errors
/// The first rule broken, naming the key or value.
pub fn validate_label(key: &str, value: &str) -> Result<(), LabelError> {
    check_key(key).map_err(|problem| LabelError::InvalidKey {
        key: key.to_owned(),
        problem,
    })?;
    check_value(value).map_err(|problem| LabelError::InvalidValue {
        key: key.to_owned(),
        value: value.to_owned(),
        problem,
    })
}

/// Checks every label of a set (see [`validate_label`]).
///
/// # Errors
/// The first label, in key order, that breaks a rule.
pub fn validate_labels(labels: &Labels) -> Result<(), LabelError> {
    labels
        .iter()
        .try_for_each(|(key, value)| validate_label(key, value))
}

/// Checks a key against [`KEY_RULE`]; the broken part of the rule otherwise.
fn check_key(key: &str) -> Result<(), &'static str> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return Err("its prefix before '/' is empty");
        }
        if prefix.len() > MAX_PREFIX_LEN {
            return Err("its prefix is longer than 253 characters");
        }
        let part_ok = |part: &str| {
            let bytes = part.as_bytes();
            !bytes.is_empty()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
                && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
                && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        };
        if !prefix.split('.').all(part_ok) {
            return Err("its prefix is not a DNS subdomain (dot-separated parts of a-z, 0-9 and '-', each starting and ending with a letter or digit)");
        }
        if name.contains('/') {
            return Err("it contains more than one '/'");
        }
    }
    if name.is_empty() {
        return Err("its name is empty");
    }
    check_name(name).map_err(|problem| match problem {
        NameProblem::TooLong => "its name is longer than 63 characters",
        NameProblem::BadChar => {
            "its name contains a character other than A-Z, a-z, 0-9, '-', '_' or '.'"
        }
        NameProblem::BadEnds => "its name does not start and end with a letter or digit",
    })
}

/// Checks a value against [`VALUE_RULE`]; the broken part of the rule otherwise.
fn check_value(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Ok(());
    }
    check_name(value).map_err(|problem| match problem {
        NameProblem::TooLong => "it is longer than 63 characters",
        NameProblem::BadChar => "it contains a character other than A-Z, a-z, 0-9, '-', '_' or '.'",
        NameProblem::BadEnds => "it does not start and end with a letter or digit",
    })
}

enum NameProblem {
    TooLong,
    BadChar,
    BadEnds,
}

/// The shared name rule of key names and values, for a non-empty `name`.
fn check_name(name: &str) -> Result<(), NameProblem> {
    let bytes = name.as_bytes();
    if bytes.len() > MAX_NAME_LEN {
        Err(NameProblem::TooLong)
    } else if !bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Err(NameProblem::BadChar)
    } else if !(bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric))
    {
        Err(NameProblem::BadEnds)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
