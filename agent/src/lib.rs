//! podmeter's agent as a library: the binary (`main.rs`) is its command
//! line, and the fuzz targets reach the parsers of outside input through
//! this crate.
//!
//! Without the default `agent` feature only those parsers build (cgroupfs
//! files, mountinfo, cgroup paths, kernel BTF, flag values): no eBPF object,
//! no Kubernetes client, no HTTP server. The fuzz targets build that way, so
//! their instrumented build takes a minute rather than twenty.

pub mod btf;
pub mod cgroup;
pub mod flags;

#[cfg(feature = "agent")]
pub mod bpf;
#[cfg(feature = "agent")]
pub mod counters;
#[cfg(feature = "agent")]
pub mod health;
#[cfg(feature = "agent")]
pub mod http;
#[cfg(feature = "agent")]
pub mod index;
#[cfg(feature = "agent")]
pub mod kube;
#[cfg(feature = "agent")]
pub mod metrics;
#[cfg(feature = "agent")]
pub mod namer;
#[cfg(feature = "agent")]
pub mod node;
#[cfg(feature = "agent")]
pub mod preflight;
#[cfg(feature = "agent")]
pub mod privileges;
#[cfg(feature = "agent")]
pub mod refresher;
#[cfg(feature = "agent")]
pub mod tracker;
