//! Consistent Overhead Byte Stuffing: removes every 0x00 from a frame so that 0x00 can delimit
//! frames on the wire, at a cost of one byte per 254.

/// The most bytes COBS can turn `len` bytes into (without the delimiter).
pub const fn max_encoded_len(len: usize) -> usize {
    len + len / 254 + 1
}

/// Encodes `src` into `dst` and returns the encoded length, or `None` if `dst` is too small.
/// The result holds no zero byte; the caller appends the 0x00 delimiter.
pub fn encode(src: &[u8], dst: &mut [u8]) -> Option<usize> {
    if dst.len() < max_encoded_len(src.len()) {
        return None;
    }
    let mut code_at = 0;
    let mut out = 1;
    let mut code = 1u8;
    for &byte in src {
        if byte == 0 {
            dst[code_at] = code;
            code_at = out;
            out += 1;
            code = 1;
        } else {
            dst[out] = byte;
            out += 1;
            code += 1;
            if code == 0xff {
                dst[code_at] = code;
                code_at = out;
                out += 1;
                code = 1;
            }
        }
    }
    dst[code_at] = code;
    Some(out)
}

/// Decodes `buf[..len]` in place and returns the decoded length, or `None` if it is not valid
/// COBS (a zero byte, or a code that runs past the end).
pub fn decode_in_place(buf: &mut [u8]) -> Option<usize> {
    let len = buf.len();
    let mut read = 0;
    let mut write = 0;
    while read < len {
        let code = buf[read] as usize;
        if code == 0 || read + code > len {
            return None;
        }
        read += 1;
        for _ in 1..code {
            let byte = buf[read];
            if byte == 0 {
                return None;
            }
            buf[write] = byte;
            write += 1;
            read += 1;
        }
        // A block shorter than 254 data bytes stands for a zero, except at the very end.
        if code < 0xff && read < len {
            buf[write] = 0;
            write += 1;
        }
    }
    Some(write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(src: &[u8]) -> ([u8; 1100], usize) {
        let mut encoded = [0u8; 1100];
        let n = encode(src, &mut encoded).unwrap();
        assert!(!encoded[..n].contains(&0), "{src:?}");
        let mut decoded = encoded;
        let m = decode_in_place(&mut decoded[..n]).unwrap();
        assert_eq!(&decoded[..m], src);
        (encoded, n)
    }

    #[test]
    fn known_vectors() {
        // From the COBS paper and Wikipedia's table.
        let check = |src: &[u8], expected: &[u8]| {
            let (encoded, n) = round_trip(src);
            assert_eq!(&encoded[..n], expected);
        };
        check(&[], &[0x01]);
        check(&[0x00], &[0x01, 0x01]);
        check(&[0x00, 0x00], &[0x01, 0x01, 0x01]);
        check(&[0x11, 0x22, 0x00, 0x33], &[0x03, 0x11, 0x22, 0x02, 0x33]);
        check(&[0x11, 0x00, 0x00, 0x00], &[0x02, 0x11, 0x01, 0x01, 0x01]);
    }

    #[test]
    fn long_runs_without_zeros() {
        for len in [253, 254, 255, 508, 1000] {
            let src: [u8; 1000] = core::array::from_fn(|i| (i % 255) as u8 + 1);
            round_trip(&src[..len]);
        }
    }

    #[test]
    fn invalid_input_is_refused() {
        assert_eq!(decode_in_place(&mut [0x05, 0x11]), None);
        assert_eq!(decode_in_place(&mut [0x03, 0x00, 0x11]), None);
        assert_eq!(decode_in_place(&mut [0x00]), None);
    }
}
