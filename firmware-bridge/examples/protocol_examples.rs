//! Prints the worked examples of `PROTOCOL.md` (section 6) from the real encoder, as the
//! Markdown pasted there: `cargo run -p fieldgate-firmware-bridge --example protocol_examples`.
//!
//! Annotated examples show the frame before COBS field by field (a `frame` block), then the wire
//! bytes (a `wire` block); the others show the wire bytes only. `tests/protocol_doc.rs` checks
//! every such block of `PROTOCOL.md` against the encoder and decoder.

use fieldgate_firmware_bridge::protocol::{
    cobs, encode_frame, DeviceReading, DeviceValue, FirmwareState, List, Message, NackReason,
    MAX_WIRE_LEN,
};

/// 2026-01-01T00:00:00Z in Unix milliseconds.
const NEW_YEAR_2026_MS: i64 = 1_767_225_600_000;

/// SHA-256 of "abc" (the FIPS 180-2 test vector), standing in for a firmware image's digest.
const DIGEST: [u8; 32] = [
    0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae, 0x22, 0x23,
    0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad,
];

/// The first 16 bytes of an image for a Cortex-M: initial stack pointer, reset vector.
const CHUNK: [u8; 16] = [
    0x00, 0x80, 0x00, 0x20, 0xc1, 0x01, 0x00, 0x08, 0x3d, 0x02, 0x00, 0x08, 0x3f, 0x02, 0x00, 0x08,
];

struct Example<'a> {
    title: &'a str,
    seq: u16,
    message: Message<'a>,
    /// The payload's fields in order: (length in bytes, description). `None` prints the wire
    /// bytes only.
    fields: Option<Vec<(usize, String)>>,
}

fn main() {
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
            offset_ms: 250,
            value: DeviceValue::Int(1234),
        },
        DeviceReading {
            channel: 2,
            offset_ms: 1000,
            value: DeviceValue::Bool(true),
        },
    ];
    let metrics = ["temperature", "count", "door"];
    let base_ts_ms = NEW_YEAR_2026_MS + 5_000;
    let s = |text: &str| text.to_string();
    let examples = [
        Example {
            title: "HELLO, device → gateway, device seq 1",
            seq: 1,
            message: Message::Hello {
                device_id: "meter-7",
                model: "EM-100",
                firmware: "1.4.2",
                metrics: List::Items(&metrics),
            },
            fields: Some(vec![
                (1, s("device_id: str8 length 7")),
                (7, s("\"meter-7\"")),
                (1, s("model: str8 length 6")),
                (6, s("\"EM-100\"")),
                (1, s("firmware: str8 length 5")),
                (5, s("\"1.4.2\"")),
                (1, s("metric count 3")),
                (12, s("metric 0: str8 \"temperature\"")),
                (6, s("metric 1: str8 \"count\"")),
                (5, s("metric 2: str8 \"door\"")),
            ]),
        },
        Example {
            title: "ACK of the HELLO, gateway → device, gateway seq 7",
            seq: 7,
            message: Message::Ack { seq: 1 },
            fields: Some(vec![(2, s("acknowledged seq 1 (u16 LE)"))]),
        },
        Example {
            title: "TIME, gateway → device, gateway seq 8",
            seq: 8,
            message: Message::Time {
                unix_ms: NEW_YEAR_2026_MS,
            },
            fields: Some(vec![(
                8,
                format!("unix_ms {NEW_YEAR_2026_MS} (i64 LE) = 2026-01-01T00:00:00Z"),
            )]),
        },
        Example {
            title: "ACK of the TIME, device → gateway, device seq 2",
            seq: 2,
            message: Message::Ack { seq: 8 },
            fields: None,
        },
        Example {
            title: "READINGS with 3 readings, device → gateway, device seq 3",
            seq: 3,
            message: Message::Readings {
                base_ts_ms,
                readings: List::Items(&readings),
            },
            fields: Some(vec![
                (8, format!("base_ts_ms {base_ts_ms} (i64 LE)")),
                (1, s("reading count 3")),
                (1, s("reading 0: channel 0 (temperature)")),
                (1, s("  offset_ms 0 (varint)")),
                (1, s("  tag 0x25: kind 5 decimal, scale 2")),
                (2, s("  mantissa 2153 → zig-zag 4306 (varint): 21.53")),
                (1, s("reading 1: channel 1 (count)")),
                (2, s("  offset_ms 250 (varint)")),
                (1, s("  tag 0x02: kind 2 integer")),
                (2, s("  1234 → zig-zag 2468 (varint)")),
                (1, s("reading 2: channel 2 (door)")),
                (2, s("  offset_ms 1000 (varint)")),
                (1, s("  tag 0x04: true (no value bytes)")),
            ]),
        },
        Example {
            title: "ACK of the READINGS, gateway → device, gateway seq 9",
            seq: 9,
            message: Message::Ack { seq: 3 },
            fields: None,
        },
        Example {
            title: "NACK Busy of the READINGS, gateway → device, gateway seq 9",
            seq: 9,
            message: Message::Nack {
                seq: 3,
                reason: NackReason::Busy,
            },
            fields: None,
        },
        Example {
            title: "COMMAND \"relay\" with argument bytes 01, gateway → device, gateway seq 10",
            seq: 10,
            message: Message::Command {
                name: "relay",
                args: &[0x01],
            },
            fields: None,
        },
        Example {
            title: "RESULT of command seq 10, status 0, no data, device → gateway, device seq 4",
            seq: 4,
            message: Message::Result {
                command_seq: 10,
                status: 0,
                data: &[],
            },
            fields: None,
        },
        Example {
            title: "FW_BEGIN size 4112, digest ba7816bf…15ad, chunk_size 256, gateway → device, gateway seq 11",
            seq: 11,
            message: Message::FirmwareBegin {
                size: 4112,
                sha256: DIGEST,
                chunk_size: 256,
            },
            fields: None,
        },
        Example {
            title: "FW_STATUS Receiving, offset 4096 (already held), device → gateway, device seq 5",
            seq: 5,
            message: Message::FirmwareStatus {
                state: FirmwareState::Receiving,
                offset: 4096,
            },
            fields: None,
        },
        Example {
            title: "FW_CHUNK at offset 4096 with 16 bytes, gateway → device, gateway seq 12",
            seq: 12,
            message: Message::FirmwareChunk {
                offset: 4096,
                data: &CHUNK,
            },
            fields: Some(vec![
                (4, s("offset 4096 (u32 LE)")),
                (16, s("data: the rest of the payload (16 bytes)")),
            ]),
        },
        Example {
            title: "FW_STATUS Receiving, offset 4112, device → gateway, device seq 6",
            seq: 6,
            message: Message::FirmwareStatus {
                state: FirmwareState::Receiving,
                offset: 4112,
            },
            fields: None,
        },
        Example {
            title: "FW_END, gateway → device, gateway seq 13",
            seq: 13,
            message: Message::FirmwareEnd,
            fields: None,
        },
        Example {
            title: "FW_STATUS Verified, offset 4112, device → gateway, device seq 7",
            seq: 7,
            message: Message::FirmwareStatus {
                state: FirmwareState::Verified,
                offset: 4112,
            },
            fields: None,
        },
    ];
    for example in &examples {
        print_example(example);
    }
}

fn print_example(example: &Example<'_>) {
    let mut wire = [0u8; MAX_WIRE_LEN];
    let n = encode_frame(example.seq, &example.message, &mut wire).expect("example encodes");
    println!("**{}**\n", example.title);
    if let Some(fields) = &example.fields {
        let mut frame = wire;
        let len = cobs::decode_in_place(&mut frame[..n - 1]).expect("own output is COBS");
        let frame = &frame[..len];
        let type_code = example.message.type_code();
        let mut all = vec![
            (1, format!("version {}", frame[0])),
            (1, format!("type {type_code:#04x} {}", type_name(type_code))),
            (2, format!("seq {} (u16 LE)", example.seq)),
        ];
        all.extend(fields.iter().cloned());
        all.push((4, format!("CRC-32C of bytes 0..{} (u32 LE)", len - 4)));
        let total: usize = all.iter().map(|(field_len, _)| field_len).sum();
        assert_eq!(total, len, "{}: fields cover the frame", example.title);
        println!("```frame");
        let mut at = 0;
        for (field_len, what) in &all {
            for (i, line) in frame[at..at + field_len].chunks(8).enumerate() {
                let bytes = hex(line);
                if i == 0 {
                    println!("{bytes:<25}{what}");
                } else {
                    println!("{bytes}");
                }
            }
            at += field_len;
        }
        println!("```\n");
    }
    println!("```wire");
    for line in wire[..n].chunks(16) {
        println!("{}", hex(line));
    }
    println!("```\n");
}

fn hex(bytes: &[u8]) -> String {
    let text: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    text.join(" ")
}

fn type_name(code: u8) -> &'static str {
    match code {
        0x01 => "HELLO",
        0x02 => "READINGS",
        0x03 => "ACK",
        0x04 => "NACK",
        0x05 => "TIME",
        0x06 => "COMMAND",
        0x07 => "RESULT",
        0x10 => "FW_BEGIN",
        0x11 => "FW_CHUNK",
        0x12 => "FW_END",
        0x13 => "FW_STATUS",
        _ => "?",
    }
}
