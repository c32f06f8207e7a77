//! `fieldgate codec estimate`: what bandwidth a fleet's data needs in Fieldgate's batch format,
//! compared with JSON lines and with XOR-only float encoding.

use std::collections::HashSet;
use std::io::{self, Write};

use anyhow::{Context, Result};
use fieldgate_shared::codec::{BatchMeta, EncodeOptions, Encoder};
use fieldgate_shared::{DeviceId, GatewayId, MetricName, Reading, StreamId, Value};
use serde::Serialize;

#[derive(Debug, Default, Serialize)]
pub struct EncodingSize {
    pub bytes: u64,
    pub bytes_per_reading: f64,
}

#[derive(Debug, Serialize)]
pub struct Estimate {
    pub input: String,
    pub readings: u64,
    pub series: usize,
    pub batches: u64,
    pub batch_size: usize,
    pub fieldgate: EncodingSize,
    pub xor_only: EncodingSize,
    pub json_lines: EncodingSize,
}

/// Cuts `readings` into batches of `batch_size` in arrival order and measures every encoding.
pub fn estimate(
    input: String,
    readings: impl Iterator<Item = Result<Reading>>,
    batch_size: usize,
) -> Result<Estimate> {
    anyhow::ensure!(batch_size > 0, "--batch must be at least 1");
    let mut fieldgate = Encoder::new(EncodeOptions::default())?;
    let mut xor_only = Encoder::new(EncodeOptions {
        decimal_floats: false,
        ..EncodeOptions::default()
    })?;
    let mut meta = BatchMeta {
        gateway: GatewayId::new("estimate").expect("valid name"),
        stream: StreamId::new("raw").expect("valid name"),
        first_seq: 1,
        last_seq: 1,
    };
    let mut series: HashSet<(DeviceId, MetricName)> = HashSet::new();
    let mut batch = Vec::with_capacity(batch_size);
    let mut estimate = Estimate {
        input,
        readings: 0,
        series: 0,
        batches: 0,
        batch_size,
        fieldgate: EncodingSize::default(),
        xor_only: EncodingSize::default(),
        json_lines: EncodingSize::default(),
    };
    let mut json_line = Vec::new();
    let mut out = Vec::new();
    let mut flush = |batch: &mut Vec<Reading>, estimate: &mut Estimate| -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        meta.last_seq = meta.first_seq + batch.len() as u64 - 1;
        out.clear();
        fieldgate.encode_into(&meta, batch, &mut out)?;
        estimate.fieldgate.bytes += out.len() as u64;
        out.clear();
        xor_only.encode_into(&meta, batch, &mut out)?;
        estimate.xor_only.bytes += out.len() as u64;
        meta.first_seq = meta.last_seq + 1;
        estimate.batches += 1;
        batch.clear();
        Ok(())
    };
    for reading in readings {
        let reading = reading?;
        json_line.clear();
        write_json_line(&mut json_line, &reading)?;
        estimate.json_lines.bytes += json_line.len() as u64;
        series.insert((reading.device.clone(), reading.metric.clone()));
        estimate.readings += 1;
        batch.push(reading);
        if batch.len() == batch_size {
            flush(&mut batch, &mut estimate)?;
        }
    }
    flush(&mut batch, &mut estimate)?;
    anyhow::ensure!(estimate.readings > 0, "{}: no readings", estimate.input);
    estimate.series = series.len();
    for size in [
        &mut estimate.fieldgate,
        &mut estimate.xor_only,
        &mut estimate.json_lines,
    ] {
        size.bytes_per_reading = size.bytes as f64 / estimate.readings as f64;
    }
    Ok(estimate)
}

/// One reading as the JSON line a typical gateway would send, newline included.
fn write_json_line(out: &mut Vec<u8>, reading: &Reading) -> Result<()> {
    #[derive(Serialize)]
    struct Line<'a> {
        device: &'a str,
        metric: &'a str,
        ts_ms: i64,
        value: &'a Value,
    }
    serde_json::to_writer(
        &mut *out,
        &Line {
            device: reading.device.as_str(),
            metric: reading.metric.as_str(),
            ts_ms: reading.ts_ms,
            value: &reading.value,
        },
    )
    .context("writing a JSON line")?;
    out.push(b'\n');
    Ok(())
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn print_table(estimate: &Estimate, out: &mut impl Write) -> io::Result<()> {
    writeln!(out, "input      {}", estimate.input)?;
    writeln!(out, "readings   {}", thousands(estimate.readings))?;
    writeln!(out, "series     {}", thousands(estimate.series as u64))?;
    writeln!(
        out,
        "batches    {} of up to {} readings",
        thousands(estimate.batches),
        thousands(estimate.batch_size as u64)
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<22} {:>15} {:>14} {:>10}",
        "encoding", "bytes", "bytes/reading", "vs JSON"
    )?;
    let json = estimate.json_lines.bytes as f64;
    for (name, size) in [
        ("fieldgate batch", &estimate.fieldgate),
        ("xor-only batch", &estimate.xor_only),
        ("JSON lines", &estimate.json_lines),
    ] {
        writeln!(
            out,
            "{:<22} {:>15} {:>14.3} {:>9.1}×",
            name,
            thousands(size.bytes),
            size.bytes_per_reading,
            json / size.bytes as f64
        )?;
    }
    Ok(())
}
