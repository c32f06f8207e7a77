//! `fieldgate-firmware-bridge`: everything that speaks to terminal devices' firmware.
//!
//! # Layout
//! - [`protocol`]: the Fieldgate serial protocol (see `PROTOCOL.md`): COBS framing, CRC-32C,
//!   message types, an incremental frame decoder. Sans-IO and `no_std` without `alloc`, so device
//!   firmware can use it.
//! - [`modbus`]: Modbus RTU polling: register maps, decoding, the poller task, a device simulator.
//! - [`sim_serial`]: a simulated device on the serial protocol (sans-IO state machine, faults,
//!   async runner, devices on pseudo-terminals), for tests, demos and `fieldgate sim serial`.
//!
//! The modules below need the `std` feature (on by default): the serial transport, device
//! sessions, Modbus RTU polling and the simulators.
#![cfg_attr(not(feature = "std"), no_std)]

#[cfg(feature = "std")]
pub mod modbus;
pub mod protocol;
#[cfg(feature = "std")]
pub mod session;
#[cfg(feature = "std")]
pub mod sim_serial;
#[cfg(feature = "std")]
pub mod transport;
