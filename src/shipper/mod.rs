//! The shipper: batching, rate limit, retry and Lago response handling. `outcome` holds its
//! pure decisions, so every answer in EVENTS-CONTRACT.md is unit-tested without I/O.

pub mod outcome;
