//! `--web-config-file` on the host: HTTPS from a certificate file that is
//! rotated while the agent runs, basic authentication with bcrypt hashes,
//! plain HTTP refused on the HTTPS port, the probes left open; and the
//! loopback-only default.
//!
//! Certificates come from the real `openssl`, requests from the real
//! `curl`, so the TLS the agent speaks is checked by other implementations.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use podmeter_test_support::{Agent, curl};

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("podmeter-web-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Self(d)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A self-signed certificate for 127.0.0.1 (its own CA for curl) and its
/// key, written to `cert` and `key`; returns its SHA-256 fingerprint.
fn certificate(cert: &Path, key: &Path, cn: &str) -> String {
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", &format!("/CN={cn}")])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    fingerprint_of_file(cert)
}

fn fingerprint_of_file(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The fingerprint of the certificate the server at `port` presents now.
fn served_fingerprint(port: u16) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn https_from_a_certificate_file_rotated_while_running() {
    let d = Scratch::new("tls");
    let (cert, key) = (d.path("tls.crt"), d.path("tls.key"));
    let first = certificate(&cert, &key, "first");
    // Relative paths are taken from the config file's directory.
    fs::write(
        d.path("web.yml"),
        "tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\n",
    )
    .unwrap();
    let agent = Agent::start(&[&format!(
        "--web-config-file={}",
        d.path("web.yml").display()
    )]);
    assert!(agent.log().contains("serving https://"), "{}", agent.log());
    let ca = cert.to_str().unwrap().to_owned();
    let (code, body) = curl(&agent.url("https", "/metrics"), &["--cacert", &ca]).unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("podmeter_build_info"), "{body}");
    assert_eq!(served_fingerprint(agent.port), first);

    // Plain HTTP on the HTTPS port: a status that says why.
    let (code, body) = curl(&agent.url("http", "/metrics"), &[]).unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("HTTPS only"), "{body}");

    // Rotation: new files in place (as a Secret volume update or certbot
    // does); the next handshake presents the new certificate.
    let (c2, k2) = (d.path("new.crt"), d.path("new.key"));
    let second = certificate(&c2, &k2, "second");
    assert_ne!(first, second);
    fs::rename(&k2, &key).unwrap();
    fs::rename(&c2, &cert).unwrap();
    assert_eq!(served_fingerprint(agent.port), second);
    let (code, _) = curl(&agent.url("https", "/metrics"), &["--cacert", &ca]).unwrap();
    assert_eq!(code, 200, "with the new certificate as the CA");
    assert!(
        agent.log().contains("TLS certificate reloaded"),
        "{}",
        agent.log()
    );

    // A broken rotation (a key that is not the certificate's) keeps the
    // last good pair.
    let (c3, k3) = (d.path("third.crt"), d.path("third.key"));
    certificate(&c3, &k3, "third");
    fs::rename(&k3, &key).unwrap();
    assert_eq!(served_fingerprint(agent.port), second);
    assert!(
        agent
            .log()
            .contains("still serving the previous certificate"),
        "{}",
        agent.log()
    );
}

#[test]
fn basic_authentication_with_bcrypt_hashes() {
    let d = Scratch::new("auth");
    let (cert, key) = (d.path("tls.crt"), d.path("tls.key"));
    certificate(&cert, &key, "auth");
    let hash = bcrypt::hash("s3cret pass", 6).unwrap();
    fs::write(
        d.path("web.yml"),
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  prometheus: '{hash}'\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let agent = Agent::start(&[&format!(
        "--web-config-file={}",
        d.path("web.yml").display()
    )]);
    let ca = cert.to_str().unwrap().to_owned();
    let get = |path: &str, extra: &[&str]| {
        let mut args = vec!["--cacert", &ca];
        args.extend_from_slice(extra);
        curl(&agent.url("https", path), &args).unwrap().0
    };
    assert_eq!(get("/metrics", &[]), 401, "no credentials");
    assert_eq!(get("/metrics", &["-u", "prometheus:wrong"]), 401);
    assert_eq!(get("/metrics", &["-u", "nobody:s3cret pass"]), 401);
    assert_eq!(get("/metrics", &["-u", "prometheus:s3cret pass"]), 200);
    assert_eq!(get("/", &[]), 401, "every page but the probes");
    // The kubelet's probes carry no credentials.
    assert_eq!(get("/healthz", &[]), 200);
    assert_eq!(get("/readyz", &[]), 200);
}

#[test]
fn a_bad_web_config_is_refused_in_one_line() {
    let d = Scratch::new("bad");
    fs::write(
        d.path("web.yml"),
        "basic_auth_users:\n  prometheus: hunter2\n",
    )
    .unwrap();
    let out = Command::new(podmeter_test_support::podmeter_bin())
        .arg(format!("--web-config-file={}", d.path("web.yml").display()))
        .arg("--no-pin")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("podmeter: error: --web-config-file")
            && lines[0].contains("is not a bcrypt hash"),
        "{err}"
    );
}

#[test]
fn plain_podmeter_listens_on_loopback_only() {
    // The default address, as a user starting it by hand gets it.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Killed(
        Command::new(podmeter_test_support::podmeter_bin())
            .args(["--no-pin", "--no-kubernetes"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    podmeter_test_support::poll(
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(200),
        "podmeter on 127.0.0.1:9740",
        || (curl("http://127.0.0.1:9740/readyz", &[]).ok()?.0 == 200).then_some(()),
    );
    // Any other address of this host: nothing listens there.
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let other = text
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .map(str::to_owned);
    let refused = other
        .as_deref()
        .map(|ip| curl(&format!("http://{ip}:9740/readyz"), &[]));
    drop(child);
    let ip = other.expect("a non-loopback IPv4 address on this host");
    let e = refused.unwrap().unwrap_err();
    assert!(
        e.contains("Couldn't connect") || e.contains("refused"),
        "{ip}: {e}"
    );
}
