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
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=PODMETER_CACHE");
    if !linker_works() {
        // Where `cargo xtask setup` caches it: a plain `cargo build` or
        // `cargo test` then works without PATH set up by hand.
        let cache = env::var_os("PODMETER_CACHE")
            .map_or_else(|| PathBuf::from("/var/cache/podmeter"), PathBuf::from);
        let cached = fs::read_dir(&cache)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|bin| {
                bin.parent()
                    .and_then(|d| d.file_name())
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("bpf-linker-"))
            })
            .max();
        if let Some(bin) = cached {
            let path = env::var_os("PATH").unwrap_or_default();
            let mut dirs = vec![bin];
            dirs.extend(env::split_paths(&path));
            // SAFETY: build scripts are single-threaded; nothing reads env concurrently.
            unsafe { env::set_var("PATH", env::join_paths(dirs)?) };
        }
    }
    if !linker_works() {
        // Fail early with the fix, rather than deep inside the nested build.
        bail!(
            "bpf-linker is neither on PATH nor cached under /var/cache/podmeter; run `cargo xtask setup` \
             (installs it and the {toolchain} toolchain)"
        );
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

fn linker_works() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
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
