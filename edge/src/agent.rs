//! The agent: builds every part from the configuration, runs them, and shuts them down in
//! order (ingress first, then the writer drains and flushes) when asked to stop.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fieldgate_firmware_bridge::modbus::ModbusPoller;
use fieldgate_firmware_bridge::session::{DeviceBatch, SessionConfig};
use fieldgate_firmware_bridge::transport::{run_serial_link, stopped, Backoff, LinkStats};
use tokio::sync::{mpsc, watch};

use crate::clean::Pipeline;
use crate::config::EdgeConfig;
use crate::http::{router, AgentState};
use crate::ingress::mqtt::MqttIngress;
use crate::journal::{Journal, JournalConfig};
use crate::supervise::{supervise, Restarts};
use crate::uplink::{Uplink, UplinkStats};
use crate::writer::{run_writer, GroupCommit, JournalInput, WriterStats};

/// Runs the agent until `shutdown` resolves; returns once everything received is durable.
pub async fn run(
    config: EdgeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    std::fs::create_dir_all(&config.gateway.data_dir).with_context(|| {
        format!(
            "creating the data directory {}",
            config.gateway.data_dir.display()
        )
    })?;
    let targets: Vec<String> = config.targets.iter().map(|t| t.name.clone()).collect();
    let journal_config = JournalConfig {
        path: config.journal_path(),
        targets: targets.clone(),
        quota_bytes: (config.journal.quota_mb * 1024.0 * 1024.0) as u64,
        overflow: config.journal.overflow,
        compaction_slack_bytes: config.journal.compaction_slack_mb * 1024 * 1024,
    };
    let (journal, report) = tokio::task::spawn_blocking(move || Journal::open(journal_config))
        .await?
        .context("opening the journal")?;
    if let Some(aside) = &report.moved_aside {
        tracing::error!(moved_to = %aside.display(), "THE JOURNAL WAS CORRUPT: it was moved aside and a new one started; readings not yet synced are missing from this gateway");
    }
    tracing::info!(gateway = %config.gateway.id, readings_held = report.readings_held, "journal open");
    let journal = Arc::new(Mutex::new(journal));

    let (stop_tx, stop) = watch::channel(false);
    let (input_tx, input) = mpsc::channel::<JournalInput>(1024);
    let writer_stats = Arc::new(WriterStats::default());
    let group_commit = GroupCommit {
        linger: Duration::from_millis(config.journal.flush_linger_ms),
        max_readings: config.journal.flush_max_readings,
    };
    let pipeline = Pipeline::new(&config.clean)
        .map_err(|err| anyhow::anyhow!("{}: {}", err.key, err.reason))?;
    let pipeline = Arc::new(Mutex::new(pipeline));
    let writer = tokio::spawn(run_writer(
        journal.clone(),
        pipeline.clone(),
        input,
        group_commit,
        writer_stats.clone(),
    ));

    let mut ingress = Vec::new();
    let mut serial_links = Vec::new();
    let (batches_tx, mut batches) = mpsc::channel::<DeviceBatch>(256);
    let mut restarts = Vec::new();
    for port in &config.serial {
        let stats = Arc::new(LinkStats::default());
        serial_links.push((port.path.clone(), stats.clone()));
        let port_restarts = Arc::new(Restarts::default());
        restarts.push((port.path.clone(), port_restarts.clone()));
        let (port, batches_tx, link_stop) = (port.clone(), batches_tx.clone(), stop.clone());
        // The link reopens its port by itself; the supervisor restarts it if it panics.
        ingress.push(tokio::spawn(supervise(
            "serial link",
            move || {
                // No operator requests yet: the control link that brings them comes later.
                let (_, requests) = mpsc::channel(1);
                let link = run_serial_link(
                    port.clone(),
                    SessionConfig::default(),
                    Backoff::default(),
                    batches_tx.clone(),
                    requests,
                    stats.clone(),
                    link_stop.clone(),
                );
                async move {
                    link.await;
                    Ok::<(), std::convert::Infallible>(())
                }
            },
            Duration::from_millis(100),
            Duration::from_secs(10),
            port_restarts,
            stop.clone(),
        )));
    }
    let mut mqtt = None;
    if let Some(mqtt_config) = &config.mqtt {
        let listener = MqttIngress::bind(mqtt_config.clone())
            .await
            .context("starting the MQTT ingress")?;
        mqtt = Some(listener.stats());
        let (sink, stop) = (batches_tx.clone(), stop.clone());
        ingress.push(tokio::spawn(async move {
            if let Err(err) = listener.run(sink, stopped(stop)).await {
                tracing::error!(error = %err, "MQTT ingress stopped");
            }
        }));
    }
    drop(batches_tx);
    // Serial and MQTT batches carry a commit: their devices are acknowledged once durable.
    let serial_and_mqtt_input = input_tx.clone();
    ingress.push(tokio::spawn(async move {
        while let Some(batch) = batches.recv().await {
            let input = JournalInput {
                readings: batch.readings,
                commit: Some(batch.commit),
            };
            if serial_and_mqtt_input.send(input).await.is_err() {
                break;
            }
        }
    }));

    let mut modbus_pollers = Vec::new();
    for poller in &config.modbus_pollers {
        let (readings_tx, mut readings) = mpsc::channel(4096);
        let stats = ModbusPoller::new(poller.clone())
            .context("starting a Modbus poller")?
            .stats();
        modbus_pollers.push((poller.port.path.clone(), stats.clone()));
        let (poller, poller_stop) = (poller.clone(), stop.clone());
        // The poller reopens its line by itself; the supervisor restarts it if it fails or panics.
        ingress.push(tokio::spawn(supervise(
            "modbus poller",
            move || {
                let run = ModbusPoller::new(poller.clone()).map(|p| p.with_stats(stats.clone()));
                let (readings_tx, stop) = (readings_tx.clone(), poller_stop.clone());
                async move {
                    run.map_err(|e| e.to_string())?
                        .run(readings_tx, stopped(stop))
                        .await
                        .map_err(|e| e.to_string())
                }
            },
            Duration::from_millis(500),
            Duration::from_secs(30),
            Arc::new(Restarts::default()),
            stop.clone(),
        )));
        let input_tx = input_tx.clone();
        ingress.push(tokio::spawn(async move {
            while let Some(first) = readings.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = readings.try_recv() {
                    batch.push(more);
                }
                if input_tx
                    .send(JournalInput {
                        readings: batch,
                        commit: None,
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }));
    }
    drop(input_tx);

    let mut uplinks = Vec::new();
    let mut uplink_tasks = Vec::new();
    for target in config.targets.iter().filter(|t| !t.endpoints.is_empty()) {
        let stats = Arc::new(UplinkStats::default());
        uplinks.push((target.name.clone(), stats.clone()));
        let uplink = Uplink {
            target: target.clone(),
            data_dir: config.gateway.data_dir.clone(),
            gateway_name: config.gateway.id.to_string(),
            journal: journal.clone(),
            stats,
        };
        uplink_tasks.push(tokio::spawn(uplink.run(stop.clone())));
    }

    let state = AgentState {
        gateway: config.gateway.id.to_string(),
        started: Instant::now(),
        journal: journal.clone(),
        pipeline,
        targets,
        writer: writer_stats,
        serial_links,
        serial_restarts: restarts,
        mqtt,
        modbus_pollers,
        journal_moved_aside: report.moved_aside.map(|p| p.display().to_string()),
        uplinks,
    };
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("listening on {} for the local HTTP API", config.http.listen))?;
    tracing::info!(address = %listener.local_addr()?, "local HTTP API up");
    let http_stop = stop.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, router(state))
            .with_graceful_shutdown(stopped(http_stop))
            .await
    });

    shutdown.await;
    tracing::info!("shutting down: stopping ingress, then flushing the journal");
    let _ = stop_tx.send(true);
    for task in ingress {
        let _ = task.await;
    }
    // Every ingress sender is gone now, so the writer finishes its last group and returns.
    writer.await?;
    for task in uplink_tasks {
        let _ = task.await;
    }
    let _ = http.await;
    let mut journal = journal.lock().unwrap_or_else(|e| e.into_inner());
    journal.flush().context("final journal flush")?;
    tracing::info!(next_seq = journal.next_seq(), "stopped");
    Ok(())
}
