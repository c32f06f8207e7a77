//! The local HTTP API on loopback: `/healthz`, `/metrics` (Prometheus text), `/status` (JSON).

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use fieldgate_firmware_bridge::modbus::PollerStats;
use fieldgate_firmware_bridge::transport::LinkStats;
use serde::Serialize;

use crate::clean::{Flag, Pipeline, QuarantineSnapshot, Reason};
use crate::ingress::mqtt::{MqttIngressSnapshot, MqttIngressStats};
use crate::journal::{Journal, JournalStats};
use crate::supervise::Restarts;
use crate::uplink::UplinkStats;
use crate::writer::WriterStats;

/// What the HTTP handlers read: shared handles to the agent's parts.
#[derive(Clone)]
pub struct AgentState {
    pub gateway: String,
    pub started: Instant,
    pub journal: Arc<Mutex<Journal>>,
    pub pipeline: Arc<Mutex<Pipeline>>,
    pub targets: Vec<String>,
    pub writer: Arc<WriterStats>,
    pub serial_links: Vec<(String, Arc<LinkStats>)>,
    pub serial_restarts: Vec<(String, Arc<Restarts>)>,
    pub mqtt: Option<Arc<MqttIngressStats>>,
    pub modbus_pollers: Vec<(String, PollerStats)>,
    /// Set when the journal was found corrupt at start and moved aside: readings were lost.
    pub journal_moved_aside: Option<String>,
    /// (target, counters) of each target with endpoints.
    pub uplinks: Vec<(String, Arc<UplinkStats>)>,
}

pub fn router(state: AgentState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/quarantine", get(quarantine))
        .with_state(state)
}

#[derive(Serialize)]
pub struct Status {
    pub gateway: String,
    pub version: &'static str,
    pub uptime_s: u64,
    pub journal: JournalStatus,
    pub serial_links: Vec<LinkStatus>,
    pub modbus_lines: Vec<String>,
    pub mqtt: Option<MqttIngressSnapshot>,
    pub uplinks: Vec<UplinkStatus>,
}

#[derive(Serialize)]
pub struct UplinkStatus {
    pub target: String,
    pub gateway_id: Option<String>,
    pub endpoint: u64,
    pub batches_sent: u64,
    pub readings_sent: u64,
    pub bytes_sent: u64,
    pub duplicates: u64,
    pub failures: u64,
    pub failovers: u64,
    pub throttled: u64,
    pub declared_lost: u64,
    pub last_error: Option<String>,
}

fn uplink_status(target: &str, stats: &UplinkStats) -> UplinkStatus {
    UplinkStatus {
        target: target.to_string(),
        gateway_id: stats
            .gateway_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        endpoint: stats.endpoint.load(Relaxed),
        batches_sent: stats.batches_sent.load(Relaxed),
        readings_sent: stats.readings_sent.load(Relaxed),
        bytes_sent: stats.bytes_sent.load(Relaxed),
        duplicates: stats.duplicates.load(Relaxed),
        failures: stats.failures.load(Relaxed),
        failovers: stats.failovers.load(Relaxed),
        throttled: stats.throttled.load(Relaxed),
        declared_lost: stats.declared_lost.load(Relaxed),
        last_error: stats
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
    }
}

#[derive(Serialize)]
pub struct JournalStatus {
    pub next_seq: u64,
    pub readings_held: u64,
    pub held_bytes: u64,
    pub size_on_disk: u64,
    pub backlog: Vec<(String, u64)>,
    pub stats: JournalStats,
    pub moved_aside: Option<String>,
}

#[derive(Serialize)]
pub struct LinkStatus {
    pub port: String,
    pub opens: u64,
    pub frames_in: u64,
    pub readings: u64,
    pub frame_errors: u64,
}

fn journal_status(state: &AgentState) -> JournalStatus {
    let journal = state.journal.lock().unwrap_or_else(|e| e.into_inner());
    JournalStatus {
        next_seq: journal.next_seq(),
        readings_held: journal.readings_held(),
        held_bytes: journal.held_bytes(),
        size_on_disk: journal.size_on_disk(),
        backlog: state
            .targets
            .iter()
            .map(|t| (t.clone(), journal.backlog(t).unwrap_or(0)))
            .collect(),
        stats: journal.stats(),
        moved_aside: state.journal_moved_aside.clone(),
    }
}

async fn status(State(state): State<AgentState>) -> Json<Status> {
    let journal = journal_status(&state);
    Json(Status {
        gateway: state.gateway.clone(),
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: state.started.elapsed().as_secs(),
        journal,
        serial_links: state
            .serial_links
            .iter()
            .map(|(port, stats)| LinkStatus {
                port: port.clone(),
                opens: stats.opens.load(Relaxed),
                frames_in: stats.session.frames_in.load(Relaxed),
                readings: stats.session.readings_delivered.load(Relaxed),
                frame_errors: stats.session.frame_errors.load(Relaxed),
            })
            .collect(),
        modbus_lines: state
            .modbus_pollers
            .iter()
            .map(|(port, _)| port.clone())
            .collect(),
        mqtt: state.mqtt.as_ref().map(|stats| stats.snapshot()),
        uplinks: state
            .uplinks
            .iter()
            .map(|(target, stats)| uplink_status(target, stats))
            .collect(),
    })
}

#[derive(serde::Deserialize)]
struct QuarantineQuery {
    limit: Option<usize>,
}

/// The newest rejected readings (default 100), read-only.
async fn quarantine(
    State(state): State<AgentState>,
    axum::extract::Query(query): axum::extract::Query<QuarantineQuery>,
) -> Json<QuarantineSnapshot> {
    let pipeline = state.pipeline.lock().unwrap_or_else(|e| e.into_inner());
    Json(
        pipeline
            .quarantine()
            .snapshot_newest(query.limit.unwrap_or(100).min(10_000)),
    )
}

async fn metrics(State(state): State<AgentState>) -> impl IntoResponse {
    let journal = journal_status(&state);
    let cleaning = state
        .pipeline
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .counters();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(
            out,
            "# HELP fieldgate_{name} {help}\n# TYPE fieldgate_{name} {kind}"
        );
        for (labels, value) in samples {
            let _ = writeln!(out, "fieldgate_{name}{labels} {value}");
        }
    };
    let one = |value: u64| vec![(String::new(), value)];
    let writer = &state.writer;
    metric(
        "readings_received_total",
        "counter",
        "Readings handed to the journal writer.",
        &one(writer.readings_in.load(Relaxed)),
    );
    metric(
        "readings_durable_total",
        "counter",
        "Readings flushed to the journal.",
        &one(writer.readings_durable.load(Relaxed)),
    );
    metric(
        "journal_refused_full_total",
        "counter",
        "Readings refused because the journal was full (push-back policy).",
        &one(writer.refused_full.load(Relaxed)),
    );
    metric(
        "journal_write_failures_total",
        "counter",
        "Journal appends or flushes that failed.",
        &one(writer.failures.load(Relaxed)),
    );
    metric(
        "journal_group_commits_total",
        "counter",
        "Group commits (append and flush).",
        &one(writer.groups.load(Relaxed)),
    );
    metric(
        "journal_flush_micros_max",
        "gauge",
        "Longest append-and-flush, in microseconds.",
        &one(writer.flush_micros_max.load(Relaxed)),
    );
    metric(
        "journal_flush_micros_sum",
        "counter",
        "Total append-and-flush time, in microseconds.",
        &one(writer.flush_micros_sum.load(Relaxed)),
    );
    metric(
        "journal_readings_held",
        "gauge",
        "Readings on disk not yet acknowledged by every target.",
        &one(journal.readings_held),
    );
    metric(
        "journal_bytes_held",
        "gauge",
        "Encoded bytes of the readings held.",
        &one(journal.held_bytes),
    );
    metric(
        "journal_size_on_disk_bytes",
        "gauge",
        "The journal's files on disk.",
        &one(journal.size_on_disk),
    );
    metric(
        "journal_dropped_for_quota_total",
        "counter",
        "Readings dropped unsent by the drop-oldest policy.",
        &one(journal.stats.readings_dropped_for_quota),
    );
    let per_uplink = |value: fn(&UplinkStats) -> u64| -> Vec<(String, u64)> {
        state
            .uplinks
            .iter()
            .map(|(target, stats)| (format!("{{target=\"{target}\"}}"), value(stats)))
            .collect()
    };
    metric(
        "uplink_readings_sent_total",
        "counter",
        "Readings the cloud acknowledged.",
        &per_uplink(|s| s.readings_sent.load(Relaxed)),
    );
    metric(
        "uplink_bytes_sent_total",
        "counter",
        "Encoded batch bytes the cloud acknowledged.",
        &per_uplink(|s| s.bytes_sent.load(Relaxed)),
    );
    metric(
        "uplink_failures_total",
        "counter",
        "Failed sends (each retried).",
        &per_uplink(|s| s.failures.load(Relaxed)),
    );
    metric(
        "uplink_declared_lost_total",
        "counter",
        "Readings declared lost to the cloud (dropped from the journal unsent).",
        &per_uplink(|s| s.declared_lost.load(Relaxed)),
    );
    let backlog: Vec<(String, u64)> = journal
        .backlog
        .iter()
        .map(|(target, n)| (format!("{{target=\"{target}\"}}"), *n))
        .collect();
    metric(
        "journal_backlog_readings",
        "gauge",
        "Readings a target has not acknowledged.",
        &backlog,
    );
    metric(
        "clean_input_total",
        "counter",
        "Readings into the cleaning pipeline.",
        &one(cleaning.input),
    );
    metric(
        "clean_accepted_total",
        "counter",
        "Readings the cleaning pipeline accepted.",
        &one(cleaning.accepted),
    );
    let rejected: Vec<(String, u64)> = Reason::ALL
        .iter()
        .map(|&reason| {
            (
                format!("{{reason=\"{}\"}}", reason.as_str()),
                cleaning.rejected_by(reason),
            )
        })
        .collect();
    metric(
        "clean_rejected_total",
        "counter",
        "Readings rejected (and quarantined) by reason.",
        &rejected,
    );
    let flagged: Vec<(String, u64)> = Flag::ALL
        .iter()
        .map(|&flag| {
            (
                format!("{{flag=\"{}\"}}", flag.as_str()),
                cleaning.flagged_by(flag),
            )
        })
        .collect();
    metric(
        "clean_flagged_total",
        "counter",
        "Readings accepted as uncertain, by flag.",
        &flagged,
    );
    let per_link = |read: fn(&LinkStats) -> u64| -> Vec<(String, u64)> {
        state
            .serial_links
            .iter()
            .map(|(port, stats)| (format!("{{port=\"{port}\"}}"), read(stats)))
            .collect()
    };
    metric(
        "serial_frames_total",
        "counter",
        "Valid frames received per serial port.",
        &per_link(|s| s.session.frames_in.load(Relaxed)),
    );
    metric(
        "serial_frame_errors_total",
        "counter",
        "Damaged or refused frames per serial port.",
        &per_link(|s| s.session.frame_errors.load(Relaxed)),
    );
    metric(
        "serial_duplicates_total",
        "counter",
        "Resent frames recognised per serial port.",
        &per_link(|s| s.session.duplicates.load(Relaxed)),
    );
    metric(
        "serial_link_failures_total",
        "counter",
        "Serial links lost per port.",
        &per_link(|s| s.link_failures.load(Relaxed)),
    );
    let restarts: Vec<(String, u64)> = state
        .serial_restarts
        .iter()
        .map(|(port, n)| (format!("{{port=\"{port}\"}}"), n.0.load(Relaxed)))
        .collect();
    metric(
        "serial_link_restarts_total",
        "counter",
        "Serial link tasks restarted after a panic.",
        &restarts,
    );
    if let Some(mqtt) = &state.mqtt {
        // Every numeric counter of the MQTT ingress, flattened from its snapshot.
        if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(mqtt.snapshot()) {
            let mut flat = Vec::new();
            flatten("mqtt", &serde_json::Value::Object(fields), &mut flat);
            for (name, value) in flat {
                let _ = writeln!(
                    out,
                    "# TYPE fieldgate_{name} gauge\nfieldgate_{name} {value}"
                );
            }
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, u64)>) {
    match value {
        serde_json::Value::Object(fields) => {
            for (key, value) in fields {
                flatten(&format!("{prefix}_{key}"), value, out);
            }
        }
        serde_json::Value::Number(n) => {
            if let Some(n) = n.as_u64() {
                out.push((prefix.to_owned(), n));
            }
        }
        _ => {}
    }
}
