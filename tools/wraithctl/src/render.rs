//! Text for people: `wg show`-style blocks, aligned tables, sizes and ages.

use std::fmt::Write as _;

/// Bytes as `wg` shows them: `512 B`, `1.50 KiB`, `3.25 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.2} {}", UNITS[unit])
}

/// A duration in words, as `wg` shows handshake ages: `1 hour, 2 minutes, 3 seconds`.
pub fn duration(secs: f64) -> String {
    let total = secs.max(0.0) as u64;
    if total == 0 {
        return "0 seconds".into();
    }
    let parts = [
        (total / 86_400, "day"),
        (total / 3600 % 24, "hour"),
        (total / 60 % 60, "minute"),
        (total % 60, "second"),
    ];
    parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n} {unit}{}", if *n == 1 { "" } else { "s" }))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A short duration for table cells: `45s`, `3m12s`, `2h05m`, `3d04h`.
pub fn short_duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d{:02}h", s / 86_400, s / 3600 % 24),
    }
}

/// Left-aligned columns separated by two spaces; no trailing blanks.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            let pad = widths.get(i).copied().unwrap_or(0);
            let _ = write!(l, "{cell:<pad$}");
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// A `wg show`-style block: a heading line and indented `key: value` lines.
#[derive(Debug, Default)]
pub struct Block {
    text: String,
}

impl Block {
    pub fn new(kind: &str, title: &str) -> Block {
        Block {
            text: format!("{kind}: {title}\n"),
        }
    }

    pub fn field(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Self {
        let _ = writeln!(self.text, "  {key}: {value}");
        self
    }

    pub fn finish(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_like_wg() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 + 256 * 1024), "3.25 MiB");
        assert_eq!(duration(0.4), "0 seconds");
        assert_eq!(duration(61.0), "1 minute, 1 second");
        assert_eq!(duration(3600.0 * 26.0 + 2.0), "1 day, 2 hours, 2 seconds");
        assert_eq!(short_duration(5.0), "5s");
        assert_eq!(short_duration(192.0), "3m12s");
        assert_eq!(short_duration(7500.0), "2h05m");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["NAME", "ENDPOINT"],
            &[
                vec!["a".into(), "192.0.2.1:1".into()],
                vec!["longer".into(), "x".into()],
            ],
        );
        assert_eq!(t, "NAME    ENDPOINT\na       192.0.2.1:1\nlonger  x\n");
    }
}
