//! Poller configuration: the serial line's settings and the devices on it, read from TOML and
//! validated (errors name the key and the reason).
//!
//! # Format
//!
//! ```toml
//! [port]
//! path = "/dev/ttyUSB0"
//! baud_rate = 9600                 # default 9600
//! parity = "none"                  # none | even | odd (default none)
//! data_bits = 8                    # 5..=8 (default 8)
//! stop_bits = 1                    # 1 | 2 (default 1)
//! request_timeout_ms = 1000        # per request, default 1000
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

/// Highest unit id a device may have (248..=255 are reserved, 0 is broadcast).
pub const MAX_UNIT_ID: u8 = 247;

/// Parity of the serial line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

fn default_baud_rate() -> u32 {
    9_600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
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

/// The serial line the poller owns.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialLineConfig {
    pub path: PathBuf,
    #[serde(default = "default_baud_rate")]
    pub baud_rate: u32,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
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

impl SerialLineConfig {
    /// A line at 9600 8N1 with the default timeouts.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            baud_rate: default_baud_rate(),
            parity: Parity::None,
            data_bits: default_data_bits(),
            stop_bits: default_stop_bits(),
            request_timeout_ms: default_request_timeout_ms(),
            reopen_backoff_initial_ms: default_reopen_backoff_initial_ms(),
            reopen_backoff_max_ms: default_reopen_backoff_max_ms(),
            garbled_response_retries: default_garbled_response_retries(),
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn reopen_backoff_initial(&self) -> Duration {
        Duration::from_millis(self.reopen_backoff_initial_ms)
    }

    pub fn reopen_backoff_max(&self) -> Duration {
        Duration::from_millis(self.reopen_backoff_max_ms)
    }

    fn validate(&self) -> Result<(), PollerConfigError> {
        let invalid = |key: &str, reason: String| PollerConfigError::Invalid {
            key: format!("port.{key}"),
            reason,
        };
        if self.path.as_os_str().is_empty() {
            return Err(invalid("path", "is empty".into()));
        }
        if self.baud_rate == 0 {
            return Err(invalid("baud_rate", "must be above 0".into()));
        }
        if !(5..=8).contains(&self.data_bits) {
            return Err(invalid(
                "data_bits",
                format!("{} is not 5, 6, 7 or 8", self.data_bits),
            ));
        }
        if !matches!(self.stop_bits, 1 | 2) {
            return Err(invalid(
                "stop_bits",
                format!("{} is not 1 or 2", self.stop_bits),
            ));
        }
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

/// One device on the line.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceConfig {
    pub id: DeviceId,
    /// The Modbus unit (slave) id, 1..=247.
    pub unit_id: u8,
    pub map: Arc<RegisterMap>,
}

/// Everything one poller needs: one line and its devices.
#[derive(Clone, Debug, PartialEq)]
pub struct PollerConfig {
    pub port: SerialLineConfig,
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
    #[error("poller config: {key}: {reason}")]
    Invalid { key: String, reason: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PollerConfigFile {
    port: SerialLineConfig,
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
        self.port.validate()?;
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
            devices,
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
    }

    #[test]
    fn the_example_config_loads_with_its_maps() {
        let config = PollerConfig::from_file(&examples_dir().join("modbus-poller.toml"))
            .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(config.devices.len(), 2);
        assert!(Arc::ptr_eq(&config.devices[0].map, &config.devices[1].map));
        assert_eq!(config.port.baud_rate, 9_600);
        assert_eq!(config.port.parity, Parity::Even);
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
        let device = |id: &str, unit_id: u32| {
            format!(
                "[[devices]]\nid = \"{id}\"\nunit_id = {unit_id}\nmap = \"register-maps/energy-meter.toml\"\n"
            )
        };
        let port = "[port]\npath = \"/dev/ttyUSB0\"\n";
        check(
            &format!("{port}{}", device("a", 0)),
            &["devices[0].unit_id", "1..=247"],
        );
        check(
            &format!("{port}{}", device("a", 248)),
            &["devices[0].unit_id"],
        );
        check(
            &format!("{port}{}{}", device("a", 1), device("b", 1)),
            &["devices[1].unit_id", "device a"],
        );
        check(
            &format!("{port}{}{}", device("a", 1), device("a", 2)),
            &["devices[1].id", "twice"],
        );
        check(
            &format!("{port}data_bits = 9\n{}", device("a", 1)),
            &["port.data_bits", "9"],
        );
        check(
            &format!("{port}stop_bits = 3\n{}", device("a", 1)),
            &["port.stop_bits"],
        );
        check(
            &format!("{port}baud = 9600\n{}", device("a", 1)),
            &["poller.toml", "baud"],
        );
        check(
            &format!("{port}[[devices]]\nid = \"a\"\nunit_id = 1\nmap = \"missing.toml\"\n"),
            &["devices[0].map", "missing.toml"],
        );
        check(&format!("devices = []\n{port}"), &["devices", "no device"]);
    }
}
