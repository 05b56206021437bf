//! Keys, subjects and identifiers parsed from arbitrary strings:
//! `DeviceId`, `DeploymentName`, `DeploymentKey::parse`,
//! `CommandSubject::parse` and `Verb`.
//!
//! Checks: every parse either fails with the typed `NameError` naming the
//! offending value (and, for identifiers, the rule), or round-trips through
//! its build function (`to_key`, `to_subject`, `Display`, JSON) to the very
//! same string; identifiers agree with an independent reading of the label
//! rule; keys and subjects built from the input's halves parse back; a
//! parsed key or subject stays inside its own device's filter. See
//! `podfleet_fuzz::names::names`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| podfleet_fuzz::names::names(data));
