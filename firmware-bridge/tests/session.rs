//! The gateway's device session against a scripted device speaking the protocol core over an
//! in-memory link: ACK only after the durable commit, duplicates, NACKs, commands, timeouts.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fieldgate_firmware_bridge::protocol::{
    encode_frame, DeviceReading, DeviceValue, FrameDecoder, List, Message, NackReason, MAX_WIRE_LEN,
};
use fieldgate_firmware_bridge::session::{
    CommitOutcome, DeviceBatch, Session, SessionConfig, SessionError, SessionHandle, SessionStats,
};
use fieldgate_shared::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

/// The device end of the link, driven by the test.
struct ScriptedDevice {
    link: DuplexStream,
    decoder: FrameDecoder,
    pending: Vec<u8>,
}

/// What the gateway sent, owned.
#[derive(Debug, PartialEq)]
enum FromGateway {
    Ack(u16),
    Nack(u16, NackReason),
    Time,
    Command {
        seq: u16,
        name: String,
        args: Vec<u8>,
    },
    Other(String),
}

impl ScriptedDevice {
    async fn send(&mut self, seq: u16, message: &Message<'_>) {
        let mut wire = [0u8; MAX_WIRE_LEN];
        let n = encode_frame(seq, message, &mut wire).unwrap();
        self.link.write_all(&wire[..n]).await.unwrap();
    }

    async fn receive(&mut self) -> FromGateway {
        loop {
            while !self.pending.is_empty() {
                let (used, frame) = self.decoder.feed(&self.pending);
                let frame = frame.map(|f| {
                    let frame = f.expect("the gateway sends valid frames");
                    match frame.message {
                        Message::Ack { seq } => FromGateway::Ack(seq),
                        Message::Nack { seq, reason } => FromGateway::Nack(seq, reason),
                        Message::Time { .. } => FromGateway::Time,
                        Message::Command { name, args } => FromGateway::Command {
                            seq: frame.seq,
                            name: name.to_owned(),
                            args: args.to_vec(),
                        },
                        other => FromGateway::Other(format!("{other:?}")),
                    }
                });
                self.pending.drain(..used);
                if let Some(frame) = frame {
                    return frame;
                }
            }
            let mut buf = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(10), self.link.read(&mut buf))
                .await
                .expect("the gateway answers")
                .unwrap();
            assert!(n > 0, "the gateway closed the link");
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    async fn hello(&mut self) {
        self.send(
            100,
            &Message::Hello {
                device_id: "meter-1",
                model: "EM-100",
                firmware: "1.0.0",
                metrics: List::Items(&["temperature", "count"]),
            },
        )
        .await;
        assert_eq!(self.receive().await, FromGateway::Ack(100));
        assert_eq!(self.receive().await, FromGateway::Time);
    }

    async fn readings(&mut self, seq: u16, mantissa: i64) {
        let readings = [
            DeviceReading {
                channel: 0,
                offset_ms: 0,
                value: DeviceValue::Decimal { mantissa, scale: 2 },
            },
            DeviceReading {
                channel: 1,
                offset_ms: 10,
                value: DeviceValue::Int(7),
            },
        ];
        self.send(
            seq,
            &Message::Readings {
                base_ts_ms: 1_767_225_600_000,
                readings: List::Items(&readings),
            },
        )
        .await;
    }
}

struct Gateway {
    batches: mpsc::Receiver<DeviceBatch>,
    handle: SessionHandle,
    stats: Arc<SessionStats>,
    task: tokio::task::JoinHandle<Result<(), SessionError>>,
}

fn start(config: SessionConfig) -> (Gateway, ScriptedDevice) {
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
    let device = ScriptedDevice {
        link: device_end,
        decoder: FrameDecoder::new(),
        pending: Vec::new(),
    };
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
