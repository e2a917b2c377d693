//! The HTTP edge: turns hyper requests into [`Req`], authenticates,
//! dispatches to `crate::api`, and turns results into responses with CORS
//! headers and spec error bodies. Request bodies are bounded by
//! `limits.request_body_bytes_max`; JSON nesting by `limits.json_depth_max`.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use ruma::OwnedUserId;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{ApiError, ApiResult};
use crate::shard::Shard;

/// The response type of every handler.
pub type Resp = http::Response<Full<Bytes>>;

/// A parsed request.
pub struct Req {
    pub method: Method,
    /// Path segments after the API prefix, percent-decoded.
    pub segs: Vec<String>,
    /// The full path, for routing by prefix.
    pub path: String,
    pub query: HashMap<String, Vec<String>>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub peer: Option<SocketAddr>,
    /// The route table's name for the endpoint, set when a route matches.
    pub endpoint: Cell<&'static str>,
}

/// The authenticated caller.
#[derive(Clone, Debug)]
pub struct Authed {
    pub user: OwnedUserId,
    pub device: String,
    pub is_guest: bool,
    pub token: String,
}

/// Decodes a path segment: `%XX` is a byte; an invalid escape stays as it
/// is, and invalid UTF-8 is replaced.
fn percent_decode(s: &str) -> String {
    decode_component(s, false)
}

/// Decodes a path segment, or a query string component (`plus_is_space`).
fn decode_component(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    if !bytes.iter().any(|&b| b == b'%' || (plus_is_space && b == b'+')) {
        return s.to_owned();
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    match String::from_utf8(out) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

fn parse_query(q: &str) -> HashMap<String, Vec<String>> {
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        map.entry(decode_component(k, true)).or_default().push(decode_component(v, true));
    }
    map
}

/// Nesting depth of a JSON text, ignoring brackets inside strings.
fn json_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut in_str, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

impl Req {
    pub fn query(&self, key: &str) -> Option<&str> {
        self.query.get(key).and_then(|v| v.first()).map(String::as_str)
    }

    pub fn query_all(&self, key: &str) -> &[String] {
        self.query.get(key).map(Vec::as_slice).unwrap_or(&[])
    }

    /// A numeric query parameter, or 400 M_INVALID_PARAM.
    pub fn query_u64(&self, key: &str) -> ApiResult<Option<u64>> {
        match self.query(key) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| ApiError::invalid_param(format!("`{key}` must be a non-negative integer"))),
        }
    }

    pub fn access_token(&self) -> Option<String> {
        if let Some(h) = self.headers.get(header::AUTHORIZATION).and_then(|h| h.to_str().ok())
            && let Some(t) = h.strip_prefix("Bearer ")
        {
            return Some(t.trim().to_owned());
        }
        self.query("access_token").map(str::to_owned)
    }

    fn check_depth(&self, shard: &Shard) -> ApiResult<()> {
        if json_depth(&self.body) > shard.config.limits.json_depth_max {
            return Err(ApiError::bad_json("JSON nesting is too deep"));
        }
        Ok(())
    }

    /// Parses the body as `T` (serde_json; needed for ruma types).
    pub fn json<T: DeserializeOwned>(&self, shard: &Shard) -> ApiResult<T> {
        self.check_depth(shard)?;
        let body: &[u8] = if self.body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &self.body };
        serde_json::from_slice(body).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => ApiError::bad_json(format!("Invalid request body: {e}")),
            _ => ApiError::not_json("Request body is not valid JSON"),
        })
    }

    /// Parses the body as a JSON object with simd-json (hot paths: event content).
    pub fn json_object_fast(&self, shard: &Shard) -> ApiResult<Value> {
        self.check_depth(shard)?;
        let mut buf = self.body.to_vec();
        let value: Value = simd_json::serde::from_slice(&mut buf).map_err(|_| ApiError::not_json("Request body is not valid JSON"))?;
        if !value.is_object() {
            return Err(ApiError::bad_json("Request body must be a JSON object"));
        }
        Ok(value)
    }
}

fn cors(headers: &mut HeaderMap) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, PUT, DELETE, OPTIONS"));
    headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("X-Requested-With, Content-Type, Authorization"));
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: &Value) -> Resp {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = http::Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A plain-text response (metrics).
pub fn text_response(status: StatusCode, body: String, content_type: &'static str) -> Resp {
    let mut resp = http::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

pub fn error_response(e: &ApiError) -> Resp {
    json_response(e.status, &e.body())
}

/// Authenticates the request's access token.
pub fn authenticate(shard: &Shard, req: &Req) -> ApiResult<Authed> {
    let token = req.access_token().ok_or_else(ApiError::missing_token)?;
    let found = shard.token(&token)?.ok_or_else(|| ApiError::unknown_token(false))?;
    if let Some(exp) = found.expires_ms
        && crate::room::now_ms() >= exp
    {
        return Err(ApiError::unknown_token(true));
    }
    Ok(Authed { user: found.user, device: found.device, is_guest: found.is_guest, token })
}

/// Entry point for every request on a shard.
pub async fn handle(shard: Rc<Shard>, req: http::Request<hyper::body::Incoming>, peer: Option<SocketAddr>) -> Resp {
    let started = Instant::now();
    let metrics = shard.metrics();
    let _in_flight = crate::metrics::Held::new(&metrics.in_flight);
    let method = req.method().clone();
    // Requests refused before routing (body too large or unreadable).
    let mut endpoint = crate::metrics::UNROUTED;
    let mut resp = match build_req(&shard, req, peer).await {
        Ok(r) if r.method == Method::OPTIONS => {
            endpoint = crate::metrics::PREFLIGHT;
            json_response(StatusCode::OK, &serde_json::json!({}))
        }
        Ok(r) => {
            let resp = match crate::api::route(&shard, &r).await {
                Ok(resp) => resp,
                Err(e) => error_response(&e),
            };
            endpoint = r.endpoint.get();
            resp
        }
        Err(e) => error_response(&e),
    };
    cors(resp.headers_mut());
    let status = resp.status().as_u16();
    if status == 413 {
        // The rest of the oversized body is never read, so this connection
        // cannot carry another request: say so instead of dropping it.
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    metrics.requests.record(&method, endpoint, status, started.elapsed().as_micros() as u64);
    resp
}

async fn build_req(shard: &Shard, req: http::Request<hyper::body::Incoming>, peer: Option<SocketAddr>) -> ApiResult<Req> {
    let limit = shard.config.limits.request_body_bytes_max;
    if let Some(len) = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok())
        && len > limit
    {
        return Err(ApiError::too_large(format!("Request body exceeds {limit} bytes")));
    }
    let (parts, body) = req.into_parts();
    let body = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| if e.is::<http_body_util::LengthLimitError>() { ApiError::too_large(format!("Request body exceeds {limit} bytes")) } else { ApiError::bad_json("Could not read request body") })?
        .to_bytes();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(parse_query).unwrap_or_default();
    let segs = path.split('/').skip(1).map(percent_decode).collect();
    Ok(Req { method: parts.method, segs, path, query, headers: parts.headers, body, peer, endpoint: Cell::new(crate::metrics::UNRECOGNIZED) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_ignores_brackets_in_strings() {
        assert_eq!(json_depth(br#"{"a":"{{{{[[["}"#), 1);
        assert_eq!(json_depth(br#"{"a":[{"b":[]}]}"#), 4);
        assert_eq!(json_depth(br#"{"a":"\"{"}"#), 1);
    }

    #[test]
    fn query_and_path_decoding() {
        let q = parse_query("a=1&b=%21room%3Ax&a=2&flag");
        assert_eq!(q["a"], vec!["1", "2"]);
        assert_eq!(q["b"], vec!["!room:x"]);
        assert_eq!(q["flag"], vec![""]);
        assert_eq!(percent_decode("%23alias%3Aexample.org"), "#alias:example.org");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("a+b%2"), "a+b%2");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
        assert_eq!(percent_decode("%E2%9C%93%FF"), "\u{2713}\u{FFFD}");
        let q = parse_query("q=a+b%2Bc&e=%7B%22k%22%3A1%7D%25");
        assert_eq!(q["q"], vec!["a b+c"]);
        assert_eq!(q["e"], vec![r#"{"k":1}%"#]);
    }
}
