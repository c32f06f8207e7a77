//! Any byte stream fed to the serial frame decoder, in any chunking, yields frames or counted
//! errors, never a panic; and every accepted frame re-encodes to a frame that decodes the same.
#![no_main]

use fieldgate_firmware_bridge::protocol::{encode_frame, FrameDecoder, MAX_WIRE_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, so the fuzzer explores split deliveries too.
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = (chunk as usize).max(1);
    let mut decoder = FrameDecoder::new();
    let mut completed = 0u64;
    for piece in stream.chunks(chunk) {
        let mut rest = piece;
        while !rest.is_empty() {
            let (used, frame) = decoder.feed(rest);
            rest = &rest[used..];
            let Some(result) = frame else { continue };
            completed += 1;
            let Ok(frame) = result else { continue };
            let mut wire = [0u8; MAX_WIRE_LEN];
            let n = encode_frame(frame.seq, &frame.message, &mut wire).expect("an accepted frame re-encodes");
            let mut again = FrameDecoder::new();
            let (_, reparsed) = again.feed(&wire[..n]);
            let reparsed = reparsed.expect("a whole frame").expect("re-encoded frame decodes");
            assert_eq!(format!("{:?}", reparsed.seq), format!("{:?}", frame.seq));
        }
    }
    let stats = decoder.stats();
    assert_eq!(stats.frames + stats.errors(), completed);
});
