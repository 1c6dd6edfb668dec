//! Pure OCPP-J: the frame header parser, lenient 1.6 payload views and exact unit conversion.
//!
//! Nothing here does I/O or logs; every problem comes back as a typed error for the caller.

pub mod frame;
pub mod payload;
pub mod units;
