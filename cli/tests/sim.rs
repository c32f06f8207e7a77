//! `fieldgate sim serial` as a user runs it: the real binary's simulated devices, reached by a
//! gateway's serial link through the paths it prints.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fieldgate_firmware_bridge::session::{CommitOutcome, SessionConfig};
use fieldgate_firmware_bridge::transport::{run_serial_link, Backoff, LinkStats, SerialPortConfig};
use tokio::sync::{mpsc, watch};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_serial_devices_deliver_to_a_gateway_link() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .args([
            "sim",
            "serial",
            "--devices",
            "2",
            "--interval-ms",
            "50",
            "--duration",
            "4",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut paths = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.starts_with("point a gateway") {
            break;
        }
        if let Some(path) = line
            .split_whitespace()
            .nth(1)
            .filter(|p| p.starts_with('/'))
        {
            paths.push(path.to_owned());
        }
    }
    assert_eq!(paths.len(), 2, "{paths:?}");

    let (batches_tx, mut batches) = mpsc::channel(64);
    let (stop_tx, stop) = watch::channel(false);
    for path in &paths {
        let port: SerialPortConfig = toml::from_str(&format!("path = {path:?}")).unwrap();
        // No commands in this test: the request channel closes at once.
        let (_, requests) = mpsc::channel(1);
        tokio::spawn(run_serial_link(
            port,
            SessionConfig::default(),
            Backoff::default(),
            batches_tx.clone(),
            requests,
            Arc::new(LinkStats::default()),
            stop.clone(),
        ));
    }
    drop(batches_tx);
    let mut devices_seen = std::collections::HashSet::new();
    let mut readings = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some(batch)) = tokio::time::timeout_at(deadline, batches.recv()).await {
        devices_seen.insert(batch.device.to_string());
        readings += batch.readings.len();
        let _ = batch.commit.send(CommitOutcome::Durable);
    }
    stop_tx.send(true).unwrap();
    assert_eq!(devices_seen.len(), 2, "{devices_seen:?}");
    assert!(readings > 50, "{readings} readings");

    let summary: Vec<String> = lines.map(Result::unwrap).collect();
    assert!(child.wait().unwrap().success());
    let acked: u64 = summary
        .iter()
        .filter(|line| line.starts_with("dev-"))
        .map(|line| {
            line.split_whitespace()
                .nth(2)
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert!(acked > 50, "summary: {summary:?}");
}
