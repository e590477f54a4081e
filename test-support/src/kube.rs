//! The local Kubernetes cluster (`cargo xtask cluster up`), through kubectl.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use crate::poll;

/// The local Kubernetes cluster (`cargo xtask cluster up`), through kubectl.
pub struct Kube {
    kubectl: PathBuf,
    kubeconfig: PathBuf,
}

impl Kube {
    /// From `PODMETER_KUBECTL` and `KUBECONFIG`, which `cargo xtask test` sets.
    pub fn from_env() -> Self {
        let var = |k: &str| {
            std::env::var_os(k)
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("{k} unset: run the e2e tests with `cargo xtask test`"))
        };
        Self {
            kubectl: var("PODMETER_KUBECTL"),
            kubeconfig: var("KUBECONFIG"),
        }
    }

    /// kubectl with `args`; stdout, or the error output.
    pub fn try_run(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "kubectl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// A bearer token of service account `name` in `podmeter-e2e-auth`
    /// (made if missing), allowed `get` on the non-resource URL `/metrics`
    /// when `reader` (what Prometheus' own account has), else allowed
    /// nothing at all.
    pub fn token(&self, name: &str, reader: bool) -> String {
        let ns = "podmeter-e2e-auth";
        let mut yaml = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {name}\n  namespace: {ns}\n"
        );
        if reader {
            yaml.push_str(&format!(
                "---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: podmeter-e2e-metrics-reader\nrules:\n- nonResourceURLs: [/metrics]\n  verbs: [get]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: podmeter-e2e-{name}\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: podmeter-e2e-metrics-reader\nsubjects:\n- kind: ServiceAccount\n  name: {name}\n  namespace: {ns}\n"
            ));
        }
        self.apply(&yaml);
        self.run(&["create", "token", name, "-n", ns, "--duration=2h"])
            .trim()
            .to_owned()
    }

    /// kubectl with `args`, panicking on failure.
    pub fn run(&self, args: &[&str]) -> String {
        self.try_run(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `kubectl apply -f -` with `yaml`.
    pub fn apply(&self, yaml: &str) {
        let mut child = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), yaml.as_bytes()).unwrap();
        assert!(
            child.wait().unwrap().success(),
            "kubectl apply failed:\n{yaml}"
        );
    }

    /// `kubectl get <what> -o json`.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.run(&a)).unwrap()
    }

    /// Polls `ok` every half second until it returns `Some`, or panics.
    pub fn until<T>(&self, timeout: Duration, what: &str, ok: impl FnMut() -> Option<T>) -> T {
        poll(timeout, Duration::from_millis(500), what, ok)
    }

    /// Waits until pod `ns/name` has `phase`; returns the pod.
    pub fn pod_phase(&self, ns: &str, name: &str, phase: &str) -> serde_json::Value {
        self.until(
            Duration::from_secs(120),
            &format!("pod {ns}/{name} {phase}"),
            || {
                let p = self.json(&["pod", "-n", ns, name]);
                (p["status"]["phase"] == phase).then_some(p)
            },
        )
    }
}

/// A namespace deleted (with everything in it) on drop.
pub struct Namespace<'a> {
    kube: &'a Kube,
    /// Its name.
    pub name: String,
}

impl<'a> Namespace<'a> {
    /// Creates `name`, replacing a leftover one.
    pub fn new(kube: &'a Kube, name: &str) -> Self {
        let _ = kube.try_run(&["delete", "namespace", name, "--wait=true", "--timeout=120s"]);
        kube.run(&["create", "namespace", name]);
        Self {
            kube,
            name: name.to_owned(),
        }
    }
}

impl Drop for Namespace<'_> {
    fn drop(&mut self) {
        let _ = self.kube.try_run(&[
            "delete",
            "namespace",
            &self.name,
            "--wait=true",
            "--timeout=120s",
            "--grace-period=1",
        ]);
    }
}
