//! The HTTP endpoints: `/metrics`, `/healthz`, `/readyz`, served over
//! HTTP/1.1 with bounds (see [`Limits`]): a connection table that keeps at
//! most `max_connections` and makes room by closing the longest-idle one, a
//! header-read timeout that also ends idle keep-alive connections, a cap on
//! the request head, and a shutdown that gives in-flight requests a grace
//! period and then drops every connection.

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    pin::{Pin, pin},
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
    task::JoinSet,
    time::{Instant, sleep, sleep_until, timeout},
};
use tower_service::Service as _;
use tracing::{debug, info, warn};

use crate::{metrics::Exporter, tracker::Tracker};

/// What the handlers share.
#[derive(Clone)]
pub struct App {
    /// The metrics registry.
    pub exporter: Arc<Exporter>,
    /// For readiness.
    pub tracker: Arc<Tracker>,
    /// A cgroup scan older than this makes `/readyz` fail.
    pub max_scan_age: Duration,
    /// gzip for `/metrics`, with the last scrape's compressed families.
    pub gzip: Arc<crate::gzip::Gzip>,
}

/// Bounds on what clients can make the server hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections kept open at once. At the limit a new connection closes
    /// the one idle (no request in progress) the longest; when every one is
    /// busy the new one gets a 503 and is closed.
    pub max_connections: usize,
    /// Time a client has to send a complete request head, counted from the
    /// connection's start or from the end of its previous response: an idle
    /// keep-alive connection is closed after it too.
    pub header_timeout: Duration,
    /// The largest request head (request line and headers) read; a larger
    /// one gets 431. At least 8 KiB (hyper's minimum buffer).
    pub max_request_bytes: usize,
    /// After shutdown: how long in-flight requests may take before every
    /// connection is dropped.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 128,
            header_timeout: Duration::from_secs(10),
            max_request_bytes: 16 * 1024,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Serves until `shutdown` resolves, with [`Limits::default`], and TLS
/// and authentication as `web` says.
pub async fn serve(
    listener: TcpListener,
    app: App,
    guard: Guard,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_router(listener, router(app), Limits::default(), guard, shutdown).await
}

/// What a connection enforces: TLS, and authentication of every request
/// but the probes'.
#[derive(Clone, Default)]
pub struct Guard {
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub auth: Option<Auth>,
}

/// Who may read: users of a web config, or whom the Kubernetes API allows.
#[derive(Clone)]
pub enum Auth {
    Basic(Arc<crate::web::BasicAuth>),
    Kubernetes(Arc<crate::access::KubeAccess>),
}

/// Serves until `shutdown` resolves, then returns within
/// `limits.shutdown_grace` (plus scheduling): in-flight requests are
/// finished if they can be, and every connection is then dropped.
pub async fn serve_with(
    listener: TcpListener,
    app: App,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_router(listener, router(app), limits, Guard::default(), shutdown).await
}

fn router(app: App) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(app)
}

/// Connections being closed (evicted, or in the grace period) still hold a
/// descriptor; the accept loop stops accepting while this many more than
/// `max_connections` are open, until they are gone.
const EVICTION_SLACK: usize = 16;

/// What every connection task shares with the accept loop.
struct Shared {
    table: Mutex<Table<oneshot::Sender<()>>>,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, Table<oneshot::Sender<()>>> {
        // The table's invariants hold between calls: a panic elsewhere
        // leaves it usable.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn serve_router(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    guard: Guard,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let max = limits.max_connections.max(1);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_request_bytes.max(8192))
        .keep_alive(true);
    let shared = Arc::new(Shared {
        table: Mutex::new(Table::new(max)),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut shutdown = pin!(shutdown);

    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept(), if tasks.len() < max + EVICTION_SLACK => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors or memory, or the peer gone
                        // before accept: don't spin.
                        warn!("accepting a connection: {e}");
                        sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (evict_tx, evict_rx) = oneshot::channel();
                let admission = shared.table().admit(evict_tx);
                match admission {
                    Admission::Refused => {
                        debug!("{max} connections all busy: refusing one");
                        // Best effort, without waiting: the socket's send
                        // buffer is empty.
                        let _ = stream.try_write(BUSY);
                    }
                    Admission::Admitted { id, evicted } => {
                        if let Some(evict) = evicted {
                            let _ = evict.send(());
                        }
                        let _ = stream.set_nodelay(true);
                        tasks.spawn(connection(
                            stream,
                            id,
                            shared.clone(),
                            builder.clone(),
                            router.clone(),
                            limits,
                            guard.clone(),
                            evict_rx,
                            stop_rx.clone(),
                        ));
                    }
                }
            }
        }
    }

    drop(listener);
    let _ = stop_tx.send(true);
    let deadline = Instant::now() + limits.shutdown_grace;
    while !tasks.is_empty() {
        match timeout(
            deadline.saturating_duration_since(Instant::now()),
            tasks.join_next(),
        )
        .await
        {
            Ok(_) => {}
            Err(_) => {
                info!(
                    "shutdown: dropping {} connections still open after the {:?} grace period",
                    tasks.len(),
                    limits.shutdown_grace
                );
                break;
            }
        }
    }
    // Dropping the set aborts what is left.
    tasks.abort_all();
    Ok(())
}

const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: 21\r\n\r\ntoo many connections\n";

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The content type of a TLS handshake record: every TLS connection
/// starts with it.
const TLS_HANDSHAKE: u8 = 0x16;

const HTTP_TO_HTTPS: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: 55\r\n\r\nthis port speaks HTTPS only: use https:// for this URL\n";

const H2_REPLY: &[u8] = b"HTTP/1.1 505 HTTP Version Not Supported\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: 33\r\n\r\nthis server speaks HTTP/1.1 only\n";

/// Removes a connection from the table when its task ends, however it ends.
struct Registered {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.shared.table().remove(self.id);
    }
}

/// Marks a connection busy while a request is being answered.
struct Busy {
    shared: Arc<Shared>,
    id: u64,
}

impl Busy {
    fn new(shared: Arc<Shared>, id: u64) -> Self {
        shared.table().begin(id);
        Self { shared, id }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.shared.table().end(self.id);
    }
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    stream: TcpStream,
    id: u64,
    shared: Arc<Shared>,
    builder: http1::Builder,
    router: Router,
    limits: Limits,
    guard: Guard,
    mut evict: oneshot::Receiver<()>,
    mut stop: watch::Receiver<bool>,
) {
    let _registered = Registered {
        shared: shared.clone(),
        id,
    };
    // hyper closes a connection that opens with the HTTP/2 preface without a
    // word; say why instead. So too plain HTTP sent to the HTTPS port.
    // Before hyper has it, eviction and shutdown just close it.
    let sniffed = tokio::select! {
        sniffed = timeout(limits.header_timeout, sniff(&stream)) => sniffed,
        _ = &mut evict => return,
        _ = stop.changed() => return,
    };
    let first = match sniffed {
        Ok(Ok(Sniffed::H2)) if guard.tls.is_none() => {
            let _ = write_all(&stream, H2_REPLY).await;
            return;
        }
        Ok(Ok(Sniffed::H2 | Sniffed::Http1(_))) if guard.tls.is_some() => {
            let _ = write_all(&stream, HTTP_TO_HTTPS).await;
            return;
        }
        Ok(Ok(Sniffed::Http1(first) | Sniffed::Tls(first))) => first,
        Ok(Ok(Sniffed::H2)) | Ok(Err(_)) | Err(_) => return,
    };
    let stream = Prefixed {
        first,
        at: 0,
        inner: stream,
    };
    let auth = guard.auth.clone();
    let service = service_fn(move |req: hyper::Request<Incoming>| {
        let busy = Busy::new(shared.clone(), id);
        let router = router.clone();
        let auth = auth.clone();
        async move {
            let open = matches!(req.uri().path(), "/healthz" | "/readyz");
            let header = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let refused = match &auth {
                _ if open => None,
                None => None,
                Some(Auth::Basic(basic)) => {
                    (!basic.allows(header).await).then(|| refusal(Refusal::Basic))
                }
                Some(Auth::Kubernetes(kube)) => {
                    use crate::access::{Answer, Verdict};
                    match kube.check(header).await {
                        Answer::Verdict(Verdict::Allowed) => None,
                        Answer::Verdict(Verdict::Unauthenticated) => Some(refusal(Refusal::Bearer)),
                        Answer::Verdict(Verdict::Forbidden) => Some(refusal(Refusal::Forbidden)),
                        Answer::Unavailable(why) => Some(refusal(Refusal::Unavailable(why))),
                    }
                }
            };
            let response: Result<_, Infallible> = match refused {
                None => router.clone().call(req).await,
                Some(r) => Ok(r),
            };
            drop(busy);
            response
        }
    });
    match guard.tls {
        Some(tls) => {
            let handshake = tokio::select! {
                h = timeout(limits.header_timeout, tls.accept(stream)) => h,
                _ = &mut evict => return,
                _ = stop.changed() => return,
            };
            match handshake {
                Ok(Ok(tls)) => {
                    drive(TokioIo::new(tls), id, builder, service, limits, evict, stop).await;
                }
                Ok(Err(e)) => debug!("connection {id}: TLS handshake: {e}"),
                Err(_) => debug!("connection {id}: TLS handshake timed out"),
            }
        }
        None => drive(TokioIo::new(stream), id, builder, service, limits, evict, stop).await,
    }
}

/// Why a request is refused.
enum Refusal {
    Basic,
    Bearer,
    Forbidden,
    Unavailable(String),
}

/// The refusal's status, with the challenge a client answers and a line
/// that says what is missing.
fn refusal(r: Refusal) -> Response {
    match r {
        Refusal::Basic => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"podmeter\"")],
            "unauthorized: this endpoint needs the credentials of --web-config-file's basic_auth_users\n".to_owned(),
        )
            .into_response(),
        Refusal::Bearer => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"podmeter\"")],
            "unauthorized: this endpoint needs a Kubernetes bearer token (a service account's)\n".to_owned(),
        )
            .into_response(),
        Refusal::Forbidden => (
            StatusCode::FORBIDDEN,
            "forbidden: the token's user may not get the non-resource URL /metrics\n".to_owned(),
        )
            .into_response(),
        Refusal::Unavailable(why) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response()
        }
    }
}

/// Serves HTTP/1.1 on `io` until the client is done, or eviction or
/// shutdown close it after their grace period.
async fn drive<I, S>(
    io: I,
    id: u64,
    builder: http1::Builder,
    service: S,
    limits: Limits,
    mut evict: oneshot::Receiver<()>,
    mut stop: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming> + Send,
    S::Future: Send,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conn = pin!(builder.serve_connection(io, service));
    // Set when evicted: the connection closes itself after the grace period.
    let mut closing: Option<Instant> = None;
    let mut stopping = false;
    loop {
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    debug!("connection {id}: {e}");
                }
                return;
            }
            _ = &mut evict, if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(Instant::now() + limits.shutdown_grace);
            }
            // At shutdown the accept loop drops what is still open at the end
            // of the grace period (and says so): a timer here too would race
            // it to the same instant.
            _ = stop.changed(), if !stopping => {
                stopping = true;
                if closing.is_none() {
                    conn.as_mut().graceful_shutdown();
                }
            }
            () = sleep_until(closing.unwrap_or_else(Instant::now)), if closing.is_some() => return,
        }
    }
}

enum Sniffed {
    H2,
    Http1(Vec<u8>),
    /// A TLS handshake record's first byte.
    Tls(Vec<u8>),
}

/// Reads until the bytes so far cannot be the HTTP/2 preface, or are it,
/// or begin a TLS handshake.
async fn sniff(stream: &TcpStream) -> io::Result<Sniffed> {
    let mut first = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        stream.readable().await?;
        let n = match stream.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        first.extend_from_slice(&buf[..n]);
        if first.first() == Some(&TLS_HANDSHAKE) {
            return Ok(Sniffed::Tls(first));
        }
        let common = first.len().min(H2_PREFACE.len());
        if n == 0 || first[..common] != H2_PREFACE[..common] {
            return Ok(Sniffed::Http1(first));
        }
        if common == H2_PREFACE.len() {
            return Ok(Sniffed::H2);
        }
    }
}

async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A stream that first gives back the bytes already read from it.
struct Prefixed {
    first: Vec<u8>,
    at: usize,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.first.len() {
            let n = buf.remaining().min(self.first.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.first[at..at + n]);
            self.at += n;
            if self.at == self.first.len() {
                self.first = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Which connections are open, which are answering a request, and in what
/// order they last did something: the eviction policy, apart from sockets.
/// `T` is how a connection is told to close.
struct Table<T> {
    max: usize,
    /// A logical clock: ticks on every admission, request start and end.
    clock: u64,
    next_id: u64,
    entries: HashMap<u64, Entry<T>>,
}

struct Entry<T> {
    in_flight: usize,
    last: u64,
    /// `None` once told to close.
    close: Option<T>,
}

#[derive(Debug, PartialEq, Eq)]
enum Admission<T> {
    /// Keep the new connection, and close `evicted` to make room.
    Admitted { id: u64, evicted: Option<T> },
    /// Every kept connection is busy: close the new one.
    Refused,
}

impl<T> Table<T> {
    fn new(max: usize) -> Self {
        Self {
            max,
            clock: 0,
            next_id: 0,
            entries: HashMap::new(),
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Connections kept (not told to close).
    fn kept(&self) -> usize {
        self.entries.values().filter(|e| e.close.is_some()).count()
    }

    fn admit(&mut self, close: T) -> Admission<T> {
        let mut evicted = None;
        if self.kept() >= self.max {
            let victim = self
                .entries
                .iter_mut()
                .filter(|(_, e)| e.in_flight == 0 && e.close.is_some())
                .min_by_key(|(_, e)| e.last);
            match victim {
                Some((_, entry)) => evicted = entry.close.take(),
                None => return Admission::Refused,
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let last = self.tick();
        self.entries.insert(
            id,
            Entry {
                in_flight: 0,
                last,
                close: Some(close),
            },
        );
        Admission::Admitted { id, evicted }
    }

    fn begin(&mut self, id: u64) {
        let now = self.tick();
        if let Some(e) = self.entries.get_mut(&id) {
            e.in_flight += 1;
            e.last = now;
        }
    }

    fn end(&mut self, id: u64) {
        let now = self.tick();
        if let Some(e) = self.entries.get_mut(&id) {
            e.in_flight = e.in_flight.saturating_sub(1);
            e.last = now;
        }
    }

    fn remove(&mut self, id: u64) {
        self.entries.remove(&id);
    }
}

async fn index() -> impl IntoResponse {
    "podmeter: per-pod CPU, memory and network from eBPF\n\n/metrics  Prometheus metrics\n/healthz  liveness (scrapes and the background refresh make progress)\n/readyz   readiness (programs attached, cgroup scan fresh, pod names synced)\n"
}

async fn metrics(State(app): State<App>, headers: HeaderMap) -> Response {
    let gzip = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(accepts_gzip);
    // Map reads are syscalls, and compression is CPU work: keep both off
    // the async workers.
    let (exporter, compressor) = (app.exporter.clone(), app.gzip.clone());
    let body = tokio::task::spawn_blocking(move || -> io::Result<Body> {
        let families = exporter.render();
        if gzip {
            let (zipped, made) = compressor.compress_made(&families)?;
            tracing::debug!(
                pieces = made.pieces,
                reused = made.reused,
                ahead = made.ahead,
                threads = made.threads,
                bytes = zipped.len(),
                "gzip body made (reused: pieces kept from the last scrape or deflated ahead)"
            );
            Ok(Body::Gzip(zipped))
        } else {
            Ok(Body::Text(families))
        }
    })
    .await;
    match body {
        Ok(Ok(Body::Gzip(zipped))) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, prometheus::TEXT_FORMAT),
                (header::CONTENT_ENCODING, "gzip"),
                (header::VARY, "Accept-Encoding"),
            ],
            zipped,
        )
            .into_response(),
        Ok(Ok(Body::Text(families))) => {
            // The families go out one after another as they are, with no
            // copy of the whole text (4 MB at a thousand pods) into one
            // buffer.
            let len: usize = families.iter().map(|f| f.text.len()).sum();
            let chunks = families.into_iter().map(|f| Ok::<_, Infallible>(f.text));
            (
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, prometheus::TEXT_FORMAT.to_owned()),
                    (header::VARY, "Accept-Encoding".to_owned()),
                    (header::CONTENT_LENGTH, len.to_string()),
                ],
                axum::body::Body::from_stream(futures::stream::iter(chunks)),
            )
                .into_response()
        }
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("scrape failed: compressing: {e}\n"),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("scrape failed: {e}\n"),
        )
            .into_response(),
    }
}

/// A `/metrics` body, as the scraper asked for it.
enum Body {
    Gzip(Vec<u8>),
    /// The families, in order.
    Text(Vec<crate::metrics::Family>),
}

/// Whether an `Accept-Encoding` value accepts gzip (RFC 9110 12.5.3):
/// `gzip` or `x-gzip`, or else `*`, with a non-zero quality. Prometheus
/// sends `gzip`.
fn accepts_gzip(value: &str) -> bool {
    let mut star = false;
    for item in value.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q=").or(p.trim().strip_prefix("Q=")))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match coding.as_str() {
            "gzip" | "x-gzip" => return q > 0.0,
            "*" => star = q > 0.0,
            _ => {}
        }
    }
    star
}

async fn healthz(State(app): State<App>) -> impl IntoResponse {
    match app.tracker.live(std::time::Instant::now()) {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {why}\n"),
        ),
    }
}

async fn readyz(State(app): State<App>) -> impl IntoResponse {
    match app
        .tracker
        .ready(app.max_scan_age, std::time::Instant::now())
    {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{SocketAddr, TcpStream as StdStream},
    };

    use super::*;

    #[test]
    fn gzip_is_accepted_as_prometheus_and_browsers_ask_and_refused_at_q_0() {
        assert!(accepts_gzip("gzip"));
        assert!(accepts_gzip("gzip, deflate, br"));
        assert!(accepts_gzip("deflate;q=1.0, GZIP;q=0.5"));
        assert!(accepts_gzip("x-gzip"));
        assert!(accepts_gzip("*"));
        assert!(!accepts_gzip("identity"));
        assert!(!accepts_gzip(""));
        assert!(!accepts_gzip("gzip;q=0"));
        assert!(!accepts_gzip("gzip; q=0.0, *"));
        assert!(!accepts_gzip("*;q=0"));
        assert!(!accepts_gzip("gzipx"));
    }

    #[test]
    fn at_the_limit_the_longest_idle_connection_makes_room() {
        let mut t = Table::new(3);
        let id = |a: Admission<&str>| match a {
            Admission::Admitted { id, evicted: None } => id,
            other => panic!("{other:?}"),
        };
        let a = id(t.admit("a"));
        let b = id(t.admit("b"));
        let c = id(t.admit("c"));
        // a answers a request after b and c arrived: b is now the longest idle.
        t.begin(a);
        t.end(a);
        assert_eq!(
            t.admit("d"),
            Admission::Admitted {
                id: 3,
                evicted: Some("b")
            }
        );
        t.remove(b);
        // c is busy; a is the longest idle.
        t.begin(c);
        assert_eq!(
            t.admit("e"),
            Admission::Admitted {
                id: 4,
                evicted: Some("a")
            }
        );
        // An evicted connection that has not gone yet does not count.
        assert_eq!(t.kept(), 3);
        t.begin(3);
        t.begin(4);
        assert_eq!(t.admit("f"), Admission::Refused);
        t.end(4);
        assert_eq!(
            t.admit("g"),
            Admission::Admitted {
                id: 5,
                evicted: Some("e")
            }
        );
    }

    #[test]
    fn a_busy_connection_is_never_evicted_even_if_oldest() {
        let mut t = Table::new(1);
        let Admission::Admitted { id, .. } = t.admit(1) else {
            panic!()
        };
        t.begin(id);
        assert_eq!(t.admit(2), Admission::Refused);
        t.end(id);
        assert_eq!(
            t.admit(3),
            Admission::Admitted {
                id: 1,
                evicted: Some(1)
            }
        );
    }

    fn test_router() -> Router {
        Router::new()
            .route("/", get(|| async { "hi\n" }))
            .route("/big", get(|| async { "x".repeat(4 << 20) }))
            .route(
                "/slow",
                get(|| async {
                    sleep(Duration::from_secs(3600)).await;
                    "late\n"
                }),
            )
    }

    struct Server {
        addr: SocketAddr,
        stop: Option<oneshot::Sender<()>>,
        done: tokio::task::JoinHandle<io::Result<()>>,
    }

    async fn start(limits: Limits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(serve_router(listener, test_router(), limits, Guard::default(), async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
            done,
        }
    }

    fn connect(addr: SocketAddr) -> StdStream {
        let s = StdStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// Sends `request` (ignoring a reset while sending) and reads to EOF.
    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = connect(addr);
        let _ = s.write_all(request);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn status(response: &str) -> &str {
        response.get(9..12).unwrap_or(response)
    }

    async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
        tokio::task::spawn_blocking(f).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_requests_get_a_status_and_the_server_goes_on() {
        let server = start(Limits::default()).await;
        let addr = server.addr;
        let get = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("garbage", b"\x00\x01\x02garbage\r\n\r\n".to_vec(), "400"),
            (
                "2 MB header",
                [
                    &b"GET / HTTP/1.1\r\nhost: x\r\nx-big: "[..],
                    &vec![b'a'; 2 << 20],
                    b"\r\n\r\n",
                ]
                .concat(),
                "431",
            ),
            ("h2 preface", H2_PREFACE.to_vec(), "505"),
            (
                "POST",
                b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi"
                    .to_vec(),
                "405",
            ),
            (
                "unknown path",
                b"GET /nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_vec(),
                "404",
            ),
        ];
        for (what, request, want) in cases {
            let got = blocking(move || exchange(addr, &request)).await;
            assert_eq!(status(&got), want, "{what}: {got:?}");
            let ok = blocking(move || exchange(addr, get)).await;
            assert_eq!(status(&ok), "200", "after {what}: {ok:?}");
        }
        drop(server);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_head_and_an_idle_keep_alive_connection_are_closed_at_the_header_timeout() {
        let server = start(Limits {
            header_timeout: Duration::from_secs(1),
            ..Limits::default()
        })
        .await;
        let addr = server.addr;
        let (slow, idle) = blocking(move || {
            let started = Instant::now();
            let mut s = connect(addr);
            let mut closed = None;
            for b in b"GET / HTTP/1.1\r\nhost: x\r\n\r\n" {
                if s.write_all(&[*b]).is_err() {
                    closed = Some(started.elapsed());
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            let slow = (closed.unwrap_or(started.elapsed()), out);

            // A kept-alive connection after one answer.
            let mut s = connect(addr);
            s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            let answered = Instant::now();
            let n = s.read(&mut buf).unwrap();
            (slow, (n, answered.elapsed()))
        })
        .await;
        let (slow_closed, slow_got) = slow;
        assert!(
            slow_closed < Duration::from_millis(1800) && !slow_got.starts_with(b"HTTP/1.1 200"),
            "slow head: closed after {slow_closed:?}, got {:?}",
            String::from_utf8_lossy(&slow_got)
        );
        assert_eq!(idle.0, 0, "EOF on the idle connection");
        assert!(
            idle.1 >= Duration::from_millis(900) && idle.1 < Duration::from_secs(3),
            "idle connection closed after {:?}",
            idle.1
        );
        drop(server);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_connection_at_the_limit_closes_the_longest_idle_one() {
        let server = start(Limits {
            max_connections: 2,
            ..Limits::default()
        })
        .await;
        let addr = server.addr;
        blocking(move || {
            let mut first = connect(addr);
            std::thread::sleep(Duration::from_millis(50));
            let mut second = connect(addr);
            std::thread::sleep(Duration::from_millis(50));
            // A request on the first makes the second the longest idle.
            first
                .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 1024];
            let n = first.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            let third = exchange(
                addr,
                b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            );
            assert_eq!(status(&third), "200", "{third:?}");
            let closed = second.read(&mut buf);
            assert!(matches!(closed, Ok(0)), "second not closed: {closed:?}");
            // The first is still served.
            first
                .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                .unwrap();
            let n = first.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            // Once a newer connection is kept, the first (idle after its
            // answers, inside hyper) is the one to go.
            let _fourth = connect(addr);
            std::thread::sleep(Duration::from_millis(50));
            let _fifth = connect(addr);
            let closed = first.read(&mut buf);
            assert!(matches!(closed, Ok(0)), "first not closed: {closed:?}");
        })
        .await;
        drop(server);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_response_larger_than_the_request_cap_is_sent_whole() {
        let server = start(Limits::default()).await;
        let addr = server.addr;
        let got = blocking(move || {
            exchange(
                addr,
                b"GET /big HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            )
        })
        .await;
        assert_eq!(status(&got), "200");
        let body = got.split_once("\r\n\r\n").unwrap().1;
        assert_eq!(body.len(), 4 << 20);
        drop(server);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn when_every_connection_is_busy_a_new_one_gets_503() {
        let server = start(Limits {
            max_connections: 1,
            ..Limits::default()
        })
        .await;
        let addr = server.addr;
        blocking(move || {
            let mut busy = connect(addr);
            busy.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
                .unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let got = exchange(addr, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n");
            assert_eq!(status(&got), "503", "{got:?}");
        })
        .await;
        drop(server);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_returns_after_the_grace_period_despite_a_hung_request() {
        let mut server = start(Limits {
            shutdown_grace: Duration::from_millis(500),
            ..Limits::default()
        })
        .await;
        let addr = server.addr;
        let client = blocking(move || {
            let mut s = connect(addr);
            s.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
                .unwrap();
            std::thread::sleep(Duration::from_millis(200));
            s
        })
        .await;
        let stopped = Instant::now();
        let _ = server.stop.take().unwrap().send(());
        let done = timeout(Duration::from_secs(3), &mut server.done).await;
        let took = stopped.elapsed();
        assert!(
            matches!(done, Ok(Ok(Ok(())))),
            "serve did not return: {done:?}"
        );
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_millis(1500),
            "{took:?}"
        );
        // The hung request's connection is gone.
        let mut client = client;
        let mut buf = [0u8; 64];
        let closed = client.read(&mut buf);
        assert!(matches!(closed, Ok(0)), "not closed: {closed:?}");
    }
}
