//! CPU limits and CFS throttling per cgroup, read from cgroupfs.
//!
//! podmeter measures CPU *usage* in the kernel, but whether a container is
//! held back by its limit is only known to the scheduler's bandwidth
//! controller, which publishes it in the cgroup's own files:
//! * cgroup v2: `cpu.max` (`$QUOTA $PERIOD`, or `max $PERIOD` for no limit)
//!   and `nr_periods`, `nr_throttled`, `throttled_usec` in `cpu.stat`;
//! * cgroup v1: `cpu.cfs_quota_us` (−1 for no limit), `cpu.cfs_period_us`
//!   and `nr_periods`, `nr_throttled`, `throttled_time` (ns) in `cpu.stat`
//!   of the `cpu` controller's hierarchy, at the same relative path as the
//!   cgroup2 directory (the kubelet and runc create both).
//!
//! These are read at scrape time, not in the background refresh: they are
//! counters that alerts take `rate()`s of next to `cpu_usage_seconds_total`,
//! so they have to be as fresh as the kernel maps. That costs one read of
//! the limit and one of `cpu.stat` per cgroup (v1 keeps quota and period in
//! two files: a third read, only when a quota is set).
//!
//! In v2, `cpu.max` exists only where the cpu controller is enabled for the
//! cgroup (its parent's `cgroup.subtree_control`); without it `cpu.stat`
//! still exists but holds only usage, so `cpu.max` decides whether there is
//! anything to report. The root cgroup cannot be limited and is skipped in
//! both versions.

use std::path::Path;

use super::{
    Mounts,
    memory::{read_small, stat_value as value},
};

/// A cgroup's CFS bandwidth limit and throttling counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Bandwidth {
    /// Quota / period in cores; `None` when the cgroup has no limit.
    pub limit_cores: Option<f64>,
    /// Throttling counters, when the kernel keeps them (CONFIG_CFS_BANDWIDTH).
    pub stat: Option<Throttling>,
}

/// The CFS bandwidth counters of `cpu.stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Throttling {
    /// Enforcement periods in which the cgroup had runnable tasks.
    pub periods: u64,
    /// Periods in which it ran out of quota and was throttled.
    pub throttled_periods: u64,
    /// Total time its tasks were throttled, in seconds.
    pub throttled_seconds: f64,
}

/// The limit and throttling of the cgroup at `rel` (relative to the mounts),
/// or `None` where no cpu controller covers it.
pub fn bandwidth(mounts: &Mounts, rel: &str) -> Option<Bandwidth> {
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        return None; // the root has no limit; the node is node-exporter's
    }
    // A controller is bound to one hierarchy: on a hybrid host whose cpu
    // controller is in v1, the cgroup2 tree has no cpu.max to try.
    match &mounts.cpu_v1 {
        Some(v1) => read_v1(v1, rel),
        None => read_v2(&mounts.unified, rel),
    }
}

fn read_v2(root: &Path, dir: &str) -> Option<Bandwidth> {
    let read = |file: &str| read_small(root, &format!("{dir}/{file}"));
    let max = read("cpu.max").ok()?;
    let stat = read("cpu.stat").ok();
    Some(Bandwidth {
        limit_cores: parse_cpu_max(&max),
        stat: stat.as_deref().and_then(parse_stat_v2),
    })
}

fn read_v1(root: &Path, dir: &str) -> Option<Bandwidth> {
    let read = |file: &str| read_small(root, &format!("{dir}/{file}"));
    let quota = read("cpu.cfs_quota_us").ok()?;
    let limit_cores = match quota.trim().parse::<i64>().ok()? {
        q if q > 0 => {
            let period = read("cpu.cfs_period_us").ok()?;
            cores(q as u64, period.trim().parse().ok()?)
        }
        _ => None, // -1: no limit
    };
    let stat = read("cpu.stat").ok();
    Some(Bandwidth {
        limit_cores,
        stat: stat.as_deref().and_then(parse_stat_v1),
    })
}

fn cores(quota_us: u64, period_us: u64) -> Option<f64> {
    (period_us > 0).then(|| quota_us as f64 / period_us as f64)
}

/// The limit in cores from v2 `cpu.max`: `20000 100000` → 0.2; `max 100000`
/// → `None`. The kernel always writes both fields; a lone quota would use
/// the default 100 ms period.
pub fn parse_cpu_max(s: &str) -> Option<f64> {
    let mut fields = s.split_whitespace();
    let quota = fields.next()?;
    if quota == "max" {
        return None;
    }
    let period = fields.next().map_or(Some(100_000), |p| p.parse().ok())?;
    cores(quota.parse().ok()?, period)
}

/// v2 `cpu.stat`: `nr_periods`, `nr_throttled`, `throttled_usec`. `None`
/// when they are absent (a kernel without CFS bandwidth control).
pub fn parse_stat_v2(s: &str) -> Option<Throttling> {
    Some(Throttling {
        periods: value(s, "nr_periods")?,
        throttled_periods: value(s, "nr_throttled")?,
        throttled_seconds: value(s, "throttled_usec")? as f64 / 1e6,
    })
}

/// v1 `cpu.stat`: `nr_periods`, `nr_throttled`, `throttled_time` (ns).
pub fn parse_stat_v1(s: &str) -> Option<Throttling> {
    Some(Throttling {
        periods: value(s, "nr_periods")?,
        throttled_periods: value(s, "nr_throttled")?,
        throttled_seconds: value(s, "throttled_time")? as f64 / 1e9,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max() {
        assert_eq!(parse_cpu_max("20000 100000\n"), Some(0.2));
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1.5));
        assert_eq!(parse_cpu_max("250000 50000"), Some(5.0));
        assert_eq!(parse_cpu_max("50000"), Some(0.5));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("max"), None);
        assert_eq!(parse_cpu_max(""), None);
        assert_eq!(parse_cpu_max("1000 0"), None);
        assert_eq!(parse_cpu_max("lots 100000"), None);
    }

    #[test]
    fn stat_v2() {
        // Linux 6.x with the cpu controller enabled.
        let stat = "usage_usec 4521690\nuser_usec 4493010\nsystem_usec 28680\n\
                    core_sched.force_idle_usec 0\nnr_periods 243\nnr_throttled 198\n\
                    throttled_usec 15811421\nnr_bursts 0\nburst_usec 0\n";
        assert_eq!(
            parse_stat_v2(stat),
            Some(Throttling {
                periods: 243,
                throttled_periods: 198,
                throttled_seconds: 15.811421,
            })
        );
        // Without the cpu controller: usage only.
        assert_eq!(
            parse_stat_v2("usage_usec 1\nuser_usec 1\nsystem_usec 0\n"),
            None
        );
        // v1 names do not count as v2 ones.
        assert_eq!(
            parse_stat_v2("nr_periods 1\nnr_throttled 1\nthrottled_time 5\n"),
            None
        );
    }

    #[test]
    fn stat_v1() {
        let stat = "nr_periods 97\nnr_throttled 80\nthrottled_time 6403325210\n\
                    nr_bursts 0\nburst_time 0\n";
        assert_eq!(
            parse_stat_v1(stat),
            Some(Throttling {
                periods: 97,
                throttled_periods: 80,
                throttled_seconds: 6.40332521,
            })
        );
        assert_eq!(parse_stat_v1("nr_periods 1\nnr_throttled 0\n"), None);
        assert_eq!(parse_stat_v1("garbage"), None);
    }

    #[test]
    fn keys_match_exactly() {
        // nr_throttled must not be found as a prefix of something longer.
        let stat = "nr_throttled_x 5\nnr_periods 3\nnr_throttled 2\nthrottled_usec 7\n";
        let t = parse_stat_v2(stat).unwrap();
        assert_eq!((t.periods, t.throttled_periods), (3, 2));
    }
}
