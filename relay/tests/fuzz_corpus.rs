//! Runs the `stun_parse` fuzz body over the committed seed corpus
//! (`relay/fuzz/corpus/stun_parse/`), and over every truncation of every
//! seed, on stable Rust: the fuzz target itself needs nightly and
//! libFuzzer, so this is how its checks run in CI. Inputs the fuzzer finds
//! that once failed belong in the corpus too.

use std::path::PathBuf;

use tessera_relay::fuzz::fuzz_stun_parse;
use tessera_relay::stun::{Message, channel_data};

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/stun_parse");
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| {
            let path = e.expect("directory entry").path();
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            (path.display().to_string(), bytes)
        })
        .collect();
    seeds.sort();
    seeds
}

#[test]
fn corpus_covers_valid_malformed_and_channel_data_inputs() {
    let seeds = corpus();
    assert!(seeds.len() >= 40, "the seed corpus shrank to {} files", seeds.len());
    let parses = seeds.iter().filter(|(_, b)| Message::parse(b).is_ok()).count();
    let channel = seeds.iter().filter(|(_, b)| channel_data::parse(b).is_some()).count();
    let neither = seeds.len() - parses - channel;
    assert!(parses >= 20 && channel >= 3 && neither >= 10, "parses {parses}, ChannelData {channel}, neither {neither}");
}

#[test]
fn fuzz_body_holds_on_every_seed_and_truncation() {
    for (name, bytes) in corpus() {
        for end in 0..=bytes.len() {
            let run = std::panic::catch_unwind(|| fuzz_stun_parse(&bytes[..end]));
            assert!(run.is_ok(), "{name} truncated to {end} bytes fails the fuzz body");
        }
    }
}
