//! The gateway's device session against a scripted device speaking the protocol core over an
//! in-memory link: ACK only after the durable commit, duplicates, NACKs, commands, timeouts.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

mod scripted;

use fieldgate_firmware_bridge::protocol::{DeviceReading, DeviceValue, List, Message, NackReason};
use fieldgate_firmware_bridge::session::{
    CommitOutcome, DeviceBatch, Session, SessionConfig, SessionError, SessionHandle, SessionStats,
};
use fieldgate_shared::Value;
use scripted::{FromGateway, ScriptedDevice};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

struct Gateway {
    batches: mpsc::Receiver<DeviceBatch>,
    handle: SessionHandle,
    stats: Arc<SessionStats>,
    task: tokio::task::JoinHandle<Result<(), SessionError>>,
}

fn start(config: SessionConfig) -> (Gateway, ScriptedDevice<DuplexStream>) {
    let (gateway_end, device_end) = tokio::io::duplex(64 * 1024);
    let (batch_tx, batches) = mpsc::channel(16);
    let (request_tx, mut requests) = mpsc::channel(4);
    let stats = Arc::new(SessionStats::default());
    let session = Session::new(gateway_end, config, stats.clone());
    let task = tokio::spawn(async move {
        session
            .run(&batch_tx, &mut requests, std::future::pending())
            .await
    });
    let gateway = Gateway {
        batches,
        handle: SessionHandle::new(request_tx),
        stats,
        task,
    };
    let device = ScriptedDevice::new(device_end);
    (gateway, device)
}

#[tokio::test]
async fn readings_are_acked_only_after_the_durable_commit() {
    let (mut gateway, mut device) = start(SessionConfig::default());
    device.readings(1, 2153).await;
    assert_eq!(
        device.receive().await,
        FromGateway::Nack(1, NackReason::HelloFirst)
    );

    device.hello().await;
    device.readings(2, 2153).await;
    let batch = gateway.batches.recv().await.unwrap();
    assert_eq!(batch.device.as_str(), "meter-1");
    assert_eq!(batch.readings.len(), 2);
    assert_eq!(batch.readings[0].metric.as_str(), "temperature");
    assert_eq!(batch.readings[0].value, Value::F64(21.53));
    assert_eq!(batch.readings[1].ts_ms, 1_767_225_600_010);
    assert_eq!(batch.readings[1].value, Value::I64(7));

    // Before the commit, a resend of the same frame is neither delivered again nor ACKed.
    device.readings(2, 2153).await;
    tokio::task::yield_now().await;
    assert!(gateway.batches.try_recv().is_err());

    batch.commit.send(CommitOutcome::Durable).unwrap();
    assert_eq!(device.receive().await, FromGateway::Ack(2));

    // The ACK was lost, say, and the device resends: ACKed again, not delivered again.
    device.readings(2, 2153).await;
    assert_eq!(device.receive().await, FromGateway::Ack(2));
    assert!(gateway.batches.try_recv().is_err());
    assert_eq!(gateway.stats.duplicates.load(Ordering::Relaxed), 2);
    assert_eq!(gateway.stats.batches_acked.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_busy_or_vanished_consumer_gets_the_frame_nacked_busy() {
    let (mut gateway, mut device) = start(SessionConfig::default());
    device.hello().await;
    device.readings(5, 1).await;
    let batch = gateway.batches.recv().await.unwrap();
    batch.commit.send(CommitOutcome::Busy).unwrap();
    assert_eq!(
        device.receive().await,
        FromGateway::Nack(5, NackReason::Busy)
    );

    // The device retries; this time the consumer drops the batch without answering.
    device.readings(5, 1).await;
    drop(gateway.batches.recv().await.unwrap());
    assert_eq!(
        device.receive().await,
        FromGateway::Nack(5, NackReason::Busy)
    );

    // And then it is stored.
    device.readings(5, 1).await;
    let batch = gateway.batches.recv().await.unwrap();
    batch.commit.send(CommitOutcome::Durable).unwrap();
    assert_eq!(device.receive().await, FromGateway::Ack(5));
}

#[tokio::test]
async fn invalid_frames_are_nacked_and_garbage_is_counted() {
    let (gateway, mut device) = start(SessionConfig::default());
    device.hello().await;
    let unknown_channel = [DeviceReading {
        channel: 9,
        offset_ms: 0,
        value: DeviceValue::Bool(true),
    }];
    device
        .send(
            8,
            &Message::Readings {
                base_ts_ms: 0,
                readings: List::Items(&unknown_channel),
            },
        )
        .await;
    assert_eq!(
        device.receive().await,
        FromGateway::Nack(8, NackReason::Invalid)
    );

    device
        .link
        .write_all(&[0x42, 0x17, 0x00, 0x99, 0x00])
        .await
        .unwrap();
    device
        .send(
            101,
            &Message::Hello {
                device_id: "bad name/with slash",
                model: "x",
                firmware: "y",
                metrics: List::Items(&[]),
            },
        )
        .await;
    assert_eq!(
        device.receive().await,
        FromGateway::Nack(101, NackReason::Invalid)
    );
    assert_eq!(gateway.stats.frame_errors.load(Ordering::Relaxed), 2);
    assert_eq!(gateway.stats.invalid.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn commands_get_results_or_time_out() {
    let config = SessionConfig {
        command_timeout: Duration::from_millis(200),
        ..SessionConfig::default()
    };
    let (gateway, mut device) = start(config);
    let err = gateway.handle.command("ping", b"x").await.unwrap_err();
    assert!(matches!(err, SessionError::NoHello), "{err}");
    device.hello().await;

    let handle = gateway.handle.clone();
    let answer = tokio::spawn(async move { handle.command("ping", b"hello").await });
    let FromGateway::Command { seq, name, args } = device.receive().await else {
        panic!("expected a COMMAND");
    };
    assert_eq!((name.as_str(), args.as_slice()), ("ping", &b"hello"[..]));
    device
        .send(
            102,
            &Message::Result {
                command_seq: seq,
                status: 0,
                data: b"hello",
            },
        )
        .await;
    let result = answer.await.unwrap().unwrap();
    assert_eq!((result.status, result.data), (0, b"hello".to_vec()));

    // A device that never answers: the command times out and the session goes on.
    let err = gateway.handle.command("reboot", b"").await.unwrap_err();
    assert!(matches!(err, SessionError::CommandTimeout(_)), "{err}");
    assert!(!gateway.task.is_finished());
}

#[tokio::test]
async fn a_closed_link_ends_the_session_and_fails_open_requests() {
    let (gateway, mut device) = start(SessionConfig::default());
    device.hello().await;
    let handle = gateway.handle.clone();
    let answer = tokio::spawn(async move { handle.command("ping", b"").await });
    let _ = device.receive().await;
    drop(device);
    let ended = gateway.task.await.unwrap();
    assert!(matches!(ended, Err(SessionError::Closed)), "{ended:?}");
    assert!(answer.await.unwrap().is_err());
}

#[tokio::test]
async fn frames_with_a_good_crc_but_unknown_type_or_bad_payload_are_nacked() {
    use fieldgate_firmware_bridge::protocol::{cobs, crc};
    let (_gateway, mut device) = start(SessionConfig::default());
    device.hello().await;
    for (seq, type_code, payload) in [(40u16, 0x7fu8, &[][..]), (41, 0x05, &[1, 2][..])] {
        let mut frame = vec![1, type_code];
        frame.extend_from_slice(&seq.to_le_bytes());
        frame.extend_from_slice(payload);
        frame.extend_from_slice(&crc::crc32c(&frame).to_le_bytes());
        let mut wire = vec![0u8; cobs::max_encoded_len(frame.len()) + 1];
        let n = cobs::encode(&frame, &mut wire).unwrap();
        wire.truncate(n);
        wire.push(0);
        device.link.write_all(&wire).await.unwrap();
    }
    assert_eq!(
        device.receive().await,
        FromGateway::Nack(40, NackReason::Unsupported)
    );
    assert_eq!(
        device.receive().await,
        FromGateway::Nack(41, NackReason::Invalid)
    );
}

#[tokio::test]
async fn a_device_that_restarted_its_counter_is_not_mistaken_for_a_resend() {
    let (mut gateway, mut device) = start(SessionConfig::default());
    device.hello().await;
    device.readings(0, 2153).await;
    let batch = gateway.batches.recv().await.unwrap();
    batch.commit.send(CommitOutcome::Durable).unwrap();
    assert_eq!(device.receive().await, FromGateway::Ack(0));

    // Rebooted: HELLO again, and seq 0 again, but new readings.
    device.hello().await;
    device.readings(0, 2154).await;
    let batch = gateway.batches.recv().await.unwrap();
    assert_eq!(batch.readings[0].value, Value::F64(21.54));
    batch.commit.send(CommitOutcome::Durable).unwrap();
    assert_eq!(device.receive().await, FromGateway::Ack(0));

    // While an exact resend of an ACKed frame, even after a HELLO, is not stored again.
    device.hello().await;
    device.readings(0, 2154).await;
    assert_eq!(device.receive().await, FromGateway::Ack(0));
    assert!(gateway.batches.try_recv().is_err());
}
