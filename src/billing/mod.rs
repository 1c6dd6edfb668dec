//! The billing core: tap records in, the ledger (`ledger/`, pure) applied, what it derives
//! appended to the spool, charger replies released once on disk. It owns what a record *means*:
//! restoring the ledger at start, anomalies (`anomaly`: log + counter + dead letter through one
//! `emit`), parking Stops of unknown sessions and asking `recovery.rs` for their start
//! (`start_lookup`), `transaction_id` collisions, and housekeeping policy (retention pruning,
//! disk-size alarms, overflow ingestion). `writer` runs it on the one writer thread, which also
//! serves the shipper's leases and settlements (`spool::lease`) on the same connection.
//!
//! Must not: do SQL itself (that is `spool/`'s), await SteVe or Lago, or hold a reply longer
//! than its record's commit.

pub mod anomaly;
pub mod writer;
