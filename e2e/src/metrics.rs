//! What a Grafana dashboard queries and what a `/metrics` page exports, as metric names, so a
//! check can say the dashboard asks for nothing we do not serve (pure).
use std::collections::BTreeSet;

/// The `portslice_*` metric names in every target expression of a dashboard (rows' nested
/// panels included). Errors when the JSON is no dashboard: no panels, or a target without
/// an expression.
pub fn dashboard_metrics(dashboard: &str) -> Result<BTreeSet<String>, String> {
    let v: serde_json::Value =
        serde_json::from_str(dashboard).map_err(|e| format!("the dashboard is not JSON: {e}"))?;
    let panels = v["panels"]
        .as_array()
        .filter(|p| !p.is_empty())
        .ok_or("the dashboard has no panels")?;
    let mut names = BTreeSet::new();
    let mut stack: Vec<&serde_json::Value> = panels.iter().collect();
    while let Some(p) = stack.pop() {
        if let Some(nested) = p["panels"].as_array() {
            stack.extend(nested);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .ok_or_else(|| format!("panel {:?} has a target without expr", p["title"]))?;
            names.extend(metric_names(expr));
        }
    }
    Ok(names)
}

/// `portslice_*` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> impl Iterator<Item = String> + '_ {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("portslice_"))
        .map(str::to_string)
}

/// The sample names a Prometheus/OpenMetrics text page exports, from its `# TYPE` lines (so a
/// family with no series yet still counts): counters as `<name>_total`, histograms and
/// summaries as their `_bucket`/`_sum`/`_count` series, everything else by its name.
pub fn exported_metrics(page: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in page.lines() {
        let mut w = line.split_whitespace();
        if (w.next(), w.next()) != (Some("#"), Some("TYPE")) {
            continue;
        }
        let (Some(name), Some(kind)) = (w.next(), w.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                out.insert(format!("{}_total", name.trim_end_matches("_total")));
            }
            "histogram" | "summary" => {
                for s in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{s}"));
                }
            }
            _ => {
                out.insert(name.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dashboard_names_come_from_every_target_including_nested_rows() {
        let d = r#"{"panels":[
            {"title":"a","targets":[{"expr":"sum(rate(portslice_slice_rx_packets_total{node=~\"$node\"}[5m]))"}]},
            {"type":"row","panels":[{"title":"b","targets":[{"expr":"histogram_quantile(0.9, portslice_x_bucket) / portslice_y"}]}]}
        ]}"#;
        let names: Vec<_> = dashboard_metrics(d).unwrap().into_iter().collect();
        assert_eq!(
            names,
            [
                "portslice_slice_rx_packets_total",
                "portslice_x_bucket",
                "portslice_y"
            ]
        );
        assert!(dashboard_metrics("{}").is_err());
        assert!(dashboard_metrics(r#"{"panels":[{"targets":[{}]}]}"#).is_err());
    }

    #[test]
    fn exported_names_follow_the_type_lines() {
        let page = "# HELP portslice_allocations Ranges handed out.\n\
                    # TYPE portslice_allocations counter\n\
                    portslice_allocations_total 3\n\
                    # TYPE portslice_waiting counter\n\
                    # TYPE portslice_pool_used_ports gauge\n\
                    portslice_pool_used_ports 10\n\
                    # TYPE portslice_reconcile_duration_seconds histogram\n";
        let names = exported_metrics(page);
        for n in [
            "portslice_allocations_total",
            "portslice_waiting_total",
            "portslice_pool_used_ports",
            "portslice_reconcile_duration_seconds_bucket",
        ] {
            assert!(names.contains(n), "{n} in {names:?}");
        }
        assert!(!names.contains("portslice_allocations"));
    }
}
