//! `fieldgate-shared`: what the edge and the cloud must agree on.
//!
//! # Layout
//! - [`model`]: the data model: validated names, [`Value`], [`Reading`], [`Quality`], stream ids.
//! - [`codec`]: the versioned binary batch format that carries readings from edge to cloud.
//! - [`api`]: the edge↔cloud API types (batch header, ingest acknowledgement).
//! - [`generate`]: a deterministic generator of realistic sensor data for benches, tests,
//!   simulators and the demo.
//!
//! Invariant: this crate does no I/O. It is pure data and pure functions, so both sides (and
//! fuzzers) can use every part of it.

pub mod api;
pub mod codec;
pub mod generate;
pub mod model;

pub use api::{BatchHeader, IngestAck};
pub use model::{
    DeviceId, GatewayId, MetricName, NameError, Quality, Reading, ShortStr, StreamId, Value,
    ValueKind,
};
