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

/// Pods in [`prometheus_reads_a_large_gzipped_exposition`]: enough for
/// an exposition (over 512 KiB, twice what podmeter compresses on several
/// threads) in pieces.
const MANY: usize = 600;

/// The uid of that test's pod `i`.
fn uid(i: usize) -> String {
    format!("0b000000-0000-4000-8000-{i:012x}")
}

#[test]
fn prometheus_reads_a_large_gzipped_exposition() {
    let tree = TestTree::new("gzip");
    let cgs: Vec<_> = (0..MANY)
        .map(|i| tree.cgroup(&format!("kubepods/burstable/pod{}/{:064x}", uid(i), i + 1)))
        .collect();
    let agent = Agent::start(&[]);
    // A short task in each, so that each has counters and series.
    for cg in &cgs {
        cg.spawn(None, &["alloc", "1"]).wait();
    }
    let _burner = cgs[0].spawn(None, &["burn"]);
    let ours = |s: &podmeter_test_support::Scrape| {
        s.find("podmeter_container_cpu_usage_seconds_total", &[])
            .iter()
            .filter(|(l, _)| l["pod_uid"].starts_with("0b000000-"))
            .count()
    };
    let plain = agent.scrape_until(Duration::from_secs(30), "every test pod", |s| {
        ours(s) == MANY
    });
    assert!(
        plain.text.len() > 512 * 1024,
        "{} bytes: too small to be compressed in pieces",
        plain.text.len()
    );

    // Twice with gzip, decoded by curl (zlib): the second scrape reuses the
    // pieces of families that did not change.
    for _ in 0..2 {
        let (code, body) =
            podmeter_test_support::curl(&agent.url("http", "/metrics"), &["--compressed"])
                .expect("a gzipped scrape curl can read");
        assert_eq!(code, 200);
        let s = podmeter_test_support::Scrape::parse(&body);
        assert_eq!(ours(&s), MANY);
        // Series only come (a new cgroup's memory, read at the next
        // refresh): nothing here goes.
        assert!(s.samples.len() >= plain.samples.len());
    }

    // Prometheus (Go's gzip reader) scrapes every second.
    let prom = Prometheus::start(agent.port);
    let count = "count(podmeter_container_cpu_usage_seconds_total{pod_uid=~\"0b000000-.*\"})";
    let deadline = Instant::now() + Duration::from_secs(30);
    while prom.query(count, unix_now()) != Some(MANY as f64) {
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw {MANY} pods"
        );
        sleep(Duration::from_millis(500));
    }
    // The burner's families change at every scrape, and its value with them.
    sleep(Duration::from_secs(5));
    let rate = format!(
        "rate(podmeter_container_cpu_usage_seconds_total{{pod_uid=\"{}\"}}[4s])",
        uid(0)
    );
    let burning = prom
        .query(&rate, unix_now())
        .expect("a rate for the burner");
    assert!(burning > 0.3, "the burner's rate: {burning} CPU/s");
    // Every scrape was read: none failed, none short.
    assert_eq!(
        prom.query("min_over_time(up{job=\"podmeter\"}[10s])", unix_now()),
        Some(1.0)
    );
    let samples = prom
        .query("scrape_samples_scraped{job=\"podmeter\"}", unix_now())
        .expect("scrape_samples_scraped");
    assert!(
        samples >= plain.samples.len() as f64,
        "{samples} samples in a scrape, {} in the plain one",
        plain.samples.len()
    );
}
