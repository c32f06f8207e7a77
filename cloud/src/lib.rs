//! The Fieldgate cloud: tenants, people and API keys; gateway identity (a CA per tenant,
//! enrollment tokens, mutual TLS); exact, idempotent ingest of the shared batch format into
//! per-series compressed chunks; the fleet registry; and the `/v1` HTTP API with its OpenAPI
//! document. Storage is SQLite (embedded default) or PostgreSQL through one schema.
//!
//! Module map: [`config`] the service configuration; [`db`] pool, backends, migrations;
//! [`auth`] roles, principals, passwords, tokens; [`accounts`] login, people, API keys,
//! tenant bootstrap; [`audit`] the audit log; [`pki`] certificates; [`tls`] serving HTTPS with
//! optional client certificates; [`fleet`] sites, enrollment, gateways, certificate renewal;
//! [`ingest`] `POST /v1/ingest`; [`compact`] staged batches into series chunks; [`series`] reading series back; [`api`] the router, OpenAPI,
//! health and metrics; [`server`] wiring it all into a running service.

pub mod accounts;
pub mod api;
pub mod audit;
pub mod auth;
pub mod compact;
pub mod config;
pub mod db;
pub mod error;
pub mod fleet;
pub mod ids;
pub mod ingest;
pub mod metrics;
pub mod pki;
pub mod series;
pub mod server;
pub mod tls;

use std::sync::Arc;

pub use config::CloudConfig;
pub use db::Db;
pub use server::{start, RunningCloud};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub config: Arc<CloudConfig>,
    pub logins: Arc<auth::LoginLimiter>,
    pub ingest: Arc<ingest::IngestState>,
    pub metrics: Arc<metrics::Metrics>,
    pub compactor: Arc<compact::Compactor>,
}

impl AppState {
    pub fn new(db: Db, config: CloudConfig) -> Self {
        let logins = auth::LoginLimiter::new(
            config.limits.login_max_failures,
            std::time::Duration::from_secs(config.limits.login_lockout_s),
        );
        Self {
            db,
            logins: Arc::new(logins),
            ingest: Arc::new(ingest::IngestState::new(&config.limits)),
            metrics: Arc::new(metrics::Metrics::default()),
            compactor: Arc::new(compact::Compactor::default()),
            config: Arc::new(config),
        }
    }
}

/// A mutex's guard; a panic elsewhere while holding it leaves the data usable (counters, caches).
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
