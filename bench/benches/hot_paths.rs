//! Criterion benchmarks of the hot paths: building a signed event
//! (canonical JSON, content hash, ed25519 signature, reference hash),
//! verifying an event signature, parsing a send body with simd-json and with
//! serde_json, hash-ring lookups, sync token encoding, the relay's STUN
//! codec (Send indications, authenticated requests, ChannelData), and state
//! resolution of a forked 1,000-member room (`hot_paths/state_res.rs`).
//!
//! `cargo bench -p tessera-bench` runs them; results are recorded in
//! `docs/benchmarks.md` with the machine they ran on.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::signatures::Ed25519KeyPair;
use ruma::RoomVersionId;
use tessera_node::api::sync::SyncToken;
use tessera_shared::ring::Ring;

// Beside this bench's root rather than in `benches/`, where cargo would
// take it for a bench binary of its own.
#[path = "hot_paths/state_res.rs"]
mod state_res;

fn event_object(i: u64) -> CanonicalJsonObject {
    let value = serde_json::json!({
        "auth_events": ["$aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "$bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "$ccccccccccccccccccccccccccccccccccccccccccc"],
        "content": { "msgtype": "m.text", "body": format!("message number {i} with a little text in it") },
        "depth": 100 + i,
        "origin_server_ts": 1_700_000_000_000u64 + i,
        "prev_events": ["$ddddddddddddddddddddddddddddddddddddddddddd"],
        "room_id": "!room:bench.example",
        "sender": "@alice:bench.example",
        "type": "m.room.message",
    });
    match CanonicalJsonValue::try_from(value) {
        Ok(CanonicalJsonValue::Object(o)) => o,
        _ => unreachable!("the literal above is a canonical JSON object"),
    }
}

fn bench_events(c: &mut Criterion) {
    let key = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "a_bench".into()).expect("generated key parses");
    let rules = RoomVersionId::V11.rules().expect("v11 has rules");
    c.bench_function("event: hash + sign + reference hash (v11)", |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            let mut obj = event_object(i);
            ruma::signatures::hash_and_sign_event("bench.example", &key, &mut obj, &rules.redaction).expect("sign");
            black_box(ruma::signatures::reference_hash(&obj, &rules).expect("hash"))
        })
    });
    let mut signed = event_object(1);
    ruma::signatures::hash_and_sign_event("bench.example", &key, &mut signed, &rules.redaction).expect("sign");
    let mut keys = BTreeMap::new();
    let mut server_keys = BTreeMap::new();
    server_keys.insert("ed25519:a_bench".to_owned(), ruma::serde::Base64::new(key.public_key().to_vec()));
    keys.insert("bench.example".to_owned(), server_keys);
    c.bench_function("event: verify signature and hash (v11)", |b| {
        b.iter(|| black_box(ruma::signatures::verify_event(&keys, &signed, &rules)).is_ok())
    });
}

fn bench_parsing(c: &mut Criterion) {
    let body = br#"{"msgtype":"m.text","body":"hello there, this is a typical chat message of moderate length","m.mentions":{"user_ids":["@bob:example.org"]},"m.relates_to":{"m.in_reply_to":{"event_id":"$abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ"}}}"#;
    c.bench_function("send body: simd-json to serde_json::Value", |b| {
        b.iter(|| {
            let mut buf = body.to_vec();
            black_box(simd_json::serde::from_slice::<serde_json::Value>(&mut buf).expect("parse"))
        })
    });
    c.bench_function("send body: serde_json to serde_json::Value", |b| {
        b.iter(|| black_box(serde_json::from_slice::<serde_json::Value>(body).expect("parse")))
    });
}

fn bench_ring_and_tokens(c: &mut Criterion) {
    let ring = Ring::single_node(16, 64).expect("ring");
    let rooms: Vec<String> = (0..1024).map(|i| format!("!room{i}:example.org")).collect();
    c.bench_function("ring: owner of a room id (16 shards x 64 vnodes)", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % rooms.len();
            black_box(ring.owner(rooms[i].as_bytes()))
        })
    });
    let token = SyncToken { heads: (0..16).map(|i| 1_000_000 + i * 7919).collect() };
    let encoded = token.encode();
    c.bench_function("sync token: encode (16 shards)", |b| b.iter(|| black_box(token.encode())));
    c.bench_function("sync token: parse (16 shards)", |b| b.iter(|| black_box(SyncToken::parse(&encoded, 16))));
}

fn bench_stun(c: &mut Criterion) {
    use tessera_relay::stun::{Class, Message, MessageBuilder, attr, channel_data, method};
    let peer: std::net::SocketAddr = "198.51.100.7:40000".parse().expect("addr");
    let payload = [0x5au8; 160];
    let tid = [7u8; 12];
    c.bench_function("stun: build Send indication (160 B, fingerprint)", |b| {
        b.iter(|| {
            let mut m = MessageBuilder::new(method::SEND, Class::Indication, tid);
            m.xor_addr(attr::XOR_PEER_ADDRESS, peer).attr(attr::DATA, &payload).fingerprint();
            black_box(m.finish())
        })
    });
    let mut m = MessageBuilder::new(method::SEND, Class::Indication, tid);
    m.xor_addr(attr::XOR_PEER_ADDRESS, peer).attr(attr::DATA, &payload).fingerprint();
    let send = m.finish();
    c.bench_function("stun: parse Send indication (160 B)", |b| b.iter(|| black_box(Message::parse(black_box(&send)).is_ok())));
    let key = [0x42u8; 16];
    let mut m = MessageBuilder::new(method::CREATE_PERMISSION, Class::Request, tid);
    m.xor_addr(attr::XOR_PEER_ADDRESS, peer).attr(attr::USERNAME, b"1700000000:@alice:example.org").attr(attr::REALM, b"example.org").attr(attr::NONCE, b"abcdefghijklmnop").integrity(&key).fingerprint();
    let request = m.finish();
    c.bench_function("stun: parse + verify MESSAGE-INTEGRITY (CreatePermission)", |b| {
        b.iter(|| {
            let msg = Message::parse(black_box(&request)).expect("valid");
            black_box(msg.verify_integrity(&key))
        })
    });
    let mut frame = channel_data::header(0x4001, 160).to_vec();
    frame.extend_from_slice(&payload);
    c.bench_function("stun: ChannelData parse (160 B)", |b| b.iter(|| black_box(channel_data::parse(black_box(&frame)))));
}

criterion_group!(benches, bench_events, bench_parsing, bench_ring_and_tokens, bench_stun, state_res::bench_state_res);
criterion_main!(benches);
