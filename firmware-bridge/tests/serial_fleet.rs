//! Simulated devices on real pseudo-terminals, each served by a supervised serial link, over a
//! faulty line (garbage, dropped frames, bit errors) and a consumer that is sometimes busy:
//! every reading a device saw acknowledged is stored exactly once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fieldgate_firmware_bridge::session::{CommitOutcome, SessionConfig};
use fieldgate_firmware_bridge::sim_serial::{spawn_devices, DeviceConfig, Trigger};
use fieldgate_firmware_bridge::transport::{run_serial_link, Backoff, LinkStats, SerialPortConfig};
use fieldgate_shared::generate::Rng;
use fieldgate_shared::Reading;
use tokio::sync::{mpsc, watch};

const DEVICES: usize = 4;

fn key(reading: &Reading) -> (String, String, i64) {
    (
        reading.device.to_string(),
        reading.metric.to_string(),
        reading.ts_ms,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_reading_is_stored_exactly_once() {
    let mut fleet = spawn_devices(DEVICES, |i| {
        let mut config = DeviceConfig::for_index(i);
        config.sample_interval_ms = 20;
        config.retransmit_initial_ms = 100;
        config.retransmit_max_ms = 400;
        config.faults.garbage = Trigger::with_probability(0.02);
        config.faults.drop_frames = Trigger::with_probability(0.02);
        config.faults.bit_errors = Trigger::with_probability(1e-4);
        config
    })
    .expect("pseudo-terminals");

    let (batches_tx, mut batches) = mpsc::channel(64);
    let (stop_tx, stop) = watch::channel(false);
    let mut links = Vec::new();
    let mut link_stats = Vec::new();
    let mut held_open = Vec::new();
    for device in &mut fleet.devices {
        // The gateway opens the port by its path, as it would a real /dev/ttyUSB0. The slave
        // end the fleet opened stays open (unread) so the pty never hangs up between sessions.
        held_open.push(device.gateway_end.take());
        let port: SerialPortConfig =
            toml::from_str(&format!("path = {:?}", device.path.display().to_string())).unwrap();
        let (_requests_tx, requests) = mpsc::channel(1);
        let stats = Arc::new(LinkStats::default());
        link_stats.push(stats.clone());
        links.push(tokio::spawn(run_serial_link(
            port,
            SessionConfig::default(),
            Backoff::default(),
            batches_tx.clone(),
            requests,
            stats,
            stop.clone(),
        )));
    }
    drop(batches_tx);

    // The journal: stores batches, and now and then says it is busy.
    let store = tokio::spawn(async move {
        let mut rng = Rng::new(3);
        let mut stored: Vec<Reading> = Vec::new();
        let mut busy = 0;
        while let Some(batch) = batches.recv().await {
            if rng.chance(0.05) {
                busy += 1;
                let _ = batch.commit.send(CommitOutcome::Busy);
                continue;
            }
            stored.extend(batch.readings);
            let _ = batch.commit.send(CommitOutcome::Durable);
        }
        (stored, busy)
    });

    tokio::time::sleep(Duration::from_secs(4)).await;
    let devices = fleet.shutdown().await;
    stop_tx.send(true).unwrap();
    for link in links {
        tokio::time::timeout(Duration::from_secs(10), link)
            .await
            .unwrap()
            .unwrap();
    }
    let (stored, busy) = store.await.unwrap();

    let mut stored_count: HashMap<(String, String, i64), usize> = HashMap::new();
    for reading in &stored {
        *stored_count.entry(key(reading)).or_default() += 1;
    }
    let duplicates: Vec<_> = stored_count.iter().filter(|(_, &n)| n > 1).collect();
    assert!(
        duplicates.is_empty(),
        "stored twice: {:?}",
        &duplicates[..duplicates.len().min(5)]
    );

    let mut acked_total = 0;
    let mut faults = 0;
    for device in &devices {
        let stats = device.stats();
        faults +=
            stats.fault_garbage_bursts + stats.fault_frames_dropped + stats.fault_bits_flipped;
        for reading in device.acked_readings() {
            acked_total += 1;
            let stored_reading = stored.iter().find(|r| key(r) == key(reading));
            assert_eq!(
                stored_reading,
                Some(reading),
                "acknowledged but not stored as sent"
            );
        }
        assert!(
            stats.readings_acked > 100,
            "{} acked only {}",
            device.device_id(),
            stats.readings_acked
        );
    }
    let frame_errors: u64 = link_stats
        .iter()
        .map(|s| {
            s.session
                .frame_errors
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    assert!(
        faults > 0 && frame_errors > 0 && busy > 0,
        "the line and the journal must misbehave"
    );
    // What was stored but not acknowledged is at most what was in flight when the test stopped.
    assert!(stored.len() >= acked_total);
    eprintln!(
        "{DEVICES} devices: {acked_total} readings acked, {} stored, {frame_errors} frame errors, {busy} busy NACKs",
        stored.len()
    );
}
