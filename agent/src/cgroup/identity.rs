//! What a cgroup path says about the workload in it.
//!
//! The kubelet names cgroups in one of two ways, by cgroup driver:
//!
//! * systemd: `kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod<uid, '-' as '_'>.slice/cri-containerd-<id>.scope`
//!   (`crio-<id>.scope`, `docker-<id>.scope`); Guaranteed pods sit directly
//!   under `kubepods.slice` as `kubepods-pod<uid>.slice`.
//! * cgroupfs: `kubepods/burstable/pod<uid>/<id>`, Guaranteed pods as
//!   `kubepods/pod<uid>/<id>`.
//!
//! The kubepods part may sit anywhere in the path (kind nodes, a custom
//! `--cgroup-root`, nested runtimes), so the parser looks for it rather than
//! anchoring at the top. A path that does not match is a host cgroup and is
//! reported by its path: parsing never fails and never panics.

/// Kubernetes QoS class, from the kubelet's cgroup layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Qos {
    /// Requests equal limits for every resource of every container.
    Guaranteed,
    /// Some requests set, not Guaranteed.
    Burstable,
    /// No requests or limits.
    BestEffort,
}

impl Qos {
    /// The label value, as Kubernetes spells the class.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Guaranteed => "Guaranteed",
            Self::Burstable => "Burstable",
            Self::BestEffort => "BestEffort",
        }
    }
}

/// A cgroup the kubelet made for a pod or one of its containers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodIdentity {
    /// The pod's UID (with dashes, as the API shows it).
    pub pod_uid: String,
    /// The container id; `None` for the pod-level cgroup (pod overhead and,
    /// on some setups, the sandbox).
    pub container_id: Option<String>,
    /// The container runtime the cgroup name reveals (`containerd`, `crio`,
    /// `docker`, `crio-conmon`), `None` where the name does not say (cgroupfs
    /// driver with containerd).
    pub runtime: Option<&'static str>,
    /// QoS class.
    pub qos: Qos,
}

/// Who a cgroup belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A pod or container cgroup.
    Pod(PodIdentity),
    /// Anything else: reported by its cgroup path.
    Host,
}

impl Identity {
    /// A pod's own cgroup, the parent of its containers' ones.
    pub fn is_pod_level(&self) -> bool {
        matches!(self, Identity::Pod(p) if p.container_id.is_none())
    }
}

/// Parses a cgroup path relative to the cgroup2 root (`/a/b` or `a/b`).
pub fn parse(path: &str) -> Identity {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    for (i, seg) in segs.iter().enumerate() {
        let found = if *seg == "kubepods" {
            cgroupfs_pod(&segs[i + 1..])
        } else if seg.ends_with(".slice")
            && (seg.starts_with("kubepods") || seg.contains("-kubepods"))
        {
            systemd_pod(&segs[i..])
        } else {
            None
        };
        if let Some((pod_uid, qos, rest)) = found {
            return match rest {
                [] => Identity::Pod(PodIdentity {
                    pod_uid,
                    container_id: None,
                    runtime: None,
                    qos,
                }),
                [container] => match container_id(container) {
                    Some((container_id, runtime)) => Identity::Pod(PodIdentity {
                        pod_uid,
                        container_id: Some(container_id),
                        runtime,
                        qos,
                    }),
                    None => Identity::Host,
                },
                // Below a container (nested cgroups inside it): not a shape the
                // kubelet makes; report by path rather than merge into the
                // container and produce two series with one label set.
                _ => Identity::Host,
            };
        }
    }
    Identity::Host
}

/// `kubepods/[burstable|besteffort/]pod<uid>/...`, given what follows `kubepods`.
fn cgroupfs_pod<'a>(after: &'a [&'a str]) -> Option<(String, Qos, &'a [&'a str])> {
    let (qos, rest) = match *after.first()? {
        "burstable" => (Qos::Burstable, &after[1..]),
        "besteffort" => (Qos::BestEffort, &after[1..]),
        _ => (Qos::Guaranteed, after),
    };
    let uid = pod_uid(rest.first()?.strip_prefix("pod")?)?;
    Some((uid, qos, &rest[1..]))
}

/// systemd slices, from the first `*kubepods*.slice` on. The pod slice's own
/// name carries the QoS: `...kubepods-burstable-pod<uid>.slice`.
fn systemd_pod<'a>(from: &'a [&'a str]) -> Option<(String, Qos, &'a [&'a str])> {
    for (i, seg) in from.iter().enumerate() {
        let name = seg.strip_suffix(".slice")?;
        let Some(at) = name.rfind("-pod") else {
            continue;
        };
        let (prefix, uid) = (&name[..at], &name[at + 4..]);
        let qos = if prefix.ends_with("kubepods-burstable") {
            Qos::Burstable
        } else if prefix.ends_with("kubepods-besteffort") {
            Qos::BestEffort
        } else if prefix.ends_with("kubepods") {
            Qos::Guaranteed
        } else {
            return None;
        };
        // systemd unit names cannot carry '-' inside a component, so the
        // kubelet writes the UID's dashes as underscores.
        let uid = pod_uid(&uid.replace('_', "-"))?;
        return Some((uid, qos, &from[i + 1..]));
    }
    None
}

/// A pod UID: a UUID, or for static pods a 32-hex-digit hash.
fn pod_uid(s: &str) -> Option<String> {
    let hex = s.bytes().filter(u8::is_ascii_hexdigit).count();
    let dashes = s.bytes().filter(|&b| b == b'-').count();
    let ok = hex == 32 && hex + dashes == s.len() && (dashes == 0 || dashes == 4);
    ok.then(|| s.to_ascii_lowercase())
}

/// A container cgroup name: `<prefix>-<id>[.scope]` or a bare id.
fn container_id(seg: &str) -> Option<(String, Option<&'static str>)> {
    let name = seg.strip_suffix(".scope").unwrap_or(seg);
    const PREFIXES: [(&str, &str); 4] = [
        ("cri-containerd-", "containerd"),
        ("crio-conmon-", "crio-conmon"),
        ("crio-", "crio"),
        ("docker-", "docker"),
    ];
    let (id, runtime) = PREFIXES
        .iter()
        .find_map(|(p, rt)| name.strip_prefix(p).map(|id| (id, Some(*rt))))
        .unwrap_or((name, None));
    let valid = (12..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then(|| (id.to_ascii_lowercase(), runtime))
}

#[cfg(test)]
mod tests;
