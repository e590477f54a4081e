//! `cargo xtask e2e`: the end-to-end tests on a local single-node cluster
//! (podmeter's chart, Prometheus Operator, Prometheus, prometheus-adapter),
//! which is torn down after them whatever happens.

use anyhow::Result;

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
    let mut phases = Phases::new("e2e");
    run_in(&mut phases, opts.filter.as_deref(), opts.keep)
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
                "--test-threads=1",
                // Their step log and the alerts' fault-to-notification
                // table belong in CI's log also when they pass.
                "--nocapture",
            ])
            .env("PODMETER_KUBECTL", cluster::kubectl_bin())
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
