//! One helm release on the local cluster, through the helm that
//! `cargo xtask tools` builds (`PODMETER_HELM`), for the e2e tests that
//! install the chart.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// A release `name` in `namespace`.
pub struct Helm {
    helm: PathBuf,
    release: String,
    namespace: String,
}

impl Helm {
    /// The release; helm from `PODMETER_HELM`, which `cargo xtask test` sets.
    pub fn new(release: &str, namespace: &str) -> Self {
        Self {
            helm: std::env::var_os("PODMETER_HELM")
                .map(PathBuf::from)
                .expect("PODMETER_HELM unset: run the e2e tests with `cargo xtask test`"),
            release: release.to_owned(),
            namespace: namespace.to_owned(),
        }
    }

    /// The chart in this repository.
    pub fn chart() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/podmeter")
    }

    /// `helm <command> <release> <args>` in the release's namespace (a
    /// command of several words, e.g. `"get manifest"`, is split): what it
    /// printed, or its error output and what it printed.
    pub fn try_run(&self, command: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.helm)
            .args(command.split_whitespace())
            .arg(&self.release)
            .args(args)
            .args(["--namespace", &self.namespace])
            .output()
            .expect("running helm");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned() + &text)
        }
    }

    /// [`Helm::try_run`], panicking with helm's output on failure.
    pub fn run(&self, command: &str, args: &[&str]) -> String {
        self.try_run(command, args)
            .unwrap_or_else(|e| panic!("helm {command} {} {args:?}: {e}", self.release))
    }

    /// `helm upgrade --install` of `chart` (a directory or a package) with
    /// `args` (flags, `--set`s), creating the namespace, and with `wait`
    /// waiting up to 3 minutes for the release to be ready; what helm
    /// printed (the NOTES).
    pub fn upgrade(&self, chart: &Path, args: &[&str], wait: bool) -> String {
        let chart = chart.to_str().expect("a UTF-8 chart path");
        let mut all = vec![chart, "--install", "--create-namespace"];
        if wait {
            all.extend(["--wait", "--timeout", "180s"]);
        }
        all.extend(args);
        self.run("upgrade", &all)
    }

    /// `helm test --logs` with `timeout`: what it printed (with the
    /// probe's log), or why it failed.
    pub fn test(&self, timeout: &str) -> Result<String, String> {
        self.try_run("test", &["--logs", "--timeout", timeout])
    }

    /// `helm uninstall --wait`.
    pub fn uninstall(&self) {
        self.run("uninstall", &["--wait"]);
    }
}
