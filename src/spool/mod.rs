//! I/O: the durable SQLite spool. `store` is the file and its statements; the writer thread that
//! group-commits tap records with the ledger state and events they produce lives beside it.

pub mod store;
