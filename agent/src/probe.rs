//! `podmeter probe`: what the chart's `helm test` pod runs (the agent's own
//! image, so a test needs no other). From inside the cluster it checks what
//! a user would check by hand after an install:
//!
//! 1. the DaemonSet has an agent on every node it should, each one ready;
//! 2. each agent serves `/metrics` to a service account allowed to read it
//!    (its own token, the way Prometheus scrapes), with podmeter's series;
//! 3. given a Prometheus, that it has every agent as an `up` target of job
//!    `podmeter`.
//!
//! Agents may still be rolling when the test starts, so a failed round is
//! retried until `--timeout`; the error is the last round's, naming the
//! pod and node that failed.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Pod};
use kube::{Api, api::ListParams};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;

/// Where a pod's service account token is mounted.
const TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// A series every agent exports.
const BUILD_INFO: &str = "podmeter_build_info";
/// At most this long for one round (API calls included).
const ROUND: Duration = Duration::from_secs(30);

/// What to probe.
#[derive(Debug, Clone)]
pub struct Options {
    pub namespace: String,
    pub daemonset: String,
    pub port: u16,
    /// The agents speak HTTPS (`--auth=kubernetes` or a web config).
    pub https: bool,
    /// A Prometheus base URL (`http://host:port`) to ask for `up`.
    pub prometheus: Option<String>,
    pub timeout: Duration,
}

/// Probes until everything holds or `timeout` passes; what it saw.
pub async fn run(o: &Options) -> anyhow::Result<String> {
    // A bad URL is not worth retrying.
    let prometheus = o.prometheus.as_deref().map(Prometheus::parse).transpose()?;
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes API (probe runs in a pod, or with a kubeconfig)")?;
    let deadline = Instant::now() + o.timeout;
    loop {
        let attempt = tokio::time::timeout(ROUND, round(&client, o, prometheus.as_ref()));
        let result = attempt
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("a round of checks took over {ROUND:?}")));
        match result {
            Ok(seen) => return Ok(seen),
            Err(e) if Instant::now() < deadline => {
                tracing::info!("not yet: {e:#}");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Err(e) => return Err(e.context(format!("still failing after {:?}", o.timeout))),
        }
    }
}

async fn round(
    client: &kube::Client,
    o: &Options,
    prometheus: Option<&Prometheus>,
) -> anyhow::Result<String> {
    let ds = Api::<DaemonSet>::namespaced(client.clone(), &o.namespace)
        .get(&o.daemonset)
        .await
        .with_context(|| format!("DaemonSet {}/{}", o.namespace, o.daemonset))?;
    let status = ds.status.unwrap_or_default();
    let desired = usize::try_from(status.desired_number_scheduled).unwrap_or(0);
    if desired == 0 {
        bail!("DaemonSet {} schedules no agent on any node", o.daemonset);
    }
    let selector = ds
        .spec
        .and_then(|s| s.selector.match_labels)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods = Api::<Pod>::namespaced(client.clone(), &o.namespace)
        .list(&ListParams::default().labels(&selector))
        .await
        .context("listing the agent pods")?;
    let mut agents = Vec::new();
    for p in pods.items {
        let name = p.metadata.name.clone().unwrap_or_default();
        let spec = p.spec.unwrap_or_default();
        let node = spec.node_name.unwrap_or_else(|| "(unscheduled)".into());
        let st = p.status.unwrap_or_default();
        let ready = st
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        match (ready, st.pod_ip) {
            (true, Some(ip)) => agents.push((name, node, ip)),
            _ => bail!(
                "agent {name} on node {node} is not ready (phase {})",
                st.phase.unwrap_or_default()
            ),
        }
    }
    if agents.len() < desired {
        bail!(
            "{} of the {desired} agents the DaemonSet wants exist and are ready",
            agents.len()
        );
    }
    // Over HTTPS only: a plain-HTTP agent checks no token, and a token is
    // not for the wire in the clear.
    let token = if o.https {
        Some(
            std::fs::read_to_string(TOKEN)
                .with_context(|| format!("{TOKEN}: the probe's service account token"))?,
        )
    } else {
        None
    };
    for (name, node, ip) in &agents {
        let (code, body) = get(o.https, ip, o.port, "/metrics", token.as_deref().map(str::trim))
            .await
            .with_context(|| format!("agent {name} on node {node} ({ip}:{})", o.port))?;
        if code != 200 || !body.contains(BUILD_INFO) {
            bail!(
                "agent {name} on node {node}: GET /metrics answered {code}: {}",
                body.lines().next().unwrap_or("")
            );
        }
    }
    let mut seen = format!(
        "{} agents ready and serving /metrics: {}",
        agents.len(),
        agents
            .iter()
            .map(|(_, node, _)| node.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(p) = prometheus {
        let up = p.up(&o.namespace).await?;
        let down: Vec<&String> = up.iter().filter(|(_, v)| !v).map(|(i, _)| i).collect();
        if up.len() < agents.len() || !down.is_empty() {
            bail!(
                "Prometheus at {} has {} podmeter targets in namespace {} for {} agents; down: {down:?}",
                p.url,
                up.len(),
                o.namespace,
                agents.len()
            );
        }
        seen.push_str(&format!(
            "; Prometheus has all {} up (job=\"podmeter\")",
            up.len()
        ));
    }
    Ok(seen)
}

/// A Prometheus HTTP API base: `http://host[:port][/path]`.
#[derive(Debug)]
struct Prometheus {
    url: String,
    host: String,
    port: u16,
    path: String,
}

impl Prometheus {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: hyper::Uri = url
            .parse()
            .with_context(|| format!("--prometheus {url:?} is not a URL"))?;
        if uri.scheme_str() != Some("http") {
            bail!("--prometheus {url:?}: only http:// URLs (Prometheus inside the cluster)");
        }
        let host = uri
            .host()
            .with_context(|| format!("--prometheus {url:?} has no host"))?;
        Ok(Self {
            url: url.to_owned(),
            // `[::1]` as a URI host; a bare address to connect to.
            host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
            port: uri.port_u16().unwrap_or(80),
            path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// `up{job="podmeter",namespace=<namespace>}` per instance: true when 1.
    async fn up(&self, namespace: &str) -> anyhow::Result<Vec<(String, bool)>> {
        let query = format!("up{{job=\"podmeter\",namespace=\"{namespace}\"}}");
        let path = format!("{}/api/v1/query?query={}", self.path, percent_encode(&query));
        let (code, body) = get(false, &self.host, self.port, &path, None)
            .await
            .with_context(|| format!("querying Prometheus at {}", self.url))?;
        if code != 200 {
            bail!("Prometheus at {} answered {code}: {body}", self.url);
        }
        let v: serde_json::Value = serde_json::from_str(&body).context("Prometheus' answer")?;
        Ok(v["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                (
                    r["metric"]["instance"].as_str().unwrap_or("?").to_owned(),
                    r["value"][1] == "1",
                )
            })
            .collect())
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One GET over a fresh connection: status and body.
async fn get(
    https: bool,
    host: &str,
    port: u16,
    path: &str,
    bearer: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut req = Request::get(path).header(hyper::header::HOST, authority);
    if let Some(t) = bearer {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Empty::<Bytes>::new())?;
    let fetch = async {
        let tcp = TcpStream::connect((host, port)).await?;
        if https {
            let config = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
                .with_no_client_auth();
            let name = ServerName::try_from(host.to_owned())?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await?;
            send(TokioIo::new(tls), req).await
        } else {
            send(TokioIo::new(tcp), req).await
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .context("no answer in 10 s")?
}

async fn send<T>(io: T, req: Request<Empty<Bytes>>) -> anyhow::Result<(u16, String)>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let code = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Each agent makes its own self-signed certificate at start (there is no
/// CA to check against), as Prometheus' `insecureSkipVerify` accepts; the
/// handshake's signatures are still verified, and the bearer token is what
/// the agent checks.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_urls_keep_their_path_and_refuse_what_cannot_work() {
        let p = Prometheus::parse("http://prometheus-operated.monitoring.svc:9090/prom/").unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.path.as_str()),
            ("prometheus-operated.monitoring.svc", 9090, "/prom")
        );
        let p = Prometheus::parse("http://[fd00::1]:9090").unwrap();
        assert_eq!((p.host.as_str(), p.port, p.path.as_str()), ("fd00::1", 9090, ""));
        assert_eq!(Prometheus::parse("http://10.0.0.1").unwrap().port, 80);
        for bad in ["https://p:9090", "p:9090", "http://", ""] {
            assert!(Prometheus::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(
            percent_encode("up{job=\"podmeter\",namespace=\"a-b\"}"),
            "up%7Bjob%3D%22podmeter%22%2Cnamespace%3D%22a-b%22%7D"
        );
    }
}
