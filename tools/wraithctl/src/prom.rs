//! Just enough of the Prometheus text format (0.0.4) to total the node's counters.

use std::collections::BTreeMap;

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// All samples of an exposition; comment lines and lines that do not parse are skipped.
#[derive(Debug, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        Metrics {
            samples: text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .filter_map(parse_line)
                .collect(),
        }
    }

    /// Sum of every sample of `name`, or `None` if there is none.
    pub fn sum(&self, name: &str) -> Option<f64> {
        let mut it = self.samples.iter().filter(|s| s.name == name).peekable();
        it.peek()?;
        Some(it.map(|s| s.value).sum())
    }

    /// Sum of `name` as a whole number, 0 when absent.
    pub fn total(&self, name: &str) -> u64 {
        self.sum(name).map_or(0, |v| v.max(0.0) as u64)
    }

    /// Sum of `name` per value of `label`.
    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for s in self.samples.iter().filter(|s| s.name == name) {
            if let Some(v) = s.labels.get(label) {
                *out.entry(v.clone()).or_insert(0) += s.value.max(0.0) as u64;
            }
        }
        out
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inner)?;
        labels = parsed;
        rest = after;
    }
    // Value, then an optional timestamp.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` and returns the labels and what follows the `}`.
fn parse_labels(s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = s.trim_start();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_owned();
        rest = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.insert(key, value);
        rest = rest[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_samples_labels_and_sums() {
        let m = Metrics::parse(
            "# HELP x_total A counter.\n# TYPE x_total counter\n\
             x_total{worker=\"0\"} 3\nx_total{worker=\"1\"} 4 1700000000\n\
             info{backend=\"portable\",note=\"a \\\"q\\\" b\\\\c\"} 1\n\
             h_bucket{le=\"+Inf\"} 7\nplain 2.5\n",
        );
        assert_eq!(m.sum("x_total"), Some(7.0));
        assert_eq!(m.total("missing"), 0);
        let info = &m.samples[2].labels;
        assert_eq!(info["backend"], "portable");
        assert_eq!(info["note"], "a \"q\" b\\c");
        assert_eq!(m.sum("plain"), Some(2.5));
        assert_eq!(m.by_label("x_total", "worker").get("1"), Some(&4));
        assert_eq!(m.by_label("h_bucket", "le").get("+Inf"), Some(&7));
    }
}
