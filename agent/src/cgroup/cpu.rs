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
//! The throttling counters are read at scrape time, not in the background
//! refresh: alerts take `rate()`s of them next to `cpu_usage_seconds_total`,
//! so they have to be as fresh as the kernel maps. The limit changes rarely
//! (a pod resize) and is read by the refresh. Throttling is reported only
//! for cgroups with a limit, as cAdvisor does: without a quota the counters
//! cannot move, and a thousand series of zeros would double a scrape.
//!
//! Where the kernel allows, the scrape takes the throttling counters of
//! every limited cgroup from one walk of a cgroup iterator instead
//! ([`CfsWalk`], see `bpf::cfs`): the same numbers `cpu.stat` prints,
//! without a thousand file reads. A cgroup the walk did not give is read
//! from its `cpu.stat` as before.
//!
//! In v2, `cpu.max` exists only where the cpu controller is enabled for the
//! cgroup (its parent's `cgroup.subtree_control`); without it `cpu.stat`
//! still exists but holds only usage, so `cpu.max` decides whether there is
//! anything to report. The root cgroup cannot be limited and is skipped in
//! both versions.

use crate::ids::IdMap;
use std::{io, path::Path, sync::OnceLock};

use super::{Mounts, files::StatFile, memory::stat_value as value};

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

/// The CFS bandwidth counters of one cgroup as the kernel keeps them (in
/// its `task_group`), from a cgroup iterator's walk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cfs {
    /// `nr_periods`.
    pub periods: u64,
    /// `nr_throttled`.
    pub throttled_periods: u64,
    /// `throttled_time`, in nanoseconds.
    pub throttled_ns: u64,
}

/// One walk of the cpu controller's hierarchy: the counters of every
/// cgroup with a CPU quota, by its id in that hierarchy (the cgroup2 id,
/// or on a hybrid host the id of the v1 `cpu` cgroup).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CfsWalk {
    /// Counters by cgroup id.
    pub cgroups: IdMap<Cfs>,
    /// Whether the walk had room for every limited cgroup (if not, those
    /// left out are read from their files).
    pub complete: bool,
}

/// A cgroup's CPU limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Limit {
    /// A cpu controller covers the cgroup and sets no quota.
    Unlimited,
    /// Quota / period, in cores.
    Cores(f64),
}

/// The files of a cgroup's CPU limit and throttling counters.
#[derive(Debug)]
pub enum Files {
    /// `cpu.max` and `cpu.stat` in the cgroup2 tree.
    V2 {
        /// `cpu.max`.
        max: StatFile,
        /// `cpu.stat`.
        stat: StatFile,
    },
    /// The v1 `cpu` hierarchy's quota, period and `cpu.stat`.
    V1 {
        /// `cpu.cfs_quota_us`.
        quota: StatFile,
        /// `cpu.cfs_period_us`.
        period: StatFile,
        /// `cpu.stat`.
        stat: StatFile,
        /// The id of the v1 `cpu` cgroup, once known.
        id: OnceLock<u64>,
    },
}

impl Files {
    /// The CPU files of the cgroup at `rel` (relative to the mounts), or
    /// `None` for the root, which cannot be limited. Nothing is opened yet.
    pub fn new(mounts: &Mounts, rel: &str) -> Option<Self> {
        let rel = rel.trim_start_matches('/');
        if rel.is_empty() {
            return None;
        }
        let file = |root: &Path, name: &str| StatFile::new(root, format!("{rel}/{name}"));
        // A controller is bound to one hierarchy: on a hybrid host whose cpu
        // controller is in v1, the cgroup2 tree has no cpu.max to try.
        Some(match &mounts.cpu_v1 {
            Some(v1) => Self::V1 {
                quota: file(v1, "cpu.cfs_quota_us"),
                period: file(v1, "cpu.cfs_period_us"),
                stat: file(v1, "cpu.stat"),
                id: OnceLock::new(),
            },
            None => Self::V2 {
                max: file(&mounts.unified, "cpu.max"),
                stat: file(&mounts.unified, "cpu.stat"),
            },
        })
    }

    /// The limit now, or `None` where no cpu controller covers the cgroup
    /// (or it is gone).
    pub fn limit(&self) -> Option<Limit> {
        let cores = match self {
            Self::V2 { max, .. } => parse_cpu_max(&max.read().ok()?),
            Self::V1 { quota, period, .. } => {
                match quota.read().ok()?.trim().parse::<i64>().ok()? {
                    q if q > 0 => cores(q as u64, period.read().ok()?.trim().parse().ok()?),
                    _ => None, // -1: no limit
                }
            }
        };
        Some(cores.map_or(Limit::Unlimited, Limit::Cores))
    }

    /// The throttling counters now, when the kernel keeps them
    /// (CONFIG_CFS_BANDWIDTH).
    pub fn throttling(&self) -> io::Result<Option<Throttling>> {
        Ok(match self {
            Self::V2 { stat, .. } => parse_stat_v2(&stat.read()?),
            Self::V1 { stat, .. } => parse_stat_v1(&stat.read()?),
        })
    }

    /// The throttling counters of this cgroup in `walk`, as its `cpu.stat`
    /// would print them (v2 prints whole microseconds), or `None` if the
    /// walk did not give them. `cgroup2_id` is the cgroup's id.
    pub fn throttling_in(&self, walk: &CfsWalk, cgroup2_id: u64) -> Option<Throttling> {
        let (cfs, seconds) = match self {
            Self::V2 { .. } => {
                let c = walk.cgroups.get(&cgroup2_id)?;
                (c, (c.throttled_ns / 1000) as f64 / 1e6)
            }
            Self::V1 { stat, id, .. } => {
                let id = match id.get() {
                    Some(id) => *id,
                    // Not kept when it fails: the cgroup may be new or gone.
                    None => {
                        let found = stat.cgroup_id().ok()?;
                        *id.get_or_init(|| found)
                    }
                };
                let c = walk.cgroups.get(&id)?;
                (c, c.throttled_ns as f64 / 1e9)
            }
        };
        Some(Throttling {
            periods: cfs.periods,
            throttled_periods: cfs.throttled_periods,
            throttled_seconds: seconds,
        })
    }

    /// Closes the files (the cgroup is gone).
    pub fn close(&self) {
        match self {
            Self::V2 { max, stat } => [max, stat].iter().for_each(|f| f.close()),
            Self::V1 {
                quota,
                period,
                stat,
                ..
            } => [quota, period, stat].iter().for_each(|f| f.close()),
        }
    }
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

    /// The walk names a v1 cgroup by its id in the v1 `cpu` hierarchy (its
    /// directory's inode), a v2 one by its cgroup2 id; v1 counts whole
    /// nanoseconds, v2 prints whole microseconds.
    #[test]
    fn walked_counters_by_each_hierarchys_id() {
        use std::os::unix::fs::MetadataExt as _;
        let root = std::env::temp_dir().join(format!("podmeter-cpu-{}", std::process::id()));
        std::fs::create_dir_all(root.join("pod/c")).unwrap();
        let ino = std::fs::metadata(root.join("pod/c")).unwrap().ino();
        let mounts = |cpu_v1: Option<&Path>| Mounts {
            unified: root.clone(),
            memory_v1: None,
            cpu_v1: cpu_v1.map(Path::to_owned),
            unified_shows: Some("/".into()),
            psi: false,
            memory_local_events: false,
        };
        let cfs = Cfs {
            periods: 7,
            throttled_periods: 3,
            throttled_ns: 1_234_567_891,
        };
        let walk = |id: u64| CfsWalk {
            cgroups: [(id, cfs)].into_iter().collect(),
            complete: true,
        };
        let want = |seconds| {
            Some(Throttling {
                periods: 7,
                throttled_periods: 3,
                throttled_seconds: seconds,
            })
        };
        const V2_ID: u64 = 99;
        let v1 = Files::new(&mounts(Some(&root)), "/pod/c").unwrap();
        assert!(matches!(v1, Files::V1 { .. }));
        assert_eq!(v1.throttling_in(&walk(ino), V2_ID), want(1.234567891));
        assert_eq!(v1.throttling_in(&walk(V2_ID), V2_ID), None, "not its v1 id");
        let v2 = Files::new(&mounts(None), "/pod/c").unwrap();
        assert_eq!(v2.throttling_in(&walk(V2_ID), V2_ID), want(1.234567));
        assert_eq!(v2.throttling_in(&walk(ino), V2_ID), None);
        // A v1 cgroup whose directory is gone has no id to find.
        let gone = Files::new(&mounts(Some(&root)), "/pod/gone").unwrap();
        assert_eq!(gone.throttling_in(&walk(ino), V2_ID), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn keys_match_exactly() {
        // nr_throttled must not be found as a prefix of something longer.
        let stat = "nr_throttled_x 5\nnr_periods 3\nnr_throttled 2\nthrottled_usec 7\n";
        let t = parse_stat_v2(stat).unwrap();
        assert_eq!((t.periods, t.throttled_periods), (3, 2));
    }
}
