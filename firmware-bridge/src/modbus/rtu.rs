//! Modbus RTU framing without I/O: the CRC-16, and the server side's incremental request decoder
//! and response encoders, which the device simulator is built on. (The poller's client side is
//! tokio-modbus.)
//!
//! An RTU frame is `unit id, function code, data, CRC-16 (low byte first)`, at most 256 bytes.
//! The decoder finds request boundaries from the function code, like a real slave listening on a
//! shared bus; on a CRC mismatch it drops one byte and tries again, so garbage before a request
//! costs only that garbage. A partial request left by a glitch is dropped when the line goes
//! idle ([`RequestDecoder::discard_partial`]), the way the RTU spec's 3.5-character silence ends
//! a frame.

use super::register_map::RegisterKind;

/// Longest RTU frame, in bytes (Modbus over serial line, section 2.5.1).
pub const MAX_FRAME_LEN: usize = 256;

/// CRC-16/MODBUS: reflected polynomial 0xA001, initial value 0xFFFF.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xffff;
    for &byte in data {
        crc ^= u16::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xa001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Appends the CRC of `frame`, low byte first.
pub fn append_crc(frame: &mut Vec<u8>) {
    let crc = crc16(frame);
    frame.extend_from_slice(&crc.to_le_bytes());
}

/// Whether the last two bytes of `frame` are the CRC of the rest.
pub fn crc_is_valid(frame: &[u8]) -> bool {
    match frame.len().checked_sub(2) {
        Some(body_len) if body_len >= 2 => {
            crc16(&frame[..body_len]).to_le_bytes() == [frame[body_len], frame[body_len + 1]]
        }
        _ => false,
    }
}

/// The table a read function code reads, if it is one of the four reads.
pub fn read_function_kind(function_code: u8) -> Option<RegisterKind> {
    match function_code {
        0x01 => Some(RegisterKind::Coil),
        0x02 => Some(RegisterKind::Discrete),
        0x03 => Some(RegisterKind::Holding),
        0x04 => Some(RegisterKind::Input),
        _ => None,
    }
}

/// The function code that reads `kind`.
pub fn read_function_code(kind: RegisterKind) -> u8 {
    match kind {
        RegisterKind::Coil => 0x01,
        RegisterKind::Discrete => 0x02,
        RegisterKind::Holding => 0x03,
        RegisterKind::Input => 0x04,
    }
}

/// A request with a valid CRC, as a slave on the bus sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RtuRequest {
    /// Function 1, 2, 3 or 4.
    Read {
        unit_id: u8,
        function_code: u8,
        kind: RegisterKind,
        address: u16,
        count: u16,
    },
    /// Any other function; the simulator answers "illegal function".
    Other { unit_id: u8, function_code: u8 },
}

impl RtuRequest {
    pub fn unit_id(&self) -> u8 {
        match *self {
            RtuRequest::Read { unit_id, .. } | RtuRequest::Other { unit_id, .. } => unit_id,
        }
    }

    pub fn function_code(&self) -> u8 {
        match *self {
            RtuRequest::Read { function_code, .. } | RtuRequest::Other { function_code, .. } => {
                function_code
            }
        }
    }
}

/// Length of the request frame starting at `buffer[0]`, CRC included: `Ok(None)` while too few
/// bytes have arrived to tell, `Err(())` for a function code whose length cannot be known.
fn request_frame_len(buffer: &[u8]) -> Result<Option<usize>, ()> {
    let Some(&function_code) = buffer.get(1) else {
        return Ok(None);
    };
    let byte_count_at =
        |index: usize, fixed: usize| buffer.get(index).map(|&n| fixed + usize::from(n));
    match function_code {
        // Reads, single writes, diagnostics: address and quantity (or value), then CRC.
        0x01..=0x06 | 0x08 => Ok(Some(8)),
        // Serial-line status functions without data.
        0x07 | 0x0b | 0x0c | 0x11 => Ok(Some(4)),
        // Multiple writes: address, quantity, byte count, data.
        0x0f | 0x10 => Ok(byte_count_at(6, 9)),
        0x16 => Ok(Some(10)),
        0x17 => Ok(byte_count_at(10, 13)),
        _ => Err(()),
    }
}

/// Incremental request decoder: feed it bytes as they arrive, take requests out.
#[derive(Debug, Default)]
pub struct RequestDecoder {
    buffer: Vec<u8>,
    bytes_discarded: u64,
}

impl RequestDecoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes dropped so far because they did not form a valid request.
    pub fn bytes_discarded(&self) -> u64 {
        self.bytes_discarded
    }

    /// Whether a partial request is waiting for more bytes.
    pub fn has_partial(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// Drops a partial request; call when the line has been silent longer than a frame gap.
    pub fn discard_partial(&mut self) {
        self.bytes_discarded += self.buffer.len() as u64;
        self.buffer.clear();
    }

    fn drop_first_byte(&mut self) {
        self.buffer.remove(0);
        self.bytes_discarded += 1;
    }

    /// The next complete request with a valid CRC, if one has arrived.
    pub fn next_request(&mut self) -> Option<RtuRequest> {
        loop {
            let frame_len = match request_frame_len(&self.buffer) {
                Ok(None) => return None,
                Ok(Some(frame_len)) if frame_len <= MAX_FRAME_LEN => frame_len,
                Ok(Some(_)) | Err(()) => {
                    self.drop_first_byte();
                    continue;
                }
            };
            if self.buffer.len() < frame_len {
                return None;
            }
            if !crc_is_valid(&self.buffer[..frame_len]) {
                self.drop_first_byte();
                continue;
            }
            let frame: Vec<u8> = self.buffer.drain(..frame_len).collect();
            let unit_id = frame[0];
            let function_code = frame[1];
            return Some(match read_function_kind(function_code) {
                Some(kind) => RtuRequest::Read {
                    unit_id,
                    function_code,
                    kind,
                    address: u16::from_be_bytes([frame[2], frame[3]]),
                    count: u16::from_be_bytes([frame[4], frame[5]]),
                },
                None => RtuRequest::Other {
                    unit_id,
                    function_code,
                },
            });
        }
    }
}

/// Encodes a read request, as a master sends it (used by tests and tools).
pub fn encode_read_request(unit_id: u8, kind: RegisterKind, address: u16, count: u16) -> Vec<u8> {
    let mut frame = vec![unit_id, read_function_code(kind)];
    frame.extend_from_slice(&address.to_be_bytes());
    frame.extend_from_slice(&count.to_be_bytes());
    append_crc(&mut frame);
    frame
}

/// Encodes the answer to a register read (function 3 or 4).
pub fn encode_registers_response(unit_id: u8, function_code: u8, words: &[u16]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(5 + 2 * words.len());
    frame.extend_from_slice(&[unit_id, function_code, (2 * words.len()) as u8]);
    for word in words {
        frame.extend_from_slice(&word.to_be_bytes());
    }
    append_crc(&mut frame);
    frame
}

/// Encodes the answer to a bit read (function 1 or 2): bits packed least significant first.
pub fn encode_bits_response(unit_id: u8, function_code: u8, bits: &[bool]) -> Vec<u8> {
    let byte_count = bits.len().div_ceil(8);
    let mut frame = Vec::with_capacity(5 + byte_count);
    frame.extend_from_slice(&[unit_id, function_code, byte_count as u8]);
    for chunk in bits.chunks(8) {
        let packed = chunk
            .iter()
            .enumerate()
            .fold(0u8, |byte, (bit_index, &bit)| {
                byte | (u8::from(bit) << bit_index)
            });
        frame.push(packed);
    }
    append_crc(&mut frame);
    frame
}

/// Encodes an exception response: the function code with its high bit set, then the code.
pub fn encode_exception_response(unit_id: u8, function_code: u8, exception_code: u8) -> Vec<u8> {
    let mut frame = vec![unit_id, function_code | 0x80, exception_code];
    append_crc(&mut frame);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_known_frames() {
        // From the Modbus spec's examples and tokio-modbus's tests.
        assert_eq!(crc16(&[0x01, 0x03, 0x08, 0x2b, 0x00, 0x02]), 0x63b6);
        assert_eq!(crc16(&[0x01, 0x03, 0x04, 0x00, 0x20, 0x00, 0x00]), 0xf9fb);
        assert_eq!(
            encode_read_request(1, RegisterKind::Holding, 0x082b, 2),
            [0x01, 0x03, 0x08, 0x2b, 0x00, 0x02, 0xb6, 0x63]
        );
        assert!(crc_is_valid(&encode_exception_response(0x66, 0x02, 0x03)));
        assert_eq!(
            encode_exception_response(0x66, 0x02, 0x03),
            [0x66, 0x82, 0x03, 0xb1, 0x7e]
        );
    }

    #[test]
    fn decoder_skips_garbage_and_waits_for_partial_requests() {
        let request = encode_read_request(7, RegisterKind::Input, 100, 4);
        let mut decoder = RequestDecoder::default();
        decoder.push(&[0x00, 0xff, 0x42]);
        decoder.push(&request[..5]);
        assert_eq!(decoder.next_request(), None);
        decoder.push(&request[5..]);
        assert_eq!(
            decoder.next_request(),
            Some(RtuRequest::Read {
                unit_id: 7,
                function_code: 4,
                kind: RegisterKind::Input,
                address: 100,
                count: 4
            })
        );
        assert_eq!(decoder.bytes_discarded(), 3);
        assert!(!decoder.has_partial());

        // A corrupted request is dropped, the next good one is found.
        let mut corrupted = encode_read_request(1, RegisterKind::Coil, 0, 8);
        corrupted[3] ^= 0x10;
        decoder.push(&corrupted);
        decoder.push(&encode_read_request(2, RegisterKind::Holding, 5, 1));
        assert_eq!(
            decoder.next_request().map(|request| request.unit_id()),
            Some(2)
        );

        decoder.push(&request[..3]);
        assert!(decoder.has_partial());
        decoder.discard_partial();
        assert!(!decoder.has_partial());
    }

    #[test]
    fn bits_pack_least_significant_first() {
        let frame = encode_bits_response(
            1,
            1,
            &[true, false, true, true, false, false, false, false, true],
        );
        assert_eq!(&frame[..5], &[1, 1, 2, 0b0000_1101, 0b0000_0001]);
        assert!(crc_is_valid(&frame));
    }
}
