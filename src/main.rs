//! Command line: parsing, telemetry init, exit codes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{ArgGroup, Parser, Subcommand, ValueEnum};
use ocpp_lago_bridge::app::{self, RunOptions};
use ocpp_lago_bridge::check;
use ocpp_lago_bridge::config::{Config, LogFormat};
use ocpp_lago_bridge::operator::{self, ReplaySelection};
use ocpp_lago_bridge::reconcile;
#[cfg(feature = "simulate")]
use ocpp_lago_bridge::simulate;
use ocpp_lago_bridge::spool::store::Requeue;
use ocpp_lago_bridge::telemetry;

/// EX_CONFIG from sysexits.h: the configuration is invalid.
const EXIT_CONFIG: u8 = 78;

const ROOT_EXAMPLES: &str = "\
Examples:
  ocpp-lago-bridge check-config --config /etc/ocpp-lago-bridge/ocpp-lago-bridge.toml
  ocpp-lago-bridge check-config --online
  ocpp-lago-bridge run --config bridge.toml --log-format text
  ocpp-lago-bridge run --dry-run
  ocpp-lago-bridge spool stats --json
  ocpp-lago-bridge spool dead-letters --reason unmapped_id_tag
  ocpp-lago-bridge spool requeue --reason unmapped_id_tag
  ocpp-lago-bridge replay --session CP1:42
  ocpp-lago-bridge replay --since 6h
  ocpp-lago-bridge reconcile --from 48h --backfill
  ocpp-lago-bridge simulate --url ws://127.0.0.1:8180/steve/websocket/CentralSystemService --chargers 50

Global options (--config, --log-format) go before or after the command.
Exit codes: 0 ok, 1 the command failed (e.g. a session not found; reconcile: a session not
billed exactly), 2 usage error, 69 a service is unreachable (check-config --online,
reconcile), 78 the configuration is invalid.";

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Relays OCPP-J between chargers and SteVe and bills their energy in Lago",
    after_long_help = ROOT_EXAMPLES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Config file; without it `config/ocpp-lago-bridge.toml` if present, else built-in
    /// defaults. Not used by `simulate`.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log format of `run`; overrides `log.format`. `text` has no colours unless stderr is a
    /// terminal.
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormatArg>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon.
    #[command(after_long_help = "\
Examples:
  ocpp-lago-bridge run --config /etc/ocpp-lago-bridge/ocpp-lago-bridge.toml
  ocpp-lago-bridge run --dry-run --log-format text

SIGHUP reloads the allowlist, TLS certificate, subscription map and log level; SIGTERM drains.")]
    Run {
        /// Shadow mode: print each derived Lago event once as a JSON line on stdout instead of
        /// sending it. Uses its own spool beside `spool.path` (`spool.db` -> `spool.dry-run.db`),
        /// never the live one, so a restarted shadow bridge keeps its sessions.
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate a config file, listing every problem at once; exits 78 if it is invalid.
    #[command(after_long_help = "\
Offline it checks the structure and values, every file the config names (exists, readable,
parsable; secrets not readable by others), the spool directory (writable, not under a file)
and the URLs' shape, within a second. With --online it also, at most 10 s per service and all
at once: opens a WebSocket to SteVe for a test chargeBoxId, calls SteVe's REST API if [steve]
api_url is set, and asks Lago whether the API key is valid and the billable metric sums
`value`.

Exit codes: 0 valid, 78 problems in the configuration, 69 a service is unreachable.

Examples:
  ocpp-lago-bridge check-config --config /etc/ocpp-lago-bridge/ocpp-lago-bridge.toml
  ocpp-lago-bridge check-config --online")]
    CheckConfig {
        /// Also reach SteVe and Lago (bounded in time) and report each on its own line.
        #[arg(long)]
        online: bool,
    },
    /// Inspect and repair the spool.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
    /// Send stored events again: unchanged (safe: Lago dedupes), or re-derived with --rederive.
    #[command(
        group(ArgGroup::new("selection").required(true).args(["session", "since"])),
        after_long_help = "\
Examples:
  ocpp-lago-bridge replay --session CP1:42
  ocpp-lago-bridge replay --since 2026-11-01T00:00:00Z
  ocpp-lago-bridge replay --since 6h --rederive

A session the spool does not know is an error (exit 1)."
    )]
    Replay {
        /// One session, as CHARGE_BOX_ID:OCPP_TRANSACTION_ID (e.g. CP1:42).
        #[arg(long, value_name = "CHARGE_BOX_ID:OCPP_TRANSACTION_ID", value_parser = parse_session)]
        session: Option<(String, i64)>,
        /// Everything since this time: RFC 3339 (2026-11-01T00:00:00Z) or an age (6h, 2days).
        #[arg(long, value_name = "TIME_OR_AGE", value_parser = parse_since)]
        since: Option<i64>,
        /// Derive the events again from the stored tap records with the current rules, only for
        /// sessions Lago holds nothing of (needs the Lago API key).
        #[arg(long)]
        rederive: bool,
    },
    /// Audit the bill: every session SteVe recorded as stopped in a window against the events
    /// Lago holds and what the spool holds; --backfill queues what Lago is missing.
    #[command(after_long_help = "\
Classes (first rule that applies): ok (Lago's events sum exactly to SteVe's energy), pending
(the bridge holds undelivered events of it), dead_letter (an open dead letter, reason shown),
missing (Lago holds no event of it), mismatch (Lago's sum differs: needs a person, never fixed
automatically), unknown_in_steve (a Lago event whose session SteVe does not know).

Exit codes: 0 all ok/pending, 1 anything else found, 2 usage, 69 SteVe or Lago unreachable,
78 bad configuration. With --backfill the code describes the state after it.

Examples:
  ocpp-lago-bridge reconcile --from 48h
  ocpp-lago-bridge reconcile --from 2026-11-01T00:00:00Z --to 2026-12-01T00:00:00Z --format csv
  ocpp-lago-bridge reconcile --from 7days --backfill --wait 30s")]
    Reconcile {
        /// Start of the window (sessions stopped at or after it): RFC 3339 or an age (48h).
        #[arg(long, value_name = "TIME_OR_AGE", value_parser = parse_since)]
        from: i64,
        /// End of the window (sessions stopped at or before it): RFC 3339 or an age; now if
        /// left out.
        #[arg(long, value_name = "TIME_OR_AGE", value_parser = parse_since)]
        to: Option<i64>,
        /// `table` (for people: the sessions that are not ok, then totals), `json` (one object
        /// per line for every session) or `csv` (the same columns with a header).
        #[arg(long, value_enum, default_value = "table")]
        format: ReportFormat,
        /// Queue the events of every missing session, derived from SteVe's record by the same
        /// rules as live billing (origin "reconcile"); the running daemon sends them.
        #[arg(long)]
        backfill: bool,
        /// With --backfill: wait up to this long until what was queued is delivered (exit 1 if
        /// not by then).
        #[arg(long, value_name = "DURATION", requires = "backfill", value_parser = humantime::parse_duration)]
        wait: Option<std::time::Duration>,
    },
    /// Simulate a fleet of OCPP 1.6J chargers against a URL and summarize what happened.
    #[command(after_long_help = "\
Examples:
  ocpp-lago-bridge simulate --chargers 100 --ramp-up 10s --sessions-per-charger 2
  ocpp-lago-bridge simulate --url ws://127.0.0.1:8180/ocpp --idle --duration 5m --json")]
    #[cfg(feature = "simulate")]
    Simulate(simulate::SimulateArgs),
    /// Simulate a fleet of chargers: not in this build (the packaged daemon leaves the load
    /// generator out); use a default `cargo build --release`.
    #[cfg(not(feature = "simulate"))]
    #[command(disable_help_flag = true)]
    Simulate {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum SpoolCommand {
    /// Size, pending events and the age of the oldest.
    #[command(after_long_help = "\
Examples:
  ocpp-lago-bridge spool stats
  ocpp-lago-bridge spool stats --json | jq .pending_events")]
    Stats {
        /// One JSON object on stdout instead of aligned text.
        #[arg(long)]
        json: bool,
    },
    /// Events and anomalies that need an operator, one per line.
    #[command(after_long_help = "\
Examples:
  ocpp-lago-bridge spool dead-letters
  ocpp-lago-bridge spool dead-letters --reason unmapped_id_tag --json")]
    DeadLetters {
        /// Only this reason (e.g. unmapped_id_tag, lago_rejected).
        #[arg(long)]
        reason: Option<String>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back into the outbox once their cause is fixed; says per dead letter
    /// whether it was queued and why not, and exits 1 if any selected one was not.
    #[command(
        group(ArgGroup::new("which").required(true).args(["id", "reason", "all"])),
        after_long_help = "\
Examples:
  ocpp-lago-bridge spool requeue --id 17
  ocpp-lago-bridge spool requeue --reason unmapped_id_tag
  ocpp-lago-bridge spool requeue --all
  ocpp-lago-bridge spool requeue --id 23 --subscription sub-fleet-42

The running daemon sends what was requeued. Each selected dead letter is reported
as queued or NOT queued with the reason (a colliding transaction_id, no held
event, no subscription); only what was queued is closed, and the exit code is 1
if any selected one was not. --subscription bills a held event that has none
(a missing_start whose Start the bridge never saw) to the subscription named."
    )]
    Requeue {
        /// The dead letter with this id (the `#N` that `spool dead-letters` prints).
        #[arg(long)]
        id: Option<i64>,
        /// Every open dead letter with this reason (e.g. unmapped_id_tag).
        #[arg(long)]
        reason: Option<String>,
        /// Every open dead letter.
        #[arg(long)]
        all: bool,
        /// With --id: bill a held event that has no subscription (a `missing_start` whose Start
        /// was never seen, an unmapped id tag) to this Lago external_subscription_id.
        #[arg(long, requires = "id", conflicts_with_all = ["reason", "all"], value_name = "SUB")]
        subscription: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ReportFormat {
    Table,
    Json,
    Csv,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormatArg {
    Json,
    Text,
}

fn main() -> ExitCode {
    // Usage errors exit 2 (clap's code), `--help` and `--version` exit 0.
    let cli = Cli::parse();
    let log_format = cli.log_format;
    let config_path = cli.config;
    match cli.command {
        Command::CheckConfig { online } => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("error: cannot start the tokio runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let report = runtime.block_on(check::check_config(config_path.as_deref(), online));
            print!("{}", report.stdout());
            eprint!("{}", report.stderr());
            ExitCode::from(report.exit_code())
        }
        #[cfg(feature = "simulate")]
        Command::Simulate(args) => match args.runtime() {
            Ok(runtime) => runtime.block_on(simulate::run(args)),
            Err(error) => {
                eprintln!("error: cannot start the tokio runtime: {error}");
                ExitCode::FAILURE
            }
        },
        #[cfg(not(feature = "simulate"))]
        Command::Simulate { .. } => {
            eprintln!(
                "error: this build of ocpp-lago-bridge (the packaged daemon) leaves the load generator out; \
                 run `simulate` from a default `cargo build --release` (feature \"simulate\")"
            );
            ExitCode::FAILURE
        }
        Command::Run { dry_run } => {
            let config = match load(config_path.as_deref()) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let format = match log_format {
                Some(LogFormatArg::Json) => LogFormat::Json,
                Some(LogFormatArg::Text) => LogFormat::Text,
                None => config.log.format,
            };
            let options = RunOptions {
                dry_run,
                config_path,
            };
            report(run(config, format, options))
        }
        Command::Spool { command } => {
            let operation = match command {
                SpoolCommand::Stats { json } => {
                    Box::new(move |c: &Config| operator::stats(c, json)) as Operation
                }
                SpoolCommand::DeadLetters { reason, json } => {
                    Box::new(move |c: &Config| operator::dead_letters(c, reason.as_deref(), json))
                        as Operation
                }
                SpoolCommand::Requeue {
                    id,
                    reason,
                    all,
                    subscription,
                } => Box::new(move |c: &Config| {
                    // clap requires exactly one of the three (group `which`).
                    let selection = match (id, reason.as_deref(), all) {
                        (Some(id), _, _) => Requeue::Id(id),
                        (None, Some(reason), _) => Requeue::Reason(reason),
                        (None, None, _) => Requeue::All,
                    };
                    operator::requeue(c, selection, subscription.as_deref())
                }) as Operation,
            };
            operate(config_path.as_deref(), operation)
        }
        Command::Reconcile {
            from,
            to,
            format,
            backfill,
            wait,
        } => {
            let config = match load(config_path.as_deref()) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let format = match format {
                ReportFormat::Table => reconcile::Format::Table,
                ReportFormat::Json => reconcile::Format::Json,
                ReportFormat::Csv => reconcile::Format::Csv,
            };
            // Logs on stderr, text unless asked otherwise; stdout is the report alone.
            let log_format = match log_format {
                Some(LogFormatArg::Json) => LogFormat::Json,
                _ => LogFormat::Text,
            };
            if let Err(error) = telemetry::init_logging(log_format, &config.log.level) {
                eprintln!("error: {error}");
                return ExitCode::from(EXIT_CONFIG);
            }
            let to = to.unwrap_or_else(ocpp_lago_bridge::clock::unix_now);
            match tokio::runtime::Runtime::new() {
                Ok(runtime) => ExitCode::from(runtime.block_on(reconcile::run::command(
                    &config, from, to, format, backfill, wait,
                ))),
                Err(error) => {
                    eprintln!("error: cannot start the tokio runtime: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Replay {
            session,
            since,
            rederive,
        } => {
            // clap requires exactly one of the two (group `selection`).
            let selection = match (session, since) {
                (Some((charge_box_id, tx)), _) => ReplaySelection::Session(charge_box_id, tx),
                (None, Some(since)) => ReplaySelection::Since(since),
                (None, None) => unreachable!("clap requires --session or --since"),
            };
            operate(
                config_path.as_deref(),
                Box::new(move |c: &Config| {
                    tokio::runtime::Runtime::new()
                        .map_err(|e| operator::OperatorError::Refused(e.to_string()))?
                        .block_on(operator::replay(c, selection, rederive))
                }),
            )
        }
    }
}

type Operation = Box<dyn FnOnce(&Config) -> Result<String, operator::OperatorError>>;

fn load(config: Option<&Path>) -> Result<Config, ExitCode> {
    Config::load(config).map_err(|errors| {
        eprint!("{errors}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn operate(config: Option<&Path>, operation: Operation) -> ExitCode {
    let config = match load(config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match operation(&config) {
        Ok(output) => {
            if !output.is_empty() {
                println!("{output}");
            }
            ExitCode::SUCCESS
        }
        Err(operator::OperatorError::NotAllQueued(output)) => {
            println!("{output}");
            eprintln!("error: not every selected dead letter was queued");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `--session CHARGE_BOX_ID:OCPP_TRANSACTION_ID`.
fn parse_session(session: &str) -> Result<(String, i64), String> {
    let (charge_box_id, tx) = session
        .rsplit_once(':')
        .filter(|(charge_box_id, _)| !charge_box_id.is_empty())
        .ok_or("expected CHARGE_BOX_ID:OCPP_TRANSACTION_ID, e.g. CP1:42")?;
    let tx = tx
        .parse()
        .map_err(|_| format!("\"{tx}\" is not an OCPP transaction id (an integer)"))?;
    Ok((charge_box_id.to_string(), tx))
}

/// `--since`: an age ("6h") or an RFC 3339 time, as unix seconds.
fn parse_since(since: &str) -> Result<i64, String> {
    if let Ok(age) = humantime::parse_duration(since) {
        let now = ocpp_lago_bridge::clock::unix_now();
        return Ok(now.saturating_sub(i64::try_from(age.as_secs()).unwrap_or(i64::MAX)));
    }
    ocpp_lago_bridge::ocpp::units::parse_timestamp(since).map_err(|e| {
        format!(
            "neither an age like \"6h\" nor an RFC 3339 time like \"2026-11-01T00:00:00Z\": {e}"
        )
    })
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "the daemon stopped on an error");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config, format: LogFormat, options: RunOptions) -> anyhow::Result<()> {
    let log_level =
        telemetry::init_logging(format, &config.log.level).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(async {
        let metrics = telemetry::init_metrics().map_err(anyhow::Error::msg)?;
        app::run(config, options, metrics, log_level).await?;
        Ok(())
    });
    // Dropping a runtime waits for its blocking tasks without limit; a failed daemon must exit
    // (for its restart) even when one of them hangs on a stuck disk.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}
