//! cgroups: where the hierarchies are mounted, which cgroup an id names, what
//! a cgroup path says about the pod and container behind it, how much
//! memory a cgroup uses, its limits, OOM kills, CPU throttling and pressure
//! stalls.
//!
//! The kernel programs key everything by cgroup v2 id, which is the inode
//! number of the cgroup's directory in the cgroup2 filesystem. Hosts come in
//! two shapes and both are supported: pure v2 (cgroup2 at `/sys/fs/cgroup`)
//! and hybrid (v1 controllers under `/sys/fs/cgroup/<controller>`, cgroup2 at
//! `/sys/fs/cgroup/unified`). A v1-only host has no cgroup2 ids at all and is
//! refused at start-up.

pub mod cpu;
pub mod files;
pub mod identity;
pub mod memory;
pub mod mount;
pub mod pressure;
pub mod tree;

pub use files::CgroupFiles;
pub use identity::Identity;
pub use mount::Mounts;
