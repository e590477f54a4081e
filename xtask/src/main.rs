//! `cargo xtask`: everything around the cargo build that needs the host —
//! installing the eBPF toolchain, running the agent, running the privileged
//! test suite.

mod bench;
mod cluster;
mod fuzz;
mod image;
mod setup;
mod soak;
mod tools;

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "podmeter's developer tasks",
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and tests need (idempotent): Debian LLVM 22,
    /// the pinned nightly with rust-src, bpf-linker (cached outside the
    /// clone), Prometheus, bpftool, iproute2, stress-ng, iperf3.
    Setup,
    /// Build the agent (with the eBPF object embedded); installs only the
    /// eBPF toolchain (LLVM, the pinned nightly, bpf-linker) if missing.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build and start podmeter on this host (needs root); arguments after
    /// `--` go to podmeter, e.g. `cargo xtask run -- --listen 127.0.0.1:9740`.
    Run {
        /// Arguments for podmeter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit tests, then the privileged integration tests
    /// (real eBPF, cgroups, traffic, Prometheus; needs root).
    Test {
        /// Only run integration tests whose name contains this.
        filter: Option<String>,
        /// Skip the end-to-end tests on the local Kubernetes cluster.
        #[arg(long)]
        no_cluster: bool,
    },
    /// Only the end-to-end tests: cluster up, images, tests, cluster down.
    E2e {
        /// Only tests whose name contains this.
        filter: Option<String>,
        /// Leave the cluster running afterwards (for debugging).
        #[arg(long)]
        keep: bool,
    },
    /// Fuzz every parser of outside input (cargo-fuzz, pinned nightly) for a
    /// bounded time per target; a crash fails with the saved input's path.
    Fuzz(fuzz::Options),
    /// cargo fmt --check and clippy -D warnings, userspace and eBPF crates;
    /// installs only the eBPF toolchain if missing.
    Lint,
    /// A real single-node Kubernetes cluster on this machine (needs root).
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Regenerate deploy/manifests/podmeter.yaml from the Helm chart.
    Manifests,
    /// Build (once, cached by version) the Prometheus-ecosystem programs the
    /// chart and monitoring tests use, from their Go modules: helm,
    /// controller-gen, prometheus-operator, Prometheus, Alertmanager,
    /// prometheus-adapter.
    Tools {
        /// Also import their images into the running local cluster and
        /// generate Prometheus Operator's CRDs into target/crds.
        #[arg(long)]
        cluster: bool,
    },
    /// Measure podmeter (kernel cost per event, agent cost at 10/100/1000
    /// pods, /metrics latency, accuracy) next to cAdvisor and node-exporter
    /// on real pods of the local cluster (needs root); writes
    /// bench/results/ and bench/RESULTS.md.
    Bench {
        /// Shorter windows and fewer samples (under 10 minutes).
        #[arg(long)]
        quick: bool,
    },
    /// Run podmeter for a long while (default 10 minutes) under cgroup churn,
    /// concurrent scrapes and a SIGKILL and restart (needs root): scrape
    /// errors and latency, RSS and descriptor growth, retirement back to the
    /// baseline, lost events, programs left; writes bench/results/ and the
    /// "Reliability (soak)" section of bench/RESULTS.md.
    Soak(soak::Options),
    /// Build podmeter's OCI image (target/podmeter.oci.tar) without Docker,
    /// and import it into the local cluster's containerd if it is up.
    Image,
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Build (once, cached) and start etcd, the control plane, containerd and
    /// a kubelet; wait until the node is Ready.
    Up,
    /// Stop everything and remove every process, mount, netns, interface,
    /// cgroup and file the cluster made.
    Down,
    /// Say whether the node is up and Ready.
    Status,
}

fn main() -> std::process::ExitCode {
    match dispatch(Cli::parse().task) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup::all(),
        Task::Build { release } => build(release),
        Task::Run { args } => run(args),
        Task::Test { filter, no_cluster } => test(filter, no_cluster),
        Task::E2e { filter, keep } => e2e(filter, keep),
        Task::Fuzz(opts) => fuzz::run(&opts),
        Task::Lint => lint(),
        Task::Cluster { action } => match action {
            ClusterAction::Up => cluster::up(),
            ClusterAction::Down => cluster::down(),
            ClusterAction::Status => cluster::status(),
        },
        Task::Manifests => {
            let path = root().join("deploy/manifests/podmeter.yaml");
            std::fs::write(&path, tools::render_manifests()?)?;
            eprintln!("manifests: wrote {}", path.display());
            Ok(())
        }
        Task::Tools { cluster } => {
            tools::all()?;
            if cluster {
                tools::import_images(&cluster::containerd_sock())?;
                tools::operator_crds(&root().join("target/crds"))?;
            }
            Ok(())
        }
        Task::Bench { quick } => bench::run(quick),
        Task::Soak(o) => soak::run(o),
        Task::Image => {
            let tar = podmeter_image()?;
            if cluster::containerd_sock().exists() {
                image::import(&tar, &cluster::containerd_sock())?;
                eprintln!("image: imported {PODMETER_IMAGE} into the cluster's containerd");
            }
            Ok(())
        }
    }
}

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_owned()
}

/// Runs a command in the workspace root; fails with the command line.
pub(crate) fn sh(cmd: &mut Command) -> Result<()> {
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(root());
    }
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.env("PATH", setup::path_with_tools());
    c
}

fn build(release: bool) -> Result<()> {
    setup::build()?;
    let mut c = cargo();
    c.args(["build", "--package", "podmeter"]);
    if release {
        c.arg("--release");
    }
    sh(&mut c)
}

fn is_root() -> bool {
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

fn run(args: Vec<String>) -> Result<()> {
    if !is_root() {
        bail!("podmeter loads eBPF programs and needs root: run `sudo -E cargo xtask run`");
    }
    build(true)?;
    let bin = root().join("target/release/podmeter");
    let listen = args
        .iter()
        .position(|a| a == "--listen")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--listen=").map(str::to_owned))
        })
        .unwrap_or_else(|| "0.0.0.0:9740".into());
    let port = listen.rsplit(':').next().unwrap_or("9740");
    eprintln!(
        "podmeter: metrics at http://127.0.0.1:{port}/metrics (Ctrl-C stops it and detaches its programs)"
    );
    sh(Command::new(bin).args(args))
}

fn test(filter: Option<String>, no_cluster: bool) -> Result<()> {
    if !is_root() {
        bail!(
            "the integration tests load eBPF programs and make cgroups: run `sudo -E cargo xtask test`"
        );
    }
    setup::all()?;
    // One profile for everything: the agent under test is the release build.
    sh(cargo().args([
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "podmeter-tests",
        "--exclude",
        "podmeter-ebpf",
    ]))?;
    // The fuzz targets (`cargo xtask fuzz`) are not run here yet: their
    // instrumented build of the agent's dependencies costs ~20 min cold in
    // a fresh clone, past the CI budget, until its target dir is cached.
    sh(cargo().args(["build", "--release", "--package", "podmeter"]))?;
    tools::all()?;
    let mut c = cargo();
    c.args(["test", "--release", "--package", "podmeter-tests", "--"])
        .arg("--test-threads=1")
        .env("PODMETER_BIN", root().join("target/release/podmeter"));
    tool_env(&mut c);
    if let Some(f) = &filter {
        c.arg(f);
    }
    sh(&mut c)?;
    if no_cluster {
        return Ok(());
    }
    e2e(filter, false)
}

/// The end-to-end tests on the local cluster, which is torn down after
/// them whatever happens.
fn e2e(filter: Option<String>, keep: bool) -> Result<()> {
    let started = std::time::Instant::now();
    cluster::up()?;
    eprintln!(
        "e2e: cluster up in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let result = (|| {
        image::import(&podmeter_image()?, &cluster::containerd_sock())?;
        image::import(&testwork_image()?, &cluster::containerd_sock())?;
        tools::import_images(&cluster::containerd_sock())?;
        tools::operator_crds(&root().join("target/crds"))?;
        let mut c = cargo();
        c.args([
            "test",
            "--release",
            "--package",
            "podmeter-tests",
            "--test",
            "e2e",
            "--test",
            "monitoring",
            "--",
            "--ignored",
            "--test-threads=1",
        ])
        .env("PODMETER_KUBECTL", cluster::kubectl_bin())
        .env("KUBECONFIG", cluster::kubeconfig())
        .env("PODMETER_CRDS", root().join("target/crds"));
        tool_env(&mut c);
        if let Some(f) = &filter {
            c.arg(f);
        }
        sh(&mut c)
    })();
    if keep {
        eprintln!("e2e: cluster left running (--keep); `cargo xtask cluster down` removes it");
        return result;
    }
    let down = cluster::down();
    result.and(down)
}

/// Where the tests find the Go-built tools (see `tools`).
fn tool_env(c: &mut Command) {
    c.env("PODMETER_HELM", tools::HELM.bin("helm"))
        .env("PODMETER_PROMTOOL", tools::PROMETHEUS.bin("promtool"));
}

/// The tests' `pm-work` workload helper (release), for e2e images and the bench.
pub(crate) fn build_pm_work() -> Result<()> {
    sh(cargo().args([
        "build",
        "--release",
        "--package",
        "podmeter-tests",
        "--bin",
        "pm-work",
    ]))
}

/// busybox and the tests' `pm-work` helper, for the e2e workloads.
fn testwork_image() -> Result<PathBuf> {
    build_pm_work()?;
    let mut files = image::with_libs(&root().join("target/release/pm-work"), "/pm-work")?;
    files.push((PathBuf::from("/bin/busybox"), "/bin/busybox".into()));
    let tar = root().join("target/testwork.oci.tar");
    image::build(
        &image::Spec {
            name: "localhost/podmeter-testwork:dev",
            files,
            symlinks: vec![("/bin/sh".into(), "busybox".into())],
            entrypoint: vec!["/pm-work".into()],
        },
        &tar,
    )?;
    Ok(tar)
}

/// The image reference the manifests use.
const PODMETER_IMAGE: &str = "localhost/podmeter:dev";

/// Builds the release agent and its OCI image; returns the tarball.
fn podmeter_image() -> Result<PathBuf> {
    build(true)?;
    let target = root().join("target");
    let bin = target.join("podmeter.stripped");
    sh(Command::new("strip")
        .arg("-o")
        .arg(&bin)
        .arg(target.join("release/podmeter")))?;
    let tar = target.join("podmeter.oci.tar");
    image::build(
        &image::Spec {
            name: PODMETER_IMAGE,
            files: image::with_libs(&bin, "/podmeter")?,
            symlinks: vec![],
            entrypoint: vec!["/podmeter".into()],
        },
        &tar,
    )?;
    eprintln!("image: {PODMETER_IMAGE} written to {}", tar.display());
    Ok(tar)
}

fn lint() -> Result<()> {
    setup::build()?;
    sh(cargo().args(["fmt", "--all", "--", "--check"]))?;
    sh(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // The eBPF crate only builds for the BPF target with its nightly.
    let toolchain = setup::ebpf_toolchain()?;
    sh(Command::new("rustup")
        .env("PATH", setup::path_with_tools())
        .args([
            "run",
            &toolchain,
            "cargo",
            "clippy",
            "--package",
            "podmeter-ebpf",
            "--release",
        ])
        .args([
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    /// Every command explains itself, in its own words: a doc comment on the
    /// wrong variant once gave `manifests` the help meant for `tools`.
    #[test]
    fn every_command_has_its_own_help() {
        Cli::command().debug_assert();
        let mut cli = Cli::command();
        let top = cli.render_long_help().to_string();
        let mut abouts = Vec::new();
        for sub in cli.get_subcommands_mut() {
            let name = sub.get_name().to_owned();
            let about = sub.get_about().map(ToString::to_string).unwrap_or_default();
            assert!(!about.is_empty(), "`{name}` has no help");
            assert!(top.contains(&name), "`--help` does not list `{name}`");
            let help = sub.render_long_help().to_string();
            assert!(help.contains(&about), "`{name} --help` lacks its summary");
            abouts.push((name, about));
        }
        let about = |n: &str| &abouts.iter().find(|(name, _)| name == n).unwrap().1;
        assert!(about("manifests").contains("deploy/manifests"));
        assert!(about("tools").contains("helm"));
        assert!(about("bench").contains("Measure"));
        assert!(about("test").contains("test"));
        let mut seen: Vec<_> = abouts.iter().map(|(_, a)| a).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), abouts.len(), "two commands share a summary");
    }
}
