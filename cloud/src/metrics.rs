//! Service counters, rendered as Prometheus text at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub ingest_batches: Counter,
    pub ingest_readings: Counter,
    pub ingest_duplicates: Counter,
    pub login_failures: Counter,
    ingest_rejects: Mutex<BTreeMap<String, u64>>,
    responses: Mutex<BTreeMap<u16, u64>>,
}

impl Metrics {
    pub fn ingest_rejected(&self, code: &str) {
        *self
            .ingest_rejects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(code.to_string())
            .or_default() += 1;
    }

    pub fn response(&self, status: u16) {
        *self
            .responses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(status)
            .or_default() += 1;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "fieldgate_cloud_ingest_batches_total",
            "Batches accepted.",
            self.ingest_batches.get(),
        );
        counter(
            "fieldgate_cloud_ingest_readings_total",
            "Readings stored.",
            self.ingest_readings.get(),
        );
        counter(
            "fieldgate_cloud_ingest_duplicates_total",
            "Readings received again and not stored twice.",
            self.ingest_duplicates.get(),
        );
        counter(
            "fieldgate_cloud_login_failures_total",
            "Failed or refused logins.",
            self.login_failures.get(),
        );
        let _ = writeln!(out, "# HELP fieldgate_cloud_ingest_rejects_total Batches refused, by error code.\n# TYPE fieldgate_cloud_ingest_rejects_total counter");
        for (code, n) in self
            .ingest_rejects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "fieldgate_cloud_ingest_rejects_total{{code=\"{code}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP fieldgate_cloud_http_responses_total HTTP responses, by status.\n# TYPE fieldgate_cloud_http_responses_total counter");
        for (status, n) in self
            .responses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "fieldgate_cloud_http_responses_total{{status=\"{status}\"}} {n}"
            );
        }
        out
    }
}
