//! The fleet model; more comes with the fleet controller.
//!
//! This module owns the vocabulary the fleet controller uses to pick devices,
//! starting with Kubernetes-style label [`Selector`]s. Like the rest of the
//! core it never performs IO: it only parses, prints and evaluates.

pub mod selector;

pub use selector::{Labels, Requirement, Selector, SelectorError};
