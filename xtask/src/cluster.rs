//! `cargo xtask cluster up | down | status`: one real Kubernetes node on
//! this machine, for the end-to-end tests and for trying podmeter.
//!
//! * etcd and the Kubernetes components of one pinned release, built from
//!   their upstream Go modules (`xtask/go/`) and cached outside the clone,
//!   keyed by version;
//! * containerd, runc and the CNI bridge plugin from Debian, run as our own
//!   containerd instance (own config, root, state and socket), configured the
//!   way this machine needs: runc, `restrict_oom_score_adj`, cgroupfs;
//! * its own CA, certificates and service-account keys; the admin
//!   kubeconfig is written to [`kubeconfig()`].
//!
//! Everything lives under [`STATE`] and [`RUN`] plus the host objects listed
//! in `down`, which removes every process, mount, network namespace,
//! interface and cgroup the cluster made. The machine's own cgroup
//! hierarchies are never remounted or reconfigured.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{image, root, setup, sh, tools};

/// Kubernetes release and the etcd it is tested with.
pub const KUBERNETES: &str = "v1.34.4";
const ETCD: &str = "v3.6.16";

/// Where the cluster keeps its files.
pub const STATE: &str = "/var/lib/podmeter-cluster";
/// Sockets and runtime state.
const RUN: &str = "/run/podmeter-cluster";
/// The node's name and address. The address lives on a veth the cluster
/// creates, so nothing depends on this machine's own interfaces.
pub const NODE: &str = "podmeter-node";
const NODE_IP: &str = "10.250.0.1";
const POD_CIDR: &str = "10.244.0.0/24";
const SERVICE_CIDR: &str = "10.96.0.0/24";
const BRIDGE: &str = "pmbr0";
const NODE_LINK: &str = "pmnode0";
const PAUSE_IMAGE: &str = "localhost/podmeter-pause:1";

const K8S_BINARIES: [&str; 6] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kubectl",
    "kube-proxy",
];

/// Debian packages a node needs.
const PACKAGES: &[&str] = &[
    "containerd",
    "runc",
    "containernetworking-plugins",
    "busybox-static",
    "iptables",
    "conntrack",
    "openssl",
];

/// The admin kubeconfig (system:masters).
pub fn kubeconfig() -> PathBuf {
    Path::new(STATE).join("admin.kubeconfig")
}

/// containerd's socket.
pub fn containerd_sock() -> PathBuf {
    Path::new(RUN).join("containerd.sock")
}

fn k8s_bin(name: &str) -> PathBuf {
    setup::cache_dir().join(format!("kubernetes-{KUBERNETES}/bin/{name}"))
}

fn etcd_bin() -> PathBuf {
    setup::cache_dir().join(format!("etcd-{ETCD}/bin/etcd"))
}

/// The kubelet `cluster up` runs.
pub fn kubelet_bin() -> PathBuf {
    k8s_bin("kubelet")
}

/// The kubectl binary of the cluster's release.
pub fn kubectl_bin() -> PathBuf {
    k8s_bin("kubectl")
}

/// kubectl against the cluster.
pub fn kubectl() -> Command {
    let mut c = Command::new(k8s_bin("kubectl"));
    c.arg("--kubeconfig").arg(kubeconfig());
    c
}

/// Builds etcd and the Kubernetes binaries from their Go modules, unless
/// this version is cached already.
pub fn binaries() -> Result<()> {
    let cached = || K8S_BINARIES.iter().all(|b| k8s_bin(b).exists()) && etcd_bin().exists();
    if cached() {
        return Ok(());
    }
    // CI's background prebuild may be building them: wait, then use them.
    let _lock = setup::lock(&format!("kubernetes-{KUBERNETES}"))?;
    let missing: Vec<&str> = K8S_BINARIES
        .iter()
        .copied()
        .filter(|b| !k8s_bin(b).exists())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "cluster: building Kubernetes {KUBERNETES} ({}) from its Go module; cached afterwards",
            missing.join(", ")
        );
        let minor = KUBERNETES.split('.').nth(1).unwrap_or("0");
        let mut ldflags = String::from("-s -w");
        for pkg in [
            "k8s.io/component-base/version",
            "k8s.io/client-go/pkg/version",
        ] {
            ldflags += &format!(
                " -X {pkg}.gitVersion={KUBERNETES} -X {pkg}.gitMajor=1 -X {pkg}.gitMinor={minor} -X {pkg}.gitTreeState=clean"
            );
        }
        let dir = k8s_bin("x").parent().unwrap().to_owned();
        let staging = tools::staging_dir(&dir)?;
        sh(Command::new("go")
            .current_dir(root().join("xtask/go/kubernetes"))
            .args(["build", "-trimpath", "-ldflags", &ldflags, "-o"])
            .arg(format!("{}/", staging.display()))
            .args(missing.iter().map(|b| format!("k8s.io/kubernetes/cmd/{b}")))
            .env("GOFLAGS", "-mod=mod"))
        .context("building Kubernetes (needs Go and the Go module proxy)")?;
        tools::publish(&staging, &dir, missing)?;
    }
    if !etcd_bin().exists() {
        eprintln!("cluster: building etcd {ETCD} from its Go module; cached afterwards");
        let dir = etcd_bin().parent().unwrap().to_owned();
        let staging = tools::staging_dir(&dir)?;
        sh(Command::new("go")
            .current_dir(root().join("xtask/go/etcd"))
            .args(["build", "-trimpath", "-ldflags", "-s -w", "-o"])
            .arg(staging.join("etcd"))
            .arg(".")
            .env("GOFLAGS", "-mod=mod"))?;
        tools::publish(&staging, &dir, ["etcd"])?;
    }
    Ok(())
}

fn state(p: &str) -> PathBuf {
    Path::new(STATE).join(p)
}

fn run_quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `cargo xtask cluster`'s options.
#[derive(clap::Args)]
pub struct Options {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Build (once, cached) and start etcd, the control plane, containerd and
    /// a kubelet; wait until the node is Ready.
    Up,
    /// Stop everything and remove every process, mount, netns, interface,
    /// cgroup and file the cluster made.
    Down,
    /// Say whether the node is up and Ready.
    Status,
}

pub fn run(opts: &Options) -> Result<()> {
    match opts.action {
        Action::Up => up(),
        Action::Down => down(),
        Action::Status => status(),
    }
}

/// `cargo xtask cluster up`.
pub fn up() -> Result<()> {
    let started = Instant::now();
    setup::apt(PACKAGES)?;
    binaries()?;
    if status_ok() {
        eprintln!(
            "cluster: already up ({NODE} Ready); kubeconfig {}",
            kubeconfig().display()
        );
        return Ok(());
    }
    // A half-started cluster from an earlier failure: start clean.
    down()?;
    for d in [
        "pki",
        "logs",
        "pids",
        "etcd",
        "kubelet",
        "containerd",
        "cni",
        "cni-ipam",
    ] {
        fs::create_dir_all(state(d))?;
    }
    fs::create_dir_all(state("cmd"))?;
    fs::create_dir_all(RUN)?;

    node_address()?;
    bpffs()?;
    pki()?;
    kubeconfigs()?;
    etcd()?;
    apiserver()?;
    controllers()?;
    containerd()?;
    images()?;
    kubelet()?;
    kube_proxy()?;
    wait_ready()?;
    eprintln!(
        "cluster: {NODE} Ready in {:.0} s; export KUBECONFIG={}",
        started.elapsed().as_secs_f64(),
        kubeconfig().display()
    );
    Ok(())
}

/// bpffs at /sys/fs/bpf, as systemd mounts it at boot on users' nodes: the
/// agent pins its programs there through a hostPath (PID 1 here is not
/// systemd, so nothing else mounts it). Left mounted by `down`, which
/// removes podmeter's pins in it (the uninstall test checks that the
/// agents do that themselves).
fn bpffs() -> Result<()> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let mounted = podmeter::cgroup::mount::mount_points_of(&mountinfo, "bpf")
        .any(|p| p == Path::new("/sys/fs/bpf"));
    if !mounted {
        sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// A veth whose near end carries the node address (no dummy interfaces here).
fn node_address() -> Result<()> {
    if !run_quiet(Command::new("ip").args(["link", "show", NODE_LINK])) {
        sh(Command::new("ip").args([
            "link", "add", NODE_LINK, "type", "veth", "peer", "name", "pmnode1",
        ]))?;
    }
    let _ = run_quiet(Command::new("ip").args([
        "addr",
        "add",
        &format!("{NODE_IP}/32"),
        "dev",
        NODE_LINK,
    ]));
    sh(Command::new("ip").args(["link", "set", NODE_LINK, "up"]))?;
    sh(Command::new("ip").args(["link", "set", "pmnode1", "up"]))
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(state("pki"))
        .output()?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// CA, serving and client certificates, service-account keys.
fn pki() -> Result<()> {
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=podmeter-cluster-ca",
    ])?;
    let certs: [(&str, &str, &str); 4] = [
        (
            "apiserver",
            "/CN=kube-apiserver",
            "subjectAltName=DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:10.250.0.1,IP:10.96.0.1\nextendedKeyUsage=serverAuth",
        ),
        (
            "admin",
            "/O=system:masters/CN=podmeter-admin",
            "extendedKeyUsage=clientAuth",
        ),
        (
            "kubelet",
            "/CN=podmeter-node",
            "subjectAltName=DNS:podmeter-node,IP:10.250.0.1,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
        ),
        // The aggregation layer's client (metrics.k8s.io via prometheus-adapter).
        (
            "front-proxy-client",
            "/CN=front-proxy-client",
            "extendedKeyUsage=clientAuth",
        ),
    ];
    for (name, subj, ext) in certs {
        fs::write(state(&format!("pki/{name}.ext")), format!("{ext}\n"))?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subj,
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-out",
            &format!("{name}.crt"),
            "-extfile",
            &format!("{name}.ext"),
        ])?;
    }
    openssl(&["genrsa", "-out", "sa.key", "2048"])?;
    openssl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])
}

fn kubeconfigs() -> Result<()> {
    let pki = state("pki");
    let kc = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: podmeter\n  cluster:\n    server: https://{NODE_IP}:6443\n    certificate-authority: {p}/ca.crt\nusers:\n- name: admin\n  user:\n    client-certificate: {p}/admin.crt\n    client-key: {p}/admin.key\ncontexts:\n- name: podmeter\n  context:\n    cluster: podmeter\n    user: admin\ncurrent-context: podmeter\n",
        p = pki.display()
    );
    fs::write(kubeconfig(), kc)?;
    Ok(())
}

/// Starts `bin` in its own process group, logging to `logs/<name>.log`.
/// The command is kept as `cmd/<name>.sh` (pid in `pids/<name>.pid`), so
/// tests can stop a component and start it again exactly as `up` did.
fn spawn(name: &str, bin: &Path, args: &[String]) -> Result<()> {
    let quote = |a: &str| format!("'{}'", a.replace('\'', r"'\''"));
    let mut script = format!("#!/bin/sh\nexec {}", quote(&bin.display().to_string()));
    for a in args {
        script += " ";
        script += &quote(a);
    }
    script += &format!(" >>{} 2>&1\n", state(&format!("logs/{name}.log")).display());
    let path = state(&format!("cmd/{name}.sh"));
    fs::write(&path, script)?;
    let child = Command::new("sh")
        .arg(&path)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    fs::write(state(&format!("pids/{name}.pid")), child.id().to_string())?;
    Ok(())
}

/// Polls `ok` until it holds, or fails naming `what` and its log.
fn wait(what: &str, log: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        if Instant::now() > deadline {
            let tail = fs::read_to_string(state(&format!("logs/{log}.log"))).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(30).collect();
            bail!(
                "{what} not ready after {timeout:?}; last lines of logs/{log}.log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        sleep(Duration::from_millis(300));
    }
    Ok(())
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn etcd() -> Result<()> {
    let data = state("etcd");
    spawn(
        "etcd",
        &etcd_bin(),
        &[
            "--name=default".into(),
            format!("--data-dir={}", data.display()),
            "--listen-client-urls=http://127.0.0.1:12379".into(),
            "--advertise-client-urls=http://127.0.0.1:12379".into(),
            "--listen-peer-urls=http://127.0.0.1:12380".into(),
            "--initial-advertise-peer-urls=http://127.0.0.1:12380".into(),
            "--initial-cluster=default=http://127.0.0.1:12380".into(),
            "--listen-metrics-urls=".into(),
        ],
    )?;
    wait("etcd", "etcd", Duration::from_secs(30), || {
        run_quiet(Command::new("curl").args(["-sf", "http://127.0.0.1:12379/health"]))
    })
}

fn apiserver() -> Result<()> {
    let p = state("pki");
    let p = p.display();
    spawn(
        "kube-apiserver",
        &k8s_bin("kube-apiserver"),
        &[
            "--etcd-servers=http://127.0.0.1:12379".into(),
            "--bind-address=0.0.0.0".into(),
            "--secure-port=6443".into(),
            format!("--advertise-address={NODE_IP}"),
            // The node name does not resolve; its address does.
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!("--tls-cert-file={p}/apiserver.crt"),
            format!("--tls-private-key-file={p}/apiserver.key"),
            format!("--client-ca-file={p}/ca.crt"),
            format!("--kubelet-client-certificate={p}/admin.crt"),
            format!("--kubelet-client-key={p}/admin.key"),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={p}/sa.pub"),
            format!("--service-account-signing-key-file={p}/sa.key"),
            "--authorization-mode=Node,RBAC".into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
            // The aggregation layer, for APIs served by extension API
            // servers such as prometheus-adapter's metrics.k8s.io; routed to
            // the endpoints directly, as the node has no cluster DNS.
            format!("--requestheader-client-ca-file={p}/ca.crt"),
            "--requestheader-allowed-names=front-proxy-client".into(),
            "--requestheader-username-headers=X-Remote-User".into(),
            "--requestheader-group-headers=X-Remote-Group".into(),
            "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
            format!("--proxy-client-cert-file={p}/front-proxy-client.crt"),
            format!("--proxy-client-key-file={p}/front-proxy-client.key"),
            "--enable-aggregator-routing=true".into(),
        ],
    )?;
    wait(
        "kube-apiserver",
        "kube-apiserver",
        Duration::from_secs(90),
        || run_quiet(kubectl().args(["get", "--raw", "/readyz"])),
    )
}

fn controllers() -> Result<()> {
    let kc = kubeconfig();
    let kc = kc.display();
    let p = state("pki");
    let p = p.display();
    spawn(
        "kube-controller-manager",
        &k8s_bin("kube-controller-manager"),
        &[
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            format!("--service-account-private-key-file={p}/sa.key"),
            format!("--root-ca-file={p}/ca.crt"),
            "--use-service-account-credentials=true".into(),
            "--leader-elect=false".into(),
            "--secure-port=0".into(),
        ],
    )?;
    spawn(
        "kube-scheduler",
        &k8s_bin("kube-scheduler"),
        &[
            format!("--kubeconfig={kc}"),
            "--leader-elect=false".into(),
            "--secure-port=0".into(),
        ],
    )
}

fn containerd() -> Result<()> {
    let config = format!(
        r#"version = 2
root = "{root}"
state = "{run}/containerd"

[grpc]
  address = "{run}/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{state}/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # No CAP_SYS_RESOURCE here: lowering oom_score_adj is refused.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # crun refuses hybrid cgroups; runc handles them.
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{state}/cni"
"#,
        root = state("containerd/root").display(),
        run = RUN,
        state = STATE,
    );
    fs::write(state("containerd.toml"), config)?;
    let conflist = format!(
        r#"{{"cniVersion": "0.4.0", "name": "podmeter", "plugins": [
  {{"type": "bridge", "bridge": "{BRIDGE}", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{POD_CIDR}"}}]], "routes": [{{"dst": "0.0.0.0/0"}}], "dataDir": "{state}/cni-ipam"}}}}
]}}
"#,
        state = STATE
    );
    fs::write(state("cni/10-podmeter.conflist"), conflist)?;
    spawn(
        "containerd",
        Path::new("/usr/bin/containerd"),
        &[
            "--config".into(),
            state("containerd.toml").display().to_string(),
        ],
    )?;
    wait("containerd", "containerd", Duration::from_secs(30), || {
        run_quiet(
            Command::new("ctr")
                .arg("--address")
                .arg(containerd_sock())
                .arg("version"),
        )
    })
}

/// The sandbox ("pause") image, from Debian's static busybox.
fn images() -> Result<()> {
    let tar = state("pause.oci.tar");
    image::build(
        &image::Spec {
            name: PAUSE_IMAGE,
            files: vec![(PathBuf::from("/bin/busybox"), "/bin/busybox".into())],
            symlinks: vec![("/bin/sh".into(), "busybox".into())],
            entrypoint: args(&["/bin/busybox", "sleep", "2147483647"]),
        },
        &tar,
    )?;
    image::import(&tar, &containerd_sock())
}

fn kubelet() -> Result<()> {
    let p = state("pki");
    let config = format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
# This machine's cgroups are hybrid (v1 controllers, cgroup2 at
# /sys/fs/cgroup/unified): kubelet sees cgroup v1. Newer kubelets refuse v1
# unless told not to.
failCgroupV1: false
failSwapOn: false
# Secret and ConfigMap volumes (Prometheus' generated config, rule files)
# follow changes within ~20 s instead of the default minute or more, so the
# monitoring tests see a ServiceMonitor or rule change take effect sooner.
syncFrequency: 20s
containerRuntimeEndpoint: unix://{sock}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {p}/ca.crt}}
authorization: {{mode: AlwaysAllow}}
tlsCertFile: {p}/kubelet.crt
tlsPrivateKeyFile: {p}/kubelet.key
readOnlyPort: 0
healthzPort: 0
podLogsDir: {state}/pod-logs
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
serializeImagePulls: false
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
"#,
        sock = containerd_sock().display(),
        p = p.display(),
        state = STATE,
    );
    fs::write(state("kubelet.yaml"), config)?;
    spawn(
        "kubelet",
        &k8s_bin("kubelet"),
        &[
            format!("--config={}", state("kubelet.yaml").display()),
            format!("--kubeconfig={}", kubeconfig().display()),
            format!("--root-dir={}", state("kubelet").display()),
            format!("--node-ip={NODE_IP}"),
            format!("--hostname-override={NODE}"),
            // cAdvisor (inside the kubelet) finds containers through
            // containerd; ours is not at the default socket.
            format!("--containerd={}", containerd_sock().display()),
        ],
    )
}

fn kube_proxy() -> Result<()> {
    spawn(
        "kube-proxy",
        &k8s_bin("kube-proxy"),
        &[
            format!("--kubeconfig={}", kubeconfig().display()),
            format!("--hostname-override={NODE}"),
            "--proxy-mode=iptables".into(),
            format!("--cluster-cidr={POD_CIDR}"),
            "--metrics-bind-address=127.0.0.1:10249".into(),
            "--healthz-bind-address=127.0.0.1:10256".into(),
        ],
    )
}

fn node_ready() -> bool {
    kubectl()
        .args([
            "get",
            "node",
            NODE,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"True")
}

fn wait_ready() -> Result<()> {
    wait(
        "node Ready",
        "kubelet",
        Duration::from_secs(180),
        node_ready,
    )?;
    // The default service account is what pods run as; it appears shortly
    // after the controller manager starts.
    wait(
        "default service account",
        "kube-controller-manager",
        Duration::from_secs(60),
        || run_quiet(kubectl().args(["get", "serviceaccount", "default"])),
    )
}

fn status_ok() -> bool {
    kubeconfig().exists() && node_ready()
}

/// `cargo xtask cluster status`.
pub fn status() -> Result<()> {
    if status_ok() {
        println!(
            "up: node {NODE} Ready; KUBECONFIG={}",
            kubeconfig().display()
        );
        Ok(())
    } else {
        bail!("down (or not Ready); `cargo xtask cluster up` starts it")
    }
}

fn kill_pidfiles() {
    let Ok(entries) = fs::read_dir(state("pids")) else {
        return;
    };
    for e in entries.flatten() {
        if let Ok(pid) = fs::read_to_string(e.path()) {
            let _ = Command::new("kill").args(["-TERM", pid.trim()]).status();
        }
        let _ = fs::remove_file(e.path());
    }
}

/// Kills every process in cgroup `dir` (and below), then removes the dirs.
/// `cargo xtask cluster down`: removes everything `up` made.
pub fn down() -> Result<()> {
    kill_pidfiles();
    // containerd-shims and the containers they run outlive containerd.
    let _ = Command::new("pkill")
        .args([
            "-KILL",
            "-f",
            &format!("containerd-shim-runc-v2 .*-address {RUN}/"),
        ])
        .status();
    for name in [
        "kubelet",
        "kube-proxy",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "etcd",
    ] {
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &format!("{}", k8s_bin(name).display())])
            .status();
    }
    let _ = Command::new("pkill")
        .args(["-KILL", "-f", &etcd_bin().display().to_string()])
        .status();
    let _ = Command::new("pkill")
        .args([
            "-KILL",
            "-f",
            &format!("containerd --config {STATE}/containerd.toml"),
        ])
        .status();
    sleep(Duration::from_millis(500));

    // The pins of an agent killed with its cluster (it never saw its
    // DaemonSet go): what `podmeter cleanup` removes, the layout
    // directories of the chart's pin path. Removing them detaches the
    // programs they hold.
    if let Ok(layouts) = fs::read_dir("/sys/fs/bpf/podmeter") {
        for e in layouts.flatten() {
            let _ = fs::remove_dir_all(e.path());
        }
        let _ = fs::remove_dir("/sys/fs/bpf/podmeter");
    }

    // Pod cgroups, in every hierarchy the kubelet and runc wrote to.
    if let Ok(entries) = fs::read_dir("/sys/fs/cgroup") {
        for e in entries.flatten() {
            podmeter_test_support::cgroups::remove_tree(&e.path().join("kubepods"));
        }
    }
    podmeter_test_support::cgroups::remove_tree(Path::new("/sys/fs/cgroup/kubepods"));

    // Mounts under our directories (container rootfs, volumes, netns), deepest first.
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = podmeter::cgroup::mount::mount_points(&mountinfo)
        .filter(|m| {
            m.starts_with(STATE)
                || m.starts_with(RUN)
                || m.to_string_lossy().starts_with("/run/netns/cni-")
                || m.to_string_lossy().starts_with("/var/run/netns/cni-")
        })
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for m in mounts {
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("cni-") {
                let _ = run_quiet(Command::new("ip").args(["netns", "del", &name]));
                let _ = fs::remove_file(e.path());
            }
        }
    }
    for link in [BRIDGE, NODE_LINK] {
        let _ = run_quiet(Command::new("ip").args(["link", "del", link]));
    }
    // kube-proxy's rules: every KUBE-* chain and every jump to one.
    for family in ["iptables", "ip6tables"] {
        remove_kube_rules(family);
    }
    let _ = fs::remove_dir_all(RUN);
    if Path::new(STATE).exists() {
        fs::remove_dir_all(STATE).with_context(|| format!("removing {STATE} (a mount left?)"))?;
    }
    Ok(())
}

/// Rewrites the ruleset without the KUBE-* chains kube-proxy added and the
/// jumps to them, leaving every other rule as it was.
fn remove_kube_rules(family: &str) {
    let Ok(out) = Command::new(format!("{family}-save")).output() else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.contains("KUBE-") {
        return;
    }
    let kept: String = text
        .lines()
        .filter(|l| !l.contains("KUBE-"))
        .map(|l| format!("{l}\n"))
        .collect();
    let restore = Command::new(format!("{family}-restore"))
        .stdin(Stdio::piped())
        .spawn();
    if let Ok(mut child) = restore {
        if let Some(mut stdin) = child.stdin.take() {
            let _ = std::io::Write::write_all(&mut stdin, kept.as_bytes());
        }
        let _ = child.wait();
    }
}
