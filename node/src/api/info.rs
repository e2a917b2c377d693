//! Discovery and server information:
//! `GET /_matrix/client/versions`, `GET /.well-known/matrix/{client,server}`,
//! `GET /_matrix/client/v3/capabilities`, `GET /_matrix/client/v3/login`,
//! `GET /_matrix/client/v3/voip/turnServer`, and Prometheus `GET /metrics`.


use http::StatusCode;
use serde_json::{Value, json};

use crate::error::{ApiError, ApiResult};
use crate::http::{Authed, Resp, text_response};
use crate::shard::Shard;

/// Spec versions this node implements.
pub const SPEC_VERSIONS: &[&str] = &["r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10", "v1.11", "v1.12", "v1.13", "v1.14", "v1.15", "v1.16"];

/// GET /_matrix/client/versions
pub fn versions() -> Value {
    json!({ "versions": SPEC_VERSIONS, "unstable_features": {} })
}

/// GET /.well-known/matrix/client
pub fn well_known_client(shard: &Shard) -> Value {
    json!({ "m.homeserver": { "base_url": shard.config.base_url() } })
}

/// GET /.well-known/matrix/server
pub fn well_known_server(shard: &Shard) -> Value {
    let port = shard.config.listen.address.port();
    json!({ "m.server": format!("{}:{}", shard.server_name, port) })
}

/// GET /.well-known/matrix/support: the configured contacts and page, or
/// 404 while none is configured.
pub fn well_known_support(shard: &Shard) -> ApiResult<Value> {
    let support = &shard.config.support;
    if support.contacts.is_empty() && support.page.is_none() {
        return Err(ApiError::not_found("No support information is configured"));
    }
    let contacts: Vec<Value> = support
        .contacts
        .iter()
        .map(|c| {
            let mut v = json!({ "role": c.role });
            if let Some(id) = &c.matrix_id {
                v["matrix_id"] = json!(id);
            }
            if let Some(email) = &c.email_address {
                v["email_address"] = json!(email);
            }
            v
        })
        .collect();
    let mut body = json!({});
    if !contacts.is_empty() {
        body["contacts"] = json!(contacts);
    }
    if let Some(page) = &support.page {
        body["support_page"] = json!(page);
    }
    Ok(body)
}

/// GET /_matrix/client/v3/capabilities
pub fn capabilities(shard: &Shard) -> Value {
    json!({
        "capabilities": {
            "m.change_password": { "enabled": true },
            "m.room_versions": {
                "default": shard.config.rooms.default_version,
                "available": { "10": "stable", "11": "stable", "12": "stable" }
            },
            "m.set_displayname": { "enabled": true },
            "m.set_avatar_url": { "enabled": true },
            "m.profile_fields": { "enabled": true },
            "m.3pid_changes": { "enabled": false },
            "m.get_login_token": { "enabled": false }
        }
    })
}

/// GET /_matrix/client/v3/login
pub fn login_flows() -> Value {
    json!({ "flows": [ { "type": "m.login.password" } ] })
}

/// GET /_matrix/client/v3/voip/turnServer: TURN REST credentials, or `{}`
/// when no TURN server is configured.
pub fn turn_server(shard: &Shard, auth: &Authed) -> Value {
    let turn = &shard.config.turn;
    if turn.shared_secret.is_empty() || turn.uris.is_empty() {
        return json!({});
    }
    let expiry = crate::room::now_ms() / 1000 + turn.ttl_secs;
    let (username, password) = tessera_shared::turn_rest::turn_rest_credentials(turn.shared_secret.as_bytes(), auth.user.as_str(), expiry);
    json!({ "username": username, "password": password, "uris": turn.uris, "ttl": turn.ttl_secs })
}

/// GET /metrics: Prometheus text format, summed over shards.
pub fn metrics(shard: &Shard) -> Resp {
    let out = crate::metrics::render(&crate::metrics::Scrape { shards: &shard.metrics, store: &shard.store_stats, shard_count: shard.count });
    text_response(StatusCode::OK, out, "text/plain; version=0.0.4")
}
