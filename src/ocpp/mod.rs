//! ocpp stage (being built).
