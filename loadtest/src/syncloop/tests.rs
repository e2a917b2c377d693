//! Tests of the sync loop: token extraction, the order of dispatch and
//! parse with and without pipelining, and a pipelined loop over a real
//! connection to a loopback server.

use super::*;
use crate::http::Pool;
use crate::matrix::{self, Session};
use bytes::Bytes;
use http::StatusCode;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{Read as _, Write as _};
use std::rc::Rc;
use tokio::sync::{mpsc, oneshot};

#[test]
fn finds_the_top_level_token_only() {
    // Tessera's and Synapse's order: the token first.
    assert_eq!(
        next_batch(br#"{"next_batch":"s72_1_0","rooms":{}}"#).as_deref(),
        Some("s72_1_0")
    );
    // Last, after members whose values hold decoys: a nested member of the
    // same name, the name inside strings, brackets and escaped quotes.
    let body = br#" {
        "rooms": {"join": {"!r:x": {"timeline": {"events": [
            {"type": "m.room.message", "content": {"next_batch": "evil", "body": "a \"next_batch\": \"evil2\" ]}"}},
            {"content": {"n": [1, -2.5e3, true, false, null, {}, []]}}
        ], "limited": false}}}},
        "presence": {"events": []},
        "device_one_time_keys_count": {"signed_curve25519": 0},
        "x": "\\",
        "next_batch" : "s9"
    }"#;
    assert_eq!(next_batch(body).as_deref(), Some("s9"));
    // Escapes in the token or in the key are decoded as JSON decodes them.
    assert_eq!(
        next_batch(br#"{"next_batch":"a\/b\u0041"}"#).as_deref(),
        Some("a/bA")
    );
    assert_eq!(
        next_batch(br#"{"next\u005fbatch":"t"}"#).as_deref(),
        Some("t")
    );
    // The same token as a full decode, on a real-looking body.
    let full = serde_json::json!({
        "account_data": {"events": []},
        "rooms": {"join": {"!a:b": {"timeline": {"events": [{"content": {"next_batch": 1}}]}}}},
        "next_batch": "t_123~4",
    })
    .to_string();
    let decoded: matrix::SyncResponse = serde_json::from_str(&full).expect("decodes");
    assert_eq!(next_batch(full.as_bytes()), Some(decoded.next_batch));
}

#[test]
fn rejects_bodies_without_a_top_level_token() {
    for body in [
        &b""[..],
        b"[]",
        b"{}",
        b"null",
        br#"{"rooms":{"next_batch":"nested"}}"#,
        br#"{"next_batch":5}"#,
        br#"{"next_batch":null}"#,
        br#"{"next_batch":"unterminated"#,
        br#"{"rooms":{"join":{}"#,
        br#"{"rooms" {"join":{}},"next_batch":"s"}"#,
        br#"{"a":1 "next_batch":"s"}"#,
        b"{\"next_batch\":\"raw\ncontrol\"}",
        br#"{"rooms":]]],"next_batch":"s"}"#,
    ] {
        assert_eq!(
            next_batch(body),
            None,
            "{:?}",
            String::from_utf8_lossy(body)
        );
    }
}

fn ok_response(body: impl Into<Bytes>) -> Response {
    Response {
        status: StatusCode::OK,
        server: None,
        body: body.into(),
        received_at: Instant::now(),
    }
}

/// A client over canned bodies that logs, in order, each request when its
/// task first runs (`sent SINCE`), each body handled (`got TOKEN`) and each
/// failure; after `stop_after` handled bodies it hands the log so far to
/// `done` (what the loop does after that is not part of the script).
struct Scripted {
    bodies: Rc<RefCell<VecDeque<&'static str>>>,
    log: Rc<RefCell<Vec<String>>>,
    handled: usize,
    stop_after: usize,
    done: Option<oneshot::Sender<Vec<String>>>,
}

impl SyncClient for Scripted {
    fn request(&mut self, since: &str) -> SyncRequest {
        let (bodies, log, since) = (self.bodies.clone(), self.log.clone(), since.to_owned());
        Box::pin(async move {
            log.borrow_mut().push(format!("sent {since}"));
            let next = bodies.borrow_mut().pop_front();
            match next {
                Some(body) => Ok(ok_response(body)),
                // Out of script: a long-poll that never ends.
                None => std::future::pending().await,
            }
        })
    }

    async fn received(&mut self, sent: Instant, resp: Response) {
        assert!(resp.received_at >= sent);
        let parsed: matrix::SyncResponse = serde_json::from_slice(&resp.body).expect("decodes");
        self.log
            .borrow_mut()
            .push(format!("got {}", parsed.next_batch));
        self.handled += 1;
        if self.handled == self.stop_after
            && let Some(done) = self.done.take()
        {
            let _ = done.send(self.log.borrow().clone());
        }
    }

    fn failed(&mut self, _sent: Instant, error: CallError) {
        self.log.borrow_mut().push(format!("failed {error}"));
    }
}

/// Runs a scripted loop until it handled `stop_after` bodies; its log.
async fn scripted_log(pipelined: bool, bodies: &[&'static str], stop_after: usize) -> Vec<String> {
    let (done_tx, done_rx) = oneshot::channel();
    let client = Scripted {
        bodies: Rc::new(RefCell::new(bodies.iter().copied().collect())),
        log: Rc::new(RefCell::new(Vec::new())),
        handled: 0,
        stop_after,
        done: Some(done_tx),
    };
    let task = tokio::task::spawn_local(drive(client, "s0".into(), pipelined));
    let log = tokio::time::timeout(Duration::from_secs(10), done_rx)
        .await
        .expect("the loop handles every scripted body")
        .expect("the client reports");
    task.abort();
    log
}

#[tokio::test(flavor = "current_thread")]
async fn pipelined_loop_sends_the_next_request_before_handling_a_body() {
    let bodies = [
        r#"{"next_batch":"s1"}"#,
        r#"{"rooms":{"join":{}},"next_batch":"s2"}"#,
        r#"{"next_batch":"s3","rooms":{}}"#,
    ];
    let local = tokio::task::LocalSet::new();
    let pipelined = local.run_until(scripted_log(true, &bodies, 3)).await;
    assert_eq!(
        pipelined,
        [
            "sent s0", "sent s1", "got s1", "sent s2", "got s2", "sent s3", "got s3"
        ]
    );
    let naive = local.run_until(scripted_log(false, &bodies, 3)).await;
    assert_eq!(
        naive,
        [
            "sent s0", "got s1", "sent s1", "got s2", "sent s2", "got s3"
        ]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_body_without_a_token_is_a_failure_and_the_token_is_kept() {
    let bodies = [
        r#"{"next_batch":"s1"}"#,
        r#"{"rooms":{}}"#,
        r#"{"next_batch":"s2"}"#,
    ];
    let local = tokio::task::LocalSet::new();
    let log = local.run_until(scripted_log(true, &bodies, 2)).await;
    assert_eq!(
        log,
        [
            "sent s0",
            "sent s1",
            "got s1",
            "failed unexpected response: sync response without a top-level next_batch string",
            "sent s1",
            "sent s2",
            "got s2",
        ]
    );
}

/// A keep-alive HTTP/1.1 server on loopback answering `/sync?since=sN`
/// with `{"next_batch":"sN+1"}`, `answers` times, then holding the
/// connection open. It reports every `since` it receives, in order, and
/// every connection it accepts (as `connect`).
fn sync_server(answers: usize) -> (std::net::SocketAddr, mpsc::Receiver<String>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    let (tx, rx) = mpsc::channel(64);
    std::thread::spawn(move || {
        let mut answered = 0;
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            if tx.blocking_send("connect".into()).is_err() {
                return;
            }
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                buf.drain(..head_end + 4);
                let since = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|target| target.split("since=").nth(1))
                    .map(|s| s.split('&').next().unwrap_or(s).to_owned())
                    .unwrap_or_default();
                if tx.blocking_send(since.clone()).is_err() {
                    return;
                }
                if answered == answers {
                    // Hold the long-poll: the client ends the test.
                    continue;
                }
                answered += 1;
                let n: u32 = since.trim_start_matches('s').parse().unwrap_or(0);
                let body = format!(r#"{{"next_batch":"s{}","rooms":{{"join":{{}}}}}}"#, n + 1);
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if conn.write_all(response.as_bytes()).is_err() {
                    break;
                }
            }
        }
    });
    (addr, rx)
}

/// A client over a real [`Pool`] that, before handling the body carrying
/// token `sN`, waits until the server has received the request for `sN`:
/// that only happens if the loop sent it before handling the body.
struct Checked {
    pool: Rc<Pool>,
    session: Rc<Session>,
    server: mpsc::Receiver<String>,
    seen: Vec<String>,
    handled: Vec<String>,
    done: Option<oneshot::Sender<Vec<String>>>,
    stop_after: usize,
}

impl SyncClient for Checked {
    fn request(&mut self, since: &str) -> SyncRequest {
        let (pool, session, since) = (self.pool.clone(), self.session.clone(), since.to_owned());
        Box::pin(async move {
            matrix::sync_raw(&pool, &session, Some(&since), 0, Duration::from_secs(30)).await
        })
    }

    async fn received(&mut self, sent: Instant, resp: Response) {
        assert!(resp.received_at >= sent && resp.received_at <= Instant::now());
        let token = next_batch(&resp.body).expect("the server sends a token");
        while !self.seen.contains(&token) {
            match self.server.recv().await {
                Some(since) => self.seen.push(since),
                None => panic!("the server stopped"),
            }
        }
        self.handled.push(token);
        if self.handled.len() == self.stop_after
            && let Some(done) = self.done.take()
        {
            let _ = done.send(std::mem::take(&mut self.seen));
        }
    }

    fn failed(&mut self, _sent: Instant, error: CallError) {
        panic!("sync failed: {error}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn pipelined_loop_over_a_real_connection() {
    let (addr, server) = sync_server(5);
    let pool = Rc::new(Pool::new(addr, "localhost", 4, Duration::from_secs(30)).expect("pool"));
    let (done_tx, done_rx) = oneshot::channel();
    let client = Checked {
        pool: pool.clone(),
        session: Rc::new(Session {
            user_id: "@u:localhost".into(),
            access_token: "t".into(),
        }),
        server,
        seen: Vec::new(),
        handled: Vec::new(),
        done: Some(done_tx),
        stop_after: 5,
    };
    let local = tokio::task::LocalSet::new();
    let seen = local
        .run_until(async move {
            let task = tokio::task::spawn_local(drive(client, "s0".into(), true));
            // Without pipelining the loop waits for a request it has not
            // sent: this times out.
            let seen = tokio::time::timeout(Duration::from_secs(20), done_rx)
                .await
                .expect("every body handled after its successor was sent")
                .expect("the client reports");
            task.abort();
            seen
        })
        .await;
    // The tokens were followed in order, over one kept-alive connection.
    assert_eq!(seen, ["connect", "s0", "s1", "s2", "s3", "s4", "s5"]);
    assert_eq!(pool.connections_opened(), 1);
}
