//! Closing connections that hold a place without using it.
//!
//! A connection is idle while no request on it is being answered. The
//! serving side marks each request busy from its start until its response
//! body is finished or dropped ([`Activity::begin`], [`Tracked`]), so an
//! open `WatchIdToken` stream keeps its connection, however long between
//! tokens. Bytes alone (pings, a trickled body) do not: a connection
//! [`IdleTimeout`] finds idle for its limit fails its next read or write,
//! and the server closes it.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;

use super::peer::PeerCredentials;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// One connection's requests in progress and when it last had none.
#[derive(Debug)]
pub struct Activity {
    origin: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `origin` when the last request ended.
    idle_since_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        })
    }

    /// Marks one request in progress until the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(Arc::clone(self))
    }

    /// When the connection became idle, or `None` while a request is open.
    fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let ms = self.idle_since_ms.load(Ordering::SeqCst);
        Some(self.origin + Duration::from_millis(ms))
    }
}

/// A request in progress; its end starts the idle clock again.
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let activity = &self.0;
        let now = activity.origin.elapsed().as_millis() as u64;
        activity.idle_since_ms.fetch_max(now, Ordering::SeqCst);
        activity.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection's I/O that fails once the connection has been idle for `limit`.
pub struct IdleTimeout<S> {
    inner: S,
    activity: Arc<Activity>,
    limit: Duration,
    timer: Pin<Box<Sleep>>,
}

impl<S> IdleTimeout<S> {
    pub fn new(inner: S, activity: Arc<Activity>, limit: Duration) -> Self {
        let timer = Box::pin(tokio::time::sleep(limit));
        Self {
            inner,
            activity,
            limit,
            timer,
        }
    }

    /// Whether the connection has been idle too long; if not, arranges a
    /// wake-up for when it would be.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(since) = self.activity.idle_since() else {
            // Busy: the end of the request wakes the connection's task.
            return false;
        };
        let deadline = since + self.limit;
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        self.timer.as_mut().poll(cx).is_ready()
    }

    fn timed_out(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "connection idle for {}s with no request open; closed",
                self.limit.as_secs()
            ),
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(self.timed_out())),
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(self.timed_out())),
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(self.timed_out())),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(self.timed_out())),
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A response body that keeps its request busy until it is finished or dropped.
pub struct Tracked<B> {
    inner: Pin<Box<B>>,
    _busy: Option<Busy>,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, busy: Option<Busy>) -> Self {
        Self {
            inner: Box::pin(inner),
            _busy: busy,
        }
    }
}

impl<B: http_body::Body<Data = Bytes>> http_body::Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let frame = self.inner.as_mut().poll_frame(cx);
        if let Poll::Ready(None) = frame {
            self._busy = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Marks each gRPC call busy on its connection until its response (a
/// stream included) ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct InFlightLayer;

impl<S> tower::Layer<S> for InFlightLayer {
    type Service = InFlight<S>;

    fn layer(&self, inner: S) -> InFlight<S> {
        InFlight { inner }
    }
}

#[derive(Debug, Clone)]
pub struct InFlight<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<axum::http::Request<ReqBody>> for InFlight<S>
where
    S: tower::Service<axum::http::Request<ReqBody>, Response = axum::http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = axum::http::Response<Tracked<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<ReqBody>) -> Self::Future {
        let busy = request
            .extensions()
            .get::<PeerCredentials>()
            .and_then(|peer| peer.activity.as_ref())
            .map(Activity::begin);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Tracked::new(body, busy)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_fails_after_the_limit_and_a_busy_one_does_not() {
        let limit = Duration::from_secs(30);
        let (near, mut far) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut conn = IdleTimeout::new(near, Arc::clone(&activity), limit);
        // Busy for 10 minutes with no bytes at all: still open.
        let busy = activity.begin();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(600), conn.read(&mut byte)).await;
        assert!(read.is_err(), "a busy connection is not closed");
        // A byte arriving does not make it idle-proof once the request ends.
        drop(busy);
        let ended = Instant::now();
        far.write_all(b"x").await.unwrap();
        assert_eq!(conn.read(&mut byte).await.unwrap(), 1);
        let error = conn.read(&mut byte).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(ended.elapsed(), limit);
    }
}
