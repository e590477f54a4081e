//! podmeter: per-pod and per-container CPU, memory and network usage from
//! eBPF, exported for Prometheus. See the README for the metrics.

use std::{
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use tracing::{debug, info, warn};

use podmeter::{
    bpf,
    bpf::pins::{Origin, Pins},
    cgroup,
    cgroup::Mounts,
    counters::{CounterSource, KernelCounters},
    flags,
    gzip::Gzip,
    health::Health,
    http,
    index::IndexState,
    kube, metrics,
    namer::Namer,
    preflight, prerender, privileges, refresher,
    refresher::Refresher,
    tracker::Tracker,
};

/// Default port: clear of node-exporter (9100), kube-state-metrics
/// (8080/8081) and the kubelet (10250/10255). On loopback: a host's
/// per-process usage is its own business until someone chooses to publish
/// it (the chart listens on the pod network, with TLS and authentication).
const DEFAULT_LISTEN: &str = "127.0.0.1:9740";

/// Descriptors kept for everything but cgroup files: up to 128 HTTP
/// connections, the BPF maps, programs and links, the API client.
const NOFILE_RESERVE: usize = 256;

/// Per-pod and per-container CPU, memory and network usage from eBPF, for Prometheus.
///
/// podmeter counts CPU time (sched_switch) and traffic (cgroup_skb) per cgroup
/// in the kernel, names each cgroup (Kubernetes pod and container from the
/// kubelet's cgroup layout, otherwise the cgroup path), and serves the totals
/// at /metrics. It needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN), a
/// kernel with BTF (5.8+) and a cgroup2 hierarchy (pure v2 or hybrid). Once
/// its programs are attached it drops every capability but CAP_BPF.
#[derive(Debug, Parser)]
#[command(name = "podmeter", version, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Address to serve /metrics, /healthz and /readyz on. Loopback by
    /// default; 0.0.0.0:9740 publishes it (see --web-config-file).
    #[arg(long, env = "PODMETER_LISTEN", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,

    /// TLS and basic authentication for the endpoints, in the Prometheus
    /// exporter-toolkit format (node-exporter's --web.config.file):
    /// tls_server_config (cert_file, key_file; re-read when they change)
    /// and basic_auth_users (bcrypt hashes). /healthz and /readyz stay open.
    #[arg(long, env = "PODMETER_WEB_CONFIG_FILE", value_name = "PATH")]
    web_config_file: Option<PathBuf>,

    /// Who may read /metrics. `kubernetes`: a bearer token the Kubernetes
    /// API authenticates (TokenReview) for a user allowed `get` on the
    /// non-resource URL /metrics (SubjectAccessReview), over HTTPS (the web
    /// config's certificate, else a self-signed one made at start). `none`:
    /// anyone who can connect (or the web config's basic_auth_users).
    #[arg(long, value_enum, default_value = "none")]
    auth: AuthMode,

    /// How long a token's decision is remembered (the API is asked again
    /// after it). 1s to 1h.
    #[arg(long, default_value = "2m", value_parser = flags::auth_ttl)]
    auth_cache_ttl: Duration,

    /// The cgroup2 mount to read. Default: found in /proc/self/mountinfo
    /// (/sys/fs/cgroup on pure v2 hosts, /sys/fs/cgroup/unified on hybrid
    /// ones). Set it when the host's hierarchy is mounted elsewhere, e.g.
    /// /host/sys/fs/cgroup in a container.
    #[arg(long, env = "PODMETER_CGROUP_ROOT", value_name = "PATH")]
    cgroup_root: Option<PathBuf>,

    /// Node name put on every series. Default: the host name.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,

    /// Log filter: error, warn, info, debug, trace, or tracing directives
    /// such as `podmeter=debug`.
    #[arg(long, env = "PODMETER_LOG", default_value = "info")]
    log_level: String,

    /// How long the series of a deleted cgroup keep their final values
    /// before they go (a few scrape intervals, so the last increase is seen).
    /// 0 to 24h.
    #[arg(long, default_value = "90s", value_parser = flags::wait)]
    grace_period: Duration,

    /// How often to read memory and CPU limits and retire removed cgroups
    /// (CPU time, traffic and throttling are read at each scrape). 100ms to 24h.
    #[arg(long, default_value = "15s", value_parser = flags::interval)]
    refresh_interval: Duration,

    /// How often to walk the whole cgroup tree as a safety net. New and
    /// removed cgroups come as kernel events; where the kernel cannot
    /// provide them, the tree is walked every --refresh-interval instead.
    /// 100ms to 24h.
    #[arg(long, default_value = "5m", value_parser = flags::interval)]
    rescan_interval: Duration,

    /// Capacity of the per-cgroup kernel maps. Kernel memory is about
    /// 48 bytes × CPUs per entry (112 with --wait-histogram); updates beyond
    /// it are counted in podmeter_bpf_map_dropped_updates_total.
    #[arg(long, default_value_t = podmeter_common::DEFAULT_MAX_CGROUPS, value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
    max_cgroups: u32,

    /// How long a scrape, or the background refresh beyond its interval,
    /// may stall before /healthz fails (and the kubelet's liveness probe
    /// restarts the agent). 5s to 24h.
    #[arg(long, default_value = "60s", value_parser = flags::watchdog)]
    watchdog_timeout: Duration,

    /// Kubeconfig for the Kubernetes API (pod, namespace and container
    /// names). Default: in-cluster service account, else $KUBECONFIG or
    /// ~/.kube/config; with none of them podmeter runs in host mode.
    #[arg(long, env = "KUBECONFIG", value_name = "PATH")]
    kubeconfig: Option<PathBuf>,

    /// Do not use the Kubernetes API even if one is configured.
    #[arg(long, conflicts_with = "kubeconfig")]
    no_kubernetes: bool,

    /// How long a new pod cgroup's series wait for its names from the API
    /// before they go out without them (a series' labels stay stable, and
    /// the kernel keeps counting meanwhile, so nothing is lost). 0 to 24h.
    #[arg(long, default_value = "30s", value_parser = flags::wait)]
    metadata_wait: Duration,

    /// Also export run-queue waits by duration, as the histogram
    /// *_cpu_wait_duration_seconds (8 log2 buckets, 262 µs to 16.8 ms and
    /// +Inf): 10 more series per cgroup, and 64 bytes ×
    /// CPUs of kernel memory per --max-cgroups entry. Turning it on or off
    /// restarts the pinned counters from zero (the maps change shape).
    #[arg(long)]
    wait_histogram: bool,

    /// Add owner_kind and owner_name labels (the pod's controller) to pod
    /// series. Off by default to keep cardinality low.
    #[arg(long)]
    owner_labels: bool,

    /// Copy these pod labels onto pod series as label_<key>
    /// (comma-separated keys, e.g. app.kubernetes.io/name,team).
    #[arg(long, value_delimiter = ',', value_name = "KEYS", value_parser = flags::label_key)]
    pod_labels: Vec<String>,

    /// Where the counting programs and their maps are pinned (in bpffs), so
    /// that the kernel keeps counting while no agent runs and the next agent
    /// continues every counter. Under /sys/fs/bpf, bpffs is mounted there if
    /// it is not already. A directory podmeter owns: `podmeter cleanup`
    /// removes it.
    #[arg(
        long,
        env = "PODMETER_PIN_PATH",
        value_name = "PATH",
        default_value = "/sys/fs/bpf/podmeter"
    )]
    pin_path: PathBuf,

    /// Pin nothing: the programs detach when the agent exits, and every
    /// counter starts from zero at the next start.
    #[arg(long, conflicts_with = "pin_path")]
    no_pin: bool,

    /// When stopped, remove the pins (as `podmeter cleanup` does) if this
    /// DaemonSet no longer exists or is being deleted: an uninstall leaves
    /// nothing in the kernel, while a rolling upgrade or a drain keeps
    /// counting. The chart sets it to its own DaemonSet.
    #[arg(long, value_name = "NAMESPACE/NAME", value_parser = flags::namespaced)]
    remove_pins_with: Option<(String, String)>,

    /// Test-only: bill CPU from the raw sched_switch tracepoint (the
    /// fallback for kernels that refuse tp_btf) where tp_btf works.
    #[arg(long, hide = true)]
    force_raw_switch: bool,

    /// Test-only: find new and removed cgroups by walking the tree every
    /// refresh (the fallback where the kernel has no tree events), not by
    /// following mkdir/rmdir events.
    #[arg(long, hide = true)]
    force_tree_walks: bool,

    /// Test-only: read the counter maps one entry at a time (the fallback
    /// for kernels without batch reads).
    #[arg(long, hide = true)]
    force_entry_reads: bool,

    /// Test-only: attach no per-CPU tick, so that a CPU's pending counters
    /// reach the maps only when their slot is needed for another cgroup
    /// and at the sync before each read (what makes a read exact is then
    /// the sync alone).
    #[arg(long, hide = true)]
    force_no_tick: bool,

    /// Test-only: read throttling counters from each limited cgroup's
    /// cpu.stat (the fallback for kernels without cgroup iterators), not
    /// from the CFS iterator's walk.
    #[arg(long, hide = true)]
    force_throttling_files: bool,

    /// Kernel BTF to read (tests point it elsewhere for the missing-BTF error).
    #[arg(long, hide = true, default_value = "/sys/kernel/btf/vmlinux")]
    btf_path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AuthMode {
    None,
    Kubernetes,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Remove every pin under --pin-path, which detaches the programs that
    /// kept counting after the agent stopped, and exit. Run it on a node
    /// podmeter is removed from (the chart does on uninstall).
    Cleanup,
    /// Check, from a pod in the cluster, that every agent of a DaemonSet is
    /// ready and serves /metrics (with podmeter's series) to this pod's
    /// service account, and with --prometheus that Prometheus has every
    /// agent up; exit 0 when all holds, 1 with what failed (the pod and
    /// node) when it still does not after --timeout. The chart's `helm test`
    /// runs it.
    Probe(ProbeArgs),
}

#[derive(Debug, clap::Args)]
struct ProbeArgs {
    /// Namespace of the DaemonSet.
    #[arg(long)]
    namespace: String,
    /// Name of the DaemonSet; its selector finds the agent pods.
    #[arg(long)]
    daemonset: String,
    /// The agents' metrics port.
    #[arg(long, default_value_t = 9740)]
    port: u16,
    /// The agents serve plain HTTP (the chart's metrics.auth=none), not
    /// HTTPS.
    #[arg(long)]
    plain_http: bool,
    /// A Prometheus to ask for up{job="podmeter"}, as http://host:port.
    #[arg(long, value_name = "URL")]
    prometheus: Option<String>,
    /// Keep trying this long (agents may still be starting).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// At most two glibc malloc arenas. glibc gives threads arenas of their
/// own (up to eight per core), and each keeps what its threads freed: with
/// the scrape's short-lived helper threads (throttling reads, gzip) peak
/// RSS at a thousand pods was 40.3 MiB instead of 32.8 with two arenas, at
/// the same scrape latency (measured here, 200 gzip and 200 plain scrapes).
/// Set before any thread starts. `MALLOC_ARENA_MAX` in the environment, which
/// glibc has already read, wins: an operator's own trade of memory for
/// allocation contention (many concurrent scrapers), and the soak's A/B.
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; no thread runs yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    let filter = match tracing_subscriber::EnvFilter::try_new(&cli.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("podmeter: error: --log-level {:?}: {e}", cli.log_level);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    if let Err(e) = flags::distinct_label_names(&cli.pod_labels) {
        eprintln!("podmeter: error: {e}");
        return ExitCode::from(2);
    }
    if let Some(Command::Cleanup) = cli.command {
        return match bpf::pins::cleanup(&cli.pin_path) {
            Ok(removed) => {
                info!(
                    "removed {} pins under {}; nothing of podmeter's is left attached",
                    removed.len(),
                    cli.pin_path.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "podmeter: error: removing the pins under {}: {e}",
                    cli.pin_path.display()
                );
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Probe(p)) = &cli.command {
        return probe(p);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podmeter: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// `podmeter probe`: its verdict on stdout, or the error on one line.
fn probe(p: &ProbeArgs) -> ExitCode {
    let opts = podmeter::probe::Options {
        namespace: p.namespace.clone(),
        daemonset: p.daemonset.clone(),
        port: p.port,
        https: !p.plain_http,
        prometheus: p.prometheus.clone(),
        timeout: p.timeout,
    };
    let verdict = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(podmeter::probe::run(&opts)));
    match verdict {
        Ok(seen) => {
            println!("ok: {seen}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("podmeter: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: many of the
/// agent's errors already quote their cause in their own message.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain().map(ToString::to_string) {
        if out.contains(&cause) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&cause);
    }
    out.replace('\n', " ")
}

fn read_trimmed(path: &str) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn run(cli: Cli) -> anyhow::Result<()> {
    preflight::privileges()?;
    preflight::btf(&cli.btf_path)?;
    // Read before anything is loaded: a bad file fails fast, in one line.
    let web = cli
        .web_config_file
        .as_deref()
        .map(podmeter::web::Web::load)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--web-config-file {e}"))?;
    if cli.auth == AuthMode::Kubernetes {
        if web.as_ref().is_some_and(|w| w.auth.is_some()) {
            anyhow::bail!(
                "--auth=kubernetes and the web config's basic_auth_users both say who may read: choose one"
            );
        }
        if cli.no_kubernetes {
            anyhow::bail!(
                "--auth=kubernetes needs the Kubernetes API, and --no-kubernetes turns it off"
            );
        }
    }
    let mounts = Mounts::detect(cli.cgroup_root.as_deref())?;
    let listener = preflight::bind(cli.listen)?;
    // Counted cgroups keep their files open (see cgroup::files).
    let limit = cgroup::files::raise_nofile_limit().unwrap_or_else(|e| {
        warn!("cannot raise the open-files limit ({e})");
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft)
    });
    // What kept-open cgroup files may hold: the rest is for connections
    // (http::Limits), maps, programs and the API client.
    let budget = usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .saturating_sub(NOFILE_RESERVE);
    cgroup::files::set_budget(budget);
    debug!(
        limit,
        budget, "open-files limit; descriptors for kept-open cgroup files"
    );
    let node = cli
        .node_name
        .clone()
        .unwrap_or_else(|| read_trimmed("/proc/sys/kernel/hostname"));
    let kernel = read_trimmed("/proc/sys/kernel/osrelease");
    info!(
        cgroup2 = %mounts.unified.display(),
        memory_v1 = ?mounts.memory_v1,
        cpu_v1 = ?mounts.cpu_v1,
        %node,
        %kernel,
        "starting podmeter {}",
        env!("CARGO_PKG_VERSION")
    );
    if !mounts.psi {
        info!(
            "no pressure stall information: {} has no cpu.pressure (a kernel without CONFIG_PSI, \
             or booted with psi=0); the pressure families are absent",
            mounts.unified.display()
        );
    }

    // The API configuration is read before the programs are loaded (a bad
    // kubeconfig fails before touching the kernel) and before capabilities
    // go (a root-only kubeconfig stays readable). A current-thread runtime
    // starts no thread.
    let kube_config = if cli.no_kubernetes {
        None
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(kube::config(cli.kubeconfig.as_deref()))
            .context("Kubernetes API client")?
    };

    // Pins are prepared while every capability is still there (mounting
    // bpffs needs CAP_SYS_ADMIN).
    let (pins, origin) = if cli.no_pin {
        (None, Origin::Unpinned("--no-pin".into()))
    } else {
        let wait_hist = bpf::wait_hist_capacity(cli.max_cgroups, cli.wait_histogram);
        match Pins::prepare(&cli.pin_path, cli.max_cgroups, wait_hist) {
            Ok((p, origin)) => (Some(p), origin),
            Err(why) => (None, Origin::Unpinned(why)),
        }
    };
    let bpf::Loaded {
        attached,
        maps,
        tree,
        cfs,
    } = bpf::load(
        &mounts,
        &cli.btf_path,
        cli.max_cgroups,
        cli.wait_histogram,
        match &mounts.unified_shows {
            _ if cli.force_tree_walks => Err("forced by --force-tree-walks".to_owned()),
            Some(_) => Ok(()),
            None => Err(format!(
                "{} is a mount whose root lies outside this process's cgroup namespace, so the \
                 kernel's cgroup paths cannot be placed under it; a pod in the host's cgroup \
                 namespace (privileged pods are) can follow them",
                mounts.unified.display()
            )),
        },
        pins.as_ref(),
        bpf::Force {
            raw_switch: cli.force_raw_switch,
            entry_reads: cli.force_entry_reads,
            no_tick: cli.force_no_tick,
            throttling_files: cli.force_throttling_files,
        },
    )?;
    if cli.force_entry_reads {
        info!("reading the counter maps entry by entry (--force-entry-reads)");
    }
    if cli.force_no_tick {
        warn!(
            "no per-CPU tick (--force-no-tick): pending counters reach the maps only when their \
             slot is needed and at each read"
        );
    }
    match &origin {
        Origin::Adopted => info!(
            pin_path = %cli.pin_path.display(),
            "adopted the pinned counters of an earlier agent: every counter continues, including \
             what the kernel counted while no agent ran"
        ),
        Origin::Created => info!(
            pin_path = %cli.pin_path.display(),
            "pinned the counting programs and maps: they keep counting if this agent stops"
        ),
        Origin::Reset(what) => warn!(
            pin_path = %cli.pin_path.display(),
            "COUNTER RESET: removed pins this agent cannot read: {what}; every counter restarts \
             from zero (podmeter_counters_origin_info{{origin=\"reset\"}})"
        ),
        Origin::Unpinned(why) => {
            let level_warn = !cli.no_pin;
            if level_warn {
                warn!(
                    "not pinning ({why}): counting stops while no agent runs, and a restart \
                     resets every counter"
                );
            } else {
                info!("not pinning (--no-pin): the programs detach when the agent exits");
            }
        }
    }
    info!(
        max_cgroups = cli.max_cgroups,
        "attached sched_switch, a CPU tick on every online CPU, cgroup_skb ingress/egress at {}{}",
        mounts.unified.display(),
        if tree.is_some() {
            " and cgroup mkdir/rmdir"
        } else {
            ""
        }
    );

    match &cfs {
        Ok(_) => info!(
            "throttling counters: read by a cgroup iterator walking {} at each scrape",
            mounts.cpu_hierarchy().display()
        ),
        Err(e) => info!(
            "throttling counters: read from each limited cgroup's cpu.stat at each scrape, not \
             by a cgroup iterator (Linux 6.1): {e}"
        ),
    }

    // Still single-threaded: every thread started from here on inherits the
    // reduced capability sets.
    let privileges = privileges::keep_only_bpf().context("dropping capabilities")?;
    // A scrape reads the maps with what is left: check that now, not at
    // the first scrape.
    let reading = maps.read().with_context(|| {
        format!(
            "the BPF maps cannot be read with only {} after dropping the other capabilities; \
             a seccomp profile or LSM policy may be refusing bpf() to this process",
            privileges.kept
        )
    })?;
    info!(
        kept = %privileges.kept,
        dropped = %privileges::names(&privileges.dropped),
        "dropped capabilities no longer needed; map reads work ({} cgroups counted so far)",
        reading.cpu.len()
    );
    if !privileges.bounding.is_empty() {
        warn!(
            bounding = %privileges::names(&privileges.bounding),
            "no CAP_SETPCAP: these stay in the bounding set (they only limit what an execve could gain; podmeter executes nothing)"
        );
    }

    let pins_for_exit = pins.is_some();
    let (pin_path, remove_pins_with) = (cli.pin_path.clone(), cli.remove_pins_with.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let remove_pins = runtime.block_on(async move {
        let label_options = kube::LabelOptions {
            owner: cli.owner_labels,
            pod_labels: cli.pod_labels.clone(),
        };
        let extra_labels = label_options.names();
        let client = kube_config
            .map(::kube::Client::try_from)
            .transpose()
            .context("Kubernetes API client")?;
        let guard = guard(web, cli.auth, client.clone(), cli.auth_cache_ttl, &node)?;
        let owner_client = client.clone();
        let pods = client.map(|c| kube::PodStore::watch(c, &node, label_options));
        let namer = Namer::new(pods, extra_labels.len(), cli.metadata_wait);

        // `bpf::load` follows the tree only where the mount's place is known.
        let events = tree.zip(mounts.unified_shows.clone());
        let health = Arc::new(Health::new(
            cli.refresh_interval,
            cli.watchdog_timeout,
            Instant::now(),
        ));
        let counters: Arc<dyn CounterSource> = Arc::new(KernelCounters::new(maps, cfs.ok()));
        let root = mounts.unified.clone();
        let (mut refresher, index) = Refresher::new(
            IndexState::new(mounts, cli.grace_period),
            root,
            counters.clone(),
            health.clone(),
        );
        let (walk, first) = refresher
            .first_pass()
            .context("first scan of the cgroup tree")?;
        info!(
            cgroups = walk.cgroups,
            counted = first.read,
            "scanned the cgroup tree"
        );
        // Each request is "walk" or "read"; more pending than this serve
        // no purpose (one pass serves them all).
        let (wants, wanted) = tokio::sync::mpsc::channel(4);
        let intervals = refresher::Intervals {
            refresh: cli.refresh_interval,
            rescan: cli.rescan_interval,
        };
        refresher
            .spawn(intervals, events, wanted)
            .context("starting the refresher thread")?;
        let tracker = Arc::new(Tracker::new(index, counters, namer, wants, health));
        let exporter = Arc::new(metrics::Exporter::new(
            tracker.clone(),
            node,
            &kernel,
            extra_labels,
            origin.label(),
        )?);

        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let scheme = if guard.tls.is_some() { "https" } else { "http" };
        let auth = match &guard.auth {
            Some(http::Auth::Basic(_)) => " (basic authentication)",
            Some(http::Auth::Kubernetes(_)) => {
                " (Kubernetes bearer tokens allowed get on /metrics)"
            }
            None => "",
        };
        info!("serving {scheme}://{}/metrics{auth}", cli.listen);

        let gzip = Arc::new(Gzip::default());
        tokio::spawn(prerender::run(
            tracker.clone(),
            exporter.clone(),
            gzip.clone(),
        ));
        let app = http::App {
            exporter,
            tracker,
            max_scan_age: (cli.refresh_interval * 3).max(Duration::from_secs(30)),
            gzip,
        };
        http::serve(listener, app, guard, shutdown_signal()).await?;
        // Asked here, while the runtime runs; the pins go after the
        // programs' last reader (this process) is done.
        let remove = match (&pins, &cli.remove_pins_with, owner_client) {
            (Some(_), Some((ns, name)), Some(client)) => {
                let asked = tokio::time::timeout(
                    Duration::from_secs(3),
                    kube::daemonset_gone(client, ns, name),
                )
                .await;
                match asked {
                    Ok(Ok(gone)) => gone,
                    Ok(Err(e)) => {
                        warn!("cannot tell whether DaemonSet {ns}/{name} still exists ({e}); keeping the pins");
                        false
                    }
                    Err(_) => {
                        warn!("no answer from the API in 3 s about DaemonSet {ns}/{name}; keeping the pins");
                        false
                    }
                }
            }
            _ => false,
        };
        anyhow::Ok(remove)
    })?;
    // A worker stuck in a blocking call must not hold the exit up.
    runtime.shutdown_timeout(Duration::from_secs(2));

    drop(attached);
    if remove_pins {
        let (ns, name) = remove_pins_with.as_ref().expect("asked only when set");
        match bpf::pins::cleanup(&pin_path) {
            Ok(removed) => info!(
                "DaemonSet {ns}/{name} is gone: removed {} pins under {}; exiting with nothing left attached",
                removed.len(),
                pin_path.display()
            ),
            Err(e) => warn!(
                "DaemonSet {ns}/{name} is gone, but removing the pins under {} failed ({e}); \
                 `podmeter cleanup` on this node removes them",
                pin_path.display()
            ),
        }
    } else if pins_for_exit {
        info!(
            "exiting; the pinned programs keep counting for the next agent (`podmeter cleanup` removes them)"
        );
    } else {
        info!("programs detached; exiting");
    }
    Ok(())
}

/// TLS and authentication for the endpoints, from the web config and
/// `--auth`.
fn guard(
    web: Option<podmeter::web::Web>,
    mode: AuthMode,
    client: Option<::kube::Client>,
    ttl: Duration,
    node: &str,
) -> anyhow::Result<http::Guard> {
    let (mut tls, basic) = match web {
        Some(w) => (w.tls, w.auth),
        None => (None, None),
    };
    let auth = match mode {
        AuthMode::None => basic.map(http::Auth::Basic),
        AuthMode::Kubernetes => {
            let client = client.context(
                "--auth=kubernetes needs the Kubernetes API, and none is configured \
                 (in-cluster service account, --kubeconfig or $KUBECONFIG)",
            )?;
            if tls.is_none() {
                let (acceptor, fingerprint) =
                    podmeter::web::self_signed(vec![node.to_owned(), "localhost".into()])
                        .map_err(anyhow::Error::msg)?;
                info!(
                    sha256 = %fingerprint,
                    "made a self-signed TLS certificate (no tls_server_config in a web config)"
                );
                tls = Some(acceptor);
            }
            Some(http::Auth::Kubernetes(Arc::new(
                podmeter::access::KubeAccess::new(client, ttl),
            )))
        }
    };
    Ok(http::Guard { tls, auth })
}

/// How long stopping may take after SIGTERM before the process exits
/// anyway: well inside the kubelet's default grace period of 30 s.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received; stopping"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received; stopping"),
    }
    // Whatever is stuck (a scrape, a cgroupfs read, a connection that
    // will not close), the process ends: its programs detach with it, as
    // the kernel drops the links with the last descriptor.
    let _ = std::thread::Builder::new()
        .name("stop-deadline".into())
        .spawn(|| {
            std::thread::sleep(STOP_DEADLINE);
            eprintln!(
                "podmeter: still stopping after {}s; exiting now",
                STOP_DEADLINE.as_secs()
            );
            std::process::exit(1);
        });
}
