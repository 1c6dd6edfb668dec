//! The integration tests' Lago stand-in (`tests/it/support/lago.rs`, which follows
//! docs/lago-contract.md) as a process of its own, for benchmarks only: `bench/outage-drain` starts
//! it when the "outage" ends and polls `GET /stand-in/stats` for what it stored. Not part of the
//! daemon.
//!
//! `cargo run --release --example lago_standin -- --listen 127.0.0.1:3000 --api-key K
//!  --metric charging_energy_kwh --subscription SIM-0 [--mode postgres|clickhouse] [--batch-limit 100]`

#[path = "../tests/it/support/lago.rs"]
mod lago;

use std::net::SocketAddr;

use clap::{Parser, ValueEnum};
use lago::{LagoStandIn, MetricDef, StandInConfig, StoreMode};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    /// Unique (subscription, transaction_id); a duplicate fails the whole batch.
    Postgres,
    /// Duplicates accepted; the same (code, subscription, transaction_id, timestamp) overwrites.
    Clickhouse,
}

/// A Lago stand-in for benchmarks, on loopback.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on (loopback only).
    #[arg(long)]
    listen: SocketAddr,
    /// The API key it accepts (`Authorization: Bearer <key>`).
    #[arg(long)]
    api_key: String,
    /// A billable metric (sum_agg on `value`) it knows; repeatable.
    #[arg(long = "metric", required = true)]
    metrics: Vec<String>,
    /// An external subscription id `GET /api/v1/subscriptions/{id}` finds; repeatable.
    #[arg(long = "subscription")]
    subscriptions: Vec<String>,
    /// Which of Lago's event stores it imitates.
    #[arg(long, value_enum, default_value_t = Mode::Postgres)]
    mode: Mode,
    /// Most events per batch; more is refused with 422 `too_many_events`.
    #[arg(long, default_value_t = 100)]
    batch_limit: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.listen.ip().is_loopback(),
        "--listen must be a loopback address: this is a benchmark stand-in"
    );
    let config = StandInConfig {
        api_key: args.api_key,
        mode: match args.mode {
            Mode::Postgres => StoreMode::Postgres,
            Mode::Clickhouse => StoreMode::ClickHouse,
        },
        batch_limit: args.batch_limit,
        metrics: args
            .metrics
            .iter()
            .map(|code| MetricDef::sum_of_value(code))
            .collect(),
        subscriptions: args.subscriptions,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let stand_in = LagoStandIn::start_on(args.listen, config).await?;
        eprintln!("lago stand-in listening on {}", stand_in.url());
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        drop(stand_in);
        Ok(())
    })
}
