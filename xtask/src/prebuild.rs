//! `cargo xtask prebuild`: builds, at idle CPU and I/O priority, what the
//! later phases of `.ci/run` build when the cache is cold, in the order
//! they need it: the integration tests' tools, the test cluster's
//! Kubernetes, the monitoring stack, then the release's registry, the
//! arm64 agent, the arm64 userland and cargo-cyclonedx.
//!
//! `.ci/run` starts it in the background after lint. A cold run is mostly
//! compiling on 2 CPUs, but the integration and end-to-end tests spend
//! much of their time waiting (scrape windows, rollouts, alerts' `for`):
//! at idle priority (SCHED_IDLE, and its session's autogroup at nice 19)
//! this process gets the CPU the tests leave unused, and the tests get it
//! first whenever they want it. Every item is built under the
//! same lock (`setup::lock`) as the phase that needs it takes: that phase
//! waits for an item under way, or builds it itself if this failed. On a
//! warm cache it finds everything built and exits in a second.

use std::time::Instant;

use anyhow::Result;

use crate::{arch::Arch, build, cluster, sbom, tools};

/// `cargo xtask prebuild`'s options.
#[derive(clap::Args)]
pub struct Options {
    /// Stop, with everything this started, once the process PID is gone:
    /// `.ci/run` passes its own, so a run killed outright (a CI timeout)
    /// leaves no build behind holding the cache's locks.
    #[arg(long, value_name = "PID")]
    pub while_pid: Option<u32>,
}

/// One thing a later phase builds, and how.
type Item = (&'static str, fn() -> Result<()>);

/// What the later phases build, in the order they need it.
const ITEMS: [Item; 7] = [
    ("helm and promtool (integration tests)", || {
        tools::ensure(&tools::FOR_INTEGRATION)
    }),
    ("Kubernetes and etcd (cluster up)", cluster::binaries),
    ("the monitoring stack (e2e images)", || {
        tools::ensure(&tools::FOR_E2E)
    }),
    ("the local registry (release)", || tools::REGISTRY.ensure()),
    ("the arm64 agent (release image)", || {
        build::agent_for(Arch::Arm64)
    }),
    ("the arm64 userland (release image)", || {
        crate::arch::userland(Arch::Arm64).map(drop)
    }),
    ("cargo-cyclonedx (release SBOMs)", || {
        sbom::cargo_cyclonedx().map(drop)
    }),
];

pub fn run(opts: &Options) -> Result<()> {
    idle_priority();
    if let Some(pid) = opts.while_pid {
        std::thread::spawn(move || watch(pid));
    }
    let started = Instant::now();
    let mut failed = 0;
    for (what, build) in ITEMS {
        let t = Instant::now();
        match build() {
            // 0 s: it was in the cache already.
            Ok(()) => eprintln!("prebuild: {what}: ready after {} s", t.elapsed().as_secs()),
            Err(e) => {
                // Not fatal: the phase that needs it builds it and fails
                // there, in the run's own log, if it fails again.
                failed += 1;
                eprintln!("prebuild: {what}: FAILED ({e:#}); the phase that needs it builds it");
            }
        }
    }
    eprintln!(
        "prebuild: done in {} s, {failed} of {} items failed",
        started.elapsed().as_secs(),
        ITEMS.len()
    );
    Ok(())
}

/// SCHED_IDLE and the idle I/O class, for this process and every child (both
/// are inherited), and the lowest autogroup weight when it leads its own
/// session: the CPU and disk time nothing else wants.
fn idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain system calls on this process with a valid argument.
    let (cpu, io) = unsafe {
        (
            libc::sched_setscheduler(0, libc::SCHED_IDLE, &param),
            // IOPRIO_WHO_PROCESS, this process, IOPRIO_CLASS_IDLE << 13.
            libc::syscall(libc::SYS_ioprio_set, 1, 0, 3 << 13),
        )
    };
    if cpu != 0 || io != 0 {
        eprintln!(
            "prebuild: note: could not lower this process's priority ({}); it competes with the tests",
            std::io::Error::last_os_error()
        );
    }
    // With autogroup on (Debian's default), the scheduler first shares the
    // CPU fairly between sessions, and SCHED_IDLE only counts within one:
    // in a session of its own (`.ci/run` starts it with setsid) this
    // process got half the CPU in a cold run, and the unit tests took 830 s
    // instead of 433. Its own session's group at nice 19 weighs 15 against
    // the tests' 1024. Not when it shares a session: that would lower the
    // caller's whole session.
    // SAFETY: plain system calls on this process.
    let (sid, pid) = unsafe { (libc::getsid(0), libc::getpid()) };
    if sid == pid
        && let Err(e) = std::fs::write("/proc/self/autogroup", "19")
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("prebuild: note: could not lower this session's autogroup ({e})");
    }
}

/// Ends this process's group (this process, the builds it runs, not the
/// apt and rustup installs, which have groups of their own) once `pid` is
/// gone.
fn watch(pid: u32) {
    let proc = std::path::PathBuf::from(format!("/proc/{pid}"));
    while proc.exists() {
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    eprintln!("prebuild: process {pid} is gone: stopping");
    // SAFETY: a signal to this process's own group.
    unsafe { libc::kill(0, libc::SIGTERM) };
}
