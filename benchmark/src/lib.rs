//! podmeter's benchmark (`cargo xtask bench`) and soak (`cargo xtask soak`):
//! the scenarios, their results and the `bench/RESULTS.md` report.
//!
//! `cargo xtask` stays the entry point: it owns installing tools, building
//! the agent and the local Kubernetes cluster, and hands them to this crate
//! as a [`Host`]. This crate depends on nothing of xtask's (xtask depends on
//! it), and its unit tests need no root.

pub mod bench;
pub mod schema;
pub mod soak;

use std::{path::PathBuf, process::Command};

use anyhow::Result;

/// What the benchmark and the soak need from the tooling around them
/// (`cargo xtask`'s setup, build and cluster modules).
pub trait Host: Sync {
    /// The workspace root: `bench/results/`, `bench/RESULTS.md`, git.
    fn root(&self) -> PathBuf;
    /// Where cargo builds: `release/podmeter`, `release/pm-work`, and the
    /// scratch directory `bench/`.
    fn target_dir(&self) -> PathBuf;
    /// Installs and builds what a run needs: the toolchain, the Debian
    /// `packages`, the release agent and `pm-work`.
    fn prepare(&self, packages: &[&str]) -> Result<()>;
    /// `kubectl` for the local cluster.
    fn kubectl(&self) -> Command;
    /// The local cluster's node name.
    fn node(&self) -> &str;
    /// The local cluster's state directory (`pids/kubelet.pid`, `pki/`).
    fn cluster_state(&self) -> PathBuf;
    /// The kubelet binary the local cluster runs.
    fn kubelet_bin(&self) -> PathBuf;
    /// Starts the local cluster.
    fn cluster_up(&self) -> Result<()>;
    /// Stops the local cluster.
    fn cluster_down(&self) -> Result<()>;
    /// Builds the `pm-work` test image and imports it into the cluster's
    /// containerd.
    fn load_work_image(&self) -> Result<()>;
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // The effective uid is the 'Uid:' line's second field.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
