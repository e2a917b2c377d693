//! Sync loops: one syncing user long-polling `GET /sync?since=` forever,
//! pipelined so that the next request goes out as soon as the previous
//! response's `next_batch` is known.
//!
//! A response is handled in two steps. First [`next_batch`] finds the
//! top-level `next_batch` token in the raw body with a byte scan that
//! decodes nothing else (Tessera and Synapse both write it as the first key,
//! so the scan usually stops after a few dozen bytes). With pipelining on
//! (`sync.pipelined`, the default) the next request is then dispatched at
//! once, and only afterwards is the previous body decoded and its
//! deliveries accounted ([`SyncClient::received`]). With pipelining off the
//! order is reversed, as a naive client does it.
//!
//! Every request runs as its own task, which reads the whole response and
//! stamps it ([`Response::received_at`]) while the loop may still be busy
//! with the previous body, so an arrival is measured to when its bytes came
//! in, not to when they were parsed.
//!
//! On the wire this is plain HTTP/1.1 keep-alive, one request at a time per
//! connection: a `/sync` request needs the token of the response before it,
//! so there is never a second request that could be queued behind an
//! unfinished response. That is safe with any HTTP/1.1 server, Synapse
//! (Twisted) included, which is why pipelining is on by default.
//!
//! Bounds: a loop has at most one request in flight and one body being
//! handled, so its memory is at most two response bodies (each capped by
//! the pool's body limit). Failed requests are retried with the same token
//! after an exponential back-off from [`BACKOFF_MIN`] to [`BACKOFF_MAX`].

use crate::http::Response;
use crate::matrix::CallError;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// The first back-off after a failed sync.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// The longest back-off between failed syncs.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// One `/sync` request, from dispatch to the whole body.
pub type SyncRequest = Pin<Box<dyn Future<Output = Result<Response, CallError>>>>;

/// What a sync loop does with the server; the generator's engine and the
/// tests implement it.
pub trait SyncClient {
    /// `GET /sync?since={since}`. The future is run as a task of its own,
    /// so it must not borrow the client.
    fn request(&mut self, since: &str) -> SyncRequest;

    /// A successful response to the request dispatched at `sent`: decode
    /// the body and account its deliveries (at `resp.received_at`).
    fn received(&mut self, sent: Instant, resp: Response) -> impl Future<Output = ()>;

    /// The request dispatched at `sent` failed, or its body had no
    /// `next_batch`.
    fn failed(&mut self, sent: Instant, error: CallError);
}

/// A request running as its own task; aborted when dropped, so aborting a
/// sync loop also ends its request.
struct InFlight {
    sent: Instant,
    task: JoinHandle<Result<Response, CallError>>,
}

impl InFlight {
    fn start<C: SyncClient>(client: &mut C, since: &str) -> Self {
        let sent = Instant::now();
        let task = tokio::task::spawn_local(client.request(since));
        Self { sent, task }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs one sync loop from token `since` until the task running it is
/// aborted. Must run inside a `LocalSet`.
pub async fn drive<C: SyncClient>(mut client: C, mut since: String, pipelined: bool) {
    let mut backoff = BACKOFF_MIN;
    let mut inflight = InFlight::start(&mut client, &since);
    loop {
        let sent = inflight.sent;
        let outcome = match (&mut inflight.task).await {
            Ok(outcome) => outcome,
            // Only an abort or a panic of the request task ends up here;
            // either way this loop has nothing left to do.
            Err(_) => return,
        };
        let found = outcome.and_then(|resp| match next_batch(&resp.body) {
            Some(token) => Ok((resp, token)),
            None => Err(CallError::Decode(
                "sync response without a top-level next_batch string".into(),
            )),
        });
        let (resp, token) = match found {
            Ok(found) => found,
            Err(e) => {
                client.failed(sent, e);
                // Back off so a failing server is not hammered in a tight
                // loop; the same token is tried again.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                inflight = InFlight::start(&mut client, &since);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        since = token;
        if pipelined {
            inflight = InFlight::start(&mut client, &since);
            // Give the request task, and then its connection, one turn of
            // the scheduler to write the request before this task spends
            // its time on the previous body. Only latency depends on it:
            // the request goes out whatever the order.
            tokio::task::yield_now().await;
            client.received(sent, resp).await;
        } else {
            client.received(sent, resp).await;
            inflight = InFlight::start(&mut client, &since);
        }
    }
}

/// The top-level `"next_batch"` string of a `/sync` response body, found
/// without decoding anything else; `None` when the body is not a JSON
/// object with such a string member. Nested members of the same name (an
/// event's content, say) are skipped with their parent value.
///
/// The scan is iterative (no recursion, whatever the nesting depth) and
/// linear in the bytes before the token. It checks only the structure it
/// walks over; the full decode of the body still rejects anything else
/// that is malformed.
pub fn next_batch(body: &[u8]) -> Option<String> {
    let mut i = skip_ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(body, i);
        if body.get(i) != Some(&b'"') {
            // `}` of an object without the member, or not JSON.
            return None;
        }
        let (key_end, key_escaped) = string_end(body, i)?;
        let is_next_batch = if key_escaped {
            serde_json::from_slice::<String>(&body[i..key_end]).ok()? == "next_batch"
        } else {
            &body[i + 1..key_end - 1] == b"next_batch"
        };
        i = skip_ws(body, key_end);
        if body.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(body, i + 1);
        if is_next_batch {
            if body.get(i) != Some(&b'"') {
                return None;
            }
            let (end, escaped) = string_end(body, i)?;
            let raw = &body[i + 1..end - 1];
            return if escaped || raw.iter().any(|b| *b < 0x20) {
                // Rare: let the JSON decoder handle escapes (and reject raw
                // control characters).
                serde_json::from_slice(&body[i..end]).ok()
            } else {
                std::str::from_utf8(raw).ok().map(str::to_owned)
            };
        }
        i = skip_ws(body, skip_value(body, i)?);
        match body.get(i) {
            Some(b',') => i += 1,
            _ => return None,
        }
    }
}

fn skip_ws(body: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = body.get(i) {
        i += 1;
    }
    i
}

/// For the string starting at `body[start] == b'"'`: the index just past
/// its closing quote, and whether it contains escapes.
fn string_end(body: &[u8], start: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    let mut j = start + 1;
    while let Some(&b) = body.get(j) {
        match b {
            b'\\' => {
                escaped = true;
                j += 2;
            }
            b'"' => return Some((j + 1, escaped)),
            _ => j += 1,
        }
    }
    None
}

/// The index just past the JSON value starting at `body[i]`.
fn skip_value(body: &[u8], i: usize) -> Option<usize> {
    match body.get(i)? {
        b'"' => string_end(body, i).map(|(end, _)| end),
        b'{' | b'[' => {
            // Depth only: strings are skipped whole so that brackets and
            // quotes inside them do not count.
            let mut depth = 0usize;
            let mut j = i;
            while let Some(&b) = body.get(j) {
                match b {
                    b'"' => {
                        j = string_end(body, j)?.0;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            // A number, `true`, `false` or `null`: up to the next delimiter.
            let end = body[i..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .map_or(body.len(), |n| i + n);
            (end > i).then_some(end)
        }
    }
}

#[cfg(test)]
mod tests;
