//! Keeps `PROTOCOL.md` honest. Every fenced block with info string `wire` must decode to a valid
//! frame and re-encode to the very same bytes; every `frame` block (a frame before COBS,
//! annotated) must be what the `wire` block after it decodes to; every `cobs` example must be
//! what the encoder produces; and the constants and code tables of the page must be the code's.

use fieldgate_firmware_bridge::protocol::{
    cobs, crc, encode_frame, message, DeviceReading, DeviceValue, FirmwareState, FrameDecoder,
    List, Message, NackReason, MAX_CHUNK_LEN, MAX_FRAME_LEN, MAX_WIRE_LEN, VERSION,
};

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/PROTOCOL.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A fenced code block: its info string, the line number of its opening fence, its lines.
struct Block<'a> {
    info: &'a str,
    line: usize,
    body: Vec<&'a str>,
}

fn blocks(doc: &str) -> Vec<Block<'_>> {
    let mut blocks = Vec::new();
    let mut open: Option<Block<'_>> = None;
    for (i, line) in doc.lines().enumerate() {
        let trimmed = line.trim_start();
        match open.as_mut() {
            None if trimmed.starts_with("```") => {
                open = Some(Block {
                    info: trimmed.trim_start_matches('`').trim(),
                    line: i + 1,
                    body: Vec::new(),
                })
            }
            None => {}
            Some(_) if trimmed.starts_with("```") => blocks.push(open.take().unwrap()),
            Some(block) => block.body.push(line),
        }
    }
    assert!(open.is_none(), "PROTOCOL.md: unclosed code block");
    blocks
}

/// Parses space-separated two-digit hex bytes.
fn hex(text: &str, line: usize) -> Vec<u8> {
    text.split_whitespace()
        .map(|token| {
            assert_eq!(
                token.len(),
                2,
                "PROTOCOL.md:{line}: `{token}` is not a hex byte"
            );
            u8::from_str_radix(token, 16)
                .unwrap_or_else(|_| panic!("PROTOCOL.md:{line}: `{token}` is not a hex byte"))
        })
        .collect()
}

fn block_bytes(block: &Block<'_>) -> Vec<u8> {
    block.body.iter().flat_map(|l| hex(l, block.line)).collect()
}

#[test]
fn every_wire_example_decodes_and_re_encodes_to_the_same_bytes() {
    let doc = doc();
    let mut types_seen = Vec::new();
    let mut examples = 0;
    for block in blocks(&doc).iter().filter(|b| b.info == "wire") {
        let at = block.line;
        let wire = block_bytes(block);
        assert!(
            wire.len() <= MAX_WIRE_LEN,
            "PROTOCOL.md:{at}: longer than MAX_WIRE_LEN"
        );
        assert_eq!(wire.last(), Some(&0), "PROTOCOL.md:{at}: must end with 00");
        assert!(
            !wire[..wire.len() - 1].contains(&0),
            "PROTOCOL.md:{at}: one frame per block, 00 only at its end"
        );
        let mut decoder = FrameDecoder::new();
        let (used, result) = decoder.feed(&wire);
        assert_eq!(used, wire.len(), "PROTOCOL.md:{at}");
        let frame = match result {
            Some(Ok(frame)) => frame,
            other => panic!("PROTOCOL.md:{at}: does not decode: {other:?}"),
        };
        let mut again = [0u8; MAX_WIRE_LEN];
        let n = encode_frame(frame.seq, &frame.message, &mut again)
            .unwrap_or_else(|e| panic!("PROTOCOL.md:{at}: does not re-encode: {e}"));
        assert_eq!(
            &again[..n],
            &wire[..],
            "PROTOCOL.md:{at}: re-encoding {frame:?} gives other bytes"
        );
        types_seen.push(frame.message.type_code());
        examples += 1;
    }
    assert!(
        examples >= 5,
        "PROTOCOL.md has only {examples} wire examples"
    );
    for (code, name) in TYPES {
        assert!(
            types_seen.contains(&code),
            "PROTOCOL.md has no wire example of {name}"
        );
    }
}

#[test]
fn every_annotated_frame_is_its_wire_example_before_cobs() {
    let doc = doc();
    let blocks = blocks(&doc);
    let mut annotated = 0;
    for (i, block) in blocks.iter().enumerate().filter(|(_, b)| b.info == "frame") {
        let at = block.line;
        // Each line: the bytes, two spaces, the annotation.
        let frame: Vec<u8> = block
            .body
            .iter()
            .flat_map(|line| hex(line.split("  ").next().unwrap(), at))
            .collect();
        let wire = blocks
            .get(i + 1)
            .filter(|next| next.info == "wire")
            .unwrap_or_else(|| {
                panic!("PROTOCOL.md:{at}: a `frame` block needs a `wire` block next")
            });
        let mut decoded = block_bytes(wire);
        let without_delimiter = decoded.len() - 1;
        let len = cobs::decode_in_place(&mut decoded[..without_delimiter]).unwrap();
        assert_eq!(
            frame,
            &decoded[..len],
            "PROTOCOL.md:{at}: the annotated frame is not the wire example after it"
        );
        assert!(frame.len() <= MAX_FRAME_LEN);
        let (body, crc) = frame.split_at(frame.len() - 4);
        assert_eq!(
            crc::crc32c(body).to_le_bytes(),
            crc,
            "PROTOCOL.md:{at}: CRC"
        );
        annotated += 1;
    }
    assert!(
        annotated >= 5,
        "PROTOCOL.md has only {annotated} annotated frames"
    );
}

#[test]
fn cobs_examples_are_what_the_encoder_produces() {
    let doc = doc();
    let mut examples = 0;
    for block in blocks(&doc).iter().filter(|b| b.info == "cobs") {
        for line in &block.body {
            let (raw, encoded) = line
                .split_once('→')
                .unwrap_or_else(|| panic!("PROTOCOL.md:{}: `raw → cobs` expected", block.line));
            let (raw, expected) = (hex(raw, block.line), hex(encoded, block.line));
            let mut out = [0u8; 64];
            let n = cobs::encode(&raw, &mut out).unwrap();
            assert_eq!(
                &out[..n],
                &expected[..],
                "PROTOCOL.md:{}: {line}",
                block.line
            );
            examples += 1;
        }
    }
    assert!(
        examples >= 3,
        "PROTOCOL.md has only {examples} COBS examples"
    );
}

const TYPES: [(u8, &str); 11] = [
    (message::TYPE_HELLO, "HELLO"),
    (message::TYPE_READINGS, "READINGS"),
    (message::TYPE_ACK, "ACK"),
    (message::TYPE_NACK, "NACK"),
    (message::TYPE_TIME, "TIME"),
    (message::TYPE_COMMAND, "COMMAND"),
    (message::TYPE_RESULT, "RESULT"),
    (message::TYPE_FW_BEGIN, "FW_BEGIN"),
    (message::TYPE_FW_CHUNK, "FW_CHUNK"),
    (message::TYPE_FW_END, "FW_END"),
    (message::TYPE_FW_STATUS, "FW_STATUS"),
];

fn assert_row(doc: &str, row: &str) {
    assert!(doc.contains(row), "PROTOCOL.md has no table row `{row}`");
}

#[test]
fn constants_and_code_tables_are_the_code_s() {
    let doc = doc();
    assert_row(&doc, &format!("| `VERSION` | {VERSION} |"));
    assert_row(&doc, &format!("| `MAX_FRAME_LEN` | {MAX_FRAME_LEN} |"));
    assert_row(&doc, &format!("| `MAX_WIRE_LEN` | {MAX_WIRE_LEN} |"));
    assert_row(&doc, &format!("| `MAX_CHUNK_LEN` | {MAX_CHUNK_LEN} |"));
    let check = crc::crc32c(b"123456789");
    assert_row(
        &doc,
        &format!("| check (`\"123456789\"`) | 0x{check:08X} |"),
    );
    for (code, name) in TYPES {
        assert_row(&doc, &format!("| {code:#04x} | {name} |"));
    }
    for (reason, name) in [
        (NackReason::Busy, "Busy"),
        (NackReason::Invalid, "Invalid"),
        (NackReason::Unsupported, "Unsupported"),
        (NackReason::HelloFirst, "HelloFirst"),
    ] {
        assert_row(&doc, &format!("| {} | {name} |", reason as u8));
    }
    for (state, name) in [
        (FirmwareState::Idle, "Idle"),
        (FirmwareState::Receiving, "Receiving"),
        (FirmwareState::Verified, "Verified"),
        (FirmwareState::DigestMismatch, "DigestMismatch"),
        (FirmwareState::Failed, "Failed"),
    ] {
        assert_row(&doc, &format!("| {} | {name} |", state as u8));
    }
    // The value tags are private to the encoder: read each one off an encoded READINGS.
    for (value, name) in [
        (DeviceValue::F32(1.0), "f32"),
        (DeviceValue::F64(1.0), "f64"),
        (DeviceValue::Int(1), "int"),
        (DeviceValue::Bool(false), "false"),
        (DeviceValue::Bool(true), "true"),
        (
            DeviceValue::Decimal {
                mantissa: 1,
                scale: 0,
            },
            "decimal",
        ),
        (DeviceValue::Str("x"), "str"),
    ] {
        let readings = [DeviceReading {
            channel: 1,
            offset_ms: 1,
            value,
        }];
        let message = Message::Readings {
            base_ts_ms: 0x0101_0101_0101_0101,
            readings: List::Items(&readings),
        };
        let mut wire = [0u8; MAX_WIRE_LEN];
        let n = encode_frame(0x0101, &message, &mut wire).unwrap();
        let len = cobs::decode_in_place(&mut wire[..n - 1]).unwrap();
        // version, type, seq, base_ts_ms, count, channel, offset_ms (one byte), then the tag.
        let tag = wire[..len][4 + 8 + 1 + 1 + 1];
        assert_row(&doc, &format!("| {tag} | {name} |"));
    }
}
