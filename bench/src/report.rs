//! Turning measurements into the comparison: medians over runs, the markdown table, the
//! JSON document and the SVG chart.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;
use serde::Serialize;

use crate::load::Measurement;

/// Latency quantiles kept per result (and drawn in the chart).
pub const QUANTILES: [(f64, &str); 5] = [
    (0.5, "p50"),
    (0.9, "p90"),
    (0.99, "p99"),
    (0.999, "p99.9"),
    (1.0, "max"),
];

/// One contender's figures in one scenario (one run, or the median of several).
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub gbps: f64,
    pub mpps: f64,
    pub loss_percent: f64,
    pub jitter_ms: f64,
    /// Latency at each of [`QUANTILES`], in microseconds.
    pub latency_us: [f64; QUANTILES.len()],
    pub cpu_s_per_gb: f64,
    /// Datagrams that arrived after a later one of their flow; NaN where the run cannot
    /// tell (iperf3 end to end).
    pub reordered: f64,
    pub flows_established: f64,
}

impl Figures {
    /// Figures of one run; `contender_cpu_ns` is the contender's process tree over the window.
    pub fn from_run(m: &Measurement, contender_cpu_ns: u64) -> Self {
        let gb = m.received_bytes as f64 / 1e9;
        let cpu_s = (m.load_cpu_ns + contender_cpu_ns) as f64 / 1e9;
        let mut latency_us = [0.0; QUANTILES.len()];
        for (slot, (q, _)) in latency_us.iter_mut().zip(QUANTILES) {
            *slot = m.latency.quantile(q) as f64 / 1e3;
        }
        Figures {
            gbps: m.gbps(),
            mpps: m.mpps(),
            loss_percent: m.loss_percent(),
            jitter_ms: m.jitter_ns / 1e6,
            latency_us,
            cpu_s_per_gb: if gb > 0.0 { cpu_s / gb } else { f64::NAN },
            reordered: m.reordered as f64,
            flows_established: m.flows_established as f64,
        }
    }

    pub fn p99_us(&self) -> f64 {
        self.latency_us[2]
    }

    /// The median of each figure independently over `runs`.
    pub fn median(runs: &[Figures]) -> Figures {
        let med = |f: &dyn Fn(&Figures) -> f64| median(runs.iter().map(f).collect());
        let mut latency_us = [0.0; QUANTILES.len()];
        for (i, slot) in latency_us.iter_mut().enumerate() {
            *slot = med(&|r| r.latency_us[i]);
        }
        Figures {
            gbps: med(&|r| r.gbps),
            mpps: med(&|r| r.mpps),
            loss_percent: med(&|r| r.loss_percent),
            jitter_ms: med(&|r| r.jitter_ms),
            latency_us,
            cpu_s_per_gb: med(&|r| r.cpu_s_per_gb),
            reordered: med(&|r| r.reordered),
            flows_established: med(&|r| r.flows_established),
        }
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The cells of contenders named in `fatal` that have no figures (failed, skipped, or no
/// run completed), one line each: what makes a run fail after its table is printed.
pub fn missing_cells(results: &[ScenarioResult], fatal: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for s in results {
        for c in s.contenders.iter().filter(|c| fatal.contains(&c.name)) {
            let why = match &c.outcome {
                Outcome::Measured { runs } if !runs.is_empty() => continue,
                Outcome::Measured { .. } => "no run completed".to_owned(),
                Outcome::Skipped(why) => format!("skipped: {why}"),
                Outcome::Failed(why) => format!("failed: {why}"),
            };
            out.push(format!("{} {}: {why}", s.name, c.name));
        }
    }
    out
}

/// A contender's outcome in one scenario.
#[derive(Debug, Clone)]
pub enum Outcome {
    Measured { runs: Vec<Figures> },
    Skipped(String),
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct ContenderResult {
    pub name: String,
    pub outcome: Outcome,
}

impl ContenderResult {
    pub fn figures(&self) -> Option<Figures> {
        match &self.outcome {
            Outcome::Measured { runs } if !runs.is_empty() => Some(Figures::median(runs)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ScenarioResult {
    /// `topology/scenario`, e.g. `netns/1flow-1420B-unpaced`.
    pub name: String,
    pub paced: bool,
    /// The contender the ratio column compares with (`nftables`, or `direct` end to end).
    pub reference: String,
    pub contenders: Vec<ContenderResult>,
}

impl ScenarioResult {
    /// The median figures of contender `name`, if it was measured.
    pub fn figures_of(&self, name: &str) -> Option<Figures> {
        self.contenders
            .iter()
            .find(|c| c.name == name)
            .and_then(ContenderResult::figures)
    }
}

/// The `--json` document: the shape the benchmark issue specifies, plus `reordered`. A
/// figure a run could not produce (CPU per GB of nothing received, say) is `null`, never
/// a number that reads as measured.
#[derive(Debug, Serialize)]
pub struct JsonReport {
    pub scenarios: Vec<JsonScenario>,
}

#[derive(Debug, Serialize)]
pub struct JsonScenario {
    pub name: String,
    pub contenders: Vec<JsonContender>,
}

#[derive(Debug, Serialize)]
pub struct JsonContender {
    pub name: String,
    pub gbps: Option<f64>,
    pub mpps: Option<f64>,
    pub loss_percent: Option<f64>,
    pub jitter_ms: Option<f64>,
    pub p99_us: Option<f64>,
    pub cpu_s_per_gb: Option<f64>,
    pub reordered: Option<f64>,
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

pub fn json(results: &[ScenarioResult]) -> JsonReport {
    JsonReport {
        scenarios: results
            .iter()
            .map(|s| JsonScenario {
                name: s.name.clone(),
                contenders: s
                    .contenders
                    .iter()
                    .filter_map(|c| {
                        let f = c.figures()?;
                        Some(JsonContender {
                            name: c.name.clone(),
                            gbps: finite(f.gbps),
                            mpps: finite(f.mpps),
                            loss_percent: finite(f.loss_percent),
                            jitter_ms: finite(f.jitter_ms),
                            p99_us: finite(f.p99_us()),
                            cpu_s_per_gb: finite(f.cpu_s_per_gb),
                            reordered: finite(f.reordered),
                        })
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The markdown tables, one per scenario. The ratio column is throughput against
/// nftables for unpaced scenarios and p99 latency against nftables (lower is better) for
/// paced ones.
pub fn markdown(results: &[ScenarioResult]) -> String {
    let mut out = String::new();
    for s in results {
        let reference = s.figures_of(&s.reference);
        let ratio_title = if s.paced {
            format!("p99 ÷ {}", s.reference)
        } else {
            format!("× {}", s.reference)
        };
        let _ = writeln!(out, "\n### {}\n", s.name);
        let _ = writeln!(
            out,
            "| contender | Gb/s | Mpps | loss % | reordered | jitter ms | p50 µs | p99 µs | p99.9 µs | CPU s/GB | {ratio_title} | runs |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for c in &s.contenders {
            let f = match (&c.outcome, c.figures()) {
                (Outcome::Skipped(why), _) => {
                    let _ = writeln!(out, "| {} | skipped: {why} |||||||||||", c.name);
                    continue;
                }
                (Outcome::Failed(why), _) => {
                    let why = why.replace('|', "/");
                    let _ = writeln!(out, "| {} | failed: {why} |||||||||||", c.name);
                    continue;
                }
                (Outcome::Measured { .. }, None) => {
                    let _ = writeln!(out, "| {} | failed: no run completed |||||||||||", c.name);
                    continue;
                }
                (Outcome::Measured { runs }, Some(f)) => (f, runs.len()),
            };
            let (f, runs) = f;
            let ratio = match &reference {
                Some(r) if s.paced && r.p99_us() > 0.0 => format!("{:.2}", f.p99_us() / r.p99_us()),
                Some(r) if !s.paced && r.gbps > 0.0 => format!("{:.2}", f.gbps / r.gbps),
                _ => "–".into(),
            };
            let _ = writeln!(
                out,
                "| {} | {:.3} | {:.3} | {:.3} | {} | {:.4} | {:.0} | {:.0} | {:.0} | {:.2} | {} | {} |",
                c.name,
                f.gbps,
                f.mpps,
                f.loss_percent,
                count(f.reordered),
                f.jitter_ms,
                f.latency_us[0],
                f.latency_us[2],
                f.latency_us[3],
                f.cpu_s_per_gb,
                ratio,
                runs
            );
        }
        if let (true, Some(direct)) = (s.paced, s.figures_of("direct")) {
            let added: Vec<String> = s
                .contenders
                .iter()
                .filter(|c| c.name != "direct")
                .filter_map(|c| {
                    let f = c.figures()?;
                    Some(format!(
                        "{} {:+.0} µs",
                        c.name,
                        f.p99_us() - direct.p99_us()
                    ))
                })
                .collect();
            if !added.is_empty() {
                let _ = writeln!(
                    out,
                    "\np99 added to the direct path's ({:.0} µs): {}.",
                    direct.p99_us(),
                    added.join(", ")
                );
            }
        }
    }
    out
}

/// A count for the table (a median of counts may end in .5), or "–" where not measured.
pub fn count(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "–".into()
    }
}

/// An SVG with one row per scenario: throughput bars on the left, latency quantiles
/// (log scale) per contender on the right.
pub fn svg(results: &[ScenarioResult], path: &Path) -> Result<()> {
    let rows = results.len().max(1);
    let root = SVGBackend::new(path, (1200, 300 * rows as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((rows, 2));
    // One colour per contender across every row.
    let mut order: Vec<String> = Vec::new();
    for c in results.iter().flat_map(|s| &s.contenders) {
        if !order.contains(&c.name) {
            order.push(c.name.clone());
        }
    }
    let colour = |name: &str| Palette99::pick(order.iter().position(|n| n == name).unwrap_or(0));
    for (i, s) in results.iter().enumerate() {
        let measured: Vec<(String, Figures)> = s
            .contenders
            .iter()
            .filter_map(|c| Some((c.name.clone(), c.figures()?)))
            .collect();
        let names: Vec<String> = measured.iter().map(|(n, _)| n.clone()).collect();
        let n = measured.len().max(1);
        let max_gbps = measured
            .iter()
            .map(|(_, f)| f.gbps)
            .fold(0.0f64, f64::max)
            .max(0.001)
            * 1.15;
        {
            let mut chart = ChartBuilder::on(&panels[2 * i])
                .caption(format!("{} — throughput", s.name), ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(55)
                .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..max_gbps)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(n)
                .x_label_formatter(&|x| {
                    let k = x.round();
                    if (x - k).abs() < 0.01 && k >= 0.0 {
                        names.get(k as usize).cloned().unwrap_or_default()
                    } else {
                        String::new()
                    }
                })
                .y_desc("Gb/s")
                .draw()?;
            chart.draw_series(measured.iter().enumerate().map(|(k, (name, f))| {
                let color = colour(name).filled();
                Rectangle::new([(k as f64 - 0.35, 0.0), (k as f64 + 0.35, f.gbps)], color)
            }))?;
        }
        let has_latency = measured
            .iter()
            .any(|(_, f)| f.latency_us.iter().any(|&v| v > 0.0));
        if !has_latency {
            panels[2 * i + 1].titled(
                &format!(
                    "{} — no one-way latency (iperf3 reports jitter only)",
                    s.name
                ),
                ("sans-serif", 16),
            )?;
        } else {
            let max_us = measured
                .iter()
                .flat_map(|(_, f)| f.latency_us)
                .fold(1.0f64, f64::max)
                * 2.0;
            let mut chart = ChartBuilder::on(&panels[2 * i + 1])
                .caption(format!("{} — one-way latency", s.name), ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(55)
                .build_cartesian_2d(
                    -0.2f64..(QUANTILES.len() as f64 - 0.8),
                    (0.5f64..max_us).log_scale(),
                )?;
            chart
                .configure_mesh()
                .x_labels(QUANTILES.len())
                .x_label_formatter(&|x| {
                    let k = x.round();
                    if (x - k).abs() < 0.01 && k >= 0.0 {
                        QUANTILES
                            .get(k as usize)
                            .map(|q| q.1.to_string())
                            .unwrap_or_default()
                    } else {
                        String::new()
                    }
                })
                .y_desc("µs")
                .draw()?;
            for (name, f) in &measured {
                let color = colour(name);
                chart
                    .draw_series(LineSeries::new(
                        f.latency_us
                            .iter()
                            .enumerate()
                            .map(|(j, &v)| (j as f64, v.max(0.5))),
                        color.stroke_width(2),
                    ))?
                    .label(name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 15, y)], color.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerRight)
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig(gbps: f64) -> Figures {
        Figures {
            gbps,
            mpps: gbps / 10.0,
            latency_us: [10.0, 20.0, 30.0, 40.0, 50.0],
            cpu_s_per_gb: 1.0,
            ..Figures::default()
        }
    }

    fn sample() -> Vec<ScenarioResult> {
        vec![ScenarioResult {
            name: "loopback/1flow-1420B-unpaced".into(),
            paced: false,
            reference: "nftables".into(),
            contenders: vec![
                ContenderResult {
                    name: "nftables".into(),
                    outcome: Outcome::Measured {
                        runs: vec![fig(2.0), fig(4.0), fig(3.0)],
                    },
                },
                ContenderResult {
                    name: "socat".into(),
                    outcome: Outcome::Measured {
                        runs: vec![fig(1.5)],
                    },
                },
                ContenderResult {
                    name: "nginx".into(),
                    outcome: Outcome::Skipped("not installed".into()),
                },
            ],
        }]
    }

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        let md = markdown(&sample());
        assert!(md.contains("| nftables | 3.000 |"), "{md}");
        assert!(md.contains("× nftables"), "{md}");
        assert!(md.contains("| 0.50 |"), "socat is half of nftables: {md}");
        assert!(md.contains("skipped: not installed"));
    }

    #[test]
    fn paced_scenarios_say_what_each_relay_adds_to_the_direct_path() {
        let lat = |p99: f64| Figures {
            gbps: 1.0,
            latency_us: [5.0, 8.0, p99, p99 * 2.0, p99 * 3.0],
            ..Figures::default()
        };
        let measured = |name: &str, f: Figures| ContenderResult {
            name: name.into(),
            outcome: Outcome::Measured { runs: vec![f] },
        };
        let paced = ScenarioResult {
            name: "netns/1flow-1420B-paced-1G".into(),
            paced: true,
            reference: "nftables".into(),
            contenders: vec![
                measured("wraithgate-uring", lat(70.0)),
                measured("nftables", lat(140.0)),
                measured("direct", lat(40.0)),
            ],
        };
        let md = markdown(&[paced]);
        assert!(
            md.contains("p99 added to the direct path's (40 µs): wraithgate-uring +30 µs, nftables +100 µs."),
            "{md}"
        );
        // Unpaced scenarios have no such line, and neither has a run without `direct`.
        assert!(!markdown(&sample()).contains("added to the direct"));
    }

    #[test]
    fn json_has_the_issue_shape() {
        let v = serde_json::to_value(json(&sample())).unwrap();
        let c = &v["scenarios"][0]["contenders"][0];
        for key in [
            "name",
            "gbps",
            "mpps",
            "loss_percent",
            "jitter_ms",
            "p99_us",
            "cpu_s_per_gb",
        ] {
            assert!(c.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["scenarios"][0]["contenders"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn json_says_null_for_a_figure_a_run_could_not_produce() {
        let mut results = sample();
        results[0].contenders[1].outcome = Outcome::Measured {
            runs: vec![Figures {
                cpu_s_per_gb: f64::NAN,
                reordered: f64::NAN,
                ..fig(0.0)
            }],
        };
        let v = serde_json::to_value(json(&results)).unwrap();
        let socat = &v["scenarios"][0]["contenders"][1];
        assert_eq!(socat["name"], "socat");
        assert!(socat["cpu_s_per_gb"].is_null(), "{socat}");
        assert!(socat["reordered"].is_null(), "{socat}");
        assert_eq!(socat["gbps"], 0.0, "a measured zero stays a zero: {socat}");
        let text = serde_json::to_string(&json(&results)).unwrap();
        assert!(text.contains("\"cpu_s_per_gb\":null"), "{text}");
    }

    #[test]
    fn reordered_datagrams_are_a_column() {
        let mut results = sample();
        results[0].contenders[1].outcome = Outcome::Measured {
            runs: vec![Figures {
                loss_percent: 1.5,
                reordered: 17.0,
                ..fig(1.5)
            }],
        };
        let md = markdown(&results);
        assert!(md.contains("| loss % | reordered | jitter ms |"), "{md}");
        assert!(
            md.contains("| socat | 1.500 | 0.150 | 1.500 | 17 | 0.0000 |"),
            "{md}"
        );
        // Every row has as many cells as the header, skipped ones too.
        let cells = |l: &str| l.matches('|').count();
        let header = md.lines().find(|l| l.starts_with("| contender")).unwrap();
        for row in md.lines().filter(|l| l.starts_with("| ")) {
            assert_eq!(cells(row), cells(header), "{row}");
        }
        assert_eq!(count(f64::NAN), "–");
    }

    #[test]
    fn missing_cells_name_only_the_fatal_contenders() {
        let mut results = sample();
        results[0].contenders.push(ContenderResult {
            name: "wraithgate-uring".into(),
            outcome: Outcome::Failed("relay exited: status 1".into()),
        });
        results[0].contenders.push(ContenderResult {
            name: "wraithgate-portable".into(),
            outcome: Outcome::Measured {
                runs: vec![fig(3.0)],
            },
        });
        results[0].contenders.push(ContenderResult {
            name: "direct".into(),
            outcome: Outcome::Measured { runs: Vec::new() },
        });
        let fatal: Vec<String> = ["wraithgate-uring", "wraithgate-portable", "direct"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            missing_cells(&results, &fatal),
            [
                "loopback/1flow-1420B-unpaced wraithgate-uring: failed: relay exited: status 1",
                "loopback/1flow-1420B-unpaced direct: no run completed",
            ]
        );
        // nginx was skipped and socat measured: neither is fatal.
        assert!(missing_cells(&sample(), &fatal).is_empty());
        let nginx = ["nginx".to_owned()];
        assert_eq!(
            missing_cells(&sample(), &nginx),
            ["loopback/1flow-1420B-unpaced nginx: skipped: not installed"]
        );
    }

    #[test]
    fn svg_renders() {
        let path = std::env::temp_dir().join(format!("rb-test-{}.svg", std::process::id()));
        svg(&sample(), &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("<svg"));
        let _ = std::fs::remove_file(path);
    }
}
