//! `cargo xtask bench` and `cargo xtask soak`: the benchmark and the soak
//! live in the `podmeter-bench` crate (`benchmark/`); this gives them what
//! they need from xtask (setup, the agent's build, the local cluster).

use std::{path::PathBuf, process::Command};

use anyhow::Result;

use crate::{build, cluster, cmd, image, setup};

/// xtask as the benchmark's [`podmeter_bench::Host`].
pub struct Xtask;

impl podmeter_bench::Host for Xtask {
    fn root(&self) -> PathBuf {
        cmd::root()
    }

    fn target_dir(&self) -> PathBuf {
        cmd::target_dir()
    }

    fn prepare(&self, packages: &[&str]) -> Result<()> {
        setup::all()?;
        if !packages.is_empty() {
            setup::apt(packages)?;
        }
        build::agent(true)?;
        image::build_pm_work()
    }

    fn kubectl(&self) -> Command {
        cluster::kubectl()
    }

    fn node(&self) -> &str {
        cluster::NODE
    }

    fn cluster_state(&self) -> PathBuf {
        PathBuf::from(cluster::STATE)
    }

    fn kubelet_bin(&self) -> PathBuf {
        cluster::kubelet_bin()
    }

    fn cluster_up(&self) -> Result<()> {
        cluster::up()
    }

    fn cluster_down(&self) -> Result<()> {
        cluster::down()
    }

    fn load_work_image(&self) -> Result<()> {
        let tar = image::testwork()?;
        image::import(&tar, &cluster::containerd_sock())
    }
}
