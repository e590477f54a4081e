//! The CPU architectures podmeter ships for, and what building for and
//! running on the one that is not this host's takes: a cross toolchain
//! (Debian's `gcc-aarch64-linux-gnu`, the rustup target), qemu for it, and
//! a Debian userland of its own (busybox, dash, iproute2, bpftool,
//! util-linux, nftables and their libraries) for the VMs and the image.
//!
//! Debian packages of another architecture come from the package registry
//! through apt's ordinary client with a private sources list, state and
//! architecture (the machine's apt configuration is left alone), and are
//! unpacked, not installed, under `/var/cache/podmeter/userland-<arch>/`.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd::output, setup, sh};

/// An architecture of Debian's and Kubernetes' naming.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// The architecture xtask runs on (x86-64 on podmeter's CI).
    pub const HOST: Arch = if cfg!(target_arch = "aarch64") {
        Arch::Arm64
    } else {
        Arch::Amd64
    };

    /// Debian's and the OCI platform's name.
    pub const fn name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The Rust target to build for, `None` for the host's.
    pub fn rust_target(self) -> Option<&'static str> {
        (self != Self::HOST).then_some(self.triple())
    }

    /// Its Rust target triple.
    pub const fn triple(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-gnu",
            Arch::Arm64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// `binutils` of the architecture (`strip` of the host's cannot read
    /// another architecture's ELF).
    pub fn strip(self) -> &'static str {
        match self {
            _ if self == Self::HOST => "strip",
            Arch::Amd64 => "x86_64-linux-gnu-strip",
            Arch::Arm64 => "aarch64-linux-gnu-strip",
        }
    }

    /// Where cargo puts release binaries built for it.
    pub fn release_dir(self) -> PathBuf {
        match self.rust_target() {
            None => crate::cmd::target_dir().join("release"),
            Some(t) => cross_target_dir().join(t).join("release"),
        }
    }

    /// Adds `--target` and the cross toolchain's environment to a cargo
    /// command, installing the toolchain first if it is missing.
    pub fn cargo_args(self, cargo: &mut Command) -> Result<()> {
        let Some(target) = self.rust_target() else {
            return Ok(());
        };
        cross_toolchain(self)?;
        let gcc = format!("{}-linux-gnu-gcc", gnu(self));
        let env_target = target.replace('-', "_");
        cargo
            .args(["--target", target])
            .env("CARGO_TARGET_DIR", cross_target_dir())
            .env(
                format!("CARGO_TARGET_{}_LINKER", env_target.to_uppercase()),
                &gcc,
            )
            // `ring`'s C and assembly.
            .env(format!("CC_{env_target}"), &gcc)
            .env(
                format!("AR_{env_target}"),
                format!("{}-linux-gnu-ar", gnu(self)),
            );
        Ok(())
    }
}

/// Where cross builds go: a target directory of their own. A cross build
/// also locks the host's `release/` (its build scripts and proc macros go
/// there), so in the workspace's one, CI's background prebuild of the arm64
/// agent would make every host build of the test phases wait for it.
fn cross_target_dir() -> PathBuf {
    crate::cmd::target_dir().join("cross")
}

/// The GNU triplet's first part.
fn gnu(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "x86_64",
        Arch::Arm64 => "aarch64",
    }
}

/// Debian's cross compiler and C library for `arch`, and the rustup target.
fn cross_toolchain(arch: Arch) -> Result<()> {
    let (gcc, libc) = match arch {
        Arch::Amd64 => ("gcc-x86-64-linux-gnu", "libc6-dev-amd64-cross"),
        Arch::Arm64 => ("gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"),
    };
    setup::apt(&[gcc, libc])?;
    let target = arch.rust_target().expect("a foreign architecture");
    let _rustup = setup::lock("rustup")?;
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup")?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == target)
    {
        sh(setup::uninterrupted(
            Command::new("rustup").args(["target", "add", target]),
        ))?;
    }
    Ok(())
}

/// apt with a private sources list, state and architecture, under the
/// cache: `dir` keeps its lists and downloads.
pub fn apt_private(tool: &str, dir: &Path, arch: Arch) -> Result<Command> {
    for d in ["lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(dir.join(d))?;
    }
    let list = dir.join("sources.list");
    let mut text = String::new();
    for suite in ["bullseye", "bookworm"] {
        let _ = writeln!(
            text,
            "deb [trusted=yes] http://deb.debian.org/debian {suite} main\n\
             deb [trusted=yes] http://deb.debian.org/debian-security {suite}-security main"
        );
    }
    fs::write(&list, text)?;
    let mut c = Command::new(tool);
    for (k, v) in [
        ("Dir::Etc::SourceList", list.display().to_string()),
        ("Dir::Etc::SourceParts", "/dev/null".into()),
        ("Dir::State::Lists", dir.join("lists").display().to_string()),
        ("Dir::Cache", dir.join("cache").display().to_string()),
        // Downloads land in the cache, which the _apt user cannot write.
        ("APT::Sandbox::User", "root".into()),
        ("APT::Architecture", arch.name().into()),
        ("APT::Architectures", arch.name().into()),
    ] {
        c.arg("-o").arg(format!("{k}={v}"));
    }
    Ok(c)
}

/// What a VM's userland needs, by Debian package; their dependencies come
/// along.
const USERLAND: &[&str] = &[
    "busybox-static",
    "dash",
    "iproute2",
    "bpftool",
    "util-linux",
    "nftables",
    "libc6",
];

/// A Debian userland of `arch` (bookworm's packages, with their
/// dependencies), unpacked once and cached. Its files are not run here:
/// they are copied into `arch`'s VMs and image.
pub fn userland(arch: Arch) -> Result<PathBuf> {
    let cache = setup::cache_dir();
    let dir = cache.join(format!("userland-{}", arch.name()));
    let root = dir.join("root");
    // The package list it was made from: a changed list makes it again.
    let marker = dir.join("packages");
    let contents = dir.join(CONTENTS);
    let made = || {
        fs::read_to_string(&marker).is_ok_and(|m| m == USERLAND.join(" "))
            && root.exists()
            && contents.exists()
    };
    if made() {
        return Ok(root);
    }
    // CI's background prebuild may be fetching it: wait, then use it.
    let _lock = setup::lock(&format!("userland-{}", arch.name()))?;
    if made() {
        return Ok(root);
    }
    let _ = fs::remove_dir_all(&root);
    let _ = fs::remove_file(&marker);
    eprintln!(
        "arch: fetching a Debian {} userland ({}, with dependencies; once, cached under {})",
        arch.name(),
        USERLAND.join(" "),
        dir.display()
    );
    let apt = dir.join("apt");
    sh(apt_private("apt-get", &apt, arch)?.args(["update", "-qq"]))?;
    let out = output(
        apt_private("apt-cache", &apt, arch)?
            .args(["depends", "--recurse", "--no-recommends", "--no-suggests"])
            .args([
                "--no-conflicts",
                "--no-breaks",
                "--no-replaces",
                "--no-enhances",
            ])
            .args(USERLAND),
    )?;
    // Top-level lines are packages; indented ones their dependencies, which
    // appear again at top level. `<virtual>` packages have no file.
    let packages: BTreeSet<&str> = out
        .lines()
        .filter(|l| !l.starts_with([' ', '<']) && !l.is_empty())
        .collect();
    let debs = dir.join("debs");
    let _ = fs::remove_dir_all(&debs);
    fs::create_dir_all(&debs)?;
    sh(apt_private("apt-get", &apt, arch)?
        .arg("download")
        .args(&packages)
        .current_dir(&debs))?;
    let partial = dir.join("root.partial");
    let _ = fs::remove_dir_all(&partial);
    let mut owners = String::new();
    for deb in fs::read_dir(&debs)?.flatten() {
        sh(Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb.path())
            .arg(&partial))?;
        owners += &deb_contents(&deb.path())?;
    }
    fs::write(&contents, owners)?;
    fs::rename(&partial, &root)?;
    fs::remove_dir_all(&debs)?;
    fs::write(&marker, USERLAND.join(" "))?;
    Ok(root)
}

/// Which package of a userland put each of its files there (for the
/// release's bill of materials): `<path>\t<package>\t<version>` lines.
const CONTENTS: &str = "contents.tsv";

/// [`CONTENTS`] lines for one `.deb`.
fn deb_contents(deb: &Path) -> Result<String> {
    let field = |name: &str| -> Result<String> {
        Ok(
            output(Command::new("dpkg-deb").arg("--field").arg(deb).arg(name))?
                .trim()
                .to_owned(),
        )
    };
    let (package, version) = (field("Package")?, field("Version")?);
    let out = output(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    Ok(listed_files(&out)
        .map(|path| format!("{path}\t{package}\t{version}\n"))
        .collect())
}

/// The files and symlinks of a `dpkg-deb --contents` listing, as absolute
/// paths (`drwxr-xr-x root/root 0 2025-01-01 00:00 ./usr/lib/`,
/// `lrwxrwxrwx root/root 0 2025-01-01 00:00 ./lib/ld.so.1 -> x/ld.so.1`).
fn listed_files(listing: &str) -> impl Iterator<Item = String> + '_ {
    listing.lines().filter_map(|line| {
        let path = line.split_whitespace().nth(5)?;
        let path = path.strip_prefix('.')?;
        (!path.ends_with('/')).then(|| path.to_owned())
    })
}

/// A Debian-format package, as a package URL names it.
#[derive(Debug, Clone, PartialEq)]
pub struct DebPackage {
    pub name: String,
    pub version: String,
    /// The purl namespace: the distribution's `ID` (`debian`, `ubuntu`).
    pub vendor: String,
    /// The purl `distro` qualifier (`debian-12`), where known.
    pub distro: Option<String>,
}

/// The package that put `file` (a path in the image, e.g.
/// `/lib/x86_64-linux-gnu/libc.so.6`) into the image of `arch`: for the
/// host's architecture the host's own (its `dpkg`, of whatever
/// distribution the build runs on: the image ships the host's files); for
/// the other, the Debian userland's recorded contents.
pub fn package_of(arch: Arch, file: &str) -> Result<DebPackage> {
    if arch == Arch::HOST {
        return host_package_of(file);
    }
    userland(arch)?;
    let contents = setup::cache_dir()
        .join(format!("userland-{}", arch.name()))
        .join(CONTENTS);
    let text = fs::read_to_string(&contents)?;
    text.lines()
        .find_map(|l| {
            let mut f = l.split('\t');
            (f.next() == Some(file)).then(|| DebPackage {
                name: f.next().unwrap_or_default().to_owned(),
                version: f.next().unwrap_or_default().to_owned(),
                // From deb.debian.org (bookworm, or bullseye where only it
                // has a package).
                vendor: "debian".to_owned(),
                distro: None,
            })
        })
        .with_context(|| format!("no package of the {} userland has {file}", arch.name()))
}

/// [`package_of`] on this host: `dpkg --search`, trying the path as given
/// and as resolved (merged /usr: the package may list either).
fn host_package_of(file: &str) -> Result<DebPackage> {
    let mut tried = vec![file.to_owned()];
    if let Ok(real) = fs::canonicalize(file) {
        tried.push(real.to_string_lossy().into_owned());
    }
    for path in &tried {
        let out = Command::new("dpkg")
            .args(["--search", path])
            .output()
            .context("running dpkg --search")?;
        if !out.status.success() {
            continue;
        }
        let Some(package) = owner(&String::from_utf8_lossy(&out.stdout)) else {
            continue;
        };
        let version = output(Command::new("dpkg-query").args([
            "--show",
            "--showformat",
            "${Version}",
            &package,
        ]))?;
        let release = fs::read_to_string("/etc/os-release").unwrap_or_default();
        let field = |key: &str| {
            release
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(|v| v.trim_matches('"').to_owned())
        };
        let vendor = field("ID").unwrap_or_else(|| "debian".to_owned());
        return Ok(DebPackage {
            name: package.split(':').next().unwrap_or(&package).to_owned(),
            version: version.trim().to_owned(),
            distro: field("VERSION_ID").map(|v| format!("{vendor}-{v}")),
            vendor,
        });
    }
    bail!("no Debian package of this host has {}", tried.join(" or "))
}

/// The package `dpkg --search` names for one path
/// (`libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6`), past any
/// `diversion by ...` lines; the first of several.
fn owner(search: &str) -> Option<String> {
    search
        .lines()
        .filter(|l| !l.starts_with("diversion by "))
        .find_map(|l| l.split(": ").next())
        .and_then(|p| p.split(", ").next())
        .map(str::to_owned)
}

/// A program of the userland at `root`, by its name (the directories
/// differ between Debian releases: bookworm's `ip` is `/bin/ip`).
pub fn find_program(root: &Path, name: &str) -> Result<PathBuf> {
    ["bin", "sbin", "usr/bin", "usr/sbin"]
        .iter()
        .map(|d| root.join(d).join(name))
        .find(|p| p.exists() && !p.is_symlink())
        .with_context(|| format!("no program {name} in {}", root.display()))
}

/// The libraries `binary` loads, itself and through the ones it loads, and
/// its loader, as paths from the userland's `root` (where they also go in a
/// VM or image). The host's `ldd` cannot run another architecture's
/// binaries, so this follows `DT_NEEDED` with `readelf`.
pub fn shared_libs(binary: &Path, root: &Path) -> Result<Vec<String>> {
    let mut found = BTreeSet::new();
    let mut todo = vec![binary.to_owned()];
    while let Some(file) = todo.pop() {
        let text = output(
            Command::new("readelf")
                .args(["--dynamic", "--program-headers", "--wide"])
                .arg(&file),
        )?;
        let mut wanted = Vec::new();
        for line in text.lines() {
            // `[Requesting program interpreter: /lib/ld-linux-aarch64.so.1]`
            if let Some(rest) = line.split("program interpreter: ").nth(1) {
                wanted.push(rest.trim_end_matches(']').trim().to_owned());
            } else if line.contains("(NEEDED)")
                && let Some(lib) = line.split('[').nth(1)
            {
                wanted.push(lib.trim_end_matches(']').to_owned());
            }
        }
        for lib in wanted {
            let rel = if lib.starts_with('/') {
                lib.trim_start_matches('/').to_owned()
            } else {
                ["lib", "usr/lib"]
                    .iter()
                    .flat_map(|d| {
                        [
                            format!("{d}/{}-linux-gnu/{lib}", gnu_of(root)),
                            format!("{d}/{lib}"),
                        ]
                    })
                    .find(|p| root.join(p).exists())
                    .with_context(|| {
                        format!(
                            "{} needs {lib}, which is not in {}",
                            file.display(),
                            root.display()
                        )
                    })?
            };
            if found.insert(rel.clone()) {
                todo.push(root.join(&rel));
            }
        }
    }
    Ok(found.into_iter().collect())
}

/// The GNU triplet's first part of the userland at `root`.
fn gnu_of(root: &Path) -> &'static str {
    if root.join("lib/aarch64-linux-gnu").exists() {
        "aarch64"
    } else {
        "x86_64"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_search_names_the_owner_past_diversions() {
        assert_eq!(
            owner("libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6\n").as_deref(),
            Some("libc6:amd64")
        );
        assert_eq!(
            owner("diversion by x from: /bin/sh\ndiversion by x to: /bin/sh.d\ndash: /bin/sh\n")
                .as_deref(),
            Some("dash")
        );
        assert_eq!(owner("a, b: /usr/share/doc\n").as_deref(), Some("a"));
        assert_eq!(owner(""), None);
    }

    #[test]
    fn a_deb_listing_gives_its_files_and_links_not_its_directories() {
        let listing = "\
drwxr-xr-x root/root         0 2025-06-01 12:00 ./
drwxr-xr-x root/root         0 2025-06-01 12:00 ./lib/aarch64-linux-gnu/
-rwxr-xr-x root/root   1633000 2025-06-01 12:00 ./lib/aarch64-linux-gnu/libc.so.6
lrwxrwxrwx root/root         0 2025-06-01 12:00 ./lib/ld-linux-aarch64.so.1 -> aarch64-linux-gnu/ld-linux-aarch64.so.1
";
        let files: Vec<String> = listed_files(listing).collect();
        assert_eq!(
            files,
            [
                "/lib/aarch64-linux-gnu/libc.so.6",
                "/lib/ld-linux-aarch64.so.1"
            ]
        );
    }
}
