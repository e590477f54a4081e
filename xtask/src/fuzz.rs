//! `cargo xtask fuzz`: runs the fuzz targets of `fuzz/` (every parser of
//! outside input: mountinfo, cgroup paths, cgroupfs files, kernel BTF,
//! command-line values; and the scrape's deflate encoder) with cargo-fuzz
//! and the pinned nightly, each for a bounded time. A crash fails the
//! command, naming the target and the input libFuzzer saved.
//!
//! The committed seeds in `fuzz/corpus/<target>/` are only read: what the
//! fuzzer learns goes to `fuzz/target/corpus/<target>/` (kept between runs,
//! out of git), crashes to `fuzz/artifacts/<target>/`.

use std::{
    collections::VecDeque,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{root, setup, sh};

/// cargo-fuzz release, cached under the setup cache by version.
const CARGO_FUZZ: &str = "0.13.1";

/// `cargo xtask fuzz`'s options.
#[derive(clap::Args)]
pub struct Options {
    /// How long to fuzz each target, in seconds.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Targets to run (`cargo xtask fuzz --list` names them); all by default.
    pub targets: Vec<String>,
    /// List the targets and exit.
    #[arg(long)]
    pub list: bool,
}

/// Builds every target once, then runs the chosen ones for `seconds` each.
pub fn run(opts: &Options) -> Result<()> {
    let fuzz = Fuzz::new()?;
    let all = fuzz.list()?;
    if opts.list {
        println!("{}", all.join("\n"));
        return Ok(());
    }
    let targets = if opts.targets.is_empty() {
        all.clone()
    } else {
        opts.targets.clone()
    };
    if let Some(t) = targets.iter().find(|t| !all.contains(t)) {
        bail!("no fuzz target {t:?}; there are: {}", all.join(", "));
    }
    let started = Instant::now();
    sh(fuzz
        .command()
        .args(["build", "--fuzz-dir", "fuzz", "-s", "none"]))
    .context("building the fuzz targets")?;
    eprintln!(
        "fuzz: targets built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let mut summary = Vec::new();
    for t in &targets {
        summary.push(fuzz.run(t, opts.seconds)?);
    }
    for line in &summary {
        eprintln!("fuzz: {line}");
    }
    eprintln!(
        "fuzz: {} targets, no crash, {:.0} s in all",
        targets.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

struct Fuzz {
    bin: PathBuf,
    toolchain: String,
}

impl Fuzz {
    /// Installs the nightly and cargo-fuzz if missing.
    fn new() -> Result<Self> {
        setup::nightly()?;
        let dir = setup::cache_dir().join(format!("cargo-fuzz-{CARGO_FUZZ}"));
        let bin = dir.join("bin/cargo-fuzz");
        let works = Command::new(&bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !works {
            eprintln!(
                "fuzz: installing cargo-fuzz {CARGO_FUZZ} into {} (a minute or two, once)",
                dir.display()
            );
            sh(crate::cargo()
                .args(["install", "--locked", "--force"])
                .arg(format!("cargo-fuzz@{CARGO_FUZZ}"))
                .arg("--root")
                .arg(&dir))?;
        }
        Ok(Self {
            bin,
            toolchain: setup::ebpf_toolchain()?,
        })
    }

    /// `cargo fuzz` with the pinned nightly, in the workspace root. The
    /// build goes to the setup cache, not the clone: a fresh clone (CI)
    /// then rebuilds only podmeter's own crate.
    fn command(&self) -> Command {
        let mut c = Command::new("rustup");
        c.args(["run", &self.toolchain])
            .arg(&self.bin)
            .arg("fuzz")
            .current_dir(root())
            .env("PATH", setup::path_with_tools())
            .env("CARGO_TARGET_DIR", setup::cache_dir().join("fuzz-target"))
            .env_remove("CARGO")
            .env_remove("RUSTC");
        c
    }

    fn list(&self) -> Result<Vec<String>> {
        let out = self
            .command()
            .args(["list", "--fuzz-dir", "fuzz"])
            .output()
            .context("running cargo fuzz list")?;
        if !out.status.success() {
            bail!(
                "cargo fuzz list failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// Fuzzes `target` for `seconds`; returns a line of figures, or an error
    /// naming the crashing input.
    fn run(&self, target: &str, seconds: u64) -> Result<String> {
        let fuzz = root().join("fuzz");
        let work = fuzz.join("target/corpus").join(target);
        let seeds = fuzz.join("corpus").join(target);
        let artifacts = fuzz.join("artifacts").join(target);
        for dir in [&work, &artifacts] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        eprintln!("fuzz: {target} for {seconds} s");
        let mut child = self
            .command()
            .args(["run", "--fuzz-dir", "fuzz", "-s", "none", target])
            .arg(&work)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // A single input taking this long is a hang: fail on it too.
            .arg("-timeout=10")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1")
            .stderr(Stdio::piped())
            .spawn()
            .context("starting cargo fuzz run")?;
        // libFuzzer reports on stderr, thousands of lines a run: keep the
        // end, and show it only when the target fails.
        let mut tail = VecDeque::new();
        for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
            let line = line.context("reading cargo fuzz's output")?;
            if tail.len() == 400 {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        let status = child.wait()?;
        let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
        if !status.success() {
            for line in &lines {
                eprintln!("{line}");
            }
            let artifact = lines
                .iter()
                .find_map(|l| l.split("Test unit written to ").nth(1))
                .map_or_else(
                    || format!("none saved (look in {})", artifacts.display()),
                    |p| p.trim().to_owned(),
                );
            bail!(
                "fuzz target {target} failed ({status}); input: {artifact}; \
                 reproduce with `cargo xtask fuzz` or `cargo +{tc} fuzz run {target} {artifact}` in fuzz/'s parent",
                tc = self.toolchain
            );
        }
        Ok(summary(target, &lines, &work, &seeds))
    }
}

/// `target: N runs (M/s), corpus C units (S seeds)` from libFuzzer's final
/// statistics.
fn summary(target: &str, lines: &[&str], work: &Path, seeds: &Path) -> String {
    let stat = |name: &str| {
        lines
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .map_or("?", str::trim)
    };
    let files = |dir: &Path| std::fs::read_dir(dir).map_or(0, |d| d.count());
    // The last status line: `#1234 DONE cov: 56 ft: 78 corp: 9/1Kb ...`.
    let cov = lines
        .iter()
        .rev()
        .find(|l| l.contains(" cov: "))
        .and_then(|l| l.split(" cov: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("?");
    format!(
        "{target}: {} runs ({}/s), coverage {cov}, corpus {} learned + {} seeds",
        stat("number_of_executed_units"),
        stat("average_exec_per_sec"),
        files(work),
        files(seeds),
    )
}
