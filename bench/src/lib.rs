//! Micro-benchmarks of Tessera's hot paths live in `benches/`; the
//! side-by-side comparison scripts (against Synapse and coturn) live beside
//! them in this folder. Run with `cargo bench -p tessera-bench`.
