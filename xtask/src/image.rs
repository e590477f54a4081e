//! OCI images without Docker: a single-layer image written as an OCI image
//! layout tarball, which `ctr images import` (and podman, skopeo) load.
//!
//! Dynamically linked binaries are shipped with the shared libraries `ldd`
//! names, at the same paths, so the image needs no base image.
//!
//! `cargo xtask image` builds podmeter's image and imports it into the local
//! cluster if it is up; the e2e tests also use the tests' workload image.

use std::{
    collections::BTreeSet,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::{build, cargo, cluster, cmd::target_dir, sh};

/// `cargo xtask image`'s options (none).
#[derive(clap::Args)]
pub struct Options {}

pub fn run(_: &Options) -> Result<()> {
    let tar = podmeter()?;
    if cluster::containerd_sock().exists() {
        import(&tar, &cluster::containerd_sock())?;
        eprintln!("image: imported {PODMETER} into the cluster's containerd");
    }
    Ok(())
}

/// The image reference the manifests use.
pub const PODMETER: &str = "localhost/podmeter:dev";

/// [`PODMETER`] under the tag the e2e tests upgrade to.
pub const PODMETER_NEXT: &str = "localhost/podmeter:next";

/// Builds the release agent and its OCI image; returns the tarball.
pub fn podmeter() -> Result<PathBuf> {
    build::agent(true)?;
    let target = target_dir();
    let bin = target.join("podmeter.stripped");
    sh(Command::new("strip")
        .arg("-o")
        .arg(&bin)
        .arg(target.join("release/podmeter")))?;
    let tar = target.join("podmeter.oci.tar");
    build(
        &Spec {
            name: PODMETER,
            files: with_libs(&bin, "/podmeter")?,
            symlinks: vec![],
            entrypoint: vec!["/podmeter".into()],
        },
        &tar,
    )?;
    eprintln!("image: {PODMETER} written to {}", tar.display());
    Ok(tar)
}

/// The tests' `pm-work` workload helper (release), for e2e images and the
/// bench.
pub fn build_pm_work() -> Result<()> {
    sh(cargo().args([
        "build",
        "--release",
        "--package",
        "podmeter-tests",
        "--bin",
        "pm-work",
    ]))
}

/// busybox and the tests' `pm-work` helper, for the e2e workloads.
pub fn testwork() -> Result<PathBuf> {
    build_pm_work()?;
    let mut files = with_libs(&target_dir().join("release/pm-work"), "/pm-work")?;
    files.push((PathBuf::from("/bin/busybox"), "/bin/busybox".into()));
    let tar = target_dir().join("testwork.oci.tar");
    build(
        &Spec {
            name: "localhost/podmeter-testwork:dev",
            files,
            symlinks: vec![("/bin/sh".into(), "busybox".into())],
            entrypoint: vec!["/pm-work".into()],
        },
        &tar,
    )?;
    Ok(tar)
}

/// What goes into an image.
pub struct Spec<'a> {
    /// Reference it is imported under, e.g. `localhost/podmeter:dev`.
    pub name: &'a str,
    /// `(file on this host, path in the image)`.
    pub files: Vec<(PathBuf, String)>,
    /// `(link path in the image, target)`.
    pub symlinks: Vec<(String, String)>,
    /// Entrypoint.
    pub entrypoint: Vec<String>,
}

/// Shared libraries (and the loader) that `binary` loads, per `ldd`.
pub fn shared_libs(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || !out.status.success() {
        return Ok(Vec::new());
    }
    let mut libs = BTreeSet::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line
            .split("=>")
            .nth(1)
            .unwrap_or(line)
            .split_whitespace()
            .next()
            .unwrap_or("");
        if path.starts_with('/') {
            libs.insert(PathBuf::from(path));
        }
    }
    Ok(libs.into_iter().collect())
}

/// `binary` at `dest` plus its libraries.
pub fn with_libs(binary: &Path, dest: &str) -> Result<Vec<(PathBuf, String)>> {
    let mut files = vec![(binary.to_owned(), dest.to_owned())];
    for lib in shared_libs(binary)? {
        let dest = lib.display().to_string();
        // Copy the file a symlinked library name resolves to, under that name.
        files.push((fs::canonicalize(&lib)?, dest));
    }
    Ok(files)
}

fn sha256(data: &[u8]) -> String {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

fn layer(spec: &Spec<'_>) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    tar.mode(tar::HeaderMode::Deterministic);
    let mut dirs = BTreeSet::new();
    let all_paths = spec
        .files
        .iter()
        .map(|(_, d)| d.as_str())
        .chain(spec.symlinks.iter().map(|(l, _)| l.as_str()));
    for path in all_paths {
        let mut p = Path::new(path.trim_start_matches('/'));
        while let Some(parent) = p.parent().filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(parent.to_owned());
            p = parent;
        }
    }
    for dir in dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        tar.append_data(&mut h, &dir, std::io::empty())?;
    }
    for (src, dest) in &spec.files {
        let data = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, dest.trim_start_matches('/'), data.as_slice())?;
    }
    for (link, target) in &spec.symlinks {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        tar.append_link(&mut h, link.trim_start_matches('/'), target)?;
    }
    Ok(tar.into_inner()?)
}

/// Writes the image as an OCI layout tarball at `out`.
pub fn build(spec: &Spec<'_>, out: &Path) -> Result<()> {
    let layer = layer(spec)?;
    let layer_digest = sha256(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Entrypoint": spec.entrypoint, "Env": ["PATH=/bin:/usr/bin"] },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len() }],
    }))?;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256(&manifest),
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": spec.name,
                "org.opencontainers.image.ref.name": spec.name.rsplit(':').next().unwrap_or("latest"),
            },
        }],
    }))?;

    let mut tar = tar::Builder::new(
        fs::File::create(out).with_context(|| format!("creating {}", out.display()))?,
    );
    tar.mode(tar::HeaderMode::Deterministic);
    let mut add = |path: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, path, data)?;
        Ok(())
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    for blob in [&layer, &config, &manifest] {
        let d = sha256(blob);
        add(
            &format!("blobs/sha256/{}", d.trim_start_matches("sha256:")),
            blob,
        )?;
    }
    tar.into_inner()?.flush()?;
    Ok(())
}

/// Tags image `from` as `to` in containerd's `k8s.io` namespace (replacing
/// an older `to`).
pub fn tag(from: &str, to: &str, containerd_sock: &Path) -> Result<()> {
    let st = Command::new("ctr")
        .arg("--address")
        .arg(containerd_sock)
        .args(["-n", "k8s.io", "images", "tag", "--force", from, to])
        .status()
        .context("running ctr")?;
    if !st.success() {
        bail!("ctr images tag {from} {to} failed: {st}");
    }
    Ok(())
}

/// Imports an OCI layout tarball into containerd's `k8s.io` namespace.
pub fn import(tarball: &Path, containerd_sock: &Path) -> Result<()> {
    let st = Command::new("ctr")
        .arg("--address")
        .arg(containerd_sock)
        .args(["-n", "k8s.io", "images", "import"])
        .arg(tarball)
        .status()
        .context("running ctr")?;
    if !st.success() {
        bail!("ctr images import {} failed: {st}", tarball.display());
    }
    Ok(())
}
