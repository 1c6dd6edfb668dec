//! The integration test binary: real peers over loopback sockets, no mocks of our own I/O.

mod lago_client;
mod support;
