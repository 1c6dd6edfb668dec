//! Command line: parsing, telemetry init, exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ocpp_lago_bridge::app::{self, RunOptions};
use ocpp_lago_bridge::config::{Config, LogFormat};
use ocpp_lago_bridge::operator::{self, ReplaySelection};
use ocpp_lago_bridge::simulate;
use ocpp_lago_bridge::spool::store::Requeue;
use ocpp_lago_bridge::telemetry;

/// EX_CONFIG from sysexits.h: the configuration is invalid.
const EXIT_CONFIG: u8 = 78;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Relays OCPP-J between chargers and SteVe and bills their energy in Lago"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format; overrides `log.format`.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,
}

#[derive(Args, Debug, Clone)]
struct ConfigArg {
    /// Config file; without it `config/ocpp-lago-bridge.toml` if present, else built-in defaults.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Print each derived Lago event as a JSON line on stdout instead of sending it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate a config file, listing every problem; exits 78 if it is invalid.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Inspect and repair the spool.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
    /// Send stored events again: unchanged (safe: Lago dedupes), or re-derived with --rederive.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        /// One session, as CHARGE_BOX_ID:OCPP_TRANSACTION_ID.
        #[arg(long, conflicts_with = "since", required_unless_present = "since")]
        session: Option<String>,
        /// Everything since this time: RFC 3339 ("2026-11-01T00:00:00Z") or an age ("6h").
        #[arg(long)]
        since: Option<String>,
        /// Derive the events again from the stored tap records with the current rules, only for
        /// sessions Lago holds nothing of.
        #[arg(long)]
        rederive: bool,
    },
    /// Simulate a fleet of OCPP 1.6J chargers against a URL and summarize what happened.
    Simulate(simulate::SimulateArgs),
}

#[derive(Subcommand, Debug)]
enum SpoolCommand {
    /// Size, pending events and the age of the oldest.
    Stats {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
    },
    /// Events and anomalies that need an operator, one per line.
    DeadLetters {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this reason (e.g. unmapped_id_tag, lago_rejected).
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back into the outbox once their cause is fixed; says per dead letter
    /// whether it was queued and why not, and exits 1 if any selected one was not.
    Requeue {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, group = "which")]
        id: Option<i64>,
        #[arg(long, group = "which")]
        reason: Option<String>,
        #[arg(long, group = "which")]
        all: bool,
        /// With --id: bill a held event that has no subscription (a `missing_start` whose Start
        /// was never seen, an unmapped id tag) to this Lago external_subscription_id.
        #[arg(long, requires = "id", conflicts_with_all = ["reason", "all"], value_name = "SUB")]
        subscription: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormatArg {
    Json,
    Text,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = cli.log_format;
    match cli.command {
        Command::CheckConfig { config } => match load(&config) {
            Ok(config) => {
                for warning in ocpp_lago_bridge::config::environment_warnings(&config.proxy) {
                    eprintln!("warning: {warning}");
                }
                println!("configuration is valid");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Simulate(args) => match args.runtime() {
            Ok(runtime) => runtime.block_on(simulate::run(args)),
            Err(error) => {
                eprintln!("error: cannot start the tokio runtime: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config: config_arg,
            dry_run,
        } => {
            let config = match load(&config_arg) {
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
                config_path: config_arg.config,
            };
            report(run(config, format, options))
        }
        Command::Spool { command } => {
            let (config, result) = match command {
                SpoolCommand::Stats { config, json } => (
                    config,
                    Box::new(move |c: &Config| operator::stats(c, json)) as Operation,
                ),
                SpoolCommand::DeadLetters {
                    config,
                    reason,
                    json,
                } => (
                    config,
                    Box::new(move |c: &Config| operator::dead_letters(c, reason.as_deref(), json))
                        as Operation,
                ),
                SpoolCommand::Requeue {
                    config,
                    id,
                    reason,
                    all,
                    subscription,
                } => (
                    config,
                    Box::new(move |c: &Config| {
                        let selection = match (id, reason.as_deref(), all) {
                            (Some(id), _, _) => Requeue::Id(id),
                            (None, Some(reason), _) => Requeue::Reason(reason),
                            (None, None, true) => Requeue::All,
                            (None, None, false) => {
                                return Err(operator::OperatorError::Refused(
                                    "say which: --id N, --reason R or --all".into(),
                                ));
                            }
                        };
                        operator::requeue(c, selection, subscription.as_deref())
                    }) as Operation,
                ),
            };
            operate(&config, result)
        }
        Command::Replay {
            config,
            session,
            since,
            rederive,
        } => {
            let selection = match parse_replay(session, since) {
                Ok(selection) => selection,
                Err(message) => {
                    eprintln!("error: {message}");
                    return ExitCode::from(2);
                }
            };
            operate(
                &config,
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

fn load(config: &ConfigArg) -> Result<Config, ExitCode> {
    Config::load(config.config.as_deref()).map_err(|errors| {
        eprint!("{errors}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn operate(config: &ConfigArg, operation: Operation) -> ExitCode {
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

fn parse_replay(session: Option<String>, since: Option<String>) -> Result<ReplaySelection, String> {
    if let Some(session) = session {
        let (charge_box_id, tx) = session
            .rsplit_once(':')
            .ok_or("--session takes CHARGE_BOX_ID:OCPP_TRANSACTION_ID")?;
        let tx = tx
            .parse()
            .map_err(|_| format!("--session: {tx:?} is not an OCPP transaction id"))?;
        return Ok(ReplaySelection::Session(charge_box_id.to_string(), tx));
    }
    let since = since.ok_or("say which: --session or --since")?;
    if let Ok(age) = humantime::parse_duration(&since) {
        let now = ocpp_lago_bridge::spool::writer::unix_now();
        return Ok(ReplaySelection::Since(now - age.as_secs() as i64));
    }
    ocpp_lago_bridge::ocpp::units::parse_timestamp(&since)
        .map(ReplaySelection::Since)
        .map_err(|e| format!("--since {since:?}: neither an age like \"6h\" nor RFC 3339: {e}"))
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
