//! Tables as kubectl prints them: upper-case headers, columns two spaces
//! apart, no borders; and ages as kubectl writes them (`12s`, `5m`, `3h`).
//!
//! A table never wraps: when it is wider than the terminal, the widest
//! columns give way first and their cells are cut with `…`.

use std::time::Duration;

/// The width used when `COLUMNS` is not set.
pub const DEFAULT_WIDTH: usize = 120;

/// The narrowest a column is cut to (`ab…`).
const MIN_COLUMN: usize = 3;

/// The terminal's width: `COLUMNS`, or [`DEFAULT_WIDTH`].
pub fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse().ok())
        .filter(|&c: &usize| c > 0)
        .unwrap_or(DEFAULT_WIDTH)
}

/// Rows under headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column headers.
    pub fn new(headers: Vec<&'static str>) -> Self {
        Self {
            headers,
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank, extra ones dropped.
    pub fn row(&mut self, mut cells: Vec<String>) {
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    /// The rows.
    pub fn rows(&self) -> &[Vec<String>] {
        &self.rows
    }

    /// Whether it has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The column widths that fit in `width` characters.
    pub fn widths(&self, width: usize) -> Vec<usize> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| chars(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(chars(cell));
            }
        }
        let gaps = 2 * widths.len().saturating_sub(1);
        let mut total: usize = widths.iter().sum::<usize>() + gaps;
        while total > width {
            let Some(widest) = widths
                .iter_mut()
                .filter(|w| **w > MIN_COLUMN)
                .max_by_key(|w| **w)
            else {
                break;
            };
            *widest -= 1;
            total -= 1;
        }
        widths
    }

    /// The whole table, headers first, each line ending in `\n`.
    pub fn render(&self, width: usize) -> String {
        let widths = self.widths(width);
        let mut out = line(self.headers.iter().copied(), &widths);
        for row in &self.rows {
            out.push_str(&line(row.iter().map(String::as_str), &widths));
        }
        out
    }

    /// One row laid out in `widths` (from [`Table::widths`]), for the
    /// lines `get -w` prints after the table.
    pub fn render_row(row: &[String], widths: &[usize]) -> String {
        line(row.iter().map(String::as_str), widths)
    }
}

fn chars(s: &str) -> usize {
    s.chars().count()
}

fn line<'a>(cells: impl Iterator<Item = &'a str>, widths: &[usize]) -> String {
    let mut out = String::new();
    let cells: Vec<&str> = cells.collect();
    for (i, (cell, &width)) in cells.iter().zip(widths).enumerate() {
        let cell = truncate(cell, width);
        out.push_str(&cell);
        if i + 1 < cells.len().min(widths.len()) {
            out.extend(std::iter::repeat_n(' ', width - chars(&cell) + 2));
        }
    }
    let trimmed = out.trim_end().len();
    out.truncate(trimmed);
    out.push('\n');
    out
}

/// `text` cut to `width` characters, ending in `…` when cut.
pub fn truncate(text: &str, width: usize) -> String {
    if chars(text) <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// An age as kubectl prints it: `45s`, `12m`, `5h`, `3d`, `2y`.
pub fn age(duration: Duration) -> String {
    let s = duration.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3_599 => format!("{}m", s / 60),
        3_600..=86_399 => format!("{}h", s / 3_600),
        86_400..=31_535_999 => format!("{}d", s / 86_400),
        _ => format!("{}y", s / 31_536_000),
    }
}

/// `key=value,key=value`, or `<none>`.
pub fn labels(labels: &podfleet_core::fleet::Labels) -> String {
    if labels.is_empty() {
        return "<none>".to_owned();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        let mut table = Table::new(vec!["NAME", "STATUS", "LABELS"]);
        table.row(vec!["rpi-01".into(), "Online".into(), "site=lyon".into()]);
        table.row(vec![
            "rpi-02".into(),
            "Offline".into(),
            "site=paris,tier=edge,zone=north".into(),
        ]);
        table
    }

    #[test]
    fn columns_are_two_spaces_apart_without_trailing_blanks() {
        assert_eq!(
            table().render(120),
            "NAME    STATUS   LABELS\n\
             rpi-01  Online   site=lyon\n\
             rpi-02  Offline  site=paris,tier=edge,zone=north\n"
        );
    }

    #[test]
    fn a_narrow_terminal_cuts_the_widest_column_with_an_ellipsis() {
        let text = table().render(30);
        assert_eq!(
            text,
            "NAME    STATUS   LABELS\n\
             rpi-01  Online   site=lyon\n\
             rpi-02  Offline  site=paris,t…\n"
        );
        assert!(text.lines().all(|l| l.chars().count() <= 30));
        // Narrower than every column's minimum: still one line per row.
        assert_eq!(table().render(5).lines().count(), 3);
    }

    #[test]
    fn ages_read_like_kubectl() {
        let cases = [
            (0, "0s"),
            (59, "59s"),
            (60, "1m"),
            (3_599, "59m"),
            (3_600, "1h"),
            (86_399, "23h"),
            (86_400, "1d"),
            (40_000_000, "1y"),
        ];
        for (secs, text) in cases {
            assert_eq!(age(Duration::from_secs(secs)), text);
        }
    }
}
