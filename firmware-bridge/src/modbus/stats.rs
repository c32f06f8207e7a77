//! The poller's counters: per device and for the port, bumped together with the log line of the
//! event that bumps them (so logs and counters never disagree), readable as a snapshot at any
//! time through a [`PollerStats`] handle.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use fieldgate_shared::DeviceId;
use tracing::{debug, info, warn};

use super::read_plan::ReadRequest;

/// Counters of one device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    /// Read requests sent (a retry counts again).
    pub polls: u64,
    /// Requests answered with data that decoded.
    pub successful_polls: u64,
    /// Readings decoded from answers and passed on to the readings channel.
    pub readings: u64,
    /// Requests that got no byte of answer in time.
    pub timeouts: u64,
    /// Answers that arrived but did not decode: bad CRC, truncated, wrong unit or function,
    /// wrong length for the request.
    pub crc_or_framing_errors: u64,
    /// Modbus exception answers, by exception code.
    pub exceptions_by_code: BTreeMap<u8, u64>,
    /// Requests that failed on a port error (the port is then reopened).
    pub io_errors: u64,
    /// Bytes dropped before the first byte of an answer.
    pub stray_bytes_discarded: u64,
    /// Bytes pending before a request was sent (late answers, noise), dropped.
    pub stale_bytes_discarded: u64,
}

impl DeviceCounters {
    /// All exceptions, whatever their code.
    pub fn exceptions(&self) -> u64 {
        self.exceptions_by_code.values().sum()
    }
}

/// Counters of the serial port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortCounters {
    pub opens: u64,
    pub open_failures: u64,
    /// Times a working port failed and was closed to be reopened.
    pub losses: u64,
}

/// A copy of all counters at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PollerSnapshot {
    pub port: PortCounters,
    pub devices: BTreeMap<DeviceId, DeviceCounters>,
}

impl PollerSnapshot {
    /// The counters of `device`, zero if it is unknown.
    pub fn device(&self, device: &DeviceId) -> DeviceCounters {
        self.devices.get(device).cloned().unwrap_or_default()
    }
}

/// What happened to one request; [`PollerStats::record`] logs it and bumps its counter.
#[derive(Debug)]
pub(crate) enum PollEvent<'a> {
    Sent,
    Answered { n_readings: usize },
    Timeout,
    Garbled { reason: &'a str },
    Exception { code: u8 },
    IoError { error: &'a std::io::Error },
}

/// A clonable handle on the poller's counters.
#[derive(Clone, Debug, Default)]
pub struct PollerStats {
    inner: Arc<Mutex<PollerSnapshot>>,
}

impl PollerStats {
    pub(crate) fn new(devices: impl IntoIterator<Item = DeviceId>) -> Self {
        let snapshot = PollerSnapshot {
            port: PortCounters::default(),
            devices: devices
                .into_iter()
                .map(|device| (device, DeviceCounters::default()))
                .collect(),
        };
        Self {
            inner: Arc::new(Mutex::new(snapshot)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PollerSnapshot> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of all counters now.
    pub fn snapshot(&self) -> PollerSnapshot {
        self.lock().clone()
    }

    pub(crate) fn record(
        &self,
        device: &DeviceId,
        unit_id: u8,
        request: &ReadRequest,
        event: PollEvent<'_>,
    ) {
        let (table, address, count) = (request.kind, request.start_address, request.count);
        match &event {
            PollEvent::Sent | PollEvent::Answered { .. } => {}
            PollEvent::Timeout => debug!(
                device = %device, unit_id, %table, address, count,
                "Modbus request timed out"
            ),
            PollEvent::Garbled { reason } => warn!(
                device = %device, unit_id, %table, address, count, reason,
                "Modbus answer did not decode"
            ),
            PollEvent::Exception { code } => warn!(
                device = %device, unit_id, %table, address, count, exception_code = code,
                "Modbus device answered with an exception"
            ),
            PollEvent::IoError { error } => warn!(
                device = %device, unit_id, error = %error,
                "Serial port failed during a Modbus request"
            ),
        }
        let mut snapshot = self.lock();
        let counters = snapshot.devices.entry(device.clone()).or_default();
        match event {
            PollEvent::Sent => counters.polls += 1,
            PollEvent::Answered { n_readings } => {
                counters.successful_polls += 1;
                counters.readings += n_readings as u64;
            }
            PollEvent::Timeout => counters.timeouts += 1,
            PollEvent::Garbled { .. } => counters.crc_or_framing_errors += 1,
            PollEvent::Exception { code } => {
                *counters.exceptions_by_code.entry(code).or_default() += 1
            }
            PollEvent::IoError { .. } => counters.io_errors += 1,
        }
    }

    pub(crate) fn record_discarded_bytes(&self, device: &DeviceId, stray: u64, stale: u64) {
        if stray == 0 && stale == 0 {
            return;
        }
        debug!(device = %device, stray, stale, "Discarded bytes on the Modbus line");
        let mut snapshot = self.lock();
        let counters = snapshot.devices.entry(device.clone()).or_default();
        counters.stray_bytes_discarded += stray;
        counters.stale_bytes_discarded += stale;
    }

    pub(crate) fn record_port_opened(&self, path: &str) {
        info!(path, "Opened Modbus serial port");
        self.lock().port.opens += 1;
    }

    pub(crate) fn record_port_open_failed(&self, path: &str, error: &dyn std::fmt::Display) {
        warn!(path, error = %error, "Could not open Modbus serial port");
        self.lock().port.open_failures += 1;
    }

    pub(crate) fn record_port_lost(&self, path: &str) {
        warn!(path, "Lost Modbus serial port; reopening it");
        self.lock().port.losses += 1;
    }
}
