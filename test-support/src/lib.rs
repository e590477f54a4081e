//! What podmeter's integration tests, benchmark and soak share: RAII guards
//! for every kernel object they make (cgroups, network namespaces,
//! processes, the agent and its BPF programs), so that a failure still
//! leaves the machine as it found it, and the one exposition parser.
//!
//! The tests run as root, one at a time (`--test-threads=1`): they share
//! kernel state. `cargo xtask test` runs them with `PODMETER_BIN` set.
//! The helpers panic on failure (the tests' way to fail), except those
//! named `try_*` and the best-effort cleanups, which the benchmark uses.

pub mod agent;
pub mod cgroups;
pub mod dashboard;
pub mod empty_programs;
pub mod helm;
pub mod kube;
pub mod netns;
pub mod scrape;
pub mod work;

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

pub use agent::{Agent, curl, free_port, podmeter_bin, podmeter_prog_ids};
pub use cgroups::{
    CpuController, TestCgroup, TestTree, Throttling, assert_in_range, cpu_between, cpu_in_unified,
    cpu_v1_root, memory_v1_root, unified_root,
};
pub use helm::Helm;
pub use kube::{Kube, Namespace};
pub use netns::{
    NetNs, failing_output_ruleset, ip, loss_ruleset, nft_in, random_loss, tcp_ext, veth_pair,
};
pub use scrape::{Scrape, poll_scrape};
pub use work::{Work, pm_work};

/// `(major, minor)` of the running kernel, for tests whose expectation
/// depends on it.
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut n = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|x| x.parse::<u32>().unwrap_or(0));
    (n.next().unwrap_or(0), n.next().unwrap_or(0))
}

/// Calls `ok` every `every` until it returns `Some`; panics naming `what`
/// after `timeout`.
pub fn poll<T>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut ok: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = ok() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        sleep(every);
    }
}
