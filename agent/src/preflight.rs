//! Start-up checks that turn the usual ways of running podmeter wrong into a
//! one-line error with the fix, before anything touches the kernel.

use std::{io, net::SocketAddr, path::Path};

/// A reason podmeter cannot start, with the fix in its message.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// Missing privileges to load and attach eBPF programs.
    #[error(
        "podmeter needs root, or CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN, to load its eBPF programs \
         (missing: {missing}); run it with sudo, or as a privileged container"
    )]
    Privileges {
        /// Capability names that are missing.
        missing: String,
    },
    /// No kernel BTF.
    #[error(
        "no kernel BTF at {path}: podmeter needs a kernel built with CONFIG_DEBUG_INFO_BTF=y \
         (Linux 5.8 or newer; most distribution kernels have it)"
    )]
    NoBtf {
        /// Where it looked.
        path: String,
    },
    /// The listen address is taken.
    #[error(
        "cannot listen on {addr}: the port is in use by another process \
         (see `ss -ltnp 'sport = :{port}'`); choose another with --listen",
        port = addr.port()
    )]
    PortInUse {
        /// The address.
        addr: SocketAddr,
    },
    /// Any other bind failure.
    #[error("cannot listen on {addr}: {source}; choose another address with --listen")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
}

/// Checks the effective capabilities of this process.
pub fn privileges() -> Result<(), PreflightError> {
    use caps::{CapSet, Capability};
    // Unreadable: say what is needed rather than guess.
    let eff = caps::read(None, CapSet::Effective).unwrap_or_default();
    let has = |c: Capability| eff.contains(&c);
    // CAP_SYS_ADMIN stands in for BPF and PERFMON (pre-5.8 semantics, still honoured).
    let admin = has(Capability::CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !(has(Capability::CAP_BPF) || admin) {
        missing.push("CAP_BPF");
    }
    if !(has(Capability::CAP_PERFMON) || admin) {
        missing.push("CAP_PERFMON");
    }
    if !has(Capability::CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::Privileges {
            missing: missing.join(", "),
        })
    }
}

/// Checks that kernel BTF exists.
pub fn btf(path: &Path) -> Result<(), PreflightError> {
    if path.exists() {
        Ok(())
    } else {
        Err(PreflightError::NoBtf {
            path: path.display().to_string(),
        })
    }
}

/// Binds the listen address now, so a taken port fails before BPF work.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, PreflightError> {
    std::net::TcpListener::bind(addr).map_err(|source| match source.kind() {
        io::ErrorKind::AddrInUse => PreflightError::PortInUse { addr },
        _ => PreflightError::Listen { addr, source },
    })
}
