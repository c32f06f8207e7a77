//! `fieldgate`: the one command people type.
//!
//! # Layout
//! - `codec estimate`: the bandwidth a fleet's data needs ([`codec_estimate`]), reading CSV or
//!   JSON lines ([`readings_file`]) or synthetic sensor data.
//! - `sim serial|modbus`: simulated field devices on pseudo-terminals ([`sim`]).
//! - `bench forward|outage`: BENCH.md's end-to-end workloads against a `fieldgate-edge`
//!   process and an in-process cloud (`bench`, with the `demo` feature).

#[cfg(feature = "demo")]
mod bench;
mod codec_estimate;
#[cfg(feature = "demo")]
mod demo;
mod readings_file;
mod sim;

use std::fs::File;
use std::io::{self, BufReader};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fieldgate_shared::generate::{FleetConfig, SensorFleet};

#[derive(Parser)]
#[command(
    name = "fieldgate",
    version,
    about = "Fieldgate: edge-to-cloud gateway for field devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The batch codec that carries readings from gateways to clouds.
    Codec {
        #[command(subcommand)]
        command: CodecCommand,
    },
    /// The whole system on this machine: a cloud on SQLite, an edge agent, simulated serial
    /// and MQTT devices, live progress and an exactness check at the end.
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
    /// BENCH.md's forward and outage workloads end to end: MQTT devices, a `fieldgate-edge`
    /// process and a cloud on loopback (build the agent first:
    /// `cargo build --release -p fieldgate-edge`).
    #[cfg(feature = "demo")]
    Bench(bench::BenchArgs),
    /// Simulated field devices on pseudo-terminals, for trying a gateway without hardware.
    Sim {
        #[command(subcommand)]
        command: SimCommand,
    },
}

#[derive(Subcommand)]
enum SimCommand {
    /// Devices speaking the Fieldgate serial protocol, one per pseudo-terminal, with
    /// realistic signals and injectable faults.
    Serial(sim::SerialArgs),
    /// A Modbus RTU bus of units serving a register map on one pseudo-terminal.
    Modbus(sim::ModbusArgs),
}

#[derive(Subcommand)]
enum CodecCommand {
    /// Measure how many bytes per reading data needs in Fieldgate's batch format, against JSON
    /// lines and XOR-only float encoding: the uplink bandwidth a fleet will need.
    Estimate {
        /// CSV with header `device,metric,ts_ms,value` (optionally `quality`), or JSON lines of
        /// objects with those fields; `-` reads standard input.
        #[arg(required_unless_present = "synthetic", conflicts_with = "synthetic")]
        file: Option<String>,
        /// Use N readings of synthetic sensor data (1 s interval, 2 decimals) instead of a file.
        #[arg(long, value_name = "N")]
        synthetic: Option<u64>,
        /// Devices in the synthetic fleet.
        #[arg(long, default_value_t = 10, requires = "synthetic")]
        devices: usize,
        /// Seed of the synthetic data.
        #[arg(long, default_value_t = 1, requires = "synthetic")]
        seed: u64,
        /// Readings per batch, cut in arrival order as a gateway sends them.
        #[arg(long, default_value_t = 1_000)]
        batch: usize,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        #[cfg(feature = "demo")]
        Command::Demo(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                        tracing_subscriber::EnvFilter::new("error,rumqttd=off")
                    }),
                )
                .with_writer(std::io::stderr)
                .init();
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(demo::run(args))?;
        }
        #[cfg(feature = "demo")]
        Command::Bench(args) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(bench::run(args))?;
        }
        Command::Sim { command } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                match command {
                    SimCommand::Serial(args) => sim::serial(args).await,
                    SimCommand::Modbus(args) => sim::modbus(args).await,
                }
            })?;
        }
        Command::Codec {
            command:
                CodecCommand::Estimate {
                    file,
                    synthetic,
                    devices,
                    seed,
                    batch,
                    json,
                },
        } => {
            let estimate = match (file, synthetic) {
                (_, Some(n)) => {
                    anyhow::ensure!(devices > 0, "--devices must be at least 1");
                    let config = FleetConfig {
                        seed,
                        devices,
                        ..FleetConfig::default()
                    };
                    let input = format!(
                        "synthetic: {devices} devices × {} metrics at 1 s, seed {seed}",
                        config.metrics.len()
                    );
                    let readings = SensorFleet::new(config).take(n as usize).map(Ok);
                    codec_estimate::estimate(input, readings, batch)?
                }
                (Some(path), None) => {
                    let input: Box<dyn io::BufRead> = if path == "-" {
                        Box::new(io::stdin().lock())
                    } else {
                        let file =
                            File::open(&path).with_context(|| format!("cannot open {path}"))?;
                        Box::new(BufReader::with_capacity(1 << 16, file))
                    };
                    let readings = readings_file::ReadingsFile::new(input, &path)
                        .map(|r| r.map_err(anyhow::Error::from));
                    codec_estimate::estimate(path.clone(), readings, batch)?
                }
                (None, None) => unreachable!("clap requires a file or --synthetic"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&estimate)?);
            } else {
                codec_estimate::print_table(&estimate, &mut io::stdout().lock())?;
            }
        }
    }
    Ok(())
}
