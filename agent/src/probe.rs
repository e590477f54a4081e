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
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes API (probe runs in a pod, or with a kubeconfig)")?;
    let deadline = Instant::now() + o.timeout;
    loop {
        match round(&client, o).await {
            Ok(seen) => return Ok(seen),
            Err(e) if Instant::now() < deadline => {
                tracing::info!("not yet: {e:#}");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Err(e) => return Err(e.context(format!("still failing after {:?}", o.timeout))),
        }
    }
}

async fn round(client: &kube::Client, o: &Options) -> anyhow::Result<String> {
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
    let token = std::fs::read_to_string(TOKEN)
        .with_context(|| format!("{TOKEN}: the probe's service account token"))?;
    for (name, node, ip) in &agents {
        let (code, body) = get(o.https, ip, o.port, "/metrics", Some(token.trim()))
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
    if let Some(url) = &o.prometheus {
        let up = prometheus_up(url).await?;
        let down: Vec<&String> = up.iter().filter(|(_, v)| !v).map(|(i, _)| i).collect();
        if up.len() < agents.len() || !down.is_empty() {
            bail!(
                "Prometheus at {url} has {} podmeter targets for {} agents; down: {down:?}",
                up.len(),
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

/// `up{job="podmeter"}` per instance: true when 1.
async fn prometheus_up(url: &str) -> anyhow::Result<Vec<(String, bool)>> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("--prometheus {url:?}: only http:// URLs"))?;
    let authority = rest.trim_end_matches('/');
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse()
                .with_context(|| format!("--prometheus {url:?}: port"))?,
        ),
        None => (authority, 80),
    };
    let (code, body) = get(
        false,
        host,
        port,
        "/api/v1/query?query=up%7Bjob%3D%22podmeter%22%7D",
        None,
    )
    .await
    .with_context(|| format!("querying Prometheus at {url}"))?;
    if code != 200 {
        bail!("Prometheus at {url} answered {code}: {body}");
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

/// One GET over a fresh connection: status and body.
async fn get(
    https: bool,
    host: &str,
    port: u16,
    path: &str,
    bearer: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut req = Request::get(path).header(hyper::header::HOST, format!("{host}:{port}"));
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
