//! cgroups made and removed, for the agent's id → path index.
//!
//! Without these the agent would have to walk the whole cgroup2 tree every
//! few seconds to learn of new and removed cgroups: at a thousand pods most
//! of its idle CPU. The `cgroup_mkdir` and `cgroup_rmdir` tracepoints fire
//! in every hierarchy; only the cgroup2 one (hierarchy id 0) matters, since
//! podmeter keys everything by cgroup2 id. Each event goes to a ring buffer
//! the agent reads as it fills; one that does not fit is counted in
//! `PM_DROPS[DROP_TREE]`, and the agent walks the tree to make up for it.

use aya_ebpf::{
    helpers::bpf_probe_read_kernel_str_bytes,
    macros::{btf_tracepoint, map},
    maps::RingBuf,
    programs::BtfTracePointContext,
};
use podmeter_common::{DROP_TREE, TREE_MKDIR, TREE_PATH_MAX, TREE_RMDIR, TreeEvent};

use crate::{
    maps::PM_DROPS,
    sched::{CGROUP_KN_OFFSET, KERNFS_NODE_ID_OFFSET, field},
};

/// `cgroup.root`, set by the agent from kernel BTF.
#[unsafe(no_mangle)]
static CGROUP_ROOT_OFFSET: u64 = 0;
/// `cgroup_root.hierarchy_id`, set by the agent from kernel BTF.
#[unsafe(no_mangle)]
static ROOT_HIERARCHY_ID_OFFSET: u64 = 0;

/// Room for 500 events between two reads by the agent: a node starting
/// every pod at once makes a few cgroups per pod.
#[map]
static PM_TREE: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// `cgroup:cgroup_mkdir(struct cgroup *cgrp, const char *path)`.
#[btf_tracepoint(function = "cgroup_mkdir")]
pub fn pm_cgroup_mkdir(ctx: BtfTracePointContext) -> i32 {
    event(&ctx, TREE_MKDIR);
    0
}

/// `cgroup:cgroup_rmdir(struct cgroup *cgrp, const char *path)`.
#[btf_tracepoint(function = "cgroup_rmdir")]
pub fn pm_cgroup_rmdir(ctx: BtfTracePointContext) -> i32 {
    event(&ctx, TREE_RMDIR);
    0
}

#[inline(always)]
fn event(ctx: &BtfTracePointContext, kind: u32) {
    let cgrp: *const u8 = ctx.arg(0);
    let path: *const u8 = ctx.arg(1);
    // SAFETY (all `field` calls): `cgrp` is a BTF-typed `struct cgroup`
    // pointer and the pointers loaded from it are BTF-typed by their
    // members' types; the offsets are those members' in this kernel's BTF.
    let hierarchy: i32 = unsafe {
        let root: *const u8 = field(cgrp, &CGROUP_ROOT_OFFSET);
        field(root, &ROOT_HIERARCHY_ID_OFFSET)
    };
    if hierarchy != 0 {
        return; // a v1 hierarchy
    }
    let id: u64 = unsafe {
        let kn: *const u8 = field(cgrp, &CGROUP_KN_OFFSET);
        field(kn, &KERNFS_NODE_ID_OFFSET)
    };
    let Some(mut entry) = PM_TREE.reserve::<TreeEvent>(0) else {
        if let Some(d) = PM_DROPS.get_ptr_mut(DROP_TREE) {
            // SAFETY: per-CPU slot; the pointer is valid for this program run.
            unsafe { *d += 1 };
        }
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to reserved ring buffer memory of a `TreeEvent`;
    // every field is written before submit.
    unsafe {
        (*e).id = id;
        (*e).kind = kind;
        let buf = &mut (*e).path;
        (*e).path_len = match bpf_probe_read_kernel_str_bytes(path, buf) {
            // The slice excludes the NUL: a full buffer means a cut path.
            Ok(s) if s.len() + 1 < TREE_PATH_MAX => s.len() as u32,
            Ok(_) => TREE_PATH_MAX as u32,
            Err(_) => 0,
        };
    }
    entry.submit(0);
}
