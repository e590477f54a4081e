//! A real Prometheus (Debian's) scrapes podmeter: the exposition passes
//! `promtool check metrics`, and a PromQL `rate()` over a test cgroup's CPU
//! agrees with the kernel's own accounting.

use std::{
    fs,
    io::Write as _,
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use podmeter_test_support::{Agent, TestTree, free_port};

#[test]
fn promtool_accepts_the_exposition() {
    let tree = TestTree::new("promtool");
    let cg = tree
        .cgroup("kubepods/burstable/pod0a000000-0000-4000-8000-0000000000aa/0123456789abcdef0123");
    let agent = Agent::start(&[]);
    let _w = cg.spawn(None, &["burn"]);
    let s = agent.scrape_until(Duration::from_secs(15), "the pod series", |s| {
        !s.find("podmeter_container_cpu_usage_seconds_total", &[])
            .is_empty()
    });
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(s.text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Prometheus {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(target_port: u16) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("podmeter-test-prom-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: podmeter\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )
        .unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("log")).unwrap())
            .spawn()
            .expect("prometheus (Debian package)");
        let p = Self { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.get("/-/ready").is_none_or(|(c, _)| c != 200) {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                fs::read_to_string(p.dir.join("log")).unwrap_or_default()
            );
            sleep(Duration::from_millis(200));
        }
        p
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        let resp = ureq::get(&format!("http://127.0.0.1:{}{path}", self.port))
            .config()
            .http_status_as_error(false)
            .build()
            .call()
            .ok()?;
        let code = resp.status().as_u16();
        Some((code, resp.into_body().read_to_string().ok()?))
    }

    /// Instant query at `time` (unix seconds); the single result's value.
    fn query(&self, promql: &str, time: f64) -> Option<f64> {
        let q: String = promql
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let (_, body) = self.get(&format!("/api/v1/query?query={q}&time={time:.3}"))?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = v["data"]["result"].as_array()?;
        assert!(result.len() <= 1, "{promql}: {body}");
        result.first()?["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn prometheus_rate_of_cpu_matches_the_kernel() {
    let tree = TestTree::new("prom");
    let cg = tree.cgroup("burn");
    let agent = Agent::start(&[]);
    let prom = Prometheus::start(agent.port);
    let _burner = cg.spawn(None, &["burn"]);

    // Record the kernel's counter with wall-clock times while Prometheus scrapes.
    let mut kernel = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(16) {
        kernel.push((unix_now(), cg.cpu_stat_seconds()));
        sleep(Duration::from_millis(250));
    }
    // Evaluate over a window that ends a scrape interval in the past, so it
    // is fully scraped, and compare with cpu.stat over the same window.
    let (t_end, _) = kernel[kernel.len() - 8];
    let window = 8.0;
    let at = |t: f64| {
        kernel
            .iter()
            .min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs()))
            .unwrap()
            .1
    };
    let expected = (at(t_end) - at(t_end - window)) / window;
    let promql = format!(
        "rate(podmeter_cgroup_cpu_usage_seconds_total{{cgroup=\"{}\"}}[8s])",
        cg.path
    );
    let got = prom
        .query(&promql, t_end)
        .unwrap_or_else(|| panic!("no result for {promql}"));
    eprintln!("rate(): Prometheus {got:.4} CPU/s, cpu.stat {expected:.4} CPU/s");
    assert!(expected > 0.3, "the burner barely ran ({expected} CPU/s)");
    assert!(
        (got - expected).abs() / expected < 0.05,
        "Prometheus rate {got} vs cpu.stat {expected}"
    );
    // The target is up and scraped through the real scrape loop.
    assert_eq!(prom.query("up{job=\"podmeter\"}", unix_now()), Some(1.0));
}
