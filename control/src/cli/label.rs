//! `podfleet label device ID key=value key- [--overwrite]`: kubectl's
//! rules for changing labels.
//!
//! `key=value` sets a label and `key-` removes one. Every label is checked
//! against the selector rules ([`validate_label`]) before anything is
//! written, and a label that already has another value is only changed
//! with `--overwrite`.

use podfleet_core::fleet::{validate_label, Labels};

use crate::cli::Failure;

/// The changes a `label` command asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelChanges {
    /// Labels to set.
    pub set: Vec<(String, String)>,
    /// Label keys to remove.
    pub remove: Vec<String>,
}

/// Parses and checks the `LABEL` arguments.
///
/// # Errors
/// A usage [`Failure`] for an argument that is neither `key=value` nor
/// `key-`, for a key given twice, or naming the label and the rule it broke.
pub fn parse(args: &[String]) -> Result<LabelChanges, Failure> {
    let mut changes = LabelChanges::default();
    for arg in args {
        if let Some((key, value)) = arg.split_once('=') {
            validate_label(key, value)
                .map_err(|e| Failure::usage(format!("label {arg:?}: {e}")))?;
            changes.set.push((key.to_owned(), value.to_owned()));
        } else if let Some(key) = arg.strip_suffix('-') {
            validate_label(key, "").map_err(|e| Failure::usage(format!("label {arg:?}: {e}")))?;
            changes.remove.push(key.to_owned());
        } else {
            return Err(Failure::usage(format!(
                "label {arg:?}: write key=value to set a label, or key- to remove it"
            )));
        }
    }
    let mut keys: Vec<&str> = changes
        .set
        .iter()
        .map(|(k, _)| k.as_str())
        .chain(changes.remove.iter().map(String::as_str))
        .collect();
    keys.sort_unstable();
    if let Some(pair) = keys.windows(2).find(|w| w[0] == w[1]) {
        return Err(Failure::usage(format!(
            "label {:?} is given more than once",
            pair[0]
        )));
    }
    Ok(changes)
}

/// Checks the changes against the device's current labels: without
/// `overwrite`, a label may be added or set to the value it has, never
/// changed.
///
/// # Errors
/// A [`Failure`] naming the label, its current value and `--overwrite`.
pub fn check_overwrite(
    device: &str,
    current: &Labels,
    changes: &LabelChanges,
    overwrite: bool,
) -> Result<(), Failure> {
    if overwrite {
        return Ok(());
    }
    for (key, value) in &changes.set {
        if let Some(old) = current.get(key).filter(|old| *old != value) {
            return Err(Failure::failed(format!(
                "device/{device}: label {key:?} already has the value {old:?}; \
                 pass --overwrite to change it to {value:?}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::cli::Exit;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn sets_and_removals_parse() {
        let changes = parse(&args(&["site=lyon", "podfleet.io/canary=", "old-"])).unwrap();
        assert_eq!(
            changes.set,
            [
                ("site".to_owned(), "lyon".to_owned()),
                ("podfleet.io/canary".to_owned(), String::new())
            ]
        );
        assert_eq!(changes.remove, ["old"]);
    }

    #[test]
    fn a_broken_label_is_named_with_its_rule() {
        let error = parse(&args(&["site=ly on"])).unwrap_err();
        assert_eq!(error.exit, Exit::Usage);
        assert!(
            error
                .message
                .starts_with("label \"site=ly on\": invalid value \"ly on\" for label \"site\""),
            "{error}"
        );
        assert!(error.message.contains("the rule is"), "{error}");
        let error = parse(&args(&["-bad-"])).unwrap_err();
        assert!(error.message.contains("invalid label key"), "{error}");
        let error = parse(&args(&["site"])).unwrap_err();
        assert!(error.message.contains("key=value"), "{error}");
        let error = parse(&args(&["site=a", "site-"])).unwrap_err();
        assert_eq!(error.message, "label \"site\" is given more than once");
    }

    #[test]
    fn changing_a_value_needs_overwrite() {
        let current: Labels = [("site".to_owned(), "lyon".to_owned())].into();
        let same = parse(&args(&["site=lyon", "tier=edge"])).unwrap();
        assert!(check_overwrite("rpi-01", &current, &same, false).is_ok());
        let changed = parse(&args(&["site=paris"])).unwrap();
        let error = check_overwrite("rpi-01", &current, &changed, false).unwrap_err();
        assert_eq!(error.exit, Exit::Failed);
        assert_eq!(
            error.message,
            "device/rpi-01: label \"site\" already has the value \"lyon\"; \
             pass --overwrite to change it to \"paris\""
        );
        assert!(check_overwrite("rpi-01", &current, &changed, true).is_ok());
    }
}
