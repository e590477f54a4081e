//! Child processes the benchmark starts, and the agent under test.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{Bench, Cg, Endpoint, Fetch, Sample, free_port, parse_exposition, proc_status_bytes};

/// A child process, stopped (SIGTERM, then SIGKILL after 10 s) on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    stdout: Option<BufReader<ChildStdout>>,
    stdin: Option<ChildStdin>,
}

impl Proc {
    /// Spawns `cmd` with piped stdin and stdout (stderr inherited unless
    /// the caller redirected it).
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            stdout: child.stdout.take().map(BufReader::new),
            stdin: child.stdin.take(),
            child,
        })
    }

    /// Spawns `cmd` with stdin and stdout on /dev/null.
    pub fn quiet(name: &str, cmd: &mut Command) -> Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            stdout: None,
            stdin: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line, split on whitespace; fails at EOF.
    pub fn line(&mut self) -> Result<Vec<String>> {
        let mut s = String::new();
        self.stdout
            .as_mut()
            .context("stdout not piped")?
            .read_line(&mut s)?;
        if s.is_empty() {
            bail!("{} exited without reporting", self.name);
        }
        Ok(s.split_whitespace().map(str::to_owned).collect())
    }

    /// Waits for exit; fails on a non-zero status.
    pub fn wait(&mut self) -> Result<()> {
        drop(self.stdin.take());
        let st = self.child.wait()?;
        if !st.success() {
            bail!("{} failed: {st}", self.name);
        }
        Ok(())
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL.
    pub fn stop(&mut self) {
        drop(self.stdin.take());
        if !self.running() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .output();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !self.running() {
                return;
            }
            sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Many workers, SIGKILLed together on drop.
#[derive(Default)]
pub struct Workers(pub Vec<Proc>);

impl Drop for Workers {
    fn drop(&mut self) {
        for p in &mut self.0 {
            let _ = p.child.kill();
        }
        for p in &mut self.0 {
            let _ = p.child.wait();
        }
    }
}

/// A podmeter process (the release build, host mode) in its own cgroup,
/// listening on a free loopback port.
pub struct Agent {
    proc: Proc,
    pub endpoint: Endpoint,
    pub cg: Cg,
    log: PathBuf,
}

impl Agent {
    /// Starts podmeter and waits until `/readyz` answers 200.
    pub fn start(b: &Bench, tag: &str) -> Result<Self> {
        Self::start_with(b, tag, &[])
    }

    /// [`Agent::start`] with `extra` flags for podmeter.
    pub fn start_with(b: &Bench, tag: &str, extra: &[&str]) -> Result<Self> {
        let port = free_port()?;
        let cg = b.tree.own(&format!("agent-{tag}"))?;
        let log = b.scratch.join(format!("podmeter-{tag}.log"));
        let args: Vec<String> = [
            "--no-kubernetes",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log-level",
            "warn",
        ]
        .iter()
        .chain(extra)
        .map(|s| (*s).to_owned())
        .collect();
        let stderr = fs::File::create(&log)?;
        let proc = cg.spawn_with("podmeter", &b.podmeter, &args, |c| {
            // --no-kubernetes conflicts with a KUBECONFIG from the caller.
            c.env_remove("KUBECONFIG").stderr(stderr);
        })?;
        let mut agent = Self {
            proc,
            endpoint: Endpoint::plain(format!("http://127.0.0.1:{port}/metrics")),
            cg,
            log,
        };
        let ready = format!("http://127.0.0.1:{port}/readyz");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if !agent.proc.running() {
                bail!("podmeter exited during start:\n{}", agent.log_tail());
            }
            let ok = Command::new("curl")
                .args(["-sf", "-o", "/dev/null", &ready])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(agent);
            }
            if Instant::now() > deadline {
                bail!("podmeter not ready in 60 s:\n{}", agent.log_tail());
            }
            sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// CPU seconds of the agent (its cgroup's `cpu.stat`, µs resolution,
    /// exited threads included).
    pub fn cpu_secs(&self) -> Result<f64> {
        self.cg.cpu_secs()
    }

    /// Peak RSS so far.
    pub fn hwm_bytes(&self) -> Result<u64> {
        proc_status_bytes(self.pid(), "VmHWM")
    }

    /// One parsed scrape.
    pub fn scrape(&self) -> Result<(Fetch, Vec<Sample>)> {
        let (f, body) = self.endpoint.fetch()?;
        Ok((f, parse_exposition(&body)))
    }

    /// Stops the agent (SIGTERM: it detaches its programs).
    pub fn stop(mut self) -> Result<()> {
        self.proc.stop();
        Ok(())
    }
}

/// Scrapes `agent` until `ok` holds for a scrape, for up to `timeout`.
pub fn scrape_until(
    agent: &Agent,
    timeout: Duration,
    what: &str,
    ok: impl Fn(&[Sample]) -> bool,
) -> Result<Vec<Sample>> {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, s) = agent.scrape()?;
        if ok(&s) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("podmeter did not show {what} within {timeout:?}");
        }
        sleep(Duration::from_millis(500));
    }
}
