//! proxy stage (being built).
