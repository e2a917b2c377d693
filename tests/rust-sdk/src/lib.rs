//! Tests only: see `tests/client.rs`.
