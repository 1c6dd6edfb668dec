//! The fuzz targets' bodies, shared with the stable driver (`tests/it/fuzz_stable.rs` includes
//! `checks.rs` by path) so libFuzzer and CI exercise exactly the same invariants.

pub mod checks;
