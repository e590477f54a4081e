//! `cargo xtask build`: the agent, with its eBPF object embedded.

use anyhow::{Result, bail};

use crate::{arch::Arch, cargo, setup, sh};

/// `cargo xtask build`'s options.
#[derive(clap::Args)]
pub struct Options {
    /// Build with the release profile.
    #[arg(long)]
    pub release: bool,
    /// CPU architecture to build for; another than this host's is
    /// cross-built (release only), installing Debian's cross compiler and
    /// the rustup target if missing.
    #[arg(long, value_enum, default_value = Arch::HOST.name())]
    pub arch: Arch,
    /// Also copy the built agent, stripped, to this path (release only):
    /// the same place whatever the architecture, for the Containerfile.
    #[arg(long, value_name = "PATH")]
    pub out: Option<std::path::PathBuf>,
}

pub fn run(opts: &Options) -> Result<()> {
    if opts.arch == Arch::HOST && opts.out.is_none() {
        return agent(opts.release);
    }
    if !opts.release {
        bail!("--arch and --out build the release profile only: add --release");
    }
    agent_for(opts.arch)?;
    let built = opts.arch.release_dir().join("podmeter");
    eprintln!("build: {}", built.display());
    if let Some(out) = &opts.out {
        sh(std::process::Command::new(opts.arch.strip())
            .arg("-o")
            .arg(out)
            .arg(&built))?;
        eprintln!("build: stripped copy at {}", out.display());
    }
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
