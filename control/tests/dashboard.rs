//! The Grafana dashboard in `packaging/grafana/wraithgate.json` against a real node's
//! `/metrics`: every query parses as PromQL, names only metrics the node exports, filters
//! and groups only by labels those metrics carry (or `instance`, which Prometheus adds),
//! and every legend names a label its query keeps.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use promql_parser::parser::{self, Expr, LabelModifier};
use serde_json::Value;
use wraithgate_control::config::{Config, ControlSection};
use wraithgate_control::node::Node;
use wraithgate_relay::io::DataPlaneConfig;
use wraithgate_relay::table::ExitTable;

/// Labels Prometheus attaches to every scraped series.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

fn dashboard() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../packaging/grafana/wraithgate.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every series name of a real node's exposition, with the label names it carries.
fn exported() -> BTreeMap<String, BTreeSet<String>> {
    let dir = std::env::temp_dir().join(format!(
        "wg-dashboard-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = Config {
        data_plane: DataPlaneConfig {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            workers: 1,
            pin_workers: false,
            ..DataPlaneConfig::default()
        },
        // One exit, so that the per-exit families have series.
        table: ExitTable::new(
            1,
            vec![wraithgate_relay::ExitSpec {
                name: "exit-1".into(),
                public_key: wraithgate_relay::PublicKey([7; 32]),
                endpoint: "127.0.0.1:51999".parse().unwrap(),
                listen_port: None,
            }],
        )
        .unwrap(),
        control: ControlSection {
            api_listen: Some("127.0.0.1:0".parse().unwrap()),
            state_dir: dir.clone(),
            ..ControlSection::default()
        },
        log: Default::default(),
    };
    let node = Node::start(config).unwrap();
    let url = format!("http://{}/metrics", node.api_addr().unwrap());
    let token = std::fs::read_to_string(dir.join("api.token")).unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let body = agent
        .get(&url)
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
    let mut series: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = series.entry(line[..end].to_string()).or_default();
        if let Some(rest) = line[end..].strip_prefix('{') {
            let inner = &rest[..rest.find('}').expect("closed label set")];
            for pair in inner.split(',') {
                labels.insert(pair.split('=').next().unwrap().to_string());
            }
        }
    }
    assert!(
        series.len() > 10,
        "an exposition of {} series",
        series.len()
    );
    series
}

/// What a query reads and keeps.
#[derive(Debug, Default)]
struct Uses {
    /// (metric, labels it filters on).
    selectors: Vec<(String, Vec<String>)>,
    /// Labels named in `by (…)` / `without (…)`.
    grouped_by: Vec<String>,
    /// Labels the outermost aggregation keeps, if the query aggregates at the top.
    kept: Option<Vec<String>>,
}

fn walk(e: &Expr, uses: &mut Uses) {
    match e {
        Expr::Aggregate(a) => {
            if let Some(m) = &a.modifier {
                let labels = match m {
                    LabelModifier::Include(l) | LabelModifier::Exclude(l) => &l.labels,
                };
                uses.grouped_by.extend(labels.iter().cloned());
            }
            walk(&a.expr, uses);
            if let Some(p) = &a.param {
                walk(p, uses);
            }
        }
        Expr::Unary(u) => walk(&u.expr, uses),
        Expr::Binary(b) => {
            walk(&b.lhs, uses);
            walk(&b.rhs, uses);
        }
        Expr::Paren(p) => walk(&p.expr, uses),
        Expr::Subquery(s) => walk(&s.expr, uses),
        Expr::VectorSelector(v) => uses.selectors.push((
            v.name.clone().expect("every selector names its metric"),
            v.matchers.matchers.iter().map(|m| m.name.clone()).collect(),
        )),
        Expr::MatrixSelector(m) => walk(&Expr::VectorSelector(m.vs.clone()), uses),
        Expr::Call(c) => c.args.args.iter().for_each(|a| walk(a, uses)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// The labels a query's result keeps at the top: a `by (…)` aggregation's, looking through
/// arithmetic with numbers and `histogram_quantile`.
fn kept(e: &Expr) -> Option<Vec<String>> {
    match e {
        Expr::Aggregate(a) => match &a.modifier {
            Some(LabelModifier::Include(l)) => Some(l.labels.clone()),
            _ => None,
        },
        Expr::Binary(b) => kept(&b.lhs).or_else(|| kept(&b.rhs)),
        Expr::Paren(p) => kept(&p.expr),
        Expr::Call(c) if c.func.name == "histogram_quantile" => {
            kept(c.args.args.last()?).map(|l| l.into_iter().filter(|x| x != "le").collect())
        }
        _ => None,
    }
}

#[test]
fn every_dashboard_query_reads_what_the_node_exports() {
    let dash = dashboard();
    let series = exported();
    let panels = dash["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let mut checked = 0;
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            // Grafana's own variables, as Grafana would substitute them.
            let promql = expr.replace("$__rate_interval", "5m");
            let ast = parser::parse(&promql)
                .unwrap_or_else(|e| panic!("panel {title:?}: {expr:?} is not PromQL: {e}"));
            let mut uses = Uses::default();
            walk(&ast, &mut uses);
            uses.kept = kept(&ast);
            assert!(!uses.selectors.is_empty(), "{expr:?} reads no metric");
            let mut available: BTreeSet<String> =
                TARGET_LABELS.iter().map(|s| s.to_string()).collect();
            for (metric, filters) in &uses.selectors {
                let labels = series.get(metric).unwrap_or_else(|| {
                    panic!("panel {title:?}: {metric} is not exported (query {expr:?})")
                });
                for f in filters {
                    assert!(
                        labels.contains(f) || TARGET_LABELS.contains(&f.as_str()),
                        "panel {title:?}: {metric} has no label {f:?}"
                    );
                }
                available.extend(labels.iter().cloned());
            }
            for g in &uses.grouped_by {
                assert!(
                    available.contains(g),
                    "panel {title:?}: groups by {g:?}, which {:?} do not carry",
                    uses.selectors
                );
            }
            let legend = t["legendFormat"].as_str().unwrap_or("");
            for part in legend.split("{{").skip(1) {
                let label = part.split("}}").next().unwrap().trim();
                let kept = uses.kept.as_ref().unwrap_or_else(|| {
                    panic!("panel {title:?}: legend {legend:?} on a query that keeps no labels")
                });
                assert!(
                    kept.iter().any(|k| k == label),
                    "panel {title:?}: legend names {label:?}, the query keeps {kept:?}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} queries");
}

/// A query naming a metric the node does not export is caught (the check above can fail).
#[test]
fn a_query_on_a_metric_that_does_not_exist_is_caught() {
    let series = exported();
    let mut uses = Uses::default();
    let ast = parser::parse("sum by (instance) (rate(wraithgate_no_such_total[5m]))").unwrap();
    walk(&ast, &mut uses);
    assert_eq!(uses.selectors[0].0, "wraithgate_no_such_total");
    assert!(!series.contains_key(&uses.selectors[0].0));
    assert!(series.contains_key("wraithgate_drops_total"));
    assert!(series["wraithgate_drops_total"].contains("reason"));
}
