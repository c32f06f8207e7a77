//! The serial protocol against its promises: every message round-trips, any byte stream is
//! survived, and a noisy line never gets a corrupt reading accepted.

use fieldgate_firmware_bridge::protocol::{
    encode_frame, DeviceReading, DeviceValue, FirmwareState, FrameDecoder, List, Message,
    NackReason, MAX_CHUNK_LEN, MAX_WIRE_LEN,
};
use fieldgate_shared::generate::Rng;
use proptest::prelude::*;

fn any_value() -> impl Strategy<Value = DeviceValue<'static>> {
    prop_oneof![
        any::<u32>().prop_map(|bits| DeviceValue::F32(f32::from_bits(bits))),
        any::<u64>().prop_map(|bits| DeviceValue::F64(f64::from_bits(bits))),
        any::<i64>().prop_map(DeviceValue::Int),
        any::<bool>().prop_map(DeviceValue::Bool),
        (any::<i64>(), 0u8..=15)
            .prop_map(|(mantissa, scale)| DeviceValue::Decimal { mantissa, scale }),
        prop::sample::select(vec!["", "open", "späť", "x,y"]).prop_map(DeviceValue::Str),
    ]
}

fn any_reading() -> impl Strategy<Value = DeviceReading<'static>> {
    (any::<u8>(), any::<u32>(), any_value()).prop_map(|(channel, offset_ms, value)| DeviceReading {
        channel,
        offset_ms,
        value,
    })
}

/// The readings of a READINGS message with floats as bit patterns, so NaNs compare equal.
fn readings_bits(message: &Message<'_>) -> (i64, Vec<String>) {
    let Message::Readings {
        base_ts_ms,
        readings,
    } = message
    else {
        panic!("not READINGS: {message:?}");
    };
    let readings = readings
        .iter()
        .map(|r| {
            let value = match r.value {
                DeviceValue::F32(v) => format!("f32 {:#x}", v.to_bits()),
                DeviceValue::F64(v) => format!("f64 {:#x}", v.to_bits()),
                other => format!("{other:?}"),
            };
            format!("{} {} {value}", r.channel, r.offset_ms)
        })
        .collect();
    (*base_ts_ms, readings)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn readings_round_trip_whole_or_byte_by_byte(
        readings in prop::collection::vec(any_reading(), 0..20),
        base_ts_ms in any::<i64>(),
        seq in any::<u16>(),
        byte_by_byte in any::<bool>(),
    ) {
        let message = Message::Readings { base_ts_ms, readings: List::Items(&readings) };
        let mut wire = [0u8; MAX_WIRE_LEN];
        let n = match encode_frame(seq, &message, &mut wire) {
            Ok(n) => n,
            // Twenty long strings and f64s can exceed a frame: refused, never truncated.
            Err(_) => return Ok(()),
        };
        let mut decoder = FrameDecoder::new();
        let decoded = if byte_by_byte {
            let (last, bytes) = wire[..n].split_last().unwrap();
            for &byte in bytes {
                prop_assert!(decoder.push(byte).is_none());
            }
            decoder.push(*last).unwrap().unwrap()
        } else {
            decoder.feed(&wire[..n]).1.unwrap().unwrap()
        };
        prop_assert_eq!(decoded.seq, seq);
        prop_assert_eq!(readings_bits(&decoded.message), readings_bits(&message));
    }

    #[test]
    fn any_byte_stream_is_survived(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let mut decoder = FrameDecoder::new();
        let mut completed = 0u64;
        for &byte in &bytes {
            if decoder.push(byte).is_some() {
                completed += 1;
            }
        }
        let stats = decoder.stats();
        prop_assert_eq!(stats.frames + stats.errors(), completed);
    }

    #[test]
    fn other_messages_round_trip(
        seq in any::<u16>(),
        n in any::<u16>(),
        unix_ms in any::<i64>(),
        data in prop::collection::vec(any::<u8>(), 0..MAX_CHUNK_LEN),
        digest in any::<[u8; 32]>(),
    ) {
        let messages = [
            Message::Ack { seq: n },
            Message::Nack { seq: n, reason: NackReason::HelloFirst },
            Message::Time { unix_ms },
            Message::FirmwareChunk { offset: n as u32 * 256, data: &data },
            Message::FirmwareBegin { size: n as u32, sha256: digest, chunk_size: 256 },
            Message::FirmwareStatus { state: FirmwareState::DigestMismatch, offset: n as u32 },
            Message::Result { command_seq: n, status: 3, data: &data[..data.len().min(200)] },
        ];
        for message in &messages {
            let mut wire = [0u8; MAX_WIRE_LEN];
            let len = encode_frame(seq, message, &mut wire).unwrap();
            let mut decoder = FrameDecoder::new();
            let frame = decoder.feed(&wire[..len]).1.unwrap().unwrap();
            prop_assert_eq!(frame.seq, seq);
            prop_assert_eq!(&frame.message, message);
        }
    }
}

/// A million READINGS frames over a line flipping each bit with probability 1e-4: no damaged
/// frame is accepted, and every frame whose bytes (and whose predecessor's delimiter) arrived
/// intact is decoded: the decoder resynchronises at the next frame.
#[test]
fn bit_errors_at_1e_4_never_get_a_corrupt_reading_accepted() {
    const FRAMES: usize = 1_000_000;
    const BIT_ERROR_RATE: f64 = 1e-4;
    let mut rng = Rng::new(7);
    let mut decoder = FrameDecoder::new();
    let mut wire = [0u8; MAX_WIRE_LEN];
    // When the next bit error falls, counted in bits from the start of the stream.
    let mut next_error_bit = geometric(&mut rng, BIT_ERROR_RATE);
    let mut stream_bits = 0u64;
    let mut previous_damaged = false;
    let (mut expected_intact, mut decoded_intact, mut damaged_frames) = (0u64, 0u64, 0u64);
    for i in 0..FRAMES {
        let readings = [
            DeviceReading {
                channel: 0,
                offset_ms: 0,
                value: DeviceValue::Decimal {
                    mantissa: (rng.next_u64() % 5_000) as i64,
                    scale: 2,
                },
            },
            DeviceReading {
                channel: 1,
                offset_ms: 3,
                value: DeviceValue::Int(i as i64),
            },
            DeviceReading {
                channel: 2,
                offset_ms: 5,
                value: DeviceValue::Bool(i % 3 == 0),
            },
        ];
        let message = Message::Readings {
            base_ts_ms: 1_767_225_600_000 + i as i64 * 1_000,
            readings: List::Items(&readings),
        };
        let seq = i as u16;
        let n = encode_frame(seq, &message, &mut wire).unwrap();
        let mut damaged = false;
        while next_error_bit < stream_bits + (n as u64) * 8 {
            let bit = (next_error_bit - stream_bits) as usize;
            wire[bit / 8] ^= 1 << (bit % 8);
            damaged = true;
            next_error_bit += 1 + geometric(&mut rng, BIT_ERROR_RATE);
        }
        stream_bits += (n as u64) * 8;
        damaged_frames += damaged as u64;
        let intact = !damaged && !previous_damaged;
        expected_intact += intact as u64;
        let mut rest = &wire[..n];
        while !rest.is_empty() {
            let (used, result) = decoder.feed(rest);
            rest = &rest[used..];
            if let Some(Ok(frame)) = result {
                // Anything accepted must be this very frame, unchanged: a damaged frame that
                // passed the CRC would differ here.
                assert!(!damaged, "frame {i} was damaged on the line but accepted");
                assert_eq!(frame.seq, seq);
                assert_eq!(frame.message, message, "frame {i}");
                decoded_intact += 1;
            }
        }
        previous_damaged = damaged;
    }
    let stats = decoder.stats();
    assert!(
        damaged_frames > 10_000,
        "the line must really be noisy: {damaged_frames}"
    );
    assert!(
        decoded_intact >= expected_intact,
        "decoded {decoded_intact} intact frames, expected at least {expected_intact}"
    );
    assert!(stats.bad_crc + stats.bad_cobs + stats.too_short > 0);
    eprintln!(
        "{FRAMES} frames, {damaged_frames} damaged, {decoded_intact} decoded, decoder stats {stats:?}"
    );
}

/// Bits until the next error on a line with the given bit error rate.
fn geometric(rng: &mut Rng, rate: f64) -> u64 {
    let u = rng.unit().max(f64::MIN_POSITIVE);
    (u.ln() / (1.0 - rate).ln()).floor() as u64
}
