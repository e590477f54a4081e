//! The CFS bandwidth counters of every CPU-limited cgroup, from one walk of
//! the cgroup iterator `pm_cfs_iter` (agent-ebpf/src/cfs.rs).
//!
//! A walk is a `read()` of a new iterator descriptor: the program visits
//! every cgroup of the cpu controller's hierarchy in the kernel and copies
//! the counters of those with a quota into `PM_CFS`, an array the agent
//! maps, and the read returns how many it copied. At a thousand limited
//! containers that is four syscalls (make the descriptor, two reads, close)
//! and a copy, where reading each `cpu.stat` was a thousand syscalls, each
//! formatting text to be parsed back.
//!
//! The link takes the walk's root and order (`bpf_iter_link_info`), which
//! aya's `Iter::attach` cannot pass: it is made here with a raw
//! `BPF_LINK_CREATE`, and each walk's descriptor with `BPF_ITER_CREATE`.
//! Cgroup iterators came with Linux 6.1, v1 hierarchies included.

use crate::ids::IdMap;
use std::{
    fs::File,
    io::{self, Read as _},
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
    ptr::NonNull,
    sync::{Mutex, PoisonError},
};

use aya::{
    Btf, Ebpf,
    maps::{Map, MapData},
    programs::{Iter, ProgramError},
};
use podmeter_common::CfsRecord;

use super::pins::bpf;
use crate::cgroup::cpu::{Cfs, CfsWalk};

/// `enum bpf_cmd`.
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
/// `enum bpf_attach_type`: BPF_TRACE_ITER.
const BPF_TRACE_ITER: u32 = 28;
/// `enum bpf_cgroup_iter_order`: the root, then its descendants, parents
/// before children.
const BPF_CGROUP_ITER_DESCENDANTS_PRE: u32 = 2;

/// `union bpf_iter_link_info`'s `cgroup` member.
#[repr(C)]
struct CgroupIterInfo {
    order: u32,
    cgroup_fd: u32,
    cgroup_id: u64,
}

/// `union bpf_attr`'s `link_create` member, as far as `iter_info_len`.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    iter_info: u64,
    iter_info_len: u32,
    _pad: u32,
}

/// `union bpf_attr`'s `iter_create` member.
#[repr(C)]
struct IterCreateAttr {
    link_fd: u32,
    flags: u32,
}

/// The iterator's link and its records, mapped.
pub struct CfsIter {
    link: OwnedFd,
    /// `PM_CFS`, mapped read-only: `capacity` records.
    records: NonNull<CfsRecord>,
    mapped_len: usize,
    capacity: usize,
    /// Kept for the map's lifetime next to the mapping.
    _map: MapData,
    /// Walks share `PM_CFS`: one at a time.
    walk: Mutex<()>,
}

// SAFETY: the mapping is read only under `walk`, and unmapped on drop.
unsafe impl Send for CfsIter {}
// SAFETY: as above.
unsafe impl Sync for CfsIter {}

impl CfsIter {
    /// Loads `pm_cfs_iter`, links it to walk the hierarchy at `root` (the
    /// one holding the cpu controller), maps `PM_CFS` (of `capacity`
    /// records) and walks once, so that a kernel that refuses any of it is
    /// found at start. The program's offsets must have been set at load.
    pub fn new(ebpf: &mut Ebpf, btf: &Btf, root: &Path, capacity: u32) -> Result<Self, String> {
        let p: &mut Iter = ebpf
            .program_mut("pm_cfs_iter")
            .ok_or("no pm_cfs_iter in the object")?
            .try_into()
            .map_err(|e: ProgramError| e.to_string())?;
        p.load("cgroup", btf).map_err(|e| e.to_string())?;
        let root_dir = File::open(root).map_err(|e| format!("{}: {e}", root.display()))?;
        let link = link_create(p.fd().map_err(|e| e.to_string())?.as_fd(), root_dir.as_fd())
            .map_err(|e| format!("BPF_LINK_CREATE of a cgroup iterator at {}: {e}", root.display()))?;
        let map = match ebpf.take_map("PM_CFS") {
            Some(Map::Array(m)) => m,
            _ => return Err("no array PM_CFS in the object".to_owned()),
        };
        let capacity = capacity as usize;
        let mapped_len = (capacity * size_of::<CfsRecord>()).next_multiple_of(page_size());
        // SAFETY: a shared read-only mapping of an mmapable array map of
        // `capacity` 24-byte records (no padding between them), no longer
        // than the map's pages.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(format!("mapping PM_CFS: {}", io::Error::last_os_error()));
        }
        let iter = Self {
            link,
            records: NonNull::new(addr.cast()).ok_or("mmap returned NULL")?,
            mapped_len,
            capacity,
            _map: map,
            walk: Mutex::new(()),
        };
        iter.walk().map_err(|e| format!("a first walk: {e}"))?;
        Ok(iter)
    }

    /// Walks the hierarchy once.
    pub fn walk(&self) -> io::Result<CfsWalk> {
        let _one = self.walk.lock().unwrap_or_else(PoisonError::into_inner);
        let mut attr = IterCreateAttr {
            link_fd: self.link.as_raw_fd() as u32,
            flags: 0,
        };
        let fd = bpf(BPF_ITER_CREATE, &mut attr)?;
        // SAFETY: the kernel just returned this descriptor, owned by no one
        // else.
        let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        // The program writes `[records, overflowed]` when the walk ends.
        let mut out = [0u8; 17];
        let mut len = 0;
        loop {
            match file.read(&mut out[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if len == out.len() {
                break;
            }
        }
        if len != 16 {
            return Err(io::Error::other(format!(
                "the walk ended with {len} bytes of output, not 16 (it did not finish?)"
            )));
        }
        let word = |i: usize| u64::from_ne_bytes(out[i..i + 8].try_into().expect("8 bytes"));
        let (n, overflowed) = (word(0) as usize, word(8) != 0);
        if n > self.capacity {
            return Err(io::Error::other(format!(
                "the walk claims {n} records in a map of {}",
                self.capacity
            )));
        }
        let mut cgroups = IdMap::with_capacity_and_hasher(n, Default::default());
        for i in 0..n {
            // SAFETY: `i` < `capacity`, within the mapping. The program
            // wrote the records during the `read` above, in this task;
            // nothing writes them until the next walk, which waits for
            // `walk`.
            let r = unsafe { self.records.as_ptr().add(i).read_volatile() };
            cgroups.insert(
                r.id,
                Cfs {
                    periods: u64::from(r.periods),
                    throttled_periods: u64::from(r.throttled),
                    throttled_ns: r.throttled_ns,
                },
            );
        }
        Ok(CfsWalk {
            cgroups,
            complete: !overflowed,
        })
    }
}

impl Drop for CfsIter {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of this length, unused from
        // here on.
        unsafe { libc::munmap(self.records.as_ptr().cast(), self.mapped_len) };
    }
}

/// A link of the iterator program `prog` walking the cgroups below (and
/// including) the one `root` is the directory of.
fn link_create(prog: BorrowedFd<'_>, root: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let info = CgroupIterInfo {
        order: BPF_CGROUP_ITER_DESCENDANTS_PRE,
        cgroup_fd: root.as_raw_fd() as u32,
        cgroup_id: 0,
    };
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: 0,
        attach_type: BPF_TRACE_ITER,
        flags: 0,
        iter_info: std::ptr::from_ref(&info) as u64,
        iter_info_len: size_of::<CgroupIterInfo>() as u32,
        _pad: 0,
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: as in `walk`.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096).max(1)
}
