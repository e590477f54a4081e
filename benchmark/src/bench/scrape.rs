//! Scraping with curl, the way Prometheus scrapes, and reading the text
//! exposition format.

use std::process::{Command, Stdio};

use super::{output, percentile, results::BurstSummary};
use crate::schema::rounded;
use anyhow::{Context as _, Result, bail};

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
        self.curl_asking(true)
    }

    /// curl with Prometheus' headers, without `Accept-Encoding` unless
    /// `gzip`.
    fn curl_asking(&self, gzip: bool) -> Command {
        let mut c = Command::new("curl");
        c.args(["-sS", "--fail", "--http1.1", "--max-time", "60"])
            .args(if gzip {
                &PROMETHEUS_HEADERS[..]
            } else {
                &PROMETHEUS_HEADERS[..2]
            })
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
        self.burst_asking(n, true)
    }

    /// [`Endpoint::burst`], gzip accepted or not.
    pub fn burst_asking(&self, n: usize, gzip: bool) -> Result<Vec<Fetch>> {
        let mut c = self.curl_asking(gzip);
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
pub fn burst_summary(v: &[Fetch]) -> BurstSummary {
    let ms: Vec<f64> = v.iter().map(|f| f.secs * 1e3).collect();
    BurstSummary {
        scrapes: v.len() as u64,
        p50_ms: rounded(percentile(&ms, 50.0), 2),
        p99_ms: rounded(percentile(&ms, 99.0), 2),
        max_ms: rounded(percentile(&ms, 100.0), 2),
        wire_bytes: v.last().map_or(0, |f| f.bytes),
    }
}

pub use podmeter_test_support::scrape::Sample;

/// Parses the text exposition format (the tests' parser).
pub fn parse_exposition(text: &str) -> Result<Vec<Sample>> {
    podmeter_test_support::scrape::parse(text).map_err(anyhow::Error::msg)
}
