//! `--web-config-file`: TLS and basic authentication for the HTTP
//! endpoints, in the format of the Prometheus exporter-toolkit (what
//! node-exporter reads with `--web.config.file`), so a host's existing file
//! works as it is:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: /etc/podmeter/tls.crt   # relative paths: from this file's directory
//!   key_file: /etc/podmeter/tls.key
//! basic_auth_users:
//!   prometheus: $2y$10$...             # bcrypt hashes (htpasswd -nB)
//! ```
//!
//! The certificate and key are re-read when either file changes (checked at
//! each handshake: two `stat`s), so a rotation needs no restart; a pair that
//! does not load (a half-written rotation) keeps the previous one, with a
//! warning. `/healthz` and `/readyz` stay open for the kubelet's probes.
//! Settings podmeter does not implement (client certificates, cipher and
//! version choices, HTTP headers) are refused rather than ignored. TLS is
//! rustls, the hashes are checked by the `bcrypt` crate: no crypto here.

use std::{
    collections::{HashMap, VecDeque},
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde::Deserialize;

/// The file, as exporter-toolkit writes it (the parts podmeter serves).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    basic_auth_users: Option<HashMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
}

/// What the HTTP server enforces.
pub struct Web {
    /// HTTPS only, when set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Basic authentication for everything but the probes, when set.
    pub auth: Option<Arc<BasicAuth>>,
}

impl Web {
    /// Reads and checks `path`: the certificate and key load, every hash is
    /// bcrypt. One line saying what is wrong otherwise.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file: File = serde_yaml_ng::from_str(&text)
            .map_err(|e| format!("{}: {}", path.display(), e.to_string().replace('\n', " ")))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let tls = match file.tls_server_config {
            Some(t) => {
                let resolver = Reloading::new(dir.join(&t.cert_file), dir.join(&t.key_file))?;
                let mut config = ServerConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(resolver));
                // HTTP/1.1 only, as over plain TCP.
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
            }
            None => None,
        };
        let auth = match file.basic_auth_users {
            Some(users) if users.is_empty() => None,
            Some(users) => {
                for (user, hash) in &users {
                    if hash.parse::<bcrypt::HashParts>().is_err() {
                        return Err(format!(
                            "{}: basic_auth_users.{user} is not a bcrypt hash (make one with `htpasswd -nBC 10 {user}`)",
                            path.display()
                        ));
                    }
                }
                Some(Arc::new(BasicAuth::new(users)))
            }
            None => None,
        };
        if tls.is_none() && auth.is_none() {
            return Err(format!(
                "{}: neither tls_server_config nor basic_auth_users: nothing to enforce",
                path.display()
            ));
        }
        if tls.is_none() {
            tracing::warn!(
                "basic authentication without tls_server_config: passwords cross the network in clear text"
            );
        }
        Ok(Self { tls, auth })
    }
}

/// HTTPS with a certificate made at start for `names` (self-signed, as
/// kube-rbac-proxy does when given none): returns the acceptor and the
/// certificate's SHA-256 fingerprint, for the log.
pub fn self_signed(names: Vec<String>) -> Result<(tokio_rustls::TlsAcceptor, String), String> {
    let made = rcgen::generate_simple_self_signed(names)
        .map_err(|e| format!("making a self-signed certificate: {e}"))?;
    let cert = made.cert.der().clone();
    let fingerprint = ring::digest::digest(&ring::digest::SHA256, &cert)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    let key = PrivateKeyDer::Pkcs8(made.key_pair.serialize_der().into());
    let mut config = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .map_err(|e| format!("TLS: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(config)), fingerprint))
}

/// A certificate and key from files, re-read when either changes.
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<(Stamp, Arc<CertifiedKey>)>,
}

/// What tells a file changed: inode, size and modification time of both.
type Stamp = [(u64, u64, i64, i64); 2];

impl Reloading {
    fn new(cert: PathBuf, key: PathBuf) -> Result<Self, String> {
        let stamp = stamp(&cert, &key);
        let pair = load_pair(&cert, &key)?;
        Ok(Self {
            cert,
            key,
            current: Mutex::new((stamp, pair)),
        })
    }
}

impl std::fmt::Debug for Reloading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reloading({}, {})", self.cert.display(), self.key.display())
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let now = stamp(&self.cert, &self.key);
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.0 != now {
            // Said once per change: a pair that does not load is retried
            // when a file changes again.
            current.0 = now;
            match load_pair(&self.cert, &self.key) {
                Ok(pair) => {
                    current.1 = pair;
                    tracing::info!("TLS certificate reloaded from {}", self.cert.display());
                }
                Err(e) => tracing::warn!("{e}; still serving the previous certificate"),
            }
        }
        Some(current.1.clone())
    }
}

fn stamp(cert: &Path, key: &Path) -> Stamp {
    [cert, key].map(|p| {
        fs::metadata(p).map_or((0, 0, 0, 0), |m| {
            (m.ino(), m.size(), m.mtime(), m.mtime_nsec())
        })
    })
}

fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("TLS certificate {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "TLS certificate {}: no PEM certificate in it",
            cert.display()
        ));
    }
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("TLS key {}: {e}", key.display()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| format!("TLS key {}: {e}", key.display()))?;
    let pair = CertifiedKey::new(certs, signer);
    pair.keys_match().map_err(|e| {
        format!(
            "TLS key {} does not belong to certificate {} ({e})",
            key.display(),
            cert.display()
        )
    })?;
    Ok(Arc::new(pair))
}

/// Users and their bcrypt hashes; a few `Authorization` values already
/// proven right, so a scrape every 15 s does not pay a bcrypt check each
/// time. Only successes are remembered: a flood of wrong passwords grows
/// nothing, and each costs its sender a bcrypt check's time.
pub struct BasicAuth {
    users: HashMap<String, String>,
    /// Checked for unknown users, so a wrong name costs as long as a wrong
    /// password and names cannot be told apart by timing.
    dummy: String,
    proven: Mutex<VecDeque<String>>,
}

/// How many proven `Authorization` values are remembered.
const PROVEN: usize = 16;

impl BasicAuth {
    fn new(users: HashMap<String, String>) -> Self {
        let cost = users
            .values()
            .filter_map(|h| h.parse::<bcrypt::HashParts>().ok())
            .map(|p| p.get_cost())
            .max()
            .unwrap_or(bcrypt::DEFAULT_COST);
        let dummy = bcrypt::hash("not a password of anyone's", cost).unwrap_or_default();
        Self {
            users,
            dummy,
            proven: Mutex::new(VecDeque::new()),
        }
    }

    /// Whether an `Authorization` header value names a user with the right
    /// password. Runs bcrypt on a blocking thread.
    pub async fn allows(self: &Arc<Self>, header: Option<&str>) -> bool {
        let Some(header) = header else { return false };
        if self.lock().iter().any(|p| p == header) {
            return true;
        }
        let Some((user, password)) = decode(header) else {
            return false;
        };
        let hash = self
            .users
            .get(&user)
            .cloned()
            .unwrap_or_else(|| self.dummy.clone());
        let known = self.users.contains_key(&user);
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .is_ok_and(|r| r.unwrap_or(false))
            && known;
        if ok {
            let mut proven = self.lock();
            if proven.len() == PROVEN {
                proven.pop_front();
            }
            proven.push_back(header.to_owned());
        }
        ok
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<String>> {
        self.proven.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `Basic <base64 user:password>` → (user, password).
fn decode(header: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let b64 = header
        .strip_prefix("Basic ")
        .or_else(|| header.strip_prefix("basic "))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, text).unwrap();
        p
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pm-web-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn bad_files_are_refused_in_one_line() {
        let d = scratch("bad");
        let cases = [
            ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_ca_file: c\n", "unknown field `client_ca_file`"),
            ("basic_auth_users:\n  prometheus: hunter2\n", "is not a bcrypt hash"),
            ("{}\n", "nothing to enforce"),
            ("tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n", "missing.crt"),
            ("http_server_config:\n  headers: {}\n", "unknown field `http_server_config`"),
        ];
        for (i, (text, want)) in cases.iter().enumerate() {
            let p = write(&d, &format!("web{i}.yml"), text);
            let e = Web::load(&p).err().unwrap_or_default();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn basic_credentials_decode() {
        // "prometheus:s3cr:et"
        assert_eq!(
            decode("Basic cHJvbWV0aGV1czpzM2NyOmV0"),
            Some(("prometheus".into(), "s3cr:et".into()))
        );
        assert_eq!(decode("Bearer x"), None);
        assert_eq!(decode("Basic !!!"), None);
    }

    #[tokio::test]
    async fn only_the_right_password_of_a_known_user_passes() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = Arc::new(BasicAuth::new(HashMap::from([(
            "prometheus".to_owned(),
            hash,
        )])));
        use base64::Engine as _;
        let header = |u: &str, p: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        };
        assert!(!auth.allows(None).await);
        assert!(!auth.allows(Some(&header("prometheus", "wrong"))).await);
        assert!(!auth.allows(Some(&header("nobody", "s3cret"))).await);
        assert!(auth.allows(Some(&header("prometheus", "s3cret"))).await);
        // Remembered: and wrong ones never are.
        assert_eq!(auth.lock().len(), 1);
        for i in 0..100 {
            assert!(!auth.allows(Some(&header("prometheus", &i.to_string()))).await);
        }
        assert_eq!(auth.lock().len(), 1);
    }

    #[test]
    fn the_dummy_hash_costs_what_the_users_do() {
        let hash = bcrypt::hash("x", 5).unwrap();
        let auth = BasicAuth::new(HashMap::from([("u".to_owned(), hash)]));
        let parts: bcrypt::HashParts = auth.dummy.parse().unwrap();
        assert_eq!(parts.get_cost(), 5);
    }
}
