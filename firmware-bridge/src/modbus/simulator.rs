//! A Modbus RTU device simulator: serves register maps on a pseudo-terminal, with realistic values
//! from `fieldgate_shared::generate` (or fixed ones), and injectable faults. Used by tests and by
//! `fieldgate sim modbus`.
//!
//! Several units can share one simulator, as devices share an RS-485 bus; a request to a unit
//! the simulator does not serve goes unanswered, as on a real bus.
//!
//! It is a hand-written responder rather than tokio-modbus's server: the faults it must inject
//! (a corrupted CRC, stray bytes, an answer trickling in byte by byte) happen below the frames
//! that server lets a service produce. The protocol core, [`SimulatedBus`], is sans-IO (bytes and
//! time in, frames out); [`ModbusSimulator`] is the thin task that owns the pseudo-terminal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use fieldgate_shared::generate::{FleetConfig, MetricShape, SensorFleet};
use fieldgate_shared::{MetricName, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::warn;

use super::config::MAX_UNIT_ID;
use super::pty::PseudoTerminal;
use super::register_map::{RegisterKind, RegisterMap, RegisterSpec, RegisterType};
use super::rtu::{
    encode_bits_response, encode_exception_response, encode_registers_response, RequestDecoder,
    RtuRequest,
};
use super::value_codec::{encode_value, RegisterContents};

/// Exception code: the function is not supported.
pub const EXCEPTION_ILLEGAL_FUNCTION: u8 = 0x01;
/// Exception code: the request touches an address the device does not have.
pub const EXCEPTION_ILLEGAL_DATA_ADDRESS: u8 = 0x02;
/// Exception code: the quantity is out of range.
pub const EXCEPTION_ILLEGAL_DATA_VALUE: u8 = 0x03;
/// Exception code: the device failed while handling the request.
pub const EXCEPTION_SERVER_DEVICE_FAILURE: u8 = 0x04;

/// Most catch-up samples taken in one go after a long pause; beyond that the signal jumps.
const MAX_CATCH_UP_SAMPLES: u64 = 10_000;

/// A fault a simulated unit injects into every answer until it is changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Answers correctly.
    #[default]
    None,
    /// Never answers: the master times out.
    NoAnswer,
    /// Answers with a corrupted CRC.
    BadCrc,
    /// Answers every request with this exception code.
    Exception(u8),
    /// Sends these bytes right before each answer.
    StrayBytesBefore(Vec<u8>),
    /// Sends each answer one byte at a time, pausing between bytes.
    ByteByByte { pause: Duration },
}

/// Where a simulated unit's values come from.
#[derive(Clone, Debug, PartialEq)]
pub enum SimulatedValues {
    /// Realistic signals from `fieldgate_shared::generate`, one new sample per
    /// `sample_interval` of running time: analog values with a daily cycle, drift and noise
    /// (rounded to the register's decimals), counters for unscaled 32-bit integers, rarely
    /// toggling flags for bits.
    Generated {
        seed: u64,
        sample_interval: Duration,
    },
    /// The same values for ever; every metric of the map needs one.
    Fixed(BTreeMap<MetricName, Value>),
}

/// One simulated device on the bus.
#[derive(Clone, Debug)]
pub struct SimulatedUnit {
    pub unit_id: u8,
    pub map: Arc<RegisterMap>,
    pub values: SimulatedValues,
    pub fault: Fault,
}

/// What a simulated unit has seen and done.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnitCounters {
    pub requests: u64,
    /// Answers sent, exceptions and corrupted ones included.
    pub answers: u64,
    /// Requests left unanswered by [`Fault::NoAnswer`].
    pub unanswered: u64,
}

/// What the simulator has seen and done.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimulatorCounters {
    pub units: BTreeMap<u8, UnitCounters>,
    /// Requests to unit ids the simulator does not serve (left unanswered).
    pub requests_for_absent_units: u64,
    /// Received bytes that formed no valid request.
    pub bytes_discarded: u64,
}

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimulatorError {
    #[error("simulated unit id {unit_id} is outside 1..={MAX_UNIT_ID}")]
    BadUnitId { unit_id: u8 },
    #[error("simulated unit id {unit_id} is listed twice")]
    DuplicateUnit { unit_id: u8 },
    #[error("simulated unit {unit_id} has no fixed value for metric {metric}")]
    MissingValue { unit_id: u8, metric: MetricName },
    #[error("opening a pseudo-terminal for the Modbus simulator: {0}")]
    Pty(#[source] std::io::Error),
    #[error("linking {link} to the simulator's pseudo-terminal: {source}")]
    Link {
        link: String,
        #[source]
        source: std::io::Error,
    },
}

/// A frame to send, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmission {
    pub bytes: Vec<u8>,
    /// Pause between bytes; `None` sends the frame at once.
    pub pause_between_bytes: Option<Duration>,
}

struct RegisterSignal {
    spec: RegisterSpec,
    value: Value,
    generator: Option<SensorFleet>,
}

struct UnitState {
    registers: Vec<RegisterSignal>,
    sample_interval: Duration,
    samples_taken: u64,
    fault: Fault,
    counters: UnitCounters,
}

/// The shape of the generated signal that fits a register's type and scale.
fn signal_shape(spec: &RegisterSpec) -> MetricShape {
    let max_raw = match spec.register_type {
        RegisterType::Bool => {
            return MetricShape::Flag {
                toggle_probability: 0.01,
            }
        }
        RegisterType::U32 | RegisterType::I32 if spec.yields_integer() => {
            return MetricShape::Counter {
                min_step: 1,
                max_step: 9,
            }
        }
        RegisterType::U16 => f64::from(u16::MAX),
        RegisterType::I16 => f64::from(i16::MAX),
        RegisterType::U32 => f64::from(u32::MAX),
        RegisterType::I32 => f64::from(i32::MAX),
        RegisterType::F32 => 1.0e6,
    };
    // Mid-scale of what the register can carry, at most 50 units: a plausible process value.
    let base = (max_raw * spec.scale.abs()).min(100.0) * 0.5;
    MetricShape::Analog {
        base,
        daily_amplitude: base * 0.1,
        drift: base * 0.000_5,
        noise: base * 0.002,
        decimals: spec
            .decimals
            .unwrap_or(if spec.yields_integer() { 0 } else { 2 }),
    }
}

impl UnitState {
    fn new(unit: &SimulatedUnit) -> Result<Self, SimulatorError> {
        let mut registers = Vec::with_capacity(unit.map.registers().len());
        let mut sample_interval = Duration::from_secs(1);
        for (index, spec) in unit.map.registers().iter().enumerate() {
            let (value, generator) = match &unit.values {
                SimulatedValues::Fixed(values) => {
                    let value = values.get(&spec.metric).cloned().ok_or_else(|| {
                        SimulatorError::MissingValue {
                            unit_id: unit.unit_id,
                            metric: spec.metric.clone(),
                        }
                    })?;
                    (value, None)
                }
                SimulatedValues::Generated {
                    seed,
                    sample_interval: interval,
                } => {
                    sample_interval = (*interval).max(Duration::from_millis(1));
                    let config = FleetConfig {
                        seed: seed
                            .wrapping_add(u64::from(unit.unit_id) << 32)
                            .wrapping_add((index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                        devices: 1,
                        metrics: vec![("value", signal_shape(spec))],
                        interval_ms: sample_interval.as_millis() as i64,
                        jitter_ms: 0,
                        gap_probability: 0.0,
                        ..FleetConfig::default()
                    };
                    (Value::I64(0), Some(SensorFleet::new(config)))
                }
            };
            registers.push(RegisterSignal {
                spec: spec.clone(),
                value,
                generator,
            });
        }
        Ok(Self {
            registers,
            sample_interval,
            samples_taken: 0,
            fault: unit.fault.clone(),
            counters: UnitCounters::default(),
        })
    }

    /// Brings generated values up to the sample due at `elapsed` since the simulator started.
    fn advance_to(&mut self, elapsed: Duration) {
        let due = 1 + (elapsed.as_nanos() / self.sample_interval.as_nanos().max(1)) as u64;
        if due.saturating_sub(self.samples_taken) > MAX_CATCH_UP_SAMPLES {
            self.samples_taken = due - MAX_CATCH_UP_SAMPLES;
        }
        while self.samples_taken < due {
            for register in &mut self.registers {
                if let Some(reading) = register.generator.as_mut().and_then(Iterator::next) {
                    register.value = reading.value;
                }
            }
            self.samples_taken += 1;
        }
    }

    /// The answer frame to a read, or the exception code to answer with.
    fn read(&self, kind: RegisterKind, address: u16, count: u16) -> Result<Contents, u8> {
        if count == 0 || count > kind.max_items_per_read() {
            return Err(EXCEPTION_ILLEGAL_DATA_VALUE);
        }
        let mut words: BTreeMap<u32, u16> = BTreeMap::new();
        let mut bits: BTreeMap<u32, bool> = BTreeMap::new();
        for register in self
            .registers
            .iter()
            .filter(|register| register.spec.kind == kind)
        {
            let start = u32::from(register.spec.address);
            match encode_value(&register.spec, &register.value) {
                RegisterContents::Words(register_words) => {
                    for (offset, word) in register_words.into_iter().enumerate() {
                        words.insert(start + offset as u32, word);
                    }
                }
                RegisterContents::Bit(bit) => {
                    bits.insert(start, bit);
                }
            }
        }
        let addresses = u32::from(address)..u32::from(address) + u32::from(count);
        if kind.is_bit() {
            addresses
                .map(|at| bits.get(&at).copied())
                .collect::<Option<Vec<bool>>>()
                .map(Contents::Bits)
                .ok_or(EXCEPTION_ILLEGAL_DATA_ADDRESS)
        } else {
            addresses
                .map(|at| words.get(&at).copied())
                .collect::<Option<Vec<u16>>>()
                .map(Contents::Words)
                .ok_or(EXCEPTION_ILLEGAL_DATA_ADDRESS)
        }
    }
}

enum Contents {
    Words(Vec<u16>),
    Bits(Vec<bool>),
}

/// The simulator's protocol core: feed it the bytes that arrive and the time, send what it
/// returns. No I/O.
pub struct SimulatedBus {
    units: BTreeMap<u8, UnitState>,
    decoder: RequestDecoder,
    requests_for_absent_units: u64,
}

impl SimulatedBus {
    pub fn new(units: &[SimulatedUnit]) -> Result<Self, SimulatorError> {
        let mut states = BTreeMap::new();
        for unit in units {
            if !(1..=MAX_UNIT_ID).contains(&unit.unit_id) {
                return Err(SimulatorError::BadUnitId {
                    unit_id: unit.unit_id,
                });
            }
            if states.insert(unit.unit_id, UnitState::new(unit)?).is_some() {
                return Err(SimulatorError::DuplicateUnit {
                    unit_id: unit.unit_id,
                });
            }
        }
        Ok(Self {
            units: states,
            decoder: RequestDecoder::default(),
            requests_for_absent_units: 0,
        })
    }

    /// Takes bytes that arrived `elapsed` after the simulator started; returns the answers.
    pub fn receive(&mut self, bytes: &[u8], elapsed: Duration) -> Vec<Transmission> {
        self.decoder.push(bytes);
        let mut transmissions = Vec::new();
        while let Some(request) = self.decoder.next_request() {
            transmissions.extend(self.answer(&request, elapsed));
        }
        transmissions
    }

    /// Whether a partial request waits for more bytes.
    pub fn has_partial_request(&self) -> bool {
        self.decoder.has_partial()
    }

    /// The line has been silent for longer than a frame gap: a partial request is noise.
    pub fn line_idle(&mut self) {
        self.decoder.discard_partial();
    }

    /// Changes a unit's fault; `false` if the unit is not simulated.
    pub fn set_fault(&mut self, unit_id: u8, fault: Fault) -> bool {
        match self.units.get_mut(&unit_id) {
            Some(unit) => {
                unit.fault = fault;
                true
            }
            None => false,
        }
    }

    pub fn counters(&self) -> SimulatorCounters {
        SimulatorCounters {
            units: self
                .units
                .iter()
                .map(|(&unit_id, unit)| (unit_id, unit.counters.clone()))
                .collect(),
            requests_for_absent_units: self.requests_for_absent_units,
            bytes_discarded: self.decoder.bytes_discarded(),
        }
    }

    fn answer(&mut self, request: &RtuRequest, elapsed: Duration) -> Option<Transmission> {
        let unit_id = request.unit_id();
        let Some(unit) = self.units.get_mut(&unit_id) else {
            self.requests_for_absent_units += 1;
            return None;
        };
        unit.counters.requests += 1;
        let function_code = request.function_code();
        let mut frame = match (&unit.fault, request) {
            (Fault::NoAnswer, _) => {
                unit.counters.unanswered += 1;
                return None;
            }
            (Fault::Exception(code), _) => encode_exception_response(unit_id, function_code, *code),
            (_, RtuRequest::Other { .. }) => {
                encode_exception_response(unit_id, function_code, EXCEPTION_ILLEGAL_FUNCTION)
            }
            (
                _,
                RtuRequest::Read {
                    kind,
                    address,
                    count,
                    ..
                },
            ) => {
                unit.advance_to(elapsed);
                match unit.read(*kind, *address, *count) {
                    Ok(Contents::Words(words)) => {
                        encode_registers_response(unit_id, function_code, &words)
                    }
                    Ok(Contents::Bits(bits)) => encode_bits_response(unit_id, function_code, &bits),
                    Err(code) => encode_exception_response(unit_id, function_code, code),
                }
            }
        };
        unit.counters.answers += 1;
        let mut pause_between_bytes = None;
        match &unit.fault {
            Fault::BadCrc => {
                if let Some(last) = frame.last_mut() {
                    *last ^= 0xa5;
                }
            }
            Fault::StrayBytesBefore(stray) => {
                frame.splice(0..0, stray.iter().copied());
            }
            Fault::ByteByByte { pause } => pause_between_bytes = Some(*pause),
            Fault::None | Fault::NoAnswer | Fault::Exception(_) => {}
        }
        Some(Transmission {
            bytes: frame,
            pause_between_bytes,
        })
    }
}

/// Options of a running simulator.
#[derive(Clone, Debug)]
pub struct SimulatorOptions {
    /// Also reach the pseudo-terminal through this symlink, which survives a restart of the
    /// simulator (like a udev name surviving a replug); replaced if it exists.
    pub link_path: Option<PathBuf>,
    /// Silence after which a partial request is dropped as noise.
    pub frame_gap: Duration,
}

impl Default for SimulatorOptions {
    fn default() -> Self {
        Self {
            link_path: None,
            frame_gap: Duration::from_millis(50),
        }
    }
}

fn lock(bus: &Mutex<SimulatedBus>) -> MutexGuard<'_, SimulatedBus> {
    bus.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running simulator on a pseudo-terminal. Dropping it (or [`Self::stop`]) closes the
/// pseudo-terminal, which the poller sees as an unplugged adapter.
pub struct ModbusSimulator {
    port_path: PathBuf,
    link_path: Option<PathBuf>,
    bus: Arc<Mutex<SimulatedBus>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ModbusSimulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModbusSimulator")
            .field("port_path", &self.port_path)
            .finish_non_exhaustive()
    }
}

impl ModbusSimulator {
    /// Opens a pseudo-terminal and serves `units` on it. Must be called inside a tokio runtime.
    pub fn start(
        units: &[SimulatedUnit],
        options: SimulatorOptions,
    ) -> Result<Self, SimulatorError> {
        let bus = Arc::new(Mutex::new(SimulatedBus::new(units)?));
        let pty = PseudoTerminal::open().map_err(SimulatorError::Pty)?;
        let mut port_path = pty.slave_path().to_path_buf();
        if let Some(link) = &options.link_path {
            replace_symlink(link, &port_path).map_err(|source| SimulatorError::Link {
                link: link.display().to_string(),
                source,
            })?;
            port_path = link.clone();
        }
        let (stop, stop_requested) = oneshot::channel();
        let task = tokio::spawn(serve(
            pty,
            Arc::clone(&bus),
            options.frame_gap,
            stop_requested,
        ));
        Ok(Self {
            port_path,
            link_path: options.link_path,
            bus,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The path a poller opens: the symlink if one was asked for, else `/dev/pts/N`.
    pub fn port_path(&self) -> &Path {
        &self.port_path
    }

    /// Changes a unit's fault while running; `false` if the unit is not simulated.
    pub fn set_fault(&self, unit_id: u8, fault: Fault) -> bool {
        lock(&self.bus).set_fault(unit_id, fault)
    }

    pub fn counters(&self) -> SimulatorCounters {
        lock(&self.bus).counters()
    }

    /// Stops serving, closes the pseudo-terminal and removes the symlink.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.remove_link();
    }

    fn remove_link(&mut self) {
        if let Some(link) = self.link_path.take() {
            if link
                .symlink_metadata()
                .is_ok_and(|meta| meta.file_type().is_symlink())
            {
                let _ = std::fs::remove_file(&link);
            }
        }
    }
}

impl Drop for ModbusSimulator {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.remove_link();
    }
}

/// Points `link` at `target`, replacing an existing symlink but never a real file.
fn replace_symlink(link: &Path, target: &Path) -> std::io::Result<()> {
    match link.symlink_metadata() {
        Ok(meta) if meta.file_type().is_symlink() => std::fs::remove_file(link)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a symlink",
            ))
        }
        Err(_) => {}
    }
    std::os::unix::fs::symlink(target, link)
}

/// The simulator's task: reads requests, writes answers, until stopped.
async fn serve(
    pty: PseudoTerminal,
    bus: Arc<Mutex<SimulatedBus>>,
    frame_gap: Duration,
    mut stop_requested: oneshot::Receiver<()>,
) {
    let started = Instant::now();
    let mut buffer = [0u8; 512];
    loop {
        let has_partial = lock(&bus).has_partial_request();
        let received = tokio::select! {
            _ = &mut stop_requested => return,
            () = tokio::time::sleep(frame_gap), if has_partial => {
                lock(&bus).line_idle();
                continue;
            }
            received = pty.read(&mut buffer) => received,
        };
        let n_received = match received {
            Ok(n_received) => n_received,
            Err(error) => {
                warn!(path = %pty.slave_path().display(), error = %error, "Modbus simulator cannot read its pseudo-terminal");
                return;
            }
        };
        let transmissions = lock(&bus).receive(&buffer[..n_received], started.elapsed());
        for transmission in transmissions {
            let sent = match transmission.pause_between_bytes {
                None => pty.write_all(&transmission.bytes).await,
                Some(pause) => {
                    let mut result = Ok(());
                    for byte in &transmission.bytes {
                        result = pty.write_all(std::slice::from_ref(byte)).await;
                        if result.is_err() {
                            break;
                        }
                        tokio::time::sleep(pause).await;
                    }
                    result
                }
            };
            if let Err(error) = sent {
                warn!(path = %pty.slave_path().display(), error = %error, "Modbus simulator cannot write its pseudo-terminal");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modbus::rtu::{crc_is_valid, encode_read_request};

    fn map() -> Arc<RegisterMap> {
        Arc::new(
            RegisterMap::from_toml_str(
                include_str!("../../examples/register-maps/energy-meter.toml"),
                "energy-meter.toml",
            )
            .unwrap(),
        )
    }

    fn generated_unit(unit_id: u8, fault: Fault) -> SimulatedUnit {
        SimulatedUnit {
            unit_id,
            map: map(),
            values: SimulatedValues::Generated {
                seed: 7,
                sample_interval: Duration::from_secs(1),
            },
            fault,
        }
    }

    fn ask(bus: &mut SimulatedBus, request: &[u8]) -> Vec<Transmission> {
        bus.receive(request, Duration::from_secs(3))
    }

    #[test]
    fn answers_reads_and_refuses_unmapped_addresses() {
        let mut bus = SimulatedBus::new(&[generated_unit(1, Fault::None)]).unwrap();
        let answers = ask(
            &mut bus,
            &encode_read_request(1, RegisterKind::Input, 0, 12),
        );
        assert_eq!(answers.len(), 1);
        let frame = &answers[0].bytes;
        assert_eq!(&frame[..3], &[1, 4, 24]);
        assert!(crc_is_valid(frame));
        // Input register 12 is not in the map.
        let answers = ask(
            &mut bus,
            &encode_read_request(1, RegisterKind::Input, 0, 13),
        );
        assert_eq!(
            answers[0].bytes[..3],
            [1, 0x84, EXCEPTION_ILLEGAL_DATA_ADDRESS]
        );
        // Nobody answers for unit 9.
        assert!(ask(&mut bus, &encode_read_request(9, RegisterKind::Input, 0, 1)).is_empty());
        let counters = bus.counters();
        assert_eq!(counters.requests_for_absent_units, 1);
        assert_eq!(counters.units[&1].answers, 2);
    }

    #[test]
    fn faults_shape_the_answer() {
        let request = encode_read_request(1, RegisterKind::Coil, 0, 1);
        let mut bus = SimulatedBus::new(&[generated_unit(1, Fault::BadCrc)]).unwrap();
        assert!(!crc_is_valid(&ask(&mut bus, &request)[0].bytes));

        bus.set_fault(1, Fault::Exception(EXCEPTION_SERVER_DEVICE_FAILURE));
        assert_eq!(ask(&mut bus, &request)[0].bytes[..3], [1, 0x81, 4]);

        bus.set_fault(1, Fault::StrayBytesBefore(vec![0x00, 0xff]));
        let bytes = ask(&mut bus, &request)[0].bytes.clone();
        assert_eq!(&bytes[..2], &[0x00, 0xff]);
        assert!(crc_is_valid(&bytes[2..]));

        bus.set_fault(1, Fault::NoAnswer);
        assert!(ask(&mut bus, &request).is_empty());
        assert_eq!(bus.counters().units[&1].unanswered, 1);

        let pause = Duration::from_millis(2);
        bus.set_fault(1, Fault::ByteByByte { pause });
        assert_eq!(ask(&mut bus, &request)[0].pause_between_bytes, Some(pause));
    }

    #[test]
    fn generated_values_move_and_stay_decodable() {
        use crate::modbus::read_plan::plan_reads;
        use crate::modbus::value_codec::{decode_read_response, ResponseData};

        let unit = generated_unit(1, Fault::None);
        let device = fieldgate_shared::DeviceId::new("sim").unwrap();
        let mut bus = SimulatedBus::new(std::slice::from_ref(&unit)).unwrap();
        let request = plan_reads(&unit.map)
            .into_iter()
            .find(|request| request.kind == RegisterKind::Input)
            .unwrap();
        let mut seen = Vec::new();
        for second in [1, 600, 7_200] {
            let answers = bus.receive(
                &encode_read_request(1, request.kind, request.start_address, request.count),
                Duration::from_secs(second),
            );
            let frame = &answers[0].bytes;
            let words: Vec<u16> = frame[3..frame.len() - 2]
                .chunks(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
                .collect();
            let readings =
                decode_read_response(&device, &request, ResponseData::Words(&words), 0).unwrap();
            let voltage = readings
                .iter()
                .find(|reading| reading.metric.as_str() == "voltage.l1")
                .unwrap();
            let Value::F64(voltage) = voltage.value else {
                panic!("{voltage:?}")
            };
            assert!((10.0..=100.0).contains(&voltage), "{voltage}");
            seen.push(voltage);
        }
        assert!(seen.windows(2).any(|pair| pair[0] != pair[1]), "{seen:?}");
    }

    #[test]
    fn fixed_values_need_every_metric() {
        let unit = SimulatedUnit {
            unit_id: 1,
            map: map(),
            values: SimulatedValues::Fixed(BTreeMap::new()),
            fault: Fault::None,
        };
        assert!(matches!(
            SimulatedBus::new(&[unit]),
            Err(SimulatorError::MissingValue { unit_id: 1, .. })
        ));
    }
}
