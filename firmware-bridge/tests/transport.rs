//! The supervised serial link over real pseudo-terminals: a USB-serial adapter that disappears
//! (socat, which owns the ptys, is killed) and comes back at the same path is reopened, and the
//! device's readings flow again.

mod scripted;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use fieldgate_firmware_bridge::session::{CommitOutcome, SessionConfig};
use fieldgate_firmware_bridge::transport::{
    open_port, run_serial_link, Backoff, LinkStats, SerialPortConfig,
};
use scripted::{FromGateway, ScriptedDevice};
use tokio::sync::{mpsc, watch};

/// Whether a tool this test needs is present. Outside CI a missing tool skips the test loudly;
/// with FIELDGATE_REQUIRE_ALL=1 (as .ci/run sets) it fails.
fn require(tool: &str, install: &str) -> bool {
    let found = Command::new(tool)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        let message = format!("{tool} is not installed ({install}); skipping this test");
        if std::env::var("FIELDGATE_REQUIRE_ALL").as_deref() == Ok("1") {
            panic!("FIELDGATE_REQUIRE_ALL=1: {message}");
        }
        eprintln!("\n!!! SKIPPED: {message}\n");
    }
    found
}

/// A pty pair whose ends appear at `gateway` and `device`, owned by socat.
struct Adapter(Child);

impl Adapter {
    async fn plug(dir: &Path) -> Adapter {
        // Owned by an Adapter at once, so the process is killed and reaped on every path.
        let adapter = Adapter(
            Command::new("socat")
                .arg(format!(
                    "pty,raw,echo=0,link={}",
                    dir.join("gateway").display()
                ))
                .arg(format!(
                    "pty,raw,echo=0,link={}",
                    dir.join("device").display()
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("socat starts"),
        );
        for _ in 0..200 {
            if dir.join("gateway").exists() && dir.join("device").exists() {
                return adapter;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("socat did not create its ptys");
    }

    fn unplug(self) {
        drop(self);
    }
}

impl Drop for Adapter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn port(path: &Path) -> SerialPortConfig {
    toml::from_str(&format!("path = {:?}", path.display().to_string())).unwrap()
}

async fn device_sends_readings(dir: &Path, seq: u16) {
    let stream = open_port(&port(&dir.join("device"))).expect("device end opens");
    let mut device = ScriptedDevice::new(stream);
    // The gateway may still be reopening its end: say HELLO until it answers.
    let answer = loop {
        device.hello_without_answer().await;
        match tokio::time::timeout(Duration::from_millis(500), device.receive()).await {
            Ok(answer) => break answer,
            Err(_) => continue,
        }
    };
    assert_eq!(answer, FromGateway::Ack(100));
    assert_eq!(device.receive().await, FromGateway::Time);
    device.readings(seq, 2153).await;
    assert_eq!(device.receive().await, FromGateway::Ack(seq));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_adapter_is_reopened_and_readings_flow_again() {
    if !require("socat", "apt-get install socat") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let adapter = Adapter::plug(dir.path()).await;

    let (batches_tx, mut batches) = mpsc::channel(16);
    let (_requests_tx, requests) = mpsc::channel(1);
    let (stop_tx, stop) = watch::channel(false);
    let stats = Arc::new(LinkStats::default());
    let backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(200),
    };
    let link = tokio::spawn(run_serial_link(
        port(&dir.path().join("gateway")),
        SessionConfig::default(),
        backoff,
        batches_tx,
        requests,
        stats.clone(),
        stop,
    ));
    let committer = tokio::spawn(async move {
        let mut delivered = 0;
        while let Some(batch) = batches.recv().await {
            delivered += batch.readings.len();
            let _ = batch.commit.send(CommitOutcome::Durable);
        }
        delivered
    });

    device_sends_readings(dir.path(), 1).await;
    adapter.unplug();
    // While the adapter is gone the gateway keeps trying to open it.
    for _ in 0..200 {
        if stats.open_failures.load(Relaxed) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(stats.link_failures.load(Relaxed) >= 1);
    assert!(stats.open_failures.load(Relaxed) >= 1);

    let adapter = Adapter::plug(dir.path()).await;
    device_sends_readings(dir.path(), 2).await;
    assert_eq!(stats.opens.load(Relaxed), 2);

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), link)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(committer.await.unwrap(), 4);
    adapter.unplug();
}

#[test]
fn rs485_on_a_port_without_it_is_a_clear_error() {
    if !require("socat", "apt-get install socat") {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let adapter = Adapter::plug(dir.path()).await;
        let config: SerialPortConfig = toml::from_str(&format!(
            "path = {:?}\n[rs485]\ndelay_after_send_ms = 1",
            dir.path().join("gateway").display().to_string()
        ))
        .unwrap();
        let err = open_port(&config).unwrap_err().to_string();
        assert!(err.contains("cannot enable RS-485"), "{err}");
        adapter.unplug();
    });
}
