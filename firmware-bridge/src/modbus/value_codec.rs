//! Conversion between raw register contents and values, both ways: decoding what a device
//! answered into readings (pure, no I/O), and encoding values into registers for the simulator.
//!
//! Decoding rules:
//! - coils and discrete inputs give `Value::Bool`;
//! - u16, i16, u32, i32 with `scale = 1` and no `decimals` give `Value::I64`;
//! - everything else gives `Value::F64`: the raw number times `scale`, then rounded to
//!   `decimals` by dividing the rounded scaled integer by a power of ten, so raw 2153 with scale
//!   0.01 and 2 decimals is exactly the f64 that parsing "21.53" yields;
//! - a NaN or infinite f32 is passed on unchanged (devices use NaN for "not available") with
//!   `Quality::Bad`, so it is recorded but never mistaken for a measurement.

use fieldgate_shared::{DeviceId, Quality, Reading, Value};

use super::read_plan::ReadRequest;
use super::register_map::{RegisterSpec, RegisterType, WordOrder};

/// A value decoded from a register, and how far it can be trusted.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedValue {
    pub value: Value,
    pub quality: Quality,
}

/// The data of a read response, as the Modbus client hands it over.
#[derive(Clone, Copy, Debug)]
pub enum ResponseData<'a> {
    Words(&'a [u16]),
    Bits(&'a [bool]),
}

/// A response that does not fit the request it answers. The bytes passed the CRC, so this is a
/// device (or map) error, not line noise.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueCodecError {
    #[error("expected {expected} {what} in the response, got {got}")]
    WrongLength {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error(
        "register {metric} at address {address} lies outside the request from {start_address}"
    )]
    OutsideRequest {
        metric: String,
        address: u16,
        start_address: u16,
    },
    #[error("a {table} read was answered with {got}")]
    WrongTable {
        table: &'static str,
        got: &'static str,
    },
}

/// Joins two registers into the 32 bits of a u32, i32 or f32.
fn join_words(words: [u16; 2], word_order: WordOrder) -> u32 {
    let (high, low) = match word_order {
        WordOrder::Big => (words[0], words[1]),
        WordOrder::Little => (words[1], words[0]),
    };
    (u32::from(high) << 16) | u32::from(low)
}

/// Splits 32 bits into two registers in address order.
fn split_words(bits: u32, word_order: WordOrder) -> [u16; 2] {
    let high = (bits >> 16) as u16;
    let low = bits as u16;
    match word_order {
        WordOrder::Big => [high, low],
        WordOrder::Little => [low, high],
    }
}

/// Rounds `value` to `decimals` the way a sensor with that resolution reports it.
fn round_to_decimals(value: f64, decimals: u32) -> f64 {
    let power_of_ten = 10f64.powi(decimals as i32);
    let scaled = (value * power_of_ten).round();
    if !scaled.is_finite() {
        // Too large to carry that many decimals; an f64 this large has none to round anyway.
        return value;
    }
    scaled / power_of_ten
}

/// The raw number in a register's words, before scaling.
enum RawNumber {
    Integer(i64),
    Float(f32),
}

/// Decodes one register value from exactly `spec.register_type.width()` words.
pub fn decode_words(spec: &RegisterSpec, words: &[u16]) -> Result<DecodedValue, ValueCodecError> {
    let width = usize::from(spec.register_type.width());
    let wrong_length = || ValueCodecError::WrongLength {
        what: "registers",
        expected: width,
        got: words.len(),
    };
    if words.len() != width {
        return Err(wrong_length());
    }
    let pair = || [words[0], words[1]];
    let raw = match spec.register_type {
        RegisterType::U16 => RawNumber::Integer(i64::from(words[0])),
        RegisterType::I16 => RawNumber::Integer(i64::from(words[0] as i16)),
        RegisterType::U32 => RawNumber::Integer(i64::from(join_words(pair(), spec.word_order))),
        RegisterType::I32 => {
            RawNumber::Integer(i64::from(join_words(pair(), spec.word_order) as i32))
        }
        RegisterType::F32 => RawNumber::Float(f32::from_bits(join_words(pair(), spec.word_order))),
        RegisterType::Bool => {
            return Err(ValueCodecError::WrongTable {
                table: "bit",
                got: "registers",
            })
        }
    };
    if let RawNumber::Integer(integer) = raw {
        if spec.yields_integer() {
            return Ok(DecodedValue {
                value: Value::I64(integer),
                quality: Quality::Good,
            });
        }
    }
    let unscaled = match raw {
        RawNumber::Integer(integer) => integer as f64,
        RawNumber::Float(float) => f64::from(float),
    };
    if !unscaled.is_finite() {
        return Ok(DecodedValue {
            value: Value::F64(unscaled),
            quality: Quality::Bad,
        });
    }
    let mut scaled = unscaled * spec.scale;
    if let Some(decimals) = spec.decimals {
        scaled = round_to_decimals(scaled, decimals);
    }
    Ok(DecodedValue {
        value: Value::F64(scaled),
        quality: if scaled.is_finite() {
            Quality::Good
        } else {
            Quality::Bad
        },
    })
}

/// Decodes a coil or discrete input.
pub fn decode_bit(bit: bool) -> DecodedValue {
    DecodedValue {
        value: Value::Bool(bit),
        quality: Quality::Good,
    }
}

/// Where `spec` starts within the answer to `request`.
fn offset_in_request(spec: &RegisterSpec, request: &ReadRequest) -> Result<usize, ValueCodecError> {
    spec.address
        .checked_sub(request.start_address)
        .map(usize::from)
        .ok_or_else(|| ValueCodecError::OutsideRequest {
            metric: spec.metric.to_string(),
            address: spec.address,
            start_address: request.start_address,
        })
}

/// Decodes the answer to one planned read into readings stamped `ts_ms`. Checks the response
/// against the request first: a device answering with the wrong number of items is refused
/// whole, since no item of such an answer can be trusted to sit where the map says.
pub fn decode_read_response(
    device: &DeviceId,
    request: &ReadRequest,
    data: ResponseData<'_>,
    ts_ms: i64,
) -> Result<Vec<Reading>, ValueCodecError> {
    let expected = usize::from(request.count);
    let mut readings = Vec::with_capacity(request.registers.len());
    let mut push = |spec: &RegisterSpec, decoded: DecodedValue| {
        readings.push(Reading {
            device: device.clone(),
            metric: spec.metric.clone(),
            ts_ms,
            value: decoded.value,
            quality: decoded.quality,
        })
    };
    match (request.kind.is_bit(), data) {
        (false, ResponseData::Words(words)) => {
            if words.len() != expected {
                return Err(ValueCodecError::WrongLength {
                    what: "registers",
                    expected,
                    got: words.len(),
                });
            }
            for spec in &request.registers {
                let offset = offset_in_request(spec, request)?;
                let width = usize::from(spec.register_type.width());
                let register_words =
                    words
                        .get(offset..offset + width)
                        .ok_or(ValueCodecError::WrongLength {
                            what: "registers",
                            expected: offset + width,
                            got: words.len(),
                        })?;
                push(spec, decode_words(spec, register_words)?);
            }
        }
        (true, ResponseData::Bits(bits)) => {
            // A bit response is padded to whole bytes; the client trims it to the count asked.
            if bits.len() < expected {
                return Err(ValueCodecError::WrongLength {
                    what: "bits",
                    expected,
                    got: bits.len(),
                });
            }
            for spec in &request.registers {
                let offset = offset_in_request(spec, request)?;
                let bit = bits.get(offset).ok_or(ValueCodecError::WrongLength {
                    what: "bits",
                    expected: offset + 1,
                    got: bits.len(),
                })?;
                push(spec, decode_bit(*bit));
            }
        }
        (true, ResponseData::Words(_)) => {
            return Err(ValueCodecError::WrongTable {
                table: request.kind.as_str(),
                got: "registers",
            })
        }
        (false, ResponseData::Bits(_)) => {
            return Err(ValueCodecError::WrongTable {
                table: request.kind.as_str(),
                got: "bits",
            })
        }
    }
    Ok(readings)
}

/// What a register holds, as a simulated device serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegisterContents {
    /// One or two words, in address order.
    Words(Vec<u16>),
    Bit(bool),
}

/// Encodes `value` into the register described by `spec`: the inverse of [`decode_words`] and
/// [`decode_bit`]. Numbers are divided by the scale, rounded to an integer for integer types and
/// saturated at the type's bounds (NaN becomes 0), since a simulator must always serve something.
/// Strings encode as 0.
pub fn encode_value(spec: &RegisterSpec, value: &Value) -> RegisterContents {
    if spec.register_type == RegisterType::Bool {
        return RegisterContents::Bit(value.as_f64().is_some_and(|number| number != 0.0));
    }
    let exact_integer = match value {
        Value::I64(integer) if spec.yields_integer() => Some(*integer),
        _ => None,
    };
    let unscaled = value.as_f64().unwrap_or(0.0) / spec.scale;
    let integer = || exact_integer.unwrap_or(unscaled.round() as i64);
    // `as` from f64 saturates and maps NaN to 0; from i64 we clamp explicitly.
    let words = match spec.register_type {
        RegisterType::U16 => vec![integer().clamp(0, i64::from(u16::MAX)) as u16],
        RegisterType::I16 => {
            vec![integer().clamp(i64::from(i16::MIN), i64::from(i16::MAX)) as i16 as u16]
        }
        RegisterType::U32 => split_words(
            integer().clamp(0, i64::from(u32::MAX)) as u32,
            spec.word_order,
        )
        .to_vec(),
        RegisterType::I32 => split_words(
            integer().clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32 as u32,
            spec.word_order,
        )
        .to_vec(),
        RegisterType::F32 => split_words((unscaled as f32).to_bits(), spec.word_order).to_vec(),
        RegisterType::Bool => unreachable!("handled above"),
    };
    RegisterContents::Words(words)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fieldgate_shared::MetricName;

    use super::*;
    use crate::modbus::register_map::RegisterKind;

    fn spec(
        register_type: RegisterType,
        word_order: WordOrder,
        scale: f64,
        decimals: Option<u32>,
    ) -> RegisterSpec {
        RegisterSpec {
            metric: MetricName::new("m").unwrap(),
            kind: if register_type == RegisterType::Bool {
                RegisterKind::Coil
            } else {
                RegisterKind::Holding
            },
            address: 0,
            register_type,
            word_order,
            scale,
            decimals,
            unit: None,
            poll_period: Duration::from_secs(1),
        }
    }

    fn check(spec: &RegisterSpec, words: &[u16], expected: Value) {
        let decoded = decode_words(spec, words).unwrap();
        assert_eq!(decoded.value, expected, "{spec:?} {words:04x?}");
        assert_eq!(decoded.quality, Quality::Good);
        // Encoding the value again gives the same words back.
        assert_eq!(
            encode_value(spec, &expected),
            RegisterContents::Words(words.to_vec()),
            "{spec:?} {expected:?}"
        );
    }

    use RegisterType::*;
    use WordOrder::{Big, Little};

    #[test]
    fn integers_without_scale_are_i64() {
        check(&spec(U16, Big, 1.0, None), &[0], Value::I64(0));
        check(&spec(U16, Big, 1.0, None), &[0xffff], Value::I64(65_535));
        check(&spec(I16, Big, 1.0, None), &[0xffff], Value::I64(-1));
        check(&spec(I16, Big, 1.0, None), &[0x8000], Value::I64(-32_768));
        check(&spec(I16, Big, 1.0, None), &[0x7fff], Value::I64(32_767));
    }

    #[test]
    fn word_orders_of_32_bit_integers() {
        check(
            &spec(U32, Big, 1.0, None),
            &[0x0001, 0x0002],
            Value::I64(0x0001_0002),
        );
        check(
            &spec(U32, Little, 1.0, None),
            &[0x0002, 0x0001],
            Value::I64(0x0001_0002),
        );
        check(
            &spec(U32, Big, 1.0, None),
            &[0xffff, 0xffff],
            Value::I64(4_294_967_295),
        );
        check(
            &spec(I32, Big, 1.0, None),
            &[0xffff, 0xfffe],
            Value::I64(-2),
        );
        check(
            &spec(I32, Little, 1.0, None),
            &[0xfffe, 0xffff],
            Value::I64(-2),
        );
        check(
            &spec(I32, Big, 1.0, None),
            &[0x8000, 0x0000],
            Value::I64(i64::from(i32::MIN)),
        );
        check(
            &spec(I32, Little, 1.0, None),
            &[0x0000, 0x8000],
            Value::I64(i64::from(i32::MIN)),
        );
    }

    #[test]
    fn word_orders_of_f32() {
        // 21.5 is 0x41AC0000.
        check(
            &spec(F32, Big, 1.0, None),
            &[0x41ac, 0x0000],
            Value::F64(21.5),
        );
        check(
            &spec(F32, Little, 1.0, None),
            &[0x0000, 0x41ac],
            Value::F64(21.5),
        );
        // -12.25 is 0xC1440000.
        check(
            &spec(F32, Big, 1.0, None),
            &[0xc144, 0x0000],
            Value::F64(-12.25),
        );
        check(
            &spec(F32, Little, 1.0, None),
            &[0x0000, 0xc144],
            Value::F64(-12.25),
        );
    }

    #[test]
    fn f32_nan_and_infinity_are_kept_but_bad() {
        for (words, word_order) in [
            ([0x7fc0, 0x0000], Big),
            ([0x0000, 0x7fc0], Little),
            ([0xffc0, 0x0001], Big),
        ] {
            let decoded = decode_words(&spec(F32, word_order, 1.0, Some(2)), &words).unwrap();
            match decoded.value {
                Value::F64(value) => assert!(value.is_nan(), "{words:04x?}"),
                other => panic!("{other:?}"),
            }
            assert_eq!(decoded.quality, Quality::Bad);
        }
        let decoded = decode_words(&spec(F32, Big, 0.1, None), &[0x7f80, 0x0000]).unwrap();
        assert_eq!(decoded.value, Value::F64(f64::INFINITY));
        assert_eq!(decoded.quality, Quality::Bad);
    }

    #[test]
    fn scaling_and_decimals() {
        // The brief's example: exactly the f64 of "21.53", not 21.529999999999998.
        check(&spec(U16, Big, 0.01, Some(2)), &[2153], Value::F64(21.53));
        check(
            &spec(I16, Big, 0.1, Some(1)),
            &[(-125i16) as u16],
            Value::F64(-12.5),
        );
        check(
            &spec(I16, Big, 0.001, Some(3)),
            &[(-987i16) as u16],
            Value::F64(-0.987),
        );
        check(
            &spec(U32, Little, 0.1, Some(1)),
            &[0x86a1, 0x0001],
            Value::F64(10_000.1),
        );
        check(&spec(U16, Big, 10.0, None), &[12], Value::F64(120.0));
        // An integer with decimals but scale 1 is still a float: the map asked for rounding.
        check(&spec(U16, Big, 1.0, Some(0)), &[7], Value::F64(7.0));
        // f32 rounded to its resolution: 21.53f32 is 21.530000686645508 as an f64.
        let words = split_words(21.53f32.to_bits(), Big);
        assert_eq!(
            decode_words(&spec(F32, Big, 1.0, Some(2)), &words)
                .unwrap()
                .value,
            Value::F64(21.53)
        );
        assert_eq!(
            decode_words(&spec(F32, Big, 1.0, None), &words)
                .unwrap()
                .value,
            Value::F64(f64::from(21.53f32))
        );
        // Every two-decimal value of a u16 with scale 0.01 comes out as the parsed decimal.
        let spec_hundredths = spec(U16, Big, 0.01, Some(2));
        for raw in 0..=u16::MAX {
            let expected: f64 = format!("{}.{:02}", raw / 100, raw % 100).parse().unwrap();
            assert_eq!(
                decode_words(&spec_hundredths, &[raw]).unwrap().value,
                Value::F64(expected),
                "{raw}"
            );
        }
    }

    #[test]
    fn wrong_lengths_are_refused() {
        assert_eq!(
            decode_words(&spec(U32, Big, 1.0, None), &[1]),
            Err(ValueCodecError::WrongLength {
                what: "registers",
                expected: 2,
                got: 1
            })
        );
        assert!(decode_words(&spec(U16, Big, 1.0, None), &[]).is_err());
    }

    #[test]
    fn encoding_saturates_and_bits_follow_truth() {
        assert_eq!(
            encode_value(&spec(U16, Big, 1.0, None), &Value::I64(70_000)),
            RegisterContents::Words(vec![0xffff])
        );
        assert_eq!(
            encode_value(&spec(I16, Big, 0.1, Some(1)), &Value::F64(-5_000.0)),
            RegisterContents::Words(vec![0x8000])
        );
        assert_eq!(
            encode_value(&spec(U16, Big, 1.0, None), &Value::F64(f64::NAN)),
            RegisterContents::Words(vec![0])
        );
        assert_eq!(
            encode_value(&spec(Bool, Big, 1.0, None), &Value::Bool(true)),
            RegisterContents::Bit(true)
        );
        assert_eq!(decode_bit(false).value, Value::Bool(false));
    }
}
