//! A running cloud: database opened and migrated, TLS identity loaded (or made), the API served
//! on its listeners until shut down. Used by `fieldgate-cloud serve`, the demo and the tests.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::CloudConfig;
use crate::db::Db;
use crate::pki::{ensure_local_server_identity, ServerIdentity};
use crate::{api, tls, AppState};

pub struct RunningCloud {
    /// Where the HTTPS API listens.
    pub https_addr: SocketAddr,
    /// Where the loopback plain-HTTP API listens, if configured.
    pub http_addr: Option<SocketAddr>,
    /// The CA that signed the service certificate, when the service made its own: clients
    /// (gateways, tools) trust this file.
    pub ca_path: Option<PathBuf>,
    pub db: Db,
    stop: watch::Sender<bool>,
    tasks: JoinSet<anyhow::Result<()>>,
}

/// Open the database, migrate it, and serve the API.
pub async fn start(config: CloudConfig) -> anyhow::Result<RunningCloud> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    let db = Db::connect(&config.database_url()).await?;
    db.migrate().await?;
    let identity = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => ServerIdentity {
            cert_path: cert.clone(),
            key_path: key.clone(),
            ca_path: None,
        },
        _ => ensure_local_server_identity(&config.data_dir.join("tls"), &config.tls.names)?,
    };
    let tls_config = tls::server_config(&identity)?;
    let https = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let http = match config.http_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr}"))?,
        ),
        None => None,
    };
    let https_addr = https.local_addr()?;
    let http_addr = http.as_ref().map(|l| l.local_addr()).transpose()?;
    let state = AppState::new(db.clone(), config);
    let app = api::router(state.clone());
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tasks.spawn(compact_every_second(state, stopped.clone()));
    tasks.spawn(tls::serve_tls(
        https,
        tls_config,
        app.clone(),
        stopped.clone(),
    ));
    if let Some(http) = http {
        tasks.spawn(tls::serve_plain_loopback(http, app, stopped));
    }
    tracing::info!(%https_addr, ?http_addr, backend = ?db.backend, "cloud serving");
    Ok(RunningCloud {
        https_addr,
        http_addr,
        ca_path: identity.ca_path,
        db,
        stop,
        tasks,
    })
}

/// Keep staged batches compacted (readers also compact before reading).
async fn compact_every_second(
    state: AppState,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
        if let Err(err) = state.compactor.run(&state.db).await {
            tracing::error!(
                error = format!("{err:#}"),
                "compaction failed; staged batches stay staged"
            );
        }
    }
}

impl RunningCloud {
    /// Stop accepting, let requests in flight finish (up to a few seconds), close the pool.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        while let Some(result) = self.tasks.join_next().await {
            result??;
        }
        self.db.pool.close().await;
        Ok(())
    }

    /// Serve until a listener fails.
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        match self.tasks.join_next().await {
            Some(result) => result?,
            None => Ok(()),
        }
    }
}
