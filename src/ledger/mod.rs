//! ledger stage (being built).
