//! `cargo xtask build`: the agent, with its eBPF object embedded.

use anyhow::{Result, bail};

use crate::{arch::Arch, cargo, setup, sh};

/// `cargo xtask build`'s options.
#[derive(clap::Args)]
pub struct Options {
    /// Build with the release profile.
    #[arg(long)]
    pub release: bool,
    /// CPU architecture to build for: arm64 cross-builds (release only),
    /// installing Debian's cross compiler and the rustup target if missing.
    #[arg(long, value_enum, default_value = "amd64")]
    pub arch: Arch,
}

pub fn run(opts: &Options) -> Result<()> {
    if opts.arch == Arch::HOST {
        return agent(opts.release);
    }
    if !opts.release {
        bail!(
            "--arch {} builds the release profile only: add --release",
            opts.arch.name()
        );
    }
    agent_for(opts.arch)?;
    eprintln!(
        "build: {}",
        opts.arch.release_dir().join("podmeter").display()
    );
    Ok(())
}

/// Builds the agent; installs only the eBPF toolchain if it is missing.
pub fn agent(release: bool) -> Result<()> {
    setup::build()?;
    let mut c = cargo();
    c.args(["build", "--package", "podmeter"]);
    if release {
        c.arg("--release");
    }
    sh(&mut c)
}

/// Builds the release agent for `arch` (cross-compiled where it is not the
/// host's; see `arch.rs`).
pub fn agent_for(arch: Arch) -> Result<()> {
    setup::build()?;
    let mut c = cargo();
    c.args(["build", "--release", "--package", "podmeter"]);
    arch.cargo_args(&mut c)?;
    sh(&mut c)
}
