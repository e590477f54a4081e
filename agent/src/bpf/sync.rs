//! Bringing every CPU's not-yet-flushed CPU time into `PM_CPU`, and its
//! traffic into `PM_NET`, before a read.
//!
//! Each CPU keeps its last few cgroups' time in its own `OnCpu` slot (see
//! agent-ebpf/src/sched.rs). Reading those slots from another CPU would
//! need the programs' stores and the agent's loads ordered: x86-64 gives
//! that for free, arm64 does not, and BPF has no fence instruction on the
//! kernels podmeter supports. So the agent never reads them. It runs
//! `pm_cpu_sync`, the tick's work, on each CPU instead: `BPF_PROG_TEST_RUN`
//! with `BPF_F_TEST_RUN_ON_CPU` (Linux 5.10) sends it there by IPI and
//! waits for it, and that wait orders the program's stores before the
//! agent's read of the map, on every architecture.
//!
//! Like `batch.rs`, this is a raw `bpf()` call: aya has no test runs.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::programs::ProgramFd;
use podmeter_common::SYNC_BUSY;

/// `enum bpf_cmd`: BPF_PROG_TEST_RUN.
const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// Run the program on `cpu`, not on the calling one.
const BPF_F_TEST_RUN_ON_CPU: u32 = 1;

/// `union bpf_attr`'s `test` member, up to `cpu` (what 5.10 knows).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
}

const _: () = assert!(size_of::<TestRunAttr>() == 72);

/// The sync program and the CPUs it runs on: those online at start (where
/// the tick is attached).
pub struct CpuSync {
    prog: ProgramFd,
    cpus: Vec<u32>,
}

impl CpuSync {
    /// Runs the program once on every CPU, so that an unusable one (a
    /// kernel before 5.10 refuses `BPF_F_TEST_RUN_ON_CPU`) is found at
    /// start.
    pub fn new(prog: ProgramFd, cpus: Vec<u32>) -> io::Result<Self> {
        let sync = Self { prog, cpus };
        sync.run()?;
        Ok(sync)
    }

    /// Runs the program on every CPU. A CPU gone offline since start
    /// (`ENXIO`) is skipped: it runs nothing, and what it had pending waits
    /// in its slot until it runs again.
    pub fn run(&self) -> io::Result<()> {
        for &cpu in &self.cpus {
            match self.run_on(cpu) {
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
                r => r?,
            }
        }
        Ok(())
    }

    /// Runs the program on `cpu`, again while it leaves counters pending
    /// ([`SYNC_BUSY`]: it found the CPU's traffic, or a map bucket, in the
    /// middle of an update; see agent-ebpf/src/net.rs and sched.rs). An
    /// update interrupted by the IPI ends within nanoseconds of it, so the
    /// next run finds it done. One preempted in process context may stay
    /// unfinished for a while: after a few tries that CPU's pending
    /// counters wait for its next tick or sync, which delays them by a
    /// scrape and loses none.
    fn run_on(&self, cpu: u32) -> io::Result<()> {
        const TRIES: usize = 4;
        for _ in 1..TRIES {
            if self.run_once(cpu)? != SYNC_BUSY {
                return Ok(());
            }
            // The update may belong to a task this thread preempted on its
            // own CPU: let it run.
            std::thread::yield_now();
        }
        if self.run_once(cpu)? == SYNC_BUSY {
            tracing::debug!(cpu, "CPU {cpu}'s pending counters stay for its next tick or sync");
        }
        Ok(())
    }

    /// One run on `cpu`, and what the program returned.
    fn run_once(&self, cpu: u32) -> io::Result<i32> {
        let mut attr = TestRunAttr {
            prog_fd: self.prog.as_fd().as_raw_fd() as u32,
            flags: BPF_F_TEST_RUN_ON_CPU,
            cpu,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr` prefix with no buffers; the
        // kernel writes only `retval` and `duration` in it.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &raw mut attr,
                size_of::<TestRunAttr>(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(attr.retval as i32)
    }
}
