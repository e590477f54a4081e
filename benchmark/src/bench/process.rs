//! Child processes the benchmark starts, and the agent under test.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use podmeter_test_support::agent::Launch;

use super::{Bench, Cg, Endpoint, Fetch, Sample, parse_exposition, proc_status_bytes};

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
/// listening on a free loopback port: the tests' runner, with the
/// benchmark's binary, cgroup and log file.
pub struct Agent {
    agent: podmeter_test_support::Agent,
    pub endpoint: Endpoint,
    pub cg: Cg,
}

impl Agent {
    /// Starts podmeter and waits until `/readyz` answers 200.
    pub fn start(b: &Bench, tag: &str) -> Result<Self> {
        Self::start_with(b, tag, &[])
    }

    /// [`Agent::start`] with `extra` flags for podmeter.
    pub fn start_with(b: &Bench, tag: &str, extra: &[&str]) -> Result<Self> {
        let cg = b.tree.own(&format!("agent-{tag}"))?;
        let mut args = vec!["--no-kubernetes"];
        args.extend_from_slice(extra);
        let agent = Launch {
            bin: Some(b.podmeter.clone()),
            cgroup: Some(cg.dir().to_owned()),
            log: Some(b.scratch.join(format!("podmeter-{tag}.log"))),
            log_level: "warn",
            ready_within: Duration::from_secs(60),
            ..Launch::new(&args)
        }
        .start()
        .map_err(anyhow::Error::msg)?;
        Ok(Self {
            endpoint: Endpoint::plain(format!("http://127.0.0.1:{}/metrics", agent.port)),
            agent,
            cg,
        })
    }

    pub fn pid(&self) -> u32 {
        self.agent.pid() as u32
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
        Ok((f, parse_exposition(&body)?))
    }

    /// Stops the agent (SIGTERM: it detaches its programs).
    pub fn stop(mut self) -> Result<()> {
        let st = self.agent.stop();
        anyhow::ensure!(st.success(), "podmeter exited with {st} on SIGTERM");
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
