//! podmeter's agent as a library: the binary (`main.rs`) is its command
//! line, and the fuzz targets reach the parsers of outside input and the
//! scrape's deflate encoder through this crate.
//!
//! Without the default `agent` feature only those parsers build (cgroupfs
//! files, mountinfo, cgroup paths, kernel BTF, flag values, and the id map
//! type they return), and the scrape's deflate encoder: no eBPF object,
//! no Kubernetes client, no HTTP server. The fuzz targets build that way, so
//! their instrumented build takes a minute rather than twenty.

pub mod btf;
pub mod cgroup;
pub mod deflate;
pub mod flags;
pub mod ids;

/// The running agent's modules, which only the `agent` feature builds.
macro_rules! agent_modules {
    ($($name:ident),* $(,)?) => {
        $(#[cfg(feature = "agent")] pub mod $name;)*
    };
}

agent_modules!(
    access, bpf, counters, gzip, health, http, index, kube, metrics, namer, node, preflight,
    prerender, privileges, probe, refresher, tracker, web,
);
