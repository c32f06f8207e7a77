//! A simulated terminal device on the serial protocol's device side: a sans-IO state machine
//! ([`SimulatedDevice`]) with injectable faults, an async runner over any byte stream
//! ([`run_device`], [`drive_device`]) and a fleet of devices on pseudo-terminals
//! ([`spawn_devices`]).
//!
//! # Design
//!
//! [`SimulatedDevice`] does no I/O and reads no clock. It is fed received bytes and the time, as
//! milliseconds on the simulation's monotonic clock (`now_ms`, starting at 0 when the device is
//! created; a value lower than one already seen counts as the latest one), and returns the bytes
//! to write. [`SimulatedDevice::next_wakeup`] says when [`SimulatedDevice::poll`] next has work
//! (a sample, a resend, a HELLO retry, the end of a reboot). Readings come from a one-device
//! [`SensorFleet`] seeded with [`DeviceConfig::seed`]; faults draw from their own generator, so
//! turning a fault on does not change the sensor values.
//!
//! What the device does, in protocol terms:
//! - **Handshake.** At boot, after a reboot, when the gateway NACKs with `HelloFirst`, and when
//!   nothing valid arrived for [`DeviceConfig::link_timeout_ms`] while READINGS wait for an ACK
//!   (the only way a device on a serial line notices a lost link), it sends HELLO and sends no
//!   READINGS until TIME arrives. Each HELLO attempt has a fresh sequence number; HELLO is
//!   retried on the retransmit schedule until TIME arrives. TIME sets the clock and is ACKed
//!   whenever it arrives (a gateway may resynchronise at any time).
//! - **Clock.** `device time = now_ms + offset + clock_skew_ms + drift`, where TIME sets the
//!   offset so the device time equals `unix_ms` (before the first TIME the offset puts sim time 0
//!   at [`DeviceConfig::rtc_start_ms`]), and the drift is `clock_drift_ppm` of the time since
//!   the last TIME.
//! - **Samples** are taken every interval whether or not the link is up, stamped with the device
//!   time, and wait in a bounded buffer ([`DeviceConfig::buffer_readings`]); when it is full the
//!   oldest samples are dropped and counted. A READINGS frame carries up to
//!   [`DeviceConfig::samples_per_frame`] whole samples (fewer when they do not fit 512 bytes or
//!   the clock went back); analog metrics travel as `Decimal` with the metric's decimals,
//!   counters as `Int`, flags as `Bool`; a reading's channel is its metric's index in HELLO.
//! - **Reliability.** At most [`DeviceConfig::max_in_flight`] READINGS frames wait for an ACK.
//!   An unacked frame is resent with the same sequence number and the same bytes after
//!   `retransmit_initial_ms`, doubling to `retransmit_max_ms`; after a new TIME every unacked
//!   frame is resent at once. NACK `Busy`: resent after the current timeout. NACK `Invalid` or
//!   `Unsupported`: dropped and counted. NACK `HelloFirst`: HELLO again; the frame is kept.
//! - **Commands**: `ping` (RESULT data = args), `reboot` (RESULT, then a reboot), `set-interval`
//!   (args: ASCII milliseconds), `status` (a line of counters). RESULT status is
//!   [`STATUS_OK`], [`STATUS_UNKNOWN_COMMAND`] or [`STATUS_BAD_ARGUMENTS`]. A COMMAND repeated
//!   with the sequence number, name and arguments of the last one is not run again: its RESULT
//!   is resent (so a lost RESULT never reboots a device twice).
//! - **Firmware** lives in simulated flash, which survives lost links and reboots, so a transfer
//!   resumes: FW_BEGIN of the digest and size already (partly) held answers `Receiving` with the
//!   bytes held, anything else starts a fresh image at 0; an image larger than
//!   [`DeviceConfig::flash_size`] is `Failed`. FW_CHUNK at the held offset is appended; at any
//!   other offset it is ignored and the held offset is reported. FW_END with the whole image
//!   answers `Verified` (size) or `DigestMismatch` (0, image discarded); with part of it,
//!   `Receiving` and the held offset. A chunk past the declared size is `Failed` (discarded).
//! - **Reboots.** The device is silent for [`DeviceConfig::reboot_duration_ms`] and ignores
//!   what it receives. With [`DeviceConfig::persist_unacked`] its unacked frames, buffered
//!   samples and sequence counter survive (a non-volatile buffer): after the next TIME the
//!   unacked frames are resent with their old sequence numbers and bytes. Without it they are
//!   lost and counted, and sequence numbers restart at 0.
//! - **Receiving.** A partial frame followed by [`DeviceConfig::rx_idle_reset_ms`] of silence is
//!   discarded (counted by the decoder as an error), so a link cut mid-frame does not swallow
//!   the first frame after it.
//!
//! Every frame counts in [`DeviceStats::frames_sent`] when the device transmits it; the line
//! faults ([`FaultConfig`]) then decide what reaches the wire.
//!
//! # Pseudo-terminals
//!
//! `tokio_serial::SerialStream::pair()` (tokio-serial 5.5 on Linux) returns `(master, slave)`:
//! the master is the `/dev/ptmx` side and has no name; the slave is already opened from its path
//! (`/dev/pts/N`, set to raw mode, without `TIOCEXCL`), which `SerialPort::name()` returns. The
//! device runs on the master. Reading the master while no descriptor of the slave is open fails
//! with `EIO`, so [`spawn_devices`] keeps the slave open in [`SpawnedDevice::gateway_end`]: use
//! that stream in-process, or leave it alone (never read it) and open [`SpawnedDevice::path`] as
//! a real port; both see the same line. While nobody reads the slave, the device's writes fill
//! the pty buffer and the runner discards what it cannot write (as a UART transmits into the
//! void); up to about 4 KiB of old frames may then wait in the pty for the next reader.

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use fieldgate_shared::generate::{default_metrics, FleetConfig, MetricShape, Rng, SensorFleet};
use fieldgate_shared::{DeviceId, MetricName, NameError, Quality, Reading, Value};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::protocol::{
    encode_frame, DecoderStats, DeviceReading, DeviceValue, FirmwareState, FrameDecoder, List,
    Message, NackReason, ProtocolError, MAX_DECIMAL_SCALE, MAX_WIRE_LEN,
};

/// RESULT status: the command ran.
pub const STATUS_OK: u8 = 0;
/// RESULT status: the device does not know the command.
pub const STATUS_UNKNOWN_COMMAND: u8 = 1;
/// RESULT status: the arguments are invalid; the data says why, in ASCII.
pub const STATUS_BAD_ARGUMENTS: u8 = 2;

/// A span of simulation time, `from_ms` included, `until_ms` excluded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeWindow {
    pub from_ms: u64,
    pub until_ms: u64,
}

impl TimeWindow {
    pub fn contains(&self, now_ms: u64) -> bool {
        self.from_ms <= now_ms && now_ms < self.until_ms
    }
}

/// When a fault strikes: with `probability` per opportunity (per frame, bit, or metric and
/// sample, as each fault says), and, if `during` is not empty, only inside those windows. A
/// schedule is `probability: 1.0` with windows; the default never fires.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Trigger {
    pub probability: f64,
    pub during: Vec<TimeWindow>,
}

impl Trigger {
    pub fn never() -> Self {
        Self::default()
    }

    /// Fires with `probability` at any time.
    pub fn with_probability(probability: f64) -> Self {
        Self {
            probability,
            during: Vec::new(),
        }
    }

    /// Fires every time inside `windows`, never outside.
    pub fn scheduled(windows: Vec<TimeWindow>) -> Self {
        Self {
            probability: 1.0,
            during: windows,
        }
    }

    /// The probability at simulation time `now_ms`.
    pub fn probability_at(&self, now_ms: u64) -> f64 {
        if self.during.is_empty() || self.during.iter().any(|w| w.contains(now_ms)) {
            self.probability.clamp(0.0, 1.0)
        } else {
            0.0
        }
    }

    fn fires(&self, now_ms: u64, rng: &mut Rng) -> bool {
        let probability = self.probability_at(now_ms);
        probability > 0.0 && rng.chance(probability)
    }
}

/// Faults the simulated device injects. Line faults act on every outgoing frame (READINGS,
/// HELLO, RESULT, FW_STATUS, ACK alike), sensor faults on the values sampled.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultConfig {
    /// Per outgoing frame: a burst of 1 to `garbage_max_len` random bytes and a 0x00 before it.
    pub garbage: Trigger,
    pub garbage_max_len: usize,
    /// Per outgoing frame: the frame is not written at all.
    pub drop_frames: Trigger,
    /// Per outgoing bit (delimiters included): the bit flips. `probability` is the bit error rate.
    pub bit_errors: Trigger,
    /// Per metric and sample: the metric gets stuck and repeats its last value for
    /// `stuck_min_samples..=stuck_max_samples` samples, this one included.
    pub stuck: Trigger,
    pub stuck_min_samples: u32,
    pub stuck_max_samples: u32,
    /// Per analog or counter metric and sample: the value jumps by ±`spike_magnitude` (counters
    /// up only) for that one sample.
    pub spikes: Trigger,
    pub spike_magnitude: f64,
    /// A fixed error of the device clock, in milliseconds.
    pub clock_skew_ms: i64,
    /// How fast the device clock drifts from the time of the last TIME, in parts per million.
    pub clock_drift_ppm: f64,
    /// Simulation times at which the device reboots.
    pub reboot_at_ms: Vec<u64>,
    /// Windows in which the line is cut both ways: nothing is written, everything received is
    /// ignored.
    pub link_down: Vec<TimeWindow>,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            garbage: Trigger::never(),
            garbage_max_len: 32,
            drop_frames: Trigger::never(),
            bit_errors: Trigger::never(),
            stuck: Trigger::never(),
            stuck_min_samples: 5,
            stuck_max_samples: 60,
            spikes: Trigger::never(),
            spike_magnitude: 1_000.0,
            clock_skew_ms: 0,
            clock_drift_ppm: 0.0,
            reboot_at_ms: Vec::new(),
            link_down: Vec::new(),
        }
    }
}

/// What a simulated device is and how it behaves. Every field has a default; in a TOML or JSON
/// file an unknown key is an error. `metrics` is not read from files: it is always the
/// generator's [`default_metrics`] unless set in code.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceConfig {
    pub device_id: String,
    pub model: String,
    pub firmware: String,
    /// Seed of the sensor values and of the faults.
    pub seed: u64,
    /// Name and shape of each metric; a reading's channel is the metric's index here.
    #[serde(skip, default = "default_metrics")]
    pub metrics: Vec<(&'static str, MetricShape)>,
    pub sample_interval_ms: u64,
    /// Whole samples per READINGS frame; a frame waits until it has this many.
    pub samples_per_frame: usize,
    /// READINGS frames waiting for an ACK at most.
    pub max_in_flight: usize,
    /// Readings waiting for a frame at most; beyond it the oldest samples are dropped.
    pub buffer_readings: usize,
    pub retransmit_initial_ms: u64,
    pub retransmit_max_ms: u64,
    /// Silence from the gateway, while READINGS wait for an ACK, after which the link counts as
    /// lost and the device says HELLO again.
    pub link_timeout_ms: u64,
    /// A partial frame is discarded after this much silence.
    pub rx_idle_reset_ms: u64,
    /// The Unix time (ms) the device's clock shows at simulation time 0, before any TIME.
    pub rtc_start_ms: i64,
    /// Largest firmware image the simulated flash holds.
    pub flash_size: usize,
    /// Whether unacked frames and buffered samples survive a reboot.
    pub persist_unacked: bool,
    pub reboot_duration_ms: u64,
    /// Whether to keep every ACKed reading for [`SimulatedDevice::acked_readings`]; turn it off
    /// for long runs.
    pub keep_acked_readings: bool,
    pub faults: FaultConfig,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            device_id: "dev-0000".to_owned(),
            model: "FG-SIM-1".to_owned(),
            firmware: "1.0.0".to_owned(),
            seed: 1,
            metrics: default_metrics(),
            sample_interval_ms: 1_000,
            samples_per_frame: 1,
            max_in_flight: 8,
            buffer_readings: 10_000,
            retransmit_initial_ms: 1_000,
            retransmit_max_ms: 8_000,
            link_timeout_ms: 30_000,
            rx_idle_reset_ms: 500,
            // 2026-01-01T00:00:00Z, as the generator's default start.
            rtc_start_ms: 1_767_225_600_000,
            flash_size: 1 << 20,
            persist_unacked: false,
            reboot_duration_ms: 1_000,
            keep_acked_readings: true,
            faults: FaultConfig::default(),
        }
    }
}

impl DeviceConfig {
    /// The default device number `index` of a fleet: `dev-0000`, `dev-0001`, … with seeds 1, 2, …
    pub fn for_index(index: usize) -> Self {
        Self {
            device_id: format!("dev-{index:04}"),
            seed: index as u64 + 1,
            ..Self::default()
        }
    }
}

/// Why a [`DeviceConfig`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum SimConfigError {
    #[error("device_id {device_id:?}: {source}")]
    DeviceId {
        device_id: String,
        source: NameError,
    },
    #[error("metric {name:?}: {source}")]
    MetricName { name: String, source: NameError },
    #[error("metrics: {count} given; a HELLO names 1 to 255")]
    MetricCount { count: usize },
    #[error("metric {name:?} has {decimals} decimals; a decimal value carries at most 15")]
    TooManyDecimals { name: String, decimals: u32 },
    #[error("the HELLO does not fit a frame ({source}); shorten device_id, model, firmware or metric names")]
    HelloTooLarge { source: ProtocolError },
    #[error("one sample of {count} metrics does not fit a READINGS frame; use fewer metrics")]
    SampleTooLarge { count: usize },
    #[error("{key} must be at least {min}, got {value}")]
    TooSmall {
        key: &'static str,
        min: u64,
        value: u64,
    },
}

/// Counters of a simulated device. At any time `readings_produced = readings_acked +
/// readings_rejected + readings_overflowed + readings_lost_in_reboot +`
/// [`SimulatedDevice::pending_readings`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Frames of any type transmitted, resends included, before line faults.
    pub frames_sent: u64,
    /// READINGS frames transmitted again.
    pub frames_resent: u64,
    /// READINGS frames ACKed.
    pub frames_acked: u64,
    /// NACKs received, of any reason.
    pub frames_nacked: u64,
    /// READINGS frames given up after NACK `Invalid` or `Unsupported`.
    pub frames_dropped: u64,
    pub readings_produced: u64,
    pub readings_acked: u64,
    /// Readings in frames given up after a NACK.
    pub readings_rejected: u64,
    /// Readings dropped from the full buffer.
    pub readings_overflowed: u64,
    /// Readings lost in a reboot without `persist_unacked`.
    pub readings_lost_in_reboot: u64,
    pub hellos_sent: u64,
    pub time_syncs: u64,
    pub commands: u64,
    pub reboots: u64,
    /// Times the device decided the link was lost (silence or NACK `HelloFirst`).
    pub link_losses: u64,
    /// Valid frames received.
    pub frames_received: u64,
    /// Frames received of a type a gateway does not send.
    pub frames_unexpected: u64,
    /// ACKs for a sequence number not waiting for one (late or repeated).
    pub acks_unexpected: u64,
    /// Bytes ignored while rebooting or while the link is down.
    pub bytes_ignored: u64,
    pub firmware_chunks_appended: u64,
    /// Chunks not at the held offset (repeats, gaps).
    pub firmware_chunks_refused: u64,
    pub fault_garbage_bursts: u64,
    pub fault_frames_dropped: u64,
    pub fault_bits_flipped: u64,
    /// Frames not written because the link was down.
    pub fault_link_down_frames: u64,
    pub fault_stuck_readings: u64,
    pub fault_spikes: u64,
    /// Bytes the runner could not write (nobody reading the line) and discarded.
    pub line_bytes_discarded: u64,
}

/// A summary of a device's state, published by the runner while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSnapshot {
    pub stats: DeviceStats,
    pub decoder: DecoderStats,
    pub now_ms: u64,
    /// TIME received since the last HELLO.
    pub link_up: bool,
    pub rebooting: bool,
    pub frames_in_flight: usize,
    pub pending_readings: usize,
    pub firmware_state: FirmwareState,
    pub firmware_held: usize,
}

/// One sample: every metric's value at one device time.
#[derive(Clone, Debug)]
struct Sample {
    ts_ms: i64,
    values: Vec<DeviceValue<'static>>,
}

/// A READINGS frame waiting for its ACK.
struct InFlight {
    seq: u16,
    wire: Vec<u8>,
    samples: Vec<Sample>,
    next_send_at: u64,
    timeout_ms: u64,
}

impl InFlight {
    fn n_readings(&self) -> usize {
        self.samples.iter().map(|s| s.values.len()).sum()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    /// HELLO sent (or due at `next_hello_at`); no READINGS until TIME.
    AwaitingTime {
        next_hello_at: u64,
        hello_timeout_ms: u64,
    },
    Established,
}

#[derive(Clone, Copy, Debug, Default)]
struct MetricFaultState {
    stuck_left: u32,
    last: Option<DeviceValue<'static>>,
}

/// The simulated flash with the firmware image being received or received.
struct FirmwareSlot {
    state: FirmwareState,
    sha256: [u8; 32],
    size: u32,
    image: Vec<u8>,
}

impl FirmwareSlot {
    fn status(&self) -> (FirmwareState, u32) {
        let offset = match self.state {
            FirmwareState::Receiving => self.image.len() as u32,
            FirmwareState::Verified => self.size,
            FirmwareState::Idle | FirmwareState::DigestMismatch | FirmwareState::Failed => 0,
        };
        (self.state, offset)
    }

    fn discard(&mut self, state: FirmwareState) {
        self.state = state;
        self.image = Vec::new();
        self.size = 0;
        self.sha256 = [0; 32];
    }
}

/// The RESULT of the last command, resent if the same COMMAND arrives again.
struct CachedResult {
    command_seq: u16,
    name: String,
    args: Vec<u8>,
    wire: Vec<u8>,
}

/// A received frame, copied out of the decoder's buffer.
enum Inbound {
    Ack {
        seq: u16,
    },
    Nack {
        seq: u16,
        reason: NackReason,
    },
    Time {
        seq: u16,
        unix_ms: i64,
    },
    Command {
        seq: u16,
        name: String,
        args: Vec<u8>,
    },
    FirmwareBegin {
        size: u32,
        sha256: [u8; 32],
    },
    FirmwareChunk {
        offset: u32,
        data: Vec<u8>,
    },
    FirmwareEnd,
    Unexpected,
}

impl Inbound {
    fn from_frame(seq: u16, message: &Message<'_>) -> Self {
        match *message {
            Message::Ack { seq } => Inbound::Ack { seq },
            Message::Nack { seq, reason } => Inbound::Nack { seq, reason },
            Message::Time { unix_ms } => Inbound::Time { seq, unix_ms },
            Message::Command { name, args } => Inbound::Command {
                seq,
                name: name.to_owned(),
                args: args.to_vec(),
            },
            Message::FirmwareBegin { size, sha256, .. } => Inbound::FirmwareBegin { size, sha256 },
            Message::FirmwareChunk { offset, data } => Inbound::FirmwareChunk {
                offset,
                data: data.to_vec(),
            },
            Message::FirmwareEnd => Inbound::FirmwareEnd,
            Message::Hello { .. }
            | Message::Readings { .. }
            | Message::Result { .. }
            | Message::FirmwareStatus { .. } => Inbound::Unexpected,
        }
    }
}

/// The device side of the serial protocol as a sans-IO state machine. See the module docs for
/// its behaviour; drive it with [`receive`](Self::receive) and [`poll`](Self::poll), or with
/// [`drive_device`].
pub struct SimulatedDevice {
    config: DeviceConfig,
    device_id: DeviceId,
    metric_names: Vec<MetricName>,
    /// Per channel: the decimals of an analog metric.
    decimals: Vec<Option<u8>>,
    is_flag: Vec<bool>,
    fleet: SensorFleet,
    fault_rng: Rng,
    decoder: FrameDecoder,
    now_ms: u64,
    last_byte_at: u64,
    /// Since when the gateway has been silent while READINGS wait for an ACK.
    silent_since: u64,
    rebooting_until: Option<u64>,
    next_reboot: usize,
    reboot_schedule: Vec<u64>,
    link: Link,
    /// The sequence number of the last HELLO, whose ACK is expected.
    last_hello_seq: Option<u16>,
    next_seq: u16,
    clock_offset_ms: i64,
    clock_synced_at: u64,
    sample_interval_ms: u64,
    next_sample_at: u64,
    buffer: VecDeque<Sample>,
    buffered_readings: usize,
    in_flight: VecDeque<InFlight>,
    metric_faults: Vec<MetricFaultState>,
    firmware: FirmwareSlot,
    last_command: Option<CachedResult>,
    acked: Vec<Reading>,
    stats: DeviceStats,
    outbox: Vec<u8>,
}

impl std::fmt::Debug for SimulatedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedDevice")
            .field("device_id", &self.device_id)
            .field("now_ms", &self.now_ms)
            .field("link", &self.link)
            .field("frames_in_flight", &self.in_flight.len())
            .field("buffered_readings", &self.buffered_readings)
            .field("firmware_state", &self.firmware.state)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn encode(seq: u16, message: &Message<'_>) -> Result<Vec<u8>, ProtocolError> {
    let mut wire = [0u8; MAX_WIRE_LEN];
    let n = encode_frame(seq, message, &mut wire)?;
    Ok(wire[..n].to_vec())
}

fn at_least(key: &'static str, value: u64, min: u64) -> Result<(), SimConfigError> {
    if value < min {
        return Err(SimConfigError::TooSmall { key, min, value });
    }
    Ok(())
}

/// The data-model value of a device value, as the gateway converts it: a decimal divides back
/// to exactly the f64 that parsing its decimal text gives.
fn model_value(value: &DeviceValue<'_>) -> Value {
    match *value {
        DeviceValue::Decimal { mantissa, scale } => {
            Value::F64(mantissa as f64 / 10f64.powi(scale as i32))
        }
        DeviceValue::F64(v) => Value::F64(v),
        DeviceValue::F32(v) => Value::F64(v as f64),
        DeviceValue::Int(v) => Value::I64(v),
        DeviceValue::Bool(v) => Value::Bool(v),
        // The device never sends text.
        DeviceValue::Str(_) => Value::Bool(false),
    }
}

/// Number of bits until the next error at bit error rate `rate` (geometric distribution).
fn bits_to_next_error(rng: &mut Rng, rate: f64) -> u64 {
    if rate >= 1.0 {
        return 0;
    }
    let u = rng.unit();
    ((1.0 - u).ln() / (1.0 - rate).ln())
        .floor()
        .min(u64::MAX as f64 / 2.0) as u64
}

impl SimulatedDevice {
    /// Builds a device from `config`, at simulation time 0. Nothing is sent until the first
    /// [`poll`](Self::poll), which says HELLO.
    pub fn new(config: DeviceConfig) -> Result<Self, SimConfigError> {
        let device_id =
            DeviceId::new(&config.device_id).map_err(|source| SimConfigError::DeviceId {
                device_id: config.device_id.clone(),
                source,
            })?;
        let n_metrics = config.metrics.len();
        if n_metrics == 0 || n_metrics > 255 {
            return Err(SimConfigError::MetricCount { count: n_metrics });
        }
        let mut metric_names = Vec::with_capacity(n_metrics);
        let mut decimals = Vec::with_capacity(n_metrics);
        let mut is_flag = Vec::with_capacity(n_metrics);
        for (name, shape) in &config.metrics {
            metric_names.push(MetricName::new(name).map_err(|source| {
                SimConfigError::MetricName {
                    name: (*name).to_owned(),
                    source,
                }
            })?);
            decimals.push(match *shape {
                MetricShape::Analog { decimals, .. } => {
                    if decimals > MAX_DECIMAL_SCALE as u32 {
                        return Err(SimConfigError::TooManyDecimals {
                            name: (*name).to_owned(),
                            decimals,
                        });
                    }
                    Some(decimals as u8)
                }
                _ => None,
            });
            is_flag.push(matches!(shape, MetricShape::Flag { .. }));
        }
        at_least("sample_interval_ms", config.sample_interval_ms, 1)?;
        at_least("samples_per_frame", config.samples_per_frame as u64, 1)?;
        at_least("max_in_flight", config.max_in_flight as u64, 1)?;
        at_least(
            "buffer_readings",
            config.buffer_readings as u64,
            n_metrics as u64,
        )?;
        at_least("retransmit_initial_ms", config.retransmit_initial_ms, 1)?;
        at_least(
            "retransmit_max_ms",
            config.retransmit_max_ms,
            config.retransmit_initial_ms,
        )?;
        at_least("link_timeout_ms", config.link_timeout_ms, 1)?;
        let names: Vec<&str> = config.metrics.iter().map(|(name, _)| *name).collect();
        encode(
            0,
            &Message::Hello {
                device_id: &config.device_id,
                model: &config.model,
                firmware: &config.firmware,
                metrics: List::Items(&names),
            },
        )
        .map_err(|source| SimConfigError::HelloTooLarge { source })?;
        // The largest encoding of one sample: every value a 10-byte varint.
        let worst: Vec<DeviceReading<'_>> = (0..n_metrics)
            .map(|channel| DeviceReading {
                channel: channel as u8,
                offset_ms: 0,
                value: DeviceValue::Int(i64::MIN),
            })
            .collect();
        encode(
            0,
            &Message::Readings {
                base_ts_ms: i64::MIN,
                readings: List::Items(&worst),
            },
        )
        .map_err(|_| SimConfigError::SampleTooLarge { count: n_metrics })?;

        let fleet = SensorFleet::new(FleetConfig {
            seed: config.seed,
            devices: 1,
            metrics: config.metrics.clone(),
            start_ms: 0,
            interval_ms: config.sample_interval_ms as i64,
            jitter_ms: 0,
            gap_probability: 0.0,
        });
        let mut reboot_schedule = config.faults.reboot_at_ms.clone();
        reboot_schedule.sort_unstable();
        Ok(Self {
            device_id,
            metric_names,
            decimals,
            is_flag,
            fleet,
            fault_rng: Rng::new(config.seed ^ 0x5eed_fa17_0000_0000),
            decoder: FrameDecoder::new(),
            now_ms: 0,
            last_byte_at: 0,
            silent_since: 0,
            rebooting_until: None,
            next_reboot: 0,
            reboot_schedule,
            link: Link::AwaitingTime {
                next_hello_at: 0,
                hello_timeout_ms: config.retransmit_initial_ms,
            },
            last_hello_seq: None,
            next_seq: 0,
            clock_offset_ms: config.rtc_start_ms,
            clock_synced_at: 0,
            sample_interval_ms: config.sample_interval_ms,
            next_sample_at: config.sample_interval_ms,
            buffer: VecDeque::new(),
            buffered_readings: 0,
            in_flight: VecDeque::new(),
            metric_faults: vec![MetricFaultState::default(); n_metrics],
            firmware: FirmwareSlot {
                state: FirmwareState::Idle,
                sha256: [0; 32],
                size: 0,
                image: Vec::new(),
            },
            last_command: None,
            acked: Vec::new(),
            stats: DeviceStats::default(),
            outbox: Vec::new(),
            config,
        })
    }

    /// Handles bytes received at `now_ms`, then does whatever is due (as [`poll`](Self::poll));
    /// returns the bytes to write.
    pub fn receive(&mut self, now_ms: u64, bytes: &[u8]) -> Vec<u8> {
        let now = self.advance(now_ms);
        self.step(now);
        let mut rest = bytes;
        if !rest.is_empty() && !self.link_is_down(now) {
            if now.saturating_sub(self.last_byte_at) >= self.config.rx_idle_reset_ms {
                // A frame cut off by a lost link: drop it rather than glue it to the next one.
                let _ = self.decoder.push(0);
            }
            self.last_byte_at = now;
        }
        while !rest.is_empty() {
            if self.rebooting_until.is_some() || self.link_is_down(now) {
                self.stats.bytes_ignored += rest.len() as u64;
                break;
            }
            let (used, completed) = self.decoder.feed(rest);
            let inbound = match completed {
                Some(Ok(frame)) => Some(Inbound::from_frame(frame.seq, &frame.message)),
                _ => None,
            };
            rest = &rest[used..];
            if let Some(inbound) = inbound {
                self.stats.frames_received += 1;
                self.silent_since = now;
                self.handle(now, inbound);
            }
        }
        self.step(now);
        std::mem::take(&mut self.outbox)
    }

    /// Does whatever is due at `now_ms` (samples, READINGS, resends, HELLO retries, reboots);
    /// returns the bytes to write.
    pub fn poll(&mut self, now_ms: u64) -> Vec<u8> {
        let now = self.advance(now_ms);
        self.step(now);
        std::mem::take(&mut self.outbox)
    }

    /// When [`poll`](Self::poll) next has work, in simulation milliseconds; never `None` today
    /// (samples go on), but a runner should not rely on that.
    pub fn next_wakeup(&self) -> Option<u64> {
        let mut next = self.reboot_schedule.get(self.next_reboot).copied();
        let mut consider = |t: u64| next = Some(next.map_or(t, |n: u64| n.min(t)));
        if let Some(until) = self.rebooting_until {
            consider(until);
            return next;
        }
        consider(self.next_sample_at);
        match self.link {
            Link::AwaitingTime { next_hello_at, .. } => consider(next_hello_at),
            Link::Established => {
                for frame in &self.in_flight {
                    consider(frame.next_send_at);
                }
                if !self.in_flight.is_empty() {
                    consider(self.silent_since + self.config.link_timeout_ms);
                }
            }
        }
        next
    }

    /// Reboots now, as the `reboot` command or [`FaultConfig::reboot_at_ms`] do.
    pub fn reboot(&mut self, now_ms: u64) -> Vec<u8> {
        let now = self.advance(now_ms);
        self.step(now);
        self.start_reboot(now);
        self.step(now);
        std::mem::take(&mut self.outbox)
    }

    /// Records that the runner discarded `n_bytes` it could not write.
    pub fn note_line_discarded(&mut self, n_bytes: usize) {
        self.stats.line_bytes_discarded += n_bytes as u64;
    }

    pub fn device_id(&self) -> &DeviceId {
        &self.device_id
    }

    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    pub fn stats(&self) -> DeviceStats {
        self.stats
    }

    /// What the device's frame decoder has seen (frames and errors).
    pub fn decoder_stats(&self) -> DecoderStats {
        self.decoder.stats()
    }

    /// The latest simulation time the device has seen.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// The device's clock (Unix ms) at simulation time `now_ms`, faults included.
    pub fn device_time_ms(&self, now_ms: u64) -> i64 {
        let since_sync = now_ms.saturating_sub(self.clock_synced_at) as f64;
        let drift = (since_sync * self.config.faults.clock_drift_ppm / 1e6) as i64;
        now_ms as i64 + self.clock_offset_ms + self.config.faults.clock_skew_ms + drift
    }

    /// Whether TIME arrived since the last HELLO (READINGS flow).
    pub fn link_up(&self) -> bool {
        self.link == Link::Established && self.rebooting_until.is_none()
    }

    pub fn is_rebooting(&self) -> bool {
        self.rebooting_until.is_some()
    }

    /// The current sample interval (changed by `set-interval`).
    pub fn sample_interval_ms(&self) -> u64 {
        self.sample_interval_ms
    }

    pub fn frames_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The sequence numbers of the READINGS frames waiting for an ACK, oldest first.
    pub fn in_flight_seqs(&self) -> Vec<u16> {
        self.in_flight.iter().map(|f| f.seq).collect()
    }

    /// Readings produced and neither ACKed nor given up: in flight or buffered.
    pub fn pending_readings(&self) -> usize {
        self.buffered_readings
            + self
                .in_flight
                .iter()
                .map(InFlight::n_readings)
                .sum::<usize>()
    }

    /// Every reading the gateway ACKed, in ACK order, as the gateway should have stored it
    /// (quality `Good`). Empty when [`DeviceConfig::keep_acked_readings`] is off.
    pub fn acked_readings(&self) -> &[Reading] {
        &self.acked
    }

    pub fn firmware_state(&self) -> FirmwareState {
        self.firmware.state
    }

    /// The firmware bytes held in the simulated flash: the whole image once `Verified`, the
    /// received prefix while `Receiving`, nothing otherwise.
    pub fn firmware_image(&self) -> &[u8] {
        &self.firmware.image
    }

    /// The digest of the image being received or verified.
    pub fn firmware_sha256(&self) -> Option<[u8; 32]> {
        matches!(
            self.firmware.state,
            FirmwareState::Receiving | FirmwareState::Verified
        )
        .then_some(self.firmware.sha256)
    }

    pub fn snapshot(&self) -> DeviceSnapshot {
        DeviceSnapshot {
            stats: self.stats,
            decoder: self.decoder.stats(),
            now_ms: self.now_ms,
            link_up: self.link_up(),
            rebooting: self.is_rebooting(),
            frames_in_flight: self.in_flight.len(),
            pending_readings: self.pending_readings(),
            firmware_state: self.firmware.state,
            firmware_held: self.firmware.image.len(),
        }
    }

    fn advance(&mut self, now_ms: u64) -> u64 {
        self.now_ms = self.now_ms.max(now_ms);
        self.now_ms
    }

    fn link_is_down(&self, now: u64) -> bool {
        self.config.faults.link_down.iter().any(|w| w.contains(now))
    }

    /// Everything time-driven up to `now`, in order.
    fn step(&mut self, now: u64) {
        while let Some(&at) = self.reboot_schedule.get(self.next_reboot) {
            if at > now {
                break;
            }
            self.next_reboot += 1;
            self.start_reboot(at);
        }
        if let Some(until) = self.rebooting_until {
            if now < until {
                return;
            }
            self.finish_reboot(until);
        }
        if self.link == Link::Established
            && !self.in_flight.is_empty()
            && now >= self.silent_since + self.config.link_timeout_ms
        {
            tracing::debug!(device = %self.device_id, "gateway silent: link lost, saying HELLO");
            self.stats.link_losses += 1;
            self.await_time(now);
        }
        if let Link::AwaitingTime {
            next_hello_at,
            hello_timeout_ms,
        } = self.link
        {
            if now >= next_hello_at {
                self.send_hello(now);
                self.link = Link::AwaitingTime {
                    next_hello_at: now + hello_timeout_ms,
                    hello_timeout_ms: (hello_timeout_ms * 2).min(self.config.retransmit_max_ms),
                };
            }
        }
        self.take_due_samples(now);
        if self.link == Link::Established {
            self.resend_due(now);
            self.fill_window(now);
        }
    }

    fn await_time(&mut self, now: u64) {
        self.link = Link::AwaitingTime {
            next_hello_at: now,
            hello_timeout_ms: self.config.retransmit_initial_ms,
        };
    }

    fn start_reboot(&mut self, at: u64) {
        tracing::debug!(device = %self.device_id, persist = self.config.persist_unacked, "rebooting");
        self.stats.reboots += 1;
        if !self.config.persist_unacked {
            self.stats.readings_lost_in_reboot += self.pending_readings() as u64;
            self.in_flight.clear();
            self.buffer.clear();
            self.buffered_readings = 0;
            self.next_seq = 0;
        }
        // The receive buffer is RAM: a partial frame is gone.
        let _ = self.decoder.push(0);
        self.last_command = None;
        for metric in &mut self.metric_faults {
            metric.stuck_left = 0;
        }
        self.rebooting_until = Some(at + self.config.reboot_duration_ms);
    }

    fn finish_reboot(&mut self, at: u64) {
        self.rebooting_until = None;
        self.next_sample_at = at + self.sample_interval_ms;
        self.silent_since = at;
        self.await_time(at);
    }

    fn next_seq(&mut self) -> u16 {
        loop {
            let seq = self.next_seq;
            self.next_seq = self.next_seq.wrapping_add(1);
            // Never reuse the number of a frame still waiting for its ACK.
            if !self.in_flight.iter().any(|f| f.seq == seq) {
                return seq;
            }
        }
    }

    fn send_hello(&mut self, now: u64) {
        let seq = self.next_seq();
        let names: Vec<&str> = self.config.metrics.iter().map(|(name, _)| *name).collect();
        let wire = encode(
            seq,
            &Message::Hello {
                device_id: &self.config.device_id,
                model: &self.config.model,
                firmware: &self.config.firmware,
                metrics: List::Items(&names),
            },
        )
        .expect("the HELLO was checked to fit when the device was built");
        self.stats.hellos_sent += 1;
        self.last_hello_seq = Some(seq);
        self.transmit(now, &wire);
    }

    fn send(&mut self, now: u64, message: &Message<'_>) {
        let seq = self.next_seq();
        let wire = encode(seq, message).expect("fixed-size messages fit a frame");
        self.transmit(now, &wire);
    }

    /// Puts a frame on the line through the line faults.
    fn transmit(&mut self, now: u64, wire: &[u8]) {
        self.stats.frames_sent += 1;
        if self.link_is_down(now) {
            self.stats.fault_link_down_frames += 1;
            return;
        }
        let faults = &self.config.faults;
        if faults.drop_frames.fires(now, &mut self.fault_rng) {
            self.stats.fault_frames_dropped += 1;
            return;
        }
        if faults.garbage.fires(now, &mut self.fault_rng) {
            let len = 1 + (self.fault_rng.next_u64() % faults.garbage_max_len.max(1) as u64);
            for _ in 0..len {
                self.outbox.push(self.fault_rng.next_u64() as u8);
            }
            self.outbox.push(0);
            self.stats.fault_garbage_bursts += 1;
        }
        let start = self.outbox.len();
        self.outbox.extend_from_slice(wire);
        let rate = faults.bit_errors.probability_at(now);
        if rate > 0.0 {
            let n_bits = (wire.len() * 8) as u64;
            let mut bit = bits_to_next_error(&mut self.fault_rng, rate);
            while bit < n_bits {
                self.outbox[start + (bit / 8) as usize] ^= 1 << (bit % 8);
                self.stats.fault_bits_flipped += 1;
                bit += 1 + bits_to_next_error(&mut self.fault_rng, rate);
            }
        }
    }

    fn take_due_samples(&mut self, now: u64) {
        if now < self.next_sample_at {
            return;
        }
        // A device frozen for longer than its buffer holds skips the samples it cannot keep.
        let max_catch_up = (self.config.buffer_readings / self.metric_names.len()) as u64 + 1;
        let behind = (now - self.next_sample_at) / self.sample_interval_ms;
        if behind > max_catch_up {
            self.next_sample_at += (behind - max_catch_up) * self.sample_interval_ms;
        }
        while now >= self.next_sample_at {
            let at = self.next_sample_at;
            self.take_sample(at);
            self.next_sample_at += self.sample_interval_ms;
        }
    }

    fn take_sample(&mut self, at: u64) {
        let ts_ms = self.device_time_ms(at);
        let n_metrics = self.metric_names.len();
        let mut values = Vec::with_capacity(n_metrics);
        for channel in 0..n_metrics {
            let reading = self
                .fleet
                .next()
                .expect("a fleet of one device with metrics never ends");
            let mut value = match (reading.value, self.decimals[channel]) {
                (Value::F64(v), Some(scale)) => DeviceValue::Decimal {
                    mantissa: (v * 10f64.powi(scale as i32)).round() as i64,
                    scale,
                },
                (Value::F64(v), None) => DeviceValue::F64(v),
                (Value::I64(v), _) => DeviceValue::Int(v),
                (Value::Bool(v), _) => DeviceValue::Bool(v),
                // The generator makes no text values.
                (Value::Str(_), _) => DeviceValue::Bool(false),
            };
            value = self.apply_sensor_faults(at, channel, value);
            values.push(value);
        }
        self.stats.readings_produced += n_metrics as u64;
        while self.buffered_readings + n_metrics > self.config.buffer_readings {
            let Some(oldest) = self.buffer.pop_front() else {
                break;
            };
            self.buffered_readings -= oldest.values.len();
            self.stats.readings_overflowed += oldest.values.len() as u64;
        }
        self.buffered_readings += n_metrics;
        self.buffer.push_back(Sample { ts_ms, values });
    }

    fn apply_sensor_faults(
        &mut self,
        at: u64,
        channel: usize,
        fresh: DeviceValue<'static>,
    ) -> DeviceValue<'static> {
        let faults = &self.config.faults;
        let state = &mut self.metric_faults[channel];
        if state.stuck_left == 0 && faults.stuck.fires(at, &mut self.fault_rng) {
            let min = faults.stuck_min_samples.max(1);
            let max = faults.stuck_max_samples.max(min);
            state.stuck_left = min + (self.fault_rng.next_u64() % (max - min + 1) as u64) as u32;
        }
        let value = if state.stuck_left > 0 && state.last.is_some() {
            state.stuck_left -= 1;
            self.stats.fault_stuck_readings += 1;
            state.last.unwrap_or(fresh)
        } else {
            state.stuck_left = state.stuck_left.saturating_sub(1);
            let mut value = fresh;
            if !self.is_flag[channel] && faults.spikes.fires(at, &mut self.fault_rng) {
                let up = self.fault_rng.chance(0.5);
                value = match value {
                    DeviceValue::Decimal { mantissa, scale } => {
                        let jump = (faults.spike_magnitude * 10f64.powi(scale as i32)).round();
                        let jump = if up { jump } else { -jump } as i64;
                        DeviceValue::Decimal {
                            mantissa: mantissa.saturating_add(jump),
                            scale,
                        }
                    }
                    DeviceValue::Int(v) => {
                        DeviceValue::Int(v.saturating_add(faults.spike_magnitude.round() as i64))
                    }
                    DeviceValue::F64(v) => DeviceValue::F64(if up {
                        v + faults.spike_magnitude
                    } else {
                        v - faults.spike_magnitude
                    }),
                    other => other,
                };
                self.stats.fault_spikes += 1;
            }
            value
        };
        state.last = Some(value);
        value
    }

    fn resend_due(&mut self, now: u64) {
        for i in 0..self.in_flight.len() {
            if now < self.in_flight[i].next_send_at {
                continue;
            }
            let frame = &mut self.in_flight[i];
            // 0 marks a frame whose backoff restarts (after a new TIME).
            frame.timeout_ms = if frame.timeout_ms == 0 {
                self.config.retransmit_initial_ms
            } else {
                (frame.timeout_ms * 2).min(self.config.retransmit_max_ms)
            };
            frame.next_send_at = now + frame.timeout_ms;
            let wire = frame.wire.clone();
            self.stats.frames_resent += 1;
            self.transmit(now, &wire);
        }
    }

    /// Sends new READINGS frames from the buffer while the window has room.
    fn fill_window(&mut self, now: u64) {
        while self.in_flight.len() < self.config.max_in_flight && !self.buffer.is_empty() {
            let seq = self.next_seq();
            let Some((n_samples, wire)) = self.build_frame(seq) else {
                // Not enough samples for a full frame yet: give the number back.
                self.next_seq = seq;
                return;
            };
            if self.in_flight.is_empty() {
                // Silence counts from the first frame that waits for an ACK.
                self.silent_since = now;
            }
            let samples: Vec<Sample> = self.buffer.drain(..n_samples).collect();
            self.buffered_readings -= samples.iter().map(|s| s.values.len()).sum::<usize>();
            self.transmit(now, &wire);
            self.in_flight.push_back(InFlight {
                seq,
                wire,
                samples,
                next_send_at: now + self.config.retransmit_initial_ms,
                timeout_ms: self.config.retransmit_initial_ms,
            });
        }
    }

    /// The largest READINGS frame from the front of the buffer (up to `samples_per_frame`
    /// samples), or `None` if it should wait for more samples.
    fn build_frame(&self, seq: u16) -> Option<(usize, Vec<u8>)> {
        let base_ts_ms = self.buffer.front()?.ts_ms;
        let mut readings: Vec<DeviceReading<'static>> = Vec::new();
        let mut best: Option<(usize, Vec<u8>)> = None;
        let mut limited = false;
        for (k, sample) in self
            .buffer
            .iter()
            .take(self.config.samples_per_frame)
            .enumerate()
        {
            let Some(offset_ms) = sample
                .ts_ms
                .checked_sub(base_ts_ms)
                .and_then(|offset| u32::try_from(offset).ok())
            else {
                // The clock went back (or far ahead): the sample starts the next frame.
                limited = true;
                break;
            };
            if readings.len() + sample.values.len() > 255 {
                limited = true;
                break;
            }
            readings.extend(sample.values.iter().enumerate().map(|(channel, &value)| {
                DeviceReading {
                    channel: channel as u8,
                    offset_ms,
                    value,
                }
            }));
            match encode(
                seq,
                &Message::Readings {
                    base_ts_ms,
                    readings: List::Items(&readings),
                },
            ) {
                Ok(wire) => best = Some((k + 1, wire)),
                Err(_) => {
                    limited = true;
                    break;
                }
            }
        }
        let (n_samples, wire) = best?;
        let full = n_samples == self.config.samples_per_frame;
        (full || limited).then_some((n_samples, wire))
    }

    fn handle(&mut self, now: u64, inbound: Inbound) {
        match inbound {
            Inbound::Ack { seq } => self.on_ack(seq),
            Inbound::Nack { seq, reason } => self.on_nack(now, seq, reason),
            Inbound::Time { seq, unix_ms } => self.on_time(now, seq, unix_ms),
            Inbound::Command { seq, name, args } => self.on_command(now, seq, name, args),
            Inbound::FirmwareBegin { size, sha256 } => self.on_firmware_begin(now, size, sha256),
            Inbound::FirmwareChunk { offset, data } => self.on_firmware_chunk(now, offset, &data),
            Inbound::FirmwareEnd => self.on_firmware_end(now),
            Inbound::Unexpected => self.stats.frames_unexpected += 1,
        }
    }

    fn on_ack(&mut self, seq: u16) {
        let Some(i) = self.in_flight.iter().position(|f| f.seq == seq) else {
            // The ACK of HELLO needs no action: TIME is what completes the handshake.
            if self.last_hello_seq != Some(seq) {
                self.stats.acks_unexpected += 1;
            }
            return;
        };
        let frame = self.in_flight.remove(i).expect("the index was just found");
        self.stats.frames_acked += 1;
        self.stats.readings_acked += frame.n_readings() as u64;
        if self.config.keep_acked_readings {
            for sample in &frame.samples {
                for (channel, value) in sample.values.iter().enumerate() {
                    self.acked.push(Reading {
                        device: self.device_id.clone(),
                        metric: self.metric_names[channel].clone(),
                        ts_ms: sample.ts_ms,
                        value: model_value(value),
                        quality: Quality::Good,
                    });
                }
            }
        }
    }

    fn on_nack(&mut self, now: u64, seq: u16, reason: NackReason) {
        self.stats.frames_nacked += 1;
        let position = self.in_flight.iter().position(|f| f.seq == seq);
        match reason {
            NackReason::Busy => {
                if let Some(i) = position {
                    let frame = &mut self.in_flight[i];
                    frame.next_send_at = now + frame.timeout_ms.max(1);
                }
            }
            NackReason::Invalid | NackReason::Unsupported => {
                if let Some(i) = position {
                    let frame = self.in_flight.remove(i).expect("the index was just found");
                    tracing::debug!(device = %self.device_id, seq, ?reason, "READINGS refused: dropped");
                    self.stats.frames_dropped += 1;
                    self.stats.readings_rejected += frame.n_readings() as u64;
                }
            }
            NackReason::HelloFirst => {
                // Several frames in flight bring several NACKs: one HELLO answers them all.
                if self.link == Link::Established {
                    self.stats.link_losses += 1;
                    self.await_time(now);
                }
            }
        }
    }

    fn on_time(&mut self, now: u64, seq: u16, unix_ms: i64) {
        self.clock_offset_ms = unix_ms - now as i64;
        self.clock_synced_at = now;
        self.stats.time_syncs += 1;
        self.send(now, &Message::Ack { seq });
        if self.link != Link::Established {
            self.link = Link::Established;
            // A new session: everything unacked goes again, on a fresh schedule.
            for frame in &mut self.in_flight {
                frame.next_send_at = now;
                frame.timeout_ms = 0;
            }
        }
    }

    fn on_command(&mut self, now: u64, seq: u16, name: String, args: Vec<u8>) {
        if let Some(cached) = &self.last_command {
            if cached.command_seq == seq && cached.name == name && cached.args == args {
                let wire = cached.wire.clone();
                self.transmit(now, &wire);
                return;
            }
        }
        self.stats.commands += 1;
        let mut reboot = false;
        let (status, data): (u8, Vec<u8>) = match name.as_str() {
            "ping" => (STATUS_OK, args.clone()),
            "reboot" => {
                reboot = true;
                (STATUS_OK, Vec::new())
            }
            "set-interval" => match std::str::from_utf8(&args)
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .filter(|ms| (1..=86_400_000).contains(ms))
            {
                Some(ms) => {
                    self.sample_interval_ms = ms;
                    self.next_sample_at = now + ms;
                    (STATUS_OK, ms.to_string().into_bytes())
                }
                None => (
                    STATUS_BAD_ARGUMENTS,
                    b"set-interval takes milliseconds from 1 to 86400000 as ASCII digits".to_vec(),
                ),
            },
            "status" => (
                STATUS_OK,
                format!(
                    "uptime_ms={} link_up={} in_flight={} pending={} produced={} acked={} firmware={:?}/{}",
                    now,
                    self.link_up(),
                    self.in_flight.len(),
                    self.pending_readings(),
                    self.stats.readings_produced,
                    self.stats.readings_acked,
                    self.firmware.state,
                    self.firmware.image.len(),
                )
                .into_bytes(),
            ),
            _ => (STATUS_UNKNOWN_COMMAND, Vec::new()),
        };
        let result_seq = self.next_seq();
        let wire = encode(
            result_seq,
            &Message::Result {
                command_seq: seq,
                status,
                data: &data,
            },
        )
        .or_else(|_| {
            encode(
                result_seq,
                &Message::Result {
                    command_seq: seq,
                    status: STATUS_BAD_ARGUMENTS,
                    data: b"result too large",
                },
            )
        })
        .expect("a short RESULT fits a frame");
        self.transmit(now, &wire);
        self.last_command = Some(CachedResult {
            command_seq: seq,
            name,
            args,
            wire,
        });
        if reboot {
            self.start_reboot(now);
        }
    }

    fn send_firmware_status(&mut self, now: u64) {
        let (state, offset) = self.firmware.status();
        self.send(now, &Message::FirmwareStatus { state, offset });
    }

    fn on_firmware_begin(&mut self, now: u64, size: u32, sha256: [u8; 32]) {
        let slot = &mut self.firmware;
        if size as usize > self.config.flash_size {
            slot.discard(FirmwareState::Failed);
        } else if slot.sha256 == sha256
            && slot.size == size
            && matches!(
                slot.state,
                FirmwareState::Receiving | FirmwareState::Verified
            )
        {
            // The same image again: resume from what the flash holds.
            slot.state = FirmwareState::Receiving;
        } else {
            slot.state = FirmwareState::Receiving;
            slot.sha256 = sha256;
            slot.size = size;
            slot.image = Vec::with_capacity(size as usize);
        }
        self.send_firmware_status(now);
    }

    fn on_firmware_chunk(&mut self, now: u64, offset: u32, data: &[u8]) {
        let slot = &mut self.firmware;
        if slot.state == FirmwareState::Receiving {
            let held = slot.image.len();
            if offset as usize != held {
                self.stats.firmware_chunks_refused += 1;
            } else if held + data.len() > slot.size as usize {
                slot.discard(FirmwareState::Failed);
            } else {
                slot.image.extend_from_slice(data);
                self.stats.firmware_chunks_appended += 1;
            }
        }
        self.send_firmware_status(now);
    }

    fn on_firmware_end(&mut self, now: u64) {
        let slot = &mut self.firmware;
        if slot.state == FirmwareState::Receiving && slot.image.len() == slot.size as usize {
            let digest: [u8; 32] = Sha256::digest(&slot.image).into();
            if digest == slot.sha256 {
                slot.state = FirmwareState::Verified;
            } else {
                slot.discard(FirmwareState::DigestMismatch);
            }
        }
        self.send_firmware_status(now);
    }
}

/// How a run of [`drive_device`] ended.
#[derive(Debug)]
pub enum RunEnd {
    /// The shutdown future resolved.
    Shutdown,
    /// The port reached end of file (the other end of a pipe was dropped).
    PortClosed,
    /// Reading or writing the port failed (`EIO` on a pty master whose slave is closed).
    PortError(std::io::Error),
}

/// A device and how its run ended.
#[derive(Debug)]
pub struct DeviceRun {
    pub device: SimulatedDevice,
    pub end: RunEnd,
}

/// Output that could not be written is discarded beyond this (nobody is reading the line).
const MAX_UNWRITTEN: usize = 64 * 1024;

/// Builds a device from `config` and runs it on `port` until `shutdown` resolves or the port
/// ends. The device's simulation time 0 is the call. Returns the device with its counters,
/// firmware and ACKed readings.
pub async fn run_device<P, S>(
    config: DeviceConfig,
    port: P,
    shutdown: S,
) -> Result<DeviceRun, SimConfigError>
where
    P: AsyncRead + AsyncWrite + Unpin,
    S: Future<Output = ()>,
{
    let mut device = SimulatedDevice::new(config)?;
    let end = drive_device(&mut device, port, shutdown, Instant::now(), None).await;
    Ok(DeviceRun { device, end })
}

/// Runs `device` on `port` until `shutdown` resolves or the port ends, with simulation time
/// measured from `epoch` (keep the same epoch when driving the same device again on a new port,
/// so its clock and schedules go on). Publishes a [`DeviceSnapshot`] to `snapshots`, if given,
/// whenever it changes. Uses tokio's clock, so `tokio::time::pause()` works in tests.
pub async fn drive_device<P, S>(
    device: &mut SimulatedDevice,
    port: P,
    shutdown: S,
    epoch: Instant,
    snapshots: Option<&watch::Sender<DeviceSnapshot>>,
) -> RunEnd
where
    P: AsyncRead + AsyncWrite + Unpin,
    S: Future<Output = ()>,
{
    let (mut reader, mut writer) = tokio::io::split(port);
    let now_ms = || epoch.elapsed().as_millis() as u64;
    tokio::pin!(shutdown);
    let mut unwritten = device.poll(now_ms());
    let mut read_buf = vec![0u8; 4096];
    let end = loop {
        if let Some(snapshots) = snapshots {
            let snapshot = device.snapshot();
            snapshots.send_if_modified(|old| {
                let changed = *old != snapshot;
                *old = snapshot;
                changed
            });
        }
        let wakeup = device
            .next_wakeup()
            .map(|at| epoch + Duration::from_millis(at));
        tokio::select! {
            biased;
            _ = &mut shutdown => break RunEnd::Shutdown,
            written = writer.write(&unwritten), if !unwritten.is_empty() => match written {
                Ok(0) => break RunEnd::PortClosed,
                Ok(n) => {
                    unwritten.drain(..n);
                }
                Err(err) => break RunEnd::PortError(err),
            },
            read = reader.read(&mut read_buf) => match read {
                Ok(0) => break RunEnd::PortClosed,
                Ok(n) => unwritten.extend(device.receive(now_ms(), &read_buf[..n])),
                Err(err) => break RunEnd::PortError(err),
            },
            _ = tokio::time::sleep_until(wakeup.unwrap_or_else(Instant::now)), if wakeup.is_some() => {
                unwritten.extend(device.poll(now_ms()));
            }
        }
        if unwritten.len() > MAX_UNWRITTEN {
            device.note_line_discarded(unwritten.len());
            unwritten.clear();
        }
    };
    if !unwritten.is_empty() && matches!(end, RunEnd::Shutdown) {
        // Best effort: what the device said before shutdown may still reach a reader.
        let _ =
            tokio::time::timeout(Duration::from_millis(100), writer.write_all(&unwritten)).await;
    }
    let _ = writer.flush().await;
    if let Some(snapshots) = snapshots {
        snapshots.send_replace(device.snapshot());
    }
    end
}

/// Why [`spawn_devices`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("simulated device {index}: {source}")]
    Config {
        index: usize,
        source: SimConfigError,
    },
    #[error("simulated device {index}: cannot create a pseudo-terminal pair: {source}")]
    Pty {
        index: usize,
        source: tokio_serial::Error,
    },
    #[error("simulated device {index}: the pseudo-terminal's slave has no path")]
    NoPath { index: usize },
}

/// One device of [`spawn_devices`], running on the master side of its pty pair.
pub struct SpawnedDevice {
    pub device_id: DeviceId,
    /// The slave side's path (`/dev/pts/N`): what a gateway opens as its serial port.
    pub path: PathBuf,
    /// The slave side, already open. Use it in-process as the gateway's port (take it), or keep
    /// it here unread while the gateway opens [`path`](Self::path): holding it open keeps the
    /// device's side from failing with `EIO` while the gateway has the port closed. Dropping
    /// it while no one else has the path open makes the device wait (it retries every 100 ms).
    pub gateway_end: Option<tokio_serial::SerialStream>,
    /// The device's state, updated as it runs.
    pub snapshots: watch::Receiver<DeviceSnapshot>,
    task: JoinHandle<SimulatedDevice>,
}

impl std::fmt::Debug for SpawnedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpawnedDevice")
            .field("device_id", &self.device_id)
            .field("path", &self.path)
            .field("gateway_end", &self.gateway_end.is_some())
            .finish_non_exhaustive()
    }
}

/// Simulated devices on pseudo-terminals; [`shutdown`](Self::shutdown) stops them.
#[derive(Debug)]
pub struct SerialFleet {
    pub devices: Vec<SpawnedDevice>,
    shutdown: watch::Sender<bool>,
}

impl SerialFleet {
    /// Stops every device and returns them (counters, firmware, ACKed readings), in order.
    pub async fn shutdown(self) -> Vec<SimulatedDevice> {
        self.shutdown.send_replace(true);
        let mut devices = Vec::with_capacity(self.devices.len());
        for spawned in self.devices {
            match spawned.task.await {
                Ok(device) => devices.push(device),
                Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                Err(err) => panic!("a simulated device task was cancelled: {err}"),
            }
        }
        devices
    }
}

/// `EIO`: what reading a pty master returns while no descriptor of its slave is open.
const EIO: i32 = 5;

/// Spawns `n` simulated devices, device `i` built from `config_for(i)` (for example
/// [`DeviceConfig::for_index`]), each on the master side of its own pseudo-terminal pair. Must
/// be called inside a tokio runtime. See the module docs for how to use the slave sides.
pub fn spawn_devices(
    n: usize,
    mut config_for: impl FnMut(usize) -> DeviceConfig,
) -> Result<SerialFleet, SpawnError> {
    use tokio_serial::SerialPort;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut devices = Vec::with_capacity(n);
    for index in 0..n {
        let mut device = SimulatedDevice::new(config_for(index))
            .map_err(|source| SpawnError::Config { index, source })?;
        let (mut master, slave) = tokio_serial::SerialStream::pair()
            .map_err(|source| SpawnError::Pty { index, source })?;
        let path = slave
            .name()
            .map(PathBuf::from)
            .ok_or(SpawnError::NoPath { index })?;
        let (snapshot_tx, snapshot_rx) = watch::channel(device.snapshot());
        let mut shutdown_rx = shutdown_rx.clone();
        let device_id = device.device_id().clone();
        let task = tokio::spawn(async move {
            let epoch = Instant::now();
            loop {
                let shutdown = async {
                    let _ = shutdown_rx.wait_for(|&stop| stop).await;
                };
                let end = drive_device(
                    &mut device,
                    &mut master,
                    shutdown,
                    epoch,
                    Some(&snapshot_tx),
                )
                .await;
                match end {
                    RunEnd::PortError(err) if err.raw_os_error() == Some(EIO) => {
                        // No one has the slave open: wait for a gateway.
                        tokio::select! {
                            _ = shutdown_rx.wait_for(|&stop| stop) => break,
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                    RunEnd::PortError(err) => {
                        tracing::warn!(device = %device.device_id(), error = %err, "simulated device's pty failed");
                        break;
                    }
                    RunEnd::Shutdown | RunEnd::PortClosed => break,
                }
            }
            device
        });
        devices.push(SpawnedDevice {
            device_id,
            path,
            gateway_end: Some(slave),
            snapshots: snapshot_rx,
            task,
        });
    }
    Ok(SerialFleet {
        devices,
        shutdown: shutdown_tx,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;
    use crate::protocol::Frame;

    /// The Unix time a scripted gateway's clock shows at simulation time 0.
    const UNIX_AT_ZERO: i64 = 1_800_000_000_000;

    fn metric_names() -> Vec<String> {
        default_metrics()
            .iter()
            .map(|(name, _)| (*name).to_owned())
            .collect()
    }

    fn to_static(value: DeviceValue<'_>) -> DeviceValue<'static> {
        match value {
            DeviceValue::F32(v) => DeviceValue::F32(v),
            DeviceValue::F64(v) => DeviceValue::F64(v),
            DeviceValue::Int(v) => DeviceValue::Int(v),
            DeviceValue::Bool(v) => DeviceValue::Bool(v),
            DeviceValue::Decimal { mantissa, scale } => DeviceValue::Decimal { mantissa, scale },
            DeviceValue::Str(text) => panic!("the device sent text {text:?}"),
        }
    }

    /// A frame the device sent, copied out of the decoder.
    #[derive(Clone, Debug, PartialEq)]
    enum Got {
        Hello {
            seq: u16,
            device_id: String,
            metrics: Vec<String>,
        },
        Readings {
            seq: u16,
            base_ts_ms: i64,
            readings: Vec<DeviceReading<'static>>,
        },
        Ack {
            seq: u16,
        },
        Result {
            command_seq: u16,
            status: u8,
            data: Vec<u8>,
        },
        FirmwareStatus {
            state: FirmwareState,
            offset: u32,
        },
        Other,
    }

    impl Got {
        fn from_frame(frame: &Frame<'_>) -> Self {
            match frame.message {
                Message::Hello {
                    device_id, metrics, ..
                } => Got::Hello {
                    seq: frame.seq,
                    device_id: device_id.to_owned(),
                    metrics: metrics.iter().map(str::to_owned).collect(),
                },
                Message::Readings {
                    base_ts_ms,
                    readings,
                } => Got::Readings {
                    seq: frame.seq,
                    base_ts_ms,
                    readings: readings
                        .iter()
                        .map(|r| DeviceReading {
                            channel: r.channel,
                            offset_ms: r.offset_ms,
                            value: to_static(r.value),
                        })
                        .collect(),
                },
                Message::Ack { seq } => Got::Ack { seq },
                Message::Result {
                    command_seq,
                    status,
                    data,
                } => Got::Result {
                    command_seq,
                    status,
                    data: data.to_vec(),
                },
                Message::FirmwareStatus { state, offset } => Got::FirmwareStatus { state, offset },
                _ => Got::Other,
            }
        }

        fn readings_seq(&self) -> Option<u16> {
            match self {
                Got::Readings { seq, .. } => Some(*seq),
                _ => None,
            }
        }
    }

    /// The gateway's half, scripted by each test, built from the protocol core.
    struct Gateway {
        decoder: FrameDecoder,
        seq: u16,
    }

    impl Gateway {
        fn new() -> Self {
            Self {
                decoder: FrameDecoder::new(),
                seq: 0,
            }
        }

        /// Decodes what the device wrote: each frame with its wire bytes (a clean line puts
        /// exactly one 0x00, the delimiter, at the end of each frame).
        fn read(&mut self, bytes: &[u8]) -> Vec<(Got, Vec<u8>)> {
            let mut frames = Vec::new();
            let mut start = 0;
            for (i, &byte) in bytes.iter().enumerate() {
                if let Some(Ok(frame)) = self.decoder.push(byte) {
                    frames.push((Got::from_frame(&frame), bytes[start..=i].to_vec()));
                }
                if byte == 0 {
                    start = i + 1;
                }
            }
            frames
        }

        fn got(&mut self, bytes: &[u8]) -> Vec<Got> {
            self.read(bytes).into_iter().map(|(got, _)| got).collect()
        }

        /// Wire bytes of `message` with the gateway's next sequence number.
        fn frame(&mut self, message: &Message<'_>) -> Vec<u8> {
            let seq = self.seq;
            self.seq = self.seq.wrapping_add(1);
            encode(seq, message).unwrap()
        }

        fn frames(&mut self, messages: &[Message<'_>]) -> Vec<u8> {
            messages.iter().flat_map(|m| self.frame(m)).collect()
        }
    }

    /// A device, a scripted gateway that answers HELLO with ACK and TIME and (when `ack` is
    /// set) stores and ACKs every new READINGS frame, and a record of everything.
    struct Harness {
        device: SimulatedDevice,
        gateway: Gateway,
        now: u64,
        ack: bool,
        /// READINGS sequence numbers stored: a resend whose ACK was lost is ACKed, not stored.
        stored_seqs: HashSet<u16>,
        stored: Vec<Reading>,
        /// Every frame the gateway decoded, with the time and its bytes.
        log: Vec<(u64, Got, Vec<u8>)>,
    }

    impl Harness {
        fn new(config: DeviceConfig) -> Self {
            Self {
                device: SimulatedDevice::new(config).unwrap(),
                gateway: Gateway::new(),
                now: 0,
                ack: true,
                stored_seqs: HashSet::new(),
                stored: Vec::new(),
                log: Vec::new(),
            }
        }

        /// Polls at `now`, then answers and feeds the answers back.
        fn poll_at(&mut self, now: u64) {
            self.now = now;
            let out = self.device.poll(now);
            self.process(&out);
        }

        fn run_until(&mut self, until: u64, step: u64) {
            while self.now + step <= until {
                self.poll_at(self.now + step);
            }
        }

        fn send(&mut self, bytes: &[u8]) {
            let out = self.device.receive(self.now, bytes);
            self.process(&out);
        }

        fn process(&mut self, out: &[u8]) {
            let mut reply = Vec::new();
            for (got, wire) in self.gateway.read(out) {
                match &got {
                    Got::Hello { seq, .. } => {
                        reply.extend(self.gateway.frame(&Message::Ack { seq: *seq }));
                        reply.extend(self.gateway.frame(&Message::Time {
                            unix_ms: UNIX_AT_ZERO + self.now as i64,
                        }));
                    }
                    Got::Readings {
                        seq,
                        base_ts_ms,
                        readings,
                    } if self.ack => {
                        if self.stored_seqs.insert(*seq) {
                            for r in readings {
                                self.stored.push(Reading {
                                    device: self.device.device_id().clone(),
                                    metric: MetricName::new(&metric_names()[r.channel as usize])
                                        .unwrap(),
                                    ts_ms: base_ts_ms + r.offset_ms as i64,
                                    value: model_value(&r.value),
                                    quality: Quality::Good,
                                });
                            }
                        }
                        reply.extend(self.gateway.frame(&Message::Ack { seq: *seq }));
                    }
                    _ => {}
                }
                self.log.push((self.now, got, wire));
            }
            if !reply.is_empty() {
                let out = self.device.receive(self.now, &reply);
                self.process(&out);
            }
        }

        fn readings_frames(&self) -> Vec<(u64, u16, Vec<u8>)> {
            self.log
                .iter()
                .filter_map(|(at, got, wire)| {
                    got.readings_seq().map(|seq| (*at, seq, wire.clone()))
                })
                .collect()
        }
    }

    fn assert_conservation(device: &SimulatedDevice) {
        let stats = device.stats();
        assert_eq!(
            stats.readings_produced,
            stats.readings_acked
                + stats.readings_rejected
                + stats.readings_overflowed
                + stats.readings_lost_in_reboot
                + device.pending_readings() as u64,
            "{stats:?}"
        );
    }

    fn sorted(readings: &[Reading]) -> Vec<Reading> {
        let mut readings = readings.to_vec();
        readings.sort_by(|a, b| (a.ts_ms, a.metric.as_str()).cmp(&(b.ts_ms, b.metric.as_str())));
        readings
    }

    fn quiet() -> DeviceConfig {
        DeviceConfig {
            link_timeout_ms: 1 << 40,
            ..DeviceConfig::default()
        }
    }

    #[test]
    fn hello_then_time_sets_the_clock_and_readings_follow() {
        let mut device = SimulatedDevice::new(DeviceConfig::default()).unwrap();
        let mut gateway = Gateway::new();
        let hello = gateway.got(&device.poll(0));
        let [Got::Hello {
            seq: hello_seq,
            device_id,
            metrics,
        }] = &hello[..]
        else {
            panic!("expected HELLO, got {hello:?}");
        };
        assert_eq!(device_id, "dev-0000");
        assert_eq!(metrics, &metric_names());

        // Without TIME the device samples but sends no READINGS, only HELLO again.
        let waiting = gateway.got(&device.poll(3_500));
        assert!(
            waiting.iter().all(|g| matches!(g, Got::Hello { .. })) && !waiting.is_empty(),
            "{waiting:?}"
        );
        assert!(!device.link_up());
        assert_eq!(device.pending_readings(), 3 * 6);

        let answer = gateway.frames(&[
            Message::Ack { seq: *hello_seq },
            Message::Time {
                unix_ms: UNIX_AT_ZERO,
            },
        ]);
        let time_seq = gateway.seq - 1;
        let got = gateway.got(&device.receive(4_000, &answer));
        assert_eq!(got[0], Got::Ack { seq: time_seq });
        assert!(device.link_up());
        assert_eq!(device.device_time_ms(4_000), UNIX_AT_ZERO);
        // The samples taken before TIME go now, stamped by the unset clock.
        let early: Vec<i64> = got
            .iter()
            .filter_map(|g| match g {
                Got::Readings { base_ts_ms, .. } => Some(*base_ts_ms),
                _ => None,
            })
            .collect();
        let rtc = DeviceConfig::default().rtc_start_ms;
        assert_eq!(
            early,
            vec![rtc + 1_000, rtc + 2_000, rtc + 3_000, rtc + 4_000]
        );

        let acks: Vec<Message<'_>> = got
            .iter()
            .filter_map(|g| g.readings_seq().map(|seq| Message::Ack { seq }))
            .collect();
        let acks = gateway.frames(&acks);
        let _ = device.receive(4_000, &acks);
        assert_eq!(device.frames_in_flight(), 0);

        let got = gateway.got(&device.poll(5_000));
        let [Got::Readings {
            base_ts_ms,
            readings,
            ..
        }] = &got[..]
        else {
            panic!("expected READINGS, got {got:?}");
        };
        assert_eq!(*base_ts_ms, UNIX_AT_ZERO + 1_000);
        assert_eq!(readings.len(), 6);
        for (channel, reading) in readings.iter().enumerate() {
            assert_eq!(reading.channel as usize, channel);
            assert_eq!(reading.offset_ms, 0);
            match channel {
                0..=3 => assert!(
                    matches!(reading.value, DeviceValue::Decimal { scale: 2, .. }),
                    "{reading:?}"
                ),
                4 => assert!(matches!(reading.value, DeviceValue::Int(_))),
                _ => assert!(matches!(reading.value, DeviceValue::Bool(_))),
            }
        }
        let DeviceValue::Decimal { mantissa, .. } = readings[0].value else {
            unreachable!()
        };
        assert!((1_500..2_800).contains(&mantissa), "temperature {mantissa}");
    }

    #[test]
    fn readings_are_resent_until_acked_and_never_after() {
        let mut h = Harness::new(quiet());
        h.ack = false;
        h.poll_at(0);
        assert!(h.device.link_up());
        h.poll_at(1_000);
        let first = h.readings_frames();
        assert_eq!(first.len(), 1);
        let (_, seq, wire) = first[0].clone();

        // Every other frame is ACKed as it comes; the first one is not, until 40 s.
        let mut t = 1_000;
        while t < 40_000 {
            t += 100;
            h.poll_at(t);
            for (at, other, _) in h.readings_frames() {
                if other != seq && at == t {
                    let ack = h.gateway.frame(&Message::Ack { seq: other });
                    h.send(&ack);
                }
            }
        }
        let sent_at: Vec<u64> = h
            .readings_frames()
            .into_iter()
            .filter(|(_, s, _)| *s == seq)
            .map(|(at, _, bytes)| {
                assert_eq!(bytes, wire, "a resend differs from the first transmission");
                at
            })
            .collect();
        // Timeout 1 s, doubling to 8 s.
        assert_eq!(
            sent_at,
            vec![1_000, 2_000, 4_000, 8_000, 16_000, 24_000, 32_000, 40_000]
        );
        assert_eq!(h.device.in_flight_seqs(), vec![seq]);

        let ack = h.gateway.frame(&Message::Ack { seq });
        h.send(&ack);
        h.ack = true;
        let log_len = h.log.len();
        h.run_until(120_000, 100);
        assert!(h.log[log_len..]
            .iter()
            .all(|(_, got, _)| got.readings_seq() != Some(seq)));
        assert_eq!(h.device.stats().frames_resent, 7);
        assert_eq!(h.device.frames_in_flight(), 0);
        assert_conservation(&h.device);
        assert_eq!(h.device.stats().readings_acked, 120 * 6);
        assert_eq!(h.device.acked_readings().len(), 120 * 6);
    }

    #[test]
    fn the_window_bounds_frames_in_flight_and_a_full_buffer_drops_the_oldest() {
        let mut h = Harness::new(DeviceConfig {
            max_in_flight: 2,
            buffer_readings: 60,
            ..quiet()
        });
        h.ack = false;
        h.run_until(100_000, 250);
        let seqs: HashSet<u16> = h.readings_frames().iter().map(|(_, s, _)| *s).collect();
        assert_eq!(seqs.len(), 2);
        let stats = h.device.stats();
        assert_eq!(stats.readings_produced, 100 * 6);
        assert_eq!(h.device.pending_readings(), 2 * 6 + 60);
        assert_eq!(stats.readings_overflowed, 600 - 72);
        assert_conservation(&h.device);

        // Once ACKs flow, the buffer drains: the newest samples survived.
        h.ack = true;
        for seq in seqs {
            let ack = h.gateway.frame(&Message::Ack { seq });
            h.send(&ack);
        }
        h.run_until(101_000, 250);
        assert_eq!(h.device.pending_readings(), 0);
        let newest = h.device.acked_readings().iter().map(|r| r.ts_ms).max();
        assert_eq!(newest, Some(UNIX_AT_ZERO + 101_000));
        assert_conservation(&h.device);
    }

    fn reboot_scenario(persist_unacked: bool) -> (Harness, Vec<(u64, u16, Vec<u8>)>) {
        let mut h = Harness::new(DeviceConfig {
            persist_unacked,
            faults: FaultConfig {
                reboot_at_ms: vec![5_500],
                ..FaultConfig::default()
            },
            ..quiet()
        });
        h.ack = false;
        h.run_until(5_000, 500);
        let mut seen = HashSet::new();
        let unacked: Vec<_> = h
            .readings_frames()
            .into_iter()
            .filter(|(_, seq, _)| seen.insert(*seq))
            .collect();
        assert_eq!(unacked.len(), 5);
        h.ack = true;
        h.poll_at(5_500);
        assert!(h.device.is_rebooting());
        assert_eq!(h.device.stats().reboots, 1);
        // Silent while rebooting; deaf too.
        h.poll_at(6_000);
        let ack = h.gateway.frame(&Message::Ack { seq: unacked[0].1 });
        h.send(&ack);
        assert_eq!(h.device.stats().bytes_ignored, ack.len() as u64);
        assert!(h.log.iter().all(|(at, _, _)| *at < 5_500));
        h.poll_at(6_500);
        assert!(
            matches!(
                h.log.iter().find(|(at, _, _)| *at == 6_500),
                Some((_, Got::Hello { .. }, _))
            ),
            "no HELLO after the reboot"
        );
        h.run_until(20_000, 500);
        (h, unacked)
    }

    #[test]
    fn a_reboot_without_persistence_loses_unacked_readings_and_says_hello() {
        let (h, unacked) = reboot_scenario(false);
        let stats = h.device.stats();
        assert_eq!(stats.readings_lost_in_reboot, 5 * 6);
        let after: Vec<_> = h
            .readings_frames()
            .into_iter()
            .filter(|(at, _, _)| *at >= 5_500)
            .collect();
        for (_, _, wire) in &unacked {
            assert!(
                after.iter().all(|(_, _, w)| w != wire),
                "a lost frame came back"
            );
        }
        // Sequence numbers restarted: HELLO is 0 again.
        let hello_seqs: Vec<u16> = h
            .log
            .iter()
            .filter_map(|(at, got, _)| match got {
                Got::Hello { seq, .. } if *at >= 5_500 => Some(*seq),
                _ => None,
            })
            .collect();
        assert_eq!(hello_seqs, vec![0]);
        // The first sample after the reboot is 1 s after it ended.
        assert_eq!(
            h.device.acked_readings().iter().map(|r| r.ts_ms).min(),
            Some(UNIX_AT_ZERO + 7_500)
        );
        assert_eq!(sorted(h.device.acked_readings()), sorted(&h.stored));
        assert_conservation(&h.device);
    }

    #[test]
    fn a_reboot_with_persistence_resends_unacked_readings_after_time() {
        let (h, unacked) = reboot_scenario(true);
        let stats = h.device.stats();
        assert_eq!(stats.readings_lost_in_reboot, 0);
        let after: Vec<_> = h
            .readings_frames()
            .into_iter()
            .filter(|(at, _, _)| *at >= 5_500)
            .collect();
        for (_, seq, wire) in &unacked {
            assert!(
                after.iter().any(|(_, s, w)| s == seq && w == wire),
                "frame {seq} was not resent as it was"
            );
        }
        // The sequence counter went on from where it was.
        let hello_seq = h.log.iter().find_map(|(at, got, _)| match got {
            Got::Hello { seq, .. } if *at >= 5_500 => Some(*seq),
            _ => None,
        });
        assert!(hello_seq > unacked.iter().map(|(_, s, _)| *s).max());
        assert_eq!(stats.readings_acked, stats.readings_produced);
        assert_eq!(sorted(h.device.acked_readings()), sorted(&h.stored));
        assert_conservation(&h.device);
    }

    #[test]
    fn nacks_busy_retry_invalid_drop_and_hello_first_restarts_the_handshake() {
        let mut h = Harness::new(quiet());
        h.ack = false;
        h.poll_at(0);
        h.poll_at(1_000);
        let (_, busy_seq, _) = h.readings_frames()[0].clone();
        let nack = h.gateway.frame(&Message::Nack {
            seq: busy_seq,
            reason: NackReason::Busy,
        });
        h.now = 1_500;
        h.send(&nack);
        // Retried a timeout after the NACK, not at the original 2 s.
        h.poll_at(2_000);
        h.poll_at(2_400);
        h.poll_at(2_500);
        let busy_sends: Vec<u64> = h
            .readings_frames()
            .iter()
            .filter(|(_, s, _)| *s == busy_seq)
            .map(|(at, _, _)| *at)
            .collect();
        assert_eq!(busy_sends, vec![1_000, 2_500]);

        let (_, invalid_seq, _) = h
            .readings_frames()
            .into_iter()
            .find(|(_, s, _)| *s != busy_seq)
            .unwrap();
        let nack = h.gateway.frame(&Message::Nack {
            seq: invalid_seq,
            reason: NackReason::Invalid,
        });
        h.send(&nack);
        assert_eq!(h.device.stats().frames_dropped, 1);
        assert_eq!(h.device.stats().readings_rejected, 6);
        assert!(!h.device.in_flight_seqs().contains(&invalid_seq));

        let hellos_before = h.device.stats().hellos_sent;
        let nack = h.gateway.frames(&[
            Message::Nack {
                seq: busy_seq,
                reason: NackReason::HelloFirst,
            },
            Message::Nack {
                seq: busy_seq,
                reason: NackReason::HelloFirst,
            },
        ]);
        h.ack = true;
        h.send(&nack);
        // One HELLO for both NACKs; the harness answered it, so the kept frame went again.
        assert_eq!(h.device.stats().hellos_sent, hellos_before + 1);
        assert!(h.device.link_up());
        assert!(!h.device.in_flight_seqs().contains(&busy_seq));
        h.run_until(30_000, 500);
        let sent_invalid = h
            .readings_frames()
            .iter()
            .filter(|(_, s, _)| *s == invalid_seq)
            .count();
        assert_eq!(sent_invalid, 1, "a frame refused as invalid was resent");
        assert_conservation(&h.device);
    }

    #[test]
    fn a_silent_gateway_means_a_lost_link_and_a_new_hello() {
        let mut h = Harness::new(DeviceConfig {
            link_timeout_ms: 10_000,
            ..DeviceConfig::default()
        });
        h.poll_at(0);
        h.ack = false;
        h.run_until(5_000, 1_000);
        let hellos = h.device.stats().hellos_sent;
        // Frames wait from 1 s: the link counts as lost at 11 s, and TIME restores it.
        h.run_until(10_000, 1_000);
        assert_eq!(h.device.stats().hellos_sent, hellos);
        h.poll_at(11_000);
        assert_eq!(h.device.stats().hellos_sent, hellos + 1);
        assert_eq!(h.device.stats().link_losses, 1);
        assert!(h.device.link_up());
    }

    fn command(h: &mut Harness, name: &str, args: &[u8]) -> (u16, Got) {
        let seq = h.gateway.seq;
        let frame = h.gateway.frame(&Message::Command { name, args });
        let out = h.device.receive(h.now, &frame);
        let result = h
            .gateway
            .got(&out)
            .into_iter()
            .find(|g| matches!(g, Got::Result { .. }))
            .expect("no RESULT");
        (seq, result)
    }

    #[test]
    fn commands_answer_results_and_a_repeated_command_is_not_run_twice() {
        let mut h = Harness::new(quiet());
        h.poll_at(0);
        let (seq, result) = command(&mut h, "ping", b"hello");
        assert_eq!(
            result,
            Got::Result {
                command_seq: seq,
                status: STATUS_OK,
                data: b"hello".to_vec()
            }
        );
        let (_, result) = command(&mut h, "self-destruct", b"");
        assert!(matches!(
            result,
            Got::Result {
                status: STATUS_UNKNOWN_COMMAND,
                ..
            }
        ));
        let (_, result) = command(&mut h, "set-interval", b"soon");
        assert!(matches!(
            result,
            Got::Result {
                status: STATUS_BAD_ARGUMENTS,
                ..
            }
        ));
        let (_, result) = command(&mut h, "set-interval", b"250");
        assert!(matches!(
            result,
            Got::Result {
                status: STATUS_OK,
                ..
            }
        ));
        assert_eq!(h.device.sample_interval_ms(), 250);
        h.run_until(1_000, 50);
        assert_eq!(h.device.stats().readings_produced, 4 * 6);
        let (_, result) = command(&mut h, "status", b"");
        let Got::Result { data, .. } = result else {
            unreachable!()
        };
        assert!(String::from_utf8(data).unwrap().contains("produced=24"));

        // The same COMMAND frame again (its RESULT was lost): the same RESULT, not a second run.
        let commands = h.device.stats().commands;
        let frame = h.gateway.frame(&Message::Command {
            name: "ping",
            args: b"once",
        });
        let first = h.device.receive(h.now, &frame);
        let again = h.device.receive(h.now, &frame);
        assert_eq!(first, again);
        assert_eq!(h.device.stats().commands, commands + 1);

        let (seq, result) = command(&mut h, "reboot", b"");
        assert_eq!(
            result,
            Got::Result {
                command_seq: seq,
                status: STATUS_OK,
                data: Vec::new()
            }
        );
        assert!(h.device.is_rebooting());
        let rebooted_at = h.now;
        h.run_until(rebooted_at + 1_000, 50);
        assert!(!h.device.is_rebooting());
        let hello_at = h.log.iter().rev().find_map(|(at, got, _)| match got {
            Got::Hello { .. } => Some(*at),
            _ => None,
        });
        assert_eq!(hello_at, Some(rebooted_at + 1_000));
        assert!(h.device.link_up());
        assert_eq!(h.device.stats().reboots, 1);
    }

    fn firmware_status(gateway: &mut Gateway, out: &[u8]) -> (FirmwareState, u32) {
        gateway
            .got(out)
            .into_iter()
            .find_map(|g| match g {
                Got::FirmwareStatus { state, offset } => Some((state, offset)),
                _ => None,
            })
            .expect("no FW_STATUS")
    }

    /// Sends FW_BEGIN, then chunks from where the device stands. With `cut_at`, stops once the
    /// device holds that many bytes, after writing the first half of the next chunk's frame (a
    /// link lost mid-frame). Returns what the device answered last and how many bytes it held
    /// when it answered FW_BEGIN.
    fn transfer(
        device: &mut SimulatedDevice,
        gateway: &mut Gateway,
        now: &mut u64,
        image: &[u8],
        sha256: [u8; 32],
        cut_at: Option<usize>,
    ) -> ((FirmwareState, u32), u32) {
        const CHUNK: usize = 256;
        let begin = gateway.frame(&Message::FirmwareBegin {
            size: image.len() as u32,
            sha256,
            chunk_size: CHUNK as u16,
        });
        let (state, resumed_at) = firmware_status(gateway, &device.receive(*now, &begin));
        if state != FirmwareState::Receiving {
            return ((state, resumed_at), resumed_at);
        }
        let mut held = resumed_at as usize;
        while held < image.len() {
            *now += 2;
            let end = (held + CHUNK).min(image.len());
            let chunk = gateway.frame(&Message::FirmwareChunk {
                offset: held as u32,
                data: &image[held..end],
            });
            if cut_at.is_some_and(|cut| held >= cut) {
                let _ = device.receive(*now, &chunk[..chunk.len() / 2]);
                return ((FirmwareState::Receiving, held as u32), resumed_at);
            }
            let (state, offset) = firmware_status(gateway, &device.receive(*now, &chunk));
            assert_eq!(state, FirmwareState::Receiving);
            held = offset as usize;
        }
        let end = gateway.frame(&Message::FirmwareEnd);
        (
            firmware_status(gateway, &device.receive(*now, &end)),
            resumed_at,
        )
    }

    fn test_image(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = Rng::new(seed);
        (0..len).map(|_| rng.next_u64() as u8).collect()
    }

    #[test]
    fn an_interrupted_firmware_transfer_resumes_and_ends_verified() {
        let image = test_image(100 * 1024, 7);
        let sha256: [u8; 32] = Sha256::digest(&image).into();
        let mut device = SimulatedDevice::new(DeviceConfig::default()).unwrap();
        let mut gateway = Gateway::new();
        let mut now = 0;

        let (status, resumed_at) = transfer(
            &mut device,
            &mut gateway,
            &mut now,
            &image,
            sha256,
            Some(30_000),
        );
        assert_eq!(resumed_at, 0);
        let first_cut = status.1;
        assert_eq!(device.firmware_image().len(), first_cut as usize);
        // The link is gone for a minute; the device keeps sampling and saying HELLO.
        now += 60_000;
        let _ = device.poll(now);

        let (status, resumed_at) = transfer(
            &mut device,
            &mut gateway,
            &mut now,
            &image,
            sha256,
            Some(70_000),
        );
        assert_eq!(resumed_at, first_cut);
        let second_cut = status.1;
        now += 60_000;
        let _ = device.poll(now);

        let (status, resumed_at) =
            transfer(&mut device, &mut gateway, &mut now, &image, sha256, None);
        assert_eq!(resumed_at, second_cut);
        assert_eq!(status, (FirmwareState::Verified, image.len() as u32));
        assert_eq!(device.firmware_state(), FirmwareState::Verified);
        assert_eq!(device.firmware_image(), &image[..]);
        assert_eq!(device.firmware_sha256(), Some(sha256));
        // Every chunk was appended exactly once; the two cut frames were discarded as errors.
        assert_eq!(device.stats().firmware_chunks_appended, 400);
        assert_eq!(device.decoder_stats().errors(), 2);

        // FW_END again, or FW_BEGIN of the same image, finds it whole.
        let end = gateway.frame(&Message::FirmwareEnd);
        assert_eq!(
            firmware_status(&mut gateway, &device.receive(now, &end)),
            (FirmwareState::Verified, image.len() as u32)
        );
    }

    #[test]
    fn firmware_chunks_at_the_wrong_offset_are_refused_and_oversized_images_fail() {
        let mut device = SimulatedDevice::new(DeviceConfig {
            flash_size: 4_096,
            ..DeviceConfig::default()
        })
        .unwrap();
        let mut gateway = Gateway::new();
        let image = test_image(1_000, 1);
        let begin = gateway.frame(&Message::FirmwareBegin {
            size: 1_000,
            sha256: Sha256::digest(&image).into(),
            chunk_size: 256,
        });
        let out = device.receive(0, &begin);
        assert_eq!(
            firmware_status(&mut gateway, &out),
            (FirmwareState::Receiving, 0)
        );
        let check = |device: &mut SimulatedDevice,
                     gateway: &mut Gateway,
                     offset: u32,
                     data: &[u8],
                     expected: (FirmwareState, u32)| {
            let chunk = gateway.frame(&Message::FirmwareChunk { offset, data });
            let out = device.receive(0, &chunk);
            assert_eq!(firmware_status(gateway, &out), expected);
        };
        check(
            &mut device,
            &mut gateway,
            0,
            &image[..256],
            (FirmwareState::Receiving, 256),
        );
        // A repeat and a gap: both refused, the held offset reported.
        check(
            &mut device,
            &mut gateway,
            0,
            &image[..256],
            (FirmwareState::Receiving, 256),
        );
        check(
            &mut device,
            &mut gateway,
            512,
            &image[512..768],
            (FirmwareState::Receiving, 256),
        );
        assert_eq!(device.stats().firmware_chunks_refused, 2);
        // FW_END before the end: still receiving.
        let end = gateway.frame(&Message::FirmwareEnd);
        let out = device.receive(0, &end);
        assert_eq!(
            firmware_status(&mut gateway, &out),
            (FirmwareState::Receiving, 256)
        );
        // Past the declared size: failed.
        check(
            &mut device,
            &mut gateway,
            256,
            &[0; 500],
            (FirmwareState::Receiving, 756),
        );
        check(
            &mut device,
            &mut gateway,
            756,
            &[0; 300],
            (FirmwareState::Failed, 0),
        );
        assert!(device.firmware_image().is_empty());

        let begin = gateway.frame(&Message::FirmwareBegin {
            size: 4_097,
            sha256: [1; 32],
            chunk_size: 256,
        });
        let out = device.receive(0, &begin);
        assert_eq!(
            firmware_status(&mut gateway, &out),
            (FirmwareState::Failed, 0)
        );
    }

    #[test]
    fn a_corrupted_image_ends_in_digest_mismatch_and_is_discarded() {
        let image = test_image(100 * 1024, 3);
        let sha256: [u8; 32] = Sha256::digest(&image).into();
        let mut corrupted = image.clone();
        corrupted[50_000] ^= 0x10;
        let mut device = SimulatedDevice::new(DeviceConfig::default()).unwrap();
        let mut gateway = Gateway::new();
        let mut now = 0;
        let (status, _) = transfer(
            &mut device,
            &mut gateway,
            &mut now,
            &corrupted,
            sha256,
            None,
        );
        assert_eq!(status, (FirmwareState::DigestMismatch, 0));
        assert_eq!(device.firmware_state(), FirmwareState::DigestMismatch);
        assert!(device.firmware_image().is_empty());
        // Nothing to resume: the next attempt starts at 0 and, with the right image, verifies.
        let (status, resumed_at) =
            transfer(&mut device, &mut gateway, &mut now, &image, sha256, None);
        assert_eq!(resumed_at, 0);
        assert_eq!(status, (FirmwareState::Verified, image.len() as u32));
        assert_eq!(device.firmware_image(), &image[..]);
    }

    #[test]
    fn firmware_survives_a_reboot() {
        let image = test_image(10_000, 5);
        let sha256: [u8; 32] = Sha256::digest(&image).into();
        let mut device = SimulatedDevice::new(DeviceConfig::default()).unwrap();
        let mut gateway = Gateway::new();
        let mut now = 0;
        let (status, _) = transfer(
            &mut device,
            &mut gateway,
            &mut now,
            &image,
            sha256,
            Some(4_000),
        );
        let _ = device.reboot(now + 1_000);
        now += 5_000;
        let _ = device.poll(now);
        let (done, resumed_at) =
            transfer(&mut device, &mut gateway, &mut now, &image, sha256, None);
        assert_eq!(resumed_at, status.1);
        assert_eq!(done, (FirmwareState::Verified, 10_000));
    }

    #[test]
    fn a_noisy_line_costs_errors_not_readings_and_every_acked_reading_arrives_once() {
        let mut h = Harness::new(DeviceConfig {
            faults: FaultConfig {
                garbage: Trigger::with_probability(0.2),
                drop_frames: Trigger::with_probability(0.05),
                bit_errors: Trigger::with_probability(5e-4),
                ..FaultConfig::default()
            },
            ..DeviceConfig::default()
        });
        h.run_until(600_000, 100);
        let stats = h.device.stats();
        let decoder = h.gateway.decoder.stats();
        assert!(stats.fault_garbage_bursts > 50, "{stats:?}");
        assert!(stats.fault_bits_flipped > 50, "{stats:?}");
        assert!(stats.fault_frames_dropped > 10, "{stats:?}");
        assert!(decoder.errors() > 100, "{decoder:?}");
        assert!(decoder.bad_crc > 0 && decoder.frames > 600, "{decoder:?}");
        assert!(stats.frames_resent > 0);
        // Exactly once: what the gateway stored is what the device saw ACKed.
        assert_eq!(sorted(h.device.acked_readings()), sorted(&h.stored));
        assert!(stats.readings_acked as usize > 590 * 6);
        assert_conservation(&h.device);
    }

    #[test]
    fn garbage_and_damaged_frames_sent_to_the_device_are_counted_not_fatal() {
        let mut device = SimulatedDevice::new(DeviceConfig::default()).unwrap();
        let mut gateway = Gateway::new();
        let mut rng = Rng::new(9);
        let mut now = 0;
        for round in 0..2_000u32 {
            now += 10;
            let mut bytes: Vec<u8> = (0..rng.next_u64() % 64)
                .map(|_| rng.next_u64() as u8)
                .collect();
            let mut frame = gateway.frame(&Message::Time {
                unix_ms: UNIX_AT_ZERO,
            });
            if round % 2 == 0 {
                let bit = rng.next_u64() as usize % ((frame.len() - 1) * 8);
                frame[bit / 8] ^= 1 << (bit % 8);
            }
            bytes.push(0);
            bytes.extend(frame);
            let _ = device.receive(now, &bytes);
        }
        let decoder = device.decoder_stats();
        assert!(decoder.errors() >= 2_000, "{decoder:?}");
        assert!(decoder.frames >= 1_000, "{decoder:?}");
        assert_eq!(device.stats().time_syncs, decoder.frames);
    }

    #[test]
    fn stuck_values_spikes_and_clock_faults_show_in_the_readings() {
        let mut h = Harness::new(DeviceConfig {
            faults: FaultConfig {
                stuck: Trigger::scheduled(vec![TimeWindow {
                    from_ms: 5_000,
                    until_ms: 5_001,
                }]),
                stuck_min_samples: 10,
                stuck_max_samples: 10,
                spikes: Trigger::scheduled(vec![TimeWindow {
                    from_ms: 20_000,
                    until_ms: 20_001,
                }]),
                spike_magnitude: 1_000.0,
                clock_skew_ms: 5_000,
                clock_drift_ppm: 1_000.0,
                ..FaultConfig::default()
            },
            ..quiet()
        });
        h.poll_at(0);
        h.run_until(100_000, 1_000);
        // Samples by the simulation time they were taken at: ts = unix + skew + drift.
        let by_time: HashMap<u64, HashMap<String, Value>> = {
            let mut map: HashMap<u64, HashMap<String, Value>> = HashMap::new();
            for r in h.device.acked_readings() {
                let at = (r.ts_ms - UNIX_AT_ZERO - 5_000) as f64 / 1.001;
                map.entry(at.round() as u64)
                    .or_default()
                    .insert(r.metric.as_str().to_owned(), r.value.clone());
            }
            map
        };
        let value = |at: u64, metric: &str| by_time[&at][metric].as_f64().unwrap();
        assert_eq!(by_time.len(), 100);
        for at in (5_000..=14_000).step_by(1_000) {
            assert_eq!(value(at, "temperature"), value(4_000, "temperature"));
            assert_eq!(value(at, "energy_wh"), value(4_000, "energy_wh"));
        }
        assert!(value(15_000, "energy_wh") > value(4_000, "energy_wh"));
        assert_eq!(h.device.stats().fault_stuck_readings, 10 * 6);
        assert!((value(20_000, "temperature") - value(19_000, "temperature")).abs() > 900.0);
        assert!((value(21_000, "temperature") - value(19_000, "temperature")).abs() < 5.0);
        assert!(value(20_000, "energy_wh") - value(19_000, "energy_wh") >= 1_000.0);
        assert_eq!(h.device.stats().fault_spikes, 5);
        // Drift accumulates from the TIME at 0: 1000 ppm of 100 s is 100 ms.
        let last = h.device.acked_readings().iter().map(|r| r.ts_ms).max();
        assert_eq!(last, Some(UNIX_AT_ZERO + 100_000 + 5_000 + 100));
    }

    #[test]
    fn several_samples_share_a_frame() {
        let mut h = Harness::new(DeviceConfig {
            samples_per_frame: 5,
            ..quiet()
        });
        h.poll_at(0);
        h.run_until(20_000, 1_000);
        let frames: Vec<Got> = h
            .log
            .iter()
            .filter(|(_, g, _)| g.readings_seq().is_some())
            .map(|(_, g, _)| g.clone())
            .collect();
        assert_eq!(frames.len(), 4);
        let Got::Readings { readings, .. } = &frames[1] else {
            unreachable!()
        };
        let offsets: Vec<u32> = readings.iter().map(|r| r.offset_ms).collect();
        assert_eq!(offsets.len(), 30);
        assert_eq!(&offsets[..7], &[0, 0, 0, 0, 0, 0, 1_000]);
        assert_eq!(sorted(h.device.acked_readings()), sorted(&h.stored));
        assert_eq!(h.stored.len(), 20 * 6);
    }

    #[test]
    fn configs_are_checked() {
        let bad_id = DeviceConfig {
            device_id: "dev 1".to_owned(),
            ..DeviceConfig::default()
        };
        let err = SimulatedDevice::new(bad_id).unwrap_err();
        assert!(err.to_string().contains("dev 1"), "{err}");
        let no_window = DeviceConfig {
            max_in_flight: 0,
            ..DeviceConfig::default()
        };
        let err = SimulatedDevice::new(no_window).unwrap_err();
        assert_eq!(err.to_string(), "max_in_flight must be at least 1, got 0");

        let config: DeviceConfig = toml::from_str(
            "device_id = \"meter-7\"\npersist_unacked = true\n[faults]\nreboot_at_ms = [60000]\ngarbage = { probability = 0.01 }\n",
        )
        .unwrap();
        assert_eq!(config.device_id, "meter-7");
        assert!(config.persist_unacked);
        assert_eq!(config.faults.reboot_at_ms, vec![60_000]);
        assert_eq!(config.metrics.len(), 6);
        let typo = toml::from_str::<DeviceConfig>("sample_intervall_ms = 5\n").unwrap_err();
        assert!(typo.to_string().contains("sample_intervall_ms"), "{typo}");
    }

    /// A minimal async gateway: answers HELLO with ACK and TIME, ACKs READINGS, until `want`
    /// readings were ACKed or `give_up` passes. Returns the readings ACKed.
    async fn serve<P: AsyncRead + AsyncWrite + Unpin>(
        port: &mut P,
        want: usize,
        give_up: Duration,
    ) -> usize {
        let deadline = Instant::now() + give_up;
        let mut gateway = Gateway::new();
        let mut buf = [0u8; 1024];
        let mut acked = 0;
        while acked < want {
            let n = tokio::select! {
                read = port.read(&mut buf) => read.unwrap(),
                _ = tokio::time::sleep_until(deadline) => break,
            };
            assert_ne!(n, 0, "the device hung up");
            let mut reply = Vec::new();
            for got in gateway.got(&buf[..n]) {
                match got {
                    Got::Hello { seq, .. } => {
                        reply.extend(gateway.frame(&Message::Ack { seq }));
                        reply.extend(gateway.frame(&Message::Time {
                            unix_ms: UNIX_AT_ZERO,
                        }));
                    }
                    Got::Readings { seq, readings, .. } => {
                        acked += readings.len();
                        reply.extend(gateway.frame(&Message::Ack { seq }));
                    }
                    _ => {}
                }
            }
            port.write_all(&reply).await.unwrap();
        }
        acked
    }

    #[tokio::test(start_paused = true)]
    async fn the_runner_drives_a_device_over_a_pipe() {
        let (mut gateway_end, device_end) = tokio::io::duplex(4_096);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let device = tokio::spawn(run_device(DeviceConfig::default(), device_end, async {
            let _ = stopped.await;
        }));
        let acked = serve(&mut gateway_end, 60, Duration::from_secs(60)).await;
        assert_eq!(acked, 60);
        // Let the device take the last ACK.
        tokio::time::sleep(Duration::from_millis(10)).await;
        stop.send(()).unwrap();
        let run = device.await.unwrap().unwrap();
        assert!(matches!(run.end, RunEnd::Shutdown), "{:?}", run.end);
        assert!(run.device.stats().readings_acked >= 60);
        // Ten samples at 1 s took ten seconds of (paused) tokio time.
        assert!(run.device.now_ms() >= 10_000 && run.device.now_ms() < 11_000);

        // Without a reader the runner ends when the other end is dropped.
        let (gateway_end, device_end) = tokio::io::duplex(64);
        drop(gateway_end);
        let run = run_device(DeviceConfig::default(), device_end, std::future::pending())
            .await
            .unwrap();
        assert!(
            matches!(run.end, RunEnd::PortClosed | RunEnd::PortError(_)),
            "{:?}",
            run.end
        );
    }

    #[tokio::test]
    async fn devices_on_pseudo_terminals_reach_a_gateway_by_path_or_stream() {
        use tokio_serial::SerialPortBuilderExt;

        let mut fleet = spawn_devices(2, |i| DeviceConfig {
            sample_interval_ms: 50,
            ..DeviceConfig::for_index(i)
        })
        .unwrap();
        let path = fleet.devices[0].path.clone();
        assert!(path.starts_with("/dev/pts"), "{path:?}");
        // Device 0: opened by path, as a gateway opens a real port, with the held end unread.
        let mut by_path = tokio_serial::new(path.to_string_lossy(), 115_200)
            .open_native_async()
            .unwrap();
        // Device 1: the held slave end used directly.
        let mut by_stream = fleet.devices[1].gateway_end.take().unwrap();
        let (a, b) = tokio::join!(
            serve(&mut by_path, 30, Duration::from_secs(10)),
            serve(&mut by_stream, 30, Duration::from_secs(10)),
        );
        assert_eq!((a, b), (30, 30));
        // Let the devices take the last ACKs.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let snapshot = *fleet.devices[0].snapshots.borrow();
        assert!(
            snapshot.link_up && snapshot.stats.readings_acked >= 24,
            "{snapshot:?}"
        );
        let devices = fleet.shutdown().await;
        assert_eq!(devices[0].device_id().as_str(), "dev-0000");
        assert_eq!(devices[1].device_id().as_str(), "dev-0001");
        assert!(devices.iter().all(|d| d.stats().readings_acked >= 30));
    }
}
