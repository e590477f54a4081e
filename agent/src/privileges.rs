//! Giving up the capabilities podmeter needs only to start.
//!
//! Loading and attaching the programs takes CAP_BPF, CAP_PERFMON and
//! CAP_NET_ADMIN (root has them all, and much more). Once attached, podmeter
//! holds the map, link and perf event fds it needs and only:
//! * reads the maps through those fds (`bpf()` lookups and key walks);
//! * reads cgroupfs, sysfs and procfs files that are world-readable or
//!   root-owned, plus the service account token or kubeconfig — none of it
//!   needs CAP_DAC_OVERRIDE;
//! * serves HTTP on the socket bound before the programs were loaded;
//! * closes its fds at exit, which detaches everything (bpf_links).
//!
//! Of these, only the map syscalls may need a capability: with
//! `kernel.unprivileged_bpf_disabled` set (the default on most
//! distributions), kernels before 6.5 refuse every `bpf()` command without
//! CAP_BPF (newer ones check it only for loading programs and creating
//! maps). So podmeter keeps CAP_BPF alone — or CAP_SYS_ADMIN where the
//! process has no CAP_BPF (kernels before 5.8 have none) — and drops
//! everything else from all five sets, so a bug in the HTTP or API client
//! code cannot be turned into root's powers over the node.
//!
//! Capabilities belong to threads: this runs before the tokio runtime
//! starts, while the process has one thread, and every later thread
//! inherits the reduced sets.

use std::fs;

use anyhow::{Context as _, bail, ensure};
use caps::{CapSet, Capability, CapsHashSet};

/// What [`keep_only_bpf`] kept and gave up.
#[derive(Debug)]
pub struct Dropped {
    /// The capability kept in the effective, permitted and bounding sets.
    pub kept: Capability,
    /// Every other capability the process held in any set before, in
    /// capability-number order: none of them is effective or permitted now.
    pub dropped: Vec<Capability>,
    /// Others left in the bounding set because the process had no
    /// CAP_SETPCAP to drop them (empty when it had).
    pub bounding: Vec<Capability>,
}

fn threads() -> usize {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Drops every capability but CAP_BPF (or CAP_SYS_ADMIN, see the module
/// docs) from the effective, permitted and bounding sets, and empties the
/// inheritable and ambient sets (they only matter across `execve`, which
/// podmeter never does). Must be called while the process has one thread.
pub fn keep_only_bpf() -> anyhow::Result<Dropped> {
    let n = threads();
    ensure!(
        n == 1,
        "dropping capabilities with {n} threads running: capabilities are per thread, \
         so this must happen before any thread starts"
    );
    let read = |set| caps::read(None, set).with_context(|| format!("reading the {set:?} set"));
    let effective = read(CapSet::Effective)?;
    let kept = if effective.contains(&Capability::CAP_BPF) {
        Capability::CAP_BPF
    } else if effective.contains(&Capability::CAP_SYS_ADMIN) {
        Capability::CAP_SYS_ADMIN
    } else {
        bail!("neither CAP_BPF nor CAP_SYS_ADMIN is effective: the BPF maps could not be read")
    };
    let mut before = CapsHashSet::new();
    for set in [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Ambient,
        CapSet::Bounding,
    ] {
        before.extend(read(set)?);
    }
    let only = CapsHashSet::from([kept]);

    // The bounding set first: PR_CAPBSET_DROP needs CAP_SETPCAP, which is
    // about to go with the rest. Without it (a container granted just what
    // podmeter needs) the bounding set stays: it only caps what an execve
    // could gain, and the runtime already limited it.
    if effective.contains(&Capability::CAP_SETPCAP) {
        for cap in read(CapSet::Bounding)?.difference(&only) {
            caps::drop(None, CapSet::Bounding, *cap)
                .with_context(|| format!("dropping {cap} from the bounding set"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).context("clearing the ambient set")?;
    // Effective must stay a subset of permitted: lower it first.
    caps::set(None, CapSet::Effective, &only).context("setting the effective set")?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())
        .context("clearing the inheritable set")?;
    caps::set(None, CapSet::Permitted, &only).context("setting the permitted set")?;

    for set in [CapSet::Effective, CapSet::Permitted] {
        let now = read(set)?;
        ensure!(
            now == only,
            "{set:?} set is {now:?} after dropping, not {{{kept}}}"
        );
    }

    ensure!(
        read(CapSet::Inheritable)?.is_empty() && read(CapSet::Ambient)?.is_empty(),
        "inheritable or ambient set not empty after dropping"
    );
    Ok(Dropped {
        kept,
        dropped: sorted(before.into_iter().filter(|c| *c != kept)),
        bounding: sorted(read(CapSet::Bounding)?.into_iter().filter(|c| *c != kept)),
    })
}

fn sorted(caps: impl Iterator<Item = Capability>) -> Vec<Capability> {
    let mut v: Vec<_> = caps.collect();
    v.sort_by_key(Capability::index);
    v
}

/// `CAP_A, CAP_B, …` for logs.
pub fn names(caps: &[Capability]) -> String {
    let names: Vec<String> = caps.iter().map(ToString::to_string).collect();
    names.join(", ")
}
