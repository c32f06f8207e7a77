//! The Modbus RTU poller: one task that owns one serial line, polls every device's planned reads
//! on their periods through tokio-modbus, sends the readings to a channel, and reopens the line
//! with backoff when it disappears.
//!
//! The bus is half-duplex, so requests go out one at a time, earliest due first. A device that
//! times out, answers garbage or answers with an exception costs only its own request: the
//! others keep their turns. A late turn is taken as soon as the bus is free and the next one is
//! scheduled a period after that, so an overloaded bus polls back to back rather than bursting
//! to catch up. A full readings channel holds polling up rather than dropping readings: the
//! consumer (the edge's journal) sets the pace.
//!
//! What each outcome does:
//! - data: decoded into readings stamped with the UTC time the request was sent;
//! - exception: counted by code, no readings;
//! - no byte of answer in time: a timeout, not retried;
//! - bytes that do not decode (bad CRC, wrong unit, function or length): a CRC/framing error,
//!   retried `garbled_response_retries` times with a fresh client;
//! - any other I/O error: the port is closed and reopened after a backoff that doubles up to
//!   `reopen_backoff_max_ms`, and is reset once a request completes on the new port.
//!
//! The port is opened by [`crate::transport::open_port`], like every serial port of this crate,
//! so RS-485 direction switching is set up when `[port.rs485]` asks for it. The port itself has
//! no read timeout (tokio-serial reads without blocking): each request is bounded by
//! `request_timeout_ms` through `tokio::time::timeout`.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fieldgate_shared::Reading;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_modbus::client::{rtu, Client, Context};
use tokio_modbus::slave::SlaveContext;
use tokio_modbus::{Request, Response, Slave};
use tokio_serial::SerialStream;
use tracing::{debug, info, warn};

use super::config::{DeviceConfig, PollerConfig, PollerConfigError};
use super::read_plan::{plan_reads, ReadRequest};
use super::register_map::RegisterKind;
use super::stats::{PollEvent, PollerStats};
use super::transport::SharedPort;
use super::value_codec::{decode_read_response, ResponseData};
use crate::transport::open_port;

/// Why the poller stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum PollerError {
    #[error("the readings channel of the Modbus poller on {path} is closed")]
    ReadingsChannelClosed { path: String },
}

/// One planned read of one device, and when it is next due.
#[derive(Debug)]
struct ScheduledRead {
    device_index: usize,
    request: ReadRequest,
    next_due: Instant,
}

/// A poller for one serial line; see the module docs.
#[derive(Debug)]
pub struct ModbusPoller {
    config: PollerConfig,
    stats: PollerStats,
}

/// How one request ended, once retries are spent.
enum RequestOutcome {
    Readings(Vec<Reading>),
    /// Counted and logged; the device is polled again next period.
    NoReadings,
    /// The port failed; close and reopen it.
    PortFailed,
}

/// The open port and the Modbus client attached to it.
struct LineSession {
    port: SharedPort<SerialStream>,
    client: Context,
}

impl LineSession {
    fn new(stream: SerialStream) -> Self {
        let port = SharedPort::new(stream);
        let client = rtu::attach_slave(port.clone(), Slave::broadcast());
        Self { port, client }
    }

    /// Throws away the client's decoder state (a half-read frame, tokio's `Framed` error state)
    /// but keeps the port open.
    fn reset_client(&mut self) {
        self.client = rtu::attach_slave(self.port.clone(), Slave::broadcast());
    }
}

fn utc_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since_epoch| since_epoch.as_millis() as i64)
}

fn modbus_request(request: &ReadRequest) -> Request<'static> {
    let (address, count) = (request.start_address, request.count);
    match request.kind {
        RegisterKind::Holding => Request::ReadHoldingRegisters(address, count),
        RegisterKind::Input => Request::ReadInputRegisters(address, count),
        RegisterKind::Coil => Request::ReadCoils(address, count),
        RegisterKind::Discrete => Request::ReadDiscreteInputs(address, count),
    }
}

impl ModbusPoller {
    /// Validates `config`; nothing is opened until [`Self::run`].
    pub fn new(config: PollerConfig) -> Result<Self, PollerConfigError> {
        config.validate()?;
        let stats = PollerStats::new(config.devices.iter().map(|device| device.id.clone()));
        Ok(Self { config, stats })
    }

    /// Counts into `stats` instead of fresh counters: a poller restarted by a supervisor keeps
    /// adding to the counters its predecessor reported.
    pub fn with_stats(mut self, stats: PollerStats) -> Self {
        self.stats = stats;
        self
    }

    /// A handle on the counters, readable while the poller runs.
    pub fn stats(&self) -> PollerStats {
        self.stats.clone()
    }

    fn path(&self) -> String {
        self.config.port.path.clone()
    }

    /// Polls until `shutdown` completes (returns `Ok`) or the readings channel closes.
    pub async fn run(
        self,
        readings: mpsc::Sender<Reading>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), PollerError> {
        tokio::pin!(shutdown);
        let path = self.path();
        let start = Instant::now();
        let mut schedule: Vec<ScheduledRead> = self
            .config
            .devices
            .iter()
            .enumerate()
            .flat_map(|(device_index, device)| {
                plan_reads(&device.map)
                    .into_iter()
                    .map(move |request| ScheduledRead {
                        device_index,
                        request,
                        next_due: start,
                    })
            })
            .collect();
        info!(
            path = %path,
            n_devices = self.config.devices.len(),
            n_reads = schedule.len(),
            "Starting Modbus poller"
        );

        let reopen_backoff = self.config.polling.reopen_backoff();
        let mut backoff = reopen_backoff.initial;
        let mut wait_before_opening: Option<Duration> = None;
        loop {
            if let Some(delay) = wait_before_opening.take() {
                tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            let stream = match open_port(&self.config.port) {
                Ok(stream) => stream,
                Err(error) => {
                    self.stats.record_port_open_failed(&path, &error);
                    wait_before_opening = Some(backoff);
                    backoff = (backoff * 2).min(reopen_backoff.max);
                    continue;
                }
            };
            self.stats.record_port_opened(&path);
            let mut session = LineSession::new(stream);

            // Poll until the port fails.
            loop {
                let Some(next) = schedule.iter_mut().min_by_key(|read| read.next_due) else {
                    // No reads at all (every map is non-empty, so this cannot happen); idle.
                    shutdown.await;
                    return Ok(());
                };
                tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep_until(next.next_due) => {}
                }
                let device = &self.config.devices[next.device_index];
                let outcome = tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    outcome = self.poll_request(&mut session, device, &next.request) => outcome,
                };
                next.next_due = (next.next_due + next.request.poll_period).max(Instant::now());
                match outcome {
                    RequestOutcome::Readings(device_readings) => {
                        backoff = reopen_backoff.initial;
                        for reading in device_readings {
                            tokio::select! {
                                () = &mut shutdown => return Ok(()),
                                sent = readings.send(reading) => {
                                    if sent.is_err() {
                                        return Err(PollerError::ReadingsChannelClosed { path });
                                    }
                                }
                            }
                        }
                    }
                    RequestOutcome::NoReadings => backoff = reopen_backoff.initial,
                    RequestOutcome::PortFailed => {
                        self.stats.record_port_lost(&path);
                        wait_before_opening = Some(backoff);
                        backoff = (backoff * 2).min(reopen_backoff.max);
                        break;
                    }
                }
            }
        }
    }

    /// Sends one planned read, with retries on garbled answers, and decodes the answer.
    async fn poll_request(
        &self,
        session: &mut LineSession,
        device: &DeviceConfig,
        request: &ReadRequest,
    ) -> RequestOutcome {
        let attempts = 1 + u32::from(self.config.polling.garbled_response_retries);
        let timeout = self.config.polling.request_timeout();
        let record = |event: PollEvent<'_>| {
            self.stats
                .record(&device.id, device.unit_id, request, event)
        };
        for attempt in 1..=attempts {
            session.port.begin_transaction(device.unit_id);
            session.client.set_slave(Slave(device.unit_id));
            record(PollEvent::Sent);
            let ts_ms = utc_now_ms();
            let result =
                tokio::time::timeout(timeout, session.client.call(modbus_request(request))).await;
            let line = session.port.transaction_report();
            self.stats.record_discarded_bytes(
                &device.id,
                line.stray_bytes_discarded,
                line.stale_bytes_discarded,
            );
            let garbled_reason: String = match result {
                Ok(Ok(Ok(response))) => {
                    let data = match &response {
                        Response::ReadHoldingRegisters(words)
                        | Response::ReadInputRegisters(words) => Some(ResponseData::Words(words)),
                        Response::ReadCoils(bits) | Response::ReadDiscreteInputs(bits) => {
                            Some(ResponseData::Bits(bits))
                        }
                        _ => None,
                    };
                    match data.map(|data| decode_read_response(&device.id, request, data, ts_ms)) {
                        Some(Ok(readings)) => {
                            record(PollEvent::Answered {
                                n_readings: readings.len(),
                            });
                            return RequestOutcome::Readings(readings);
                        }
                        Some(Err(error)) => error.to_string(),
                        None => format!("unexpected response {response:?}"),
                    }
                }
                Ok(Ok(Err(exception))) => {
                    record(PollEvent::Exception {
                        code: u8::from(exception),
                    });
                    return RequestOutcome::NoReadings;
                }
                Ok(Err(tokio_modbus::Error::Protocol(error))) => error.to_string(),
                Ok(Err(tokio_modbus::Error::Transport(error)))
                    if error.kind() == std::io::ErrorKind::InvalidData =>
                {
                    error.to_string()
                }
                Ok(Err(tokio_modbus::Error::Transport(error))) => {
                    record(PollEvent::IoError { error: &error });
                    return RequestOutcome::PortFailed;
                }
                Err(_elapsed) if line.bytes_received == 0 => {
                    record(PollEvent::Timeout);
                    // The dropped call may have left a half-written request in the client.
                    session.reset_client();
                    return RequestOutcome::NoReadings;
                }
                Err(_elapsed) => format!(
                    "{} byte(s) arrived but never formed a valid answer (bad CRC or truncated)",
                    line.bytes_received
                ),
            };
            record(PollEvent::Garbled {
                reason: &garbled_reason,
            });
            session.reset_client();
            if attempt < attempts {
                debug!(device = %device.id, attempt, "Asking again after a garbled answer");
            }
        }
        RequestOutcome::NoReadings
    }
}

/// Spawns a poller on the current tokio runtime; returns its task and its counters.
pub fn spawn_poller(
    config: PollerConfig,
    readings: mpsc::Sender<Reading>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(JoinHandle<Result<(), PollerError>>, PollerStats), PollerConfigError> {
    let poller = ModbusPoller::new(config)?;
    let stats = poller.stats();
    let path = poller.path();
    let task = tokio::spawn(async move {
        let result = poller.run(readings, shutdown).await;
        match &result {
            Ok(()) => info!(path = %path, "Modbus poller stopped"),
            Err(error) => warn!(path = %path, error = %error, "Modbus poller stopped"),
        }
        result
    });
    Ok((task, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_use_the_right_function() {
        let map = crate::modbus::register_map::RegisterMap::from_toml_str(
            "model = \"m\"\n\
             [[registers]]\nmetric = \"a\"\nkind = \"holding\"\naddress = 1\n\
             [[registers]]\nmetric = \"b\"\nkind = \"input\"\naddress = 2\n\
             [[registers]]\nmetric = \"c\"\nkind = \"coil\"\naddress = 3\n\
             [[registers]]\nmetric = \"d\"\nkind = \"discrete\"\naddress = 4\n",
            "<test>",
        )
        .unwrap();
        let requests: Vec<Request<'static>> = plan_reads(&map).iter().map(modbus_request).collect();
        assert_eq!(
            requests,
            [
                Request::ReadHoldingRegisters(1, 1),
                Request::ReadInputRegisters(2, 1),
                Request::ReadCoils(3, 1),
                Request::ReadDiscreteInputs(4, 1),
            ]
        );
    }

    #[test]
    fn time_is_utc_milliseconds() {
        // 2024-01-01T00:00:00Z; any clock this runs on is later.
        assert!(utc_now_ms() > 1_704_067_200_000);
    }
}
