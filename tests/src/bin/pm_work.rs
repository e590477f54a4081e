//! `pm-work`: the workloads podmeter's integration tests measure.
//!
//! It first joins the network namespace and cgroups it is given, so that
//! everything it then does (CPU, sockets, memory) belongs to the test's
//! cgroup from the first instruction. It reports what it did on stdout, one
//! `key value` line per fact, for the test to compare with podmeter.

use std::{
    fs::{self, File},
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream, UdpSocket},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use nix::sched::{CloneFlags, setns};

#[derive(Parser)]
struct Cli {
    /// cgroup directories to join (e.g. the cgroup2 one and the v1 memory one).
    #[arg(long)]
    cgroup: Vec<PathBuf>,
    /// Network namespace (under /var/run/netns) to join.
    #[arg(long)]
    netns: Option<String>,
    /// After the work, stay alive (so the container, and its cgroup, stay
    /// around to be scraped) until killed.
    #[arg(long)]
    linger: bool,
    /// Run on this CPU only (sched_setaffinity), e.g. to make several
    /// burners contend for one CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Run as a real-time task (SCHED_FIFO, priority 1): it preempts every
    /// ordinary task on its CPU at once and is never preempted by one, so
    /// a task it displaces waits exactly as long as it runs.
    #[arg(long)]
    fifo: bool,
    #[command(subcommand)]
    work: Work,
}

#[derive(Subcommand)]
enum Work {
    /// Spin on the CPU until killed.
    Burn,
    /// Print `schedstat <run_ns> <wait_ns> <waits>` (this task's
    /// `/proc/thread-self/schedstat`) and wait for a line on stdin; spin for
    /// `seconds`, print it again and wait for stdin to close. Asleep at both
    /// ends, the task waits for no CPU while the test reads podmeter.
    Spin { seconds: f64 },
    /// Allocate and touch this many MiB, say `ready`, then wait to be killed.
    HoldMemory { mib: usize },
    /// Allocate and touch this many MiB, then exit.
    Alloc { mib: usize },
    /// A container's main process whose children get OOM-killed: say
    /// `ready`, wait for a line on stdin, then run one `alloc` child per
    /// size in turn (in this cgroup) and print `killed <n> exited <n>`:
    /// how many died of SIGKILL and how many exited 0, from their wait
    /// statuses. Any other end is an error.
    OomChildren { mib: Vec<usize> },
    /// Accept one TCP connection, read to EOF, print `received <bytes>`.
    TcpSink { listen: String },
    /// Send `bytes` over TCP, half-close, wait for the peer to close; print
    /// `sent <bytes> <tcpi_bytes_sent> <tcpi_bytes_retrans>
    /// <tcpi_total_retrans>`.
    TcpSend { to: String, bytes: u64 },
    /// Send over TCP at a steady `kib_per_s` KiB/s until killed, connecting
    /// again (every second) while the peer is not there.
    TcpStream { to: String, kib_per_s: u64 },
    /// Receive UDP datagrams until `count` arrived or 3 s pass quietly.
    UdpSink { listen: String, count: u64 },
    /// Send `count` datagrams of `size` bytes.
    UdpSend { to: String, count: u64, size: usize },
    /// Send UDP at a steady `mib_per_s` MiB/s for `seconds`, to a sink or
    /// not (datagrams to a closed port still leave the socket).
    UdpFlood {
        to: String,
        mib_per_s: u64,
        seconds: u64,
    },
    /// Every `period_us`, spin for `work_us`, forever: a steady duty cycle
    /// (a light pod with a small `work_us`, a partly busy one with a large
    /// one). Dies with its parent, so a crashed benchmark leaves none behind.
    Tick { period_us: u64, work_us: u64 },
    /// Receive UDP until killed (no timeout: a sender may start much later),
    /// after printing `listening <port>`.
    UdpListen { listen: String },
    /// Turn on the kernel's BPF run-time statistics (`BPF_ENABLE_STATS`, the
    /// switch behind `kernel.bpf_stats_enabled`) while this runs: prints
    /// `enabled`, then holds them on until stdin closes or it is killed
    /// (also when its parent dies).
    BpfStats,
}

/// SIGKILL this process when its parent exits; not in a container (parent
/// outside our pid namespace), whose runtime cleans up after it.
fn die_with_parent() -> Result<()> {
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } == 0 {
        return Ok(());
    }
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    anyhow::ensure!(
        rc == 0,
        "prctl(PR_SET_PDEATHSIG): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// `tcpi_bytes_sent`, `tcpi_bytes_retrans` (Linux 4.19+) and
/// `tcpi_total_retrans` from `TCP_INFO`, read at their uapi offsets: the
/// libc crate's `tcp_info` predates the first two.
fn tcp_bytes_sent(s: &TcpStream) -> Result<(u64, u64, u32)> {
    use std::os::fd::AsRawFd as _;
    let mut buf = [0u8; 256];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: buf is writable for len bytes; the kernel writes at most len.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    anyhow::ensure!(
        rc == 0,
        "getsockopt(TCP_INFO): {}",
        std::io::Error::last_os_error()
    );
    anyhow::ensure!(
        len >= 216,
        "kernel's tcp_info too short ({len} bytes) for tcpi_bytes_retrans"
    );
    let at = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().unwrap());
    let total_retrans = u32::from_le_bytes(buf[100..104].try_into().unwrap());
    Ok((at(200), at(208), total_retrans))
}

/// Set once pm-work has joined its cgroups and started again in them.
const JOINED: &str = "PM_WORK_JOINED";

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(ns) = &cli.netns {
        let f =
            File::open(format!("/var/run/netns/{ns}")).with_context(|| format!("netns {ns}"))?;
        setns(f, CloneFlags::CLONE_NEWNET).context("setns")?;
    }
    if !cli.cgroup.is_empty() && std::env::var_os(JOINED).is_none() {
        for cg in &cli.cgroup {
            fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
                .with_context(|| format!("joining {}", cg.display()))?;
        }
        // Start again inside them, as runc starts a container's process:
        // cgroup v2 does not move memory charges, so without this the
        // image's own pages (stack, heap) would stay billed where pm-work
        // started, and a light workload would show ~0 bytes in its cgroup.
        let exe = std::env::current_exe().context("pm-work's own path")?;
        let err = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env(JOINED, "1")
            .exec();
        return Err(err).context("re-executing pm-work in its cgroups");
    }
    if let Some(cpu) = cli.cpu {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu).context("--cpu")?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
            .with_context(|| format!("pinning to CPU {cpu}"))?;
    }
    if cli.fifo {
        let param = libc::sched_param { sched_priority: 1 };
        // SAFETY: a plain syscall on this process with a valid parameter.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
            return Err(std::io::Error::last_os_error()).context(
                "--fifo: SCHED_FIFO (with RT group scheduling, a cgroup needs a real-time budget)",
            );
        }
    }
    let mut out = std::io::stdout().lock();
    let linger = cli.linger;
    match cli.work {
        Work::Spin { seconds } => {
            let schedstat = || fs::read_to_string("/proc/thread-self/schedstat");
            writeln!(out, "schedstat {}", schedstat()?.trim())?;
            out.flush()?;
            std::io::stdin().read_line(&mut String::new())?;
            let start = std::time::Instant::now();
            let mut x: u64 = 0;
            while start.elapsed().as_secs_f64() < seconds {
                for _ in 0..10_000 {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            writeln!(out, "schedstat {}", schedstat()?.trim())?;
            out.flush()?;
            std::io::stdin().read_to_end(&mut Vec::new())?;
        }
        Work::Burn => {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        Work::HoldMemory { mib } => {
            let mut v = vec![0u8; mib << 20];
            for i in (0..v.len()).step_by(4096) {
                v[i] = 1;
            }
            std::hint::black_box(&v);
            writeln!(out, "ready")?;
            out.flush()?;
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Work::Alloc { mib } => {
            let mut v = vec![0u8; mib << 20];
            for i in (0..v.len()).step_by(4096) {
                v[i] = 1;
            }
            std::hint::black_box(&v);
        }
        Work::OomChildren { mib } => {
            use std::os::unix::process::ExitStatusExt as _;
            writeln!(out, "ready")?;
            out.flush()?;
            std::io::stdin().read_line(&mut String::new())?;
            let exe = std::env::current_exe().context("pm-work's own path")?;
            let (mut killed, mut exited) = (0, 0);
            for m in mib {
                // Inherits this cgroup (and PM_WORK_JOINED: no re-join).
                let st = std::process::Command::new(&exe)
                    .args(["alloc", &m.to_string()])
                    .status()?;
                match (st.code(), st.signal()) {
                    (Some(0), _) => exited += 1,
                    (_, Some(libc::SIGKILL)) => killed += 1,
                    _ => anyhow::bail!("an alloc child of {m} MiB ended with {st}"),
                }
            }
            writeln!(out, "killed {killed} exited {exited}")?;
        }
        Work::TcpSink { listen } => {
            let l = TcpListener::bind(&listen)?;
            writeln!(out, "listening {}", l.local_addr()?.port())?;
            out.flush()?;
            let (mut s, _) = l.accept()?;
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            drop(s);
            writeln!(out, "received {total}")?;
        }
        Work::TcpSend { to, bytes } => {
            let mut s = TcpStream::connect(&to)?;
            let chunk = vec![0x5au8; 1 << 16];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                s.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            s.shutdown(Shutdown::Write)?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest)?;
            // Payload bytes that left, retransmissions included: what the
            // wire (and podmeter) saw, beyond what the application wrote.
            let (sent, retrans, segments) = tcp_bytes_sent(&s)?;
            writeln!(out, "sent {bytes} {sent} {retrans} {segments}")?;
        }
        Work::TcpStream { to, kib_per_s } => {
            let chunk = vec![0x5au8; 4096];
            let per_ms = (kib_per_s << 10) as f64 / 1000.0;
            loop {
                let Ok(mut s) = TcpStream::connect(&to) else {
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                };
                let start = std::time::Instant::now();
                let mut sent = 0u64;
                // Paced to the rate: a flood would take a core of a small
                // node (and the test's other faults with it).
                'conn: loop {
                    let due = (start.elapsed().as_secs_f64() * 1000.0 * per_ms) as u64;
                    while sent < due {
                        if s.write_all(&chunk).is_err() {
                            break 'conn;
                        }
                        sent += chunk.len() as u64;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
        Work::UdpSink { listen, count } => {
            let s = UdpSocket::bind(&listen)?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            // Room for every datagram of a test run (root may exceed
            // rmem_max), so a receiver starved of CPU on a busy machine
            // loses nothing.
            {
                use std::os::fd::AsRawFd as _;
                let size: libc::c_int = 16 << 20;
                // SAFETY: a valid socket and an int-sized option value.
                unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_RCVBUFFORCE,
                        (&size as *const libc::c_int).cast(),
                        size_of::<libc::c_int>() as libc::socklen_t,
                    );
                }
            }
            writeln!(out, "listening {}", s.local_addr()?.port())?;
            out.flush()?;
            let mut buf = vec![0u8; 65536];
            let (mut n, mut bytes) = (0u64, 0u64);
            while n < count {
                match s.recv(&mut buf) {
                    Ok(len) => {
                        n += 1;
                        bytes += len as u64;
                    }
                    Err(_) => break, // quiet for 3 s: the sender is done
                }
            }
            writeln!(out, "received {n} {bytes}")?;
        }
        Work::UdpSend { to, count, size } => {
            let s = UdpSocket::bind(if to.starts_with('[') {
                "[::]:0"
            } else {
                "0.0.0.0:0"
            })?;
            let payload = vec![0xa5u8; size];
            for i in 0..count {
                s.send_to(&payload, &to)?;
                if i % 64 == 63 {
                    // Pace so the receiver's buffer never overflows.
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            writeln!(out, "sent {count}")?;
        }
        Work::UdpFlood {
            to,
            mib_per_s,
            seconds,
        } => {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            let payload = [0x5au8; 1400];
            let per_ms = (mib_per_s << 20) as f64 / 1000.0;
            let start = std::time::Instant::now();
            let mut sent = 0u64;
            while start.elapsed().as_secs() < seconds {
                // Paced to the rate; an unconnected socket ignores ICMP errors.
                let due = (start.elapsed().as_secs_f64() * 1000.0 * per_ms) as u64;
                while sent < due {
                    s.send_to(&payload, &to)?;
                    sent += payload.len() as u64;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            writeln!(out, "sent_bytes {sent}")?;
        }
        Work::Tick { period_us, work_us } => {
            die_with_parent()?;
            let (period, work) = (
                Duration::from_micros(period_us.max(1)),
                Duration::from_micros(work_us),
            );
            let mut next = std::time::Instant::now();
            let mut x: u64 = 0;
            loop {
                let start = std::time::Instant::now();
                while start.elapsed() < work {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
                // Keep the schedule: a late wake-up shortens the next sleep.
                next += period;
                let now = std::time::Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
        }
        Work::UdpListen { listen } => {
            let s = UdpSocket::bind(&listen)?;
            writeln!(out, "listening {}", s.local_addr()?.port())?;
            out.flush()?;
            let mut buf = vec![0u8; 65536];
            loop {
                s.recv(&mut buf)?;
            }
        }
        Work::BpfStats => {
            die_with_parent()?;
            let stats = podmeter_test_support::empty_programs::run_time_stats()
                .context("bpf(BPF_ENABLE_STATS)")?;
            writeln!(out, "enabled")?;
            out.flush()?;
            // Stats stay on while the fd is open: until stdin closes.
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            drop(stats);
            return Ok(());
        }
    }
    out.flush()?;
    drop(out);
    if linger {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    Ok(())
}
