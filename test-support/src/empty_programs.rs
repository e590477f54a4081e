//! The floor under podmeter's cost: programs that do nothing, attached
//! where podmeter's switch and packet programs are (the `sched_switch`
//! tracepoint, and `cgroup_skb` ingress and egress at the cgroup2 root;
//! not its 100 Hz per-CPU tick, nor the rare cgroup and retransmit events). What a workload
//! loses with only these is what the kernel pays to enter any BPF program
//! on those paths, which no work saved inside podmeter's programs can give
//! back: the benchmark's A/B arm beside "with podmeter" (`cargo xtask
//! bench`), checked against the real kernel in `tests/tests/floor.rs`.
//!
//! A raw tracepoint, not a `tp_btf` program: both run from the same
//! tracepoint probe through the same `bpf_trace_run` call, and a raw one
//! needs no BTF id. Each program is two instructions, loaded with bpf(2)
//! directly (there is no object file to give aya). Every attachment is a
//! file descriptor (a raw tracepoint's, or a `bpf_link` for the cgroup):
//! dropping [`Floor`] closes them, which detaches the programs, also when
//! the bench fails.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result};

// bpf(2) commands, program and attach types (include/uapi/linux/bpf.h).
const BPF_PROG_LOAD: i64 = 5;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_RAW_TRACEPOINT_OPEN: i64 = 17;
const BPF_LINK_CREATE: i64 = 28;
const BPF_ENABLE_STATS: i64 = 32;
const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const BPF_CGROUP_INET_INGRESS: u32 = 0;
const BPF_CGROUP_INET_EGRESS: u32 = 1;

/// The empty programs, attached while this lives.
pub struct Floor {
    /// Attachments first: they are closed before the programs.
    _attached: Vec<OwnedFd>,
    _programs: Vec<OwnedFd>,
}

impl Floor {
    /// Attaches an empty program to `sched_switch` and empty `cgroup_skb`
    /// programs (which let every packet through) to `cgroup2_root`'s
    /// ingress and egress.
    pub fn attach(cgroup2_root: &Path) -> Result<Floor> {
        let switch = load(BPF_PROG_TYPE_RAW_TRACEPOINT, 0, 0, "floor_switch")?;
        let ingress = load(
            BPF_PROG_TYPE_CGROUP_SKB,
            BPF_CGROUP_INET_INGRESS,
            1,
            "floor_skb_in",
        )?;
        let egress = load(
            BPF_PROG_TYPE_CGROUP_SKB,
            BPF_CGROUP_INET_EGRESS,
            1,
            "floor_skb_out",
        )?;
        let cgroup = std::fs::File::open(cgroup2_root)
            .with_context(|| format!("opening {}", cgroup2_root.display()))?;
        let attached = vec![
            raw_tracepoint("sched_switch", &switch)?,
            link(&ingress, &cgroup, BPF_CGROUP_INET_INGRESS)
                .context("attaching the empty ingress program")?,
            link(&egress, &cgroup, BPF_CGROUP_INET_EGRESS)
                .context("attaching the empty egress program")?,
        ];
        Ok(Floor {
            _attached: attached,
            _programs: vec![switch, ingress, egress],
        })
    }
}

impl Floor {
    /// The programs' ids (`bpftool prog show id N`): the switch one, then
    /// ingress and egress.
    pub fn ids(&self) -> io::Result<Vec<u32>> {
        self._programs.iter().map(prog_id).collect()
    }
}

/// The kernel's BPF run-time statistics (`run_cnt`, `run_time_ns`), on
/// while the returned descriptor is open.
pub fn run_time_stats() -> io::Result<OwnedFd> {
    // enable_stats.type = BPF_STATS_RUN_TIME (0).
    bpf(BPF_ENABLE_STATS, &mut [0u8; 128])
}

/// The id of the program behind `prog` (`bpf_prog_info.id`, the second
/// `u32` of the info).
fn prog_id(prog: &OwnedFd) -> io::Result<u32> {
    let mut info = [0u8; 64];
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 4, info.len() as u32);
    put_u64(&mut attr, 8, info.as_mut_ptr() as u64);
    // SAFETY: as in `bpf`; the kernel writes at most `info.len()` bytes
    // to `info`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_mut_ptr(),
            attr.len(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u32::from_ne_bytes(info[4..8].try_into().expect("4 bytes")))
}

/// `bpf(cmd, attr)`, its new file descriptor.
fn bpf(cmd: i64, attr: &mut [u8; 128]) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a zeroed bpf_attr-sized buffer with the command's
    // fields set; the kernel reads at most its length.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just made for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn put_u32(attr: &mut [u8; 128], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; 128], at: usize, v: u64) {
    attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

/// Loads `r0 = ret; exit` as a program of `prog_type`.
fn load(prog_type: u32, expected_attach_type: u32, ret: i32, name: &str) -> Result<OwnedFd> {
    // BPF_ALU64 | BPF_MOV | BPF_K into r0, then BPF_JMP | BPF_EXIT.
    let insns: [u64; 2] = [0xb7 | (u64::from(ret as u32) << 32), 0x95];
    let license = c"GPL";
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, prog_type);
    put_u32(&mut attr, 4, insns.len() as u32);
    put_u64(&mut attr, 8, insns.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    // prog_name, 16 bytes with the NUL.
    let n = name.len().min(15);
    attr[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
    put_u32(&mut attr, 68, expected_attach_type);
    bpf(BPF_PROG_LOAD, &mut attr).with_context(|| format!("loading the empty program {name}"))
}

/// Attaches `prog` to the raw tracepoint `name`.
fn raw_tracepoint(name: &str, prog: &OwnedFd) -> Result<OwnedFd> {
    let tp = CString::new(name)?;
    let mut attr = [0u8; 128];
    put_u64(&mut attr, 0, tp.as_ptr() as u64);
    put_u32(&mut attr, 8, prog.as_raw_fd() as u32);
    bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr)
        .with_context(|| format!("attaching the empty program to {name}"))
}

/// A `bpf_link` running `prog` at `cgroup`'s `attach_type` hook (in the
/// multi mode every link has, beside whatever else is attached there).
fn link(prog: &OwnedFd, cgroup: &std::fs::File, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 4, cgroup.as_raw_fd() as u32);
    put_u32(&mut attr, 8, attach_type);
    bpf(BPF_LINK_CREATE, &mut attr)
}
