//! The database: one schema, two backends (a SQLite file, the embedded default, and PostgreSQL
//! for production), reached through sqlx's `Any` driver so every query is written once.
//!
//! Portable SQL rules that every module follows: `$1`-style placeholders (SQLite maps them by
//! number), `BIGINT` for integers and booleans, `TEXT` ids made by [`crate::ids`], `BLOB`
//! (rewritten to `BYTEA` for PostgreSQL when migrating), `ON CONFLICT … DO NOTHING` and
//! `RETURNING` (both backends have them).
//!
//! Concurrency: a transaction that must serialise with others starts by *writing* the row it
//! guards (`UPDATE … RETURNING`), which takes PostgreSQL's row lock and SQLite's write lock
//! before anything is read, so neither backend can hand two writers the same old value.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions, Executor};

/// The migrations, in order. Each runs once, in a transaction, recorded in `schema_migrations`.
const MIGRATIONS: &[(i64, &str, &str)] =
    &[(1, "init", include_str!("../migrations/0001_init.sql"))];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A pool of connections to the cloud's database.
#[derive(Clone, Debug)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
}

impl Db {
    /// The embedded default: a SQLite file (created if missing) in WAL mode with full fsync on
    /// commit, so an acknowledged ingest survives power loss.
    pub async fn open_sqlite(path: &Path) -> anyhow::Result<Self> {
        let url = format!("sqlite://{}?mode=rwc", path.display());
        Self::connect(&url).await
    }

    /// Connect to `sqlite://…` or `postgres://…`.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            anyhow::bail!("database url must start with sqlite: or postgres:");
        };
        let options = AnyConnectOptions::from_str(url)
            .context("parsing the database url")?
            .log_statements(tracing::log::LevelFilter::Trace)
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2));
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 8 } else { 16 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                             PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                        )
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .with_context(|| format!("connecting to the {backend:?} database"))?;
        Ok(Self { pool, backend })
    }

    /// Apply the migrations not yet applied. Safe to run from several nodes at once on
    /// PostgreSQL (an advisory lock serialises them).
    pub async fn migrate(&self) -> anyhow::Result<Vec<i64>> {
        let mut conn = self.pool.acquire().await?;
        if self.backend == Backend::Postgres {
            conn.execute("SELECT pg_advisory_lock(72700001)").await?;
        }
        let result = async {
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations \
                 (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
            )
            .await?;
            let mut applied = Vec::new();
            for &(version, name, sql) in MIGRATIONS {
                let done: Option<(i64,)> =
                    sqlx::query_as("SELECT version FROM schema_migrations WHERE version = $1")
                        .bind(version)
                        .fetch_optional(&mut *conn)
                        .await?;
                if done.is_some() {
                    continue;
                }
                let sql = match self.backend {
                    Backend::Sqlite => sql.to_string(),
                    Backend::Postgres => sql.replace(" BLOB", " BYTEA"),
                };
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                tx.execute(sql.as_str())
                    .await
                    .with_context(|| format!("migration {version} ({name})"))?;
                sqlx::query(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                )
                .bind(version)
                .bind(name)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                applied.push(version);
            }
            anyhow::Ok(applied)
        }
        .await;
        if self.backend == Backend::Postgres {
            conn.execute("SELECT pg_advisory_unlock(72700001)").await?;
        }
        result
    }
}

/// UTC milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Whether an error is a unique-constraint violation (on either backend).
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db.is_unique_violation(),
        _ => false,
    }
}
