//! Writes a few valid batches into a folder, as a seed corpus for `just fuzz`:
//! `cargo run -p fieldgate-shared --example fuzz_seeds -- fuzz/corpus/decode_batch`.

use fieldgate_shared::codec::{BatchMeta, EncodeOptions, Encoder};
use fieldgate_shared::generate::{FleetConfig, SensorFleet};
use fieldgate_shared::{GatewayId, Reading, StreamId};

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/corpus/decode_batch".into());
    std::fs::create_dir_all(&dir)?;
    for (i, (size, decimal)) in [(1, true), (10, true), (200, true), (200, false)]
        .into_iter()
        .enumerate()
    {
        let readings: Vec<Reading> = SensorFleet::new(FleetConfig::default())
            .take(size)
            .collect();
        let meta = BatchMeta {
            gateway: GatewayId::new("gw-seed").unwrap(),
            stream: StreamId::new("raw").unwrap(),
            first_seq: 1,
            last_seq: size as u64,
        };
        let mut encoder = Encoder::new(EncodeOptions {
            decimal_floats: decimal,
            ..EncodeOptions::default()
        })
        .unwrap();
        std::fs::write(
            format!("{dir}/seed-{i}"),
            encoder.encode(&meta, &readings).unwrap(),
        )?;
    }
    Ok(())
}
