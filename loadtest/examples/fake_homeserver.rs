//! A deliberately trivial "homeserver" that answers every client-server call
//! the generator makes with a canned success, as fast as it can. It exists
//! to measure the generator itself (its requests/s per core), not Matrix:
//! `cargo run --release -p tessera-loadtest --example fake_homeserver -- 127.0.0.1:18100 [THREADS]`
//! then `tessera-loadtest run -t http://127.0.0.1:18100 -s register,rooms,send ...`.
//! `/sync` answers immediately with no events, so do not combine it with the
//! `sync` scenario.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use std::cell::Cell;
use std::convert::Infallible;
use std::rc::Rc;

fn answer(path: &str, n: u64) -> String {
    if path.starts_with("/_matrix/client/versions") {
        r#"{"versions":["v1.11"]}"#.into()
    } else if path.contains("/register") || path.contains("/login") {
        format!(r#"{{"user_id":"@u{n}:localhost","access_token":"t{n}","device_id":"D"}}"#)
    } else if path.contains("/createRoom") {
        format!(r#"{{"room_id":"!r{n}:localhost"}}"#)
    } else if path.contains("/send/") {
        format!(r#"{{"event_id":"$e{n}"}}"#)
    } else if path.contains("/sync") {
        format!(r#"{{"next_batch":"s{n}"}}"#)
    } else if path.contains("/messages") {
        r#"{"chunk":[]}"#.into()
    } else {
        "{}".into()
    }
}

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18100".into());
    let threads: usize = std::env::args()
        .nth(2)
        .and_then(|t| t.parse().ok())
        .unwrap_or(1)
        .max(1);
    let listener = std::net::TcpListener::bind(&addr)?;
    eprintln!("fake homeserver on {addr}, {threads} threads");
    // One acceptor hands connections round-robin to worker threads, each
    // running its own single-threaded runtime.
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (tx, rx) = tokio::sync::mpsc::channel::<std::net::TcpStream>(64);
            std::thread::spawn(move || serve(rx));
            tx
        })
        .collect();
    for (i, stream) in listener.incoming().enumerate() {
        let stream = stream?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        if workers[i % threads].blocking_send(stream).is_err() {
            break;
        }
    }
    Ok(())
}

fn serve(mut rx: tokio::sync::mpsc::Receiver<std::net::TcpStream>) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let counter = Rc::new(Cell::new(0u64));
        while let Some(stream) = rx.recv().await {
            let stream = tokio::net::TcpStream::from_std(stream)?;
            let counter = counter.clone();
            tokio::task::spawn_local(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let n = counter.get();
                    counter.set(n + 1);
                    let body = answer(req.uri().path(), n);
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(Io(stream), service)
                    .await;
            });
        }
        Ok(())
    })
}

/// The same tokio-to-hyper adapter as the client's, for the example only.
struct Io(tokio::net::TcpStream);

impl hyper::rt::Read for Io {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // SAFETY: tokio's ReadBuf only writes initialised bytes and reports
        // how many; exactly that many are marked filled.
        let n = unsafe {
            let mut tbuf = tokio::io::ReadBuf::uninit(buf.as_mut());
            match tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut self.0), cx, &mut tbuf) {
                std::task::Poll::Ready(Ok(())) => tbuf.filled().len(),
                other => return other,
            }
        };
        // SAFETY: `n` bytes were initialised above.
        unsafe { buf.advance(n) };
        std::task::Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Write for Io {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        tokio::io::AsyncWrite::poll_write(std::pin::Pin::new(&mut self.0), cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        tokio::io::AsyncWrite::poll_flush(std::pin::Pin::new(&mut self.0), cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        tokio::io::AsyncWrite::poll_shutdown(std::pin::Pin::new(&mut self.0), cx)
    }
}
