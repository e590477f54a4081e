//! Grafana dashboard JSON as the tests see it: every panel query, and the
//! query as Grafana would send it to Prometheus once variables are chosen.

use serde_json::Value;

/// `(panel title, expr)` of every target of every panel, rows included.
pub fn exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    collect(&dashboard["panels"], &mut out);
    out
}

fn collect(panels: &Value, out: &mut Vec<(String, String)>) {
    for p in panels.as_array().into_iter().flatten() {
        let title = p["title"].as_str().unwrap_or("").to_owned();
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((title.clone(), e.to_owned()));
            }
        }
        // Collapsed rows keep their panels inside.
        collect(&p["panels"], out);
    }
}

/// `expr` with Grafana's built-in and template variables replaced the way
/// Grafana does for "All" selections: each `$var`/`${var}` in `all` becomes
/// `.*` (the dashboards use `=~` matchers), `$__rate_interval` becomes
/// `rate_interval`, `$__interval` `interval`, `$__range` 1h.
pub fn substitute(expr: &str, vars: &[&str], rate_interval: &str, interval: &str) -> String {
    let mut e = expr
        .replace("${__rate_interval}", rate_interval)
        .replace("$__rate_interval", rate_interval)
        .replace("${__interval}", interval)
        .replace("$__interval", interval)
        .replace("${__range}", "1h")
        .replace("$__range", "1h");
    // Longest names first so `$pod` does not eat part of `$pod_uid`.
    let mut vars = vars.to_vec();
    vars.sort_by_key(|v| std::cmp::Reverse(v.len()));
    for v in vars {
        e = e
            .replace(&format!("${{{v}:regex}}"), ".*")
            .replace(&format!("${{{v}:pipe}}"), ".*")
            .replace(&format!("${{{v}}}"), ".*")
            .replace(&format!("${v}"), ".*");
    }
    e
}
