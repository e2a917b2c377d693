//! Fuzz target: arbitrary bytes through the STUN/ChannelData decoders, the
//! encode/decode round trip and the TURN state machine
//! (`tessera_relay::fuzz::fuzz_stun_parse` states the checks). The same
//! body runs over the seed corpus in `corpus/stun_parse` on stable Rust
//! (`relay/tests/fuzz_corpus.rs`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tessera_relay::fuzz::fuzz_stun_parse(data));
