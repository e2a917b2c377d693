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
