//! Float columns: decimal-aware scaled integers when every value of a series is a short decimal,
//! XOR (Gorilla-style) bit packing otherwise. Both are bit-exact for every `f64`.

use super::bytes::{put_varint, zigzag, ByteReader};
use super::DecodeError;

/// Largest decimal scale tried: values with more than this many decimals use XOR.
pub const MAX_SCALE: usize = 15;
/// Largest magnitude of a scaled integer: beyond 2^53, `i64 as f64` is no longer exact.
const MAX_EXACT: f64 = 9_007_199_254_740_992.0;

const POW10: [f64; MAX_SCALE + 1] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
];

pub const MODE_DECIMAL: u8 = 0;
pub const MODE_XOR: u8 = 1;

/// `v` as an integer count of `10^-scale`, if dividing that integer by `10^scale` gives back
/// exactly `v`, bit for bit. IEEE division is correctly rounded, so every value that was parsed
/// from a decimal string with at most `scale` decimals passes; `-0.0`, NaN and infinities never do.
#[inline]
fn scaled(v: f64, scale: usize) -> Option<i64> {
    let m = (v * POW10[scale]).round();
    // Written so that NaN, whose comparisons are all false, is refused too.
    if m.is_nan() || m.abs() > MAX_EXACT {
        return None;
    }
    let m = m as i64;
    ((m as f64 / POW10[scale]).to_bits() == v.to_bits()).then_some(m)
}

/// The smallest scale at which every value is an exact decimal, if there is one.
fn common_scale(values: &[f64]) -> Option<usize> {
    let mut scale = 0;
    for &v in values {
        if scaled(v, scale).is_some() {
            continue;
        }
        // Exact at scale s implies exact at every larger scale, so the search only moves up.
        scale = (scale + 1..=MAX_SCALE).find(|&s| scaled(v, s).is_some())?;
    }
    Some(scale)
}

pub fn encode(values: &[f64], decimal: bool, out: &mut Vec<u8>, scratch: &mut Vec<i64>) {
    if decimal && encode_decimal(values, out, scratch) {
        return;
    }
    out.push(MODE_XOR);
    encode_xor(values, out);
}

fn encode_decimal(values: &[f64], out: &mut Vec<u8>, scratch: &mut Vec<i64>) -> bool {
    let Some(scale) = common_scale(values) else {
        return false;
    };
    scratch.clear();
    for &v in values {
        match scaled(v, scale) {
            Some(m) => scratch.push(m),
            None => return false,
        }
    }
    out.push(MODE_DECIMAL);
    out.push(scale as u8);
    let mut prev = 0i64;
    for &m in scratch.iter() {
        put_varint(out, zigzag(m.wrapping_sub(prev)));
        prev = m;
    }
    true
}

pub fn decode(
    reader: &mut ByteReader<'_>,
    n: usize,
    out: &mut Vec<f64>,
) -> Result<(), DecodeError> {
    match reader.u8("float column mode")? {
        MODE_DECIMAL => {
            let scale = reader.u8("decimal scale")? as usize;
            if scale > MAX_SCALE {
                return Err(DecodeError::Invalid {
                    what: "decimal scale",
                    why: "larger than 15",
                });
            }
            let divisor = POW10[scale];
            let mut m = 0i64;
            for _ in 0..n {
                m = m.wrapping_add(reader.signed_varint("decimal value")?);
                out.push(m as f64 / divisor);
            }
            Ok(())
        }
        MODE_XOR => {
            let len = reader.bounded(reader.remaining(), "xor stream length")?;
            decode_xor(reader.bytes(len, "xor stream")?, n, out)
        }
        _ => Err(DecodeError::Invalid {
            what: "float column mode",
            why: "unknown mode",
        }),
    }
}

/// Writes the XOR stream as a varint byte length followed by the bits.
fn encode_xor(values: &[f64], out: &mut Vec<u8>) {
    let mut bits = BitWriter::default();
    let mut prev = 0u64;
    // The window of meaningful bits of the previous non-zero XOR: (leading zeros, trailing zeros).
    let mut window: Option<(u32, u32)> = None;
    for (i, v) in values.iter().enumerate() {
        let v = v.to_bits();
        if i == 0 {
            bits.write(v, 64);
            prev = v;
            continue;
        }
        let x = v ^ prev;
        prev = v;
        if x == 0 {
            bits.write(0, 1);
            continue;
        }
        let leading = x.leading_zeros().min(31);
        let trailing = x.trailing_zeros();
        match window {
            Some((wl, wt)) if leading >= wl && trailing >= wt => {
                bits.write(0b10, 2);
                bits.write(x >> wt, 64 - wl - wt);
            }
            _ => {
                let meaningful = 64 - leading - trailing;
                bits.write(0b11, 2);
                bits.write(leading as u64, 5);
                bits.write((meaningful - 1) as u64, 6);
                bits.write(x >> trailing, meaningful);
                window = Some((leading, trailing));
            }
        }
    }
    let bytes = bits.finish();
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(&bytes);
}

fn decode_xor(data: &[u8], n: usize, out: &mut Vec<f64>) -> Result<(), DecodeError> {
    if n == 0 {
        return Ok(());
    }
    let mut bits = BitReader { data, pos: 0 };
    let mut prev = bits.read(64)?;
    out.push(f64::from_bits(prev));
    let mut window: Option<(u32, u32)> = None;
    for _ in 1..n {
        if bits.read(1)? == 1 {
            let x = if bits.read(1)? == 0 {
                let (wl, wt) = window.ok_or(DecodeError::Invalid {
                    what: "xor stream",
                    why: "reuses a window before setting one",
                })?;
                bits.read(64 - wl - wt)? << wt
            } else {
                let leading = bits.read(5)? as u32;
                let meaningful = bits.read(6)? as u32 + 1;
                if leading + meaningful > 64 {
                    return Err(DecodeError::Invalid {
                        what: "xor stream",
                        why: "window wider than 64 bits",
                    });
                }
                let trailing = 64 - leading - meaningful;
                window = Some((leading, trailing));
                bits.read(meaningful)? << trailing
            };
            prev ^= x;
        }
        out.push(f64::from_bits(prev));
    }
    Ok(())
}

/// Packs bit fields most significant bit first.
#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n_bits: u32,
}

impl BitWriter {
    fn write(&mut self, value: u64, n_bits: u32) {
        if n_bits > 32 {
            self.write(value >> 32, n_bits - 32);
            self.write(value & 0xffff_ffff, 32);
            return;
        }
        if n_bits == 0 {
            return;
        }
        // At most 7 bits wait in `acc`, so 7 + 32 bits never overflow it.
        self.acc = (self.acc << n_bits) | (value & ((1u64 << n_bits) - 1));
        self.n_bits += n_bits;
        while self.n_bits >= 8 {
            self.n_bits -= 8;
            self.out.push((self.acc >> self.n_bits) as u8);
        }
        self.acc &= (1u64 << self.n_bits) - 1;
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n_bits > 0 {
            self.out.push((self.acc << (8 - self.n_bits)) as u8);
        }
        self.out
    }
}

struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl BitReader<'_> {
    fn read(&mut self, n_bits: u32) -> Result<u64, DecodeError> {
        if n_bits > 32 {
            let high = self.read(n_bits - 32)?;
            return Ok((high << 32) | self.read(32)?);
        }
        if n_bits == 0 {
            return Ok(0);
        }
        if self.pos + n_bits as usize > self.data.len() * 8 {
            return Err(DecodeError::Truncated { what: "xor stream" });
        }
        let first = self.pos / 8;
        let mut window = 0u64;
        for (i, &byte) in self.data[first..].iter().take(8).enumerate() {
            window |= (byte as u64) << (56 - 8 * i);
        }
        let value = (window << (self.pos % 8)) >> (64 - n_bits);
        self.pos += n_bits as usize;
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(values: &[f64], decimal: bool) -> (u8, Vec<f64>) {
        let mut out = Vec::new();
        encode(values, decimal, &mut out, &mut Vec::new());
        let mut reader = ByteReader::new(&out);
        let mut decoded = Vec::new();
        decode(&mut reader, values.len(), &mut decoded).unwrap();
        assert_eq!(reader.remaining(), 0);
        (out[0], decoded)
    }

    fn assert_bits_eq(a: &[f64], b: &[f64]) {
        let a: Vec<u64> = a.iter().map(|v| v.to_bits()).collect();
        let b: Vec<u64> = b.iter().map(|v| v.to_bits()).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn sensor_decimals_take_the_decimal_path() {
        let values = [21.53, 21.5, 21.49, -3.07, 0.0, 1013.25];
        let (mode, decoded) = round_trip(&values, true);
        assert_eq!(mode, MODE_DECIMAL);
        assert_bits_eq(&values, &decoded);
        assert_eq!(common_scale(&values), Some(2));
        assert_eq!(common_scale(&[1.0, 2.0, 1e15]), Some(0));
        assert_eq!(common_scale(&[0.1, 0.25, 0.125]), Some(3));
    }

    #[test]
    fn special_values_fall_back_to_xor_and_keep_every_bit() {
        let nan_with_payload = f64::from_bits(0x7ff8_0000_dead_beef);
        let cases: &[&[f64]] = &[
            &[21.5, -0.0],
            &[f64::NAN, 1.0],
            &[nan_with_payload, f64::INFINITY, f64::NEG_INFINITY],
            &[f64::MIN_POSITIVE / 3.0, f64::MAX, f64::MIN, 5e-324],
            &[std::f64::consts::PI, std::f64::consts::E, 1.0 / 3.0],
            &[1e300, 1e-300],
        ];
        for values in cases {
            let (mode, decoded) = round_trip(values, true);
            assert_eq!(mode, MODE_XOR, "{values:?}");
            assert_bits_eq(values, &decoded);
        }
    }

    #[test]
    fn xor_only_round_trips_decimals_too() {
        let values = [21.53, 21.53, 21.54, 99.99, 21.53];
        let (mode, decoded) = round_trip(&values, false);
        assert_eq!(mode, MODE_XOR);
        assert_bits_eq(&values, &decoded);
    }

    #[test]
    fn hostile_xor_windows_are_errors() {
        // Control bits 11, leading zeros 31, meaningful length 64: 95 bits wide.
        let mut out = vec![MODE_XOR];
        let mut bits = BitWriter::default();
        bits.write(0, 64);
        bits.write(0b11, 2);
        bits.write(31, 5);
        bits.write(63, 6);
        let bytes = bits.finish();
        put_varint(&mut out, bytes.len() as u64);
        out.extend_from_slice(&bytes);
        let err = decode(&mut ByteReader::new(&out), 2, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("wider than 64"), "{err}");
    }
}
