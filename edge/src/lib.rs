//! `fieldgate-edge`: the gateway agent.
//!
//! # Layout
//! - [`clean`]: the cleaning pipeline between ingress and the journal: schema and range checks,
//!   duplicate suppression, unit normalisation, spike and stuck-sensor detection, clock-skew
//!   correction, windowed statistics and anomaly flags, and the quarantine of what it rejects.
//! - [`config`]: the agent's TOML configuration.
//! - [`agent`]: builds and runs the parts, and stops them in order.
//! - [`writer`]: the journal writer: group commits, and the durable-commit answers to ingress.
//! - [`ingress`]: device ingress; [`ingress::mqtt`] is the local MQTT listener and embedded broker.
//! - [`http`]: the local HTTP API (`/healthz`, `/metrics`, `/status`).
//! - [`supervise`]: restarts a failed ingress task with backoff.
//! - [`journal`]: the durable journal on sled: sequence numbers, group-committed chunks, a
//!   cursor per cloud target, the disk quota and its overflow policy, corruption recovery.
//! - [`uplink`]: per cloud target: enrollment, batching, mutual-TLS ingest, in-order commit of
//!   the journal cursor, retries, failover and routing rules.

pub mod agent;
pub mod clean;
pub mod config;
pub mod http;
pub mod ingress;
pub mod journal;
pub mod supervise;
pub mod uplink;
pub mod writer;
