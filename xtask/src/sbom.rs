//! The release's software bill of materials: for each architecture of the
//! image, `podmeter-<version>-<arch>.cdx.json` (CycloneDX 1.5) lists what
//! that image holds:
//!
//! - the Rust crates compiled into the agent for that target, and into its
//!   eBPF object for `bpfel-unknown-none` (built by the agent's build
//!   script, so a graph of its own), from `cargo-cyclonedx`, the CycloneDX
//!   project's Cargo plugin, which reads `cargo metadata` and `Cargo.lock`
//!   (the crates are already fetched for the build); it runs on a copy of
//!   the agent's crates as a workspace of their own, so features that only
//!   the tests or xtask turn on add nothing;
//! - the distribution packages of the shared libraries shipped beside it
//!   (the image has no base image and no package database to scan): the
//!   build host's `dpkg` for this architecture's (Debian here, Ubuntu on
//!   the release workflow's runner), the Debian userland's recorded
//!   contents for the other's (`arch::package_of`).

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};

use crate::{
    arch::{Arch, DebPackage},
    root, setup, sh,
};

/// cargo-cyclonedx release, built from crates.io into the cache once.
const CARGO_CYCLONEDX: &str = "0.5.9";

/// cargo-cyclonedx, installed into the cache on first use.
pub fn cargo_cyclonedx() -> Result<PathBuf> {
    setup::cargo_tool("cargo-cyclonedx", CARGO_CYCLONEDX)
}

/// Writes the bill of materials of the image of `arch` to `out`. `files`
/// are the image's files as `(file on this host, path in the image)`, the
/// agent first and then its shared libraries.
pub fn write(arch: Arch, files: &[(PathBuf, String)], out: &Path) -> Result<()> {
    let tool = cargo_cyclonedx()?;
    let copy = workspace_copy()?;
    // One run per target: it writes `<name>.json` next to every member.
    let run = |target: &str, name: &str, member: &str| -> Result<Value> {
        sh(Command::new(&tool)
            .arg("cyclonedx")
            .arg("--manifest-path")
            .arg(copy.join("Cargo.toml"))
            .args(["--format", "json", "--spec-version", "1.5", "--all"])
            // Build scripts' dependencies are not in the binary.
            .arg("--no-build-deps")
            .args(["--target", target, "--override-filename", name])
            .arg("--quiet")
            .current_dir(&copy))
        .context("cargo-cyclonedx")?;
        let path = copy.join(member).join(format!("{name}.json"));
        let text = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    };
    let agent = run(arch.triple(), "sbom-agent", "agent")?;
    let ebpf = run("bpfel-unknown-none", "sbom-ebpf", "agent-ebpf")?;
    let mut libs = Vec::new();
    for (_, in_image) in files.iter().skip(1) {
        libs.push(Library {
            file: in_image.clone(),
            package: crate::arch::package_of(arch, in_image)?,
        });
    }
    let bom = merge(agent, ebpf, &libs, arch)?;
    fs::write(out, serde_json::to_vec_pretty(&bom)?)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// The crates the agent is built from, in the workspace's layout, under
/// the target directory, as a workspace of their own (the same lock
/// file): cargo-cyclonedx writes a file next to every member, and in the
/// checkout one written and removed in `agent-ebpf/` changes the directory
/// the agent's build script watches, which rebuilt the eBPF object and the
/// agent on the next build.
fn workspace_copy() -> Result<PathBuf> {
    const MEMBERS: &[&str] = &["agent", "agent-ebpf", "agent-ebpf/common"];
    let copy = crate::cmd::target_dir().join("sbom-workspace");
    let _ = fs::remove_dir_all(&copy);
    fs::create_dir_all(&copy)?;
    fs::copy(root().join("Cargo.lock"), copy.join("Cargo.lock"))?;
    let manifest = fs::read_to_string(root().join("Cargo.toml"))?;
    let members = format!(
        "[{}]",
        MEMBERS
            .iter()
            .map(|m| format!("{m:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut replaced = 0;
    let manifest: String = manifest
        .lines()
        .map(|l| {
            if l.starts_with("members = ") || l.starts_with("default-members = ") {
                replaced += 1;
                let key = l.split(" = ").next().unwrap_or_default();
                format!("{key} = {members}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    ensure!(
        replaced == 2,
        "the workspace Cargo.toml has no one-line members and default-members to narrow"
    );
    fs::write(copy.join("Cargo.toml"), manifest)?;
    for m in MEMBERS {
        crate::release::copy_dir(&root().join(m), &copy.join(m))?;
    }
    Ok(copy)
}

/// A shared library of the image and the package it comes from.
#[derive(Debug, PartialEq)]
struct Library {
    file: String,
    package: DebPackage,
}

/// The agent's bill of materials with the eBPF object's crates and the
/// shared libraries' packages added as components the agent depends on.
fn merge(mut bom: Value, ebpf: Value, libs: &[Library], arch: Arch) -> Result<Value> {
    let root_ref = bom["metadata"]["component"]["bom-ref"]
        .as_str()
        .context("the agent's bill of materials names no root component")?
        .to_owned();
    let ebpf_root = ebpf["metadata"]["component"].clone();
    let ebpf_ref = ebpf_root["bom-ref"]
        .as_str()
        .context("the eBPF crate's bill of materials names no root component")?
        .to_owned();

    let components = bom["components"]
        .as_array_mut()
        .context("no components in the agent's bill of materials")?;
    let mut seen: BTreeSet<String> = components
        .iter()
        .filter_map(|c| c["bom-ref"].as_str().map(str::to_owned))
        .collect();
    let mut added = Vec::new();
    for c in std::iter::once(&ebpf_root).chain(ebpf["components"].as_array().into_iter().flatten())
    {
        let r = c["bom-ref"].as_str().unwrap_or_default().to_owned();
        if seen.insert(r) {
            added.push(c.clone());
        }
    }
    let mut lib_refs = Vec::new();
    for l in libs {
        let p = &l.package;
        let mut purl = format!(
            "pkg:deb/{}/{}@{}?arch={}",
            p.vendor,
            p.name,
            p.version.replace('+', "%2B").replace(':', "%3A"),
            arch.name()
        );
        if let Some(d) = &p.distro {
            purl += &format!("&distro={d}");
        }
        if seen.insert(purl.clone()) {
            added.push(json!({
                "type": "library",
                "bom-ref": purl,
                "name": p.name,
                "version": p.version,
                "purl": purl,
                "properties": [{ "name": "podmeter:file", "value": l.file }],
            }));
            lib_refs.push(purl);
        } else if let Some(c) = added.iter_mut().find(|c| c["bom-ref"] == purl) {
            // Another file of the same package.
            c["properties"]
                .as_array_mut()
                .expect("made above")
                .push(json!({ "name": "podmeter:file", "value": l.file }));
        }
    }
    components.extend(added);

    let deps = bom["dependencies"]
        .as_array_mut()
        .context("no dependency graph in the agent's bill of materials")?;
    let mut have: BTreeSet<String> = deps
        .iter()
        .filter_map(|d| d["ref"].as_str().map(str::to_owned))
        .collect();
    for d in ebpf["dependencies"].as_array().into_iter().flatten() {
        if have.insert(d["ref"].as_str().unwrap_or_default().to_owned()) {
            deps.push(d.clone());
        }
    }
    let Some(root_deps) = deps.iter_mut().find(|d| d["ref"] == root_ref.as_str()) else {
        bail!("the agent's dependency graph has no entry for {root_ref}");
    };
    let depends_on = root_deps["dependsOn"]
        .as_array_mut()
        .context("the agent's graph entry has no dependsOn")?;
    depends_on.push(json!(ebpf_ref));
    depends_on.extend(lib_refs.iter().map(|r| json!(r)));
    for r in &lib_refs {
        deps.push(json!({ "ref": r, "dependsOn": [] }));
    }

    let arch_property = json!({ "name": "podmeter:arch", "value": arch.name() });
    match bom["metadata"]["properties"].as_array_mut() {
        Some(p) => p.push(arch_property),
        None => bom["metadata"]["properties"] = json!([arch_property]),
    }
    Ok(bom)
}

/// What a release checks of a bill of materials before publishing it: the
/// crates of both graphs and the libraries are in it.
pub fn check(path: &Path, must_have: &[&str]) -> Result<usize> {
    let bom: Value = serde_json::from_slice(&fs::read(path)?)?;
    let names: BTreeSet<&str> = std::iter::once(&bom["metadata"]["component"])
        .chain(bom["components"].as_array().into_iter().flatten())
        .filter_map(|c| c["name"].as_str())
        .collect();
    for want in must_have {
        ensure!(
            names.contains(want),
            "{} lists no {want} ({} components)",
            path.display(),
            names.len()
        );
    }
    Ok(names.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape cargo-cyclonedx 0.5 writes, cut down.
    fn bom(root: &str, deps: &[&str]) -> Value {
        json!({
            "bomFormat": "CycloneDX",
            "specVersion": "1.5",
            "metadata": {
                "component": { "bom-ref": root, "name": root },
                "properties": [{ "name": "cdx:rustc:sbom:target:triple", "value": "t" }],
            },
            "components": deps.iter().map(|d| json!({ "bom-ref": d, "name": d })).collect::<Vec<_>>(),
            "dependencies": std::iter::once(json!({ "ref": root, "dependsOn": deps }))
                .chain(deps.iter().map(|d| json!({ "ref": d, "dependsOn": [] })))
                .collect::<Vec<_>>(),
        })
    }

    #[test]
    fn the_ebpf_graph_and_the_libraries_join_the_agents() {
        let agent = bom("podmeter", &["aya", "common"]);
        let ebpf = bom("podmeter-ebpf", &["aya-ebpf", "common"]);
        let libc = DebPackage {
            name: "libc6".into(),
            version: "2.36-9+deb12u10".into(),
            vendor: "debian".into(),
            distro: None,
        };
        let libs = [
            Library {
                file: "/lib/aarch64-linux-gnu/libc.so.6".into(),
                package: libc.clone(),
            },
            Library {
                file: "/lib/ld-linux-aarch64.so.1".into(),
                package: libc,
            },
        ];
        let m = merge(agent, ebpf, &libs, Arch::Arm64).unwrap();
        let names: Vec<&str> = m["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        // `common` once; both libc files under one package.
        assert_eq!(
            names,
            ["aya", "common", "podmeter-ebpf", "aya-ebpf", "libc6"]
        );
        let libc = &m["components"][4];
        assert_eq!(
            libc["purl"],
            "pkg:deb/debian/libc6@2.36-9%2Bdeb12u10?arch=arm64"
        );
        assert_eq!(libc["properties"].as_array().unwrap().len(), 2);
        let root = &m["dependencies"][0];
        assert_eq!(root["ref"], "podmeter");
        assert_eq!(
            root["dependsOn"],
            json!([
                "aya",
                "common",
                "podmeter-ebpf",
                "pkg:deb/debian/libc6@2.36-9%2Bdeb12u10?arch=arm64"
            ])
        );
        let refs: Vec<&str> = m["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["ref"].as_str().unwrap())
            .collect();
        assert_eq!(
            refs,
            [
                "podmeter",
                "aya",
                "common",
                "podmeter-ebpf",
                "aya-ebpf",
                "pkg:deb/debian/libc6@2.36-9%2Bdeb12u10?arch=arm64"
            ]
        );
        // cargo-cyclonedx's own properties stay.
        assert_eq!(m["metadata"]["properties"][0]["value"], "t");
        assert_eq!(m["metadata"]["properties"][1]["value"], "arm64");
    }

    #[test]
    fn a_package_of_another_distribution_is_named_so() {
        let libs = [Library {
            file: "/lib/x86_64-linux-gnu/libc.so.6".into(),
            package: DebPackage {
                name: "libc6".into(),
                version: "2.39-0ubuntu8.4".into(),
                vendor: "ubuntu".into(),
                distro: Some("ubuntu-24.04".into()),
            },
        }];
        let m = merge(
            bom("podmeter", &[]),
            bom("podmeter-ebpf", &[]),
            &libs,
            Arch::Amd64,
        )
        .unwrap();
        assert_eq!(
            m["components"][1]["purl"],
            "pkg:deb/ubuntu/libc6@2.39-0ubuntu8.4?arch=amd64&distro=ubuntu-24.04"
        );
    }

    #[test]
    fn a_bill_without_its_root_is_refused() {
        let mut agent = bom("podmeter", &["aya"]);
        agent["dependencies"] = json!([]);
        let e = merge(agent, bom("podmeter-ebpf", &[]), &[], Arch::Amd64).unwrap_err();
        assert!(e.to_string().contains("no entry for podmeter"), "{e}");
    }
}
