//! End-to-end harness: the real `fieldgate-cloud` and `fieldgate-edge` binaries as processes on
//! loopback ports, tenants made with the admin CLI, devices publishing over MQTT, and a
//! fault-injecting TCP proxy. The tests in `tests/tests/` use it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// A workspace binary, built on demand (`cargo test --workspace` has built it already).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let path = dir.join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let package = if name == "fieldgate-cloud" {
            "fieldgate-cloud"
        } else {
            "fieldgate-edge"
        };
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", package, "--bins"])
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building {name}");
    }
    path
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` until it is true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("timed out after {timeout:?} waiting for {what}")
}

/// A cloud node process.
pub struct CloudNode {
    pub data_dir: PathBuf,
    pub https_port: u16,
    pub http_port: u16,
    child: Option<Child>,
}

impl CloudNode {
    /// Start a node on `data_dir` (nodes sharing a data dir share its SQLite file and TLS).
    pub async fn start(data_dir: &Path, https_port: u16, http_port: u16) -> Result<CloudNode> {
        let mut node = CloudNode {
            data_dir: data_dir.to_path_buf(),
            https_port,
            http_port,
            child: None,
        };
        node.restart().await?;
        Ok(node)
    }

    pub async fn restart(&mut self) -> Result<()> {
        let child = Command::new(binary("fieldgate-cloud"))
            .args(["serve", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen", &format!("127.0.0.1:{}", self.https_port)])
            .args(["--http-listen", &format!("127.0.0.1:{}", self.http_port)])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting fieldgate-cloud")?;
        self.child = Some(child);
        let url = format!("{}/healthz", self.http_base());
        wait_until(Duration::from_secs(30), "the cloud to answer", || {
            let url = url.clone();
            async move {
                reqwest::get(url)
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await
    }

    pub fn http_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn https_base(&self) -> String {
        format!("https://127.0.0.1:{}", self.https_port)
    }

    pub fn ca_path(&self) -> PathBuf {
        self.data_dir.join("tls/ca.pem")
    }

    /// SIGKILL: the node vanishes mid-request.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

/// A tenant made with `fieldgate-cloud admin create-tenant`, with a site and an enrollment token.
pub struct Tenant {
    pub api_key: String,
    pub site_id: String,
    pub token: String,
}

pub async fn tenant(node: &CloudNode, name: &str) -> Result<Tenant> {
    let out = Command::new(binary("fieldgate-cloud"))
        .args(["admin", "create-tenant", "--data-dir"])
        .arg(&node.data_dir)
        .args([
            "--name",
            name,
            "--owner-email",
            &format!("owner@{name}.example"),
            "--json",
        ])
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "create-tenant: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: Value = serde_json::from_slice(&out.stdout)?;
    let api_key = made["api_key"].as_str().context("api_key")?.to_string();
    let api = Api {
        base: node.http_base(),
        key: api_key.clone(),
    };
    let site = api.post("/v1/sites", json!({"name": "plant"})).await?;
    let site_id = site["id"].as_str().context("site")?.to_string();
    let token = api
        .post(
            "/v1/enrollment-tokens",
            json!({"site_id": site_id, "expires_in_hours": 1}),
        )
        .await?;
    Ok(Tenant {
        api_key,
        site_id,
        token: token["secret"].as_str().context("token")?.to_string(),
    })
}

/// The cloud API with a key.
pub struct Api {
    pub base: String,
    pub key: String,
}

impl Api {
    pub async fn get(&self, path: &str) -> Result<Value> {
        let response = reqwest::Client::new()
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        anyhow::ensure!(status.is_success(), "GET {path}: {status} {text}");
        Ok(serde_json::from_str(&text)?)
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value> {
        let response = reqwest::Client::new()
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        anyhow::ensure!(status.is_success(), "POST {path}: {status} {text}");
        Ok(serde_json::from_str(&text)?)
    }

    /// Readings stored (sum of series counts) and distinct (device, metric, ts) among them.
    pub async fn stored(&self) -> Result<(u64, u64)> {
        let mut total = 0;
        let mut distinct = 0;
        let mut after = String::new();
        loop {
            let page = self
                .get(&format!("/v1/series?limit=500&after={after}"))
                .await?;
            for series in page["series"].as_array().into_iter().flatten() {
                let id = series["id"].as_str().unwrap_or_default();
                let mut seen = std::collections::HashSet::new();
                let mut cursor = String::new();
                loop {
                    let mut path = format!("/v1/series/{id}/readings?limit=10000");
                    if !cursor.is_empty() {
                        path.push_str(&format!("&after={cursor}"));
                    }
                    let page = self.get(&path).await?;
                    for r in page["readings"].as_array().into_iter().flatten() {
                        total += 1;
                        seen.insert(r["ts_ms"].as_i64().unwrap_or_default());
                    }
                    match page["next_after"].as_str() {
                        Some(c) => cursor = c.to_string(),
                        None => break,
                    }
                }
                distinct += seen.len() as u64;
            }
            match page["next_after"].as_str() {
                Some(a) => after = a.to_string(),
                None => return Ok((total, distinct)),
            }
        }
    }

    /// Sum of the series counts (cheap).
    pub async fn count(&self) -> Result<u64> {
        let mut total = 0;
        let mut after = String::new();
        loop {
            let page = self
                .get(&format!("/v1/series?limit=500&after={after}"))
                .await?;
            for series in page["series"].as_array().into_iter().flatten() {
                total += series["count"].as_u64().unwrap_or(0);
            }
            match page["next_after"].as_str() {
                Some(a) => after = a.to_string(),
                None => return Ok(total),
            }
        }
    }
}

/// One uplink target of an edge.
pub struct TargetSpec {
    pub name: String,
    pub endpoints: Vec<String>,
    pub ca: PathBuf,
    pub token: String,
    pub site_id: String,
    /// `(devices glob, metrics glob)`; empty: everything.
    pub include: Vec<(String, String)>,
    /// Windowed aggregates of this many seconds instead of raw readings.
    pub aggregate_window_s: Option<u64>,
}

/// An edge agent process with an MQTT listener and device credentials.
pub struct EdgeNode {
    pub dir: PathBuf,
    pub mqtt_port: u16,
    pub http_port: u16,
    pub devices: Vec<(String, String)>,
    config_path: PathBuf,
    child: Option<Child>,
}

impl EdgeNode {
    pub async fn start(dir: &Path, devices: usize, targets: &[TargetSpec]) -> Result<EdgeNode> {
        std::fs::create_dir_all(dir)?;
        let mqtt_port = free_port();
        let http_port = free_port();
        let devices: Vec<(String, String)> = (1..=devices)
            .map(|i| (format!("dev-{i}"), format!("secret-{i}-{}", free_port())))
            .collect();
        let mut toml = format!(
            "[gateway]\nid = \"e2e-gateway\"\ndata_dir = {:?}\n[clean.skew.defaults]\nenabled = false\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n[mqtt]\n[[mqtt.listeners]]\naddress = \"127.0.0.1:{mqtt_port}\"\n",
            dir.display().to_string()
        );
        let params = fieldgate_edge::ingress::mqtt::PasswordHashParams::new(1024, 1, 1, None)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (id, password) in &devices {
            let hash = fieldgate_edge::ingress::mqtt::hash_password_with(password, params.clone())?;
            toml.push_str(&format!(
                "[[mqtt.devices]]\nid = {id:?}\npassword_hash = {hash:?}\n"
            ));
        }
        for target in targets {
            toml.push_str(&format!(
                "[[targets]]\nname = {:?}\nendpoints = {:?}\nca = {:?}\nbatch_max_readings = 2000\nbatch_max_age_ms = 50\nrequest_timeout_ms = 3000\n",
                target.name,
                target.endpoints,
                target.ca.display().to_string()
            ));
            if let Some(window) = target.aggregate_window_s {
                toml.push_str(&format!("[targets.aggregate]\nwindow_s = {window}\n"));
            }
            for (devices, metrics) in &target.include {
                toml.push_str(&format!(
                    "[[targets.include]]\ndevices = {devices:?}\nmetrics = {metrics:?}\n"
                ));
            }
            toml.push_str(&format!(
                "[targets.enrollment]\ntoken = {:?}\nsite_id = {:?}\nname = \"e2e-{}\"\n",
                target.token, target.site_id, target.name
            ));
        }
        let config_path = dir.join("edge.toml");
        std::fs::write(&config_path, toml)?;
        let mut edge = EdgeNode {
            dir: dir.to_path_buf(),
            mqtt_port,
            http_port,
            devices,
            config_path,
            child: None,
        };
        edge.restart().await?;
        Ok(edge)
    }

    pub async fn restart(&mut self) -> Result<()> {
        let edge_log = std::env::var("FIELDGATE_E2E_EDGE_LOG").ok();
        let child = Command::new(binary("fieldgate-edge"))
            .args(["run", "--config"])
            .arg(&self.config_path)
            // FIELDGATE_E2E_EDGE_LOG=warn shows the uplink's retries while debugging a test (the
            // agent logs to stdout).
            .env("RUST_LOG", edge_log.as_deref().unwrap_or("error"))
            .stdout(if edge_log.is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting fieldgate-edge")?;
        self.child = Some(child);
        let url = format!("http://127.0.0.1:{}/healthz", self.http_port);
        wait_until(Duration::from_secs(30), "the edge to answer", || {
            let url = url.clone();
            async move {
                reqwest::get(url)
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await
    }

    /// SIGKILL, as a power cut would.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// SIGTERM and wait: the agent drains and flushes.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
        }
    }

    pub async fn status(&self) -> Result<Value> {
        Ok(
            reqwest::get(format!("http://127.0.0.1:{}/status", self.http_port))
                .await?
                .json()
                .await?,
        )
    }

    /// Readings journaled (sequence numbers start at 1).
    pub async fn journaled(&self) -> Result<u64> {
        Ok(self.status().await?["journal"]["next_seq"]
            .as_u64()
            .unwrap_or(1)
            - 1)
    }

    /// The journal backlog of a target.
    pub async fn backlog(&self, target: &str) -> Result<u64> {
        let status = self.status().await?;
        let backlog = status["journal"]["backlog"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|entry| entry[0] == target)
            .and_then(|entry| entry[1].as_u64())
            .context("no such target")?;
        Ok(backlog)
    }
}

/// MQTT devices publishing `messages` JSON messages of 4 readings each at QoS 1; returns the
/// number acknowledged per device. Timestamps are unique per device (`offset` + i).
pub async fn publish(edge: &EdgeNode, messages: u64, offset: u64) -> Vec<u64> {
    let mut tasks = Vec::new();
    for (id, password) in edge.devices.clone() {
        let port = edge.mqtt_port;
        tasks.push(tokio::spawn(async move {
            publish_one(&id, &password, port, messages, offset).await
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.push(task.await.unwrap_or(0));
    }
    acked
}

async fn publish_one(id: &str, password: &str, port: u16, messages: u64, offset: u64) -> u64 {
    let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    options.set_credentials(id, password);
    options.set_clean_session(false);
    options.set_inflight(50);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
    let topic = format!("devices/{id}/readings");
    let done = Arc::new(AtomicBool::new(false));
    let publisher = {
        let done = done.clone();
        tokio::spawn(async move {
            for i in 0..messages {
                let n = offset + i;
                let payload = json!({
                    "ts": 1_767_225_600_000u64 + n * 10,
                    "temperature": 20.0 + (n % 100) as f64 / 10.0,
                    "humidity": 40.0 + (n % 50) as f64 / 10.0,
                    "pressure": 1013.2,
                    "vibration": (n % 7) as f64 / 1000.0,
                });
                if client
                    .publish(
                        &topic,
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        payload.to_string(),
                    )
                    .await
                    .is_err()
                {
                    break;
                }
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let acked = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        match eventloop.poll().await {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                let n = acked.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= messages {
                    break;
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let _ = publisher.await;
    acked.load(Ordering::Relaxed)
}

/// What the fault proxy does to connections.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Delay every chunk forwarded by this much.
    pub delay: Duration,
    /// Reset every n-th connection after its first bytes (0: never).
    pub reset_every: u64,
    /// Every n-th connection goes silent (half-open: nothing forwarded, nothing closed).
    pub half_open_every: u64,
    /// Refuse (close at once) every n-th connection.
    pub drop_every: u64,
}

/// A TCP proxy on loopback that injects `faults` between clients and `upstream`.
pub async fn fault_proxy(
    upstream: SocketAddr,
    faults: Faults,
) -> Result<(SocketAddr, Arc<AtomicU64>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let connections = Arc::new(AtomicU64::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
            let faults = faults.clone();
            tokio::spawn(async move {
                if faults.drop_every > 0 && n.is_multiple_of(faults.drop_every) {
                    return;
                }
                let half_open =
                    faults.half_open_every > 0 && n.is_multiple_of(faults.half_open_every);
                let reset = faults.reset_every > 0 && n.is_multiple_of(faults.reset_every);
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let delay = faults.delay;
                let up = async {
                    let mut buf = vec![0u8; 16384];
                    let mut forwarded = 0usize;
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if half_open {
                            continue;
                        }
                        if reset && forwarded > 0 {
                            break;
                        }
                        tokio::time::sleep(delay).await;
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        forwarded += n;
                    }
                };
                let down = async {
                    let mut buf = vec![0u8; 16384];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if half_open {
                            continue;
                        }
                        tokio::time::sleep(delay).await;
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                tokio::select! { _ = up => {}, _ = down => {} }
            });
        }
    });
    Ok((addr, connections))
}
