//! The benchmark's cgroups.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};
use podmeter_test_support::cgroups;

use super::{Bench, Proc, cgroup_cpu_secs};

/// The benchmark's cgroups: `/podmeter-bench-<pid>` in the cgroup2
/// hierarchy and, on hybrid hosts, in the v1 memory, cpu and cpuacct
/// hierarchies too (as the kubelet and runc lay pods out). Nested, never at
/// the top-level `kubepods`, which belongs to the cluster's kubelet.
/// Removed, processes and all, on drop; a crashed run's tree is removed by
/// the next one.
pub struct Tree {
    name: String,
    unified: PathBuf,
    v1: Vec<PathBuf>,
}

impl Tree {
    pub fn new() -> Result<Self> {
        let unified = cgroups::try_unified_root().context("no cgroup2 mount")?;
        let v1 = cgroups::v1_roots();
        let tree = Self {
            name: format!("podmeter-bench-{}", std::process::id()),
            unified,
            v1,
        };
        for r in tree.roots() {
            for e in fs::read_dir(r)?.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let stale = name
                    .strip_prefix("podmeter-bench-")
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
                if stale {
                    cgroups::remove_tree(&e.path());
                }
            }
            fs::create_dir_all(r.join(&tree.name))?;
        }
        Ok(tree)
    }

    fn roots(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.unified).chain(&self.v1)
    }

    /// `rel` below the tree, in every hierarchy (a workload's cgroup).
    pub fn cgroup(&self, rel: &str) -> Result<Cg> {
        let dirs: Vec<PathBuf> = self.roots().map(|r| r.join(&self.name).join(rel)).collect();
        for d in &dirs {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(Cg {
            path: format!("/{}/{rel}", self.name),
            dirs,
        })
    }

    /// `rel` below the tree, in the cgroup2 hierarchy only (to account a
    /// measured process's CPU precisely, exited threads included).
    pub fn own(&self, rel: &str) -> Result<Cg> {
        let d = self.unified.join(&self.name).join(rel);
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        Ok(Cg {
            path: format!("/{}/{rel}", self.name),
            dirs: vec![d],
        })
    }

    /// Removes `rel` (and what runs in it) from every hierarchy.
    pub fn remove(&self, rel: &str) {
        for r in self.roots() {
            cgroups::remove_tree(&r.join(&self.name).join(rel));
        }
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        for r in self.roots() {
            cgroups::remove_tree(&r.join(&self.name));
        }
    }
}

/// Removes a sub-tree of the benchmark's cgroups on drop.
pub struct Remove<'a>(pub &'a Tree, pub String);

impl Drop for Remove<'_> {
    fn drop(&mut self) {
        self.0.remove(&self.1);
    }
}

/// One cgroup of the benchmark's tree.
pub struct Cg {
    /// Path relative to the cgroup2 root, as podmeter labels host cgroups.
    pub path: String,
    /// cgroup2 directory first, then the v1 ones.
    pub dirs: Vec<PathBuf>,
}

impl Cg {
    pub fn dir(&self) -> &Path {
        &self.dirs[0]
    }

    pub fn cpu_secs(&self) -> Result<f64> {
        cgroup_cpu_secs(self.dir())
    }

    /// Sets a CFS quota of `millicores` per 100 ms period, as the kubelet
    /// does for a container with a CPU limit, in the hierarchy that holds
    /// the cpu controller. `false` where none covers the cgroup (a pure v2
    /// host whose root does not delegate `cpu`).
    pub fn limit_cpu(&self, millicores: u64) -> Result<bool> {
        for d in &self.dirs {
            let (file, value) = if d.join("cpu.cfs_quota_us").exists() {
                ("cpu.cfs_quota_us", format!("{}", millicores * 100))
            } else if d.join("cpu.max").exists() {
                ("cpu.max", format!("{} 100000", millicores * 100))
            } else {
                continue;
            };
            let path = d.join(file);
            fs::write(&path, value).with_context(|| format!("writing {}", path.display()))?;
            return Ok(true);
        }
        Ok(false)
    }

    /// `pm-work <args>` inside this cgroup (and `netns`).
    pub fn pm_work(&self, b: &Bench, netns: Option<&str>, args: &[&str]) -> Result<Proc> {
        let mut c = Command::new(&b.pm_work);
        for d in &self.dirs {
            c.arg("--cgroup").arg(d);
        }
        if let Some(ns) = netns {
            c.args(["--netns", ns]);
        }
        c.args(args);
        Proc::spawn(&format!("pm-work {}", args.join(" ")), &mut c)
    }

    /// A `pm-work` with no pipes (a fleet of a thousand must not run out of
    /// descriptors).
    pub fn worker(&self, b: &Bench, args: &[&str]) -> Result<Proc> {
        let mut c = Command::new(&b.pm_work);
        for d in &self.dirs {
            c.arg("--cgroup").arg(d);
        }
        c.args(args);
        Proc::quiet(&format!("pm-work {}", args.join(" ")), &mut c)
    }

    /// Starts `program` with `args` inside this cgroup (cgroup2 only),
    /// stdin and stdout on /dev/null; `setup` adjusts the command.
    pub fn spawn_with(
        &self,
        name: &str,
        program: &Path,
        args: &[String],
        setup: impl FnOnce(&mut Command),
    ) -> Result<Proc> {
        let mut c = cgroups::command_in(self.dir(), program);
        c.args(args);
        setup(&mut c);
        Proc::quiet(name, &mut c)
    }
}
