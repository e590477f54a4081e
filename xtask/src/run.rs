//! `cargo xtask run`: podmeter on this host.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{build, cmd::target_dir, is_root, sh};

/// `cargo xtask run`'s options.
#[derive(clap::Args)]
pub struct Options {
    /// Arguments for podmeter (`cargo xtask run -- --help` lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    if !is_root() {
        bail!("podmeter loads eBPF programs and needs root: run `sudo -E cargo xtask run`");
    }
    build::agent(true)?;
    let bin = target_dir().join("release/podmeter");
    let args = &opts.args;
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
