//! `fieldgate sim serial|modbus`: simulated field devices on pseudo-terminals, for trying a
//! gateway (or any serial tool) without hardware. They run until Ctrl-C or `--duration`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use fieldgate_firmware_bridge::modbus::register_map::RegisterMap;
use fieldgate_firmware_bridge::modbus::simulator::{
    Fault, ModbusSimulator, SimulatedUnit, SimulatedValues, SimulatorOptions,
};
use fieldgate_firmware_bridge::sim_serial::{spawn_devices, DeviceConfig, Trigger};

/// The register map `sim modbus` serves when none is given.
const DEFAULT_REGISTER_MAP: &str =
    include_str!("../../firmware-bridge/examples/register-maps/energy-meter.toml");

#[derive(clap::Args)]
pub struct SerialArgs {
    /// Devices to simulate, each on its own pseudo-terminal.
    #[arg(long, default_value_t = 4)]
    devices: usize,
    /// Milliseconds between samples.
    #[arg(long, default_value_t = 1_000)]
    interval_ms: u64,
    /// Samples per READINGS frame.
    #[arg(long, default_value_t = 1)]
    samples_per_frame: usize,
    /// Chance per frame of a burst of garbage bytes before it.
    #[arg(long, default_value_t = 0.0)]
    garbage: f64,
    /// Chance per frame that it is never written.
    #[arg(long, default_value_t = 0.0)]
    drop_frames: f64,
    /// Chance per bit on the line that it flips.
    #[arg(long, default_value_t = 0.0)]
    bit_errors: f64,
    /// Chance per sample of a spike.
    #[arg(long, default_value_t = 0.0)]
    spikes: f64,
    /// Chance per sample that a metric gets stuck for a while.
    #[arg(long, default_value_t = 0.0)]
    stuck: f64,
    /// Error of every device clock, in milliseconds.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    clock_skew_ms: i64,
    /// Keep unacknowledged readings across simulated reboots.
    #[arg(long)]
    persist_unacked: bool,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<u64>,
}

#[derive(clap::Args)]
pub struct ModbusArgs {
    /// Register map (TOML) the simulated units serve; default: an energy meter.
    #[arg(long)]
    map: Option<PathBuf>,
    /// Units on the bus, with unit ids 1..=N.
    #[arg(long, default_value_t = 2)]
    units: u8,
    /// Milliseconds between new samples of the values.
    #[arg(long, default_value_t = 1_000)]
    interval_ms: u64,
    /// Also make the port reachable at this path (a symlink), stable across restarts.
    #[arg(long)]
    link: Option<PathBuf>,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<u64>,
}

async fn until_stopped(duration: Option<u64>) {
    match duration {
        Some(seconds) => {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(seconds)) => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

pub async fn serial(args: SerialArgs) -> Result<()> {
    anyhow::ensure!(args.devices > 0, "--devices must be at least 1");
    let mut fleet = spawn_devices(args.devices, |i| {
        let mut config = DeviceConfig::for_index(i);
        config.sample_interval_ms = args.interval_ms;
        config.samples_per_frame = args.samples_per_frame;
        config.persist_unacked = args.persist_unacked;
        // A long run would otherwise keep every acknowledged reading in memory.
        config.keep_acked_readings = false;
        let faults = &mut config.faults;
        faults.garbage = Trigger::with_probability(args.garbage);
        faults.drop_frames = Trigger::with_probability(args.drop_frames);
        faults.bit_errors = Trigger::with_probability(args.bit_errors);
        faults.spikes = Trigger::with_probability(args.spikes);
        faults.stuck = Trigger::with_probability(args.stuck);
        faults.clock_skew_ms = args.clock_skew_ms;
        config
    })
    .context("starting the simulated devices")?;
    println!(
        "simulated serial devices (Fieldgate serial protocol, see firmware-bridge/PROTOCOL.md):"
    );
    // Holding the gateway ends open keeps each pty up while gateways come and go.
    let mut held_open = Vec::new();
    for device in &mut fleet.devices {
        println!(
            "  {:<10} {}",
            device.device_id.as_str(),
            device.path.display()
        );
        held_open.push(device.gateway_end.take());
    }
    println!("point a gateway's serial ports at these paths; Ctrl-C stops.");

    let snapshots: Vec<_> = fleet.devices.iter().map(|d| d.snapshots.clone()).collect();
    let stop = until_stopped(args.duration);
    tokio::pin!(stop);
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticker.tick() => {
                let (mut produced, mut acked, mut resent, mut pending) = (0, 0, 0, 0);
                for snapshot in &snapshots {
                    let snapshot = snapshot.borrow();
                    produced += snapshot.stats.readings_produced;
                    acked += snapshot.stats.readings_acked;
                    resent += snapshot.stats.frames_resent;
                    pending += snapshot.pending_readings;
                }
                println!("readings produced {produced}, acknowledged {acked}, waiting {pending}; frames resent {resent}");
            }
        }
    }
    let devices = fleet.shutdown().await;
    drop(held_open);
    println!(
        "\n{:<10} {:>9} {:>9} {:>8} {:>8} {:>7}",
        "device", "produced", "acked", "resent", "nacked", "faults"
    );
    for device in &devices {
        let stats = device.stats();
        let faults = stats.fault_garbage_bursts
            + stats.fault_frames_dropped
            + stats.fault_bits_flipped
            + stats.fault_spikes
            + stats.fault_stuck_readings;
        println!(
            "{:<10} {:>9} {:>9} {:>8} {:>8} {:>7}",
            device.device_id().as_str(),
            stats.readings_produced,
            stats.readings_acked,
            stats.frames_resent,
            stats.frames_nacked,
            faults
        );
    }
    Ok(())
}

pub async fn modbus(args: ModbusArgs) -> Result<()> {
    anyhow::ensure!(
        (1..=247).contains(&args.units),
        "--units must be 1 to 247 (Modbus unit ids)"
    );
    let map = match &args.map {
        Some(path) => RegisterMap::from_file(path)?,
        None => RegisterMap::from_toml_str(DEFAULT_REGISTER_MAP, "energy-meter.toml")?,
    };
    let map = Arc::new(map);
    let units: Vec<SimulatedUnit> = (1..=args.units)
        .map(|unit_id| SimulatedUnit {
            unit_id,
            map: map.clone(),
            values: SimulatedValues::Generated {
                seed: unit_id as u64,
                sample_interval: Duration::from_millis(args.interval_ms),
            },
            fault: Fault::None,
        })
        .collect();
    let simulator = ModbusSimulator::start(
        &units,
        SimulatorOptions {
            link_path: args.link.clone(),
            ..SimulatorOptions::default()
        },
    )
    .context("starting the Modbus simulator")?;
    println!(
        "Modbus RTU units 1..={} ({}, {} registers each) on {}; Ctrl-C stops.",
        args.units,
        map.model(),
        map.registers().len(),
        simulator.port_path().display()
    );
    until_stopped(args.duration).await;
    let counters = simulator.counters();
    simulator.stop().await;
    println!("\n{:<6} {:>9} {:>9}", "unit", "requests", "answers");
    for (unit, counters) in &counters.units {
        println!("{unit:<6} {:>9} {:>9}", counters.requests, counters.answers);
    }
    Ok(())
}
