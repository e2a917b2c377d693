//! tessera-relay: a thread-per-core STUN/TURN relay.
//!
//! The protocol core is sans-IO and deterministic: [`stun`] (message codec),
//! [`turn`] (allocation state machine), [`auth`] (credentials and nonces),
//! [`policy`] (which peers may be relayed to) and [`metrics`] (counters).
//! The I/O driver in [`driver`] runs one glommio executor per core, each
//! with its own SO_REUSEPORT listening sockets, so a client's allocation,
//! relay socket and permissions live on one core and the data path never
//! crosses cores.

pub mod auth;
pub mod config;
pub mod driver;
#[doc(hidden)]
pub mod fuzz;
pub mod metrics;
pub mod policy;
pub mod stun;
pub mod turn;

/// The hash map of the per-packet lookups (allocations, permissions,
/// channels, relay sockets): foldhash, seeded at random per map, is several
/// times cheaper than the standard SipHash for these small keys, and its
/// seed keeps colliding keys hard to choose from outside.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
