//! `cargo xtask setup`: install what building and testing podmeter needs,
//! idempotently, so a fresh machine gets there with one command and a warm
//! one returns in a second.
//!
//! Expensive builds are cached outside the clone, keyed by version, under
//! `$PODMETER_CACHE` (default `/var/cache/podmeter`).

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{root, sh};

/// bpf-linker release, and the LLVM major it is built against. The LLVM
/// major must equal the one of the pinned nightly's rustc.
const BPF_LINKER: &str = "0.13.0";
const LLVM_MAJOR: &str = "22";

/// Debian packages for building the agent: LLVM for bpf-linker's build.
const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "clang-22",
    "libclang-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "libxml2-dev",
];

/// Debian packages the tests and benchmarks drive.
const TEST_PACKAGES: &[&str] = &[
    "prometheus",
    "bpftool",
    "iproute2",
    "stress-ng",
    "iperf3",
    "curl",
    "util-linux",
    // Random packet loss for the retransmit test (no netem on the CI host).
    "nftables",
];

/// Cache directory for builds that outlive a clone.
pub fn cache_dir() -> PathBuf {
    env::var_os("PODMETER_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/podmeter"), PathBuf::from)
}

fn bpf_linker_dir() -> PathBuf {
    cache_dir().join(format!("bpf-linker-{BPF_LINKER}-llvm{LLVM_MAJOR}"))
}

/// PATH with the cached tools first, for child processes.
pub fn path_with_tools() -> String {
    let bin = bpf_linker_dir().join("bin");
    match env::var("PATH") {
        Ok(p) => format!("{}:{p}", bin.display()),
        Err(_) => bin.display().to_string(),
    }
}

/// The nightly pinned in `agent-ebpf/rust-toolchain.toml`.
pub fn ebpf_toolchain() -> Result<String> {
    let file = root().join("agent-ebpf/rust-toolchain.toml");
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|r| r.trim_start().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .next()
        .with_context(|| format!("no channel in {}", file.display()))
}

/// `cargo xtask setup`'s options (none).
#[derive(clap::Args)]
pub struct Options {}

pub fn run(_: &Options) -> Result<()> {
    all()
}

/// Everything, in dependency order.
pub fn all() -> Result<()> {
    build()?;
    apt(TEST_PACKAGES)
}

/// What building and linting the agent needs: LLVM, the pinned nightly
/// and bpf-linker; none of the test tools.
pub fn build() -> Result<()> {
    apt(BUILD_PACKAGES)?;
    nightly()?;
    bpf_linker()
}

fn ok(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

/// An exclusive lock on `<cache>/locks/<name>.lock`, held until the file
/// is dropped. Two xtask processes (CI's background `prebuild` and the
/// phase that needs the same thing) then never build, install or fetch one
/// thing at once: the later one waits, and finds it done. Never held while
/// taking another.
pub fn lock(name: &str) -> Result<fs::File> {
    lock_in(&cache_dir().join("locks"), name)
}

fn lock_in(dir: &Path, name: &str) -> Result<fs::File> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{name}.lock"));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            eprintln!(
                "setup: waiting for {name}: another xtask (CI's background prebuild?) holds {}",
                path.display()
            );
            file.lock()
                .with_context(|| format!("locking {}", path.display()))?;
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    Ok(file)
}

/// Installs the Debian `packages` that are missing.
pub fn apt(packages: &[&str]) -> Result<()> {
    let missing = || -> Vec<&str> {
        packages
            .iter()
            .copied()
            .filter(|p| {
                let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
                !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
            })
            .collect()
    };
    if missing().is_empty() {
        return Ok(());
    }
    // dpkg's own lock fails a second apt-get at once instead of waiting.
    let _apt = lock("apt")?;
    let missing = missing();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    sh(uninterrupted(
        Command::new("apt-get").args(["update", "-qq"]),
    ))
    .context("apt-get update failed; setup needs root and Debian's package servers")?;
    sh(uninterrupted(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    ))
}

/// `cmd` in a process group of its own, so a signal to the caller's
/// group (Ctrl-C, or `.ci/run` stopping its background prebuild) does not
/// cut it short: a dpkg or rustup killed mid-install leaves the machine
/// for the next run to repair by hand. If xtask is killed meanwhile, the
/// command runs to its end on its own.
pub fn uninterrupted(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt as _;
    cmd.process_group(0)
}

/// Installs the pinned nightly (with rust-src and clippy) if missing.
pub fn nightly() -> Result<()> {
    let tc = ebpf_toolchain()?;
    let has_src = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", &tc])
        .output()
        .map(|o| {
            let s = String::from_utf8_lossy(&o.stdout);
            o.status.success() && s.contains("rust-src") && s.contains("clippy")
        })
        .unwrap_or(false);
    if has_src {
        return Ok(());
    }
    // rustup has no lock of its own (CI's prebuild adds a cross target).
    let _rustup = lock("rustup")?;
    eprintln!("setup: installing Rust {tc} with rust-src and clippy (for the eBPF crate)");
    sh(uninterrupted(Command::new("rustup").args([
        "toolchain",
        "install",
        &tc,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
        "--component",
        "clippy",
    ])))
}

/// The binary of a tool installed from crates.io with `cargo install
/// --locked <krate>@<version>` into the cache (once, on first use).
pub fn cargo_tool(krate: &str, version: &str) -> Result<PathBuf> {
    let dir = cache_dir().join(format!("{krate}-{version}"));
    let bin = dir.join("bin").join(krate);
    if bin.exists() {
        return Ok(bin);
    }
    let _lock = lock(&format!("{krate}-{version}"))?;
    if !bin.exists() {
        eprintln!(
            "setup: building {krate} {version} into {} (once)",
            dir.display()
        );
        sh(&mut cargo_install(krate, version, &dir))?;
        cargo_install_done(&dir);
    }
    Ok(bin)
}

/// `cargo install --locked --force <krate>@<version> --root <dir>`, built
/// in a target directory of its own: in the workspace's, it would hold
/// cargo's lock on `release/` for minutes, and a `cargo build --release`
/// running at the same time (CI's background prebuild) would wait.
fn cargo_install(krate: &str, version: &str, dir: &Path) -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args([
        "install",
        "--locked",
        "--force",
        &format!("{krate}@{version}"),
    ])
    .arg("--root")
    .arg(dir)
    .env("CARGO_TARGET_DIR", dir.join("build"));
    c
}

/// Removes what [`cargo_install`] built from once the binary is installed.
fn cargo_install_done(dir: &Path) {
    let _ = fs::remove_dir_all(dir.join("build"));
}

fn bpf_linker() -> Result<()> {
    let dir = bpf_linker_dir();
    let bin = dir.join("bin/bpf-linker");
    let guard = if ok(Command::new(&bin).arg("--version")) {
        None
    } else {
        Some(lock(&format!("bpf-linker-{BPF_LINKER}"))?)
    };
    if guard.is_some() && !ok(Command::new(&bin).arg("--version")) {
        eprintln!(
            "setup: building bpf-linker {BPF_LINKER} against LLVM {LLVM_MAJOR} into {} (a few minutes, once)",
            dir.display()
        );
        let llvm = format!("/usr/lib/llvm-{LLVM_MAJOR}");
        if !Path::new(&llvm).exists() {
            bail!(
                "{llvm} is missing; install llvm-{LLVM_MAJOR}-dev (cargo xtask setup does, as root)"
            );
        }
        sh(cargo_install("bpf-linker", BPF_LINKER, &dir)
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{LLVM_MAJOR}"),
            ])
            .env("LLVM_PREFIX", &llvm))?;
        cargo_install_done(&dir);
    }
    drop(guard);
    // Make it visible to a plain `cargo build` too (rustc calls `bpf-linker`).
    let cargo_home = env::var_os("CARGO_HOME").map_or_else(
        || PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cargo"),
        PathBuf::from,
    );
    let link = cargo_home.join("bin/bpf-linker");
    if fs::read_link(&link).ok().as_deref() != Some(bin.as_path()) {
        let _ = fs::remove_file(&link);
        if let Err(e) = std::os::unix::fs::symlink(&bin, &link) {
            eprintln!(
                "setup: note: could not link {} ({e}); `cargo xtask` still finds bpf-linker",
                link.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{sync::mpsc, thread, time::Duration};

    use super::*;

    #[test]
    fn a_held_lock_makes_the_second_taker_wait_until_it_is_dropped() {
        let dir = env::temp_dir().join(format!("xtask-lock-test-{}", std::process::id()));
        let first = lock_in(&dir, "tool").unwrap();
        let (tx, rx) = mpsc::channel();
        let waiter = {
            let dir = dir.clone();
            thread::spawn(move || {
                let second = lock_in(&dir, "tool").unwrap();
                tx.send(()).unwrap();
                drop(second);
            })
        };
        // Another name is not held.
        drop(lock_in(&dir, "other").unwrap());
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "the second taker got the lock while the first held it"
        );
        drop(first);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the second taker never got the lock after the first let go");
        waiter.join().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
