//! Start-up checks that turn the usual ways of running podmeter wrong into a
//! one-line error with the fix, before anything touches the kernel.

use std::{fs, io, net::SocketAddr, path::Path};

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

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Checks the effective capabilities of this process.
pub fn privileges() -> Result<(), PreflightError> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1 << cap) != 0;
    // CAP_SYS_ADMIN stands in for BPF and PERFMON (pre-5.8 semantics, still honoured).
    let mut missing = Vec::new();
    if !(has(CAP_BPF) || has(CAP_SYS_ADMIN)) {
        missing.push("CAP_BPF");
    }
    if !(has(CAP_PERFMON) || has(CAP_SYS_ADMIN)) {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
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
