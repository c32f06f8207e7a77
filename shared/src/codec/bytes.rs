//! Byte-level primitives of the batch format: LEB128 varints, zig-zag, and a bounds-checked
//! reader that turns every overrun into a [`DecodeError`] instead of a panic.

use super::DecodeError;

#[inline]
pub fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

#[inline]
pub fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[inline]
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A cursor over untrusted bytes.
pub struct ByteReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> ByteReader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    #[inline]
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let byte = *self
            .data
            .get(self.pos)
            .ok_or(DecodeError::Truncated { what })?;
        self.pos += 1;
        Ok(byte)
    }

    pub fn bytes(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < len {
            return Err(DecodeError::Truncated { what });
        }
        let bytes = &self.data[self.pos..self.pos + len];
        self.pos += len;
        Ok(bytes)
    }

    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = self.bytes(N, what)?;
        let mut array = [0u8; N];
        array.copy_from_slice(bytes);
        Ok(array)
    }

    pub fn u32_le(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub fn u64_le(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// An unsigned LEB128 varint of at most 10 bytes whose value fits in 64 bits.
    #[inline(always)]
    pub fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        // Fast path: one byte, the common case for small deltas and indices.
        if let Some(&byte) = self.data.get(self.pos) {
            if byte < 0x80 {
                self.pos += 1;
                return Ok(byte as u64);
            }
        }
        self.long_varint(what)
    }

    #[cold]
    #[inline(never)]
    fn long_varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8(what)?;
            if shift == 63 && byte > 1 {
                return Err(DecodeError::Invalid {
                    what,
                    why: "varint overflows 64 bits",
                });
            }
            value |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(DecodeError::Invalid {
            what,
            why: "varint longer than 10 bytes",
        })
    }

    #[inline]
    pub fn signed_varint(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(unzigzag(self.varint(what)?))
    }

    /// A varint that must be at most `limit`, as a usize.
    #[inline]
    pub fn bounded(&mut self, limit: usize, what: &'static str) -> Result<usize, DecodeError> {
        let value = self.varint(what)?;
        if value > limit as u64 {
            return Err(DecodeError::TooLarge {
                what,
                value,
                limit: limit as u64,
            });
        }
        Ok(value as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_at_the_edges() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u32::MAX as u64,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut reader = ByteReader::new(&out);
            assert_eq!(reader.varint("v").unwrap(), v);
            assert_eq!(reader.remaining(), 0);
        }
    }

    #[test]
    fn zigzag_round_trips_at_the_edges() {
        for v in [0, 1, -1, 63, -64, i64::MAX, i64::MIN] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        assert_eq!(zigzag(-1), 1);
        assert_eq!(zigzag(1), 2);
    }

    #[test]
    fn overlong_and_overflowing_varints_are_errors() {
        let overflow = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(ByteReader::new(&overflow).varint("v").is_err());
        let eleven = [0x80; 11];
        assert!(ByteReader::new(&eleven).varint("v").is_err());
        assert!(matches!(
            ByteReader::new(&[0x80]).varint("v"),
            Err(DecodeError::Truncated { .. })
        ));
    }
}
