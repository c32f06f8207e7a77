//! The MQTT ingress configuration, device credentials and their argon2id password hashes.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHashString, SaltString};
use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use fieldgate_shared::DeviceId;
use serde::Deserialize;

use super::topics::valid_root;

/// The `[mqtt]` section of the agent's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttIngressConfig {
    /// Where devices connect; at least one.
    pub listeners: Vec<ListenerConfig>,
    /// Devices allowed to connect, each with its own credentials.
    #[serde(default)]
    pub devices: Vec<DeviceCredentials>,
    /// First topic level of every device topic: devices publish under `<root>/<id>/`.
    #[serde(default = "default_topic_root")]
    pub topic_root: String,
    /// Largest MQTT packet a device may send, in bytes (a PUBLISH's payload is this minus its
    /// topic and header). Advertised to MQTT 5 clients.
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: usize,
    /// QoS 1 messages of one connection waiting for their durable commit; past this the
    /// connection is not read until commits come back. Advertised to MQTT 5 clients as Receive
    /// Maximum.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Open device connections, authenticated or not; connections past this are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time a new connection has to finish TLS and send its CONNECT.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Password verifications running at once, so at most this many cores (each takes tens of
    /// milliseconds of one core by design); further CONNECTs wait their turn. The default
    /// leaves the other core of a small gateway to the data even under a password-guessing
    /// flood.
    #[serde(default = "default_max_concurrent_auth")]
    pub max_concurrent_auth: usize,
    /// On shutdown, how long connections wait for outstanding durable commits so their
    /// messages can still be acknowledged.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
}

fn default_topic_root() -> String {
    "devices".to_owned()
}
fn default_max_packet_bytes() -> usize {
    64 * 1024
}
fn default_max_inflight() -> u16 {
    64
}
fn default_max_connections() -> usize {
    1024
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_max_concurrent_auth() -> usize {
    1
}
fn default_shutdown_grace_ms() -> u64 {
    5_000
}

/// One listening socket.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `0.0.0.0:1883`, `[::]:8883`; port 0 picks a free port (see `MqttIngress::local_addrs`).
    pub address: SocketAddr,
    /// TLS with a certificate chain and key in PEM files; plain TCP without.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The server certificate chain, leaf first (PEM).
    pub cert_path: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_path: PathBuf,
}

/// A device's credentials: it connects with user name = client id = `id`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceCredentials {
    pub id: DeviceId,
    /// An argon2id PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`), as
    /// [`hash_password`] writes it. Never the password itself.
    pub password_hash: String,
}

impl fmt::Debug for DeviceCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceCredentials")
            .field("id", &self.id)
            .field("password_hash", &"<redacted>")
            .finish()
    }
}

/// What is wrong with an MQTT ingress configuration; each names the key to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("mqtt.listeners is empty: give at least one listener address")]
    NoListeners,
    #[error("mqtt.devices: device {0:?} appears twice")]
    DuplicateDevice(DeviceId),
    #[error(
        "mqtt.devices: device {device:?}: password_hash is not an argon2id PHC string: {reason}"
    )]
    BadPasswordHash { device: DeviceId, reason: String },
    #[error(
        "mqtt.topic_root {0:?} must be a topic without wildcards, empty levels or a leading $"
    )]
    BadTopicRoot(String),
    #[error("mqtt.{key} = {value} is out of range ({range})")]
    OutOfRange {
        key: &'static str,
        value: u64,
        range: &'static str,
    },
}

impl MqttIngressConfig {
    /// Checks what serde cannot: ranges, duplicate devices and the password hashes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(ConfigError::NoListeners);
        }
        if !valid_root(&self.topic_root) {
            return Err(ConfigError::BadTopicRoot(self.topic_root.clone()));
        }
        let check = |key, value: u64, ok: bool, range| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::OutOfRange { key, value, range })
            }
        };
        check(
            "max_packet_bytes",
            self.max_packet_bytes as u64,
            (256..=MAX_PACKET_BYTES_LIMIT).contains(&self.max_packet_bytes),
            "256 to 268435455",
        )?;
        check(
            "max_inflight",
            u64::from(self.max_inflight),
            self.max_inflight >= 1,
            "1 to 65535",
        )?;
        check(
            "max_connections",
            self.max_connections as u64,
            self.max_connections >= 1,
            "at least 1",
        )?;
        check(
            "max_concurrent_auth",
            self.max_concurrent_auth as u64,
            self.max_concurrent_auth >= 1,
            "at least 1",
        )?;
        let mut seen = HashSet::new();
        for device in &self.devices {
            if !seen.insert(&device.id) {
                return Err(ConfigError::DuplicateDevice(device.id.clone()));
            }
            parse_password_hash(&device.password_hash).map_err(|reason| {
                ConfigError::BadPasswordHash {
                    device: device.id.clone(),
                    reason,
                }
            })?;
        }
        Ok(())
    }
}

/// MQTT's largest remaining length.
const MAX_PACKET_BYTES_LIMIT: usize = 268_435_455;

/// Parses and checks a stored hash: argon2id, parameters argon2 accepts.
pub(crate) fn parse_password_hash(phc: &str) -> Result<PasswordHashString, String> {
    let hash = PasswordHash::new(phc).map_err(|err| err.to_string())?;
    if hash.algorithm != argon2::ARGON2ID_IDENT {
        return Err(format!(
            "algorithm {} (argon2id is required)",
            hash.algorithm
        ));
    }
    argon2::Params::try_from(&hash).map_err(|err| err.to_string())?;
    if hash.hash.is_none() {
        return Err("no hash value".to_owned());
    }
    Ok(hash.serialize())
}

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
#[error("hashing the password failed: {0}")]
pub struct HashPasswordError(String);

/// Hashes a device password for the configuration with argon2id and its recommended
/// parameters (19 MiB, 2 passes, 1 lane) and a random salt; returns the PHC string to store
/// as `password_hash`.
pub fn hash_password(password: &str) -> Result<String, HashPasswordError> {
    hash_password_with(password, argon2::Params::DEFAULT)
}

/// [`hash_password`] with chosen argon2id parameters (a smaller memory cost for small gateways,
/// or for tests).
pub fn hash_password_with(
    password: &str,
    params: argon2::Params,
) -> Result<String, HashPasswordError> {
    let salt = SaltString::generate(&mut OsRng);
    let hasher = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    hasher
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|err| HashPasswordError(err.to_string()))
}

/// Checks `password` against a stored hash, with the hash's own parameters. Takes tens of
/// milliseconds by design: call it off the async threads.
pub(crate) fn verify_password(hash: &PasswordHashString, password: &[u8]) -> bool {
    Argon2::default()
        .verify_password(password, &hash.password_hash())
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> argon2::Params {
        argon2::Params::new(256, 1, 1, None).unwrap()
    }

    fn config(toml_text: &str) -> Result<MqttIngressConfig, String> {
        let config: MqttIngressConfig = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn hashes_verify_and_never_show() {
        let phc = hash_password_with("s3cret", cheap()).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=256,t=1,p=1$"), "{phc}");
        assert!(!phc.contains("s3cret"));
        let stored = parse_password_hash(&phc).unwrap();
        assert!(verify_password(&stored, b"s3cret"));
        assert!(!verify_password(&stored, b"s3cret "));
        let credentials = DeviceCredentials {
            id: DeviceId::new("d").unwrap(),
            password_hash: phc.clone(),
        };
        assert!(!format!("{credentials:?}").contains(&phc));
    }

    #[test]
    fn reads_the_documented_shape() {
        let phc = hash_password_with("pw", cheap()).unwrap();
        let config = config(&format!(
            r#"
            topic_root = "devices"
            max_packet_bytes = 65536
            [[listeners]]
            address = "0.0.0.0:1883"
            [[listeners]]
            address = "0.0.0.0:8883"
            tls = {{ cert_path = "/etc/fieldgate/mqtt.crt", key_path = "/etc/fieldgate/mqtt.key" }}
            [[devices]]
            id = "meter-07"
            password_hash = "{phc}"
            "#
        ))
        .unwrap();
        assert_eq!(config.listeners.len(), 2);
        assert!(config.listeners[1].tls.is_some());
        assert_eq!(config.devices[0].id.as_str(), "meter-07");
        assert_eq!(config.max_inflight, 64);
    }

    #[test]
    fn refuses_mistakes_naming_the_key() {
        let phc = hash_password_with("pw", cheap()).unwrap();
        let listener = "[[listeners]]\naddress = \"127.0.0.1:0\"\n";
        let check = |text: &str, expected: &str| {
            let err = config(text).unwrap_err();
            assert!(err.contains(expected), "{text}\n=> {err}");
        };
        check(
            &format!("max_packet_byte = 5\n{listener}"),
            "unknown field `max_packet_byte`",
        );
        check("listeners = []", "mqtt.listeners is empty");
        check(
            &format!("{listener}[[devices]]\nid = \"d\"\npassword_hash = \"hunter2\""),
            "device \"d\": password_hash is not an argon2id PHC string",
        );
        let argon2i = hash_password_with("pw", cheap())
            .unwrap()
            .replace("argon2id", "argon2i");
        check(
            &format!("{listener}[[devices]]\nid = \"d\"\npassword_hash = \"{argon2i}\""),
            "argon2id is required",
        );
        check(
            &format!(
                "{listener}[[devices]]\nid = \"d\"\npassword_hash = \"{phc}\"\n[[devices]]\nid = \"d\"\npassword_hash = \"{phc}\""
            ),
            "device \"d\" appears twice",
        );
        check(
            &format!("{listener}[[devices]]\nid = \"a b\"\npassword_hash = \"{phc}\""),
            "device name",
        );
        check(
            &format!("topic_root = \"a/+\"\n{listener}"),
            "mqtt.topic_root",
        );
        check(
            &format!("max_packet_bytes = 10\n{listener}"),
            "mqtt.max_packet_bytes = 10",
        );
    }
}
