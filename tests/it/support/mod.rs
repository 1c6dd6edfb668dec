//! Stand-ins and peers the integration tests talk to over real sockets.

pub mod lago;
