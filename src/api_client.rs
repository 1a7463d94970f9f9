//! What client-go puts around every request kube-proxy sends the API server, as a tower layer
//! on kube's client: the client-side rate limiter of `--kube-api-qps`/`--kube-api-burst` (a
//! token bucket: `burst` requests at once, then `qps` a second), and the `rest_client_*`
//! metrics of each request.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use tower::{Layer, Service};

use crate::metrics::metrics;

/// client-go's token bucket (`flowcontrol.NewTokenBucketRateLimiter`): starts full.
#[derive(Debug)]
pub struct TokenBucket {
    qps: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// `None` when `qps` is not positive: client-go sets no limiter then.
    pub fn new(qps: f32, burst: i32, now: Instant) -> Option<TokenBucket> {
        if qps <= 0.0 {
            return None;
        }
        let burst = f64::from(burst.max(1));
        Some(TokenBucket {
            qps: f64::from(qps),
            burst,
            state: Mutex::new((burst, now)),
        })
    }

    /// Takes a token at `now`, or says how long until one is there.
    pub fn try_acquire(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, last) = *state;
        let tokens = (tokens + now.saturating_duration_since(last).as_secs_f64() * self.qps).min(self.burst);
        if tokens >= 1.0 {
            *state = (tokens - 1.0, now);
            Ok(())
        } else {
            *state = (tokens, now);
            Err(Duration::from_secs_f64((1.0 - tokens) / self.qps))
        }
    }
}

/// The layer: one bucket shared by every request of the client, and the API server's
/// `host:port` for the metrics' `host` label.
#[derive(Clone)]
pub struct ApiClientLayer {
    bucket: Option<Arc<TokenBucket>>,
    host: Arc<str>,
}

impl ApiClientLayer {
    pub fn new(qps: f32, burst: i32, host: impl Into<Arc<str>>) -> Self {
        ApiClientLayer {
            bucket: TokenBucket::new(qps, burst, tokio::time::Instant::now().into_std()).map(Arc::new),
            host: host.into(),
        }
    }
}

impl<S> Layer<S> for ApiClientLayer {
    type Service = ApiClientService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ApiClientService {
            inner,
            bucket: self.bucket.clone(),
            host: self.host.clone(),
            wait: None,
            permit: false,
        }
    }
}

pub struct ApiClientService<S> {
    inner: S,
    bucket: Option<Arc<TokenBucket>>,
    host: Arc<str>,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A token taken in `poll_ready`, spent by the next `call`.
    permit: bool,
}

impl<S, B, RB> Service<Request<B>> for ApiClientService<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if let Some(bucket) = &self.bucket {
            while !self.permit {
                if let Some(wait) = self.wait.as_mut() {
                    if wait.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    self.wait = None;
                }
                match bucket.try_acquire(tokio::time::Instant::now().into_std()) {
                    Ok(()) => self.permit = true,
                    Err(d) => self.wait = Some(Box::pin(tokio::time::sleep(d))),
                }
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.permit = false;
        let method = req.method().as_str().to_string();
        let host = self.host.clone();
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let code = match &result {
                Ok(r) => r.status().as_u16().to_string(),
                Err(_) => "<error>".to_string(),
            };
            metrics().observe_rest_request(&host, &method, &code, started.elapsed());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_qps() {
        let t0 = Instant::now();
        let b = TokenBucket::new(2.0, 3, t0).unwrap();
        for _ in 0..3 {
            assert_eq!(b.try_acquire(t0), Ok(()), "a full bucket serves the burst at once");
        }
        assert_eq!(
            b.try_acquire(t0),
            Err(Duration::from_millis(500)),
            "then one token per 1/qps"
        );
        assert_eq!(b.try_acquire(t0 + Duration::from_millis(500)), Ok(()));
        // Idle time refills up to the burst, never more.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.try_acquire(later), Ok(()));
        }
        assert!(b.try_acquire(later).is_err());
        assert!(
            TokenBucket::new(-1.0, 10, t0).is_none(),
            "qps < 0: no limiter, as client-go"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_layer_holds_requests_beyond_the_burst() {
        use tower::ServiceExt;
        let layer = ApiClientLayer::new(1.0, 2, "api:6443");
        let svc = tower::service_fn(|_req: Request<()>| async { Ok::<_, std::convert::Infallible>(Response::new(())) });
        let mut svc = layer.layer(svc);
        let start = tokio::time::Instant::now();
        for _ in 0..4 {
            svc.ready().await.unwrap().call(Request::new(())).await.unwrap();
        }
        // Two at once, then one a second: the fourth waits two (virtual) seconds.
        assert!(tokio::time::Instant::now() - start >= Duration::from_secs(2));
    }
}
