//! tessera-node: a thread-per-core Matrix homeserver node.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of this crate.

pub mod api;
pub mod config;
pub mod db;
pub mod e2ee;
pub mod error;
pub mod filter;
pub mod http;
pub mod keys;
pub mod keystore;
pub mod metrics;
pub mod pdu;
pub mod presence;
pub mod push;
pub mod ratelimit;
pub mod room;
pub mod server;
pub mod side;
pub mod shard;
pub mod storage;
