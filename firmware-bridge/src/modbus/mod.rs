//! Modbus RTU polling: register maps, decoding, the poller task and a device simulator.
//!
//! # Layout
//! - [`register_map`]: a device model's register map in TOML (format in its docs), validated.
//! - [`config`]: the poller's serial port (a [`crate::transport::SerialPortConfig`]), its polling
//!   settings and its devices in TOML, validated.
//! - [`read_plan`]: groups a map's registers into as few read requests as possible.
//! - [`value_codec`]: raw registers to readings and back; pure.
//! - [`rtu`]: RTU framing without I/O (CRC-16, the simulator's request decoder and answers).
//! - [`transport`]: the poller's shared handle on the line; documents what tokio-modbus does with
//!   stray bytes and how this crate works around it.
//! - [`stats`]: per-device and port counters, readable as a snapshot while polling.
//! - [`poller`]: the task that owns the line, polls on schedule and reopens a lost port.
//! - [`simulator`]: a simulated bus of Modbus devices on a pseudo-terminal, with faults.
//! - [`pty`]: pseudo-terminals for the simulator.
//!
//! # Using it
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use fieldgate_firmware_bridge::modbus::{spawn_poller, PollerConfig};
//!
//! let config = PollerConfig::from_file("modbus-poller.toml".as_ref())?;
//! let (readings_tx, mut readings_rx) = tokio::sync::mpsc::channel(1024);
//! let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
//! let (task, stats) = spawn_poller(config, readings_tx, async move {
//!     let _ = stop_rx.await;
//! })?;
//! while let Some(reading) = readings_rx.recv().await {
//!     println!("{reading:?} {:?}", stats.snapshot().device(&reading.device));
//! }
//! let _ = stop_tx.send(());
//! task.await??;
//! # Ok(())
//! # }
//! ```

pub mod config;
pub mod poller;
#[cfg(unix)]
pub mod pty;
pub mod read_plan;
pub mod register_map;
pub mod rtu;
#[cfg(unix)]
pub mod simulator;
pub mod stats;
pub mod transport;
pub mod value_codec;

pub use config::{DeviceConfig, PollerConfig, PollerConfigError, PollingConfig};
pub use poller::{spawn_poller, ModbusPoller, PollerError};
pub use read_plan::{plan_reads, ReadRequest};
pub use register_map::{
    RegisterKind, RegisterMap, RegisterMapError, RegisterSpec, RegisterType, WordOrder,
};
#[cfg(unix)]
pub use simulator::{
    Fault, ModbusSimulator, SimulatedBus, SimulatedUnit, SimulatedValues, SimulatorCounters,
    SimulatorError, SimulatorOptions,
};
pub use stats::{DeviceCounters, PollerSnapshot, PollerStats, PortCounters};
pub use value_codec::{decode_read_response, encode_value, DecodedValue, ResponseData};
