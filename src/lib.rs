//! ocpp-lago-bridge relays OCPP-J between charge points and SteVe, taps the billing messages
//! (StartTransaction, MeterValues, StopTransaction), accounts every charging session and turns
//! its energy into Lago usage events. Data flows proxy → tap → ledger → spool → shipper → lago;
//! the only thing flowing back is the commit acknowledgement that releases a held reply.

pub mod app;
pub mod billing;
pub mod check;
pub mod clock;
pub mod config;
pub mod event;
pub mod lago;
#[cfg(test)]
mod layering_tests;
pub mod ledger;
pub mod ocpp;
pub mod operator;
pub mod proxy;
pub mod reconcile;
pub mod recovery;
pub mod rlimit;
pub mod secrets;
pub mod shipper;
pub mod shutdown;
/// The load generator behind `ocpp-lago-bridge simulate`; feature "simulate" (default), left out
/// of the packaged daemon.
#[cfg(feature = "simulate")]
pub mod simulate;
pub mod spool;
pub mod start_lookup;
pub mod steve;
pub mod supervise;
pub mod systemd;
pub mod tap;
pub mod telemetry;
pub mod tls;

/// Installs rustls' ring provider process-wide (reqwest is built without a default one: the
/// aws-lc provider needs cmake and nasm). Idempotent; every HTTP client calls it first.
pub(crate) fn ensure_rustls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Locks a mutex that is only held for short, non-panicking updates: a poisoned one still holds
/// consistent data, so its guard is taken rather than propagating another thread's panic.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
