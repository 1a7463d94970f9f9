//! Talking to backends: each worker's pool of keep-alive HTTP/1.1 connections (plain and TLS)
//! for the HTTP/1 path ([`Pool`]); hyper's pooled clients for requests that arrive over
//! HTTP/2, with request bodies that can be handed to a second attempt when the first connect
//! failed, and idle timeouts on streamed bodies.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, SizeHint};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy sends or receives.
pub type ProxyBody = BoxBody<Bytes, BoxError>;
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, RetryBody>;

/// ingress-nginx's defaults.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Backends' certificates are not verified (ingress-nginx's `proxy-ssl-verify: off` default):
/// pods serve self-signed certificates for names nobody can predict. Signatures are still checked.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
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
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS settings for `backend-protocol: HTTPS`.
pub fn client_tls_config() -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth())
}

fn build_client(tls: rustls::ClientConfig, connect_timeout: Duration) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(64)
        .build(https)
}

/// One pooled client per connect timeout in use (the timeout is a property of the connector).
pub struct Clients {
    tls: rustls::ClientConfig,
    by_timeout: Mutex<HashMap<Duration, UpstreamClient>>,
}

impl Clients {
    pub fn new(tls: rustls::ClientConfig) -> Self {
        Clients {
            tls,
            by_timeout: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, connect_timeout: Duration) -> UpstreamClient {
        let mut m = self.by_timeout.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(connect_timeout)
            .or_insert_with(|| build_client(self.tls.clone(), connect_timeout))
            .clone()
    }
}

/// A request body that a second attempt can take over, as long as the first never read from it
/// (a connect failure happens before the body is polled).
pub struct RetryBody {
    slot: Arc<Mutex<Option<ProxyBody>>>,
    body: Option<ProxyBody>,
    hint: SizeHint,
    end: bool,
}

impl RetryBody {
    /// Wraps `body`; [`RetryBody::again`] makes another handle on the same body.
    pub fn new(body: ProxyBody) -> RetryBody {
        let hint = body.size_hint();
        let end = body.is_end_stream();
        RetryBody {
            slot: Arc::new(Mutex::new(Some(body))),
            body: None,
            hint,
            end,
        }
    }

    /// A handle for a retry, if the body was never read.
    pub fn again(&self) -> Option<RetryBody> {
        let untouched = self.slot.lock().unwrap_or_else(|e| e.into_inner()).is_some();
        untouched.then(|| RetryBody {
            slot: self.slot.clone(),
            body: None,
            hint: self.hint,
            end: self.end,
        })
    }
}

impl Body for RetryBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.body.is_none() {
            let taken = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            match taken {
                Some(b) => self.body = Some(b),
                None => return Poll::Ready(Some(Err("request body already sent on another attempt".into()))),
            }
        }
        match self.body.as_mut() {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.end
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

/// The peer went quiet for longer than the allowed idle time.
#[derive(Debug, thiserror::Error)]
#[error("{what}: nothing for {after:?}")]
pub struct IdleTimeout {
    pub what: &'static str,
    pub after: Duration,
}

/// A body that fails when no frame arrives for `timeout` (nginx's read/send timeouts are
/// "between two successive operations", not for the whole transfer).
pub struct IdleTimeoutBody<B> {
    inner: B,
    what: &'static str,
    timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl<B> IdleTimeoutBody<B> {
    pub fn new(inner: B, timeout: Duration, what: &'static str) -> Self {
        IdleTimeoutBody {
            inner,
            what,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl<B> Body for IdleTimeoutBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + this.timeout;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(IdleTimeout {
                    what: this.what,
                    after: this.timeout,
                })))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future as _;

/// How long an idle backend connection is kept (nginx's upstream `keepalive_timeout`).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per backend address and worker.
const POOL_MAX_IDLE: usize = 256;

/// A connection to a backend, plain or TLS (`backend-protocol: HTTPS`).
pub enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl UpstreamIo {
    fn tcp(&self) -> &TcpStream {
        match self {
            UpstreamIo::Plain(s) => s,
            UpstreamIo::Tls(s) => s.get_ref().0,
        }
    }

    /// The plain TCP socket, for splicing from it; `None` for TLS.
    pub fn plain_tcp(&self) -> Option<&TcpStream> {
        match self {
            UpstreamIo::Plain(s) => Some(s),
            UpstreamIo::Tls(_) => None,
        }
    }

    /// Waits until the backend sent something (or closed).
    pub async fn readable(&self) -> std::io::Result<()> {
        self.tcp().readable().await
    }

    /// Whether an idle connection still looks usable: nothing arrived on it (a close, or bytes
    /// no request asked for) since it was put back. Never waits.
    fn still_idle(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.tcp().try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Where a backend connection goes: a pod address, or an ExternalName Service's DNS name
/// (resolved on every connect); plain or TLS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dest {
    Addr(SocketAddr, bool),
    Name(String, u16, bool),
}

impl Dest {
    pub fn https(&self) -> bool {
        match self {
            Dest::Addr(_, https) | Dest::Name(_, _, https) => *https,
        }
    }
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dest::Addr(a, _) => write!(f, "{a}"),
            Dest::Name(h, p, _) => write!(f, "{h}:{p}"),
        }
    }
}

/// A backend connection checked out of a [`Pool`] (or just connected).
pub struct Pooled {
    pub io: UpstreamIo,
    /// It served a request before: a close before any answer may just be its idle timeout.
    pub reused: bool,
}

/// One worker's idle keep-alive connections to backends. Single-threaded: a worker's
/// requests and their backend connections never leave its thread.
pub struct Pool {
    /// foldhash: SipHash's DoS resistance buys nothing for keys kproxy chooses itself.
    idle: RefCell<foldhash::HashMap<Dest, Vec<(UpstreamIo, Instant)>>>,
    tls: tokio_rustls::TlsConnector,
    /// Requests sent, and connections opened for them: the reuse rate is 1 - opened / requests.
    pub requests: Cell<u64>,
    pub opened: Cell<u64>,
}

impl Pool {
    /// `tls` is used for HTTPS backends; it must offer only `http/1.1` in ALPN.
    pub fn new(tls: rustls::ClientConfig) -> Self {
        let mut tls = tls;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Pool {
            idle: RefCell::new(foldhash::HashMap::default()),
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            requests: Cell::new(0),
            opened: Cell::new(0),
        }
    }

    /// An idle connection to `dest` that still looks usable, newest first. `now` is the
    /// caller's clock reading (the request's start), not read again here.
    pub fn checkout(&self, dest: &Dest, now: Instant) -> Option<Pooled> {
        let mut idle = self.idle.borrow_mut();
        let conns = idle.get_mut(dest)?;
        while let Some((io, since)) = conns.pop() {
            if now.saturating_duration_since(since) < POOL_IDLE_TIMEOUT && io.still_idle() {
                return Some(Pooled { io, reused: true });
            }
        }
        None
    }

    /// Puts a connection whose last exchange ended cleanly back; idle from `now`.
    pub fn checkin(&self, dest: &Dest, io: UpstreamIo, now: Instant) {
        let mut idle = self.idle.borrow_mut();
        if let Some(conns) = idle.get_mut(dest) {
            if conns.len() < POOL_MAX_IDLE {
                conns.push((io, now));
            }
            return;
        }
        idle.insert(dest.clone(), vec![(io, now)]);
    }

    /// Closes connections idle for longer than [`POOL_IDLE_TIMEOUT`] or closed by their backend.
    pub fn purge(&self) {
        self.idle.borrow_mut().retain(|_, conns| {
            conns.retain(|(io, since)| since.elapsed() < POOL_IDLE_TIMEOUT && io.still_idle());
            !conns.is_empty()
        });
    }

    /// A new connection to `dest` (TCP_NODELAY; TLS without certificate verification for
    /// HTTPS backends, see [`client_tls_config`]).
    pub async fn connect(&self, dest: &Dest, timeout: Duration) -> std::io::Result<Pooled> {
        let connect = async {
            let tcp = match dest {
                Dest::Addr(a, _) => TcpStream::connect(*a).await?,
                Dest::Name(h, p, _) => TcpStream::connect((h.as_str(), *p)).await?,
            };
            let _ = tcp.set_nodelay(true);
            if !dest.https() {
                return Ok::<_, std::io::Error>(UpstreamIo::Plain(tcp));
            }
            let name = match dest {
                Dest::Addr(a, _) => ServerName::IpAddress(a.ip().into()),
                Dest::Name(h, _, _) => ServerName::try_from(h.clone())
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            };
            let tls = self.tls.connect(name, tcp).await?;
            Ok(UpstreamIo::Tls(Box::new(tls)))
        };
        let io = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
        self.opened.set(self.opened.get() + 1);
        Ok(Pooled { io, reused: false })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    #[tokio::test]
    async fn retry_body_moves_to_a_second_attempt_only_if_unread() {
        let body: ProxyBody = Full::new(Bytes::from_static(b"hello")).map_err(|e| match e {}).boxed();
        let first = RetryBody::new(body);
        let second = first.again().unwrap();
        drop(first);
        assert_eq!(second.collect().await.unwrap().to_bytes(), "hello");

        let body: ProxyBody = Full::new(Bytes::from_static(b"x")).map_err(|e| match e {}).boxed();
        let mut first = RetryBody::new(body);
        let _ = first.frame().await;
        assert!(first.again().is_none(), "a read body cannot be replayed");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_fires_between_frames_not_overall() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let stream = StreamBody::new(tokio_stream_from(rx));
        let mut body = IdleTimeoutBody::new(stream, Duration::from_secs(5), "upstream read");
        tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).await;
            }
            tokio::time::sleep(Duration::from_secs(6)).await;
            drop(tx);
        });
        for _ in 0..3 {
            assert!(body.frame().await.unwrap().is_ok(), "12 s in total, never 5 s idle");
        }
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("nothing for 5s"), "{err}");
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> + Unpin {
        Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }

    fn pool() -> Pool {
        Pool::new(client_tls_config().expect("client TLS config"))
    }

    #[tokio::test]
    async fn a_pooled_connection_is_reused_until_idle_for_the_pool_timeout_by_the_callers_clock() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dest = Dest::Addr(addr, false);
        let p = pool();
        let t0 = Instant::now();
        // The backend's ends stay open: a closed one would not look idle.
        let mut accepted = Vec::new();
        for _ in 0..2 {
            let tcp = TcpStream::connect(addr).await.unwrap();
            accepted.push(listener.accept().await.unwrap());
            p.checkin(&dest, UpstreamIo::Plain(tcp), t0);
        }
        let got = p
            .checkout(&dest, t0 + Duration::from_secs(1))
            .expect("idle for 1 s: reused");
        assert!(got.reused);
        assert!(
            p.checkout(&dest, t0 + POOL_IDLE_TIMEOUT + Duration::from_secs(1))
                .is_none(),
            "idle past the pool timeout: dropped"
        );
        assert!(p.checkout(&dest, t0).is_none(), "the expired one was not kept");
    }
}
