//! Ingress from devices: each source turns what devices send into readings for the journal.

pub mod mqtt;
