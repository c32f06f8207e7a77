//! The messages of the serial protocol and their byte layout (see `PROTOCOL.md`). Parsing
//! borrows from the frame buffer and validates everything up front, so iterating a parsed
//! message's lists cannot fail.

use super::ProtocolError;

/// What is wrong with a payload, before the frame's sequence number is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PayloadError {
    FrameTooLarge,
    UnknownType(u8),
    Malformed(&'static str),
}

impl PayloadError {
    pub(super) fn with_seq(self, seq: u16) -> ProtocolError {
        match self {
            PayloadError::FrameTooLarge => ProtocolError::FrameTooLarge,
            PayloadError::UnknownType(type_code) => ProtocolError::UnknownType { seq, type_code },
            PayloadError::Malformed(why) => ProtocolError::Malformed { seq, why },
        }
    }
}

pub const TYPE_HELLO: u8 = 0x01;
pub const TYPE_READINGS: u8 = 0x02;
pub const TYPE_ACK: u8 = 0x03;
pub const TYPE_NACK: u8 = 0x04;
pub const TYPE_TIME: u8 = 0x05;
pub const TYPE_COMMAND: u8 = 0x06;
pub const TYPE_RESULT: u8 = 0x07;
pub const TYPE_FW_BEGIN: u8 = 0x10;
pub const TYPE_FW_CHUNK: u8 = 0x11;
pub const TYPE_FW_END: u8 = 0x12;
pub const TYPE_FW_STATUS: u8 = 0x13;

/// Largest decimal scale of a `Decimal` value (it travels in 4 bits).
pub const MAX_DECIMAL_SCALE: u8 = 15;

/// A value as a device sends it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DeviceValue<'a> {
    F32(f32),
    F64(f64),
    Int(i64),
    Bool(bool),
    /// `mantissa × 10^-scale`: how a sensor with fixed decimals should send, exact and compact.
    Decimal {
        mantissa: i64,
        scale: u8,
    },
    Str(&'a str),
}

/// One reading in a READINGS frame: `channel` indexes the metrics the device named in HELLO,
/// `offset_ms` is added to the frame's base timestamp.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceReading<'a> {
    pub channel: u8,
    pub offset_ms: u32,
    pub value: DeviceValue<'a>,
}

/// Why the gateway refused a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum NackReason {
    /// The gateway cannot store it now (journal full): resend later.
    Busy = 1,
    /// The content is invalid (unknown channel, bad name): resending will not help.
    Invalid = 2,
    /// The message type or version is not supported.
    Unsupported = 3,
    /// The device must send HELLO first.
    HelloFirst = 4,
}

impl NackReason {
    fn from_u8(code: u8) -> Option<Self> {
        Some(match code {
            1 => NackReason::Busy,
            2 => NackReason::Invalid,
            3 => NackReason::Unsupported,
            4 => NackReason::HelloFirst,
            _ => return None,
        })
    }
}

/// Where a device is with a firmware transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FirmwareState {
    Idle = 0,
    /// Receiving; `offset` bytes are stored contiguously.
    Receiving = 1,
    /// The whole image is stored and its SHA-256 matches.
    Verified = 2,
    /// The whole image is stored but its SHA-256 differs; the device discarded it.
    DigestMismatch = 3,
    /// The device could not store the image (flash error, image too large).
    Failed = 4,
}

impl FirmwareState {
    fn from_u8(code: u8) -> Option<Self> {
        Some(match code {
            0 => FirmwareState::Idle,
            1 => FirmwareState::Receiving,
            2 => FirmwareState::Verified,
            3 => FirmwareState::DigestMismatch,
            4 => FirmwareState::Failed,
            _ => return None,
        })
    }
}

/// A list inside a message: a slice when building one, the validated wire bytes when parsed.
#[derive(Clone, Copy, Debug)]
pub enum List<'a, T> {
    Items(&'a [T]),
    Encoded { count: u8, bytes: &'a [u8] },
}

impl<'a> List<'a, &'a str> {
    pub fn iter(&self) -> impl Iterator<Item = &'a str> + 'a {
        let (items, mut cursor, count) = self.parts();
        items
            .iter()
            .copied()
            .chain((0..count).map_while(move |_| cursor.str8().ok()))
    }
}

impl<'a> List<'a, DeviceReading<'a>> {
    pub fn iter(&self) -> impl Iterator<Item = DeviceReading<'a>> + 'a {
        let (items, mut cursor, count) = self.parts();
        items
            .iter()
            .copied()
            .chain((0..count).map_while(move |_| cursor.reading().ok()))
    }
}

impl<'a, T> List<'a, T> {
    pub fn len(&self) -> usize {
        match self {
            List::Items(items) => items.len(),
            List::Encoded { count, .. } => *count as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn parts(&self) -> (&'a [T], Cursor<'a>, u8) {
        match *self {
            List::Items(items) => (items, Cursor::new(&[]), 0),
            List::Encoded { count, bytes } => (&[], Cursor::new(bytes), count),
        }
    }
}

impl<'a> PartialEq for List<'a, &'a str> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl<'a> PartialEq for List<'a, DeviceReading<'a>> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

/// Every message of the protocol. Device → gateway: HELLO, READINGS, RESULT, FW_STATUS, and ACK
/// of TIME. Gateway → device: ACK/NACK, TIME, COMMAND, FW_BEGIN, FW_CHUNK, FW_END.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Message<'a> {
    Hello {
        device_id: &'a str,
        model: &'a str,
        firmware: &'a str,
        /// Metric names; a reading's channel is its metric's index here.
        metrics: List<'a, &'a str>,
    },
    Readings {
        base_ts_ms: i64,
        readings: List<'a, DeviceReading<'a>>,
    },
    Ack {
        seq: u16,
    },
    Nack {
        seq: u16,
        reason: NackReason,
    },
    Time {
        unix_ms: i64,
    },
    Command {
        name: &'a str,
        args: &'a [u8],
    },
    Result {
        command_seq: u16,
        status: u8,
        data: &'a [u8],
    },
    FirmwareBegin {
        size: u32,
        sha256: [u8; 32],
        chunk_size: u16,
    },
    FirmwareChunk {
        offset: u32,
        data: &'a [u8],
    },
    FirmwareEnd,
    FirmwareStatus {
        state: FirmwareState,
        offset: u32,
    },
}

impl Message<'_> {
    pub fn type_code(&self) -> u8 {
        match self {
            Message::Hello { .. } => TYPE_HELLO,
            Message::Readings { .. } => TYPE_READINGS,
            Message::Ack { .. } => TYPE_ACK,
            Message::Nack { .. } => TYPE_NACK,
            Message::Time { .. } => TYPE_TIME,
            Message::Command { .. } => TYPE_COMMAND,
            Message::Result { .. } => TYPE_RESULT,
            Message::FirmwareBegin { .. } => TYPE_FW_BEGIN,
            Message::FirmwareChunk { .. } => TYPE_FW_CHUNK,
            Message::FirmwareEnd => TYPE_FW_END,
            Message::FirmwareStatus { .. } => TYPE_FW_STATUS,
        }
    }

    /// Writes the payload (everything after the 4-byte frame header) into `out`.
    pub(super) fn write_payload(&self, out: &mut Writer<'_>) -> Result<(), PayloadError> {
        match *self {
            Message::Hello {
                device_id,
                model,
                firmware,
                metrics,
            } => {
                out.str8(device_id)?;
                out.str8(model)?;
                out.str8(firmware)?;
                out.count(metrics.len())?;
                for name in metrics.iter() {
                    out.str8(name)?;
                }
            }
            Message::Readings {
                base_ts_ms,
                readings,
            } => {
                out.bytes(&base_ts_ms.to_le_bytes())?;
                out.count(readings.len())?;
                for reading in readings.iter() {
                    out.reading(&reading)?;
                }
            }
            Message::Ack { seq } => out.bytes(&seq.to_le_bytes())?,
            Message::Nack { seq, reason } => {
                out.bytes(&seq.to_le_bytes())?;
                out.bytes(&[reason as u8])?;
            }
            Message::Time { unix_ms } => out.bytes(&unix_ms.to_le_bytes())?,
            Message::Command { name, args } => {
                out.str8(name)?;
                out.bytes16(args)?;
            }
            Message::Result {
                command_seq,
                status,
                data,
            } => {
                out.bytes(&command_seq.to_le_bytes())?;
                out.bytes(&[status])?;
                out.bytes16(data)?;
            }
            Message::FirmwareBegin {
                size,
                sha256,
                chunk_size,
            } => {
                out.bytes(&size.to_le_bytes())?;
                out.bytes(&sha256)?;
                out.bytes(&chunk_size.to_le_bytes())?;
            }
            Message::FirmwareChunk { offset, data } => {
                out.bytes(&offset.to_le_bytes())?;
                out.bytes(data)?;
            }
            Message::FirmwareEnd => {}
            Message::FirmwareStatus { state, offset } => {
                out.bytes(&[state as u8])?;
                out.bytes(&offset.to_le_bytes())?;
            }
        }
        Ok(())
    }

    /// Parses a payload of message type `type_code`.
    pub(super) fn parse(type_code: u8, payload: &[u8]) -> Result<Message<'_>, PayloadError> {
        let mut cursor = Cursor::new(payload);
        let message = match type_code {
            TYPE_HELLO => {
                let device_id = cursor.str8()?;
                let model = cursor.str8()?;
                let firmware = cursor.str8()?;
                let count = cursor.u8()?;
                let start = cursor.pos;
                for _ in 0..count {
                    cursor.str8()?;
                }
                Message::Hello {
                    device_id,
                    model,
                    firmware,
                    metrics: List::Encoded {
                        count,
                        bytes: &payload[start..cursor.pos],
                    },
                }
            }
            TYPE_READINGS => {
                let base_ts_ms = i64::from_le_bytes(cursor.array()?);
                let count = cursor.u8()?;
                let start = cursor.pos;
                for _ in 0..count {
                    cursor.reading()?;
                }
                Message::Readings {
                    base_ts_ms,
                    readings: List::Encoded {
                        count,
                        bytes: &payload[start..cursor.pos],
                    },
                }
            }
            TYPE_ACK => Message::Ack {
                seq: u16::from_le_bytes(cursor.array()?),
            },
            TYPE_NACK => Message::Nack {
                seq: u16::from_le_bytes(cursor.array()?),
                reason: NackReason::from_u8(cursor.u8()?)
                    .ok_or(PayloadError::Malformed("unknown NACK reason"))?,
            },
            TYPE_TIME => Message::Time {
                unix_ms: i64::from_le_bytes(cursor.array()?),
            },
            TYPE_COMMAND => Message::Command {
                name: cursor.str8()?,
                args: cursor.bytes16()?,
            },
            TYPE_RESULT => Message::Result {
                command_seq: u16::from_le_bytes(cursor.array()?),
                status: cursor.u8()?,
                data: cursor.bytes16()?,
            },
            TYPE_FW_BEGIN => Message::FirmwareBegin {
                size: u32::from_le_bytes(cursor.array()?),
                sha256: cursor.array()?,
                chunk_size: u16::from_le_bytes(cursor.array()?),
            },
            TYPE_FW_CHUNK => {
                let offset = u32::from_le_bytes(cursor.array()?);
                let data = &payload[cursor.pos..];
                cursor.pos = payload.len();
                Message::FirmwareChunk { offset, data }
            }
            TYPE_FW_END => Message::FirmwareEnd,
            TYPE_FW_STATUS => Message::FirmwareStatus {
                state: FirmwareState::from_u8(cursor.u8()?)
                    .ok_or(PayloadError::Malformed("unknown firmware state"))?,
                offset: u32::from_le_bytes(cursor.array()?),
            },
            other => return Err(PayloadError::UnknownType(other)),
        };
        if cursor.pos != payload.len() {
            return Err(PayloadError::Malformed("trailing bytes after the payload"));
        }
        Ok(message)
    }
}

const TAG_F32: u8 = 0;
const TAG_F64: u8 = 1;
const TAG_INT: u8 = 2;
const TAG_FALSE: u8 = 3;
const TAG_TRUE: u8 = 4;
const TAG_DECIMAL: u8 = 5;
const TAG_STR: u8 = 6;

/// Reads payload fields; every overrun is a `Malformed` error.
#[derive(Clone)]
pub(super) struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], PayloadError> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(PayloadError::Malformed("payload too short"))?;
        let bytes = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, PayloadError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PayloadError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn str8(&mut self) -> Result<&'a str, PayloadError> {
        let len = self.u8()? as usize;
        core::str::from_utf8(self.take(len)?)
            .map_err(|_| PayloadError::Malformed("text is not UTF-8"))
    }

    fn bytes16(&mut self) -> Result<&'a [u8], PayloadError> {
        let len = u16::from_le_bytes(self.array()?) as usize;
        self.take(len)
    }

    fn varint(&mut self) -> Result<u64, PayloadError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            if shift == 63 && byte > 1 {
                return Err(PayloadError::Malformed("varint overflows 64 bits"));
            }
            value |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(PayloadError::Malformed("varint longer than 10 bytes"))
    }

    fn reading(&mut self) -> Result<DeviceReading<'a>, PayloadError> {
        let channel = self.u8()?;
        let offset_ms = u32::try_from(self.varint()?)
            .map_err(|_| PayloadError::Malformed("reading offset beyond 32 bits"))?;
        let tag = self.u8()?;
        let value = match (tag & 0x0f, tag >> 4) {
            (TAG_F32, 0) => DeviceValue::F32(f32::from_le_bytes(self.array()?)),
            (TAG_F64, 0) => DeviceValue::F64(f64::from_le_bytes(self.array()?)),
            (TAG_INT, 0) => DeviceValue::Int(unzigzag(self.varint()?)),
            (TAG_FALSE, 0) => DeviceValue::Bool(false),
            (TAG_TRUE, 0) => DeviceValue::Bool(true),
            (TAG_DECIMAL, scale) => DeviceValue::Decimal {
                mantissa: unzigzag(self.varint()?),
                scale,
            },
            (TAG_STR, 0) => DeviceValue::Str(self.str8()?),
            _ => return Err(PayloadError::Malformed("unknown value tag")),
        };
        Ok(DeviceReading {
            channel,
            offset_ms,
            value,
        })
    }
}

/// Writes payload fields into a fixed buffer; running out of room is `FrameTooLarge`.
pub(super) struct Writer<'a> {
    pub(super) buf: &'a mut [u8],
    pub(super) len: usize,
}

impl Writer<'_> {
    pub(super) fn bytes(&mut self, bytes: &[u8]) -> Result<(), PayloadError> {
        let end = self.len + bytes.len();
        if end > self.buf.len() {
            return Err(PayloadError::FrameTooLarge);
        }
        self.buf[self.len..end].copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }

    fn count(&mut self, count: usize) -> Result<(), PayloadError> {
        let count =
            u8::try_from(count).map_err(|_| PayloadError::Malformed("more than 255 items"))?;
        self.bytes(&[count])
    }

    fn str8(&mut self, text: &str) -> Result<(), PayloadError> {
        let len = u8::try_from(text.len())
            .map_err(|_| PayloadError::Malformed("text longer than 255 bytes"))?;
        self.bytes(&[len])?;
        self.bytes(text.as_bytes())
    }

    fn bytes16(&mut self, bytes: &[u8]) -> Result<(), PayloadError> {
        let len = u16::try_from(bytes.len()).map_err(|_| PayloadError::FrameTooLarge)?;
        self.bytes(&len.to_le_bytes())?;
        self.bytes(bytes)
    }

    fn varint(&mut self, mut value: u64) -> Result<(), PayloadError> {
        let mut encoded = [0u8; 10];
        let mut n = 0;
        while value >= 0x80 {
            encoded[n] = value as u8 | 0x80;
            value >>= 7;
            n += 1;
        }
        encoded[n] = value as u8;
        self.bytes(&encoded[..=n])
    }

    fn reading(&mut self, reading: &DeviceReading<'_>) -> Result<(), PayloadError> {
        self.bytes(&[reading.channel])?;
        self.varint(reading.offset_ms as u64)?;
        match reading.value {
            DeviceValue::F32(v) => {
                self.bytes(&[TAG_F32])?;
                self.bytes(&v.to_le_bytes())
            }
            DeviceValue::F64(v) => {
                self.bytes(&[TAG_F64])?;
                self.bytes(&v.to_le_bytes())
            }
            DeviceValue::Int(v) => {
                self.bytes(&[TAG_INT])?;
                self.varint(zigzag(v))
            }
            DeviceValue::Bool(v) => self.bytes(&[if v { TAG_TRUE } else { TAG_FALSE }]),
            DeviceValue::Decimal { mantissa, scale } => {
                if scale > MAX_DECIMAL_SCALE {
                    return Err(PayloadError::Malformed("decimal scale above 15"));
                }
                self.bytes(&[TAG_DECIMAL | (scale << 4)])?;
                self.varint(zigzag(mantissa))
            }
            DeviceValue::Str(text) => {
                self.bytes(&[TAG_STR])?;
                self.str8(text)
            }
        }
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}
