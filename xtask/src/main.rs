//! `cargo xtask`: everything around the cargo build that needs the host —
//! installing the eBPF toolchain, running the agent, running the privileged
//! test suite, the benchmarks. Each command is a module owning its clap
//! `Options`; this file only dispatches.

mod arch;
mod bench;
mod build;
mod cluster;
mod cmd;
mod e2e;
mod fuzz;
mod image;
mod lint;
mod phases;
mod prebuild;
mod registry;
mod release;
mod run;
mod sbom;
mod setup;
mod test;
mod tools;
mod vm;

use clap::{Parser, Subcommand};
pub(crate) use cmd::{cargo, is_root, root, sh};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
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
    Setup(setup::Options),
    /// Build the agent (with the eBPF object embedded); installs only the
    /// eBPF toolchain (LLVM, the pinned nightly, bpf-linker) if missing.
    Build(build::Options),
    /// Build and start podmeter on this host (needs root); arguments after
    /// `--` go to podmeter, e.g. `cargo xtask run -- --listen 127.0.0.1:9740`.
    Run(run::Options),
    /// Run every test: unit tests, the fuzz targets briefly, then the
    /// privileged integration tests (real eBPF, cgroups, traffic,
    /// Prometheus) on this host and on three kernels in qemu, and the
    /// end-to-end tests on a local Kubernetes cluster (needs root); prints
    /// phase timings.
    Test(test::Options),
    /// Only the end-to-end tests: cluster up, images, tests, cluster down.
    E2e(e2e::Options),
    /// Fuzz every parser of outside input (cargo-fuzz, pinned nightly) for a
    /// bounded time per target; a crash fails with the saved input's path.
    Fuzz(fuzz::Options),
    /// cargo fmt --check and clippy -D warnings, userspace and eBPF crates;
    /// installs only the eBPF toolchain if missing.
    Lint(lint::Options),
    /// A real single-node Kubernetes cluster on this machine (needs root).
    Cluster(cluster::Options),
    /// Regenerate deploy/manifests/podmeter.yaml from the Helm chart.
    Manifests(tools::ManifestsOptions),
    /// Build (once, cached by version) the Prometheus-ecosystem programs the
    /// chart and monitoring tests use, from their Go modules: helm,
    /// controller-gen, prometheus-operator, Prometheus, Alertmanager,
    /// prometheus-adapter.
    Tools(tools::Options),
    /// Measure podmeter (kernel cost per event, agent cost at 10/100/1000
    /// pods, /metrics latency, accuracy) next to cAdvisor and node-exporter
    /// on real pods of the local cluster (needs root); writes
    /// bench/results/ and bench/RESULTS.md.
    Bench(podmeter_bench::bench::Options),
    /// Run podmeter for a long while (default 10 minutes) under cgroup churn,
    /// concurrent scrapes and a SIGKILL and restart (needs root): scrape
    /// errors and latency, RSS and descriptor growth, retirement back to the
    /// baseline, lost events, programs left; writes bench/results/ and the
    /// "Reliability (soak)" section of bench/RESULTS.md.
    Soak(podmeter_bench::soak::Options),
    /// Boot Debian's 5.10, 6.1 and 6.12 cloud kernels in qemu (pure cgroup
    /// v2) and run the privileged integration tests in each; prints a table
    /// per kernel. `--arch arm64`: Debian's arm64 6.1 and 6.12 in
    /// qemu-system-aarch64, with podmeter and the tests cross-built.
    VmTest(vm::Options),
    /// Build, at idle priority, what the later phases of `.ci/run` build on
    /// a cold cache (Go tools, Kubernetes, cargo-cyclonedx, the arm64 agent
    /// and userland), under the locks those phases wait on; `.ci/run` runs
    /// it in the background to fill the CPU time the tests leave idle.
    Prebuild(prebuild::Options),
    /// Build podmeter's OCI images without Docker: this host's
    /// (target/podmeter.oci.tar, imported into the local cluster's
    /// containerd if it is up) and a multi-architecture index of amd64 and
    /// a cross-built arm64 (target/podmeter-multiarch.oci.tar).
    Image(image::Options),
    /// Build what a release publishes into target/dist/<version>/: the
    /// multi-architecture image (OCI index), the Helm chart package set to
    /// this version and image, each image's SBOM (CycloneDX), SHA256SUMS;
    /// --push publishes the image and chart (the release workflow runs
    /// that, and attaches the rest to the GitHub release);
    /// --local-registry pushes to a throwaway registry here instead.
    Release(release::Options),
}

/// What `cargo run` tells the program it runs about its package. Every
/// cargo xtask starts must not inherit them: build scripts that track one
/// (ring's tracks `CARGO_MANIFEST_DIR`) would see a new value in every
/// fresh clone and rebuild, and everything above them with it (a minute
/// of each warm CI run).
fn forget_cargo_run_env() {
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if matches!(
            &*k,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
        ) || k.starts_with("CARGO_PKG_")
        {
            // SAFETY: the first thing main does, before any thread starts.
            unsafe { std::env::remove_var(&key) };
        }
    }
}

fn main() -> std::process::ExitCode {
    forget_cargo_run_env();
    let result = match &Cli::parse().task {
        Task::Setup(o) => setup::run(o),
        Task::Build(o) => build::run(o),
        Task::Run(o) => run::run(o),
        Task::Test(o) => test::run(o),
        Task::E2e(o) => e2e::run(o),
        Task::Fuzz(o) => fuzz::run(o),
        Task::Lint(o) => lint::run(o),
        Task::Cluster(o) => cluster::run(o),
        Task::Manifests(o) => tools::write_manifests(o),
        Task::Tools(o) => tools::run(o),
        Task::Bench(o) => podmeter_bench::bench::run(o, &bench::Xtask),
        Task::Soak(o) => podmeter_bench::soak::run(o, &bench::Xtask),
        Task::Image(o) => image::run(o),
        Task::VmTest(o) => vm::run(o),
        Task::Release(o) => release::run(o),
        Task::Prebuild(o) => prebuild::run(o),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
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
