//! Loading podmeter's kernel programs and reading their maps.
//!
//! The object is built from `agent-ebpf` by this crate's build script and
//! embedded in the binary. Every attachment is an fd-backed link. Pinned
//! (the default, see [`pins`]), the counting programs and their maps stay in
//! the kernel when the agent stops, for the next agent to adopt; unpinned
//! (`--no-pin`), [`Attached`] owns every link, and dropping it (or the
//! process dying) detaches everything, leaving nothing in `bpftool prog
//! list`.

mod batch;
pub mod cfs;
pub mod pins;
mod sync;

use crate::ids::IdMap;
use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
};

use aya::{
    Btf, Ebpf, EbpfError, EbpfLoader, Endianness,
    maps::{MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, PerfEvent, ProgramError,
        RawTracePoint,
        links::FdLink,
        raw_trace_point::RawTracePointLinkId,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
    util::online_cpus,
};
use crate::cgroup::Mounts;
use podmeter_common::{
    CpuCounters, DROP_CPU, DROP_NET, DROP_TREE, NetCounters, TCP_SOCKETS, TICK_PERIOD_NS,
    TREE_MKDIR,
    TREE_RMDIR, TreeEvent, WaitHistogram,
};

/// The eBPF object, aligned as aya needs it.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/podmeter-ebpf"));

/// Why the kernel programs could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The object was rejected as a whole (maps, BTF).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    /// Map creation refused by a kernel that charges maps to
    /// RLIMIT_MEMLOCK (before 5.11), with a limit this process cannot raise.
    #[error(
        "the kernel refused to create the BPF maps: kernel {kernel} (before 5.11) charges them to          RLIMIT_MEMLOCK, which is {limit} here and cannot be raised without CAP_SYS_RESOURCE;          raise the container's memlock limit (containerd's service unit sets LimitMEMLOCK=infinity)          or grant CAP_SYS_RESOURCE ({source})"
    )]
    Memlock {
        /// `uname -r`.
        kernel: String,
        /// The soft limit, readable.
        limit: String,
        /// What aya said (boxed: it is large, and rare).
        source: Box<EbpfError>,
    },
    /// A program failed to load or attach.
    #[error("eBPF program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// What aya/the kernel said.
        source: ProgramError,
    },
    /// A map is missing or of the wrong type.
    #[error("eBPF map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What aya said.
        source: MapError,
    },
    /// The object lacks something the agent expects (a build mismatch).
    #[error("eBPF object has no {0}; the embedded object does not match this agent")]
    Missing(&'static str),
    /// The cgroup2 root could not be opened for attaching.
    #[error("opening cgroup2 root {path} to attach network programs: {source}")]
    CgroupRoot {
        /// The path.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The online CPUs could not be listed.
    #[error("listing online CPUs ({0}): {1}")]
    Cpus(&'static str, io::Error),
    /// A link could not be pinned.
    #[error("pinning {path}: {source}")]
    Pin {
        /// The pin's path.
        path: String,
        /// What the kernel said.
        source: io::Error,
    },
}

/// The attached programs. Dropping this detaches those that are not
/// pinned.
pub struct Attached {
    _ebpf: Ebpf,
}

/// Where the links of the counting programs go: pinned for the next agent,
/// or held by this one.
enum Keep<'a> {
    Pinned { pins: &'a pins::Pins, names: Vec<String> },
    Unpinned,
}

impl Keep<'_> {
    /// Pins `link` as `name` in place of an earlier agent's (the new link is
    /// attached before the old one is unpinned: nothing is missed).
    fn pin(&mut self, name: String, link: FdLink) -> Result<(), BpfError> {
        let Keep::Pinned { pins, names } = self else {
            unreachable!("only pinned links are taken from their program")
        };
        let path = pins.link(&name);
        let pin_err = |source| BpfError::Pin {
            path: path.display().to_string(),
            source,
        };
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::debug!("replaced pinned link {name}"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(pin_err(e)),
        }
        link.pin(&path).map_err(|e| pin_err(io::Error::other(e)))?;
        names.push(name);
        Ok(())
    }

    /// Gives up a link pinned as `name`: its pin is removed with those of
    /// earlier agents this one does not keep.
    fn forget(&mut self, name: &str) {
        if let Keep::Pinned { names, .. } = self {
            names.retain(|n| n != name);
        }
    }

    fn pinned(&self) -> Option<&pins::Pins> {
        match self {
            Keep::Pinned { pins, .. } => Some(pins),
            Keep::Unpinned => None,
        }
    }
}

/// The maps the agent reads at scrape time.
pub struct Maps {
    cpu: PerCpuHashMap<MapData, u64, CpuCounters>,
    net: PerCpuHashMap<MapData, u64, NetCounters>,
    /// Run-queue waits by duration (capacity 1, never written, with the
    /// histogram off).
    wait_hist: PerCpuHashMap<MapData, u64, WaitHistogram>,
    /// Second descriptors of `cpu`, `net` and `wait_hist`, for batch reads
    /// (aya's maps do not lend theirs).
    batch_fds: [OwnedFd; 3],
    /// Possible CPUs: per-CPU values come in that many copies.
    possible_cpus: usize,
    /// Cleared when the kernel refuses batch reads.
    batch: AtomicBool,
    /// Brings each CPU's pending time into `cpu` before a read; `None`
    /// where the kernel cannot run it (before 5.10).
    sync: Option<sync::CpuSync>,
    drops: PerCpuArray<MapData, u64>,
    capacity: u32,
    signals: Signals,
}

/// The counts that need more of the kernel than time, switches and
/// traffic: where one is missing, its families are left out rather than
/// exported as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signals {
    /// Run-queue waits (`sched_info` in kernel BTF, `CONFIG_SCHED_INFO`).
    pub run_queue: bool,
    /// TCP retransmits (the `tcp_retransmit_skb` tracepoint attached).
    pub retransmits: bool,
    /// Run-queue waits by duration (`--wait-histogram`, where run-queue
    /// waits are counted at all).
    pub wait_histogram: bool,
}

/// The kernel's cgroup2 mkdir/rmdir events (see `agent-ebpf/src/tree.rs`).
pub struct TreeEvents {
    ring: RingBuf<MapData>,
}

/// One event of [`TreeEvents`].
#[derive(Debug, PartialEq, Eq)]
pub enum Tree {
    /// A cgroup was made at this path, from the hierarchy's root; `None`
    /// when the path did not fit in the event or could not be read.
    Mkdir(u64, Option<String>),
    /// A cgroup was removed.
    Rmdir(u64),
}

impl TreeEvents {
    /// Every event in the buffer now, oldest first.
    pub fn drain(&mut self, out: &mut Vec<Tree>) {
        while let Some(item) = self.ring.next() {
            if item.len() < size_of::<TreeEvent>() {
                continue; // not ours: the object and agent are built together
            }
            // SAFETY: the programs submit whole `TreeEvent`s (plain data);
            // the read is unaligned-safe.
            let e: TreeEvent = unsafe { item.as_ptr().cast::<TreeEvent>().read_unaligned() };
            out.push(match e.kind {
                TREE_MKDIR => Tree::Mkdir(
                    e.id,
                    e.path().map(|p| String::from_utf8_lossy(p).into_owned()),
                ),
                TREE_RMDIR => Tree::Rmdir(e.id),
                _ => continue,
            });
        }
    }
}

impl AsRawFd for TreeEvents {
    /// The ring buffer map's descriptor, owned by `self` and the same for
    /// its whole life (what `tokio::io::unix::AsyncFd::register` needs).
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

/// Per-cgroup totals summed over CPUs, at one instant.
#[derive(Debug, Default)]
pub struct Reading {
    /// CPU time (including slices still running) and switches by cgroup id.
    pub cpu: IdMap<CpuCounters>,
    /// Run-queue waits by duration (empty with the histogram off).
    pub wait_hist: IdMap<WaitHistogram>,
    /// Traffic by socket cgroup id.
    pub net: IdMap<NetCounters>,
    /// Updates lost to full maps, `[cpu, net]`.
    pub dropped: [u64; 2],
}

/// What [`load`] set up.
pub struct Loaded {
    /// The programs; dropping this detaches them.
    pub attached: Attached,
    /// The counter maps.
    pub maps: Maps,
    /// cgroup2 mkdir/rmdir events, when the kernel let the programs attach.
    pub tree: Option<TreeEvents>,
    /// The CFS bandwidth iterator, or why there is none.
    pub cfs: Result<cfs::CfsIter, String>,
}

/// [`BpfError::Memlock`] for a map creation refused with EPERM where the
/// memlock limit is the likely cause; the plain load error otherwise.
fn memlock_or(e: EbpfError) -> BpfError {
    let refused = matches!(
        &e,
        EbpfError::MapError(MapError::CreateError { io_error, .. })
            if io_error.raw_os_error() == Some(libc::EPERM)
    );
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK)
        .map(|(soft, _)| soft)
        .unwrap_or(u64::MAX);
    if refused && limit != libc::RLIM_INFINITY && charges_memlock(&kernel) {
        BpfError::Memlock {
            kernel,
            limit: format!("{} KiB", limit / 1024),
            source: Box::new(e),
        }
    } else {
        BpfError::Load(e)
    }
}

/// Whether kernel `release` (`5.10.0-46-cloud-amd64`) charges BPF maps to
/// RLIMIT_MEMLOCK: every kernel before 5.11, which moved them to memcg.
fn charges_memlock(release: &str) -> bool {
    let mut nums = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().ok());
    match (nums.next().flatten(), nums.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) < (5, 11),
        _ => false,
    }
}

/// Fallbacks forced where the main path works, so tests reach them
/// (hidden flags of the agent).
#[derive(Debug, Default, Clone, Copy)]
pub struct Force {
    /// The raw `sched_switch` tracepoint instead of `tp_btf`.
    pub raw_switch: bool,
    /// Map reads one entry at a time instead of in batches.
    pub entry_reads: bool,
    /// No per-CPU tick: only the sync before a read flushes each CPU.
    pub no_tick: bool,
    /// Throttling counters from `cpu.stat` files, not the CFS iterator.
    pub throttling_files: bool,
}

/// The capacity of `PM_WAIT_HIST`: a slot per cgroup with the histogram on,
/// one (a few bytes per CPU) with it off. Pins of another capacity are not
/// adopted, like those of another `--max-cgroups`.
pub fn wait_hist_capacity(max_cgroups: u32, wait_histogram: bool) -> u32 {
    if wait_histogram { max_cgroups } else { 1 }
}

/// Loads the embedded object with counter maps of `max_cgroups` entries and
/// attaches every program: `sched_switch`, a tick on each online CPU, and
/// `cgroup_skb` ingress/egress at the cgroup2 root, and, where the kernel
/// allows and `follow_tree` is `Ok`, the cgroup mkdir/rmdir tracepoints
/// (`Err` says why the agent cannot use their events). Where the kernel
/// has cgroup iterators, links the CFS iterator to walk the hierarchy of
/// the cpu controller.
pub fn load(
    mounts: &Mounts,
    btf_path: &Path,
    max_cgroups: u32,
    wait_histogram: bool,
    follow_tree: Result<(), String>,
    pins: Option<&pins::Pins>,
    force: Force,
) -> Result<Loaded, BpfError> {
    let (offsets, cfs_offsets) = kernel_offsets(btf_path);
    // The map's capacity follows the flag alone, as the pins expect it;
    // without run-queue waits there is just nothing to put in it.
    let hist_capacity = wait_hist_capacity(max_cgroups, wait_histogram);
    let wait_histogram = if wait_histogram && !offsets_known(&offsets, &WAIT_OFFSETS) {
        tracing::warn!(
            "--wait-histogram: kernel BTF has no sched_info run_delay/pcount \
             (CONFIG_SCHED_INFO), so there are no run-queue waits to count by duration"
        );
        false
    } else {
        wait_histogram
    };
    let histogram_flag = u64::from(wait_histogram);
    let mut loader = EbpfLoader::new();
    // The programs use no CO-RE relocations (the offsets come in as globals,
    // above), so the loader needs no kernel BTF; parsing it for the loader
    // too would put two copies in memory at once, the agent's peak.
    loader
        .btf(None)
        .map_max_entries("PM_CPU", max_cgroups)
        .map_max_entries("PM_NET", max_cgroups)
        .map_max_entries("PM_WAIT_HIST", hist_capacity)
        .map_max_entries("PM_CFS", max_cgroups);
    for (global, value) in offsets.iter().chain(cfs_offsets.iter().flatten()) {
        loader.override_global(global, value, true);
    }
    loader.override_global("WAIT_HISTOGRAM", &histogram_flag, true);
    if let Some(p) = pins {
        // An existing pin is opened as it is; a missing one is made and
        // pinned.
        for name in pins::map_names() {
            loader.map_pin_path(name, p.map(name));
        }
    }
    let mut keep = match pins {
        Some(pins) => Keep::Pinned {
            pins,
            names: Vec::new(),
        },
        None => Keep::Unpinned,
    };
    let mut ebpf = loader.load(OBJECT).map_err(memlock_or)?;
    // Parsed once for every BTF-typed program, after the load: a parse of a
    // kernel's BTF allocates about 15 MiB.
    let btf = Btf::parse_file(btf_path, Endianness::default())
        .map_err(|e| format!("{}: {e}", btf_path.display()));

    let prog = |name| BpfError::Missing(name);
    let err = |name| move |source| BpfError::Program { name, source };

    let known = |names: &[&str]| offsets_known(&offsets, names);
    // The BTF-enabled tracepoint reads tasks with plain loads: about half
    // the cost of the raw one, which needs helpers for the same reads.
    let btf_ok = known(&SWITCH_OFFSETS);
    let fast = if force.raw_switch {
        Err("forced by --force-raw-switch".to_owned())
    } else if btf_ok {
        btf.as_ref()
            .map_err(Clone::clone)
            .and_then(|b| attach_switch_btf(&mut ebpf, b, &mut keep))
    } else {
        Err("some task_struct/cgroup members are missing from kernel BTF".to_owned())
    };
    if let Err(e) = fast {
        tracing::warn!(
            "BTF-enabled sched_switch tracepoint unavailable ({e}); using the raw tracepoint, about twice the cost per context switch"
        );
        let name = "pm_sched_switch_raw";
        let p: &mut RawTracePoint = ebpf
            .program_mut(name)
            .ok_or(prog(name))?
            .try_into()
            .map_err(err(name))?;
        p.load().map_err(err(name))?;
        let id = p.attach("sched_switch").map_err(err(name))?;
        if keep.pinned().is_some() {
            let link = p.take_link(id).map_err(err(name))?;
            keep.pin("switch".into(), link.into())?;
        }
    }

    let name = "pm_cpu_tick";
    let p: &mut PerfEvent = ebpf
        .program_mut(name)
        .ok_or(prog(name))?
        .try_into()
        .map_err(err(name))?;
    p.load().map_err(err(name))?;
    // Before 5.15 a perf event takes its program by ioctl, not a link, and
    // the event dies with its descriptor: the tick cannot outlive the agent
    // there (the switch still bills every slice when it ends).
    let pin_tick = keep.pinned().is_some() && aya::features().bpf_perf_link();
    if keep.pinned().is_some() && !pin_tick {
        tracing::info!(
            "this kernel cannot pin perf event links (before 5.15): the CPU tick stops while no agent runs"
        );
    }
    let cpus = online_cpus().map_err(|(what, e)| BpfError::Cpus(what, e))?;
    for &cpu in cpus.iter().filter(|_| !force.no_tick) {
        let id = p
            .attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::AllProcessesOneCpu { cpu },
                SamplePolicy::Period(TICK_PERIOD_NS),
                false,
            )
            .map_err(err(name))?;
        if pin_tick {
            let link = p.take_link(id).map_err(err(name))?;
            let link = FdLink::try_from(link).map_err(|e| BpfError::Pin {
                path: format!("tick-{cpu}"),
                source: io::Error::other(e),
            })?;
            keep.pin(format!("tick-{cpu}"), link)?;
        }
    }

    let sync = match load_sync(&mut ebpf, cpus) {
        Ok(sync) => Some(sync),
        Err(e) => {
            tracing::warn!(
                "cannot run the CPU sync program on each CPU ({e}; it needs Linux 5.10): \
                 CPU and network counters lag each CPU by up to {} ms",
                TICK_PERIOD_NS / 1_000_000
            );
            None
        }
    };

    let root = File::open(&mounts.unified).map_err(|source| BpfError::CgroupRoot {
        path: mounts.unified.display().to_string(),
        source,
    })?;
    for (name, ty) in [
        ("pm_skb_ingress", CgroupSkbAttachType::Ingress),
        ("pm_skb_egress", CgroupSkbAttachType::Egress),
    ] {
        let p: &mut CgroupSkb = ebpf
            .program_mut(name)
            .ok_or(prog(name))?
            .try_into()
            .map_err(err(name))?;
        p.load().map_err(err(name))?;
        let pin = name.trim_start_matches("pm_").replace('_', "-");
        if let Some(old) = keep.pinned().and_then(|k| k.old_link(&pin)) {
            // The earlier agent's link runs this program from now on, in
            // one step: no packet is counted twice or missed.
            let swapped = p
                .fd()
                .map_err(err(name))
                .and_then(|fd| pins::link_update(old.as_fd(), fd.as_fd()).map_err(|e| {
                    BpfError::Pin { path: pin.clone(), source: e }
                }));
            match swapped {
                Ok(()) => {
                    tracing::debug!("{pin}: pinned link now runs this agent's program");
                    if let Keep::Pinned { names, .. } = &mut keep {
                        names.push(pin);
                    }
                    continue;
                }
                Err(e) => tracing::warn!("{e}; attaching anew instead"),
            }
        }
        // On 5.7+ aya attaches through a bpf_link, which the kernel always
        // attaches in multi mode: the root is shared with Cilium, other
        // monitors or a second podmeter. The link API takes no flags, so
        // `AllowMultiple` (BPF_F_ALLOW_MULTI) would be refused with EINVAL.
        let id = p
            .attach(&root, ty, CgroupAttachMode::Single)
            .map_err(err(name))?;
        if keep.pinned().is_some() {
            let link = p.take_link(id).map_err(err(name))?;
            let link = FdLink::try_from(link).map_err(|e| BpfError::Pin {
                path: pin.clone(),
                source: io::Error::other(e),
            })?;
            keep.pin(pin, link)?;
        }
    }
    // A missing member was logged with its consequence above.
    let retransmits = known(&TCP_OFFSETS)
        && attach_retransmits(&mut ebpf, &mut keep)
            .inspect_err(|e| {
                tracing::warn!(
                    "tcp_retransmit_skb tracepoint unavailable ({e}): TCP retransmits are not counted"
                )
            })
            .is_ok();
    let run_queue = known(&WAIT_OFFSETS);
    if let Keep::Pinned { pins, names } = &keep {
        pins.remove_links_except(names);
    }

    let tree = if let Err(why) = follow_tree {
        Err(why)
    } else if known(&TREE_OFFSETS) {
        btf.as_ref()
            .map_err(Clone::clone)
            .and_then(|b| attach_tree(&mut ebpf, b))
    } else {
        Err("struct cgroup/cgroup_root members are missing from kernel BTF".to_owned())
    };
    let tree = match tree {
        Ok(()) => Some(TreeEvents {
            ring: take(&mut ebpf, "PM_TREE")?,
        }),
        Err(e) => {
            tracing::warn!(
                "cgroup mkdir/rmdir tracepoints unavailable ({e}); new and removed cgroups are \
                 found by walking the cgroup tree every refresh instead, which costs more CPU"
            );
            None
        }
    };

    let cfs = if force.throttling_files {
        Err("forced by --force-throttling-files".to_owned())
    } else {
        cfs_offsets.and_then(|_| {
            // The walk names each cgroup by these too.
            if !known(&["CGROUP_KN_OFFSET", "KERNFS_NODE_ID_OFFSET"]) {
                return Err("cgroup.kn or kernfs_node.id is missing from kernel BTF".to_owned());
            }
            let btf = btf.as_ref().map_err(Clone::clone)?;
            cfs::CfsIter::new(&mut ebpf, btf, mounts.cpu_hierarchy(), max_cgroups)
        })
    };

    let (cpu, cpu_fd) = take_with_fd(&mut ebpf, "PM_CPU")?;
    let (net, net_fd) = take_with_fd(&mut ebpf, "PM_NET")?;
    let (wait_hist, hist_fd) = take_with_fd(&mut ebpf, "PM_WAIT_HIST")?;
    let maps = Maps {
        cpu,
        net,
        wait_hist,
        batch_fds: [cpu_fd, net_fd, hist_fd],
        possible_cpus: aya::util::nr_cpus().map_err(|(what, e)| BpfError::Cpus(what, e))?,
        batch: AtomicBool::new(!force.entry_reads),
        sync,
        drops: take(&mut ebpf, "PM_DROPS")?,
        // Adopted maps have it too: pins of another capacity are not adopted.
        capacity: max_cgroups,
        signals: Signals {
            run_queue,
            retransmits,
            wait_histogram,
        },
    };
    Ok(Loaded {
        attached: Attached { _ebpf: ebpf },
        maps,
        tree,
        cfs,
    })
}

/// Loads the CPU sync program (never attached) and runs it once on each
/// of `cpus`.
fn load_sync(ebpf: &mut Ebpf, cpus: Vec<u32>) -> Result<sync::CpuSync, String> {
    let p = raw_program(ebpf, "pm_cpu_sync")?;
    p.load().map_err(|e| e.to_string())?;
    let fd = p
        .fd()
        .map_err(|e| e.to_string())?
        .try_clone()
        .map_err(|e| e.to_string())?;
    sync::CpuSync::new(fd, cpus).map_err(|e| format!("BPF_PROG_TEST_RUN: {e}"))
}

/// Loads and attaches the cgroup mkdir/rmdir programs (`tp_btf`), both or
/// neither: half a pair would miss removals, or creations.
fn attach_tree(ebpf: &mut Ebpf, btf: &Btf) -> Result<(), String> {
    fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut BtfTracePoint, String> {
        ebpf.program_mut(name)
            .ok_or(format!("no {name} in the object"))?
            .try_into()
            .map_err(|e: ProgramError| e.to_string())
    }
    let mkdir = program(ebpf, "pm_cgroup_mkdir")?;
    mkdir
        .load("cgroup_mkdir", btf)
        .map_err(|e| format!("cgroup_mkdir: {e}"))?;
    mkdir.attach().map_err(|e| format!("cgroup_mkdir: {e}"))?;
    let rmdir = program(ebpf, "pm_cgroup_rmdir")?;
    let attached = rmdir
        .load("cgroup_rmdir", btf)
        .and_then(|()| rmdir.attach().map(drop))
        .map_err(|e| format!("cgroup_rmdir: {e}"));
    if attached.is_err() {
        let _ = rmdir.unload();
        let _ = program(ebpf, "pm_cgroup_mkdir")?.unload();
    }
    attached
}

/// Loads and attaches the TCP retransmit program (pinned, like the other
/// counting programs, so retransmits are counted while no agent runs): the
/// flavour that reads the tracepoint's `err` (6.17 and later, where it also
/// fires for retransmits given up before any transmit), else the one for
/// the older two-argument tracepoint. The kernel refuses (`EINVAL`) to
/// attach a program reading a third argument where there are two.
///
/// First the socket-close program, best-effort: it counts a socket's
/// retransmits not yet counted when it closes, and frees its entry. First,
/// so that no socket the retransmit program meets closes unseen.
///
/// Where the retransmit program cannot be attached, the close program goes
/// too: it would have nothing to settle.
fn attach_retransmits(ebpf: &mut Ebpf, keep: &mut Keep<'_>) -> Result<(), String> {
    let closing = attach_raw(ebpf, "pm_tcp_close", "inet_sock_set_state")
        .and_then(|id| pin_raw(ebpf, keep, id, "tcp-close"));
    if let Err(e) = &closing {
        tracing::warn!(
            "inet_sock_set_state tracepoint unavailable ({e}): a TCP socket's retransmits \
             after its last one reported are not counted, a new socket at a closed one's \
             address is undercounted by the old one's count, and once {TCP_SOCKETS} closed \
             sockets have retransmitted, new ones are counted by the segments each \
             retransmit carries"
        );
    }
    let counting = attach_retransmit(ebpf, keep);
    if counting.is_err() && closing.is_ok() {
        tracing::info!(
            "the socket-close program is detached too: without the retransmit program it has \
             nothing to settle"
        );
        // Unpinned with the others this agent does not keep (the pin goes
        // once attaching is over), or detached here where nothing is pinned.
        keep.forget("tcp-close");
        if let Ok(p) = raw_program(ebpf, "pm_tcp_close") {
            let _ = p.unload();
        }
    }
    counting
}

/// The retransmit program of [`attach_retransmits`], attached and pinned.
fn attach_retransmit(ebpf: &mut Ebpf, keep: &mut Keep<'_>) -> Result<(), String> {
    let id = match attach_raw(ebpf, "pm_tcp_retransmit_err", "tcp_retransmit_skb") {
        Ok(id) => {
            tracing::debug!("tcp_retransmit_skb has err: counting the retransmits with err 0");
            id
        }
        Err(with_err) => {
            tracing::debug!(
                "tcp_retransmit_skb without err ({with_err}): it fires only for retransmits sent"
            );
            attach_raw(ebpf, "pm_tcp_retransmit", "tcp_retransmit_skb")?
        }
    };
    pin_raw(ebpf, keep, id, "tcp-retransmit")
}

/// Pins the link of raw tracepoint program `id` as `pin`, where the agent
/// pins.
fn pin_raw(
    ebpf: &mut Ebpf,
    keep: &mut Keep<'_>,
    id: (&str, RawTracePointLinkId),
    pin: &str,
) -> Result<(), String> {
    if keep.pinned().is_some() {
        let p = raw_program(ebpf, id.0)?;
        let link = p.take_link(id.1).map_err(|e| e.to_string())?;
        keep.pin(pin.into(), link.into())
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn raw_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut RawTracePoint, String> {
    ebpf.program_mut(name)
        .ok_or_else(|| format!("no {name} in the object"))?
        .try_into()
        .map_err(|e: ProgramError| e.to_string())
}

/// Loads `name` and attaches it to raw tracepoint `tracepoint`; unloaded
/// again when the attach fails, so no refused flavour stays loaded.
fn attach_raw<'n>(
    ebpf: &mut Ebpf,
    name: &'n str,
    tracepoint: &str,
) -> Result<(&'n str, RawTracePointLinkId), String> {
    let p = raw_program(ebpf, name)?;
    p.load().map_err(|e| e.to_string())?;
    match p.attach(tracepoint) {
        Ok(id) => Ok((name, id)),
        Err(e) => {
            let _ = p.unload();
            Err(e.to_string())
        }
    }
}

/// Loads and attaches the `tp_btf` flavour of the switch program.
fn attach_switch_btf(ebpf: &mut Ebpf, btf: &Btf, keep: &mut Keep<'_>) -> Result<(), String> {
    let p: &mut BtfTracePoint = ebpf
        .program_mut("pm_sched_switch")
        .ok_or("no pm_sched_switch in the object")?
        .try_into()
        .map_err(|e: ProgramError| e.to_string())?;
    p.load("sched_switch", btf).map_err(|e| e.to_string())?;
    let id = match p.attach() {
        Ok(id) => id,
        Err(e) => {
            // Not left loaded next to the fallback.
            let _ = p.unload();
            return Err(e.to_string());
        }
    };
    if keep.pinned().is_some() {
        let link = p.take_link(id).map_err(|e| e.to_string())?;
        keep.pin("switch".into(), link.into())
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The members the BTF-enabled `sched_switch` program reads.
const SWITCH_OFFSETS: [&str; 6] = [
    "SUM_EXEC_RUNTIME_OFFSET",
    "TASK_PID_OFFSET",
    "TASK_CGROUPS_OFFSET",
    "CSS_SET_DFL_CGRP_OFFSET",
    "CGROUP_KN_OFFSET",
    "KERNFS_NODE_ID_OFFSET",
];

/// Whether every one of `names` has a non-zero offset.
fn offsets_known(offsets: &[(&'static str, u64)], names: &[&str]) -> bool {
    offsets
        .iter()
        .filter(|(g, _)| names.contains(g))
        .all(|(_, off)| *off != 0)
}

/// The members the switch and tick programs read for run-queue waits.
const WAIT_OFFSETS: [&str; 2] = ["RUN_DELAY_OFFSET", "PCOUNT_OFFSET"];

/// The members the TCP retransmit program reads.
const TCP_OFFSETS: [&str; 6] = [
    "SOCK_CGRP_DATA_OFFSET",
    "SKB_CB_OFFSET",
    "TCP_GSO_SEGS_OFFSET",
    "TCP_TOTAL_RETRANS_OFFSET",
    "CGROUP_KN_OFFSET",
    "KERNFS_NODE_ID_OFFSET",
];

/// The members the cgroup mkdir/rmdir programs read.
const TREE_OFFSETS: [&str; 4] = [
    "CGROUP_ROOT_OFFSET",
    "ROOT_HIERARCHY_ID_OFFSET",
    "CGROUP_KN_OFFSET",
    "KERNFS_NODE_ID_OFFSET",
];

/// Kernel struct members the programs read, as `(global, offset)`.
///
/// `sum_exec_runtime` is where the kernel keeps a task's accounted CPU time,
/// so the programs bill exactly what `cpu.stat` counts; without it (0) they
/// bill wall-clock time between events, which includes a VM's steal time.
/// `prev_sum_exec_runtime` and `policy` give where a fair-class task's
/// slice began, for a slice whose start the switch program did not see.
/// The others let the switch program find the task's cgroup id itself. An
/// offset BTF cannot tell is 0.
///
/// Second: the offsets of the CFS iterator (see [`cfs`]), or why they are
/// unknown.
fn kernel_offsets(btf_path: &Path) -> ([(&'static str, u64); 16], Result<CfsOffsets, String>) {
    const MEMBERS: [(&str, &str, &[&str]); 16] = [
        (
            "SUM_EXEC_RUNTIME_OFFSET",
            "task_struct",
            &["se", "sum_exec_runtime"],
        ),
        (
            "PREV_SUM_EXEC_RUNTIME_OFFSET",
            "task_struct",
            &["se", "prev_sum_exec_runtime"],
        ),
        ("TASK_POLICY_OFFSET", "task_struct", &["policy"]),
        ("TASK_PID_OFFSET", "task_struct", &["pid"]),
        ("TASK_CGROUPS_OFFSET", "task_struct", &["cgroups"]),
        ("CSS_SET_DFL_CGRP_OFFSET", "css_set", &["dfl_cgrp"]),
        ("CGROUP_KN_OFFSET", "cgroup", &["kn"]),
        ("KERNFS_NODE_ID_OFFSET", "kernfs_node", &["id"]),
        ("CGROUP_ROOT_OFFSET", "cgroup", &["root"]),
        ("ROOT_HIERARCHY_ID_OFFSET", "cgroup_root", &["hierarchy_id"]),
        (
            "RUN_DELAY_OFFSET",
            "task_struct",
            &["sched_info", "run_delay"],
        ),
        ("PCOUNT_OFFSET", "task_struct", &["sched_info", "pcount"]),
        ("SOCK_CGRP_DATA_OFFSET", "sock", &["sk_cgrp_data"]),
        ("SKB_CB_OFFSET", "sk_buff", &["cb"]),
        ("TCP_GSO_SEGS_OFFSET", "tcp_skb_cb", &["tcp_gso_segs"]),
        ("TCP_TOTAL_RETRANS_OFFSET", "tcp_sock", &["total_retrans"]),
    ];
    const WALL_CLOCK: &str =
        "billing wall-clock time between switches, which includes steal time on VMs";
    let unknown = |e: &dyn std::fmt::Display| {
        tracing::warn!(
            "cannot read kernel BTF {} ({e}): {WALL_CLOCK}, and the switch program falls back to helpers",
            btf_path.display()
        );
        (
            MEMBERS.map(|(global, _, _)| (global, 0)),
            Err(format!("kernel BTF unreadable: {e}")),
        )
    };
    let data = match std::fs::read(btf_path) {
        Ok(d) => d,
        Err(e) => return unknown(&e),
    };
    let btf = match crate::btf::Btf::parse(&data) {
        Ok(b) => b,
        Err(e) => return unknown(&e),
    };
    let members = MEMBERS.map(|(global, st, path)| {
        let member = format!("{st}.{}", path.join("."));
        match btf.offset(st, path) {
            Ok(off) => {
                tracing::debug!(offset = off, "{member}");
                (global, off)
            }
            Err(e) => {
                let consequence = match global {
                    "SUM_EXEC_RUNTIME_OFFSET" => WALL_CLOCK,
                    "CGROUP_ROOT_OFFSET" | "ROOT_HIERARCHY_ID_OFFSET" => {
                        "the cgroup tree is walked instead of followed by events"
                    }
                    "RUN_DELAY_OFFSET" | "PCOUNT_OFFSET" => "run-queue waits are not counted",
                    "PREV_SUM_EXEC_RUNTIME_OFFSET" | "TASK_POLICY_OFFSET" => {
                        "a slice whose start the switch program did not see is not billed"
                    }
                    "SOCK_CGRP_DATA_OFFSET"
                    | "SKB_CB_OFFSET"
                    | "TCP_GSO_SEGS_OFFSET"
                    | "TCP_TOTAL_RETRANS_OFFSET" => {
                        "TCP retransmits are not counted"
                    }
                    _ => "the switch program falls back to helpers",
                };
                tracing::warn!(
                    "cannot locate {member} in {} ({e}); {consequence}",
                    btf_path.display()
                );
                (global, 0)
            }
        }
    });
    (members, cfs_offsets(&btf))
}

/// The globals of the CFS iterator, by name.
type CfsOffsets = [(&'static str, u64); 5];

/// Where the CFS iterator finds a cgroup's cpu controller state and, in
/// the `task_group` around it, the bandwidth counters.
fn cfs_offsets(btf: &crate::btf::Btf<'_>) -> Result<CfsOffsets, String> {
    let e = |e: crate::btf::BtfError| e.to_string();
    let cpu_id = btf.enum_value("cgroup_subsys_id", "cpu_cgrp_id").map_err(e)?;
    // `subsys` is an array of CGROUP_SUBSYS_COUNT pointers, which the id
    // indexes.
    let cpu_id = u64::try_from(cpu_id)
        .ok()
        .filter(|&i| i < 64)
        .ok_or(format!("cpu_cgrp_id is {cpu_id}"))?;
    let css = btf.offset("cgroup", &["subsys"]).map_err(e)? + 8 * cpu_id;
    let tg_css = btf.offset("task_group", &["css"]).map_err(e)?;
    let cfs = |member: &str| {
        btf.offset("task_group", &["cfs_bandwidth", member])
            .map_err(e)?
            .checked_sub(tg_css)
            .ok_or(format!("task_group.cfs_bandwidth.{member} lies before its css"))
    };
    Ok([
        ("CGROUP_CPU_CSS_OFFSET", css),
        ("CFS_QUOTA_OFFSET", cfs("quota")?),
        ("CFS_PERIODS_OFFSET", cfs("nr_periods")?),
        ("CFS_THROTTLED_OFFSET", cfs("nr_throttled")?),
        ("CFS_THROTTLED_TIME_OFFSET", cfs("throttled_time")?),
    ])
}

/// A per-CPU hash map, and a second descriptor of it.
fn take_with_fd<V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<(PerCpuHashMap<MapData, u64, V>, OwnedFd), BpfError> {
    let map = ebpf.take_map(name).ok_or(BpfError::Missing(name))?;
    let fd = match &map {
        aya::maps::Map::PerCpuHashMap(data) => data.fd().as_fd().try_clone_to_owned(),
        _ => Err(io::Error::other("not a per-CPU hash map")),
    };
    let fd = fd.map_err(|e| BpfError::Map {
        name,
        source: MapError::IoError(e),
    })?;
    let map = PerCpuHashMap::try_from(map).map_err(|source| BpfError::Map { name, source })?;
    Ok((map, fd))
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(BpfError::Missing(name))?;
    T::try_from(map).map_err(|source| BpfError::Map { name, source })
}

/// Every entry of a per-CPU counter map, summed over CPUs.
///
/// aya's iterator already skips a key deleted between get_next_key and
/// lookup; any error it does return is a failed syscall (e.g. EPERM once
/// capabilities are gone), which must fail the read rather than show up as
/// a map with fewer cgroups.
fn totals<V>(map: &PerCpuHashMap<MapData, u64, V>) -> Result<IdMap<V>, MapError>
where
    V: aya::Pod + Default + std::ops::AddAssign,
{
    map.iter()
        .map(|entry| {
            let (id, per_cpu) = entry?;
            let mut sum = V::default();
            for v in per_cpu.iter() {
                sum += *v;
            }
            Ok((id, sum))
        })
        .collect()
}

impl Maps {
    /// Every entry of counter map `which` (0 cpu, 1 net, 2 wait
    /// histogram), summed over CPUs: in batches where the kernel can, else
    /// one entry at a time.
    fn totals<V>(
        &self,
        map: &PerCpuHashMap<MapData, u64, V>,
        which: usize,
    ) -> Result<IdMap<V>, MapError>
    where
        V: aya::Pod + Default + std::ops::AddAssign,
    {
        if self.batch.load(Ordering::Relaxed) {
            let fd = self.batch_fds[which].as_fd();
            match batch::sum_per_cpu(fd, self.possible_cpus).map_err(MapError::IoError)? {
                Some(totals) => return Ok(totals),
                None => {
                    tracing::info!("no batch map reads on this kernel; reading entry by entry");
                    self.batch.store(false, Ordering::Relaxed);
                }
            }
        }
        totals(map)
    }

    /// Capacity of each counter map, in cgroups.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// What the programs count beyond time, switches and traffic.
    pub fn signals(&self) -> Signals {
        self.signals
    }

    /// Reads every counter, summed over CPUs (both maps, or the first
    /// error).
    pub fn read(&self) -> Result<Reading, MapError> {
        Ok(Reading {
            cpu: self.read_cpu()?,
            wait_hist: self.read_wait_hist()?,
            net: self.read_net()?,
            dropped: self.dropped()?,
        })
    }

    /// CPU time and switches by cgroup id, summed over CPUs.
    ///
    /// Every CPU first bills the slice it is running and sends its pending
    /// counters to the map (see `sync.rs`), so a task that never leaves its
    /// CPU still shows up-to-date time. Without the sync (kernels before
    /// 5.10) the read lags each CPU by up to a tick period
    /// (`TICK_PERIOD_NS`).
    pub fn read_cpu(&self) -> Result<IdMap<CpuCounters>, MapError> {
        if let Some(sync) = &self.sync {
            sync.run().map_err(MapError::IoError)?;
        }
        self.totals(&self.cpu, 0)
    }

    /// Run-queue waits by duration and cgroup id, summed over CPUs (empty
    /// with the histogram off). Read right after [`Maps::read_cpu`], whose
    /// sync also brought each CPU's pending buckets into the map.
    pub fn read_wait_hist(&self) -> Result<IdMap<WaitHistogram>, MapError> {
        if !self.signals.wait_histogram {
            return Ok(IdMap::default());
        }
        self.totals(&self.wait_hist, 2)
    }

    /// Traffic by socket cgroup id, summed over CPUs. Read right after
    /// [`Maps::read_cpu`], whose sync also brought each CPU's pending
    /// traffic into the map.
    pub fn read_net(&self) -> Result<IdMap<NetCounters>, MapError> {
        self.totals(&self.net, 1)
    }

    /// Updates lost to full maps, `[cpu, net]`.
    pub fn dropped(&self) -> Result<[u64; 2], MapError> {
        let mut dropped = [0; 2];
        for (slot, idx) in dropped.iter_mut().zip([DROP_CPU, DROP_NET]) {
            *slot = self.drops.get(&idx, 0)?.iter().sum();
        }
        Ok(dropped)
    }

    /// Tree events lost to a full ring buffer since the programs loaded.
    pub fn tree_drops(&self) -> Result<u64, MapError> {
        Ok(self.drops.get(&DROP_TREE, 0)?.iter().sum())
    }

    /// Every cgroup id either counter map holds.
    pub fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .cpu
            .keys()
            .flatten()
            .chain(self.net.keys().flatten())
            .chain(
                self.signals
                    .wait_histogram
                    .then(|| self.wait_hist.keys().flatten())
                    .into_iter()
                    .flatten(),
            )
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Deletes the counters of cgroups that are gone for good.
    pub fn forget(&mut self, ids: &[u64]) {
        for id in ids {
            // NotFound is fine: a cgroup may have had only CPU or only traffic.
            let _ = self.cpu.remove(id);
            let _ = self.net.remove(id);
            if self.signals.wait_histogram {
                let _ = self.wait_hist.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_before_5_11_charge_maps_to_memlock() {
        assert!(charges_memlock("5.10.0-46-cloud-amd64"));
        assert!(charges_memlock("4.19.0"));
        assert!(!charges_memlock("5.11.0"));
        assert!(!charges_memlock("6.1.0-57-cloud-amd64"));
        assert!(!charges_memlock("6.12.118+deb12-cloud-amd64"));
        assert!(!charges_memlock("garbage"));
    }
}
