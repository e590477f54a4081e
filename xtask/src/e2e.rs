//! `cargo xtask e2e`: the end-to-end tests on a local single-node cluster
//! (podmeter's chart, Prometheus Operator, Prometheus, prometheus-adapter),
//! which is torn down after them whatever happens.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, cluster, cmd::target_dir, image, phases::Phases, sh, tools};

/// `cargo xtask e2e`'s options.
#[derive(clap::Args)]
pub struct Options {
    /// Only tests whose name contains this.
    pub filter: Option<String>,
    /// Leave the cluster running afterwards (for debugging).
    #[arg(long)]
    pub keep: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    if let Some(f) = &opts.filter {
        check_filter(f)?.map_err(anyhow::Error::msg)?;
    }
    let mut phases = Phases::new("e2e");
    run_in(&mut phases, opts.filter.as_deref(), opts.keep)
}

/// `cargo test` of the end-to-end test files, with the harness's `args`.
fn e2e_tests(args: &[&str]) -> Command {
    let mut c = cargo();
    c.args([
        "test",
        "--release",
        "--package",
        "podmeter-tests",
        "--test",
        "e2e",
        "--test",
        "monitoring",
        "--",
        "--ignored",
    ])
    .args(args);
    c
}

/// `Err` naming the e2e tests when none has `filter` in its name: the
/// harness would run none and pass, after building a cluster for nothing.
/// (Listing builds the tests, which the e2e phase then finds built.)
pub fn check_filter(filter: &str) -> Result<std::result::Result<(), String>> {
    let out = e2e_tests(&["--list"])
        .stderr(Stdio::inherit())
        .output()
        .context("listing the e2e tests")?;
    if !out.status.success() {
        bail!("listing the e2e tests failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .collect();
    if names.iter().any(|n| n.contains(filter)) {
        return Ok(Ok(()));
    }
    Ok(Err(format!(
        "no e2e test name contains {filter:?}; the tests are: {}",
        names.join(", ")
    )))
}

/// The end-to-end phases, timed with the caller's others.
pub fn run_in(phases: &mut Phases, filter: Option<&str>, keep: bool) -> Result<()> {
    phases.run("cluster up", cluster::up)?;
    let result = (|| {
        phases.run("images", || {
            let sock = cluster::containerd_sock();
            image::import(&image::podmeter()?, &sock)?;
            // The same agent as a "next release": an upgrade to a new tag
            // rolls the DaemonSet as a real one does.
            image::tag(image::PODMETER, image::PODMETER_NEXT, &sock)?;
            image::import(&image::testwork()?, &sock)?;
            tools::import_images(&sock)?;
            tools::operator_crds(&target_dir().join("crds"))
        })?;
        phases.run("e2e tests", || {
            // Their step log and the alerts' fault-to-notification table
            // belong in CI's log also when they pass.
            let mut c = e2e_tests(&["--test-threads=1", "--nocapture"]);
            c.env("PODMETER_KUBECTL", cluster::kubectl_bin())
                .env("KUBECONFIG", cluster::kubeconfig())
                .env("PODMETER_CRDS", target_dir().join("crds"));
            tools::test_env(&mut c);
            if let Some(f) = filter {
                c.arg(f);
            }
            sh(&mut c)
        })
    })();
    if keep {
        eprintln!("e2e: cluster left running (--keep); `cargo xtask cluster down` removes it");
        return result;
    }
    let down = phases.run("cluster down", cluster::down);
    result.and(down)
}
