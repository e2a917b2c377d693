//! Pure code shared by `tessera-node` and `tessera-relay`.
//!
//! Nothing in this crate performs I/O, reads clocks or draws random numbers:
//! callers pass time and randomness in, so every function is deterministic
//! and tested in isolation.

pub mod listeners;
pub mod ring;
pub mod turn_rest;
