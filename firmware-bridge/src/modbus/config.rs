//! Poller configuration: the serial line's settings, how it is polled, and the devices on it,
//! read from TOML and validated (errors name the key and the reason).
//!
//! # Format
//!
//! ```toml
//! # The port, as every serial port is configured (crate::transport::SerialPortConfig).
//! [port]
//! path = "/dev/ttyUSB0"
//! baud_rate = 9600                 # required here: Modbus devices ship at 9600 or 19200
//! parity = "even"                  # none | even | odd (default none)
//! data_bits = 8                    # 5..=8 (default 8)
//! stop_bits = 1                    # 1 | 2 (default 1)
//!
//! [port.rs485]                     # optional: half-duplex RS-485 driven by the UART's RTS line
//! rts_on_send = true               # RTS level while sending (default true)
//! rts_after_send = false           # RTS level after sending (default false)
//! delay_before_send_ms = 0         # default 0
//! delay_after_send_ms = 0          # default 0
//!
//! [polling]                        # optional, every key has a default
//! request_timeout_ms = 1000        # per request, 1..=60000 (default 1000)
//! reopen_backoff_initial_ms = 500  # first wait before reopening a lost port (default 500)
//! reopen_backoff_max_ms = 30000    # the wait doubles up to this (default 30000)
//! garbled_response_retries = 1     # re-ask after a CRC or framing error (default 1)
//!
//! [[devices]]
//! id = "meter-07"                  # a valid device id, unique
//! unit_id = 7                      # 1..=247, unique on the line
//! map = "register-maps/energy-meter.toml"   # relative to this file's folder
//! ```

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fieldgate_shared::DeviceId;
use serde::Deserialize;

use super::register_map::{RegisterMap, RegisterMapError};
use crate::transport::{Backoff, SerialPortConfig, TransportError};

/// Highest unit id a device may have (248..=255 are reserved, 0 is broadcast).
pub const MAX_UNIT_ID: u8 = 247;

fn default_request_timeout_ms() -> u64 {
    1_000
}
fn default_reopen_backoff_initial_ms() -> u64 {
    500
}
fn default_reopen_backoff_max_ms() -> u64 {
    30_000
}
fn default_garbled_response_retries() -> u8 {
    1
}

/// How the poller uses its line: the Modbus-specific settings beside the port's.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollingConfig {
    /// How long to wait for each answer.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    #[serde(default = "default_reopen_backoff_initial_ms")]
    pub reopen_backoff_initial_ms: u64,
    #[serde(default = "default_reopen_backoff_max_ms")]
    pub reopen_backoff_max_ms: u64,
    /// How often a request is repeated after an answer arrived garbled (bad CRC, framing). A
    /// silent device is not re-asked: it would only double the time the bus is blocked.
    #[serde(default = "default_garbled_response_retries")]
    pub garbled_response_retries: u8,
}

impl Default for PollingConfig {
    fn default() -> Self {
        Self {
            request_timeout_ms: default_request_timeout_ms(),
            reopen_backoff_initial_ms: default_reopen_backoff_initial_ms(),
            reopen_backoff_max_ms: default_reopen_backoff_max_ms(),
            garbled_response_retries: default_garbled_response_retries(),
        }
    }
}

impl PollingConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// The waits before reopening a lost port.
    pub fn reopen_backoff(&self) -> Backoff {
        Backoff {
            initial: Duration::from_millis(self.reopen_backoff_initial_ms),
            max: Duration::from_millis(self.reopen_backoff_max_ms),
        }
    }

    fn validate(&self) -> Result<(), PollerConfigError> {
        let invalid = |key: &str, reason: String| PollerConfigError::Invalid {
            key: format!("polling.{key}"),
            reason,
        };
        if !(1..=60_000).contains(&self.request_timeout_ms) {
            return Err(invalid(
                "request_timeout_ms",
                format!("{} ms is outside 1..=60000 ms", self.request_timeout_ms),
            ));
        }
        if self.reopen_backoff_initial_ms == 0 {
            return Err(invalid(
                "reopen_backoff_initial_ms",
                "must be above 0, or a lost port is reopened in a busy loop".into(),
            ));
        }
        if self.reopen_backoff_max_ms < self.reopen_backoff_initial_ms {
            return Err(invalid(
                "reopen_backoff_max_ms",
                format!(
                    "{} ms is below reopen_backoff_initial_ms ({} ms)",
                    self.reopen_backoff_max_ms, self.reopen_backoff_initial_ms
                ),
            ));
        }
        Ok(())
    }
}

fn validate_port(port: &SerialPortConfig) -> Result<(), PollerConfigError> {
    if port.path.is_empty() {
        return Err(PollerConfigError::Invalid {
            key: "port.path".into(),
            reason: "is empty".into(),
        });
    }
    port.validate().map_err(|source| {
        let key = match &source {
            TransportError::BadSetting { setting, .. } => format!("port.{setting}"),
            _ => "port".into(),
        };
        PollerConfigError::Port { key, source }
    })
}

/// One device on the line.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceConfig {
    pub id: DeviceId,
    /// The Modbus unit (slave) id, 1..=247.
    pub unit_id: u8,
    pub map: Arc<RegisterMap>,
}

/// Everything one poller needs: one line, how to poll it, and its devices.
#[derive(Clone, Debug, PartialEq)]
pub struct PollerConfig {
    pub port: SerialPortConfig,
    pub polling: PollingConfig,
    pub devices: Vec<DeviceConfig>,
}

/// Why a poller configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum PollerConfigError {
    #[error("reading poller config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("poller config {origin}: {source}")]
    Parse {
        origin: String,
        source: Box<toml::de::Error>,
    },
    #[error("poller config: {key}: {source}")]
    Map {
        key: String,
        source: RegisterMapError,
    },
    #[error("poller config: {key}: {source}")]
    Port { key: String, source: TransportError },
    #[error("poller config: {key}: {reason}")]
    Invalid { key: String, reason: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PollerConfigFile {
    port: SerialPortConfig,
    #[serde(default)]
    polling: PollingConfig,
    devices: Vec<DeviceEntryFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceEntryFile {
    id: DeviceId,
    unit_id: u8,
    map: PathBuf,
}

impl PollerConfig {
    /// Checks what the types cannot: value ranges, unique ids, at least one device.
    pub fn validate(&self) -> Result<(), PollerConfigError> {
        validate_port(&self.port)?;
        self.polling.validate()?;
        if self.devices.is_empty() {
            return Err(PollerConfigError::Invalid {
                key: "devices".into(),
                reason: "lists no device".into(),
            });
        }
        let mut ids = HashSet::new();
        let mut unit_ids: HashMap<u8, &DeviceId> = HashMap::new();
        for (index, device) in self.devices.iter().enumerate() {
            let invalid = |key: &str, reason: String| PollerConfigError::Invalid {
                key: format!("devices[{index}].{key}"),
                reason,
            };
            if !(1..=MAX_UNIT_ID).contains(&device.unit_id) {
                return Err(invalid(
                    "unit_id",
                    format!(
                        "device {}: {} is outside 1..={MAX_UNIT_ID}",
                        device.id, device.unit_id
                    ),
                ));
            }
            if !ids.insert(&device.id) {
                return Err(invalid(
                    "id",
                    format!("device {} is listed twice", device.id),
                ));
            }
            if let Some(other) = unit_ids.insert(device.unit_id, &device.id) {
                return Err(invalid(
                    "unit_id",
                    format!(
                        "device {}: unit id {} is already device {other}'s",
                        device.id, device.unit_id
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Reads a poller config file and the register maps it names (relative paths are taken from
    /// the config file's folder; a map shared by several devices is read once).
    pub fn from_file(path: &Path) -> Result<Self, PollerConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| PollerConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let base_dir = path.parent().unwrap_or(Path::new("."));
        Self::from_toml_str(&text, &path.display().to_string(), base_dir)
    }

    /// Parses a poller config; map paths are relative to `base_dir`.
    pub fn from_toml_str(
        text: &str,
        origin: &str,
        base_dir: &Path,
    ) -> Result<Self, PollerConfigError> {
        let file: PollerConfigFile =
            toml::from_str(text).map_err(|source| PollerConfigError::Parse {
                origin: origin.to_owned(),
                source: Box::new(source),
            })?;
        // SerialPortConfig's default of 115200 baud suits the Fieldgate serial links, but Modbus
        // devices ship at 9600 or 19200, and a wrong rate only shows as every device timing out.
        if !names_baud_rate(text) {
            return Err(PollerConfigError::Invalid {
                key: "port.baud_rate".into(),
                reason: "is required for a Modbus line (devices usually use 9600 or 19200)".into(),
            });
        }
        let mut maps: HashMap<PathBuf, Arc<RegisterMap>> = HashMap::new();
        let mut devices = Vec::with_capacity(file.devices.len());
        for (index, entry) in file.devices.into_iter().enumerate() {
            let map_path = base_dir.join(&entry.map);
            let map = match maps.get(&map_path) {
                Some(map) => Arc::clone(map),
                None => {
                    let map = Arc::new(RegisterMap::from_file(&map_path).map_err(|source| {
                        PollerConfigError::Map {
                            key: format!("devices[{index}].map (device {})", entry.id),
                            source,
                        }
                    })?);
                    maps.insert(map_path, Arc::clone(&map));
                    map
                }
            };
            devices.push(DeviceConfig {
                id: entry.id,
                unit_id: entry.unit_id,
                map,
            });
        }
        let config = PollerConfig {
            port: file.port,
            polling: file.polling,
            devices,
        };
        config.validate()?;
        Ok(config)
    }
}

/// Whether the config text sets `port.baud_rate`; called once the text parsed as a config.
fn names_baud_rate(text: &str) -> bool {
    toml::from_str::<toml::Table>(text).is_ok_and(|table| {
        table
            .get("port")
            .and_then(|port| port.get("baud_rate"))
            .is_some()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Parity;

    fn examples_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
    }

    fn device(id: &str, unit_id: u32) -> String {
        format!(
            "[[devices]]\nid = \"{id}\"\nunit_id = {unit_id}\nmap = \"register-maps/energy-meter.toml\"\n"
        )
    }

    const PORT: &str = "[port]\npath = \"/dev/ttyUSB0\"\nbaud_rate = 19200\n";

    fn parse(text: &str) -> PollerConfig {
        PollerConfig::from_toml_str(text, "poller.toml", &examples_dir())
            .unwrap_or_else(|err| panic!("{err}\n{text}"))
    }

    #[test]
    fn the_example_config_loads_with_its_maps() {
        let config = PollerConfig::from_file(&examples_dir().join("modbus-poller.toml"))
            .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(config.devices.len(), 2);
        assert!(Arc::ptr_eq(&config.devices[0].map, &config.devices[1].map));
        assert_eq!(config.port.baud_rate, 9_600);
        assert_eq!(config.port.parity, Parity::Even);
        assert_eq!(config.polling.request_timeout(), Duration::from_millis(500));
    }

    #[test]
    fn polling_settings_default_when_the_table_is_absent() {
        let config = parse(&format!("{PORT}{}", device("a", 1)));
        assert_eq!(config.polling, PollingConfig::default());
        assert_eq!(config.polling.request_timeout(), Duration::from_secs(1));
        let backoff = config.polling.reopen_backoff();
        assert_eq!(
            (backoff.initial, backoff.max),
            (Duration::from_millis(500), Duration::from_secs(30))
        );
        assert_eq!(config.polling.garbled_response_retries, 1);
        assert_eq!(config.port.rs485, None);
        assert_eq!((config.port.data_bits, config.port.stop_bits), (8, 1));
    }

    #[test]
    fn rs485_and_polling_tables_are_read() {
        let config = parse(&format!(
            "{PORT}[port.rs485]\ndelay_after_send_ms = 2\n\
             [polling]\nrequest_timeout_ms = 250\ngarbled_response_retries = 0\n{}",
            device("a", 1)
        ));
        let rs485 = config.port.rs485.expect("rs485 is set");
        assert!(rs485.rts_on_send && !rs485.rts_after_send);
        assert_eq!(rs485.delay_after_send_ms, 2);
        assert_eq!(config.polling.request_timeout_ms, 250);
        assert_eq!(config.polling.garbled_response_retries, 0);
        assert_eq!(config.polling.reopen_backoff_initial_ms, 500);
    }

    #[test]
    fn refusals_name_the_key() {
        let check = |text: &str, expected_parts: &[&str]| {
            let message = PollerConfig::from_toml_str(text, "poller.toml", &examples_dir())
                .expect_err(text)
                .to_string();
            for part in expected_parts {
                assert!(message.contains(part), "{message:?} lacks {part:?}");
            }
        };
        let one_device = device("a", 1);
        check(
            &format!("{PORT}{}", device("a", 0)),
            &["devices[0].unit_id", "1..=247"],
        );
        check(
            &format!("{PORT}{}", device("a", 248)),
            &["devices[0].unit_id"],
        );
        check(
            &format!("{PORT}{}{}", device("a", 1), device("b", 1)),
            &["devices[1].unit_id", "device a"],
        );
        check(
            &format!("{PORT}{}{}", device("a", 1), device("a", 2)),
            &["devices[1].id", "twice"],
        );
        check(
            &format!("{PORT}data_bits = 9\n{one_device}"),
            &["port.data_bits", "9", "5, 6, 7 or 8"],
        );
        check(
            &format!("{PORT}stop_bits = 3\n{one_device}"),
            &["port.stop_bits", "1 or 2"],
        );
        check(
            &format!("[port]\npath = \"/dev/ttyUSB0\"\nbaud_rate = 0\n{one_device}"),
            &["port.baud_rate", "0"],
        );
        check(
            &format!("[port]\npath = \"/dev/ttyUSB0\"\n{one_device}"),
            &["port.baud_rate", "required", "9600"],
        );
        check(
            &format!("[port]\npath = \"\"\nbaud_rate = 9600\n{one_device}"),
            &["port.path", "empty"],
        );
        check(
            &format!("{PORT}baud = 9600\n{one_device}"),
            &["poller.toml", "baud"],
        );
        check(
            &format!("{PORT}[port.rs485]\nrts_on_sent = true\n{one_device}"),
            &["poller.toml", "rts_on_sent"],
        );
        // The settings that were in `[port]` before it became a `SerialPortConfig`.
        check(
            &format!("{PORT}request_timeout_ms = 500\n{one_device}"),
            &["poller.toml", "request_timeout_ms"],
        );
        check(
            &format!("{PORT}[polling]\nrequest_timeout = 500\n{one_device}"),
            &["poller.toml", "request_timeout"],
        );
        check(
            &format!("{PORT}[polling]\nrequest_timeout_ms = 0\n{one_device}"),
            &["polling.request_timeout_ms", "1..=60000"],
        );
        check(
            &format!("{PORT}[polling]\nreopen_backoff_initial_ms = 0\n{one_device}"),
            &["polling.reopen_backoff_initial_ms"],
        );
        check(
            &format!("{PORT}[polling]\nreopen_backoff_max_ms = 100\n{one_device}"),
            &["polling.reopen_backoff_max_ms", "below"],
        );
        check(
            &format!("{PORT}[[devices]]\nid = \"a\"\nunit_id = 1\nmap = \"missing.toml\"\n"),
            &["devices[0].map", "missing.toml"],
        );
        check(&format!("devices = []\n{PORT}"), &["devices", "no device"]);
    }
}
