//! `cargo xtask test`: every test, in phases whose timings it prints at the
//! end: unit tests, the fuzz targets for a short bounded time, the
//! privileged integration tests on this host, the same tests on Debian's
//! 5.10, 6.1 and 6.12 kernels in qemu (`vm-test`), then the end-to-end tests
//! on a local Kubernetes cluster.

use anyhow::{Result, bail};

use crate::{
    build, cargo, cmd::target_dir, e2e, fuzz, is_root, phases::Phases, setup, sh, tools, vm,
};

/// How long CI fuzzes each target: enough to replay the seeds and explore
/// around them (hundreds of thousands of runs each); `cargo xtask fuzz`
/// runs longer.
const FUZZ_SECONDS: u64 = 5;

/// The kernels CI boots: the whole x86 matrix, three VMs at once (in turn,
/// 5.10 and 6.12 alone took 363 s of a 1758 s warm run).
const CI_KERNELS: [&str; 3] = ["5.10", "6.1", "6.12"];

/// `cargo xtask test`'s options.
#[derive(clap::Args)]
pub struct Options {
    /// Only run integration tests whose name contains this.
    pub filter: Option<String>,
    /// Skip the end-to-end tests on the local Kubernetes cluster.
    #[arg(long)]
    pub no_cluster: bool,
    /// Skip the fuzz targets.
    #[arg(long)]
    pub no_fuzz: bool,
    /// Skip the kernel matrix (`cargo xtask vm-test`).
    #[arg(long)]
    pub no_vm: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    if !is_root() {
        bail!(
            "the integration tests load eBPF programs and make cgroups: run `sudo -E cargo xtask test`"
        );
    }
    let mut phases = Phases::new("test");
    phases.run("setup", setup::all)?;
    // One profile for everything: the agent under test is the release build.
    // The agent's own tests alone first: built with no other package's
    // features (it has no dev-dependencies), its library is the very one
    // `build agent` links next, which then only compiles `main.rs` instead
    // of the whole agent again.
    phases.run("unit tests", || {
        sh(cargo().args(["test", "--release", "--package", "podmeter"]))?;
        sh(cargo().args([
            "test",
            "--release",
            "--workspace",
            "--exclude",
            "podmeter",
            "--exclude",
            "podmeter-tests",
            "--exclude",
            "podmeter-ebpf",
        ]))
    })?;
    if !opts.no_fuzz && opts.filter.is_none() {
        phases.run("fuzz", || {
            fuzz::run(&fuzz::Options {
                seconds: FUZZ_SECONDS,
                targets: Vec::new(),
                list: false,
            })
        })?;
    }
    phases.run("build agent", || build::agent(true))?;
    // Only what the integration tests run; the cluster's tools come with
    // the cluster, so a cold run's background prebuild has longer to build
    // them (`.ci/run`).
    phases.run("tools", || tools::ensure(&tools::FOR_INTEGRATION))?;
    phases.run("integration tests", || {
        let mut c = cargo();
        c.args(["test", "--release", "--package", "podmeter-tests", "--"])
            .arg("--test-threads=1")
            .env("PODMETER_BIN", target_dir().join("release/podmeter"));
        tools::test_env(&mut c);
        if let Some(f) = &opts.filter {
            c.arg(f);
        }
        sh(&mut c)
    })?;
    if !opts.no_vm && opts.filter.is_none() {
        phases.run("vm-test", || {
            vm::run(&vm::Options {
                kernels: CI_KERNELS.iter().map(|k| (*k).to_owned()).collect(),
                arch: crate::arch::Arch::HOST,
                tests: vm::DEFAULT_TESTS.iter().map(|t| (*t).to_owned()).collect(),
                filter: None,
                memory_mib: 2048,
                cpus: 2,
                jobs: CI_KERNELS.len(),
                timeout_minutes: 25,
                file_timeout_seconds: 300,
                crash_after: None,
                freeze_after: None,
                lockup_after: None,
            })
        })?;
    }
    if opts.no_cluster {
        return Ok(());
    }
    if let Some(f) = &opts.filter
        && let Err(none) = e2e::check_filter(f)?
    {
        eprintln!("test: {none}: no cluster needed");
        return Ok(());
    }
    e2e::run_in(&mut phases, opts.filter.as_deref(), false)
}
