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

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::{arch::Arch, build, cargo, cluster, cmd::target_dir, sh};

/// `cargo xtask image`'s options.
#[derive(clap::Args)]
pub struct Options {
    /// Only this host's architecture (amd64), not the multi-architecture
    /// image (amd64 and arm64, whose agent is cross-built).
    #[arg(long)]
    pub host_only: bool,
}

/// Writes `target/podmeter.oci.tar` (this host's image, imported into the
/// local cluster if it is up) and, unless `--host-only`,
/// `target/podmeter-multiarch.oci.tar`: one image index with an amd64 and
/// an arm64 image, for a registry (`skopeo copy --all oci-archive:...`).
pub fn run(opts: &Options) -> Result<()> {
    let tar = podmeter()?;
    if cluster::containerd_sock().exists() {
        import(&tar, &cluster::containerd_sock())?;
        eprintln!("image: imported {PODMETER} into the cluster's containerd");
    }
    if opts.host_only {
        return Ok(());
    }
    let archs = [Arch::Amd64, Arch::Arm64];
    let mut specs = Vec::new();
    for arch in archs {
        specs.push(podmeter_spec(arch)?);
    }
    let images: Vec<(Arch, &Spec<'_>)> = archs.into_iter().zip(&specs).collect();
    let multi = target_dir().join("podmeter-multiarch.oci.tar");
    build_index(PODMETER, &images, &multi)?;
    eprintln!(
        "image: {PODMETER} for {} written to {}",
        archs.map(Arch::name).join(" and "),
        multi.display()
    );
    Ok(())
}

/// The image reference the manifests use.
pub const PODMETER: &str = "localhost/podmeter:dev";

/// [`PODMETER`] under the tag the e2e tests upgrade to.
pub const PODMETER_NEXT: &str = "localhost/podmeter:next";

/// Builds the release agent and its OCI image for this host; returns the
/// tarball.
pub fn podmeter() -> Result<PathBuf> {
    let spec = podmeter_spec(Arch::HOST)?;
    let tar = target_dir().join("podmeter.oci.tar");
    build(&spec, &tar)?;
    eprintln!("image: {PODMETER} written to {}", tar.display());
    Ok(tar)
}

/// The release agent for `arch`, stripped, with its libraries: the host's
/// (per `ldd`) or those of a Debian userland of `arch` (see `arch.rs`).
pub fn podmeter_spec(arch: Arch) -> Result<Spec<'static>> {
    let files = if arch == Arch::HOST {
        build::agent(true)?;
        let bin = target_dir().join("podmeter.stripped");
        sh(Command::new(arch.strip())
            .arg("-o")
            .arg(&bin)
            .arg(arch.release_dir().join("podmeter")))?;
        with_libs(&bin, "/podmeter")?
    } else {
        build::agent_for(arch)?;
        let bin = target_dir().join(format!("podmeter-{}.stripped", arch.name()));
        sh(Command::new(arch.strip())
            .arg("-o")
            .arg(&bin)
            .arg(arch.release_dir().join("podmeter")))?;
        let userland = crate::arch::userland(arch)?;
        let mut files = vec![(bin.clone(), "/podmeter".to_owned())];
        for rel in crate::arch::shared_libs(&bin, &userland)? {
            files.push((userland.join(&rel), format!("/{rel}")));
        }
        files
    };
    Ok(Spec {
        name: PODMETER,
        files,
        symlinks: vec![],
        entrypoint: vec!["/podmeter".into()],
    })
}

/// The tests' `pm-work` workload helper (release), for e2e images and the
/// bench.
pub fn build_pm_work() -> Result<()> {
    build_pm_work_for(Arch::HOST)
}

/// [`build_pm_work`] for `arch`.
pub fn build_pm_work_for(arch: Arch) -> Result<()> {
    let mut c = cargo();
    c.args([
        "build",
        "--release",
        "--package",
        "podmeter-tests",
        "--bin",
        "pm-work",
    ]);
    arch.cargo_args(&mut c)?;
    sh(&mut c)
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

/// The configuration digest of each architecture's image in an OCI layout
/// tarball written by [`build_index`] with several architectures.
pub fn platform_configs(archive: &Path) -> Result<std::collections::BTreeMap<String, String>> {
    let mut files = std::collections::BTreeMap::new();
    let mut tar = tar::Archive::new(
        fs::File::open(archive).with_context(|| format!("opening {}", archive.display()))?,
    );
    for entry in tar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data)?;
        files.insert(path, data);
    }
    let blob = |digest: &str| -> Result<serde_json::Value> {
        let path = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
        let data = files
            .get(&path)
            .with_context(|| format!("{} has no {path}", archive.display()))?;
        Ok(serde_json::from_slice(data)?)
    };
    let index: serde_json::Value = serde_json::from_slice(
        files
            .get("index.json")
            .with_context(|| format!("{} has no index.json", archive.display()))?,
    )?;
    let top = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json names no manifest")?;
    let mut configs = std::collections::BTreeMap::new();
    for m in blob(top)?["manifests"].as_array().into_iter().flatten() {
        let arch = m["platform"]["architecture"].as_str().unwrap_or("?");
        let manifest = blob(m["digest"].as_str().unwrap_or_default())?;
        let config = manifest["config"]["digest"].as_str().unwrap_or_default();
        configs.insert(arch.to_owned(), config.to_owned());
    }
    ensure!(
        !configs.is_empty(),
        "{} holds no multi-architecture index",
        archive.display()
    );
    Ok(configs)
}

pub fn sha256(data: &[u8]) -> String {
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

/// Writes the image as an OCI layout tarball at `out`, for this host's
/// architecture.
pub fn build(spec: &Spec<'_>, out: &Path) -> Result<()> {
    build_index(spec.name, &[(Arch::HOST, spec)], out)
}

/// One platform's image: its layer, config and manifest blobs.
struct Platform {
    arch: Arch,
    blobs: [Vec<u8>; 3],
}

impl Platform {
    fn new(arch: Arch, spec: &Spec<'_>) -> Result<Self> {
        let layer = layer(spec)?;
        let layer_digest = sha256(&layer);
        let config = serde_json::to_vec(&json!({
            "architecture": arch.name(),
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
        Ok(Self {
            arch,
            blobs: [layer, config, manifest],
        })
    }

    /// The index's descriptor of the manifest.
    fn descriptor(&self) -> serde_json::Value {
        let manifest = &self.blobs[2];
        json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256(manifest),
            "size": manifest.len(),
            "platform": { "architecture": self.arch.name(), "os": "linux" },
        })
    }
}

/// Writes an OCI layout tarball at `out` holding `name` for each
/// architecture of `images`: one image, or, for several, an image index
/// (a multi-architecture image, which a node pulls its own platform of).
pub fn build_index(name: &str, images: &[(Arch, &Spec<'_>)], out: &Path) -> Result<()> {
    let platforms = images
        .iter()
        .map(|(arch, spec)| Platform::new(*arch, spec))
        .collect::<Result<Vec<_>>>()?;
    let mut blobs: Vec<Vec<u8>> = platforms.iter().flat_map(|p| p.blobs.clone()).collect();
    let mut top = match &platforms[..] {
        [one] => one.descriptor(),
        many => {
            let nested = serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": many.iter().map(Platform::descriptor).collect::<Vec<_>>(),
            }))?;
            let d = json!({
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": sha256(&nested),
                "size": nested.len(),
            });
            blobs.push(nested);
            d
        }
    };
    top["annotations"] = json!({
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": name.rsplit(':').next().unwrap_or("latest"),
    });
    let index = serde_json::to_vec(&json!({ "schemaVersion": 2, "manifests": [top] }))?;

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
    for blob in &blobs {
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

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, io::Read as _};

    use super::*;

    /// The files of an OCI layout tarball, by path.
    fn unpack(path: &Path) -> HashMap<String, Vec<u8>> {
        let mut out = HashMap::new();
        let mut tar = tar::Archive::new(fs::File::open(path).unwrap());
        for entry in tar.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().display().to_string();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            out.insert(name, data);
        }
        out
    }

    fn blob<'a>(files: &'a HashMap<String, Vec<u8>>, digest: &str) -> &'a [u8] {
        let data = &files[&format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))];
        assert_eq!(sha256(data), digest, "a blob's name is its digest");
        data
    }

    #[test]
    fn two_architectures_make_one_named_index_of_two_platform_images() {
        let dir = std::env::temp_dir().join(format!("pm-image-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        fs::write(&a, b"amd64 agent").unwrap();
        fs::write(&b, b"arm64 agent").unwrap();
        let spec = |f: &Path| Spec {
            name: "localhost/podmeter:dev",
            files: vec![(f.to_owned(), "/podmeter".into())],
            symlinks: vec![],
            entrypoint: vec!["/podmeter".into()],
        };
        let (sa, sb) = (spec(&a), spec(&b));
        let out = dir.join("multi.tar");
        build_index(
            "localhost/podmeter:dev",
            &[(Arch::Amd64, &sa), (Arch::Arm64, &sb)],
            &out,
        )
        .unwrap();
        let files = unpack(&out);
        let _ = fs::remove_dir_all(&dir);

        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let top = &index["manifests"].as_array().unwrap()[..];
        assert_eq!(top.len(), 1, "{index}");
        assert_eq!(
            top[0]["mediaType"],
            "application/vnd.oci.image.index.v1+json"
        );
        assert_eq!(
            top[0]["annotations"]["io.containerd.image.name"],
            "localhost/podmeter:dev"
        );
        let nested: serde_json::Value =
            serde_json::from_slice(blob(&files, top[0]["digest"].as_str().unwrap())).unwrap();
        let mut seen = Vec::new();
        for m in nested["manifests"].as_array().unwrap() {
            let arch = m["platform"]["architecture"].as_str().unwrap().to_owned();
            assert_eq!(m["platform"]["os"], "linux");
            let manifest: serde_json::Value =
                serde_json::from_slice(blob(&files, m["digest"].as_str().unwrap())).unwrap();
            let config: serde_json::Value = serde_json::from_slice(blob(
                &files,
                manifest["config"]["digest"].as_str().unwrap(),
            ))
            .unwrap();
            assert_eq!(config["architecture"], arch.as_str());
            // Each platform's layer holds its own agent.
            let layer = blob(&files, manifest["layers"][0]["digest"].as_str().unwrap());
            let mut tar = tar::Archive::new(layer);
            let mut agent = String::new();
            for e in tar.entries().unwrap() {
                let mut e = e.unwrap();
                if e.path().unwrap().to_str() == Some("podmeter") {
                    e.read_to_string(&mut agent).unwrap();
                }
            }
            assert_eq!(agent, format!("{arch} agent"));
            seen.push(arch);
        }
        assert_eq!(seen, ["amd64", "arm64"]);
    }

    #[test]
    fn one_architecture_is_a_plain_named_image() {
        let dir = std::env::temp_dir().join(format!("pm-image-one-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a");
        fs::write(&f, b"x").unwrap();
        let spec = Spec {
            name: "localhost/x:dev",
            files: vec![(f, "/x".into())],
            symlinks: vec![],
            entrypoint: vec!["/x".into()],
        };
        let out = dir.join("one.tar");
        build(&spec, &out).unwrap();
        let files = unpack(&out);
        let _ = fs::remove_dir_all(&dir);
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let m = &index["manifests"][0];
        assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
        assert_eq!(m["platform"]["architecture"], Arch::HOST.name());
        assert_eq!(m["annotations"]["org.opencontainers.image.ref.name"], "dev");
    }
}
