//! Tessera relay (placeholder until the relay lands).
