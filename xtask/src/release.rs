//! `cargo xtask release`: everything a release publishes, built into one
//! directory, `target/dist/<version>/`:
//!
//! - `podmeter-<version>.oci.tar`: the multi-architecture image (an OCI
//!   image index of amd64 and arm64) as `<registry>/podmeter:<version>`;
//! - `podmeter-<version>.tgz`: the Helm chart, its `version` and
//!   `appVersion` the workspace's, its image `<registry>/podmeter` at that
//!   tag by default;
//! - `podmeter-<version>-<arch>.cdx.json`: each image's software bill of
//!   materials, CycloneDX (see `sbom.rs`);
//! - `SHA256SUMS` of all of them, in `sha256sum -c` form.
//!
//! With `--push` it then copies the image (every architecture) and pushes
//! the chart as an OCI artifact to the registry, with skopeo and helm and
//! the credentials they are logged in with. The release workflow
//! (`.github/workflows/release.yml`) only runs this command. `.ci/run`
//! runs it as `--dry-run --local-registry`: the same push, to a throwaway
//! registry on the CI machine (`registry.rs`), read back and compared.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    arch::Arch,
    cmd::{root, target_dir},
    image,
    phases::Phases,
    registry::LocalRegistry,
    sbom, setup, sh, tools,
};

/// The version everything is released as: the workspace's.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `cargo xtask release`'s options.
#[derive(clap::Args)]
pub struct Options {
    /// Build into the directory only (the default); nothing leaves the
    /// machine.
    #[arg(long, conflicts_with = "push")]
    pub dry_run: bool,
    /// Also push the image and the chart to --registry.
    #[arg(long)]
    pub push: bool,
    /// Exercise the push without publishing: release under a throwaway
    /// registry on this host (built from its Go module, plain HTTP, a
    /// password made up per run), push there as --push does, pull both
    /// back and compare with what was built. `.ci/run` runs this.
    #[arg(long, conflicts_with_all = ["push", "registry"])]
    pub local_registry: bool,
    /// Registry and path the image and chart are published under: the
    /// image is `<registry>/podmeter:<version>`, the chart
    /// `oci://<registry>/charts/podmeter`.
    #[arg(long, default_value = "ghcr.io/podmeter", value_parser = registry)]
    pub registry: String,
}

/// A registry path: host[:port][/path], no scheme, no tag.
fn registry(s: &str) -> Result<String, String> {
    let s = s.trim_end_matches('/');
    if s.is_empty() || s.contains("://") || s.contains(char::is_whitespace) {
        return Err(format!(
            "{s:?} is not a registry path like ghcr.io/owner (no scheme)"
        ));
    }
    if s.rsplit('/').next().is_some_and(|last| last.contains('@')) {
        return Err(format!("{s:?}: a registry path has no digest"));
    }
    Ok(s.to_owned())
}

pub fn run(opts: &Options) -> Result<()> {
    // Files made for the local registry name it: never the release's.
    let out = target_dir().join("dist").join(if opts.local_registry {
        format!("{VERSION}-local-registry")
    } else {
        VERSION.to_owned()
    });
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let local = if opts.local_registry {
        Some(LocalRegistry::start()?)
    } else {
        None
    };
    let registry = local
        .as_ref()
        .map_or(opts.registry.clone(), LocalRegistry::path);
    let reference = format!("{registry}/podmeter:{VERSION}");

    let mut phases = Phases::new("release");
    let image = out.join(format!("podmeter-{VERSION}.oci.tar"));
    let archs = [Arch::Amd64, Arch::Arm64];
    let specs = phases.run("image (amd64, arm64)", || {
        let specs = archs
            .iter()
            .map(|a| image::podmeter_spec(*a))
            .collect::<Result<Vec<_>>>()?;
        let images: Vec<(Arch, &image::Spec<'_>)> = archs.into_iter().zip(&specs).collect();
        image::build_index(&reference, &images, &image)?;
        eprintln!("release: {reference} (amd64, arm64) in {}", image.display());
        Ok(specs)
    })?;
    let boms = phases.run("sbom", || {
        let mut boms = Vec::new();
        for (arch, spec) in archs.into_iter().zip(&specs) {
            let bom = out.join(format!("podmeter-{VERSION}-{}.cdx.json", arch.name()));
            sbom::write(arch, &spec.files, &bom)?;
            // The agent's crates, the eBPF object's, the C library's package.
            let n = sbom::check(
                &bom,
                &["podmeter", "aya", "podmeter-ebpf", "aya-ebpf", "libc6"],
            )?;
            eprintln!("release: {} ({n} components)", bom.display());
            boms.push(bom);
        }
        Ok(boms)
    })?;
    let chart = phases.run("chart", || package_chart(&registry, &out))?;
    eprintln!("release: chart {}", chart.display());

    let mut published = vec![image.as_path(), chart.as_path()];
    published.extend(boms.iter().map(PathBuf::as_path));
    let sums = sha256sums(&published)?;
    fs::write(out.join("SHA256SUMS"), &sums)?;
    eprint!("release: SHA256SUMS\n{sums}");

    if let Some(local) = &local {
        phases.run("push (local registry)", || {
            push(&local.target(), &reference, &image, &chart)
                .and_then(|()| local.check(&reference, &image, &chart))
                // Its log goes with it when it is dropped.
                .with_context(|| format!("the local registry's log ends: {}", local.log_tail()))
        })?;
    } else if opts.push {
        phases.run("push", || {
            push(
                &Target::from_env(&opts.registry),
                &reference,
                &image,
                &chart,
            )
        })?;
    } else {
        eprintln!(
            "release: dry run: nothing pushed; `--push` publishes {reference} and oci://{}/charts",
            opts.registry
        );
    }
    Ok(())
}

/// `helm package` of a copy of the chart whose version, appVersion and
/// default image are the release's; checked by rendering it.
fn package_chart(registry: &str, out: &Path) -> Result<PathBuf> {
    tools::HELM.ensure()?;
    let helm = tools::HELM.bin("helm");
    let stage = target_dir().join("dist/chart/podmeter");
    let _ = fs::remove_dir_all(&stage);
    copy_dir(&root().join("deploy/helm/podmeter"), &stage)?;

    let chart_yaml = stage.join("Chart.yaml");
    let text = fs::read_to_string(&chart_yaml)?;
    let text = set_line(&text, "version: ", VERSION)?;
    let text = set_line(&text, "appVersion: ", &format!("\"{VERSION}\""))?;
    fs::write(&chart_yaml, text)?;

    let values_yaml = stage.join("values.yaml");
    let text = fs::read_to_string(&values_yaml)?;
    let text = set_line(&text, "  repository: ", &format!("{registry}/podmeter"))?;
    // Empty: the chart's appVersion, i.e. this release.
    let text = set_line(&text, "  tag: ", "\"\"")?;
    fs::write(&values_yaml, text)?;

    sh(Command::new(&helm).args(["lint", "--strict"]).arg(&stage))?;
    sh(Command::new(&helm)
        .arg("package")
        .arg(&stage)
        .arg("--destination")
        .arg(out))?;
    let tgz = out.join(format!("podmeter-{VERSION}.tgz"));
    ensure!(tgz.exists(), "helm package wrote no {}", tgz.display());
    // What a user of the package gets by default.
    let rendered = Command::new(&helm)
        .args(["template", "podmeter"])
        .arg(&tgz)
        .output()
        .context("helm template of the package")?;
    ensure!(
        rendered.status.success(),
        "helm template of the package: {}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let want = format!("image: \"{registry}/podmeter:{VERSION}\"");
    ensure!(
        String::from_utf8_lossy(&rendered.stdout).contains(&want),
        "the packaged chart's DaemonSet does not default to {want}"
    );
    Ok(tgz)
}

/// `text` with the first line starting with `prefix` (indentation
/// included) replaced by `prefix` + `value`; an error if there is none, so
/// a reshaped Chart.yaml or values.yaml cannot be released half-updated.
fn set_line(text: &str, prefix: &str, value: &str) -> Result<String> {
    let mut done = false;
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if !done && line.starts_with(prefix) {
            out.push_str(prefix);
            out.push_str(value);
            done = true;
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    if !done {
        bail!("no line starting with {prefix:?} to set");
    }
    Ok(out)
}

pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dest)?;
        } else {
            fs::copy(e.path(), &dest)?;
        }
    }
    Ok(())
}

/// `sha256sum` lines (`<hex>  <file name>`) for `files`.
fn sha256sums(files: &[&Path]) -> Result<String> {
    let mut out = String::new();
    for f in files {
        let data = fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("?");
        let digest = image::sha256(&data);
        let hex = digest.trim_start_matches("sha256:");
        let _ = writeln!(out, "{hex}  {name}");
    }
    Ok(out)
}

/// Where and how [`push`] reaches a registry.
pub struct Target {
    /// Registry and path (`--registry`).
    pub registry: String,
    /// User and password to log skopeo and helm in with first; `None`: the
    /// logins they already have.
    pub login: Option<(String, String)>,
    /// Plain HTTP, no TLS (the local registry of `--local-registry`).
    pub plain_http: bool,
    /// A directory for login state of its own, instead of the user's
    /// skopeo and helm logins.
    pub auth_dir: Option<PathBuf>,
}

impl Target {
    /// `--registry` with the credentials of `PODMETER_REGISTRY_USER` and
    /// `PODMETER_REGISTRY_PASSWORD` when both are set.
    fn from_env(registry: &str) -> Self {
        let login = match (
            std::env::var("PODMETER_REGISTRY_USER"),
            std::env::var("PODMETER_REGISTRY_PASSWORD"),
        ) {
            (Ok(user), Ok(password)) => Some((user, password)),
            _ => None,
        };
        Target {
            registry: registry.to_owned(),
            login,
            plain_http: false,
            auth_dir: None,
        }
    }

    fn host(&self) -> &str {
        self.registry.split('/').next().unwrap_or(&self.registry)
    }

    /// `skopeo <command>` with this target's login state and TLS setting
    /// (`copy` takes the destination's).
    pub fn skopeo(&self, command: &str) -> Command {
        let mut c = Command::new("skopeo");
        c.arg(command);
        if let Some(d) = &self.auth_dir {
            c.arg("--authfile").arg(d.join("skopeo-auth.json"));
        }
        if self.plain_http {
            c.arg(if command == "copy" {
                "--dest-tls-verify=false"
            } else {
                "--tls-verify=false"
            });
        }
        c
    }

    /// helm with `args` and this target's login state and plain-HTTP flag.
    pub fn helm(&self, args: &[&str]) -> Command {
        let mut c = Command::new(tools::HELM.bin("helm"));
        c.args(args);
        if let Some(d) = &self.auth_dir {
            c.arg("--registry-config").arg(d.join("helm-registry.json"));
        }
        if self.plain_http {
            c.arg("--plain-http");
        }
        c
    }
}

/// Publishes: every architecture of the image (skopeo), then the chart
/// (helm's OCI support). With credentials it logs both in first (the
/// password on stdin); otherwise it uses the logins they already have.
fn push(target: &Target, reference: &str, image: &Path, chart: &Path) -> Result<()> {
    setup::apt(&["skopeo"])?;
    let host = target.host();
    if let Some((user, password)) = &target.login {
        let mut skopeo = target.skopeo("login");
        let mut helm = target.helm(&["registry", "login"]);
        for login in [&mut skopeo, &mut helm] {
            login.args([host, "--username", user, "--password-stdin"]);
            with_stdin(login, password).with_context(|| format!("logging in to {host}"))?;
        }
    }
    sh(target
        .skopeo("copy")
        .arg("--all")
        .arg(format!("oci-archive:{}", image.display()))
        .arg(format!("docker://{reference}")))
    .context("pushing the image (skopeo login to the registry first)")?;
    sh(target
        .helm(&["push"])
        .arg(chart)
        .arg(format!("oci://{}/charts", target.registry)))
    .context("pushing the chart (helm registry login first)")?;
    eprintln!(
        "release: pushed {reference} and oci://{}/charts/podmeter:{VERSION}",
        target.registry
    );
    Ok(())
}

/// Runs `cmd` with `input` on its stdin; fails with its stderr.
fn with_stdin(cmd: &mut Command, input: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{:?}: {}",
        cmd.get_program(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_line_replaces_the_first_match_only_and_refuses_a_missing_one() {
        let t = "name: podmeter\nversion: 0.0.1\nimage:\n  tag: dev\n  x:\n    tag: keep\n";
        let t2 = set_line(t, "  tag: ", "\"\"").unwrap();
        assert_eq!(
            t2,
            "name: podmeter\nversion: 0.0.1\nimage:\n  tag: \"\"\n  x:\n    tag: keep\n"
        );
        let e = set_line(t, "appVersion: ", "1").unwrap_err();
        assert!(e.to_string().contains("appVersion"), "{e}");
    }

    fn args(c: &Command) -> Vec<String> {
        c.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn a_plain_http_target_with_its_own_logins_says_so_to_skopeo_and_helm() {
        let local = Target {
            registry: "127.0.0.1:5000/p".into(),
            login: None,
            plain_http: true,
            auth_dir: Some("/tmp/r".into()),
        };
        assert_eq!(
            args(&local.skopeo("copy")),
            [
                "copy",
                "--authfile",
                "/tmp/r/skopeo-auth.json",
                "--dest-tls-verify=false"
            ]
        );
        assert_eq!(
            args(&local.skopeo("login")),
            [
                "login",
                "--authfile",
                "/tmp/r/skopeo-auth.json",
                "--tls-verify=false"
            ]
        );
        assert_eq!(
            args(&local.helm(&["push"])),
            [
                "push",
                "--registry-config",
                "/tmp/r/helm-registry.json",
                "--plain-http"
            ]
        );
        assert_eq!(local.host(), "127.0.0.1:5000");
        // A real registry: TLS and the user's own logins.
        let real = Target {
            registry: "ghcr.io/me".into(),
            login: None,
            plain_http: false,
            auth_dir: None,
        };
        assert_eq!(args(&real.skopeo("copy")), ["copy"]);
        assert_eq!(args(&real.helm(&["push"])), ["push"]);
        assert_eq!(real.host(), "ghcr.io");
    }

    #[test]
    fn registry_paths_are_checked() {
        assert_eq!(registry("ghcr.io/me/").unwrap(), "ghcr.io/me");
        assert_eq!(registry("localhost:5000").unwrap(), "localhost:5000");
        assert!(registry("https://ghcr.io/me").is_err());
        assert!(registry("").is_err());
        assert!(registry("ghcr.io/me@sha256:abc").is_err());
    }

    #[test]
    fn sums_are_in_sha256sum_form() {
        let dir = std::env::temp_dir().join(format!("pm-sums-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.txt");
        fs::write(&f, b"abc").unwrap();
        let s = sha256sums(&[&f]).unwrap();
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(
            s,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  a.txt\n"
        );
    }
}
