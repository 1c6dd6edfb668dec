//! Command line: parsing, telemetry init, exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use ocpp_lago_bridge::app::{self, RunOptions};
use ocpp_lago_bridge::config::{Config, LogFormat};
use ocpp_lago_bridge::simulate;
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

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon.
    Run {
        /// Config file; without it `config/ocpp-lago-bridge.toml` if present, else built-in defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print each derived Lago event as a JSON line on stdout instead of sending it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate a config file, listing every problem; exits 78 if it is invalid.
    CheckConfig {
        /// Config file; without it `config/ocpp-lago-bridge.toml` if present, else built-in defaults.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Simulate a fleet of OCPP 1.6J chargers against a URL and summarize what happened.
    Simulate(simulate::SimulateArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormatArg {
    Json,
    Text,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(config.as_deref()) {
            Ok(_) => {
                println!("configuration is valid");
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprint!("{errors}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Simulate(args) => match tokio::runtime::Runtime::new() {
            Ok(runtime) => runtime.block_on(simulate::run(args)),
            Err(error) => {
                eprintln!("error: cannot start the tokio runtime: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config, dry_run } => {
            let config = match Config::load(config.as_deref()) {
                Ok(config) => config,
                Err(errors) => {
                    eprint!("{errors}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let format = match cli.log_format {
                Some(LogFormatArg::Json) => LogFormat::Json,
                Some(LogFormatArg::Text) => LogFormat::Text,
                None => config.log.format,
            };
            match run(config, format, RunOptions { dry_run }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!(error = %format!("{error:#}"), "the daemon stopped on an error");
                    eprintln!("error: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run(config: Config, format: LogFormat, options: RunOptions) -> anyhow::Result<()> {
    telemetry::init_logging(format, &config.log.level).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let metrics = telemetry::init_metrics().map_err(anyhow::Error::msg)?;
        app::run(config, options, metrics).await?;
        Ok(())
    })
}
