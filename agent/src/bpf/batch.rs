//! Reading a whole per-CPU hash map a few hundred entries per syscall
//! (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6).
//!
//! aya reads a map one key at a time: `get_next_key`, then `lookup`, two
//! syscalls per entry. At a thousand cgroups that is four thousand syscalls
//! for the two counter maps at every scrape, a quarter of its CPU. aya has
//! no batch operations, so this makes the `bpf()` call itself.

use crate::ids::IdMap;
use std::{
    io,
    mem::size_of,
    ops::AddAssign,
    os::fd::{AsRawFd, BorrowedFd},
};

/// `enum bpf_cmd`: BPF_MAP_LOOKUP_BATCH.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// The kernel's ENOTSUPP (not in libc): an operation the map type lacks.
const ENOTSUPP: i32 = 524;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of the per-CPU hash map `fd` (keys `u64`, values `V` on each
/// of `cpus` possible CPUs), summed over CPUs. `Ok(None)` when the kernel
/// has no batch lookup for the map: the caller reads it another way.
///
/// Entries added or deleted while the read runs may or may not be in it;
/// none is read twice (the kernel walks the buckets in order).
pub fn sum_per_cpu<V>(fd: BorrowedFd<'_>, cpus: usize) -> io::Result<Option<IdMap<V>>>
where
    V: aya::Pod + Default + AddAssign,
{
    // Per-CPU values come 8-byte aligned, one after another per entry.
    let stride = size_of::<V>().next_multiple_of(8);
    // Small enough that a host's few dozen cgroups already take several
    // calls (so every test run goes through the position token), large
    // enough that a thousand take few.
    let mut chunk = 64;
    let mut keys = vec![0u64; chunk];
    let mut values = vec![0u8; chunk * cpus * stride];
    // The hash map's position token is a u32 bucket index; room for a u64.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut first = true;
    let mut out = IdMap::default();
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                (&raw const token_in) as u64
            },
            out_batch: (&raw mut token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` points to buffers of `chunk` keys and `chunk`
        // per-CPU values, and to the tokens, all alive for the call; the
        // kernel writes no more than `count` entries.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let err = (r < 0).then(io::Error::last_os_error);
        match err.as_ref().and_then(io::Error::raw_os_error) {
            // ENOENT: the last entries (possibly none) and the end.
            None | Some(libc::ENOENT) => {
                let n = (attr.count as usize).min(chunk);
                for (i, key) in keys[..n].iter().enumerate() {
                    let mut sum = V::default();
                    for cpu in 0..cpus {
                        let at = (i * cpus + cpu) * stride;
                        // SAFETY: `at + size_of::<V>()` is within `values`
                        // (i < chunk, cpu < cpus); `V` is plain data.
                        sum += unsafe { values.as_ptr().add(at).cast::<V>().read_unaligned() };
                    }
                    out.insert(*key, sum);
                }
                if err.is_some() {
                    return Ok(Some(out));
                }
                token_in = token_out;
                first = false;
            }
            // A bucket holds more entries than `chunk`: again, with room.
            Some(libc::ENOSPC) => {
                chunk *= 2;
                keys.resize(chunk, 0);
                values.resize(chunk * cpus * stride, 0);
            }
            Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) if first => return Ok(None),
            _ => return Err(err.expect("an errno was matched")),
        }
    }
}
