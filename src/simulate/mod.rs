//! `simulate`: a fleet of OCPP 1.6J chargers against any central system URL (SteVe, the
//! bridge, nginx), for staging smoke tests and benchmarks.
//!
//! Every request is built from `rust-ocpp` types and every answer is checked against them; the
//! run is bounded by `--duration` and each reply by `--reply-timeout`. The summary counts what
//! happened and gives reply latency percentiles per action class.

pub mod charger;
pub mod messages;
pub mod stats;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use charger::Plan;
use messages::EnergyUnit;
use stats::Stats;

fn duration(text: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(text)
}

/// Options of `ocpp-lago-bridge simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Base websocket URL; each charger appends `/` and its chargeBoxId.
    #[arg(
        long,
        default_value = "ws://127.0.0.1:8180/steve/websocket/CentralSystemService"
    )]
    pub url: String,
    /// Number of chargers.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub chargers: u32,
    /// Charge box ids are this prefix followed by 1, 2, 3, ... (SIM-1, SIM-2, ...).
    #[arg(long, default_value = "SIM-")]
    pub id_prefix: String,
    /// Connections are spread evenly over this time.
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub ramp_up: Duration,
    /// Charging sessions per charger.
    #[arg(long, default_value_t = 1)]
    pub sessions_per_charger: u32,
    /// Time between two MeterValues of a session.
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub meter_interval: Duration,
    /// MeterValues per session (ignored when --session-length is given).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub meter_values_per_session: u32,
    /// Session length; sets MeterValues per session to length / meter interval.
    #[arg(long, value_parser = duration)]
    pub session_length: Option<Duration>,
    /// Energy charged per session, in kWh (Wh precision).
    #[arg(long, default_value_t = 10.0)]
    pub kwh_per_session: f64,
    /// Unit of the sampled energy values.
    #[arg(long, value_enum, default_value_t = EnergyUnit::Wh)]
    pub unit: EnergyUnit,
    /// Time between Heartbeats (sent between other messages when due).
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub heartbeat_interval: Duration,
    /// Overall cap: chargers still running then are stopped (an error unless --idle).
    #[arg(long, default_value = "10m", value_parser = duration)]
    pub duration: Duration,
    /// Longest wait for the answer to one CALL.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub reply_timeout: Duration,
    /// Connect, boot and only heartbeat until --duration ends (for memory benchmarks).
    #[arg(long)]
    pub idle: bool,
    /// The websocket subprotocol offered and required.
    #[arg(long, default_value = "ocpp1.6")]
    pub subprotocol: String,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Threads running the chargers: 1 (a single-threaded runtime, the cheapest per message:
    /// no cross-thread wake-ups) or N worker threads; 0 means one per core.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

impl SimulateArgs {
    /// The tokio runtime `--threads` asks for.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut builder = if self.threads == 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            tokio::runtime::Builder::new_multi_thread()
        };
        if self.threads > 1 {
            builder.worker_threads(self.threads);
        }
        builder.enable_all().build()
    }

    fn plan(&self) -> Result<Plan, String> {
        if !(0.0..=2_000_000.0).contains(&self.kwh_per_session) {
            return Err("--kwh-per-session must be between 0 and 2000000".into());
        }
        if self.heartbeat_interval.is_zero() {
            return Err("--heartbeat-interval must be more than 0".into());
        }
        let meter_values_per_session = match self.session_length {
            Some(length) if !self.meter_interval.is_zero() => (length.as_secs_f64()
                / self.meter_interval.as_secs_f64())
            .round()
            .max(1.0) as u32,
            Some(_) => return Err("--session-length needs a non-zero --meter-interval".into()),
            None => self.meter_values_per_session,
        };
        Ok(Plan {
            base_url: self.url.clone(),
            subprotocol: self.subprotocol.clone(),
            sessions: self.sessions_per_charger,
            meter_values_per_session,
            meter_interval: self.meter_interval,
            energy_per_session_wh: (self.kwh_per_session * 1000.0).round() as i32,
            unit: self.unit,
            heartbeat_interval: self.heartbeat_interval,
            reply_timeout: self.reply_timeout,
            idle: self.idle,
        })
    }
}

/// Runs the fleet, prints the summary; fails if any error occurred.
pub async fn run(args: SimulateArgs) -> ExitCode {
    let plan = match args.plan() {
        Ok(plan) => Arc::new(plan),
        Err(problem) => {
            eprintln!("error: {problem}");
            return ExitCode::from(2);
        }
    };
    let stats = Arc::new(Stats::default());
    let started = Instant::now();
    let deadline = started + args.duration;
    let mut chargers = JoinSet::new();
    for n in 0..args.chargers {
        let offset = args
            .ramp_up
            .mul_f64(f64::from(n) / f64::from(args.chargers));
        let charge_box_id = format!("{}{}", args.id_prefix, n + 1);
        let (plan, stats) = (Arc::clone(&plan), Arc::clone(&stats));
        chargers.spawn(async move {
            tokio::time::sleep_until(started + offset).await;
            let idle = plan.idle;
            let flow = async {
                let mut charger =
                    charger::connect(&charge_box_id, plan, Arc::clone(&stats), 0).await?;
                charger.run().await
            };
            match tokio::time::timeout_at(deadline, flow).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => stats.error(error.kind(), format!("{charge_box_id}: {error}")),
                Err(_) if idle => {}
                Err(_) => stats.error(
                    "unfinished_at_deadline",
                    format!("{charge_box_id}: still running when --duration ended"),
                ),
            }
        });
    }
    while chargers.join_next().await.is_some() {}

    let sessions_planned = if args.idle {
        0
    } else {
        u64::from(args.chargers) * u64::from(args.sessions_per_charger)
    };
    let summary = stats.summary(
        u64::from(args.chargers),
        sessions_planned,
        started.elapsed(),
    );
    if args.json {
        println!("{summary}");
    } else {
        print!("{}", stats::human(&summary));
    }
    for sample in stats.error_samples() {
        eprintln!("error: {sample}");
    }
    if stats.error_count() > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
