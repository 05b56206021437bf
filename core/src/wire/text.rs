//! Bounded text for messages that quote what someone else wrote.
//!
//! Reports and error messages quote names, paths and runtime errors. A value
//! can be as long as the payload that carried it (a 1,000,000-character
//! service name is a valid JSON string), and a report that quotes it in full
//! can exceed the broker's payload limit and never be published. Everything
//! podfleet writes for people goes through these helpers instead: a quoted
//! value shows its start and its length, a free text is cut at a bound.

use std::fmt;

/// The most characters of a quoted value that a message shows.
pub const QUOTE_MAX_CHARS: usize = 64;

/// The most bytes of one free text field in a report (a message, an error).
pub const TEXT_MAX_BYTES: usize = 1024;

/// `value` in double quotes as [`fmt::Debug`] would print a string, cut to
/// [`QUOTE_MAX_CHARS`] characters, followed by its length when it was cut:
/// `"aaaa…" (1000000 bytes)`.
#[derive(Clone, Copy)]
pub struct Quoted<'a>(pub &'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(QUOTE_MAX_CHARS) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => {
                let shown = format!("{:?}", &self.0[..cut]);
                // Re-open the closing quote to mark the cut.
                let open = shown.strip_suffix('"').unwrap_or(&shown);
                write!(f, "{open}…\" ({} bytes)", self.0.len())
            }
        }
    }
}

impl fmt::Debug for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `text` cut to at most `max` bytes on a character boundary; a cut text
/// ends with `… (N bytes in all)` (counted within `max`).
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let tail = format!("… ({} bytes in all)", text.len());
    let mut cut = max.saturating_sub(tail.len());
    while cut > 0 && !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = String::with_capacity(cut + tail.len());
    out.push_str(&text[..cut]);
    out.push_str(&tail);
    out
}

/// The end of `text` in at most `max` bytes, cut on a character boundary:
/// a cut text starts with `(N bytes in all) …` (counted within `max`). For
/// output, whose end says most.
pub fn bounded_tail(text: &str, max: usize) -> String {
    bounded_tail_of(text, text.len(), max)
}

/// [`bounded_tail`] of a text that was read as a stream and kept bounded
/// while it came: `end` is its end (all of it, or at least its last `max`
/// bytes) and `len` its whole length in bytes. Gives what `bounded_tail`
/// of the whole text gives, without holding the whole text.
pub fn bounded_tail_of(end: &str, len: usize, max: usize) -> String {
    if len <= max && end.len() <= max {
        return end.to_owned();
    }
    let head = format!("({len} bytes in all) …");
    let mut from = end.len() - max.saturating_sub(head.len()).min(end.len());
    while from < end.len() && !end.is_char_boundary(from) {
        from += 1;
    }
    let mut out = String::with_capacity(head.len() + end.len() - from);
    out.push_str(&head);
    out.push_str(&end[from..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_quoted_whole() {
        assert_eq!(Quoted("web").to_string(), "\"web\"");
        assert_eq!(Quoted("a\"b").to_string(), "\"a\\\"b\"");
    }

    #[test]
    fn long_values_show_their_start_and_length() {
        let long = "x".repeat(1_000_000);
        let shown = Quoted(&long).to_string();
        assert_eq!(
            shown,
            format!("\"{}…\" (1000000 bytes)", "x".repeat(QUOTE_MAX_CHARS))
        );
    }

    #[test]
    fn multibyte_values_are_cut_on_character_boundaries() {
        let long = "é".repeat(100);
        let shown = Quoted(&long).to_string();
        assert!(shown.starts_with(&format!("\"{}", "é".repeat(QUOTE_MAX_CHARS))));
        assert!(shown.ends_with("(200 bytes)"));
        let cut = bounded(&long, 51);
        assert!(cut.len() <= 51, "{cut}");
        assert!(cut.ends_with("(200 bytes in all)"));
    }

    #[test]
    fn tails_keep_the_end() {
        assert_eq!(bounded_tail("short", 10), "short");
        let long = format!("{}last line é", "z".repeat(5000));
        let cut = bounded_tail(&long, 100);
        assert!(cut.len() <= 100, "{cut}");
        assert!(cut.starts_with("(5012 bytes in all) …"), "{cut}");
        assert!(cut.ends_with("last line é"));
    }

    #[test]
    fn a_tail_kept_while_streaming_reads_as_the_tail_of_the_whole() {
        let long = format!("{}last line é", "z".repeat(5000));
        for kept in [100, 101, 300] {
            let end = &long[long.len() - kept..];
            assert_eq!(
                bounded_tail_of(end, long.len(), 100),
                bounded_tail(&long, 100)
            );
        }
        assert_eq!(bounded_tail_of("short", 5, 10), "short");
    }

    #[test]
    fn bounded_texts_fit_their_bound() {
        assert_eq!(bounded("short", 10), "short");
        let long = "y".repeat(5000);
        let cut = bounded(&long, TEXT_MAX_BYTES);
        assert!(cut.len() <= TEXT_MAX_BYTES);
        assert!(cut.ends_with("… (5000 bytes in all)"));
    }
}
