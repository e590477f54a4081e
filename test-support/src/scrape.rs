//! Reading `/metrics`: the Prometheus text format, parsed by
//! prometheus-parse (the one exposition parser of the tests and the
//! benchmarks).

use std::{
    collections::HashMap,
    thread::sleep,
    time::{Duration, Instant},
};

/// One sample: a series and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name; a histogram's buckets are `<name>_bucket` with `le`, a
    /// summary's quantiles `<name>` with `quantile`, as on the wire.
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
    /// Milliseconds since the epoch, where the exposer gives one (cAdvisor
    /// does).
    pub ts_ms: Option<f64>,
}

impl Sample {
    /// The value of label `k`.
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the text exposition format; an error for text that is not.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    // A sample without a timestamp gets this one: the epoch means none.
    let none = chrono::DateTime::from_timestamp(0, 0).expect("the epoch");
    let scrape = prometheus_parse::Scrape::parse_at(lines, none)
        .map_err(|e| format!("not the Prometheus text format: {e}"))?;
    let mut out = Vec::with_capacity(scrape.samples.len());
    for s in scrape.samples {
        let mut labels: Vec<(String, String)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), unescape(v)))
            .collect();
        labels.sort();
        let ts_ms = (s.timestamp != none).then(|| s.timestamp.timestamp_millis() as f64);
        let one = |name: String, labels: Vec<(String, String)>, value: f64| Sample {
            name,
            labels,
            value,
            ts_ms,
        };
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => out.push(one(s.metric, labels, v)),
            prometheus_parse::Value::Histogram(buckets) => {
                for b in buckets {
                    let mut l = labels.clone();
                    l.push(("le".into(), format_bound(b.less_than)));
                    out.push(one(format!("{}_bucket", s.metric), l, b.count));
                }
            }
            prometheus_parse::Value::Summary(quantiles) => {
                for q in quantiles {
                    let mut l = labels.clone();
                    l.push(("quantile".into(), q.quantile.to_string()));
                    out.push(one(s.metric.clone(), l, q.count));
                }
            }
        }
    }
    Ok(out)
}

/// A label value as written (`\\`, `\"` and `\n` escaped) back to the
/// value: prometheus-parse leaves the escapes in, and cgroup paths carry
/// backslashes (`\x2d` in systemd unit names).
fn unescape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(e) => out.push(e),
            None => out.push('\\'),
        }
    }
    out
}

fn format_bound(le: f64) -> String {
    if le == f64::INFINITY {
        "+Inf".into()
    } else {
        le.to_string()
    }
}

/// Calls `scrape` until `ok` holds for what it returns, or panics after
/// `timeout` showing the last scrape.
pub fn poll_scrape(
    timeout: Duration,
    what: &str,
    scrape: impl Fn() -> Scrape,
    ok: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = Instant::now() + timeout;
    loop {
        let s = scrape();
        if ok(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last scrape:\n{}",
            s.text
        );
        sleep(Duration::from_millis(250));
    }
}

/// A parsed `/metrics` body.
pub struct Scrape {
    /// The raw text.
    pub text: String,
    /// Its samples.
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses the Prometheus text format; panics on anything else.
    pub fn parse(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            samples: parse(text).unwrap_or_else(|e| panic!("{e}:\n{text}")),
        }
    }

    /// Every sample of `metric` whose labels include all of `labels`.
    pub fn find(
        &self,
        metric: &str,
        labels: &[(&str, &str)],
    ) -> Vec<(HashMap<String, String>, f64)> {
        self.samples
            .iter()
            .filter(|s| s.name == metric)
            .filter(|s| labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
            .map(|s| (s.labels.iter().cloned().collect(), s.value))
            .collect()
    }

    /// The single value of `metric` with `labels`, if present.
    pub fn value(&self, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found = self.find(metric, labels);
        assert!(
            found.len() <= 1,
            "{metric}{labels:?} matches {} series",
            found.len()
        );
        found.first().map(|(_, v)| *v)
    }

    /// The value of a host cgroup's metric.
    pub fn cgroup(&self, metric: &str, path: &str) -> Option<f64> {
        self.value(&format!("podmeter_cgroup_{metric}"), &[("cgroup", path)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_labels_timestamps_and_buckets() {
        let text = "\
# TYPE a counter
a{x=\"1\",y=\"q\\\"uote\",z=\"a\\\\x2db\"} 3 1700000000123
b 2.5
# TYPE h histogram
h_bucket{le=\"0.1\"} 1
h_bucket{le=\"+Inf\"} 4
h_sum 0.7
h_count 4
";
        let s = parse(text).unwrap();
        let a = s.iter().find(|s| s.name == "a").unwrap();
        assert_eq!(a.value, 3.0);
        assert_eq!(a.label("x"), Some("1"));
        assert_eq!(a.label("y"), Some("q\"uote"));
        assert_eq!(a.label("z"), Some("a\\x2db"));
        assert_eq!(a.ts_ms, Some(1_700_000_000_123.0));
        let b = s.iter().find(|s| s.name == "b").unwrap();
        assert_eq!((b.value, b.ts_ms), (2.5, None));
        let inf = s
            .iter()
            .find(|s| s.name == "h_bucket" && s.label("le") == Some("+Inf"))
            .unwrap();
        assert_eq!(inf.value, 4.0);
        assert!(s.iter().any(|s| s.name == "h_count" && s.value == 4.0));
    }
}
