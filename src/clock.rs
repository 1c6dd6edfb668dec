//! The bridge clock, shared by every stage that stamps or ages a record (proxy, shipper,
//! operator, check, reconcile, the spool writer), so it lives below all of them.

/// The bridge clock in unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
