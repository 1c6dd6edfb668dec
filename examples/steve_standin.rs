//! The integration tests' SteVe REST stand-in (`tests/it/support/steve.rs`: SteVe's
//! `GET /steve/api/v1/transactions` with its filters, HTTP Basic) as a process of its own, for
//! benchmarks only: `bench/reconcile-scale` fills it with `--generate N` stopped sessions and
//! reads `GET /stand-in/stats` for the requests it answered. Not part of the daemon.
//!
//! `cargo run --release --example steve_standin -- --listen 127.0.0.1:8080 --user U
//!  --password P --generate 100000 --subscriptions 100 --base-time 1767261600`
//!
//! Session i (0-based) of the generated set: transactionPk i + 1, charge box `CB-{i % 1000}`
//! (4 digits), idTag `SUB-{i % subscriptions}` (3 digits), startValue i × 10 Wh, stopValue
//! startValue + 1000 + i % 997 Wh, started at base-time + i s, stopped 1800 s later. The
//! benchmark script derives the same sessions' events from the same rule.

// The tests use more of the stand-in (delays, the request log) than this process does.
#[allow(dead_code)]
#[path = "../tests/it/support/steve.rs"]
mod steve;

use std::net::SocketAddr;

use clap::Parser;
use steve::{SteveAuth, SteveRest, SteveTransaction};

/// A SteVe REST stand-in for benchmarks, on loopback.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on (loopback only).
    #[arg(long)]
    listen: SocketAddr,
    /// The web user with API access (HTTP Basic).
    #[arg(long)]
    user: String,
    /// Its API password.
    #[arg(long)]
    password: String,
    /// How many stopped sessions SteVe knows.
    #[arg(long, default_value_t = 0)]
    generate: u64,
    /// How many distinct idTags (one Lago subscription each) the sessions spread over.
    #[arg(long, default_value_t = 100)]
    subscriptions: u64,
    /// Unix seconds of the first session's start.
    #[arg(long)]
    base_time: i64,
}

fn iso(unix: i64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp(unix).expect("a calendar time");
    at.format(&time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].000Z"
    ))
    .expect("formats")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.listen.ip().is_loopback(),
        "--listen must be a loopback address: this is a benchmark stand-in"
    );
    anyhow::ensure!(args.subscriptions > 0, "--subscriptions must be at least 1");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let steve = SteveRest::start_on(
            args.listen,
            SteveAuth::Basic {
                user: args.user,
                password: args.password,
            },
            None,
        )
        .await?;
        for i in 0..args.generate {
            let n = i as i64;
            let start_wh = n * 10;
            let started = args.base_time + n;
            steve.register(SteveTransaction {
                id: n + 1,
                charge_box_id: format!("CB-{:04}", i % 1000),
                connector_id: 1,
                id_tag: format!("SUB-{:03}", i % args.subscriptions),
                start_value_wh: start_wh,
                start_timestamp: iso(started),
                stop_value_wh: Some(start_wh + 1000 + n % 997),
                stop_timestamp: Some(iso(started + 1800)),
            });
        }
        eprintln!(
            "steve stand-in listening on {} with {} sessions",
            steve.url(),
            args.generate
        );
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        drop(steve);
        Ok(())
    })
}
