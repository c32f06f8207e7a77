//! The edge↔cloud API types: what a batch says about itself, and what the cloud answers.

use serde::{Deserialize, Serialize};

use crate::model::{GatewayId, StreamId};

/// The header of an encoded batch (see [`crate::codec`] for its byte layout).
///
/// A stream's readings carry contiguous sequence numbers assigned by the gateway's journal; a
/// batch covers `first_seq..=last_seq` of its stream. `count` is the number of readings it holds:
/// equal to the range's length for raw streams, smaller for aggregate streams, where one reading
/// summarises many journal entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchHeader {
    pub version: u8,
    pub gateway: GatewayId,
    pub stream: StreamId,
    pub first_seq: u64,
    pub last_seq: u64,
    pub count: u32,
    /// CRC-32 (IEEE) of the whole encoded batch except the checksum field itself.
    pub checksum: u32,
}

impl BatchHeader {
    /// How many sequence numbers the batch covers.
    pub fn seq_span(&self) -> u64 {
        self.last_seq - self.first_seq + 1
    }
}

/// The cloud's answer to an ingested batch.
///
/// Ingest is idempotent per stream: the cloud keeps a high-water mark (the last sequence number it
/// has stored) and stores only what lies above it, so a resent batch is acknowledged without being
/// stored twice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestAck {
    pub gateway: GatewayId,
    pub stream: StreamId,
    /// Everything up to and including this sequence number is durably stored.
    pub high_water_mark: u64,
    /// Readings of this batch stored now.
    pub stored: u64,
    /// Readings of this batch that were already stored (resends and overlaps).
    pub duplicates: u64,
}

/// The cloud refused a batch because it would leave a hole in the stream: the gateway must resend
/// starting at `resume_from`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestGap {
    pub stream: StreamId,
    pub resume_from: u64,
}
