//! `cargo xtask build`: the agent, with its eBPF object embedded.

use anyhow::Result;

use crate::{cargo, setup, sh};

/// `cargo xtask build`'s options.
#[derive(clap::Args)]
pub struct Options {
    /// Build with the release profile.
    #[arg(long)]
    pub release: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    agent(opts.release)
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
