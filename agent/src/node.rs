//! Facts about the node itself that per-cgroup numbers are judged against.
//!
//! `podmeter_node_cpus` lets an alert rule compute node CPU saturation
//! (`sum(rate(podmeter_*_cpu_usage_seconds_total[5m])) / podmeter_node_cpus`)
//! from podmeter alone, without joining node-exporter series. The online
//! set is read at each scrape: CPUs can be hot-plugged, and one small sysfs
//! read costs nothing next to the map reads.

/// Number of online CPUs (`/sys/devices/system/cpu/online`, read by aya,
/// which also sizes the per-CPU maps from it), or `None` if sysfs does not
/// say.
pub fn online_cpus() -> Option<usize> {
    aya::util::online_cpus().ok().map(|cpus| cpus.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_has_cpus() {
        let n = online_cpus().expect("/sys/devices/system/cpu/online");
        // What this process may use (affinity, cgroup quota) is a subset.
        let usable = std::thread::available_parallelism().unwrap().get();
        assert!(n >= usable, "{n} online, {usable} usable");
    }
}
