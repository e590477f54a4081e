//! Scraping with curl, the way Prometheus scrapes, and reading the text
//! exposition format.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::{output, percentile, round};

/// One HTTP fetch: seconds to the last byte, and bytes on the wire.
#[derive(Clone, Copy, Debug)]
pub struct Fetch {
    pub secs: f64,
    pub bytes: u64,
}

/// What Prometheus 2.42 sends when it scrapes.
const PROMETHEUS_HEADERS: [&str; 4] = [
    "-H",
    "Accept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "-H",
    "Accept-Encoding: gzip",
];

/// An HTTP endpoint scraped with curl the way Prometheus does (HTTP/1.1,
/// gzip accepted, connection kept across a burst).
pub struct Endpoint {
    pub url: String,
    /// Extra curl arguments (client certificates).
    pub tls: Vec<String>,
}

impl Endpoint {
    pub fn plain(url: String) -> Self {
        Self { url, tls: vec![] }
    }

    fn curl(&self) -> Command {
        let mut c = Command::new("curl");
        c.args(["-sS", "--fail", "--http1.1", "--max-time", "60"])
            .args(PROMETHEUS_HEADERS)
            .args(&self.tls)
            .args(["-w", "%{time_total} %{size_download}\\n"]);
        c
    }

    /// One scrape; returns its timing and the decoded body.
    pub fn fetch(&self) -> Result<(Fetch, String)> {
        let mut c = self.curl();
        c.arg("--compressed").arg("-o").arg("-").arg(&self.url);
        let out = c.stdin(Stdio::null()).output().context("curl")?;
        if !out.status.success() {
            bail!(
                "scraping {}: {}",
                self.url,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // The -w line comes last.
        let body_end = text.trim_end_matches('\n').rfind('\n').map_or(0, |i| i + 1);
        let fetch = parse_fetch(&text[body_end..])?;
        Ok((fetch, text[..body_end].to_owned()))
    }

    /// `n` scrapes back to back on one connection; the body is discarded.
    pub fn burst(&self, n: usize) -> Result<Vec<Fetch>> {
        let mut c = self.curl();
        for _ in 0..n {
            c.arg("-o").arg("/dev/null").arg(&self.url);
        }
        let text = output(&mut c)?;
        let v: Vec<Fetch> = text.lines().map(parse_fetch).collect::<Result<_>>()?;
        if v.len() != n {
            bail!("curl reported {} of {n} scrapes", v.len());
        }
        Ok(v)
    }
}

fn parse_fetch(line: &str) -> Result<Fetch> {
    let mut it = line.split_whitespace();
    let secs = it.next().context("curl -w output")?.parse()?;
    let bytes = it.next().context("curl -w output")?.parse()?;
    Ok(Fetch { secs, bytes })
}

/// Latency and size figures of a burst.
pub fn burst_summary(v: &[Fetch]) -> Value {
    let ms: Vec<f64> = v.iter().map(|f| f.secs * 1e3).collect();
    json!({
        "scrapes": v.len(),
        "p50_ms": round(percentile(&ms, 50.0), 2),
        "p99_ms": round(percentile(&ms, 99.0), 2),
        "max_ms": round(percentile(&ms, 100.0), 2),
        "wire_bytes": v.last().map_or(0, |f| f.bytes),
    })
}

/// One sample of the Prometheus text format.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
    /// Milliseconds, where the exposer gives one (cAdvisor does).
    pub ts_ms: Option<f64>,
}

impl Sample {
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the text exposition format (comments skipped).
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, mut rest, labels) = match line.find(['{', ' ']) {
        Some(i) if line.as_bytes()[i] == b'{' => {
            let mut labels = Vec::new();
            let mut s = &line[i + 1..];
            loop {
                s = s.trim_start_matches([',', ' ']);
                if let Some(r) = s.strip_prefix('}') {
                    s = r;
                    break;
                }
                let (k, r) = s.split_once('=')?;
                let r = r.strip_prefix('"')?;
                let mut v = String::new();
                let mut chars = r.char_indices();
                let end = loop {
                    match chars.next()? {
                        (_, '\\') => match chars.next()?.1 {
                            'n' => v.push('\n'),
                            c => v.push(c),
                        },
                        (j, '"') => break j,
                        (_, c) => v.push(c),
                    }
                };
                labels.push((k.trim().to_owned(), v));
                s = &r[end + 1..];
            }
            (&line[..i], s, labels)
        }
        Some(i) => (&line[..i], &line[i..], Vec::new()),
        None => return None,
    };
    rest = rest.trim();
    let mut it = rest.split_whitespace();
    let value = it.next()?.parse().ok()?;
    let ts_ms = it.next().and_then(|t| t.parse().ok());
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
        ts_ms,
    })
}
