//! The Fieldgate serial protocol: frames, messages and an incremental decoder. Sans-IO and
//! `no_std` without `alloc`: it is fed bytes and hands back frames; whoever owns the port does
//! the I/O. `PROTOCOL.md` in this crate is the specification a device maker implements.
//!
//! A frame on the wire is `COBS(version, type, seq, payload, CRC-32C) 0x00`.

pub mod cobs;
pub mod crc;
pub mod message;

pub use message::{
    DeviceReading, DeviceValue, FirmwareState, List, Message, NackReason, MAX_DECIMAL_SCALE,
};

/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Largest frame before COBS: header, payload and CRC.
pub const MAX_FRAME_LEN: usize = 512;
/// Largest frame on the wire: COBS overhead plus the delimiter.
pub const MAX_WIRE_LEN: usize = cobs::max_encoded_len(MAX_FRAME_LEN) + 1;
/// Version, type and sequence number.
const HEADER_LEN: usize = 4;
const CRC_LEN: usize = 4;
/// Largest firmware chunk that fits a frame (header, offset, CRC).
pub const MAX_CHUNK_LEN: usize = MAX_FRAME_LEN - HEADER_LEN - 4 - CRC_LEN;

/// What can be wrong with a frame. Every one is counted by [`FrameDecoder`], never a panic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// A frame longer than [`MAX_FRAME_LEN`] (more than [`MAX_WIRE_LEN`] - 1 bytes without a
    /// delimiter on the wire): the bytes were dropped.
    FrameTooLarge,
    /// Not valid COBS.
    BadCobs,
    /// Shorter than a header and a CRC.
    TooShort,
    /// The CRC does not match: the frame was damaged on the line.
    BadCrc,
    UnsupportedVersion(u8),
    /// The CRC matched, so `seq` is the sender's and the frame can be NACKed as unsupported.
    UnknownType {
        seq: u16,
        type_code: u8,
    },
    /// The CRC matched but the payload does not parse (or, when encoding, cannot be built):
    /// the frame can be NACKed as invalid.
    Malformed {
        seq: u16,
        why: &'static str,
    },
}

impl core::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ProtocolError::FrameTooLarge => write!(f, "frame larger than {MAX_FRAME_LEN} bytes"),
            ProtocolError::BadCobs => write!(f, "invalid COBS encoding"),
            ProtocolError::TooShort => write!(f, "frame shorter than its header and CRC"),
            ProtocolError::BadCrc => write!(f, "CRC mismatch"),
            ProtocolError::UnsupportedVersion(v) => write!(f, "unsupported protocol version {v}"),
            ProtocolError::UnknownType { seq, type_code } => {
                write!(f, "frame {seq}: unknown message type {type_code:#04x}")
            }
            ProtocolError::Malformed { seq, why } => {
                write!(f, "frame {seq}: malformed payload: {why}")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ProtocolError {}

/// A decoded frame: its sender's sequence number and its message.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Frame<'a> {
    pub seq: u16,
    pub message: Message<'a>,
}

/// Encodes `message` with sequence number `seq` into `out` as wire bytes (COBS and the 0x00
/// delimiter included) and returns their length. `out` of [`MAX_WIRE_LEN`] bytes always suffices.
pub fn encode_frame(
    seq: u16,
    message: &Message<'_>,
    out: &mut [u8],
) -> Result<usize, ProtocolError> {
    let mut frame = [0u8; MAX_FRAME_LEN];
    let mut writer = message::Writer {
        buf: &mut frame[..MAX_FRAME_LEN - CRC_LEN],
        len: 0,
    };
    writer
        .bytes(&[VERSION, message.type_code()])
        .and_then(|()| writer.bytes(&seq.to_le_bytes()))
        .and_then(|()| message.write_payload(&mut writer))
        .map_err(|error| error.with_seq(seq))?;
    let len = writer.len;
    let crc = crc::crc32c(&frame[..len]);
    frame[len..len + CRC_LEN].copy_from_slice(&crc.to_le_bytes());
    let len = len + CRC_LEN;
    let encoded = cobs::encode(&frame[..len], out).ok_or(ProtocolError::FrameTooLarge)?;
    if encoded >= out.len() {
        return Err(ProtocolError::FrameTooLarge);
    }
    out[encoded] = 0;
    Ok(encoded + 1)
}

/// Parses one frame (without COBS and delimiter).
pub fn parse_frame(frame: &[u8]) -> Result<Frame<'_>, ProtocolError> {
    if frame.len() > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge);
    }
    if frame.len() < HEADER_LEN + CRC_LEN {
        return Err(ProtocolError::TooShort);
    }
    let (body, crc) = frame.split_at(frame.len() - CRC_LEN);
    // Fuzzing builds accept any CRC, so that mutated inputs reach the message parser.
    if crc::crc32c(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) && !cfg!(fuzzing) {
        return Err(ProtocolError::BadCrc);
    }
    if body[0] != VERSION {
        return Err(ProtocolError::UnsupportedVersion(body[0]));
    }
    let seq = u16::from_le_bytes([body[2], body[3]]);
    let message =
        Message::parse(body[1], &body[HEADER_LEN..]).map_err(|error| error.with_seq(seq))?;
    Ok(Frame { seq, message })
}

/// Counts of what a [`FrameDecoder`] has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecoderStats {
    pub frames: u64,
    pub too_large: u64,
    pub bad_cobs: u64,
    pub too_short: u64,
    pub bad_crc: u64,
    pub unsupported: u64,
    pub malformed: u64,
}

impl DecoderStats {
    pub fn errors(&self) -> u64 {
        self.too_large
            + self.bad_cobs
            + self.too_short
            + self.bad_crc
            + self.unsupported
            + self.malformed
    }

    fn count(&mut self, result: &Result<Frame<'_>, ProtocolError>) {
        match result {
            Ok(_) => self.frames += 1,
            Err(ProtocolError::FrameTooLarge) => self.too_large += 1,
            Err(ProtocolError::BadCobs) => self.bad_cobs += 1,
            Err(ProtocolError::TooShort) => self.too_short += 1,
            Err(ProtocolError::BadCrc) => self.bad_crc += 1,
            Err(ProtocolError::UnsupportedVersion(_) | ProtocolError::UnknownType { .. }) => {
                self.unsupported += 1
            }
            Err(ProtocolError::Malformed { .. }) => self.malformed += 1,
        }
    }
}

/// Accumulates bytes as they arrive (one at a time or many frames at once) and yields each
/// frame at its delimiter. After garbage it resynchronises at the next 0x00: the garbage counts
/// as one error and the next frame decodes normally.
pub struct FrameDecoder {
    /// Room for the largest COBS-encoded frame; one byte more is an overflow.
    buf: [u8; MAX_WIRE_LEN - 1],
    len: usize,
    overflowed: bool,
    stats: DecoderStats,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    pub const fn new() -> Self {
        Self {
            buf: [0; MAX_WIRE_LEN - 1],
            len: 0,
            overflowed: false,
            stats: DecoderStats {
                frames: 0,
                too_large: 0,
                bad_cobs: 0,
                too_short: 0,
                bad_crc: 0,
                unsupported: 0,
                malformed: 0,
            },
        }
    }

    pub fn stats(&self) -> DecoderStats {
        self.stats
    }

    /// Feeds one byte. At a delimiter, returns the frame or why it was refused; between two
    /// delimiters with nothing in between (an idle line), returns `None`.
    pub fn push(&mut self, byte: u8) -> Option<Result<Frame<'_>, ProtocolError>> {
        if byte != 0 {
            if self.len < self.buf.len() {
                self.buf[self.len] = byte;
                self.len += 1;
            } else {
                self.overflowed = true;
            }
            return None;
        }
        let len = core::mem::take(&mut self.len);
        if core::mem::take(&mut self.overflowed) {
            self.stats.too_large += 1;
            return Some(Err(ProtocolError::FrameTooLarge));
        }
        if len == 0 {
            return None;
        }
        let result = match cobs::decode_in_place(&mut self.buf[..len]) {
            Some(decoded) => parse_frame(&self.buf[..decoded]),
            None => Err(ProtocolError::BadCobs),
        };
        self.stats.count(&result);
        Some(result)
    }

    /// Feeds bytes until a frame or an error completes; returns how many bytes it consumed and
    /// what completed. Call again with the rest.
    pub fn feed<'a>(
        &'a mut self,
        bytes: &[u8],
    ) -> (usize, Option<Result<Frame<'a>, ProtocolError>>) {
        for (i, &byte) in bytes.iter().enumerate() {
            if byte == 0 && (self.len > 0 || self.overflowed) {
                // Re-borrow through `push` only at a delimiter that completes something.
                return (i + 1, self.push(0));
            }
            let _ = self.push(byte);
        }
        (bytes.len(), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(seq: u16, message: &Message<'_>) -> ([u8; MAX_WIRE_LEN], usize) {
        let mut out = [0u8; MAX_WIRE_LEN];
        let n = encode_frame(seq, message, &mut out).unwrap();
        (out, n)
    }

    #[test]
    fn every_message_round_trips() {
        let readings = [
            DeviceReading {
                channel: 0,
                offset_ms: 0,
                value: DeviceValue::Decimal {
                    mantissa: 2153,
                    scale: 2,
                },
            },
            DeviceReading {
                channel: 1,
                offset_ms: 1_000,
                value: DeviceValue::Int(-5),
            },
            DeviceReading {
                channel: 2,
                offset_ms: 70_000,
                value: DeviceValue::Str("open"),
            },
            DeviceReading {
                channel: 3,
                offset_ms: 1,
                value: DeviceValue::F32(1.5),
            },
            DeviceReading {
                channel: 4,
                offset_ms: 2,
                value: DeviceValue::Bool(true),
            },
        ];
        let messages = [
            Message::Hello {
                device_id: "meter-7",
                model: "EM-100",
                firmware: "1.4.2",
                metrics: List::Items(&["temperature", "count", "door", "flow", "alarm"]),
            },
            Message::Readings {
                base_ts_ms: 1_767_225_600_000,
                readings: List::Items(&readings),
            },
            Message::Ack { seq: 65_535 },
            Message::Nack {
                seq: 3,
                reason: NackReason::Busy,
            },
            Message::Time { unix_ms: -1 },
            Message::Command {
                name: "relay",
                args: b"on",
            },
            Message::Result {
                command_seq: 9,
                status: 0,
                data: &[0, 1, 2],
            },
            Message::FirmwareBegin {
                size: 1 << 20,
                sha256: [7; 32],
                chunk_size: 256,
            },
            Message::FirmwareChunk {
                offset: 4096,
                data: &[0; MAX_CHUNK_LEN],
            },
            Message::FirmwareEnd,
            Message::FirmwareStatus {
                state: FirmwareState::Receiving,
                offset: 8192,
            },
        ];
        for (seq, message) in messages.iter().enumerate() {
            let (wire, n) = encode(seq as u16, message);
            assert_eq!(wire[n - 1], 0);
            assert!(!wire[..n - 1].contains(&0));
            let mut decoder = FrameDecoder::new();
            let (used, frame) = decoder.feed(&wire[..n]);
            assert_eq!(used, n);
            let frame = frame.unwrap().unwrap();
            assert_eq!(frame.seq, seq as u16);
            assert_eq!(&frame.message, message);
        }
    }

    #[test]
    fn oversized_messages_are_refused_when_encoding() {
        let mut out = [0u8; MAX_WIRE_LEN];
        let chunk = [1u8; MAX_CHUNK_LEN + 1];
        let message = Message::FirmwareChunk {
            offset: 0,
            data: &chunk,
        };
        assert_eq!(
            encode_frame(1, &message, &mut out),
            Err(ProtocolError::FrameTooLarge)
        );
    }

    #[test]
    fn garbage_then_a_frame_resynchronises() {
        let (wire, n) = encode(5, &Message::Ack { seq: 4 });
        let mut decoder = FrameDecoder::new();
        let mut results = [None, None];
        let mut stream = [0u8; 64];
        stream[..4].copy_from_slice(&[0x13, 0x37, 0xff, 0x00]);
        stream[4..4 + n].copy_from_slice(&wire[..n]);
        let mut k = 0;
        for &byte in &stream[..4 + n] {
            if let Some(result) = decoder.push(byte) {
                results[k] = Some(result.map(|frame| frame.seq));
                k += 1;
            }
        }
        assert!(results[0].unwrap().is_err());
        assert_eq!(results[1], Some(Ok(5)));
        assert_eq!(decoder.stats().frames, 1);
        assert_eq!(decoder.stats().errors(), 1);
    }

    #[test]
    fn a_line_without_delimiters_overflows_once() {
        let mut decoder = FrameDecoder::new();
        for _ in 0..5_000 {
            assert!(decoder.push(0x55).is_none());
        }
        assert_eq!(decoder.push(0), Some(Err(ProtocolError::FrameTooLarge)));
        assert_eq!(decoder.stats().too_large, 1);
        let (wire, n) = encode(1, &Message::FirmwareEnd);
        let (_, frame) = decoder.feed(&wire[..n]);
        assert_eq!(frame.unwrap().unwrap().message, Message::FirmwareEnd);
    }
}
