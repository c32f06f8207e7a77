//! A device scripted by a test, speaking the protocol core over any byte stream: what the
//! gateway's session is tested against.
#![allow(dead_code)]

use std::time::Duration;

use fieldgate_firmware_bridge::protocol::{
    encode_frame, DeviceReading, DeviceValue, FrameDecoder, List, Message, NackReason, MAX_WIRE_LEN,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The device end of the link, driven by the test.
pub struct ScriptedDevice<S> {
    pub link: S,
    decoder: FrameDecoder,
    pending: Vec<u8>,
}

/// What the gateway sent, owned.
#[derive(Debug, PartialEq)]
pub enum FromGateway {
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

impl<S: AsyncRead + AsyncWrite + Unpin> ScriptedDevice<S> {
    pub fn new(link: S) -> Self {
        Self {
            link,
            decoder: FrameDecoder::new(),
            pending: Vec::new(),
        }
    }

    pub async fn send(&mut self, seq: u16, message: &Message<'_>) {
        let mut wire = [0u8; MAX_WIRE_LEN];
        let n = encode_frame(seq, message, &mut wire).unwrap();
        self.link.write_all(&wire[..n]).await.unwrap();
    }

    pub async fn receive(&mut self) -> FromGateway {
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

    pub async fn hello(&mut self) {
        self.hello_without_answer().await;
        assert_eq!(self.receive().await, FromGateway::Ack(100));
        assert_eq!(self.receive().await, FromGateway::Time);
    }

    pub async fn hello_without_answer(&mut self) {
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
    }

    pub async fn readings(&mut self, seq: u16, mantissa: i64) {
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
