//! Any byte string given to the batch decoder yields a batch or an error, never a panic; and
//! whatever decodes re-encodes to the same readings.
//!
//! Fuzzing builds (`cfg(fuzzing)`) skip the checksum check so the fuzzer reaches the body parser.
#![no_main]

use fieldgate_shared::codec::{self, BatchMeta};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = codec::decode(data) else {
        return;
    };
    let readings = batch.readings();
    let meta = BatchMeta {
        gateway: batch.header().gateway.clone(),
        stream: batch.header().stream.clone(),
        first_seq: batch.header().first_seq,
        last_seq: batch.header().last_seq,
    };
    let again = codec::encode(&meta, &readings).expect("a decoded batch re-encodes");
    assert_eq!(codec::decode(&again).expect("re-encoded batch decodes").readings(), readings);
});
