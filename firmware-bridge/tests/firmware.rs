//! Firmware transfer from the gateway's session to a simulated device: a 1 MiB image with the
//! link cut twice midway ends on the device exactly, verified by its SHA-256, and the transfer
//! resumes where the device stood instead of starting over.

use std::sync::Arc;
use std::time::Duration;

use fieldgate_firmware_bridge::protocol::FirmwareState;
use fieldgate_firmware_bridge::session::{
    DeliveryMemory, FirmwareProgress, Session, SessionConfig, SessionError, SessionHandle,
    SessionStats,
};
use fieldgate_firmware_bridge::sim_serial::{drive_device, DeviceConfig, SimulatedDevice};
use fieldgate_shared::generate::Rng;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

const IMAGE_LEN: usize = 1 << 20;

/// One connection of the link: a session and the device driven over an in-memory pipe, until
/// `cut` fires. Returns the device (its flash survives) and how the transfer ended.
async fn connect_and_transfer(
    mut device: SimulatedDevice,
    epoch: Instant,
    image: Arc<Vec<u8>>,
    memory: Arc<DeliveryMemory>,
    cut_after_bytes: Option<u32>,
) -> (SimulatedDevice, Result<(), SessionError>, u32) {
    let (gateway_end, device_end) = tokio::io::duplex(16 * 1024);
    let (cut_tx, cut_rx) = oneshot::channel::<()>();
    let device_task = tokio::spawn(async move {
        drive_device(
            &mut device,
            device_end,
            async {
                let _ = cut_rx.await;
            },
            epoch,
            None,
        )
        .await;
        device
    });

    let (batches_tx, mut batches) = mpsc::channel(64);
    let (requests_tx, mut requests) = mpsc::channel(4);
    let session = Session::new(
        gateway_end,
        SessionConfig::default(),
        Arc::new(SessionStats::default()),
    )
    .remembering(memory);
    let session_task = tokio::spawn(async move {
        session
            .run(&batches_tx, &mut requests, std::future::pending())
            .await
    });
    // Readings the device sends meanwhile are committed, as the edge would.
    tokio::spawn(async move {
        while let Some(batch) = batches.recv().await {
            let _ = batch
                .commit
                .send(fieldgate_firmware_bridge::session::CommitOutcome::Durable);
        }
    });

    // The device must have said HELLO before the gateway talks firmware to it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let handle = SessionHandle::new(requests_tx);
    let (progress_tx, mut progress) = watch::channel(FirmwareProgress::default());
    let transfer = tokio::spawn(async move { handle.firmware(image, progress_tx).await });

    let mut cut_tx = Some(cut_tx);
    let mut started_at = None;
    // Follow the progress until the device verified the image or the transfer ended.
    while progress.changed().await.is_ok() {
        let seen = *progress.borrow();
        started_at.get_or_insert(seen.sent_bytes);
        if cut_after_bytes.is_some_and(|limit| seen.sent_bytes >= limit) {
            if let Some(cut) = cut_tx.take() {
                let _ = cut.send(());
            }
        }
        if seen.verified {
            break;
        }
    }
    let transfer_result = tokio::time::timeout(Duration::from_secs(120), transfer)
        .await
        .expect("the transfer ends")
        .unwrap();
    if let Some(cut) = cut_tx.take() {
        let _ = cut.send(());
    }
    let device = device_task.await.unwrap();
    session_task.abort();
    (device, transfer_result, started_at.unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mebibyte_image_survives_two_cut_links() {
    let mut rng = Rng::new(42);
    let image: Arc<Vec<u8>> = Arc::new((0..IMAGE_LEN).map(|_| rng.next_u64() as u8).collect());
    let device = SimulatedDevice::new(DeviceConfig {
        flash_size: 2 * IMAGE_LEN,
        ..DeviceConfig::for_index(0)
    })
    .unwrap();
    let epoch = Instant::now();
    let memory = Arc::new(DeliveryMemory::default());

    let (device, first, _) =
        connect_and_transfer(device, epoch, image.clone(), memory.clone(), Some(300_000)).await;
    assert!(first.is_err(), "the first link was cut mid-transfer");
    let held_after_first = device.firmware_image().len();
    assert!(
        (300_000..IMAGE_LEN).contains(&held_after_first),
        "{held_after_first}"
    );

    let (device, second, resumed_at) =
        connect_and_transfer(device, epoch, image.clone(), memory.clone(), Some(700_000)).await;
    assert!(second.is_err(), "the second link was cut mid-transfer");
    assert!(
        resumed_at as usize >= held_after_first - 4_096,
        "resumed at {resumed_at}"
    );

    let (device, third, resumed_at) =
        connect_and_transfer(device, epoch, image.clone(), memory, None).await;
    third.expect("the third link completes the transfer");
    assert!(resumed_at >= 600_000, "resumed at {resumed_at}");

    assert_eq!(device.firmware_state(), FirmwareState::Verified);
    assert_eq!(device.firmware_image().len(), IMAGE_LEN);
    assert_eq!(
        Sha256::digest(device.firmware_image()).as_slice(),
        Sha256::digest(image.as_slice()).as_slice()
    );
    // Resumed, not restarted: about one chunk per 256 bytes, plus the few lost at each cut.
    let appended = device.stats().firmware_chunks_appended;
    assert!(
        (4_096..4_096 + 64).contains(&appended),
        "{appended} chunks appended"
    );
}
