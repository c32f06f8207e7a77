//! `fieldgate-edge`: the gateway agent.
//!
//! # Layout
//! - [`clean`]: the cleaning pipeline between ingress and the journal: schema and range checks,
//!   duplicate suppression, unit normalisation, spike and stuck-sensor detection, clock-skew
//!   correction, windowed statistics and anomaly flags, and the quarantine of what it rejects.
//! - [`journal`]: the durable journal on sled: sequence numbers, group-committed chunks, a
//!   cursor per cloud target, the disk quota and its overflow policy, corruption recovery.

pub mod clean;
pub mod journal;
