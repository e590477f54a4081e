//! Facts about the node itself that per-cgroup numbers are judged against.
//!
//! `podmeter_node_cpus` lets an alert rule compute node CPU saturation
//! (`sum(rate(podmeter_*_cpu_usage_seconds_total[5m])) / podmeter_node_cpus`)
//! from podmeter alone, without joining node-exporter series. The online
//! set is read at each scrape: CPUs can be hot-plugged, and one small sysfs
//! read costs nothing next to the map reads.

use std::fs;

/// Where the kernel lists the CPUs that are online.
const ONLINE: &str = "/sys/devices/system/cpu/online";

/// Number of online CPUs, or `None` if sysfs does not say.
pub fn online_cpus() -> Option<usize> {
    count_cpu_list(&fs::read_to_string(ONLINE).ok()?)
}

/// Counts the CPUs of a kernel CPU list (`0-1,4`, `0`, `0-3,8-11`); `None`
/// for anything malformed, rather than a wrong number.
pub fn count_cpu_list(list: &str) -> Option<usize> {
    let list = list.trim();
    if list.is_empty() {
        return None;
    }
    let mut n = 0;
    for part in list.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?),
            None => {
                let c = part.parse::<usize>().ok()?;
                (c, c)
            }
        };
        n += last.checked_sub(first)? + 1;
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0\n"), Some(1));
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0-1,4"), Some(3));
        assert_eq!(count_cpu_list("0-3,8-11\n"), Some(8));
        assert_eq!(count_cpu_list("0,2,4,6"), Some(4));
        assert_eq!(count_cpu_list("0-127"), Some(128));
    }

    #[test]
    fn malformed_lists() {
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("\n"), None);
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("0-"), None);
        assert_eq!(count_cpu_list("0,,1"), None);
        assert_eq!(count_cpu_list("a-b"), None);
    }

    #[test]
    fn this_machine_has_cpus() {
        let n = online_cpus().expect("/sys/devices/system/cpu/online");
        // What this process may use (affinity, cgroup quota) is a subset.
        let usable = std::thread::available_parallelism().unwrap().get();
        assert!(n >= usable, "{n} online, {usable} usable");
    }
}
