//! The ways people start podmeter wrong each end in one clear line on
//! stderr with the fix, and a non-zero exit.

use std::{net::TcpListener, process::Command};

use podmeter_test_support::podmeter_bin;

/// Runs podmeter to completion; returns exit code and stderr lines.
fn fails(cmd: &mut Command) -> (i32, Vec<String>) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code().unwrap_or(-1);
    assert_ne!(code, 0, "podmeter should have failed; stderr:\n{stderr}");
    (code, stderr.lines().map(str::to_owned).collect())
}

fn one_line(lines: &[String], needles: &[&str]) {
    assert_eq!(
        lines.len(),
        1,
        "expected one line, got:\n{}",
        lines.join("\n")
    );
    for n in needles {
        assert!(lines[0].contains(n), "{:?} lacks {n:?}", lines[0]);
    }
    assert!(lines[0].starts_with("podmeter: error: "), "{:?}", lines[0]);
}

#[test]
fn port_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (_, lines) = fails(Command::new(podmeter_bin()).args(["--listen", &addr]));
    one_line(&lines, &[&addr, "in use", "--listen"]);
}

#[test]
fn not_root() {
    // An unprivileged user with no capabilities at all.
    let (_, lines) = fails(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ])
            .arg(podmeter_bin()),
    );
    one_line(&lines, &["needs root", "CAP_BPF", "sudo"]);
}

#[test]
fn kubernetes_auth_without_the_api_is_refused() {
    let (_, lines) = fails(Command::new(podmeter_bin()).args([
        "--auth=kubernetes",
        "--no-kubernetes",
        "--no-pin",
    ]));
    one_line(&lines, &["--auth=kubernetes", "--no-kubernetes"]);
}

#[test]
fn no_btf() {
    let (_, lines) =
        fails(Command::new(podmeter_bin()).args(["--btf-path", "/nonexistent/vmlinux"]));
    one_line(&lines, &["BTF", "CONFIG_DEBUG_INFO_BTF"]);
}

#[test]
fn cgroup_root_that_is_not_cgroup2() {
    let (_, lines) = fails(Command::new(podmeter_bin()).args(["--cgroup-root", "/proc"]));
    one_line(&lines, &["--cgroup-root /proc", "not a cgroup2"]);
    let (_, lines) = fails(Command::new(podmeter_bin()).args(["--cgroup-root", "/does/not/exist"]));
    one_line(&lines, &["--cgroup-root /does/not/exist"]);
    // The cause is said once, not once per error in the chain.
    let line = &lines[0];
    assert_eq!(
        line.matches("No such file or directory").count(),
        1,
        "{line}"
    );
}

#[test]
fn bad_flag_values_are_refused_by_the_parser() {
    for args in [
        &["--listen", "not-an-address"][..],
        &["--grace-period", "soon"],
        &["--max-cgroups", "0"],
        &["--log-level", "[[["],
        &["--refresh-interval", "0s"],
        &["--rescan-interval", "1000years"],
        &["--watchdog-timeout", "1s"],
        &["--pod-labels", "team,,app"],
        &["--pod-labels", "a.b,a_b"],
    ] {
        let (code, lines) = fails(Command::new(podmeter_bin()).args(args));
        assert_eq!(code, 2, "{args:?}: {lines:?}");
        assert!(
            lines.iter().any(|l| l.contains(args[0])),
            "{args:?}: {lines:?}"
        );
    }
}

#[test]
fn help_explains_the_options() {
    let out = Command::new(podmeter_bin()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--listen",
        "9740",
        "--cgroup-root",
        "--node-name",
        "NODE_NAME",
        "--grace-period",
        "--log-level",
        "--max-cgroups",
        "--wait-histogram",
        "CAP_BPF",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
    assert!(
        !help.contains("--btf-path"),
        "test-only flag shown in --help"
    );
}

/// `podmeter probe` (what `helm test` runs) explains itself, and away from
/// any cluster fails in one line (its in-cluster run is in the e2e tests).
#[test]
fn probe_explains_itself_and_needs_a_cluster() {
    let out = Command::new(podmeter_bin())
        .args(["probe", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--namespace",
        "--daemonset",
        "--prometheus",
        "--plain-http",
        "--timeout",
        "helm test",
    ] {
        assert!(
            help.contains(needle),
            "probe --help lacks {needle}:\n{help}"
        );
    }
    let home = std::env::temp_dir().join(format!("podmeter-probe-home-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let (code, lines) = fails(
        Command::new(podmeter_bin())
            .args(["probe", "--namespace", "pm", "--daemonset", "pm"])
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("HOME", &home),
    );
    let _ = std::fs::remove_dir(&home);
    assert_eq!(code, 1);
    one_line(&lines, &["no Kubernetes API"]);
}
