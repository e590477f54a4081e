//! The agent under test: a podmeter process on a free loopback port, and
//! what it leaves loaded in the kernel.

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::scrape::{Scrape, poll_scrape};

/// The agent under test.
pub fn podmeter_bin() -> PathBuf {
    let p = std::env::var_os("PODMETER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/podmeter")
        });
    assert!(
        p.exists(),
        "{} missing: run the tests with `cargo xtask test`",
        p.display()
    );
    p
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How to start an agent: the tests use [`Agent::start`], the benchmark
/// and soak set more (their own cgroup, log file, binary, quieter logs).
pub struct Launch {
    /// The podmeter binary (default: [`podmeter_bin`]).
    pub bin: Option<PathBuf>,
    /// A command that executes podmeter in the same process (e.g.
    /// `setpriv` with fewer capabilities).
    pub wrapper: Vec<String>,
    /// podmeter's arguments beyond `--listen` and `--log-level`.
    pub args: Vec<String>,
    /// A cgroup2 directory the agent runs in (to measure its CPU there).
    pub cgroup: Option<PathBuf>,
    /// Where its stderr goes (default: a file in the temp dir, removed on
    /// drop).
    pub log: Option<PathBuf>,
    pub log_level: &'static str,
    /// How long `/readyz` may take to answer 200.
    pub ready_within: Duration,
}

impl Launch {
    pub fn new(args: &[&str]) -> Self {
        Self {
            bin: None,
            wrapper: Vec::new(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            cgroup: None,
            log: None,
            log_level: "debug",
            ready_within: Duration::from_secs(30),
        }
    }

    /// Starts podmeter on a free loopback port and waits until `/readyz`
    /// says ready; an error (with the end of its log) if it exits or is not
    /// ready in time.
    pub fn start(self) -> Result<Agent, String> {
        let port = free_port();
        let (log, keep_log) = match self.log {
            Some(l) => (l, true),
            None => (
                std::env::temp_dir()
                    .join(format!("podmeter-test-{}-{port}.log", std::process::id())),
                false,
            ),
        };
        let bin = self.bin.unwrap_or_else(podmeter_bin);
        let mut program: Vec<std::ffi::OsString> = self.wrapper.iter().map(Into::into).collect();
        program.push(bin.into());
        let mut cmd = match &self.cgroup {
            // The shell joins the cgroup, then becomes the program.
            Some(dir) => {
                let mut c = crate::cgroups::command_in(dir, &program[0]);
                c.args(&program[1..]);
                c
            }
            None => {
                let mut c = Command::new(&program[0]);
                c.args(&program[1..]);
                c
            }
        };
        // Agents of parallel tests must not adopt each other's pins: only a
        // test that names a pin path pins.
        // With a web config the agent may speak HTTPS only.
        let tls = self.args.iter().any(|a| a.starts_with("--web-config-file"));
        let pin = self
            .args
            .iter()
            .any(|a| a == "--no-pin" || a.starts_with("--pin-path"));
        if self.args.iter().any(|a| a == "--no-kubernetes") {
            // A KUBECONFIG from the caller would conflict with it.
            cmd.env_remove("KUBECONFIG");
        }
        let stderr = fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = cmd
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--log-level", self.log_level])
            .args(&self.args)
            .args((!pin).then_some("--no-pin"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting podmeter: {e}"))?;
        let mut agent = Agent {
            child: Some(child),
            port,
            log,
            keep_log,
        };
        let deadline = Instant::now() + self.ready_within;
        loop {
            let exited = agent.child.as_mut().expect("started").try_wait();
            if let Ok(Some(st)) = exited {
                return Err(format!(
                    "podmeter exited ({st}) during start:\n{}",
                    agent.log_tail(40)
                ));
            }
            let ready = if tls {
                curl(&agent.url("https", "/readyz"), &[]).is_ok_and(|(code, _)| code == 200)
            } else {
                agent.get("/readyz").is_ok_and(|(code, _)| code == 200)
            };
            if ready {
                return Ok(agent);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "podmeter not ready in {:?}:\n{}",
                    self.ready_within,
                    agent.log_tail(40)
                ));
            }
            sleep(Duration::from_millis(100));
        }
    }
}

/// A running podmeter on a free loopback port; SIGTERM, then SIGKILL, on drop.
pub struct Agent {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    log: PathBuf,
    keep_log: bool,
}

impl Agent {
    /// Starts podmeter with `args` and waits until `/readyz` says ready.
    pub fn start(args: &[&str]) -> Self {
        Launch::new(args).start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Agent::start`], through a `wrapper` command that executes
    /// podmeter in the same process (e.g. `setpriv` with fewer capabilities).
    pub fn start_under(wrapper: &[&str], args: &[&str]) -> Self {
        Launch {
            wrapper: wrapper.iter().map(|a| (*a).to_owned()).collect(),
            ..Launch::new(args)
        }
        .start()
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `scheme://127.0.0.1:<port><path>`.
    pub fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines it logged.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// GET a path: status and body.
    pub fn get(&self, path: &str) -> Result<(u16, String), ureq::Error> {
        let resp = ureq::get(&format!("http://127.0.0.1:{}{path}", self.port))
            .config()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .call()?;
        let code = resp.status().as_u16();
        Ok((code, resp.into_body().read_to_string()?))
    }

    /// One parsed scrape of `/metrics`.
    pub fn scrape(&self) -> Scrape {
        let (code, body) = self.get("/metrics").expect("scrape");
        assert_eq!(code, 200, "{body}");
        Scrape::parse(&body)
    }

    /// Scrapes until `ok` holds, or panics after `timeout`.
    pub fn scrape_until(
        &self,
        timeout: Duration,
        what: &str,
        ok: impl Fn(&Scrape) -> bool,
    ) -> Scrape {
        poll_scrape(timeout, what, || self.scrape(), ok)
    }

    /// SIGKILL, as the OOM killer sends it: nothing of the agent's own
    /// shutdown runs.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().unwrap();
            }
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        if std::thread::panicking() {
            eprintln!("--- podmeter log ---\n{}", self.log());
        }
        if !self.keep_log {
            let _ = fs::remove_file(&self.log);
        }
    }
}

/// GET `url` with curl and `args` (e.g. `--cacert`, `-u`; `-k` unless a
/// CA is given): status and body, or curl's own error (a refused
/// handshake, a timeout).
pub fn curl(url: &str, args: &[&str]) -> Result<(u16, String), String> {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"]);
    if !args.contains(&"--cacert") {
        c.arg("-k");
    }
    let out = c
        .args(args)
        .arg(url)
        .output()
        .map_err(|e| format!("curl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code
        .trim()
        .parse()
        .map_err(|_| format!("curl {url}: no status in {text:?}"))?;
    Ok((code, body.to_owned()))
}

/// Program ids of podmeter's BPF programs currently loaded (`bpftool`).
pub fn podmeter_prog_ids() -> Vec<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool");
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("pm_")))
        .filter_map(|p| p["id"].as_u64())
        .collect()
}
