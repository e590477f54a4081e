//! A throwaway OCI registry on this host, for `cargo xtask release
//! --local-registry`: the CNCF distribution registry (built from its Go
//! module, see `tools.rs`) on a free loopback port, over plain HTTP,
//! requiring a password (htpasswd, bcrypt) that is made up per run. The
//! release pushes to it exactly as to a real one (logging in, copying the
//! image, pushing the chart) and then reads both back; nothing leaves the
//! machine. Dropping it stops the registry and removes its storage.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use crate::{
    cmd::{dies_with_xtask, output, target_dir},
    image,
    release::Target,
    tools,
};

/// The registry's user; its password is random per run.
const USER: &str = "podmeter";

pub struct LocalRegistry {
    child: Child,
    dir: PathBuf,
    port: u16,
    password: String,
}

impl LocalRegistry {
    /// Starts it and waits until it answers (refusing anonymous requests).
    pub fn start() -> Result<Self> {
        tools::REGISTRY.ensure()?;
        let dir = target_dir().join("local-registry");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("data"))?;

        let mut random = [0u8; 16];
        fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
        let password: String = random.iter().map(|b| format!("{b:02x}")).collect();
        // The lowest cost bcrypt allows: the password is random and lives
        // for one run.
        let hash = bcrypt::hash(&password, 4).context("hashing the registry password")?;
        fs::write(dir.join("htpasswd"), format!("{USER}:{hash}\n"))?;

        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = dir.join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd:\n    realm: podmeter-release\n    path: {}\n",
                dir.join("data").display(),
                dir.join("htpasswd").display()
            ),
        )?;
        let log = fs::File::create(dir.join("registry.log"))?;
        let child = dies_with_xtask(&mut Command::new(tools::REGISTRY.bin("registry")))
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the registry")?;
        let mut registry = LocalRegistry {
            child,
            dir,
            port,
            password,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(status) = registry.anonymous_status() {
                ensure!(
                    status == 401,
                    "the local registry answered an anonymous request with {status}, not 401"
                );
                break;
            }
            if let Some(exit) = registry.child.try_wait()? {
                bail!(
                    "the local registry exited ({exit}): {}",
                    registry.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the local registry did not answer within 30 s: {}",
                    registry.log_tail()
                );
            }
            sleep(Duration::from_millis(200));
        }
        eprintln!(
            "registry: local registry on 127.0.0.1:{} (user {USER}, a password of this run)",
            registry.port
        );
        Ok(registry)
    }

    /// The registry path to release under.
    pub fn path(&self) -> String {
        format!("127.0.0.1:{}/podmeter", self.port)
    }

    /// How the release reaches it: its password, no TLS, and login state of
    /// its own (not the user's skopeo and helm logins).
    pub fn target(&self) -> Target {
        Target {
            registry: self.path(),
            login: Some((USER.to_owned(), self.password.clone())),
            plain_http: true,
            auth_dir: Some(self.dir.clone()),
        }
    }

    /// The status line's code for `GET /v2/` without credentials.
    fn anonymous_status(&self) -> Result<u16> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        // `HTTP/1.1 401`
        let text = String::from_utf8_lossy(&head);
        text.get(9..12)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("not an HTTP status line: {text:?}"))
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// What the registry now serves is what the release built: the image
    /// `reference` lists amd64 and arm64, each with the configuration
    /// built (a registry may recompress layers, so configs are compared),
    /// and the chart pulled back is the package byte for byte. Anonymous
    /// requests are still refused.
    pub fn check(&self, reference: &str, built_image: &Path, built_chart: &Path) -> Result<()> {
        let target = self.target();
        let want = image::platform_configs(built_image)?;
        let index: Value = serde_json::from_str(&output(
            target
                .skopeo("inspect")
                .arg("--raw")
                .arg(format!("docker://{reference}")),
        )?)
        .context("the pushed image's index")?;
        let (repo, _tag) = reference
            .rsplit_once(':')
            .context("a reference with a tag")?;
        let mut got = BTreeMap::new();
        for m in index["manifests"].as_array().into_iter().flatten() {
            let arch = m["platform"]["architecture"].as_str().unwrap_or("?");
            let digest = m["digest"].as_str().context("a manifest without digest")?;
            let manifest: Value = serde_json::from_str(&output(
                target
                    .skopeo("inspect")
                    .arg("--raw")
                    .arg(format!("docker://{repo}@{digest}")),
            )?)?;
            got.insert(
                arch.to_owned(),
                manifest["config"]["digest"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        ensure!(
            got == want,
            "the registry's {reference} has platform configs {got:?}, the release built {want:?}"
        );

        let pulled = self.dir.join("pulled");
        fs::create_dir_all(&pulled)?;
        let registry = self.path();
        output(
            target
                .helm(&["pull", &format!("oci://{registry}/charts/podmeter")])
                .args(["--version", crate::release::VERSION, "--destination"])
                .arg(&pulled),
        )?;
        let name = built_chart.file_name().context("a chart file name")?;
        ensure!(
            fs::read(pulled.join(name))? == fs::read(built_chart)?,
            "the chart pulled from the registry differs from {}",
            built_chart.display()
        );
        ensure!(
            self.anonymous_status()? == 401,
            "the local registry stopped asking for credentials"
        );
        eprintln!(
            "registry: pulled back {reference} ({}) and the chart {}: as built",
            got.keys().cloned().collect::<Vec<_>>().join(", "),
            name.to_string_lossy()
        );
        Ok(())
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
