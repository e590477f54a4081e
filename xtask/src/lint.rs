//! `cargo xtask lint`: formatting and clippy, userspace and eBPF crates.

use std::process::Command;

use anyhow::Result;

use crate::{cargo, phases::Phases, setup, sh};

/// `cargo xtask lint`'s options (none).
#[derive(clap::Args)]
pub struct Options {}

pub fn run(_: &Options) -> Result<()> {
    let mut phases = Phases::new("lint");
    phases.run("eBPF toolchain", setup::build)?;
    phases.run(
        "fmt",
        || sh(cargo().args(["fmt", "--all", "--", "--check"])),
    )?;
    phases.run("clippy", || {
        sh(cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            "podmeter-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    // The eBPF crate only builds for the BPF target with its nightly.
    phases.run("clippy (eBPF)", || {
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
    })?;
    // The release workflow cannot run here; actionlint checks its syntax,
    // expressions and shell.
    phases.run("actionlint", || {
        crate::tools::ACTIONLINT.ensure()?;
        let workflows: Vec<_> = std::fs::read_dir(crate::cmd::root().join(".github/workflows"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yml" || x == "yaml"))
            .collect();
        sh(Command::new(crate::tools::ACTIONLINT.bin("actionlint"))
            .arg("-no-color")
            .args(&workflows))
    })
}
