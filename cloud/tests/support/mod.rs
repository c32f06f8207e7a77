//! Test support: a real cloud on loopback (SQLite file or a fresh PostgreSQL database), tenants
//! bootstrapped the way the admin CLI does it, HTTPS clients that trust the service CA, and
//! enrolled gateways holding their own key and client certificate.
//!
//! PostgreSQL tests read `FIELDGATE_TEST_POSTGRES_URL` (a role that may create databases, e.g.
//! `postgres://fieldgate:…@127.0.0.1:5432/postgres`); without it they skip with a loud message,
//! or fail when `FIELDGATE_REQUIRE_ALL=1` (as in `.ci/run`).

#![allow(dead_code)]

use std::time::Duration;

use fieldgate_cloud::{accounts, pki, CloudConfig, RunningCloud};
use fieldgate_shared::codec::{encode, BatchMeta};
use fieldgate_shared::model::{DeviceId, GatewayId, MetricName, Quality, Reading, StreamId, Value};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value as Json};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Define each listed `async fn name(backend: Backend)` as two tests, `sqlite::name` and
/// `postgres::name`: the same suite on both storage backends.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::Postgres).await
                }
            )*
        }
    };
}

pub struct TestCloud {
    pub cloud: Option<RunningCloud>,
    pub base: String,
    pub http_base: String,
    pub ca_pem: Vec<u8>,
    pub backend: Backend,
    _dir: tempfile::TempDir,
}

pub struct Tenant {
    pub id: String,
    pub name: String,
    pub owner_email: String,
    pub owner_password: String,
    /// The bootstrap owner API key.
    pub key: String,
}

pub struct TestGateway {
    pub id: String,
    pub tenant_id: String,
    pub key_pem: String,
    pub cert_pem: String,
    pub client: reqwest::Client,
}

/// A fresh PostgreSQL database on the test server, or None (skipped) when none is configured.
pub async fn postgres_database() -> Option<String> {
    let Ok(admin_url) = std::env::var("FIELDGATE_TEST_POSTGRES_URL") else {
        let message = "PostgreSQL tests need FIELDGATE_TEST_POSTGRES_URL (a role that may create \
                       databases, e.g. postgres://fieldgate:pw@127.0.0.1:5432/postgres); install \
                       with `apt-get install postgresql` and start with `pg_ctlcluster 15 main start`";
        if std::env::var("FIELDGATE_REQUIRE_ALL").as_deref() == Ok("1") {
            panic!("FIELDGATE_REQUIRE_ALL=1: {message}");
        }
        eprintln!("SKIPPED (PostgreSQL): {message}");
        return None;
    };
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("connecting to FIELDGATE_TEST_POSTGRES_URL");
    let name = format!("fieldgate_test_{}", fieldgate_cloud::ids::random_hex(8));
    sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("creating a test database");
    let base = admin_url
        .rsplit_once('/')
        .map(|(base, _)| base)
        .unwrap_or(&admin_url);
    Some(format!("{base}/{name}"))
}

impl TestCloud {
    /// A cloud with default limits; None when the backend is not available here.
    pub async fn start(backend: Backend) -> Option<TestCloud> {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(
        backend: Backend,
        adjust: impl FnOnce(&mut CloudConfig),
    ) -> Option<TestCloud> {
        // Server errors show in the failing test's output (RUST_LOG=debug for more).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx=error")),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let mut config = CloudConfig::with_data_dir(dir.path().to_path_buf());
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.http_listen = Some("127.0.0.1:0".parse().unwrap());
        if backend == Backend::Postgres {
            config.database_url = Some(postgres_database().await?);
        }
        adjust(&mut config);
        let cloud = fieldgate_cloud::start(config)
            .await
            .expect("starting the cloud");
        let ca_pem = std::fs::read(cloud.ca_path.as_ref().unwrap()).unwrap();
        Some(TestCloud {
            base: format!("https://127.0.0.1:{}", cloud.https_addr.port()),
            http_base: format!("http://127.0.0.1:{}", cloud.http_addr.unwrap().port()),
            ca_pem,
            backend,
            cloud: Some(cloud),
            _dir: dir,
        })
    }

    pub fn db(&self) -> &fieldgate_cloud::Db {
        &self.cloud.as_ref().unwrap().db
    }

    /// An HTTPS client that trusts the service CA and presents no certificate.
    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(reqwest::Certificate::from_pem(&self.ca_pem).unwrap())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    /// Bootstrap a tenant as `fieldgate-cloud admin create-tenant` does.
    pub async fn tenant(&self, name: &str) -> Tenant {
        let made = accounts::bootstrap_tenant(self.db(), name, &format!("owner@{name}.example"))
            .await
            .unwrap();
        Tenant {
            id: made.tenant_id,
            name: name.to_string(),
            owner_email: made.owner_email,
            owner_password: made.owner_password,
            key: made.api_key,
        }
    }

    /// A JSON API call with a bearer token; returns the status and the JSON body (Null if none).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Json>,
    ) -> (StatusCode, Json) {
        call_with(
            &self.client(),
            method,
            &format!("{}{path}", self.base),
            token,
            body,
        )
        .await
    }

    /// Make a site and a one-time enrollment token for it with the given API key.
    pub async fn site_and_token(&self, key: &str, site_name: &str) -> (String, String) {
        let (status, site) = self
            .call(
                Method::POST,
                "/v1/sites",
                Some(key),
                Some(json!({"name": site_name})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{site}");
        let site_id = site["id"].as_str().unwrap().to_string();
        let token = self.enrollment_token(key, &site_id).await;
        (site_id, token)
    }

    pub async fn enrollment_token(&self, key: &str, site_id: &str) -> String {
        let (status, token) = self
            .call(
                Method::POST,
                "/v1/enrollment-tokens",
                Some(key),
                Some(json!({"site_id": site_id, "expires_in_hours": 1})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{token}");
        token["secret"].as_str().unwrap().to_string()
    }

    /// Enroll a gateway (its own key pair and CSR) with a token; panics unless it succeeds.
    pub async fn enroll(&self, token: &str, site_id: &str, name: &str) -> TestGateway {
        let (status, body, key_pem) = self.try_enroll(token, site_id, name).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        self.gateway_from(&body, key_pem)
    }

    pub async fn try_enroll(
        &self,
        token: &str,
        site_id: &str,
        name: &str,
    ) -> (StatusCode, Json, String) {
        let (key_pem, csr_pem) = pki::new_key_and_csr(name).unwrap();
        let (status, body) = self
            .call(Method::POST, "/v1/enroll", None,
                Some(json!({"token": token, "site_id": site_id, "name": name, "csr_pem": csr_pem, "version": "test"})))
            .await;
        (status, body, key_pem)
    }

    pub fn gateway_from(&self, issued: &Json, key_pem: String) -> TestGateway {
        let cert_pem = issued["certificate_pem"].as_str().unwrap().to_string();
        TestGateway {
            id: issued["gateway_id"].as_str().unwrap().to_string(),
            tenant_id: issued["tenant_id"].as_str().unwrap().to_string(),
            client: self.client_with_identity(&key_pem, &cert_pem),
            key_pem,
            cert_pem,
        }
    }

    /// An HTTPS client presenting this certificate.
    pub fn client_with_identity(&self, key_pem: &str, cert_pem: &str) -> reqwest::Client {
        let identity =
            reqwest::Identity::from_pem(format!("{cert_pem}\n{key_pem}").as_bytes()).unwrap();
        reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(reqwest::Certificate::from_pem(&self.ca_pem).unwrap())
            .identity(identity)
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
    }

    /// POST an encoded batch as `gateway`; returns the status and JSON answer.
    pub async fn ingest(&self, gateway: &TestGateway, batch: &[u8]) -> (StatusCode, Json) {
        self.ingest_with(gateway, batch, &[]).await
    }

    pub async fn ingest_with(
        &self,
        gateway: &TestGateway,
        batch: &[u8],
        headers: &[(&str, &str)],
    ) -> (StatusCode, Json) {
        let mut request = gateway
            .client
            .post(format!("{}/v1/ingest", self.base))
            .header("content-type", "application/octet-stream")
            .body(batch.to_vec());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Json::String(text)),
        )
    }

    /// Every stored reading of a stream as (device, metric, ts_ms, value) via the API, sorted.
    pub async fn stored_readings(
        &self,
        key: &str,
        gateway_id: &str,
    ) -> Vec<(String, String, i64, Json)> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut path = format!("/v1/series?gateway_id={gateway_id}&limit=500");
            if let Some(a) = &after {
                path.push_str(&format!("&after={a}"));
            }
            let (status, page) = self.call(Method::GET, &path, Some(key), None).await;
            assert_eq!(status, StatusCode::OK, "{page}");
            for series in page["series"].as_array().unwrap() {
                let id = series["id"].as_str().unwrap();
                let mut cursor: Option<String> = None;
                loop {
                    let mut path = format!("/v1/series/{id}/readings?limit=10000");
                    if let Some(c) = &cursor {
                        path.push_str(&format!("&after={c}"));
                    }
                    let (status, readings) = self.call(Method::GET, &path, Some(key), None).await;
                    assert_eq!(status, StatusCode::OK, "{readings}");
                    for r in readings["readings"].as_array().unwrap() {
                        out.push((
                            series["device"].as_str().unwrap().to_string(),
                            series["metric"].as_str().unwrap().to_string(),
                            r["ts_ms"].as_i64().unwrap(),
                            r["value"].clone(),
                        ));
                    }
                    match readings["next_after"].as_str() {
                        Some(c) => cursor = Some(c.to_string()),
                        None => break,
                    }
                }
            }
            match page["next_after"].as_str() {
                Some(a) => after = Some(a.to_string()),
                None => break,
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1, a.2).cmp(&(&b.0, &b.1, b.2)));
        out
    }

    pub async fn stop(mut self) {
        if let Some(cloud) = self.cloud.take() {
            cloud.shutdown().await.unwrap();
        }
    }
}

pub async fn call_with(
    client: &reqwest::Client,
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<Json>,
) -> (StatusCode, Json) {
    let mut request = client.request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    (
        status,
        if text.is_empty() {
            Json::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Json::String(text))
        },
    )
}

/// Reading `seq` of a test stream: unique per seq, so stored sets can be compared exactly.
pub fn reading(seq: u64, devices: u64) -> Reading {
    let device = seq % devices;
    Reading {
        device: DeviceId::new(&format!("dev-{device}")).unwrap(),
        metric: MetricName::new(if seq.is_multiple_of(2) {
            "temp"
        } else {
            "power"
        })
        .unwrap(),
        ts_ms: 1_700_000_000_000 + seq as i64 * 10,
        value: if seq.is_multiple_of(2) {
            Value::F64(20.0 + (seq % 100) as f64 / 10.0)
        } else {
            Value::I64(seq as i64)
        },
        quality: Quality::Good,
    }
}

/// A raw batch of stream readings `first..=last` for `gateway`.
pub fn batch(gateway: &str, stream: &str, first: u64, last: u64) -> Vec<u8> {
    let readings: Vec<Reading> = (first..=last).map(|seq| reading(seq, 4)).collect();
    encode(
        &BatchMeta {
            gateway: GatewayId::new(gateway).unwrap(),
            stream: StreamId::new(stream).unwrap(),
            first_seq: first,
            last_seq: last,
        },
        &readings,
    )
    .unwrap()
}

/// What `stored_readings` should return for readings `seqs` (each once).
pub fn expected(seqs: impl IntoIterator<Item = u64>) -> Vec<(String, String, i64, Json)> {
    let mut out: Vec<_> = seqs
        .into_iter()
        .map(|seq| {
            let r = reading(seq, 4);
            let value = match r.value {
                Value::F64(x) => json!(x),
                Value::I64(x) => json!(x),
                _ => unreachable!(),
            };
            (
                r.device.as_str().to_string(),
                r.metric.as_str().to_string(),
                r.ts_ms,
                value,
            )
        })
        .collect();
    out.sort_by(|a, b| (&a.0, &a.1, a.2).cmp(&(&b.0, &b.1, b.2)));
    out
}
