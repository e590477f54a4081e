//! The Prometheus-ecosystem programs the chart tests and the monitoring
//! end-to-end tests run for real: helm, controller-gen (to generate
//! Prometheus Operator's CRDs from its Go API types), prometheus-operator
//! and its config reloader, Prometheus, Alertmanager and prometheus-adapter.
//!
//! Each is built from its upstream Go module through a wrapper module in
//! `xtask/go/<name>` that pins the version (and carries the `replace` lines
//! upstream's own build uses), statically (`CGO_ENABLED=0`, so the binaries
//! go into images without libraries), and cached outside the clone under
//! `<cache>/<name>-<version>/bin`, keyed by version.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use crate::{image, root, setup, sh};

/// One upstream Go program (or several from one module).
pub struct GoTool {
    /// Directory under `xtask/go/` and the cache key's name.
    pub name: &'static str,
    /// Upstream release.
    pub version: &'static str,
    /// Packages to build; each gives a binary named after its last element.
    pub packages: &'static [&'static str],
    /// `-X` flags that stamp the version into the binary.
    pub ldflags: &'static str,
}

pub const HELM: GoTool = GoTool {
    name: "helm",
    version: "v3.22.0",
    packages: &["helm.sh/helm/v3/cmd/helm"],
    // As upstream's Makefile: the default Kubernetes version `helm template`
    // and `helm lint` assume is the client-go minor it was built with (0.37).
    ldflags: "-X helm.sh/helm/v3/internal/version.version=v3.22.0 \
              -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 \
              -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=37 \
              -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
              -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=37",
};

/// Lints `.github/workflows` (the release workflow, which cannot run
/// here).
pub const ACTIONLINT: GoTool = GoTool {
    name: "actionlint",
    version: "v1.7.12",
    packages: &["github.com/rhysd/actionlint/cmd/actionlint"],
    ldflags: "-X github.com/rhysd/actionlint.version=v1.7.12",
};

/// The CNCF distribution registry: `cargo xtask release --local-registry`
/// pushes to one on this host (`registry.rs`).
pub const REGISTRY: GoTool = GoTool {
    name: "registry",
    version: "v3.1.2",
    packages: &["github.com/distribution/distribution/v3/cmd/registry"],
    ldflags: "-X github.com/distribution/distribution/v3/version.version=v3.1.2",
};

pub const CONTROLLER_GEN: GoTool = GoTool {
    name: "controller-gen",
    version: "v0.19.0",
    packages: &["sigs.k8s.io/controller-tools/cmd/controller-gen"],
    ldflags: "",
};

/// The operator; its API module (for the CRDs) is pinned to the same
/// release in `xtask/go/controller-gen/go.mod`.
pub const PROMETHEUS_OPERATOR: GoTool = GoTool {
    name: "prometheus-operator",
    version: "v0.85.0",
    packages: &[
        "github.com/prometheus-operator/prometheus-operator/cmd/operator",
        "github.com/prometheus-operator/prometheus-operator/cmd/prometheus-config-reloader",
    ],
    ldflags: "-X github.com/prometheus/common/version.Version=0.85.0",
};

/// Prometheus v3.5.0 (LTS; module versions are v0.<major*100+minor>.<patch>),
/// the newest release prometheus-operator v0.85.0 lists as compatible.
pub const PROMETHEUS: GoTool = GoTool {
    name: "prometheus",
    version: "v3.5.0",
    packages: &[
        "github.com/prometheus/prometheus/cmd/prometheus",
        "github.com/prometheus/prometheus/cmd/promtool",
    ],
    ldflags: "-X github.com/prometheus/common/version.Version=3.5.0",
};

pub const ALERTMANAGER: GoTool = GoTool {
    name: "alertmanager",
    version: "v0.28.1",
    packages: &["github.com/prometheus/alertmanager/cmd/alertmanager"],
    ldflags: "-X github.com/prometheus/common/version.Version=0.28.1",
};

pub const PROMETHEUS_ADAPTER: GoTool = GoTool {
    name: "prometheus-adapter",
    version: "v0.12.0",
    packages: &["sigs.k8s.io/prometheus-adapter/cmd/adapter"],
    ldflags: "",
};

impl GoTool {
    fn dir(&self) -> PathBuf {
        setup::cache_dir().join(format!("{}-{}/bin", self.name, self.version))
    }

    /// The cached binary `bin` (one of [`GoTool::packages`]' last elements).
    pub fn bin(&self, bin: &str) -> PathBuf {
        self.dir().join(bin)
    }

    fn bins(&self) -> impl Iterator<Item = &'static str> {
        self.packages
            .iter()
            .map(|p| p.rsplit('/').next().unwrap_or(p))
    }

    /// Builds the binaries unless this version is cached.
    pub fn ensure(&self) -> Result<()> {
        let cached = || self.bins().all(|b| self.bin(b).exists());
        if cached() {
            return Ok(());
        }
        // CI's background prebuild may be building it: wait, then use it.
        let _lock = setup::lock(&format!("{}-{}", self.name, self.version))?;
        if cached() {
            return Ok(());
        }
        eprintln!(
            "tools: building {} {} from its Go module; cached in {}",
            self.name,
            self.version,
            self.dir().display()
        );
        let staging = staging_dir(&self.dir())?;
        sh(Command::new("go")
            .current_dir(root().join("xtask/go").join(self.name))
            .args(["build", "-trimpath", "-ldflags"])
            .arg(format!("-s -w {}", self.ldflags))
            .arg("-o")
            .arg(format!("{}/", staging.display()))
            .args(self.packages)
            .env("CGO_ENABLED", "0")
            .env("GOFLAGS", "-mod=mod"))
        .with_context(|| format!("building {} (needs Go and the Go module proxy)", self.name))?;
        publish(&staging, &self.dir(), self.bins())
    }
}

/// An empty `<dir>.partial` to build into. The cache's "is it built" checks
/// look for the binaries without a lock, so a binary must never be seen
/// half-written there: `go build -o` copies rather than renames when its
/// work directory is on another file system (a tmpfs `/tmp`).
pub fn staging_dir(dir: &std::path::Path) -> Result<PathBuf> {
    let staging = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    Ok(staging)
}

/// Moves the built `bins` from `staging` into `dir`, each in one rename.
pub fn publish<'a>(
    staging: &std::path::Path,
    dir: &std::path::Path,
    bins: impl IntoIterator<Item = &'a str>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for bin in bins {
        std::fs::rename(staging.join(bin), dir.join(bin))
            .with_context(|| format!("moving {bin} into {}", dir.display()))?;
    }
    let _ = std::fs::remove_dir_all(staging);
    Ok(())
}

/// `cargo xtask tools`'s options.
#[derive(clap::Args)]
pub struct Options {
    /// Also import their images into the running local cluster and
    /// generate Prometheus Operator's CRDs into target/crds.
    #[arg(long)]
    pub cluster: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    all()?;
    if opts.cluster {
        import_images(&crate::cluster::containerd_sock())?;
        operator_crds(&crate::cmd::target_dir().join("crds"))?;
    }
    Ok(())
}

/// `cargo xtask manifests`'s options (none).
#[derive(clap::Args)]
pub struct ManifestsOptions {}

/// `cargo xtask manifests`: writes the rendered chart over the committed
/// manifests.
pub fn write_manifests(_: &ManifestsOptions) -> Result<()> {
    let path = root().join("deploy/manifests/podmeter.yaml");
    std::fs::write(&path, render_manifests()?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("manifests: wrote {}", path.display());
    Ok(())
}

/// Where the tests find the tools (helm, promtool).
pub fn test_env(c: &mut Command) {
    c.env("PODMETER_HELM", HELM.bin("helm"))
        .env("PODMETER_PROMTOOL", PROMETHEUS.bin("promtool"));
}

/// What the integration tests run: helm (the chart tests) and promtool
/// (the alert rules' tests).
pub const FOR_INTEGRATION: [&GoTool; 2] = [&HELM, &PROMETHEUS];

/// What the end-to-end tests add to [`FOR_INTEGRATION`]: the monitoring
/// stack in the cluster, and the generator of its CRDs.
pub const FOR_E2E: [&GoTool; 4] = [
    &CONTROLLER_GEN,
    &PROMETHEUS_OPERATOR,
    &ALERTMANAGER,
    &PROMETHEUS_ADAPTER,
];

/// Builds (or finds in the cache) each of `tools`.
pub fn ensure(tools: &[&GoTool]) -> Result<()> {
    tools.iter().try_for_each(|t| t.ensure())
}

/// Every tool above but the release's registry, built (or found in the
/// cache).
pub fn all() -> Result<()> {
    ensure(&FOR_INTEGRATION)?;
    ensure(&FOR_E2E)
}

/// Prometheus Operator's CRDs, generated from its Go API types (v1 and
/// v1alpha1, as upstream's `make generate-crds` does) into `out`.
pub fn operator_crds(out: &std::path::Path) -> Result<()> {
    CONTROLLER_GEN.ensure()?;
    std::fs::create_dir_all(out)?;
    let api = "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring";
    sh(Command::new(CONTROLLER_GEN.bin("controller-gen"))
        .current_dir(root().join("xtask/go/controller-gen"))
        .arg("crd:crdVersions=v1")
        .arg(format!("paths={api}/v1"))
        .arg(format!("paths={api}/v1alpha1"))
        .arg(format!("output:crd:dir={}", out.display()))
        .env("GOFLAGS", "-mod=mod"))
    .context("generating Prometheus Operator CRDs with controller-gen")
}

/// Images of the monitoring stack the end-to-end tests run in the cluster,
/// one static binary each (no base image); imported into containerd at
/// `sock`. References: `localhost/<binary>:<version>`.
pub fn import_images(sock: &std::path::Path) -> Result<()> {
    let images: [(&GoTool, &str); 5] = [
        (&PROMETHEUS_OPERATOR, "operator"),
        (&PROMETHEUS_OPERATOR, "prometheus-config-reloader"),
        (&PROMETHEUS, "prometheus"),
        (&ALERTMANAGER, "alertmanager"),
        (&PROMETHEUS_ADAPTER, "adapter"),
    ];
    let out = crate::cmd::target_dir().join("images");
    std::fs::create_dir_all(&out)?;
    for (tool, bin) in images {
        tool.ensure()?;
        let name = match bin {
            "operator" => "prometheus-operator",
            "adapter" => "prometheus-adapter",
            other => other,
        };
        let reference = format!("localhost/{name}:{}", tool.version);
        let mut files = vec![(tool.bin(bin), format!("/bin/{bin}"))];
        if bin == "prometheus" {
            // promtool too, as upstream's image has it.
            files.push((tool.bin("promtool"), "/bin/promtool".into()));
        }
        let tar = out.join(format!("{name}.oci.tar"));
        image::build(
            &image::Spec {
                name: &reference,
                files,
                symlinks: vec![],
                entrypoint: vec![format!("/bin/{bin}")],
            },
            &tar,
        )?;
        image::import(&tar, sock)?;
    }
    Ok(())
}

/// Values the plain manifests are rendered with: no Prometheus Operator
/// objects (their CRDs may be absent), everything else the chart's default.
const MANIFEST_VALUES: [&str; 4] = [
    "monitor.kind=none",
    "prometheusRule.enabled=false",
    "dashboards.enabled=false",
    // `helm test`'s objects are hooks: nothing for kubectl apply.
    "test.enabled=false",
];

/// `deploy/manifests/podmeter.yaml` as rendered from the chart, so the two
/// never drift; `chart.rs` checks the committed file against it.
pub fn render_manifests() -> Result<String> {
    HELM.ensure()?;
    let mut c = Command::new(HELM.bin("helm"));
    c.args(["template", "podmeter"])
        .arg(root().join("deploy/helm/podmeter"))
        .args(["--namespace", "podmeter"]);
    for v in MANIFEST_VALUES {
        c.args(["--set", v]);
    }
    let out = c.output().context("running helm template")?;
    anyhow::ensure!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(format!(
        "# podmeter as plain manifests: generated by `cargo xtask manifests` from\n\
         # the Helm chart (deploy/helm/podmeter) with {}.\n\
         # Do not edit; change the chart. Apply with:\n\
         #   kubectl apply -f deploy/manifests/podmeter.yaml\n\
         # The image is built with `cargo xtask image` (or the Containerfile).\n\
         apiVersion: v1\nkind: Namespace\nmetadata:\n  name: podmeter\n{}",
        MANIFEST_VALUES.join(", "),
        String::from_utf8_lossy(&out.stdout)
    ))
}
