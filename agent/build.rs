//! Builds the eBPF object from `../agent-ebpf` with the nightly pinned in
//! its `rust-toolchain.toml`, so a plain `cargo build` yields one binary with
//! the kernel programs embedded.

use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../agent-ebpf");
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    let toolchain = channel(
        &fs::read_to_string(&toolchain_file)
            .with_context(|| format!("reading {}", toolchain_file.display()))?,
    )
    .with_context(|| format!("no `channel = \"...\"` in {}", toolchain_file.display()))?;

    if env::var_os("CARGO_FEATURE_AGENT").is_none() {
        // The parsers alone (the fuzz build): no programs to embed.
        return Ok(());
    }
    if env::var_os("AYA_BUILD_SKIP").is_some() {
        // Unit tests and fuzz targets never load the object: an empty one
        // lets them build without the eBPF toolchain (loading it fails
        // with "eBPF object ..." at run time, never silently).
        let out = PathBuf::from(env::var("OUT_DIR")?).join("podmeter-ebpf");
        if !out.exists() {
            fs::write(&out, [])?;
        }
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        println!("cargo:warning=AYA_BUILD_SKIP=1; skipping eBPF build");
        return Ok(());
    }
    {
        // Fail early with the fix, rather than deep inside the nested build.
        let found = Command::new("bpf-linker").arg("--version").output();
        if !matches!(found, Ok(ref o) if o.status.success()) {
            bail!(
                "bpf-linker is not on PATH; run `cargo xtask setup` (installs it and the {toolchain} toolchain)"
            );
        }
    }

    let ebpf_dir = ebpf_dir.canonicalize()?;
    // aya-build turns every line the nested cargo prints into a warning;
    // keep that to real diagnostics.
    // SAFETY: build scripts are single-threaded; nothing reads env concurrently.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [Package {
            name: "podmeter-ebpf",
            root_dir: ebpf_dir.to_str().context("non-UTF-8 path")?,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}

/// The `channel` of a rust-toolchain.toml, without a TOML parser for one key.
fn channel(toml: &str) -> Option<String> {
    toml.lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("channel"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .next()
}
