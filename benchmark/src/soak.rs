//! `cargo xtask soak [--duration 10m]`: podmeter under long churn, as a
//! node with short-lived pods sees it. It prints figures; it asserts nothing.
//!
//! For `--duration`, `--scrapers` threads scrape `/metrics` (every request
//! with a timeout, so a hung agent shows as errors, never as a hung soak)
//! while cgroups are created and destroyed at `--rate` a second, each with
//! a `pm-work` that sends UDP over loopback to a sink, and lives about a
//! second. Halfway through the agent is SIGKILLed and started again. After
//! the churn it keeps scraping for a grace period and a margin, so removed
//! cgroups can be retired. Every few seconds it samples the agent's RSS,
//! open descriptors and its own gauges.
//!
//! Reported: scrape errors, p50/p99 latency, RSS and descriptor growth
//! after a warm-up per agent lifetime, tracked cgroups and kernel map
//! entries against the baseline before the churn, mkdir events seen
//! against cgroups made and lost-event log lines, podmeter programs left
//! after the SIGKILL and after the final SIGTERM (and how long the SIGTERM
//! took). Raw JSON ([`results::SoakResults`]) goes to
//! `bench/results/<time>-soak.json`, the table to
//! the "Reliability (soak)" section of `bench/RESULTS.md` (the rest of the
//! file stays; `PODMETER_SOAK_RENDER=<json>` writes an earlier run's section
//! again).

use std::{
    collections::VecDeque,
    fs,
    path::Path,
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{scope, sleep},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{
    Host,
    bench::{
        self, Agent, Bench, Endpoint, Proc, Sample, Tree, output, parse_exposition, percentile,
        proc_status_bytes, round,
    },
    is_root,
    schema::{SCHEMA_VERSION, json_text, rounded},
};

pub mod results;

use results::{
    AgentSample, AgentScrapes, Churn, End, Gauges, Growth, Life as LifeSummary,
    Scrapes as ScrapeFigures, Settle, Sigkill, Sigterm, Soak, SoakOptions, SoakResults,
};

/// The heading of the soak's section in `bench/RESULTS.md`.
const HEADING: &str = "## Reliability (soak)";

#[derive(Args)]
pub struct Options {
    /// How long cgroups churn (the agent is SIGKILLed and restarted
    /// halfway), e.g. 10m, 3m, 90s.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    duration: Duration,
    /// Concurrent scrapers of /metrics.
    #[arg(long, default_value_t = 8)]
    scrapers: usize,
    /// Cgroups created (and as many destroyed) a second.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// The agent's --grace-period (the soak waits that long and a margin
    /// after the churn for the agent to retire what it removed).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    grace_period: Duration,
    /// The agent's --refresh-interval (retirement runs at each refresh).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    refresh_interval: Duration,
    /// How long a scrape may take before it counts as an error.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    scrape_timeout: Duration,
}

/// `90s`, `3m`, `1h`, `500ms`, or a plain number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: not a duration such as 90s, 3m or 1h"))?;
    let ms = match unit {
        "ms" => n,
        "" | "s" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        _ => return Err(format!("{s:?}: unit must be ms, s, m or h")),
    };
    if ms == 0 {
        return Err("must be more than zero".into());
    }
    Ok(Duration::from_millis(ms))
}

/// How long a churned cgroup lives.
const LIFETIME: Duration = Duration::from_secs(1);
/// Between two scrapes of one scraper.
const SCRAPE_PAUSE: Duration = Duration::from_millis(100);
/// Between two samples of the agent.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Longest warm-up excluded from the growth figures.
const WARM_UP: Duration = Duration::from_secs(120);

/// What one scrape gave.
struct Scraped {
    agent: usize,
    at: f64,
    result: Result<f64, String>,
}

/// State the threads share.
struct Shared {
    started: Instant,
    /// The agent to scrape and sample; none while it restarts.
    target: Mutex<Option<Target>>,
    samples: Mutex<Vec<AgentSample>>,
    stop: AtomicBool,
    stop_churn: AtomicBool,
    scrapes: Mutex<Vec<Scraped>>,
    /// Scrapes cut short because their agent was killed under them.
    cut: AtomicU64,
    created: AtomicU64,
    removed: AtomicU64,
    /// The churn's worst lag behind its schedule, in ms.
    lag_ms: AtomicU64,
    timeout: Duration,
}

impl Life {
    fn target(&self, index: usize) -> Target {
        Target {
            index,
            url: self.agent.endpoint.url.clone(),
            pid: self.agent.pid(),
        }
    }
}

impl Shared {
    fn secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn endpoint(&self, url: &str) -> Endpoint {
        // A later --max-time replaces the endpoint's default one.
        Endpoint {
            url: url.to_owned(),
            tls: vec![
                "--max-time".into(),
                format!("{}", self.timeout.as_secs_f64()),
            ],
        }
    }
}

/// The agent now: its index (0 before the SIGKILL, 1 after), URL, pid.
#[derive(Clone)]
struct Target {
    index: usize,
    url: String,
    pid: u32,
}

/// One agent lifetime.
struct Life {
    agent: Agent,
    tag: &'static str,
    /// Seconds since the start of the soak.
    started_at: f64,
    /// Its BPF program ids.
    progs: Vec<u64>,
}

/// `cargo xtask soak`.
pub fn run(o: &Options, host: &dyn Host) -> Result<()> {
    let root = host.root();
    if let Some(json_path) = std::env::var_os("PODMETER_SOAK_RENDER") {
        // An earlier run's markdown again, from its JSON (after a change to
        // the report).
        let text = fs::read_to_string(&json_path)?;
        let results: SoakResults = serde_json::from_str(&text).with_context(|| {
            format!(
                "reading {} as soak results",
                Path::new(&json_path).display()
            )
        })?;
        return write_section(&root, &results);
    }
    if !is_root() {
        bail!("the soak loads eBPF programs and makes cgroups: run `sudo -E cargo xtask soak`");
    }
    host.prepare(&[])?;
    let target = host.target_dir();
    let scratch = target.join("bench");
    fs::create_dir_all(&scratch)?;
    let b = Bench {
        host,
        plan: &bench::QUICK,
        podmeter: target.join("release/podmeter"),
        pm_work: target.join("release/pm-work"),
        scratch,
        tree: Tree::new()?,
        clk_tck: 100.0,
    };
    let stamp = output(Command::new("date").args(["-u", "+%Y-%m-%dT%H%M%SZ"]))?
        .trim()
        .to_owned();
    let version = output(Command::new(&b.podmeter).arg("--version"))?
        .trim()
        .to_owned();
    let commit =
        output(
            Command::new("git")
                .current_dir(&root)
                .args(["rev-parse", "--short", "HEAD"]),
        )?
        .trim()
        .to_owned();
    let results = soak(&b, o)?;
    let results = SoakResults {
        schema_version: SCHEMA_VERSION,
        started: stamp.clone(),
        podmeter: format!("{version} ({commit})"),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get() as u64),
        kernel: output(Command::new("uname").arg("-r"))?.trim().to_owned(),
        options: SoakOptions {
            duration_secs: o.duration.as_secs_f64(),
            scrapers: o.scrapers as u64,
            rate_per_sec: u64::from(o.rate),
            cgroup_lifetime_secs: LIFETIME.as_secs_f64(),
            grace_period_secs: o.grace_period.as_secs_f64(),
            refresh_interval_secs: o.refresh_interval.as_secs_f64(),
            scrape_timeout_secs: o.scrape_timeout.as_secs_f64(),
        },
        soak: results,
    };

    let dir = root.join("bench/results");
    fs::create_dir_all(&dir)?;
    let json_path = dir.join(format!("{stamp}-soak.json"));
    fs::write(&json_path, serde_json::to_string_pretty(&results)? + "\n")?;
    eprintln!("soak: wrote {}", json_path.display());
    write_section(&root, &results)
}

/// Prints the soak's section and writes it into `bench/RESULTS.md`.
fn write_section(root: &Path, results: &SoakResults) -> Result<()> {
    let md = markdown(results);
    let path = root.join("bench/RESULTS.md");
    let existing = fs::read_to_string(&path).unwrap_or_default();
    fs::write(&path, replace_section(&existing, &md))?;
    println!("{md}");
    eprintln!(
        "soak: wrote the \"{}\" section of bench/RESULTS.md",
        &HEADING[3..]
    );
    Ok(())
}

/// `existing` with its soak section (up to the next `## ` heading)
/// replaced by `section`, or `section` appended.
pub fn replace_section(existing: &str, section: &str) -> String {
    let section = section.trim_end();
    let Some(at) = existing.find(HEADING) else {
        let existing = existing.trim_end();
        return if existing.is_empty() {
            format!("{section}\n")
        } else {
            format!("{existing}\n\n{section}\n")
        };
    };
    let after = &existing[at + HEADING.len()..];
    let rest = after.find("\n## ").map_or("", |i| &after[i + 1..]);
    let before = existing[..at].trim_end();
    let mut out = String::new();
    if !before.is_empty() {
        out += before;
        out += "\n\n";
    }
    out += section;
    out += "\n";
    if !rest.is_empty() {
        out += "\n";
        out += rest;
    }
    out
}

/// The soak section of an existing `bench/RESULTS.md`, if any (for the
/// benchmark, which rewrites the rest of the file, to keep it).
pub fn section_of(existing: &str) -> Option<&str> {
    let at = existing.find(HEADING)?;
    let after = &existing[at + HEADING.len()..];
    let end = after
        .find("\n## ")
        .map_or(existing.len(), |i| at + HEADING.len() + i);
    Some(existing[at..end].trim_end())
}

fn soak(b: &Bench, o: &Options) -> Result<Soak> {
    // One sink for every churned sender, in a cgroup of its own.
    let mut sink = b
        .tree
        .cgroup("sink")?
        .pm_work(b, None, &["udp-listen", "127.0.0.1:0"])?;
    let sink_port = match sink.line()?.as_slice() {
        [k, p] if k == "listening" => p.clone(),
        other => bail!("udp-listen said {other:?}"),
    };
    let sink_addr = format!("127.0.0.1:{sink_port}");
    let agent_args: Vec<String> = vec![
        "--grace-period".into(),
        format!("{}ms", o.grace_period.as_millis()),
        "--refresh-interval".into(),
        format!("{}ms", o.refresh_interval.as_millis()),
    ];
    let args: Vec<&str> = agent_args.iter().map(String::as_str).collect();

    let sh = Shared {
        started: Instant::now(),
        target: Mutex::new(None),
        samples: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        stop_churn: AtomicBool::new(false),
        scrapes: Mutex::new(Vec::new()),
        cut: AtomicU64::new(0),
        created: AtomicU64::new(0),
        removed: AtomicU64::new(0),
        lag_ms: AtomicU64::new(0),
        timeout: o.scrape_timeout,
    };
    let mut life = start(b, &sh, "soak-a", &args)?;
    let target = life.target(0);
    // The sink has slept in recv since before the agent came up, so it has
    // no counters yet; the churn's first datagram would make it a new live
    // cgroup that never leaves. Wake it now, and let a refresh see it, so
    // the baseline holds every cgroup the soak keeps.
    std::net::UdpSocket::bind("127.0.0.1:0")?.send_to(b"baseline", &sink_addr)?;
    sleep(2 * o.refresh_interval);
    let baseline = sample(&sh, &target);
    sh.samples.lock().unwrap().push(baseline.clone());
    sh.target.lock().unwrap().replace(target);
    eprintln!(
        "soak: agent up; baseline {}",
        serde_json::to_string(&baseline.metrics)?
    );

    let tail = o.grace_period + 2 * o.refresh_interval + Duration::from_secs(15);
    let half = o.duration / 2;
    let mut lives: Vec<LifeSummary> = Vec::new();
    let mut kill: Option<Sigkill> = None;
    let mut churn_end: Option<f64> = None;
    let mut created_at_kill = 0;
    let mut error: Option<String> = None;

    let outcome: Result<()> = scope(|s| {
        s.spawn(|| churn(b, &sh, o.rate, &sink_addr));
        s.spawn(|| sampler(&sh));
        for _ in 0..o.scrapers {
            s.spawn(|| scraper(&sh));
        }
        let result = (|| -> Result<()> {
            let mut last_progress = Instant::now();
            loop {
                sleep(Duration::from_millis(100));
                let now = sh.started.elapsed();
                if lives.is_empty() && now >= half {
                    // A crash: SIGKILL, no cleanup of its own.
                    sh.target.lock().unwrap().take();
                    created_at_kill = sh.created.load(Ordering::Relaxed);
                    let killed_at = sh.secs();
                    let pid = life.agent.pid();
                    signal(pid, "KILL");
                    let exited = wait_exit(pid, Duration::from_secs(10));
                    let progs = life.progs.clone();
                    let (left, gone_after) = progs_left(&progs, Duration::from_secs(10))?;
                    let samples = sh.samples.lock().unwrap().clone();
                    lives.push(summary(b, &life, 0, &samples, killed_at));
                    let log = b.scratch.join(format!("podmeter-{}.log", life.tag));
                    let t = Instant::now();
                    let old = std::mem::replace(&mut life, start(b, &sh, "soak-b", &args)?);
                    let restart_secs = t.elapsed().as_secs_f64();
                    drop(old);
                    b.tree.remove("agent-soak-a");
                    eprintln!(
                        "soak: SIGKILLed the agent at {killed_at:.0} s (exited: {exited}); \
                         its programs left: {left:?}; restarted in {restart_secs:.1} s"
                    );
                    kill = Some(Sigkill {
                        at_secs: round(killed_at, 1),
                        exited,
                        programs: progs.len() as u64,
                        programs_left: left,
                        programs_gone_after_secs: gone_after.map(|s| round(s, 2)),
                        restart_secs: round(restart_secs, 2),
                        log: log.display().to_string(),
                    });
                    sh.target.lock().unwrap().replace(life.target(1));
                }
                if churn_end.is_none() && now >= o.duration {
                    sh.stop_churn.store(true, Ordering::Relaxed);
                    churn_end = Some(sh.secs());
                    eprintln!(
                        "soak: churn over ({} cgroups); {:.0} s for retirement",
                        sh.created.load(Ordering::Relaxed),
                        tail.as_secs_f64()
                    );
                }
                if now >= o.duration + tail {
                    return Ok(());
                }
                if last_progress.elapsed() >= Duration::from_secs(30) {
                    last_progress = Instant::now();
                    let scrapes = sh.scrapes.lock().unwrap();
                    let errors = scrapes.iter().filter(|s| s.result.is_err()).count();
                    eprintln!(
                        "soak: {:.0} s: {} scrapes, {errors} errors, {} cgroups made",
                        now.as_secs_f64(),
                        scrapes.len(),
                        sh.created.load(Ordering::Relaxed)
                    );
                }
            }
        })();
        sh.stop_churn.store(true, Ordering::Relaxed);
        sh.stop.store(true, Ordering::Relaxed);
        result
    });
    if let Err(e) = outcome {
        eprintln!("soak: stopped early: {e:#}");
        error = Some(format!("{e:#}"));
    }
    let ended_at = sh.secs();
    let samples = std::mem::take(&mut *sh.samples.lock().unwrap());
    lives.push(summary(b, &life, lives.len(), &samples, ended_at));

    // The end: SIGTERM, which must detach the programs and exit.
    let pid = life.agent.pid();
    let progs = life.progs.clone();
    let t = Instant::now();
    signal(pid, "TERM");
    let exited = wait_exit(pid, Duration::from_secs(10));
    let exit_secs = t.elapsed().as_secs_f64();
    if !exited {
        signal(pid, "KILL");
        wait_exit(pid, Duration::from_secs(10));
    }
    let (left, _) = progs_left(&progs, Duration::from_secs(5))?;
    drop(life);
    drop(sink);
    let end = End {
        error,
        sigterm: Sigterm {
            exited_within_10s: exited,
            secs: round(exit_secs, 2),
            programs_left: left,
        },
    };

    let scrapes = sh.scrapes.into_inner().unwrap();
    let ms: Vec<f64> = scrapes
        .iter()
        .filter_map(|s| s.result.as_ref().ok().copied())
        .collect();
    let errors: Vec<&Scraped> = scrapes.iter().filter(|s| s.result.is_err()).collect();
    let mut kinds: Vec<String> = Vec::new();
    for e in &errors {
        let msg = e.result.as_ref().err().cloned().unwrap_or_default();
        if kinds.len() < 5 && !kinds.contains(&msg) {
            kinds.push(msg);
        }
    }
    let per_agent: Vec<AgentScrapes> = (0..lives.len())
        .map(|i| {
            let mine: Vec<&Scraped> = scrapes.iter().filter(|s| s.agent == i).collect();
            let errs: Vec<&&Scraped> = mine.iter().filter(|s| s.result.is_err()).collect();
            AgentScrapes {
                scrapes: mine.len() as u64,
                errors: errs.len() as u64,
                timeouts: errs.iter().filter(|s| is_timeout(s)).count() as u64,
                first_error_at_secs: errs.first().map(|s| round(s.at, 1)),
                last_ok_at_secs: mine
                    .iter()
                    .rev()
                    .find(|s| s.result.is_ok())
                    .map(|s| round(s.at, 1)),
            }
        })
        .collect();
    let churn_end = churn_end.unwrap_or(ended_at);
    let created = sh.created.load(Ordering::Relaxed);
    Ok(Soak {
        secs: round(ended_at, 0),
        churn: Churn {
            cgroups_created: created,
            cgroups_removed: sh.removed.load(Ordering::Relaxed),
            achieved_rate_per_sec: round(created as f64 / churn_end.max(1.0), 1),
            worst_lag_ms: sh.lag_ms.load(Ordering::Relaxed),
            ended_at_secs: round(churn_end, 1),
            created_before_kill: created_at_kill,
        },
        scrapes: ScrapeFigures {
            total: scrapes.len() as u64,
            ok: ms.len() as u64,
            errors: errors.len() as u64,
            timeouts: errors.iter().filter(|s| is_timeout(s)).count() as u64,
            cut_by_sigkill: sh.cut.load(Ordering::Relaxed),
            error_kinds: kinds,
            p50_ms: rounded(percentile(&ms, 50.0), 1),
            p99_ms: rounded(percentile(&ms, 99.0), 1),
            max_ms: rounded(percentile(&ms, 100.0), 1),
            per_agent,
        },
        settle: settle(&samples, &baseline, churn_end),
        baseline: baseline.metrics,
        lives,
        sigkill: kill,
        end,
        samples,
    })
}

fn is_timeout(s: &Scraped) -> bool {
    s.result
        .as_ref()
        .is_err_and(|e| e.contains("timed out") || e.contains("Timeout"))
}

/// Starts an agent and notes its programs.
fn start(b: &Bench, sh: &Shared, tag: &'static str, args: &[&str]) -> Result<Life> {
    let before: Vec<u64> = bench::programs()?.into_keys().collect();
    let agent = Agent::start_with(b, tag, args)?;
    let progs = bench::programs()?
        .into_iter()
        .filter(|(id, p)| !before.contains(id) && p.name.starts_with("pm_"))
        .map(|(id, _)| id)
        .collect();
    Ok(Life {
        agent,
        tag,
        started_at: sh.secs(),
        progs,
    })
}

/// Which of `progs` are still loaded, polled for up to `wait`; and how
/// long they took to go.
fn progs_left(progs: &[u64], wait: Duration) -> Result<(Vec<u64>, Option<f64>)> {
    let t = Instant::now();
    loop {
        let loaded = bench::programs()?;
        let left: Vec<u64> = progs
            .iter()
            .copied()
            .filter(|id| loaded.contains_key(id))
            .collect();
        if left.is_empty() {
            return Ok((left, Some(t.elapsed().as_secs_f64())));
        }
        if t.elapsed() > wait {
            return Ok((left, None));
        }
        sleep(Duration::from_millis(100));
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .output();
}

/// Waits until `pid` has exited (a zombie counts: the agent is its child).
fn wait_exit(pid: u32, wait: Duration) -> bool {
    let t = Instant::now();
    loop {
        let gone = fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z'))
        });
        if gone {
            return true;
        }
        if t.elapsed() > wait {
            return false;
        }
        sleep(Duration::from_millis(20));
    }
}

/// Creates `rate` cgroups a second, each with a `pm-work` sending UDP to
/// the sink, and removes each after [`LIFETIME`].
fn churn(b: &Bench, sh: &Shared, rate: u32, sink: &str) {
    let period = Duration::from_secs(1) / rate.max(1);
    let mut live: VecDeque<(Instant, String, Proc)> = VecDeque::new();
    let mut next = Instant::now();
    let mut i = 0u64;
    let retire = |rel: String, p: Proc| {
        drop(p);
        b.tree.remove(&rel);
        sh.removed.fetch_add(1, Ordering::Relaxed);
    };
    while !sh.stop_churn.load(Ordering::Relaxed) {
        while live.front().is_some_and(|(t, ..)| t.elapsed() >= LIFETIME) {
            let (_, rel, p) = live.pop_front().unwrap();
            retire(rel, p);
        }
        let rel = format!("churn/c{i}");
        i += 1;
        let made = b
            .tree
            .cgroup(&rel)
            .and_then(|cg| cg.worker(b, &["udp-send", sink, "20", "200"]));
        match made {
            Ok(p) => {
                sh.created.fetch_add(1, Ordering::Relaxed);
                live.push_back((Instant::now(), rel, p));
            }
            Err(e) => {
                eprintln!("soak: churn: {e:#}");
                b.tree.remove(&rel);
            }
        }
        next += period;
        let now = Instant::now();
        if now < next {
            sleep(next - now);
        } else {
            let lag = (now - next).as_millis() as u64;
            sh.lag_ms.fetch_max(lag, Ordering::Relaxed);
        }
    }
    for (_, rel, p) in live.drain(..) {
        retire(rel, p);
    }
    b.tree.remove("churn");
}

/// Scrapes the current agent until told to stop.
fn scraper(sh: &Shared) {
    while !sh.stop.load(Ordering::Relaxed) {
        let target = sh.target.lock().unwrap().clone();
        let Some(Target {
            index: agent, url, ..
        }) = target
        else {
            sleep(SCRAPE_PAUSE);
            continue;
        };
        let at = sh.secs();
        let result = sh
            .endpoint(&url)
            .fetch()
            .map(|(f, _)| f.secs * 1e3)
            .map_err(|e| format!("{e:#}"));
        let current = sh.target.lock().unwrap().as_ref().map(|t| t.index) == Some(agent);
        if result.is_err() && !current {
            sh.cut.fetch_add(1, Ordering::Relaxed);
        } else {
            sh.scrapes
                .lock()
                .unwrap()
                .push(Scraped { agent, at, result });
        }
        sleep(SCRAPE_PAUSE);
    }
}

/// Samples the current agent every [`SAMPLE_EVERY`] until told to stop.
fn sampler(sh: &Shared) {
    let mut next = Instant::now();
    while !sh.stop.load(Ordering::Relaxed) {
        next += SAMPLE_EVERY;
        while Instant::now() < next && !sh.stop.load(Ordering::Relaxed) {
            sleep(Duration::from_millis(100));
        }
        let target = sh.target.lock().unwrap().clone();
        if let Some(t) = target {
            let v = sample(sh, &t);
            sh.samples.lock().unwrap().push(v);
        }
    }
}

/// RSS, descriptors and gauges of the agent now.
fn sample(sh: &Shared, t: &Target) -> AgentSample {
    let rss = proc_status_bytes(t.pid, "VmRSS").ok();
    let fds = fs::read_dir(format!("/proc/{}/fd", t.pid))
        .ok()
        .map(|d| d.count());
    let metrics = sh
        .endpoint(&t.url)
        .fetch()
        .and_then(|(_, body)| parse_exposition(&body))
        .map(|samples| gauges(&samples));
    AgentSample {
        at_secs: round(sh.secs(), 1),
        agent: t.index as u64,
        cgroups_made: sh.created.load(Ordering::Relaxed),
        rss_mib: rss.map(|b| round(b as f64 / 1048576.0, 2)),
        fds: fds.map(|n| n as u64),
        metrics: metrics.into(),
    }
}

/// Every cgroup with a CPU series: host cgroups by path, pod cgroups as
/// `pod_uid/container`, sorted.
fn counted_cgroups(s: &[Sample]) -> Vec<String> {
    let mut out: Vec<String> = s
        .iter()
        .filter_map(|x| match x.name.as_str() {
            "podmeter_cgroup_cpu_usage_seconds_total" => x.label("cgroup").map(str::to_owned),
            "podmeter_container_cpu_usage_seconds_total" => Some(format!(
                "{}/{}",
                x.label("pod_uid").unwrap_or(""),
                x.label("container").unwrap_or("")
            )),
            _ => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The agent's own gauges and counters the soak follows.
fn gauges(s: &[Sample]) -> Gauges {
    let get = |name: &str, k: &str, v: &str| {
        s.iter()
            .find(|x| x.name == name && x.label(k) == Some(v))
            .map(|x| x.value)
    };
    Gauges {
        live: get("podmeter_tracked_cgroups", "state", "live"),
        departed: get("podmeter_tracked_cgroups", "state", "departed"),
        unresolved: get("podmeter_tracked_cgroups", "state", "unresolved"),
        map_cpu: get("podmeter_bpf_map_entries", "map", "cpu"),
        map_net: get("podmeter_bpf_map_entries", "map", "net"),
        mkdir: get("podmeter_cgroup_tree_updates_total", "source", "mkdir"),
        rmdir: get("podmeter_cgroup_tree_updates_total", "source", "rmdir"),
        scan: get("podmeter_cgroup_tree_updates_total", "source", "scan"),
        dropped_cpu: get("podmeter_bpf_map_dropped_updates_total", "map", "cpu"),
        dropped_net: get("podmeter_bpf_map_dropped_updates_total", "map", "net"),
        cgroups: Some(counted_cgroups(s)),
    }
}

/// Figures of one agent lifetime, from its samples.
fn summary(
    b: &Bench,
    life: &Life,
    index: usize,
    samples: &[AgentSample],
    ended_at: f64,
) -> LifeSummary {
    let index = index as u64;
    let mine: Vec<&AgentSample> = samples.iter().filter(|s| s.agent == index).collect();
    // The last answered sample (a hung agent answers none).
    let last = mine
        .iter()
        .rev()
        .find_map(|s| Some((s, s.metrics.measured()?)));
    let lived = ended_at - life.started_at;
    let warm = WARM_UP.as_secs_f64().min(lived / 3.0);
    let after: Vec<&&AgentSample> = mine
        .iter()
        .filter(|s| s.at_secs - life.started_at >= warm)
        .collect();
    // Medians of the first and the last minute after the warm-up, not two
    // single samples: the agent gives freed memory back every few hundred
    // retirements, so RSS is a sawtooth whose period is near the sampling's.
    let growth = |key: fn(&AgentSample) -> Option<f64>, digits: i32| {
        let v: Vec<(f64, f64)> = after
            .iter()
            .filter_map(|s| Some((s.at_secs, key(s)?)))
            .collect();
        let median_of = |keep: &dyn Fn(f64) -> bool| {
            let w: Vec<f64> = v
                .iter()
                .filter(|(t, _)| keep(*t))
                .map(|(_, x)| *x)
                .collect();
            (!w.is_empty()).then(|| percentile(&w, 50.0))
        };
        let first = v.first().and_then(|(t0, _)| median_of(&|t| t <= t0 + 60.0));
        let end = v.last().and_then(|(t1, _)| median_of(&|t| t >= t1 - 60.0));
        let all: Vec<f64> = mine.iter().filter_map(|s| key(s)).collect();
        Growth {
            after_warm_up: first.map(|x| round(x, digits)),
            end: end.map(|x| round(x, digits)),
            growth: first.zip(end).map(|(a, z)| round(z - a, digits)),
            max: all
                .iter()
                .copied()
                .reduce(f64::max)
                .map(|x| round(x, digits)),
        }
    };
    // Lost-event log lines (`lost=N`), at warn level.
    let log = fs::read_to_string(b.scratch.join(format!("podmeter-{}.log", life.tag)))
        .unwrap_or_default();
    let lost_lines: Vec<&str> = log.lines().filter(|l| l.contains("events lost")).collect();
    let lost: u64 = lost_lines
        .iter()
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("lost="))
                .and_then(|n| {
                    n.trim_matches(|c: char| !c.is_ascii_digit())
                        .parse::<u64>()
                        .ok()
                })
        })
        .sum();
    let warnings = log.lines().filter(|l| l.contains("WARN")).count();
    LifeSummary {
        tag: life.tag.to_owned(),
        started_at_secs: round(life.started_at, 1),
        ended_at_secs: round(ended_at, 1),
        warm_up_secs: round(warm, 0),
        rss_mib: growth(|s| s.rss_mib, 2),
        fds: growth(|s| s.fds.map(|n| n as f64), 0),
        last_metrics: last.map(|(_, m)| m.clone()),
        last_metrics_at_secs: last.map(|(s, _)| s.at_secs),
        cgroups_made_by_last_metrics: last.map(|(s, _)| s.cgroups_made),
        lost_event_log_lines: lost_lines.len() as u64,
        lost_events_logged: lost,
        warn_log_lines: warnings as u64,
    }
}

/// After the churn: when the agent came back to its pre-churn counts, and
/// where it ended.
fn settle(samples: &[AgentSample], baseline: &AgentSample, churn_end: f64) -> Settle {
    let none = Gauges::default();
    let base = baseline.metrics.measured().unwrap_or(&none);
    let le = |a: Option<f64>, b: Option<f64>| a.zip(b).is_some_and(|(a, b)| a <= b);
    let settled = samples.iter().filter(|s| s.at_secs >= churn_end).find(|s| {
        s.metrics.measured().is_some_and(|m| {
            m.departed == Some(0.0)
                    // A missing value is less than any number.
                    && m.unresolved <= base.unresolved
                    && le(m.live, base.live)
                    && le(m.map_cpu, base.map_cpu)
                    && le(m.map_net, base.map_net)
        })
    });
    // The last answered sample (a hung agent answers none).
    let last = samples
        .iter()
        .rev()
        .find_map(|s| Some((s, s.metrics.measured()?)));
    Settle {
        settled_after_churn_secs: settled.map(|s| round(s.at_secs - churn_end, 0)),
        end: last.map(|(_, m)| m.clone()),
        end_at_secs: last.map(|(s, _)| s.at_secs),
    }
}

/// The "Reliability (soak)" section. Figures print as their JSON text
/// (`30.0`, `null` where missing), as they always have.
fn markdown(r: &SoakResults) -> String {
    let j = |x: &dyn erased::Text| x.text();
    let s = &r.soak;
    let o = &r.options;
    let sc = &s.scrapes;
    let mut md = format!(
        "{HEADING}\n\n`cargo xtask soak --duration {}s`, {}, {} CPUs, kernel {}, run {}: \
         {} scrapers (each with a {} s timeout) while cgroups come and go at {}/s \
         (each lives {} s with a `pm-work` sending UDP on loopback); the agent \
         (`--grace-period {} s --refresh-interval {} s`) is SIGKILLed and restarted \
         halfway, and scraped for a grace period and a margin after the churn.\n\n",
        o.duration_secs,
        r.podmeter,
        r.cpus,
        r.kernel,
        r.started,
        o.scrapers,
        j(&o.scrape_timeout_secs),
        o.rate_per_sec,
        j(&o.cgroup_lifetime_secs),
        j(&o.grace_period_secs),
        j(&o.refresh_interval_secs),
    );
    if sc.errors > 0 {
        let first = sc
            .per_agent
            .iter()
            .filter_map(|a| a.first_error_at_secs)
            .map(|t| format!("{t:.0} s"))
            .collect::<Vec<_>>()
            .join(", ");
        md += &format!(
            "**Scrapes failed: {} errors ({} timeouts), first at {first} into the run \
             ({}).**\n\n",
            sc.errors,
            sc.timeouts,
            sc.error_kinds.first().map_or("", String::as_str)
        );
    }
    let row = |md: &mut String, k: &str, v: String| *md += &format!("| {k} | {v} |\n");
    md += "| figure | value |\n|---|---|\n";
    let c = &s.churn;
    row(
        &mut md,
        "cgroups made / removed",
        format!(
            "{} / {} ({} /s achieved, worst lag {} ms)",
            c.cgroups_created,
            c.cgroups_removed,
            j(&c.achieved_rate_per_sec),
            c.worst_lag_ms
        ),
    );
    row(
        &mut md,
        "scrapes: answered / errors (timeouts)",
        format!(
            "{} / {} ({}); {} cut by the SIGKILL",
            sc.ok, sc.errors, sc.timeouts, sc.cut_by_sigkill
        ),
    );
    row(
        &mut md,
        "scrape latency p50 / p99 / max",
        format!(
            "{} / {} / {} ms",
            j(&sc.p50_ms),
            j(&sc.p99_ms),
            j(&sc.max_ms)
        ),
    );
    let none = Gauges::default();
    for (i, l) in s.lives.iter().enumerate() {
        let name = if i == 0 {
            "agent before the SIGKILL"
        } else {
            "agent after the restart"
        };
        let pa = sc.per_agent.get(i);
        let made_before = if i == 0 { 0 } else { c.created_before_kill };
        row(
            &mut md,
            &format!("{name}: lifetime"),
            format!(
                "{} s to {} s; {} scrapes, {} errors (last answer at {} s)",
                j(&l.started_at_secs),
                j(&l.ended_at_secs),
                j(&pa.map(|p| p.scrapes)),
                j(&pa.map(|p| p.errors)),
                j(&pa.and_then(|p| p.last_ok_at_secs))
            ),
        );
        row(
            &mut md,
            &format!(
                "{name}: RSS, median of the first minute after {} s warm-up → of the last minute (max)",
                j(&l.warm_up_secs)
            ),
            format!(
                "{} → {} MiB, growth {} MiB (max {})",
                j(&l.rss_mib.after_warm_up),
                j(&l.rss_mib.end),
                j(&l.rss_mib.growth),
                j(&l.rss_mib.max)
            ),
        );
        row(
            &mut md,
            &format!(
                "{name}: open descriptors, first minute after warm-up → last minute, medians (max)"
            ),
            format!(
                "{} → {}, growth {} (max {})",
                j(&l.fds.after_warm_up),
                j(&l.fds.end),
                j(&l.fds.growth),
                j(&l.fds.max)
            ),
        );
        let m = l.last_metrics.as_ref().unwrap_or(&none);
        row(
            &mut md,
            &format!(
                "{name}: mkdir / rmdir / scan updates at its last answer \
                 (soak cgroups made in its life by then); lost-event log lines (events)"
            ),
            format!(
                "{} / {} / {} at {} s ({}); {} ({})",
                j(&m.mkdir),
                j(&m.rmdir),
                j(&m.scan),
                j(&l.last_metrics_at_secs),
                l.cgroups_made_by_last_metrics
                    .map_or("?".into(), |n| n.saturating_sub(made_before).to_string()),
                l.lost_event_log_lines,
                l.lost_events_logged
            ),
        );
        row(
            &mut md,
            &format!("{name}: map updates dropped (cpu / net)"),
            format!("{} / {}", j(&m.dropped_cpu), j(&m.dropped_net)),
        );
    }
    let k = s.sigkill.as_ref();
    row(
        &mut md,
        "podmeter programs left after the SIGKILL",
        format!(
            "{} of {} (gone after {} s); restart took {} s",
            k.map_or(0, |k| k.programs_left.len()),
            j(&k.map(|k| k.programs)),
            j(&k.and_then(|k| k.programs_gone_after_secs)),
            j(&k.map(|k| k.restart_secs))
        ),
    );
    let b = s.baseline.measured().unwrap_or(&none);
    let e = s.settle.end.as_ref().unwrap_or(&none);
    row(
        &mut md,
        "tracked cgroups live / departed / unresolved: before churn → last answer",
        format!(
            "{} / {} / {} → {} / {} / {} (at {} s)",
            j(&b.live),
            j(&b.departed),
            j(&b.unresolved),
            j(&e.live),
            j(&e.departed),
            j(&e.unresolved),
            j(&s.settle.end_at_secs)
        ),
    );
    if let (Some(before), Some(after)) = (&b.cgroups, &e.cgroups) {
        let gone: Vec<&String> = before.iter().filter(|c| !after.contains(c)).collect();
        let new: Vec<&String> = after.iter().filter(|c| !before.contains(c)).collect();
        row(
            &mut md,
            "cgroups with CPU series: before churn → last answer",
            format!(
                "{} → {}; new: {}; gone: {}",
                before.len(),
                after.len(),
                list(&new),
                list(&gone)
            ),
        );
    }
    row(
        &mut md,
        "kernel map entries cpu / net: before churn → last answer",
        format!(
            "{} / {} → {} / {}",
            j(&b.map_cpu),
            j(&b.map_net),
            j(&e.map_cpu),
            j(&e.map_net)
        ),
    );
    row(
        &mut md,
        "back to the baseline after the churn",
        match s.settle.settled_after_churn_secs {
            Some(t) => format!("after {t:.0} s"),
            None => "no (see the end values; other cgroups on the host count too)".into(),
        },
    );
    let t = &s.end.sigterm;
    row(
        &mut md,
        "final SIGTERM",
        format!(
            "{} after {} s; programs left {}",
            if t.exited_within_10s {
                "exited"
            } else {
                "**did not exit** (SIGKILLed)"
            },
            j(&t.secs),
            t.programs_left.len()
        ),
    );
    md
}

/// Figures as their JSON text, whatever their type.
mod erased {
    pub trait Text {
        fn text(&self) -> String;
    }

    impl<T: serde::Serialize> Text for T {
        fn text(&self) -> String {
            super::json_text(self)
        }
    }
}

/// `a`, `b` in backticks, or `none`.
fn list(items: &[&String]) -> String {
    if items.is_empty() {
        return "none".into();
    }
    items
        .iter()
        .map(|c| format!("`{c}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Outcome;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3m"), Ok(Duration::from_secs(180)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3 weeks").is_err());
    }

    /// The latest soak (schema 1) and its section as the untyped code
    /// printed it.
    const SOAK: &str = include_str!("../testdata/2026-12-04T152829Z-soak.json");
    const SOAK_MD: &str = include_str!("../testdata/2026-12-04T152829Z-soak.md");

    #[test]
    fn renders_the_stored_soak_as_before() {
        let r: SoakResults = serde_json::from_str(SOAK).unwrap();
        assert_eq!(r.schema_version, 1);
        let md = markdown(&r);
        for row in [
            "| cgroups made / removed | 29997 / 29997 (50.0 /s achieved, worst lag 26 ms) |",
            "| scrapes: answered / errors (timeouts) | 44177 / 0 (0); 1 cut by the SIGKILL |",
            "| back to the baseline after the churn | no (see the end values; other cgroups on the host count too) |",
        ] {
            assert!(md.lines().any(|l| l == row), "no row {row:?} in\n{md}");
        }
        // println! added the last newline.
        assert_eq!(format!("{md}\n"), SOAK_MD);
    }

    #[test]
    fn soak_round_trips_and_reports_failures() {
        let mut r: SoakResults = serde_json::from_str(SOAK).unwrap();
        r.schema_version = SCHEMA_VERSION;
        r.soak.samples[3].metrics = Outcome::Failed("timed out".into());
        r.soak.sigkill = None;
        r.soak.end.error = Some("the churn stopped".into());
        r.soak.end.sigterm.exited_within_10s = false;
        r.soak.scrapes.errors = 2;
        r.soak.scrapes.timeouts = 1;
        r.soak.scrapes.per_agent[1].first_error_at_secs = Some(412.3);
        r.soak.scrapes.error_kinds = vec!["scraping: timed out".into()];
        let text = serde_json::to_string_pretty(&r).unwrap();
        let back: SoakResults = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        assert!(text.contains("\"error\": \"timed out\""), "{text}");
        let md = markdown(&back);
        assert!(
            md.contains(
                "**Scrapes failed: 2 errors (1 timeouts), first at 412 s into the run \
                 (scraping: timed out).**"
            ),
            "{md}"
        );
        assert!(md.contains("| podmeter programs left after the SIGKILL | 0 of null (gone after null s); restart took null s |"), "{md}");
        assert!(
            md.contains(
                "| final SIGTERM | **did not exit** (SIGKILLed) after 0.02 s; programs left 0 |"
            ),
            "{md}"
        );
    }

    #[test]
    fn settled_when_back_to_the_baseline() {
        let gauges = |live: f64, departed: f64| Gauges {
            live: Some(live),
            departed: Some(departed),
            unresolved: Some(0.0),
            map_cpu: Some(live),
            map_net: Some(live),
            ..Gauges::default()
        };
        let at = |t: f64, g: Gauges| AgentSample {
            at_secs: t,
            agent: 1,
            cgroups_made: 0,
            rss_mib: None,
            fds: None,
            metrics: Outcome::Measured(g),
        };
        let base = at(0.0, gauges(2.0, 0.0));
        let samples = [
            at(100.0, gauges(40.0, 3.0)),
            at(110.0, gauges(3.0, 1.0)),
            at(120.0, gauges(2.0, 0.0)),
            AgentSample {
                metrics: Outcome::Failed("down".into()),
                ..at(125.0, Gauges::default())
            },
        ];
        let s = settle(&samples, &base, 100.0);
        assert_eq!(s.settled_after_churn_secs, Some(20.0));
        assert_eq!(s.end_at_secs, Some(120.0));
        assert_eq!(s.end, Some(gauges(2.0, 0.0)));
        assert_eq!(
            settle(&samples[..2], &base, 100.0).settled_after_churn_secs,
            None
        );
    }

    #[test]
    fn section_replaced_or_appended() {
        let md = "# Results\n\ntable\n";
        let one = replace_section(md, &format!("{HEADING}\n\nfirst\n"));
        assert_eq!(one, format!("# Results\n\ntable\n\n{HEADING}\n\nfirst\n"));
        let two = replace_section(
            &format!("{one}\n## Later\n\nx\n"),
            &format!("{HEADING}\n\nsecond"),
        );
        assert_eq!(
            two,
            format!("# Results\n\ntable\n\n{HEADING}\n\nsecond\n\n## Later\n\nx\n")
        );
        assert_eq!(section_of(&two), Some(&*format!("{HEADING}\n\nsecond")));
    }
}
