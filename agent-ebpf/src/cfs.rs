//! CFS bandwidth counters of every CPU-limited cgroup, in one pass.
//!
//! The agent used to read them from each limited cgroup's `cpu.stat` at
//! every scrape: at a thousand limited containers a thousand cgroupfs
//! reads, the longest part of a scrape. `pm_cfs_iter` is a cgroup iterator
//! (Linux 6.1, for cgroup v1 hierarchies too): one `read()` of its
//! descriptor walks the hierarchy of the cpu controller and copies the
//! counters `cpu.stat` prints, from each limited cgroup's `task_group`,
//! into `PM_CFS`, which the agent maps and reads in place.
//!
//! The records go to a map, not to the iterator's output: a cgroup
//! iterator's walk must fit one read of at most 32 KiB of output (it holds
//! `cgroup_mutex` while it walks and cannot resume), about 1,300 records.
//! Its output is `[records, overflowed]` (two u64s), written at the end of
//! the walk; no output means the walk did not finish.
//!
//! The walk holds `cgroup_mutex` (as `cgroup_iter` does for any walk), so
//! the kubelet's and runc's mkdir, rmdir and moves wait for it: at a
//! thousand containers it takes about a millisecond of kernel time.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    helpers::{bpf_probe_read_kernel, generated::bpf_seq_write},
    macros::map,
    maps::Array,
};
use podmeter_common::{CfsRecord, DEFAULT_MAX_CGROUPS};

use crate::sched::{CGROUP_KN_OFFSET, KERNFS_NODE_ID_OFFSET, field, offset};

// Set by the agent from kernel BTF; the program is not loaded without them.

/// `cgroup.subsys[cpu_cgrp_id]`: the cgroup's cpu controller state, a
/// `task_group`'s `css`.
#[unsafe(no_mangle)]
static CGROUP_CPU_CSS_OFFSET: u64 = 0;
/// `task_group.cfs_bandwidth.quota`, from the `css`.
#[unsafe(no_mangle)]
static CFS_QUOTA_OFFSET: u64 = 0;
/// `task_group.cfs_bandwidth.nr_periods`, from the `css`.
#[unsafe(no_mangle)]
static CFS_PERIODS_OFFSET: u64 = 0;
/// `task_group.cfs_bandwidth.nr_throttled`, from the `css`.
#[unsafe(no_mangle)]
static CFS_THROTTLED_OFFSET: u64 = 0;
/// `task_group.cfs_bandwidth.throttled_time`, from the `css`.
#[unsafe(no_mangle)]
static CFS_THROTTLED_TIME_OFFSET: u64 = 0;

/// The walk's records. Capacity is set by the agent at load time.
#[map]
static PM_CFS: Array<CfsRecord> = Array::with_max_entries(DEFAULT_MAX_CGROUPS, BPF_F_MMAPABLE);

/// `[session, records, overflowed]` of the walk under way: a new session
/// (a new iterator descriptor) starts from no records. The agent runs one
/// walk at a time.
#[map]
static PM_CFS_STATE: Array<u64> = Array::with_max_entries(3, 0);

/// `quota` of a cgroup without a limit.
const RUNTIME_INF: u64 = u64::MAX;

/// `bpf_iter__cgroup`: `meta`, then the cgroup (NULL once the walk is done).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/cgroup")]
pub fn pm_cfs_iter(ctx: *mut core::ffi::c_void) -> i32 {
    // SAFETY: `ctx` is the iterator's context, two BTF-typed pointers.
    unsafe { visit(ctx.cast_const().cast()) };
    0
}

/// # Safety
///
/// `ctx` must be the `bpf_iter__cgroup` context.
#[inline(always)]
unsafe fn visit(ctx: *const *const u8) {
    let (Some(session), Some(len), Some(over)) = (
        PM_CFS_STATE.get_ptr_mut(0),
        PM_CFS_STATE.get_ptr_mut(1),
        PM_CFS_STATE.get_ptr_mut(2),
    ) else {
        return;
    };
    // SAFETY: the context's members, and `bpf_iter_meta`'s: `seq` (0),
    // `session_id` (8). The verifier checks every load against BTF.
    unsafe {
        let meta = read_volatile(ctx);
        let cgroup = read_volatile(ctx.add(1));
        let id = read_volatile(meta.add(8).cast::<u64>());
        if *session != id {
            *session = id;
            *len = 0;
            *over = 0;
        }
        if cgroup.is_null() {
            let out = [*len, *over];
            let seq = read_volatile(meta.cast::<*mut aya_ebpf::bindings::seq_file>());
            bpf_seq_write(seq, out.as_ptr().cast(), 16);
            return;
        }
        let Some(record) = record(cgroup) else {
            return;
        };
        match PM_CFS.get_ptr_mut(*len as u32) {
            Some(slot) => {
                *slot = record;
                *len += 1;
            }
            None => *over = 1,
        }
    }
}

/// The counters of `cgroup`, if the cpu controller covers it and it has a
/// quota.
///
/// # Safety
///
/// `cgroup` must be a BTF-typed `struct cgroup` pointer.
#[inline(always)]
unsafe fn record(cgroup: *const u8) -> Option<CfsRecord> {
    // SAFETY: `subsys` and `kn` are members of `struct cgroup`; the
    // `task_group` around the `css` is beyond the type the verifier knows,
    // so it is read with `bpf_probe_read_kernel`, which tolerates any
    // address.
    unsafe {
        let css: *const u8 = field(cgroup, &CGROUP_CPU_CSS_OFFSET);
        if css.is_null() {
            return None;
        }
        let at = |global: &u64| css as u64 + offset(global);
        let quota = bpf_probe_read_kernel(at(&CFS_QUOTA_OFFSET) as *const u64).ok()?;
        if quota == RUNTIME_INF {
            return None;
        }
        let kn: *const u8 = field(cgroup, &CGROUP_KN_OFFSET);
        Some(CfsRecord {
            id: field(kn, &KERNFS_NODE_ID_OFFSET),
            periods: bpf_probe_read_kernel(at(&CFS_PERIODS_OFFSET) as *const u32).ok()?,
            throttled: bpf_probe_read_kernel(at(&CFS_THROTTLED_OFFSET) as *const u32).ok()?,
            throttled_ns: bpf_probe_read_kernel(at(&CFS_THROTTLED_TIME_OFFSET) as *const u64)
                .ok()?,
        })
    }
}
