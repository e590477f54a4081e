//! podmeter's agent as a library: the binary (`main.rs`) is its command
//! line, and the fuzz targets reach the parsers of outside input through
//! this crate.

pub mod bpf;
pub mod cgroup;
pub mod counters;
pub mod flags;
pub mod health;
pub mod http;
pub mod index;
pub mod kube;
pub mod metrics;
pub mod namer;
pub mod node;
pub mod preflight;
pub mod privileges;
pub mod refresher;
pub mod tracker;
