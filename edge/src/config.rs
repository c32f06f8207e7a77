//! The agent's configuration: one TOML file (see `edge/fieldgate-edge.example.toml`), every
//! table with `deny_unknown_fields` so a typo is an error naming the key, and environment
//! overrides for what should not sit in a file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fieldgate_firmware_bridge::modbus::PollerConfig;
use fieldgate_firmware_bridge::transport::SerialPortConfig;
use fieldgate_shared::GatewayId;
use serde::Deserialize;

use crate::journal::OverflowPolicy;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub journal: JournalSettings,
    #[serde(default)]
    pub http: HttpConfig,
    /// Serial ports with devices speaking the Fieldgate serial protocol, one device per port.
    #[serde(default)]
    pub serial: Vec<SerialPortConfig>,
    /// Modbus RTU lines: each a poller config file (its `[port]`, `[polling]` and `[[devices]]`
    /// with register maps; see `firmware-bridge/examples/modbus-poller.toml`), relative to this
    /// file's folder.
    #[serde(default)]
    pub modbus: Vec<PathBuf>,
    /// The Modbus pollers, loaded from `modbus` when the file is loaded.
    #[serde(skip)]
    pub modbus_pollers: Vec<PollerConfig>,
    /// The local MQTT listener for devices (see `edge/src/ingress/mqtt`): absent, no MQTT.
    #[serde(default)]
    pub mqtt: Option<crate::ingress::mqtt::MqttIngressConfig>,
    /// The cleaning pipeline between ingress and the journal (see `edge/clean-example.toml`).
    #[serde(default)]
    pub clean: crate::clean::CleanConfig,
    /// The cloud targets: each has a journal cursor and, with endpoints, an uplink.
    #[serde(default = "default_targets")]
    pub targets: Vec<TargetConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub id: GatewayId,
    /// Where the journal and the agent's state live. `FIELDGATE_DATA_DIR` overrides it.
    pub data_dir: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalSettings {
    /// Disk the journal may use, in MiB (fractions allowed).
    #[serde(default = "default_quota_mb")]
    pub quota_mb: f64,
    #[serde(default = "default_overflow")]
    pub overflow: OverflowPolicy,
    /// Group commit: how long an idle writer lets a first message wait for others before it
    /// flushes (0: at once). Under load groups gather while the previous flush runs anyway.
    /// (`flush_interval_ms` is its old name.)
    #[serde(default, alias = "flush_interval_ms")]
    pub flush_linger_ms: u64,
    /// Group commit: a flush happens as soon as this many readings wait.
    #[serde(default = "default_flush_max_readings")]
    pub flush_max_readings: usize,
    #[serde(default = "default_compaction_slack_mb")]
    pub compaction_slack_mb: u64,
}

impl Default for JournalSettings {
    fn default() -> Self {
        Self {
            quota_mb: default_quota_mb(),
            overflow: default_overflow(),
            flush_linger_ms: 0,
            flush_max_readings: default_flush_max_readings(),
            compaction_slack_mb: default_compaction_slack_mb(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// The local status API. Loopback by default: it has no authentication.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_http_listen(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: String,
    /// The cloud's base URLs (`https://host:port`), tried in order; empty: the journal keeps
    /// the target's cursor but nothing is sent (see `edge/src/uplink.rs`).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The CA that signed the cloud's server certificate (PEM), relative to the data directory
    /// when not absolute.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The stream name in the cloud (default: the target's name).
    #[serde(default)]
    pub stream: Option<String>,
    /// Which readings go to this target: any rule matching (device and metric globs, `*` and
    /// `?`). No rules: everything.
    #[serde(default)]
    pub include: Vec<RouteRule>,
    /// First-start enrollment: the token and site from the gateway's provisioning.
    #[serde(default)]
    pub enrollment: Option<EnrollmentConfig>,
    /// Batching: send when this many readings, this many encoded bytes, or this old.
    #[serde(default = "default_batch_readings")]
    pub batch_max_readings: usize,
    #[serde(default = "default_batch_bytes")]
    pub batch_max_bytes: usize,
    #[serde(default = "default_batch_age_ms")]
    pub batch_max_age_ms: u64,
    /// Batches sent before the first is acknowledged (committed in order).
    #[serde(default = "default_in_flight")]
    pub in_flight: usize,
    /// A request without an answer this long is abandoned (a half-open connection) and resent.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// What the target receives: raw readings (absent), or windowed aggregates.
    #[serde(default)]
    pub aggregate: Option<AggregateForm>,
}

/// Windowed aggregates instead of raw readings: per device, numeric metric and window, the
/// readings `<metric>.min`, `.max`, `.sum`, `.count` and `.mean`, stamped with the window's
/// start. A window whose readings fall in two batches is sent as two partial aggregates with the
/// same stamp (min, max, sum and count merge exactly; mean is the batch's own).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateForm {
    pub window_s: u64,
}

fn default_request_timeout_ms() -> u64 {
    30_000
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    #[serde(default = "star")]
    pub devices: String,
    #[serde(default = "star")]
    pub metrics: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentConfig {
    /// The one-time enrollment token; or `token_file` to read it from (relative to the data
    /// directory when not absolute).
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    pub site_id: String,
    /// The gateway's name in the cloud (default: the gateway id).
    #[serde(default)]
    pub name: Option<String>,
}

fn star() -> String {
    "*".into()
}

fn default_batch_readings() -> usize {
    5_000
}

fn default_batch_bytes() -> usize {
    1 << 20
}

fn default_batch_age_ms() -> u64 {
    200
}

fn default_in_flight() -> usize {
    4
}

fn default_quota_mb() -> f64 {
    512.0
}
fn default_overflow() -> OverflowPolicy {
    OverflowPolicy::DropOldest
}
fn default_flush_max_readings() -> usize {
    20_000
}
fn default_compaction_slack_mb() -> u64 {
    8
}
fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7780))
}
fn default_targets() -> Vec<TargetConfig> {
    vec![TargetConfig {
        name: "cloud".into(),
        endpoints: Vec::new(),
        ca: None,
        stream: None,
        include: Vec::new(),
        enrollment: None,
        batch_max_readings: default_batch_readings(),
        batch_max_bytes: default_batch_bytes(),
        batch_max_age_ms: default_batch_age_ms(),
        in_flight: default_in_flight(),
        request_timeout_ms: default_request_timeout_ms(),
        aggregate: None,
    }]
}

/// A configuration that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

impl EdgeConfig {
    pub fn load(path: &Path) -> Result<EdgeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        if let Some(dir) = std::env::var_os("FIELDGATE_DATA_DIR") {
            config.gateway.data_dir = PathBuf::from(dir);
        }
        Ok(config)
    }

    /// Parses and validates; `path` names the file in errors, and Modbus poller files are
    /// read relative to its folder.
    pub fn parse(text: &str, path: &Path) -> Result<EdgeConfig, ConfigError> {
        let mut config: EdgeConfig = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.to_owned(),
            message: err.to_string(),
        })?;
        let base_dir = path.parent().unwrap_or(Path::new("."));
        for (i, file) in config.modbus.iter().enumerate() {
            let poller = PollerConfig::from_file(&base_dir.join(file)).map_err(|err| {
                ConfigError::Invalid {
                    path: path.to_owned(),
                    key: format!("modbus[{i}]"),
                    reason: err.to_string(),
                }
            })?;
            config.modbus_pollers.push(poller);
        }
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            reason,
        };
        // Written so that NaN is refused too.
        if self.journal.quota_mb.is_nan() || self.journal.quota_mb < 0.01 {
            return Err(invalid(
                "journal.quota_mb".into(),
                "must be at least 0.01 (MiB)".into(),
            ));
        }
        if self.journal.flush_linger_ms > 10_000 {
            return Err(invalid(
                "journal.flush_linger_ms".into(),
                "must be 0 to 10000 (it adds to how long devices wait for their ACK)".into(),
            ));
        }
        if self.journal.flush_max_readings == 0 {
            return Err(invalid(
                "journal.flush_max_readings".into(),
                "must be at least 1".into(),
            ));
        }
        if self.targets.is_empty() {
            return Err(invalid(
                "targets".into(),
                "at least one target is needed".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, target) in self.targets.iter().enumerate() {
            if !names.insert(&target.name) {
                return Err(invalid(
                    format!("targets[{i}].name"),
                    format!("{:?} appears twice", target.name),
                ));
            }
            for endpoint in &target.endpoints {
                if !endpoint.starts_with("https://") {
                    return Err(invalid(
                        format!("targets[{i}].endpoints"),
                        format!("{endpoint:?}: the uplink speaks HTTPS only"),
                    ));
                }
            }
            if !target.endpoints.is_empty() && target.ca.is_none() {
                return Err(invalid(
                    format!("targets[{i}].ca"),
                    "a target with endpoints needs the CA of the cloud's certificate".into(),
                ));
            }
            if target.batch_max_readings == 0 || target.in_flight == 0 {
                return Err(invalid(
                    format!("targets[{i}]"),
                    "batch_max_readings and in_flight must be at least 1".into(),
                ));
            }
            if target.aggregate.as_ref().is_some_and(|a| a.window_s == 0) {
                return Err(invalid(
                    format!("targets[{i}].aggregate.window_s"),
                    "a window is at least 1 second".into(),
                ));
            }
            if let Some(stream) = &target.stream {
                fieldgate_shared::model::StreamId::new(stream)
                    .map_err(|e| invalid(format!("targets[{i}].stream"), e.to_string()))?;
            }
            if let Some(enrollment) = &target.enrollment {
                if enrollment.token.is_some() == enrollment.token_file.is_some() {
                    return Err(invalid(
                        format!("targets[{i}].enrollment"),
                        "give exactly one of token and token_file".into(),
                    ));
                }
            }
        }
        crate::clean::Pipeline::new(&self.clean)
            .map_err(|err| invalid(err.key.clone(), err.reason.clone()))?;
        for (i, port) in self.serial.iter().enumerate() {
            port.validate()
                .map_err(|err| invalid(format!("serial[{i}]"), err.to_string()))?;
        }
        for (i, line) in self.modbus_pollers.iter().enumerate() {
            line.validate()
                .map_err(|err| invalid(format!("modbus[{i}]"), err.to_string()))?;
        }
        Ok(())
    }

    pub fn journal_path(&self) -> PathBuf {
        self.gateway.data_dir.join("journal")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<EdgeConfig, String> {
        EdgeConfig::parse(text, Path::new("edge.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fieldgate-edge.example.toml");
        let config = EdgeConfig::load(&path).unwrap();
        assert_eq!(config.gateway.id.as_str(), "gw-plant-1");
        assert!(!config.serial.is_empty());
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let config = parse("[gateway]\nid = \"gw-1\"\ndata_dir = \"/tmp/x\"\n").unwrap();
        assert_eq!(config.journal.quota_mb, 512.0);
        assert_eq!(config.http.listen.to_string(), "127.0.0.1:7780");
        assert_eq!(config.targets.len(), 1);
    }

    #[test]
    fn errors_name_the_key() {
        let check = |text: &str, expected: &str| {
            let err = parse(text).unwrap_err();
            assert!(err.contains(expected), "{err} lacks {expected}");
        };
        let gateway = "[gateway]\nid = \"gw-1\"\ndata_dir = \"/tmp/x\"\n";
        check(
            &format!("{gateway}[journal]\nquota = 5\n"),
            "unknown field `quota`",
        );
        check(
            "[gateway]\nid = \"gw 1\"\ndata_dir = \"/x\"\n",
            "gateway name",
        );
        check(
            &format!("{gateway}[journal]\nflush_interval_ms = 20000\n"),
            "journal.flush_linger_ms",
        );
        check(
            &format!("{gateway}[[serial]]\npath = \"/dev/x\"\ndata_bits = 9\n"),
            "serial[0]",
        );
        check(
            &format!("{gateway}[[targets]]\nname = \"a\"\n[[targets]]\nname = \"a\"\n"),
            "targets[1].name",
        );
        check(
            &format!("{gateway}[journal]\noverflow = \"explode\"\n"),
            "overflow",
        );
    }
}
