//! The Helm chart (`deploy/helm/podmeter`), rendered and linted by real helm
//! (built from its Go module by `cargo xtask tools`), for the default values
//! and every documented switch; its alert rules unit-tested with promtool;
//! its dashboards checked for structure. No cluster needed: the chart running
//! in a cluster is `monitoring.rs`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_yaml_ng::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn chart() -> PathBuf {
    repo().join("deploy/helm/podmeter")
}

fn tool(var: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} is not set: run the tests through `cargo xtask test`, which builds the tools")
    })
}

/// What a cluster with Prometheus Operator serves, as `helm template`'s
/// `--api-versions` (an install reads them from the API server).
const OPERATOR: &[&str] = &[
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PodMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
];

/// `helm template` with `--set` pairs, for a cluster with Prometheus
/// Operator; Err(stderr) when helm refuses.
fn template(sets: &[&str]) -> Result<Vec<Value>, String> {
    template_on(OPERATOR, sets)
}

/// `helm template` for a cluster serving `apis` (beyond the built-in ones):
/// the install's objects. `helm test`'s (its pod, account and roles, all
/// named pm-podmeter-test) are checked on their own ([`test_hooks`]).
fn template_on(apis: &[&str], sets: &[&str]) -> Result<Vec<Value>, String> {
    Ok(helm_template(apis, sets)?
        .into_iter()
        .filter(|v| v["metadata"]["name"] != "pm-podmeter-test")
        .collect())
}

/// Every object `helm template` renders, `helm test`'s included.
fn helm_template(apis: &[&str], sets: &[&str]) -> Result<Vec<Value>, String> {
    let mut c = Command::new(tool("PODMETER_HELM"));
    c.args(["template", "pm", "--namespace", "monitoring"])
        .arg(chart());
    for a in apis {
        c.args(["--api-versions", a]);
    }
    for s in sets {
        c.args(["--set", s]);
    }
    let out = c.output().expect("running helm");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    Ok(serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("helm rendered valid YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect())
}

fn render(sets: &[&str]) -> Vec<Value> {
    template(sets).unwrap_or_else(|e| panic!("helm template {sets:?} failed: {e}"))
}

fn kinds(docs: &[Value]) -> BTreeSet<String> {
    docs.iter()
        .map(|d| d["kind"].as_str().unwrap().to_owned())
        .collect()
}

fn only<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}, got {}", found.len());
    found[0]
}

fn container(docs: &[Value]) -> &Value {
    &only(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
}

fn args(docs: &[Value]) -> Vec<String> {
    container(docs)["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

/// The documented values switches, each rendered and linted.
const SWITCHES: &[&[&str]] = &[
    &[],
    &["securityMode=capabilities"],
    &["monitor.kind=PodMonitor"],
    &["monitor.kind=none"],
    &["monitor.kind=ServiceMonitor"],
    &["monitor.scrapeAnnotations=false"],
    &["prometheusRule.enabled=true"],
    &["networkPolicy.enabled=true"],
    &["priorityClassName=system-node-critical"],
    &["prometheusRule.enabled=false"],
    &["dashboards.enabled=false"],
    &["dashboards.namespace=grafana"],
    &["hostNetwork=true"],
    &["hostPID=true"],
    &["rbac.create=false", "serviceAccount.create=false"],
    &["service.enabled=false", "monitor.kind=PodMonitor"],
    &["agent.ownerLabels=true", "agent.podLabels={app,team}"],
    &["agent.waitHistogram=true"],
    &["alerts.runbookBaseURL=https://runbooks.example/podmeter/"],
];

#[test]
fn helm_lint_is_clean_for_every_switch() {
    for sets in SWITCHES {
        let mut c = Command::new(tool("PODMETER_HELM"));
        c.args(["lint", "--strict"]).arg(chart());
        for s in *sets {
            c.args(["--set", s]);
        }
        let out = c.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "helm lint --strict {sets:?}:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("0 chart(s) failed"), "{text}");
    }
}

#[test]
fn default_install_is_privileged_daemonset_with_servicemonitor_rules_and_dashboards() {
    let docs = render(&[]);
    assert_eq!(
        kinds(&docs),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "PrometheusRule",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ServiceMonitor"
        ]
        .map(String::from)
        .into(),
    );
    let c = container(&docs);
    assert_eq!(c["securityContext"]["privileged"], true);
    let pod = &only(&docs, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], false);
    // Runs on control-plane (and any tainted) nodes.
    assert_eq!(pod["tolerations"][0]["operator"], "Exists");
    assert!(
        args(&docs).contains(&"--cgroup-root=/host/sys/fs/cgroup".to_owned()),
        "{:?}",
        args(&docs)
    );
    assert_eq!(c["volumeMounts"][0]["readOnly"], true);
    assert!(c["resources"]["limits"]["memory"].is_string());
    // Pinned in the host's bpffs; removed when the DaemonSet goes.
    let a = args(&docs);
    assert!(
        a.contains(&"--pin-path=/sys/fs/bpf/podmeter".to_owned()),
        "{a:?}"
    );
    assert!(
        a.contains(&"--remove-pins-with=monitoring/pm-podmeter".to_owned()),
        "{a:?}"
    );
    assert_eq!(c["volumeMounts"][1]["mountPath"], "/sys/fs/bpf");
    assert_eq!(pod["volumes"][1]["hostPath"]["path"], "/sys/fs/bpf");
    let role = only(&docs, "Role");
    assert_eq!(role["rules"][0]["resources"][0], "daemonsets");
    assert_eq!(role["rules"][0]["resourceNames"][0], "pm-podmeter");
    assert_eq!(role["rules"][0]["verbs"][0], "get");

    let sm = only(&docs, "ServiceMonitor");
    let ep = &sm["spec"]["endpoints"][0];
    assert_eq!(ep["interval"], "30s");
    assert_eq!(ep["honorLabels"], true);
    assert_eq!(ep["relabelings"][0]["targetLabel"], "job");
    assert_eq!(ep["relabelings"][0]["replacement"], "podmeter");
    assert_eq!(ep["relabelings"][1]["targetLabel"], "node");
    // The node names the target: a restarted agent continues its series.
    assert_eq!(ep["relabelings"][2]["targetLabel"], "instance");
    assert_eq!(
        ep["relabelings"][2]["sourceLabels"][0],
        "__meta_kubernetes_pod_node_name"
    );
    // The ServiceMonitor selects the Service, the Service selects the pods.
    let svc = only(&docs, "Service");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(&svc["metadata"]["labels"][k], v);
        assert_eq!(&svc["spec"]["selector"][k], v);
    }

    for cm in docs.iter().filter(|d| d["kind"] == "ConfigMap") {
        assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
        for (_, json) in cm["data"].as_mapping().unwrap() {
            let d: serde_json::Value = serde_json::from_str(json.as_str().unwrap())
                .expect("dashboard ConfigMap holds valid JSON");
            assert!(d["panels"].as_array().is_some_and(|p| !p.is_empty()));
        }
    }
}

#[test]
fn capabilities_mode_has_no_privilege_beyond_the_listed_capabilities() {
    let docs = render(&["securityMode=capabilities"]);
    let sc = &container(&docs)["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    let add: Vec<&str> = sc["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(add, ["BPF", "PERFMON", "NET_ADMIN"]);
    // The host's bpffs is as writable as in privileged mode.
    assert_eq!(
        container(&docs)["volumeMounts"][1]["mountPath"],
        "/sys/fs/bpf"
    );
    assert_eq!(
        only(&docs, "DaemonSet")["spec"]["template"]["spec"]["hostPID"],
        false
    );
}

#[test]
fn metrics_auth_kubernetes_serves_https_to_prometheus_token_and_none_plain_http() {
    // Default: HTTPS, Prometheus' own token, reviews allowed to the agent.
    let docs = render(&[]);
    let a = args(&docs);
    assert!(a.contains(&"--auth=kubernetes".to_owned()), "{a:?}");
    let ep = &only(&docs, "ServiceMonitor")["spec"]["endpoints"][0];
    assert_eq!(ep["scheme"], "https");
    assert_eq!(ep["tlsConfig"]["insecureSkipVerify"], true);
    assert_eq!(
        ep["bearerTokenFile"],
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    );
    let c = container(&docs);
    assert_eq!(c["readinessProbe"]["httpGet"]["scheme"], "HTTPS");
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .unwrap()
        .to_owned();
    let rules = serde_yaml_ng::to_string(&role["rules"]).unwrap();
    assert!(
        rules.contains("tokenreviews") && rules.contains("subjectaccessreviews"),
        "{rules}"
    );
    // A PodMonitor cannot name Prometheus' token file: a scraper account's
    // token Secret instead.
    let pm = render(&["monitor.kind=PodMonitor"]);
    let ep = &only(&pm, "PodMonitor")["spec"]["podMetricsEndpoints"][0];
    assert_eq!(ep["scheme"], "https");
    assert_eq!(
        ep["authorization"]["credentials"]["name"],
        "pm-podmeter-scraper"
    );
    let secret = only(&pm, "Secret");
    assert_eq!(secret["type"], "kubernetes.io/service-account-token");
    // none: plain HTTP, no reviews.
    let plain = render(&["metrics.auth=none"]);
    assert!(args(&plain).contains(&"--auth=none".to_owned()));
    let ep = &only(&plain, "ServiceMonitor")["spec"]["endpoints"][0];
    assert!(
        ep["scheme"].is_null() && ep["bearerTokenFile"].is_null(),
        "{ep:?}"
    );
}

#[test]
fn pinning_off_pins_nothing_and_mounts_no_bpffs() {
    let docs = render(&["pinning.enabled=false"]);
    let a = args(&docs);
    assert!(a.contains(&"--no-pin".to_owned()), "{a:?}");
    assert!(!a.iter().any(|x| x.starts_with("--pin-path")), "{a:?}");
    let c = container(&docs);
    assert_eq!(c["volumeMounts"].as_sequence().unwrap().len(), 1);
}

#[test]
fn monitor_kind_selects_servicemonitor_podmonitor_or_none() {
    let pm = render(&["monitor.kind=PodMonitor"]);
    assert!(!kinds(&pm).contains("ServiceMonitor"));
    let ep = &only(&pm, "PodMonitor")["spec"]["podMetricsEndpoints"][0];
    assert_eq!(ep["honorLabels"], true);
    assert_eq!(ep["relabelings"][0]["replacement"], "podmeter");
    let none = render(&["monitor.kind=none"]);
    assert!(!kinds(&none).contains("ServiceMonitor") && !kinds(&none).contains("PodMonitor"));
    // A PodMonitor needs no Service.
    let no_svc = render(&["service.enabled=false", "monitor.kind=PodMonitor"]);
    assert!(!kinds(&no_svc).contains("Service"));
}

fn render_on(apis: &[&str], sets: &[&str]) -> Vec<Value> {
    template_on(apis, sets).unwrap_or_else(|e| panic!("helm template {sets:?} failed: {e}"))
}

fn pod_annotations(docs: &[Value]) -> BTreeMap<String, String> {
    let a = &only(docs, "DaemonSet")["spec"]["template"]["metadata"]["annotations"];
    a.as_mapping()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_owned(),
                v.as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The defaults install on any cluster: Prometheus Operator's objects only
/// where the cluster serves their API, scrape annotations where it does not.
#[test]
fn auto_renders_monitors_and_rules_only_where_the_cluster_serves_them() {
    let operator_kinds = ["ServiceMonitor", "PodMonitor", "PrometheusRule"];
    let bare = render_on(&[], &[]);
    for k in operator_kinds {
        assert!(
            !kinds(&bare).contains(k),
            "{k} on a cluster without its CRD"
        );
    }
    let want: BTreeMap<String, String> = [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", "9740"),
        ("prometheus.io/path", "/metrics"),
        ("prometheus.io/scheme", "https"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(pod_annotations(&bare), want);
    let plain = pod_annotations(&render_on(&[], &["metrics.auth=none"]));
    assert!(!plain.contains_key("prometheus.io/scheme"), "{plain:?}");
    let off = render_on(&[], &["monitor.scrapeAnnotations=false"]);
    assert!(pod_annotations(&off).is_empty());

    let with = render(&[]);
    assert!(kinds(&with).contains("ServiceMonitor"));
    assert!(kinds(&with).contains("PrometheusRule"));
    assert!(!kinds(&with).contains("PodMonitor"));
    assert!(
        pod_annotations(&with).is_empty(),
        "annotations beside a monitor"
    );
    // Without the Service, or where only PodMonitor is served: a PodMonitor
    // (and, under auth, the scraper token it needs).
    for (apis, sets) in [
        (OPERATOR, &["service.enabled=false"][..]),
        (&["monitoring.coreos.com/v1/PodMonitor"][..], &[][..]),
    ] {
        let docs = render_on(apis, sets);
        assert!(kinds(&docs).contains("PodMonitor"), "{apis:?} {sets:?}");
        assert!(!kinds(&docs).contains("ServiceMonitor"));
        assert_eq!(
            only(&docs, "Secret")["metadata"]["name"],
            "pm-podmeter-scraper"
        );
    }
    // Explicit values are rendered whatever the cluster serves.
    let forced = render_on(
        &[],
        &["monitor.kind=ServiceMonitor", "prometheusRule.enabled=true"],
    );
    assert!(kinds(&forced).contains("ServiceMonitor"));
    assert!(kinds(&forced).contains("PrometheusRule"));
    let never = render(&["monitor.kind=none", "prometheusRule.enabled=false"]);
    for k in operator_kinds {
        assert!(!kinds(&never).contains(k), "{k} though switched off");
    }
    assert_eq!(pod_annotations(&never), want);
}

#[test]
fn optional_objects_follow_their_switches() {
    let np = render(&["networkPolicy.enabled=true"]);
    let policy = only(&np, "NetworkPolicy");
    assert_eq!(policy["spec"]["ingress"][0]["ports"][0]["port"], "metrics");
    assert!(policy["spec"]["ingress"][0]["from"].is_sequence());

    let pc = render(&["priorityClassName=system-node-critical"]);
    assert_eq!(
        only(&pc, "DaemonSet")["spec"]["template"]["spec"]["priorityClassName"],
        "system-node-critical"
    );
    assert!(!kinds(&render(&["prometheusRule.enabled=false"])).contains("PrometheusRule"));
    assert!(!kinds(&render(&["dashboards.enabled=false"])).contains("ConfigMap"));
    let ns = render(&["dashboards.namespace=grafana"]);
    for cm in ns.iter().filter(|d| d["kind"] == "ConfigMap") {
        assert_eq!(cm["metadata"]["namespace"], "grafana");
    }
    let no_rbac = render(&["rbac.create=false", "serviceAccount.create=false"]);
    assert!(!kinds(&no_rbac).contains("ClusterRole"));
    assert!(!kinds(&no_rbac).contains("ServiceAccount"));
    let hn = render(&["hostNetwork=true"]);
    let spec = &only(&hn, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet");

    let labels = render(&["agent.ownerLabels=true", "agent.podLabels={app,team}"]);
    let a = args(&labels);
    assert!(a.contains(&"--owner-labels".to_owned()), "{a:?}");
    assert!(a.contains(&"--pod-labels=app,team".to_owned()), "{a:?}");
    assert!(!a.contains(&"--wait-histogram".to_owned()), "{a:?}");
    let hist = args(&render(&["agent.waitHistogram=true"]));
    assert!(hist.contains(&"--wait-histogram".to_owned()), "{hist:?}");
}

#[test]
fn bad_values_are_refused_with_a_clear_message() {
    for (sets, says) in [
        (&["securityMode=root"][..], "securityMode must be"),
        (&["monitor.kind=Probe"][..], "monitor.kind must be"),
        (&["metrics.auth=basic"][..], "metrics.auth must be"),
        (
            &["agent.maxCgroups=5"][..],
            "agent.maxCgroups must be between",
        ),
        (
            &["service.enabled=false", "monitor.kind=ServiceMonitor"][..],
            "monitor.kind=ServiceMonitor needs service.enabled=true",
        ),
        (
            &["prometheusRule.enabled=yes"][..],
            "prometheusRule.enabled must be auto, true or false",
        ),
    ] {
        let err = template(sets).expect_err("helm accepted bad values");
        assert!(err.contains(says), "{sets:?}: {err}");
    }
}

/// The PrometheusRule's `spec`, rendered by helm with `sets`, as a Prometheus
/// rule file in `dir`.
/// Every alert group is evaluated at `alerts.interval`; a release upgraded
/// with `--reuse-values` from a chart without the value (0.1.0) gets the 30s
/// the rules' timing assumes, not an empty `interval` (which Prometheus would
/// read as its global one).
#[test]
fn alert_groups_evaluate_at_alerts_interval() {
    let intervals = |sets: &[&str]| -> Vec<(String, Option<String>)> {
        let docs = render(sets);
        only(&docs, "PrometheusRule")["spec"]["groups"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter(|g| g["name"].as_str().unwrap().ends_with(".alerts"))
            .map(|g| {
                (
                    g["name"].as_str().unwrap().to_owned(),
                    g["interval"].as_str().map(str::to_owned),
                )
            })
            .collect()
    };
    for (sets, want) in [
        (&["alerts.interval=20s"][..], "20s"),
        (&[][..], "30s"),
        (&["alerts.interval=null"][..], "30s"),
    ] {
        let got = intervals(sets);
        assert_eq!(got.len(), 3, "{sets:?}: {got:?}");
        for (name, interval) in &got {
            assert_eq!(interval.as_deref(), Some(want), "{sets:?}: group {name}");
        }
    }
}

fn rendered_rules(dir: &Path, sets: &[&str]) -> PathBuf {
    let docs = render(sets);
    let spec = &only(&docs, "PrometheusRule")["spec"];
    let file = dir.join("rendered-rules.yaml");
    fs::write(&file, serde_yaml_ng::to_string(spec).unwrap()).unwrap();
    file
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new(tool("PODMETER_PROMTOOL"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("podmeter-chart-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let dir = scratch("rules");
    rendered_rules(&dir, &[]);
    let checked = promtool(&["check", "rules", "rendered-rules.yaml"], &dir);
    assert!(checked.contains("SUCCESS"), "{checked}");

    let tests: Vec<PathBuf> = fs::read_dir(repo().join("deploy/rules-tests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(!tests.is_empty(), "no promtool tests in deploy/rules-tests");
    let mut args = vec!["test".to_owned(), "rules".to_owned()];
    for t in &tests {
        let name = t.file_name().unwrap();
        fs::copy(t, dir.join(name)).unwrap();
        args.push(name.to_string_lossy().into_owned());
    }
    let out = promtool(&args.iter().map(String::as_str).collect::<Vec<_>>(), &dir);
    println!("{out}");

    // Every alert the chart ships is exercised by some unit test.
    let rules: Value =
        serde_yaml_ng::from_str(&fs::read_to_string(dir.join("rendered-rules.yaml")).unwrap())
            .unwrap();
    let tested: String = tests
        .iter()
        .map(|t| fs::read_to_string(t).unwrap())
        .collect();
    let mut alerts = 0;
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            if let Some(alert) = rule["alert"].as_str() {
                alerts += 1;
                assert!(
                    tested.contains(&format!("alertname: {alert}")),
                    "alert {alert} has no promtool test"
                );
                for key in ["summary", "description", "runbook"] {
                    assert!(
                        rule["annotations"][key]
                            .as_str()
                            .is_some_and(|s| !s.is_empty()),
                        "alert {alert} lacks the {key} annotation"
                    );
                }
                assert!(rule["labels"]["severity"].is_string(), "{alert}: severity");
            }
        }
    }
    assert!(
        alerts >= 12,
        "expected the twelve documented alerts, found {alerts}"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn alert_thresholds_and_runbook_urls_come_from_values() {
    let dir = scratch("values");
    let file = rendered_rules(
        &dir,
        &[
            "alerts.cpuSaturationRatio=0.77",
            "alerts.for=45s",
            "alerts.runbookBaseURL=https://runbooks.example/podmeter/",
            "alerts.cpuStarvedWaitRatio=0.61",
            "alerts.cpuStarvedFor=7m",
            "alerts.memoryNearLimitRatio=0.83",
            "alerts.tcpRetransmitMinPerSecond=13",
        ],
    );
    let text = fs::read_to_string(&file).unwrap();
    assert!(text.contains("0.77"), "{text}");
    assert!(text.contains("45s"), "{text}");
    for set in ["> 0.61", "for: 7m", "> 0.83", "> 13"] {
        assert!(text.contains(set), "{set}: {text}");
    }
    assert!(
        text.contains("https://runbooks.example/podmeter/PodmeterPodTCPRetransmits"),
        "{text}"
    );
    assert!(
        text.contains("https://runbooks.example/podmeter/PodmeterContainerCPUSaturated"),
        "{text}"
    );
    promtool(&["check", "rules", "rendered-rules.yaml"], &dir);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn dashboards_are_grafana_json_with_node_namespace_pod_variables() {
    let dir = chart().join("files/dashboards");
    let mut uids = BTreeSet::new();
    let mut count = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let d: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        count += 1;
        assert!(
            uids.insert(d["uid"].as_str().unwrap().to_owned()),
            "duplicate uid"
        );
        assert!(d["schemaVersion"].as_u64().unwrap() >= 39);
        let vars: BTreeSet<&str> = d["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        for v in ["datasource", "node", "namespace"] {
            assert!(vars.contains(v), "{}: no ${v} variable", path.display());
        }
        let exprs = podmeter_test_support::dashboard::exprs(&d);
        assert!(!exprs.is_empty(), "{}: no queries", path.display());
        for (panel, expr) in exprs {
            assert!(expr.contains("podmeter"), "{panel}: {expr}");
        }
    }
    assert!(count >= 1, "no dashboards in {}", dir.display());
}

/// The metric names (`podmeter_…`, `podmeter:…`) a PromQL query reads.
fn metric_names(query: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let b = query.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut i = 0;
    while let Some(at) = query[i..].find("podmeter") {
        let start = i + at;
        let mut end = start;
        while end < b.len() && word(b[end]) {
            end += 1;
        }
        if start == 0 || !word(b[start - 1]) {
            names.insert(query[start..end].to_owned());
        }
        i = end.max(start + 1);
    }
    names
}

/// Every dashboard query, with Grafana's variables set to "All", parses and
/// returns data in promtool from one synthetic series of each family it
/// reads. The end-to-end test runs them against a real agent; this catches
/// a broken query (syntax, a join that matches nothing) without a cluster,
/// also for families a healthy cluster has no series of.
#[test]
fn dashboard_queries_return_data_from_every_family_they_read() {
    let dir = scratch("dashboards");
    let mut families = BTreeSet::new();
    let mut queries = Vec::new();
    for entry in fs::read_dir(chart().join("files/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let d: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let vars: Vec<&str> = d["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        for (_, expr) in podmeter_test_support::dashboard::exprs(&d) {
            let q = podmeter_test_support::dashboard::substitute(&expr, &vars, "1m", "30s");
            families.extend(metric_names(&q));
            queries.push(q);
        }
    }
    // Every label a query matches on, non-empty (container_id!="" keeps
    // it); counters and gauges alike rise by 10 per 30 s scrape.
    let labels = r#"job="podmeter", node="node-a", namespace="shop", pod="api-0", pod_uid="u-api", container="api", container_id="c-api", cgroup="/system.slice/x.service""#;
    let mut test = String::from(
        "rule_files: []\nevaluation_interval: 30s\ntests:\n  - interval: 30s\n    input_series:\n",
    );
    for f in &families {
        test += &format!("      - series: '{f}{{{labels}}}'\n        values: '1+10x40'\n");
    }
    test += "    promql_expr_test:\n";
    for q in &queries {
        let expr = format!("count({q}) > bool 0").replace('\'', "''");
        test += &format!(
            "      - expr: '{expr}'\n        eval_time: 15m\n        exp_samples:\n          - labels: '{{}}'\n            value: 1\n"
        );
    }
    fs::write(dir.join("dashboards-test.yaml"), test).unwrap();
    assert!(queries.len() >= 50, "{} dashboard queries", queries.len());
    assert!(
        families.contains("podmeter_container_cpu_wait_seconds_total"),
        "{families:?}"
    );
    promtool(&["test", "rules", "dashboards-test.yaml"], &dir);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn plain_manifests_are_the_chart_rendered() {
    let committed = fs::read_to_string(repo().join("deploy/manifests/podmeter.yaml")).unwrap();
    // The header names the values it was rendered with.
    let values: Vec<&str> = committed
        .lines()
        .nth(1)
        .and_then(|l| l.split_once(" with "))
        .map(|(_, v)| v.trim_end_matches('.').split(", ").collect())
        .expect("generated header");
    let mut c = Command::new(tool("PODMETER_HELM"));
    c.args(["template", "podmeter"])
        .arg(chart())
        .args(["--namespace", "podmeter"]);
    for v in &values {
        c.args(["--set", v]);
    }
    let out = c.output().unwrap();
    assert!(out.status.success());
    let rendered = String::from_utf8(out.stdout).unwrap();
    assert!(
        committed.ends_with(&rendered),
        "deploy/manifests/podmeter.yaml is stale: run `cargo xtask manifests`"
    );
    assert!(!rendered.contains("ServiceMonitor") && !rendered.contains("PrometheusRule"));
}

/// `helm test`'s objects: its pod (the one hook) and the account and roles
/// it runs with, all named `pm-podmeter-test`.
fn test_hooks(sets: &[&str]) -> Vec<Value> {
    helm_template(OPERATOR, sets)
        .unwrap_or_else(|e| panic!("helm template {sets:?} failed: {e}"))
        .into_iter()
        .filter(|v| v["metadata"]["name"] == "pm-podmeter-test")
        .collect()
}

#[test]
fn helm_test_probes_every_agent_with_an_account_allowed_to_read_metrics() {
    let docs = test_hooks(&[]);
    let probe = only(&docs, "Pod");
    let c = &probe["spec"]["containers"][0];
    let a: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        a,
        [
            "probe",
            "--namespace=monitoring",
            "--daemonset=pm-podmeter",
            "--port=9740",
            "--timeout=2m"
        ]
    );
    assert_eq!(c["image"], "localhost/podmeter:dev");
    assert_eq!(probe["spec"]["serviceAccountName"], "pm-podmeter-test");
    assert_eq!(probe["spec"]["restartPolicy"], "Never");
    // The DaemonSet's selector must not match it (it would delete it).
    let install = render(&[]);
    let selector = &only(&install, "DaemonSet")["spec"]["selector"]["matchLabels"];
    let labels = &probe["metadata"]["labels"];
    assert!(
        selector
            .as_mapping()
            .unwrap()
            .iter()
            .any(|(k, v)| &labels[k.as_str().unwrap()] != v),
        "the agents' selector {selector:?} matches the test pod's labels {labels:?}"
    );
    let metrics = only(&docs, "ClusterRole");
    assert_eq!(metrics["rules"][0]["nonResourceURLs"][0], "/metrics");
    let role = only(&docs, "Role");
    assert_eq!(role["rules"][0]["resourceNames"][0], "pm-podmeter");
    // Plain HTTP and a Prometheus to ask.
    let plain = test_hooks(&["metrics.auth=none", "test.prometheusURL=http://prom:9090"]);
    let a =
        serde_yaml_ng::to_string(&only(&plain, "Pod")["spec"]["containers"][0]["args"]).unwrap();
    assert!(
        a.contains("--plain-http") && a.contains("--prometheus=http://prom:9090"),
        "{a}"
    );
    assert!(
        !kinds(&plain).contains("ClusterRole"),
        "no /metrics role without auth"
    );
    assert!(test_hooks(&["test.enabled=false"]).is_empty());
    // `helm upgrade --reuse-values` from a chart without `test` values (0.1.0)
    // renders without them: the upgraded release still tests itself.
    let reused = test_hooks(&["test=null"]);
    assert_eq!(
        only(&reused, "Pod")["spec"]["containers"][0]["args"],
        probe["spec"]["containers"][0]["args"]
    );
    assert_eq!(kinds(&reused), kinds(&docs));
    assert!(test_hooks(&["rbac.create=false", "serviceAccount.create=false"]).is_empty());
    // The pod is the hook: it runs at `helm test`, not at install.
    assert_eq!(
        probe["metadata"]["annotations"]["helm.sh/hook"], "test",
        "{probe:?}"
    );
}

/// The chart here is the next release's: its version and appVersion are
/// the workspace's (which `cargo xtask release` publishes, and which the
/// upgrade e2e expects on the upgraded DaemonSet), and newer than the
/// previous release the upgrade e2e starts from.
#[test]
fn chart_version_is_the_workspace_version_after_the_previous_release() {
    let meta: Value =
        serde_yaml_ng::from_str(&fs::read_to_string(chart().join("Chart.yaml")).unwrap()).unwrap();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(meta["version"], version);
    assert_eq!(meta["appVersion"], version);
    let previous = repo().join("tests/fixtures/podmeter-0.1.0.tgz");
    assert!(previous.exists(), "{}", previous.display());
    let parse = |v: &str| -> Vec<u32> { v.split('.').map(|n| n.parse().unwrap()).collect() };
    assert!(
        parse(version) > parse("0.1.0"),
        "{version} is not past the previous release, 0.1.0"
    );
}
