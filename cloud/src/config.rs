//! The service's configuration: a TOML file, or flags alone. Secrets (a PostgreSQL password in
//! the database URL) may come from `FIELDGATE_DATABASE_URL` instead of the file and are never
//! logged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// HTTPS: the API, gateway enrollment, and mutual-TLS ingest.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Optional plain HTTP for local tools; only loopback addresses are accepted.
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// `sqlite://…` or `postgres://…`; default: `cloud.db` in the data directory.
    #[serde(default)]
    pub database_url: Option<String>,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub gateways: GatewayPolicy,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM files of the service's certificate chain and key. Without them the service makes a
    /// local CA and a certificate for `names` in `<data_dir>/tls` on first start.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    #[serde(default = "default_names")]
    pub names: Vec<String>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            names: default_names(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest encoded ingest batch, in bytes (413 above).
    pub max_batch_bytes: usize,
    /// Most readings in one ingest batch (413 above).
    pub max_batch_readings: u32,
    /// Default per-tenant ingest rate, readings per second (429 with Retry-After above it).
    pub ingest_readings_per_s: u64,
    /// Largest JSON request body, in bytes.
    pub max_json_bytes: usize,
    /// Requests taking longer are answered 408... by the timeout layer.
    pub request_timeout_s: u64,
    /// Failed logins per account or address before it is locked out for `login_lockout_s`.
    pub login_max_failures: u32,
    pub login_lockout_s: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch_bytes: 16 << 20,
            max_batch_readings: 1_000_000,
            ingest_readings_per_s: 5_000_000,
            max_json_bytes: 64 << 10,
            request_timeout_s: 30,
            login_max_failures: 5,
            login_lockout_s: 300,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayPolicy {
    /// Lifetime of a gateway's client certificate; gateways renew after two thirds of it.
    pub cert_validity_days: u64,
    /// Longest lifetime an installer may give an enrollment token.
    pub max_enrollment_token_hours: u64,
}

impl Default for GatewayPolicy {
    fn default() -> Self {
        Self {
            cert_validity_days: 90,
            max_enrollment_token_hours: 7 * 24,
        }
    }
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:8443".parse().expect("a valid address")
}

fn default_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}

impl CloudConfig {
    /// A configuration with every default, for flags-only use.
    pub fn with_data_dir(data_dir: PathBuf) -> Self {
        Self {
            listen: default_listen(),
            http_listen: None,
            data_dir,
            database_url: None,
            tls: TlsConfig::default(),
            limits: Limits::default(),
            gateways: GatewayPolicy::default(),
        }
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The database URL: the environment, the file, or SQLite in the data directory.
    pub fn database_url(&self) -> String {
        std::env::var("FIELDGATE_DATABASE_URL")
            .ok()
            .or_else(|| self.database_url.clone())
            .unwrap_or_else(|| {
                format!(
                    "sqlite://{}?mode=rwc",
                    self.data_dir.join("cloud.db").display()
                )
            })
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(addr) = self.http_listen {
            anyhow::ensure!(
                addr.ip().is_loopback(),
                "http_listen {addr} is not a loopback address: plain HTTP is for local tools only"
            );
        }
        anyhow::ensure!(
            self.tls.cert.is_some() == self.tls.key.is_some(),
            "tls.cert and tls.key go together"
        );
        anyhow::ensure!(
            self.limits.max_batch_readings > 0,
            "limits.max_batch_readings must be > 0"
        );
        anyhow::ensure!(
            self.limits.ingest_readings_per_s > 0,
            "limits.ingest_readings_per_s must be > 0"
        );
        anyhow::ensure!(
            self.gateways.cert_validity_days > 0,
            "gateways.cert_validity_days must be > 0"
        );
        Ok(())
    }
}
