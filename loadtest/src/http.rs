//! HTTP/1.1 client: a keep-alive connection pool to one target address.
//!
//! Built on hyper's low-level client connections over tokio TCP streams.
//! The pool lives on one thread (the generator runs a single-threaded
//! runtime), so its state is plain `RefCell`/`Cell`. Connections are capped
//! by a semaphore; a request that finds no idle connection opens one, and a
//! connection goes back to the idle list once its response body has been read.
//! Long-polling `/sync` requests use their own pool so they never starve the
//! short requests.

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::{self, SendRequest};
use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// A request failure below the HTTP status level.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// TCP connect failed.
    #[error("connect: {0}")]
    Connect(io::Error),
    /// The HTTP exchange failed (connection reset, malformed response...).
    #[error("http: {0}")]
    Hyper(#[from] hyper::Error),
    /// No response within the request timeout.
    #[error("timeout")]
    Timeout,
    /// The request could not be built (bad path or header).
    #[error("bad request: {0}")]
    Build(#[from] http::Error),
    /// The response body exceeded the configured limit.
    #[error("response body over {0} bytes")]
    BodyTooLarge(usize),
}

impl HttpError {
    /// A short, stable label for error tables.
    pub fn label(&self) -> &'static str {
        match self {
            HttpError::Connect(_) => "connect",
            HttpError::Hyper(e) if e.is_closed() || e.is_incomplete_message() => {
                "connection_closed"
            }
            HttpError::Hyper(_) => "http",
            HttpError::Timeout => "timeout",
            HttpError::Build(_) => "build",
            HttpError::BodyTooLarge(_) => "body_too_large",
        }
    }
}

/// A response with its whole body.
#[derive(Debug)]
pub struct Response {
    /// HTTP status.
    pub status: StatusCode,
    /// The `Server` header, when present.
    pub server: Option<String>,
    /// The body.
    pub body: Bytes,
    /// When the last byte of the body had been read: what an arrival is
    /// measured to, so that the time spent parsing the body afterwards never
    /// counts as latency.
    pub received_at: Instant,
}

/// Connection pool to one address.
pub struct Pool {
    addr: SocketAddr,
    host: HeaderValue,
    idle: RefCell<Vec<SendRequest<Full<Bytes>>>>,
    permits: Semaphore,
    timeout: Duration,
    body_bytes_max: usize,
    opened: Cell<u64>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("addr", &self.addr)
            .field("opened", &self.opened.get())
            .finish()
    }
}

impl Pool {
    /// A pool of at most `connections_max` connections to `addr`, sending
    /// `host` as the Host header; each request (including reading its body)
    /// must finish within `timeout`.
    pub fn new(
        addr: SocketAddr,
        host: &str,
        connections_max: usize,
        timeout: Duration,
    ) -> Result<Self, http::Error> {
        let host = HeaderValue::from_str(host).map_err(http::Error::from)?;
        Ok(Self {
            addr,
            host,
            idle: RefCell::new(Vec::new()),
            permits: Semaphore::new(connections_max.max(1)),
            timeout,
            // Initial syncs of users in thousands of rooms are large; 256 MiB
            // is far above any sane response and still bounds memory.
            body_bytes_max: 256 << 20,
            opened: Cell::new(0),
        })
    }

    /// Number of TCP connections opened so far.
    pub fn connections_opened(&self) -> u64 {
        self.opened.get()
    }

    /// Sends one request and reads the whole response.
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        token: Option<&str>,
        body: Option<Bytes>,
    ) -> Result<Response, HttpError> {
        self.request_with_timeout(method, path_and_query, token, body, self.timeout)
            .await
    }

    /// Like [`Pool::request`] with a timeout for this request only.
    pub async fn request_with_timeout(
        &self,
        method: Method,
        path_and_query: &str,
        token: Option<&str>,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Response, HttpError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(header::HOST, self.host.clone());
        if let Some(token) = token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = match body {
            Some(body) => builder
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(body))?,
            None => builder.body(Full::new(Bytes::new()))?,
        };
        match tokio::time::timeout(timeout, self.exchange(req)).await {
            Ok(result) => result,
            Err(_) => Err(HttpError::Timeout),
        }
    }

    async fn exchange(&self, req: Request<Full<Bytes>>) -> Result<Response, HttpError> {
        // The semaphore is never closed, so acquiring only waits.
        let _permit = match self.permits.acquire().await {
            Ok(p) => p,
            Err(_) => unreachable!("pool semaphore is never closed"),
        };
        let (mut conn, reused) = match self.take_idle() {
            Some(conn) => (conn, true),
            None => (self.connect().await?, false),
        };
        // An idle connection may have been closed by the server since it was
        // returned. When hyper hands the request back unsent, it was never
        // processed, so it is safe to retry once on a fresh connection.
        let response = match conn.try_send_request(req).await {
            Ok(r) => r,
            Err(mut e) => match e.take_message() {
                Some(req) if reused => {
                    conn = self.connect().await?;
                    conn.send_request(req).await?
                }
                _ => return Err(HttpError::Hyper(e.into_error())),
            },
        };
        let status = response.status();
        let server = response
            .headers()
            .get(header::SERVER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = http_body_util::Limited::new(response.into_body(), self.body_bytes_max)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => HttpError::Hyper(*e),
                Err(_) => HttpError::BodyTooLarge(self.body_bytes_max),
            })?
            .to_bytes();
        let received_at = Instant::now();
        if !conn.is_closed() {
            self.idle.borrow_mut().push(conn);
        }
        Ok(Response {
            status,
            server,
            body,
            received_at,
        })
    }

    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.borrow_mut();
        while let Some(conn) = idle.pop() {
            if conn.is_ready() {
                return Some(conn);
            }
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, HttpError> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(HttpError::Connect)?;
        stream.set_nodelay(true).map_err(HttpError::Connect)?;
        let (send, conn) = http1::handshake(TokioIo(stream)).await?;
        self.opened.set(self.opened.get() + 1);
        tokio::spawn(async move {
            // The connection ends when the server closes it or the pool drops
            // its sender; either way there is nothing left to do.
            let _ = conn.await;
        });
        Ok(send)
    }
}

/// Adapts a tokio TCP stream to hyper's I/O traits.
struct TokioIo(TcpStream);

impl hyper::rt::Read for TokioIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        // SAFETY: tokio's ReadBuf only writes initialised bytes into the
        // uninitialised slice and reports how many it filled; exactly that
        // many are then marked filled in hyper's cursor.
        let filled = unsafe {
            let mut tbuf = tokio::io::ReadBuf::uninit(buf.as_mut());
            match tokio::io::AsyncRead::poll_read(Pin::new(&mut self.0), cx, &mut tbuf) {
                Poll::Ready(Ok(())) => tbuf.filled().len(),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        };
        // SAFETY: `filled` bytes were initialised by the read above.
        unsafe { buf.advance(filled) };
        Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Write for TokioIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        tokio::io::AsyncWrite::poll_write(Pin::new(&mut self.0), cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        tokio::io::AsyncWrite::poll_write_vectored(Pin::new(&mut self.0), cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        tokio::io::AsyncWrite::is_write_vectored(&self.0)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::io::AsyncWrite::poll_flush(Pin::new(&mut self.0), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::io::AsyncWrite::poll_shutdown(Pin::new(&mut self.0), cx)
    }
}

/// Percent-encodes one URL path segment or query value: everything but
/// RFC 3986 unreserved characters.
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(
                char::from_digit(u32::from(b >> 4), 16).map_or('0', |c| c.to_ascii_uppercase()),
            );
            out.push(
                char::from_digit(u32::from(b & 15), 16).map_or('0', |c| c.to_ascii_uppercase()),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_matrix_ids() {
        assert_eq!(encode_component("!abc:localhost"), "%21abc%3Alocalhost");
        assert_eq!(encode_component("@u_1:example.org"), "%40u_1%3Aexample.org");
        assert_eq!(encode_component("#room/x y"), "%23room%2Fx%20y");
        assert_eq!(encode_component("a-b.c_d~"), "a-b.c_d~");
        assert_eq!(encode_component("é"), "%C3%A9");
    }
}
