//! Serial ports: opening one from its configuration (baud rate, framing, RS-485), and keeping a
//! device session running on it across unplugged USB adapters and other link failures.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio_serial::{SerialPortBuilderExt, SerialStream};

use crate::session::{
    DeliveryMemory, DeviceBatch, Session, SessionConfig, SessionError, SessionRequest, SessionStats,
};

/// One serial port, as written in the edge's configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SerialPortConfig {
    /// `/dev/ttyUSB0`, `/dev/ttyAMA1`, or a pseudo-terminal in tests.
    pub path: String,
    #[serde(default = "default_baud_rate")]
    pub baud_rate: u32,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Half-duplex RS-485 driven by the UART's RTS line; absent for RS-232 and USB adapters that
    /// switch direction themselves.
    #[serde(default)]
    pub rs485: Option<Rs485Config>,
}

impl SerialPortConfig {
    /// A port at the defaults: 115200 baud, 8N1, no RS-485.
    pub fn new(path: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            baud_rate: default_baud_rate(),
            data_bits: default_data_bits(),
            parity: Parity::default(),
            stop_bits: default_stop_bits(),
            rs485: None,
        }
    }

    /// Checks the settings [`open_port`] refuses, without opening the port, so that a
    /// configuration can be refused when it is loaded rather than at every reopening.
    pub fn validate(&self) -> Result<(), TransportError> {
        let bad = |setting, value, allowed| TransportError::BadSetting {
            path: self.path.clone(),
            setting,
            value,
            allowed,
        };
        if !(5..=8).contains(&self.data_bits) {
            return Err(bad("data_bits", self.data_bits as u32, "5, 6, 7 or 8"));
        }
        if !matches!(self.stop_bits, 1 | 2) {
            return Err(bad("stop_bits", self.stop_bits as u32, "1 or 2"));
        }
        if self.baud_rate == 0 {
            return Err(bad(
                "baud_rate",
                0,
                "a positive rate such as 9600 or 115200",
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rs485Config {
    /// RTS level while sending (true: high).
    #[serde(default = "default_true")]
    pub rts_on_send: bool,
    /// RTS level after sending.
    #[serde(default)]
    pub rts_after_send: bool,
    #[serde(default)]
    pub delay_before_send_ms: u32,
    #[serde(default)]
    pub delay_after_send_ms: u32,
}

fn default_baud_rate() -> u32 {
    115_200
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_true() -> bool {
    true
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("serial port {path}: {setting} {value} is not supported (use {allowed})")]
    BadSetting {
        path: String,
        setting: &'static str,
        value: u32,
        allowed: &'static str,
    },
    #[error("cannot open serial port {path}: {source}")]
    Open {
        path: String,
        source: tokio_serial::Error,
    },
    #[error("cannot enable RS-485 on {path} (is it an RS-485 capable UART?): {source}")]
    Rs485 {
        path: String,
        source: std::io::Error,
    },
}

/// Opens and configures a port.
pub fn open_port(config: &SerialPortConfig) -> Result<SerialStream, TransportError> {
    config.validate()?;
    let data_bits = match config.data_bits {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    };
    let stop_bits = match config.stop_bits {
        2 => tokio_serial::StopBits::Two,
        _ => tokio_serial::StopBits::One,
    };
    let parity = match config.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    };
    let port = tokio_serial::new(&config.path, config.baud_rate)
        .data_bits(data_bits)
        .stop_bits(stop_bits)
        .parity(parity)
        .flow_control(tokio_serial::FlowControl::None)
        .open_native_async()
        .map_err(|source| TransportError::Open {
            path: config.path.clone(),
            source,
        })?;
    if let Some(rs485) = &config.rs485 {
        enable_rs485(&port, rs485).map_err(|source| TransportError::Rs485 {
            path: config.path.clone(),
            source,
        })?;
    }
    Ok(port)
}

/// Linux's `struct serial_rs485` (include/uapi/linux/serial.h).
#[repr(C)]
struct SerialRs485 {
    flags: u32,
    delay_rts_before_send: u32,
    delay_rts_after_send: u32,
    padding: [u32; 5],
}

const SER_RS485_ENABLED: u32 = 1 << 0;
const SER_RS485_RTS_ON_SEND: u32 = 1 << 1;
const SER_RS485_RTS_AFTER_SEND: u32 = 1 << 2;
const TIOCSRS485: libc::c_ulong = 0x542f;

fn enable_rs485(port: &SerialStream, config: &Rs485Config) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut flags = SER_RS485_ENABLED;
    if config.rts_on_send {
        flags |= SER_RS485_RTS_ON_SEND;
    }
    if config.rts_after_send {
        flags |= SER_RS485_RTS_AFTER_SEND;
    }
    let settings = SerialRs485 {
        flags,
        delay_rts_before_send: config.delay_before_send_ms,
        delay_rts_after_send: config.delay_after_send_ms,
        padding: [0; 5],
    };
    // SAFETY: TIOCSRS485 reads one `struct serial_rs485` from the pointer, which outlives the
    // call; the descriptor belongs to `port`, which is open.
    let rc = unsafe {
        libc::ioctl(
            port.as_raw_fd(),
            TIOCSRS485 as _,
            &settings as *const SerialRs485,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reconnection delays: from `initial`, doubling up to `max`.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

/// Counters of a supervised link.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub session: Arc<SessionStats>,
    pub opens: std::sync::atomic::AtomicU64,
    pub open_failures: std::sync::atomic::AtomicU64,
    pub link_failures: std::sync::atomic::AtomicU64,
}

/// Keeps a device session running on the port until `shutdown` turns true: opens the port,
/// runs a session, and when the port cannot be opened or the link fails (an unplugged USB
/// adapter), waits with backoff and opens it again. Requests survive across sessions.
pub async fn run_serial_link(
    port: SerialPortConfig,
    session: SessionConfig,
    backoff: Backoff,
    batches: mpsc::Sender<DeviceBatch>,
    mut requests: mpsc::Receiver<SessionRequest>,
    stats: Arc<LinkStats>,
    shutdown: watch::Receiver<bool>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut delay = backoff.initial;
    let delivered = Arc::new(DeliveryMemory::default());
    while !*shutdown.borrow() {
        match open_port(&port) {
            Ok(stream) => {
                stats.opens.fetch_add(1, Relaxed);
                tracing::info!(port = %port.path, "serial port open");
                let result = Session::new(stream, session.clone(), stats.session.clone())
                    .remembering(delivered.clone())
                    .run(&batches, &mut requests, stopped(shutdown.clone()))
                    .await;
                match result {
                    Ok(()) => return,
                    Err(SessionError::Closed | SessionError::Link(_)) => {
                        stats.link_failures.fetch_add(1, Relaxed);
                        tracing::warn!(port = %port.path, "serial link lost; reopening");
                        delay = backoff.initial;
                    }
                    Err(err) => tracing::warn!(port = %port.path, error = %err, "session ended"),
                }
            }
            Err(err) => {
                stats.open_failures.fetch_add(1, Relaxed);
                tracing::warn!(error = %err, retry_in = ?delay, "serial port unavailable");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(shutdown.clone()) => return,
        }
        delay = (delay * 2).min(backoff.max);
    }
}

/// Resolves once the stop flag turns true (or its sender is gone): the shutdown future the
/// agent's tasks share.
pub async fn stopped(mut flag: watch::Receiver<bool>) {
    let _ = flag.wait_for(|&stop| stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_typos() {
        let config: SerialPortConfig = toml::from_str("path = \"/dev/ttyUSB0\"").unwrap();
        assert_eq!(config.baud_rate, 115_200);
        assert_eq!(
            (config.data_bits, config.stop_bits, config.parity),
            (8, 1, Parity::None)
        );
        let err = toml::from_str::<SerialPortConfig>("path = \"/dev/x\"\nbaud = 9600").unwrap_err();
        assert!(err.to_string().contains("unknown field `baud`"), "{err}");
        let rs485: SerialPortConfig = toml::from_str(
            "path = \"/dev/x\"\nparity = \"even\"\n[rs485]\ndelay_after_send_ms = 2",
        )
        .unwrap();
        assert!(rs485.rs485.unwrap().rts_on_send);
    }

    #[test]
    fn bad_settings_are_named() {
        let config = SerialPortConfig {
            path: "/dev/null".into(),
            baud_rate: 9600,
            data_bits: 9,
            parity: Parity::None,
            stop_bits: 1,
            rs485: None,
        };
        let err = open_port(&config).unwrap_err().to_string();
        assert!(
            err.contains("data_bits 9") && err.contains("5, 6, 7 or 8"),
            "{err}"
        );
    }

    #[test]
    fn validate_refuses_what_open_port_refuses() {
        let check = |config: SerialPortConfig, expected: Option<&str>| {
            let validated = config.validate().err().map(|err| err.to_string());
            let opened = match open_port(&config) {
                Err(err @ TransportError::BadSetting { .. }) => Some(err.to_string()),
                _ => None,
            };
            assert_eq!(validated, opened, "{config:?}");
            match (validated, expected) {
                (Some(message), Some(part)) => assert!(message.contains(part), "{message}"),
                (None, None) => {}
                (validated, _) => panic!("{config:?}: {validated:?}, expected {expected:?}"),
            }
        };
        let port = || SerialPortConfig::new("/dev/null");
        check(port(), None);
        check(
            SerialPortConfig {
                data_bits: 4,
                ..port()
            },
            Some("data_bits 4"),
        );
        check(
            SerialPortConfig {
                data_bits: 5,
                ..port()
            },
            None,
        );
        check(
            SerialPortConfig {
                stop_bits: 0,
                ..port()
            },
            Some("stop_bits 0"),
        );
        check(
            SerialPortConfig {
                stop_bits: 2,
                ..port()
            },
            None,
        );
        check(
            SerialPortConfig {
                baud_rate: 0,
                ..port()
            },
            Some("baud_rate 0"),
        );
    }
}
