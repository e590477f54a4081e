//! The soak's results: what `bench/results/<time>-soak.json` holds (schema
//! [`SCHEMA_VERSION`]; version 1 files, written before the field existed,
//! read the same) and what its section of `bench/RESULTS.md` is rendered
//! from.

use serde::{Deserialize, Serialize};

use crate::schema::version_1;
pub use crate::schema::{Outcome, SCHEMA_VERSION};

/// One run of `cargo xtask soak`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SoakResults {
    #[serde(default = "version_1")]
    pub schema_version: u32,
    /// UTC, `2026-12-04T152829Z`.
    pub started: String,
    /// `podmeter --version` and the commit.
    pub podmeter: String,
    pub cpus: u64,
    pub kernel: String,
    pub options: SoakOptions,
    pub soak: Soak,
}

/// The run's options (`cargo xtask soak --help`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SoakOptions {
    pub duration_secs: f64,
    pub scrapers: u64,
    pub rate_per_sec: u64,
    pub cgroup_lifetime_secs: f64,
    pub grace_period_secs: f64,
    pub refresh_interval_secs: f64,
    pub scrape_timeout_secs: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Soak {
    pub secs: f64,
    pub churn: Churn,
    pub scrapes: Scrapes,
    /// The agent's gauges before the churn.
    pub baseline: Outcome<Gauges>,
    pub settle: Settle,
    /// Before the SIGKILL and after the restart.
    pub lives: Vec<Life>,
    /// None when the soak stopped before halfway.
    pub sigkill: Option<Sigkill>,
    pub end: End,
    /// Every few seconds: the agent's RSS, descriptors and gauges.
    pub samples: Vec<AgentSample>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Churn {
    pub cgroups_created: u64,
    pub cgroups_removed: u64,
    pub achieved_rate_per_sec: f64,
    pub worst_lag_ms: u64,
    pub ended_at_secs: f64,
    pub created_before_kill: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Scrapes {
    pub total: u64,
    pub ok: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub cut_by_sigkill: u64,
    /// The first few distinct error messages.
    pub error_kinds: Vec<String>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub per_agent: Vec<AgentScrapes>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct AgentScrapes {
    pub scrapes: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub first_error_at_secs: Option<f64>,
    pub last_ok_at_secs: Option<f64>,
}

/// The agent's own gauges and counters the soak follows (None where the
/// agent did not expose the series).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Gauges {
    pub live: Option<f64>,
    pub departed: Option<f64>,
    pub unresolved: Option<f64>,
    pub map_cpu: Option<f64>,
    pub map_net: Option<f64>,
    pub mkdir: Option<f64>,
    pub rmdir: Option<f64>,
    pub scan: Option<f64>,
    pub dropped_cpu: Option<f64>,
    pub dropped_net: Option<f64>,
    /// The cgroups with CPU series (host cgroup paths, `pod_uid/container`
    /// for pod cgroups), so a count that does not settle names the extra
    /// one. Absent from runs before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroups: Option<Vec<String>>,
}

/// After the churn: when the agent came back to its baseline, and where it
/// ended.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Settle {
    pub settled_after_churn_secs: Option<f64>,
    /// The last answered sample's gauges.
    pub end: Option<Gauges>,
    pub end_at_secs: Option<f64>,
}

/// One agent lifetime.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Life {
    pub tag: String,
    pub started_at_secs: f64,
    pub ended_at_secs: f64,
    pub warm_up_secs: f64,
    pub rss_mib: Growth,
    pub fds: Growth,
    /// Its last answered sample's gauges, when, and how many cgroups the
    /// soak had made by then.
    pub last_metrics: Option<Gauges>,
    pub last_metrics_at_secs: Option<f64>,
    pub cgroups_made_by_last_metrics: Option<u64>,
    pub lost_event_log_lines: u64,
    pub lost_events_logged: u64,
    pub warn_log_lines: u64,
}

/// Medians of the first and the last minute after the warm-up.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Growth {
    pub after_warm_up: Option<f64>,
    pub end: Option<f64>,
    pub growth: Option<f64>,
    pub max: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Sigkill {
    pub at_secs: f64,
    pub exited: bool,
    pub programs: u64,
    pub programs_left: Vec<u64>,
    pub programs_gone_after_secs: Option<f64>,
    pub restart_secs: f64,
    /// The killed agent's log.
    pub log: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct End {
    /// Why the soak stopped early.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub sigterm: Sigterm,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Sigterm {
    pub exited_within_10s: bool,
    pub secs: f64,
    pub programs_left: Vec<u64>,
}

/// The agent at one moment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct AgentSample {
    pub at_secs: f64,
    /// 0 before the SIGKILL, 1 after.
    pub agent: u64,
    pub cgroups_made: u64,
    pub rss_mib: Option<f64>,
    pub fds: Option<u64>,
    /// Its gauges, or why the scrape failed.
    pub metrics: Outcome<Gauges>,
}
