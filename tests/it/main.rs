//! The one integration test binary: the built `ocpp-lago-bridge` as a child process, talking
//! over real loopback sockets to independent OCPP peers (PyPI `ocpp`, npm `ocpp-rpc`) and to a
//! byte-recording upstream. Peers are installed by `.ci/run`.

mod admission;
mod billing;
mod chaos;
mod contract;
mod corpus;
mod cutover;
mod delivery;
mod fuzz_stable;
mod hardening;
mod lago_client;
mod lago_interop;
mod operations;
mod operator_cli;
mod operator_experience;
mod outbox_collision;
mod packaging;
mod peers_selfcheck;
mod private_files;
mod reconcile;
mod relay;
mod simulate;
mod spool_commands;
mod steve_recovery;
mod supervision;
mod support;
