//! The gateway's side of a serial device session: HELLO, clock setting, READINGS handed to a
//! consumer and ACKed only once the consumer says they are durable, duplicate suppression of
//! resent frames, commands with timeouts, and resumable firmware transfer with progress.
//!
//! One session runs per serial link, over any byte stream (a real port, a pseudo-terminal, an
//! in-memory pipe in tests). It ends when the link fails; [`crate::transport`] reopens the port
//! and starts a new one. Nothing is lost across that: the device keeps what was not ACKed and
//! resends it, and a firmware transfer resumes where the device says it stands.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fieldgate_shared::{DeviceId, MetricName, Quality, Reading, ShortStr, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::protocol::{
    encode_frame, DeviceReading, DeviceValue, FirmwareState, FrameDecoder, List, Message,
    NackReason, ProtocolError, MAX_CHUNK_LEN, MAX_WIRE_LEN,
};

#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// How long a command may wait for its RESULT.
    pub command_timeout: Duration,
    /// How long to wait for a device's FW_STATUS before resending the last firmware message.
    pub firmware_step_timeout: Duration,
    /// Resends of one firmware message before the transfer is abandoned for this link.
    pub firmware_retries: u32,
    /// Firmware chunk size, at most [`MAX_CHUNK_LEN`].
    pub firmware_chunk_len: u16,
    /// READINGS frames remembered to recognise resends whose ACK was lost.
    pub dedupe_window: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            command_timeout: Duration::from_secs(5),
            firmware_step_timeout: Duration::from_secs(1),
            firmware_retries: 5,
            firmware_chunk_len: 256,
            dedupe_window: 256,
        }
    }
}

/// What the device said about itself in HELLO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device: DeviceId,
    pub model: String,
    pub firmware: String,
    pub metrics: Vec<MetricName>,
}

/// Readings of one READINGS frame. The consumer stores them and then answers through `commit`:
/// only `Durable` makes the session ACK the frame; `Busy` (or dropping `commit`) NACKs it and the
/// device keeps the readings and resends them later.
#[derive(Debug)]
pub struct DeviceBatch {
    pub device: DeviceId,
    pub readings: Vec<Reading>,
    pub commit: oneshot::Sender<CommitOutcome>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    Durable,
    Busy,
}

/// Requests an operator or the edge agent makes of a device.
#[derive(Debug)]
pub enum SessionRequest {
    Command {
        name: String,
        args: Vec<u8>,
        reply: oneshot::Sender<Result<CommandResult, SessionError>>,
    },
    Firmware {
        image: Arc<Vec<u8>>,
        progress: watch::Sender<FirmwareProgress>,
        reply: oneshot::Sender<Result<(), SessionError>>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandResult {
    pub status: u8,
    pub data: Vec<u8>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FirmwareProgress {
    pub sent_bytes: u32,
    pub total_bytes: u32,
    /// Set once the device has verified the image's digest.
    pub verified: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("serial link failed: {0}")]
    Link(#[from] std::io::Error),
    #[error("the serial link closed")]
    Closed,
    #[error("the device has not said HELLO yet")]
    NoHello,
    #[error("the device sent an invalid HELLO: {0}")]
    BadHello(String),
    #[error("no RESULT within {0:?}")]
    CommandTimeout(Duration),
    #[error("the device did not answer a firmware step after {0} tries")]
    FirmwareTimeout(u32),
    #[error("the device refused the firmware: {0:?}")]
    FirmwareRejected(FirmwareState),
    #[error("firmware image of {0} bytes is larger than 4 GiB")]
    FirmwareTooLarge(usize),
    #[error("another firmware transfer is in progress")]
    FirmwareBusy,
}

/// Counters of one link, shared with whoever reports them (the edge's `/metrics`).
#[derive(Debug, Default)]
pub struct SessionStats {
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub frame_errors: AtomicU64,
    pub readings_delivered: AtomicU64,
    pub batches_acked: AtomicU64,
    pub batches_nacked: AtomicU64,
    pub duplicates: AtomicU64,
    pub invalid: AtomicU64,
    pub hellos: AtomicU64,
}

impl SessionStats {
    fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The value of a device reading in the data model. Decimals divide back exactly (as in the
/// batch codec), so 2153 at scale 2 is the same f64 as parsing "21.53".
pub fn device_value(value: &DeviceValue<'_>) -> Result<Value, &'static str> {
    Ok(match *value {
        DeviceValue::F32(v) => Value::F64(v as f64),
        DeviceValue::F64(v) => Value::F64(v),
        DeviceValue::Int(v) => Value::I64(v),
        DeviceValue::Bool(v) => Value::Bool(v),
        DeviceValue::Decimal { mantissa, scale } => {
            Value::F64(mantissa as f64 / 10f64.powi(scale as i32))
        }
        DeviceValue::Str(s) => Value::Str(ShortStr::new(s).map_err(|_| "string too long")?),
    })
}

/// READINGS frames this link has stored recently, by sequence number and a hash of their
/// payload. A resend (same seq, same bytes: its ACK was lost) is recognised even after the link
/// dropped or the device said HELLO again, while a device that restarted its counter and sends
/// new data under an old seq is not mistaken for one. Share one per link across its sessions.
#[derive(Debug, Default)]
pub struct DeliveryMemory {
    inner: std::sync::Mutex<DeliveryMemoryInner>,
}

#[derive(Debug, Default)]
struct DeliveryMemoryInner {
    order: VecDeque<FrameKey>,
    keys: HashSet<FrameKey>,
}

type FrameKey = (u16, u64);

impl DeliveryMemory {
    fn contains(&self, key: &FrameKey) -> bool {
        self.inner.lock().expect("not poisoned").keys.contains(key)
    }

    fn remember(&self, key: FrameKey, window: usize) {
        let mut inner = self.inner.lock().expect("not poisoned");
        if inner.keys.insert(key) {
            inner.order.push_back(key);
        }
        while inner.order.len() > window {
            if let Some(old) = inner.order.pop_front() {
                inner.keys.remove(&old);
            }
        }
    }
}

fn frame_key(seq: u16, base_ts_ms: i64, readings: &List<'_, DeviceReading<'_>>) -> FrameKey {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    base_ts_ms.hash(&mut hasher);
    match readings {
        // Received frames: their payload bytes, as they came.
        List::Encoded { count, bytes } => (count, bytes).hash(&mut hasher),
        List::Items(items) => format!("{items:?}").hash(&mut hasher),
    }
    (seq, hasher.finish())
}

struct PendingCommand {
    seq: u16,
    deadline: Instant,
    reply: oneshot::Sender<Result<CommandResult, SessionError>>,
}

struct FirmwareTransfer {
    image: Arc<Vec<u8>>,
    sha256: [u8; 32],
    progress: watch::Sender<FirmwareProgress>,
    reply: oneshot::Sender<Result<(), SessionError>>,
    /// The message to resend when the device is silent, and when.
    last_sent: FirmwareStep,
    deadline: Instant,
    tries: u32,
}

#[derive(Clone, Copy, Debug)]
enum FirmwareStep {
    Begin,
    Chunk(u32),
    End,
}

/// One session over one link. Build it with [`Session::new`] and drive it with [`Session::run`].
pub struct Session<P> {
    port: P,
    config: SessionConfig,
    stats: Arc<SessionStats>,
    device: Option<DeviceInfo>,
    next_seq: u16,
    delivered: Arc<DeliveryMemory>,
    in_commit: HashSet<FrameKey>,
    commands: Vec<PendingCommand>,
    firmware: Option<FirmwareTransfer>,
    out: Vec<u8>,
}

impl<P: AsyncRead + AsyncWrite + Unpin> Session<P> {
    pub fn new(port: P, config: SessionConfig, stats: Arc<SessionStats>) -> Self {
        Self {
            port,
            config,
            stats,
            device: None,
            next_seq: 0,
            delivered: Arc::default(),
            in_commit: HashSet::new(),
            commands: Vec::new(),
            firmware: None,
            out: Vec::with_capacity(4 * MAX_WIRE_LEN),
        }
    }

    /// Shares what was delivered with earlier sessions of the same link, so resends are
    /// recognised across link losses.
    pub fn remembering(mut self, delivered: Arc<DeliveryMemory>) -> Self {
        self.delivered = delivered;
        self
    }

    /// The device on the other end, once it has said HELLO.
    pub fn device(&self) -> Option<&DeviceInfo> {
        self.device.as_ref()
    }

    /// Runs until the link fails or `shutdown` resolves. READINGS go to `batches`; `requests`
    /// brings commands and firmware transfers. A request still open when the link fails is
    /// answered with the error, and can be made again on the next session (firmware resumes).
    pub async fn run(
        mut self,
        batches: &mpsc::Sender<DeviceBatch>,
        requests: &mut mpsc::Receiver<SessionRequest>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), SessionError> {
        tokio::pin!(shutdown);
        let mut decoder = Box::new(FrameDecoder::new());
        let mut read_buf = vec![0u8; 4096];
        let mut commits: JoinSet<(u16, FrameKey, CommitOutcome)> = JoinSet::new();
        let mut requests_open = true;
        let result = loop {
            let next_deadline = self.next_deadline();
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                read = self.port.read(&mut read_buf) => {
                    let n = match read {
                        Ok(0) => break Err(SessionError::Closed),
                        Ok(n) => n,
                        Err(err) => break Err(err.into()),
                    };
                    let errors_before = decoder.stats().errors();
                    let mut rest = &read_buf[..n];
                    while !rest.is_empty() {
                        let (used, frame) = decoder.feed(rest);
                        rest = &rest[used..];
                        match frame {
                            Some(Ok(frame)) => {
                                SessionStats::bump(&self.stats.frames_in, 1);
                                self.on_frame(frame.seq, &frame.message, batches, &mut commits);
                            }
                            // The CRC held, so the sender and its seq are real: tell it.
                            Some(Err(ProtocolError::UnknownType { seq, .. })) => {
                                self.send(&Message::Nack { seq, reason: NackReason::Unsupported });
                            }
                            Some(Err(ProtocolError::Malformed { seq, .. })) => {
                                self.send(&Message::Nack { seq, reason: NackReason::Invalid });
                            }
                            _ => {}
                        }
                    }
                    SessionStats::bump(&self.stats.frame_errors, decoder.stats().errors() - errors_before);
                }
                Some(done) = commits.join_next(), if !commits.is_empty() => {
                    if let Ok((seq, key, outcome)) = done {
                        self.on_commit(seq, key, outcome);
                    }
                }
                request = requests.recv(), if requests_open => match request {
                    Some(request) => self.on_request(request),
                    None => requests_open = false,
                },
                _ = sleep_until(next_deadline) => self.on_timers(),
            }
            if let Err(err) = self.flush().await {
                break Err(err);
            }
        };
        self.fail_open_requests(&result);
        result
    }

    fn send(&mut self, message: &Message<'_>) -> u16 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let mut wire = [0u8; MAX_WIRE_LEN];
        match encode_frame(seq, message, &mut wire) {
            Ok(n) => {
                self.out.extend_from_slice(&wire[..n]);
                SessionStats::bump(&self.stats.frames_out, 1);
            }
            Err(err) => tracing::error!(error = %err, "cannot encode a frame to the device"),
        }
        seq
    }

    async fn flush(&mut self) -> Result<(), SessionError> {
        if !self.out.is_empty() {
            self.port.write_all(&self.out).await?;
            self.port.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    fn on_frame(
        &mut self,
        seq: u16,
        message: &Message<'_>,
        batches: &mpsc::Sender<DeviceBatch>,
        commits: &mut JoinSet<(u16, FrameKey, CommitOutcome)>,
    ) {
        match *message {
            Message::Hello {
                device_id,
                model,
                firmware,
                metrics,
            } => match parse_hello(device_id, model, firmware, &metrics) {
                Ok(info) => {
                    tracing::info!(device = %info.device, model = %info.model, firmware = %info.firmware, "device said HELLO");
                    SessionStats::bump(&self.stats.hellos, 1);
                    self.device = Some(info);
                    self.send(&Message::Ack { seq });
                    self.send(&Message::Time {
                        unix_ms: now_unix_ms(),
                    });
                }
                Err(why) => {
                    tracing::warn!(%why, "device sent an invalid HELLO");
                    SessionStats::bump(&self.stats.invalid, 1);
                    self.send(&Message::Nack {
                        seq,
                        reason: NackReason::Invalid,
                    });
                }
            },
            Message::Readings {
                base_ts_ms,
                readings,
            } => self.on_readings(seq, base_ts_ms, &readings, batches, commits),
            Message::Result {
                command_seq,
                status,
                data,
            } => {
                if let Some(i) = self.commands.iter().position(|c| c.seq == command_seq) {
                    let command = self.commands.swap_remove(i);
                    let _ = command.reply.send(Ok(CommandResult {
                        status,
                        data: data.to_vec(),
                    }));
                }
            }
            Message::FirmwareStatus { state, offset } => self.on_firmware_status(state, offset),
            // ACKs of our TIME frames, and anything a device should not send, need no answer.
            _ => {}
        }
    }

    fn on_readings(
        &mut self,
        seq: u16,
        base_ts_ms: i64,
        readings: &List<'_, DeviceReading<'_>>,
        batches: &mpsc::Sender<DeviceBatch>,
        commits: &mut JoinSet<(u16, FrameKey, CommitOutcome)>,
    ) {
        let Some(device) = &self.device else {
            self.send(&Message::Nack {
                seq,
                reason: NackReason::HelloFirst,
            });
            return;
        };
        let key = frame_key(seq, base_ts_ms, readings);
        if self.delivered.contains(&key) {
            // A resend whose ACK was lost: stored already, ACK again.
            SessionStats::bump(&self.stats.duplicates, 1);
            self.send(&Message::Ack { seq });
            return;
        }
        if self.in_commit.contains(&key) {
            SessionStats::bump(&self.stats.duplicates, 1);
            return;
        }
        let converted: Result<Vec<Reading>, &'static str> = readings
            .iter()
            .map(|r| {
                let metric = device
                    .metrics
                    .get(r.channel as usize)
                    .ok_or("channel not named in HELLO")?;
                Ok(Reading {
                    device: device.device.clone(),
                    metric: metric.clone(),
                    ts_ms: base_ts_ms.saturating_add(r.offset_ms as i64),
                    value: device_value(&r.value)?,
                    quality: Quality::Good,
                })
            })
            .collect();
        let readings = match converted {
            Ok(readings) => readings,
            Err(why) => {
                tracing::warn!(device = %device.device, %why, "invalid READINGS frame");
                SessionStats::bump(&self.stats.invalid, 1);
                self.send(&Message::Nack {
                    seq,
                    reason: NackReason::Invalid,
                });
                return;
            }
        };
        let (commit, outcome) = oneshot::channel();
        let batch = DeviceBatch {
            device: device.device.clone(),
            readings,
            commit,
        };
        let n_readings = batch.readings.len() as u64;
        match batches.try_send(batch) {
            Ok(()) => {
                SessionStats::bump(&self.stats.readings_delivered, n_readings);
                self.in_commit.insert(key);
                commits
                    .spawn(async move { (seq, key, outcome.await.unwrap_or(CommitOutcome::Busy)) });
            }
            // The consumer is saturated or gone: the device keeps the readings and retries.
            Err(_) => self.on_commit(seq, key, CommitOutcome::Busy),
        }
    }

    fn on_commit(&mut self, seq: u16, key: FrameKey, outcome: CommitOutcome) {
        self.in_commit.remove(&key);
        match outcome {
            CommitOutcome::Durable => {
                SessionStats::bump(&self.stats.batches_acked, 1);
                self.delivered.remember(key, self.config.dedupe_window);
                self.send(&Message::Ack { seq });
            }
            CommitOutcome::Busy => {
                SessionStats::bump(&self.stats.batches_nacked, 1);
                self.send(&Message::Nack {
                    seq,
                    reason: NackReason::Busy,
                });
            }
        }
    }

    fn on_request(&mut self, request: SessionRequest) {
        match request {
            SessionRequest::Command { name, args, reply } => {
                if self.device.is_none() {
                    let _ = reply.send(Err(SessionError::NoHello));
                    return;
                }
                let seq = self.send(&Message::Command {
                    name: &name,
                    args: &args,
                });
                self.commands.push(PendingCommand {
                    seq,
                    deadline: Instant::now() + self.config.command_timeout,
                    reply,
                });
            }
            SessionRequest::Firmware {
                image,
                progress,
                reply,
            } => {
                if self.firmware.is_some() {
                    let _ = reply.send(Err(SessionError::FirmwareBusy));
                    return;
                }
                if image.len() > u32::MAX as usize {
                    let _ = reply.send(Err(SessionError::FirmwareTooLarge(image.len())));
                    return;
                }
                let sha256: [u8; 32] = Sha256::digest(image.as_slice()).into();
                self.firmware = Some(FirmwareTransfer {
                    image,
                    sha256,
                    progress,
                    reply,
                    last_sent: FirmwareStep::Begin,
                    deadline: Instant::now(),
                    tries: 0,
                });
                self.send_firmware_step(FirmwareStep::Begin);
            }
        }
    }

    fn send_firmware_step(&mut self, step: FirmwareStep) {
        let Some(transfer) = self.firmware.as_mut() else {
            return;
        };
        let chunk_len = (self.config.firmware_chunk_len as usize).clamp(1, MAX_CHUNK_LEN);
        transfer.last_sent = step;
        transfer.deadline = Instant::now() + self.config.firmware_step_timeout;
        let image = transfer.image.clone();
        let message = match step {
            FirmwareStep::Begin => Message::FirmwareBegin {
                size: image.len() as u32,
                sha256: transfer.sha256,
                chunk_size: chunk_len as u16,
            },
            FirmwareStep::Chunk(offset) => {
                let start = offset as usize;
                let end = (start + chunk_len).min(image.len());
                Message::FirmwareChunk {
                    offset,
                    data: &image[start..end],
                }
            }
            FirmwareStep::End => Message::FirmwareEnd,
        };
        self.send(&message);
    }

    fn on_firmware_status(&mut self, state: FirmwareState, offset: u32) {
        let Some(transfer) = self.firmware.as_mut() else {
            return;
        };
        let total = transfer.image.len() as u32;
        match state {
            // The device lost the transfer (it rebooted, say): start over, which resumes from
            // whatever it still holds. Counted as a try, so a device stuck in Idle ends it.
            FirmwareState::Idle => self.send_firmware_step(FirmwareStep::Begin),
            FirmwareState::Receiving => {
                transfer.tries = 0;
                let offset = offset.min(total);
                transfer.progress.send_replace(FirmwareProgress {
                    sent_bytes: offset,
                    total_bytes: total,
                    verified: false,
                });
                let step = if offset == total {
                    FirmwareStep::End
                } else {
                    FirmwareStep::Chunk(offset)
                };
                self.send_firmware_step(step);
            }
            FirmwareState::Verified if offset == total => {
                let transfer = self.firmware.take().expect("checked above");
                transfer.progress.send_replace(FirmwareProgress {
                    sent_bytes: total,
                    total_bytes: total,
                    verified: true,
                });
                let _ = transfer.reply.send(Ok(()));
            }
            FirmwareState::Verified | FirmwareState::DigestMismatch | FirmwareState::Failed => {
                let transfer = self.firmware.take().expect("checked above");
                let _ = transfer
                    .reply
                    .send(Err(SessionError::FirmwareRejected(state)));
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let commands = self.commands.iter().map(|c| c.deadline);
        let firmware = self.firmware.as_ref().map(|f| f.deadline);
        commands.chain(firmware).min()
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        let timeout = self.config.command_timeout;
        for command in extract_if(&mut self.commands, |c| c.deadline <= now) {
            let _ = command
                .reply
                .send(Err(SessionError::CommandTimeout(timeout)));
        }
        let retries = self.config.firmware_retries;
        if let Some(transfer) = self.firmware.as_mut() {
            if transfer.deadline <= now {
                transfer.tries += 1;
                if transfer.tries > retries {
                    let transfer = self.firmware.take().expect("checked above");
                    let _ = transfer
                        .reply
                        .send(Err(SessionError::FirmwareTimeout(retries)));
                } else {
                    // Ask where the device stands rather than guess: FW_BEGIN with the same
                    // digest is answered with the offset it holds.
                    self.send_firmware_step(FirmwareStep::Begin);
                }
            }
        }
    }

    fn fail_open_requests(&mut self, result: &Result<(), SessionError>) {
        let why = || match result {
            Err(SessionError::Link(err)) => {
                SessionError::Link(std::io::Error::new(err.kind(), err.to_string()))
            }
            _ => SessionError::Closed,
        };
        for command in self.commands.drain(..) {
            let _ = command.reply.send(Err(why()));
        }
        if let Some(transfer) = self.firmware.take() {
            let _ = transfer.reply.send(Err(why()));
        }
    }
}

fn extract_if<T>(items: &mut Vec<T>, mut pred: impl FnMut(&T) -> bool) -> Vec<T> {
    let mut taken = Vec::new();
    let mut i = 0;
    while i < items.len() {
        if pred(&items[i]) {
            taken.push(items.swap_remove(i));
        } else {
            i += 1;
        }
    }
    taken
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn parse_hello(
    device_id: &str,
    model: &str,
    firmware: &str,
    metrics: &List<'_, &str>,
) -> Result<DeviceInfo, String> {
    let device = DeviceId::new(device_id).map_err(|e| e.to_string())?;
    let metrics = metrics
        .iter()
        .map(MetricName::new)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    Ok(DeviceInfo {
        device,
        model: model.to_owned(),
        firmware: firmware.to_owned(),
        metrics,
    })
}

/// A handle to send requests to a running session.
#[derive(Clone)]
pub struct SessionHandle {
    requests: mpsc::Sender<SessionRequest>,
}

impl SessionHandle {
    pub fn new(requests: mpsc::Sender<SessionRequest>) -> Self {
        Self { requests }
    }

    pub async fn command(&self, name: &str, args: &[u8]) -> Result<CommandResult, SessionError> {
        let (reply, result) = oneshot::channel();
        self.requests
            .send(SessionRequest::Command {
                name: name.to_owned(),
                args: args.to_vec(),
                reply,
            })
            .await
            .map_err(|_| SessionError::Closed)?;
        result.await.map_err(|_| SessionError::Closed)?
    }

    /// Sends a firmware image; resumes where the device stands. Watch `progress` to follow it.
    pub async fn firmware(
        &self,
        image: Arc<Vec<u8>>,
        progress: watch::Sender<FirmwareProgress>,
    ) -> Result<(), SessionError> {
        let (reply, result) = oneshot::channel();
        self.requests
            .send(SessionRequest::Firmware {
                image,
                progress,
                reply,
            })
            .await
            .map_err(|_| SessionError::Closed)?;
        result.await.map_err(|_| SessionError::Closed)?
    }
}
