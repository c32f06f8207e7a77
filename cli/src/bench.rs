//! `fieldgate bench forward|outage`: BENCH.md's forward and outage workloads, end to end.
//!
//! A cloud runs in this process (SQLite, loopback, a scratch directory); the edge agent runs as
//! a separate `fieldgate-edge` process (the binary next to this one) so its CPU time and peak
//! RSS can be read from `/proc`; simulated MQTT devices (rumqttc, QoS 1) in this process publish
//! as fast as the gateway acknowledges. Everything shares the machine's cores.
//!
//! - forward: devices × messages × 4 readings, from the first PUBLISH until the cloud has
//!   acknowledged every journaled reading (the edge's `/status`), checked afterwards against the
//!   cloud's stored counts (`GET /v1/series`).
//! - outage: the same load with the cloud down until the edge has journaled `--outage-readings`
//!   readings; then the cloud comes up (same port, same data) and the time until that backlog
//!   is in the cloud is measured, while the devices keep publishing.

use crate::demo::{provision, Api, Provisioned};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use fieldgate_cloud::RunningCloud;
use serde_json::{json, Value};

const READINGS_PER_MESSAGE: u64 = 4;
/// How long a whole run may take before it is declared stuck.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the uplink may send nothing while readings wait before the run is declared stuck.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
const EDGE_BINARY: &str = "fieldgate-edge";

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub workload: Workload,
}

#[derive(Subcommand, Debug)]
pub enum Workload {
    /// MQTT devices through a `fieldgate-edge` process to a cloud on loopback: readings/s end
    /// to end, edge CPU seconds per 100,000 readings, edge peak RSS, uplink bytes per reading,
    /// readings lost. Needs `cargo build --release -p fieldgate-edge` first. `--json` prints
    /// `readings_per_s`, `edge_cpu_s_per_100k`, `edge_peak_rss_mb`, `uplink_bytes_per_reading`
    /// and `lost`, and `edge_peak_private_mb` (the largest sampled RssAnon: heap and stacks,
    /// without the file-backed code pages).
    Forward(LoadArgs),
    /// As forward, but the cloud is down until the edge has journaled `--outage-readings`
    /// readings: readings lost, and seconds from the cloud coming up until that backlog is in
    /// the cloud (the devices keep publishing meanwhile). `--json` prints `lost`, `drain_s` and
    /// `readings` (the backlog drained: readings journaled and not yet sent when the cloud
    /// came up).
    Outage(OutageArgs),
}

#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Simulated MQTT devices, one connection each.
    #[arg(long, default_value_t = 20)]
    pub devices: usize,
    /// Messages each device publishes (QoS 1, 4 readings each).
    #[arg(long, default_value_t = 10_000)]
    pub messages: usize,
    /// Unacknowledged QoS 1 messages each device keeps in flight.
    #[arg(long, default_value_t = 100)]
    pub inflight: u16,
    /// Batches the edge's uplink keeps in flight (its target's `in_flight`).
    #[arg(long, default_value_t = 4)]
    pub uplink_in_flight: usize,
    /// argon2id memory cost of the devices' password hashes, in KiB. Each MQTT login allocates
    /// it once in the agent; `hash_password`'s default for deployments is 19456 (19 MiB).
    #[arg(long, default_value_t = 1024)]
    pub password_kib: u32,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct OutageArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Readings the edge journals (and acknowledges) before the cloud comes up.
    #[arg(long, default_value_t = 200_000)]
    pub outage_readings: u64,
}

pub async fn run(args: BenchArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,rumqttd=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let edge_binary = std::env::current_exe()?
        .parent()
        .context("the executable has no directory")?
        .join(EDGE_BINARY);
    anyhow::ensure!(
        edge_binary.exists(),
        "{} not found: build it first: cargo build --release -p fieldgate-edge",
        edge_binary.display()
    );
    let scratch = ScratchDir::new()?;
    let log = scratch.path().join("edge.log");
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        result = async {
            match args.workload {
                Workload::Forward(load) => forward(&edge_binary, scratch.path(), load).await,
                Workload::Outage(outage_args) => outage(&edge_binary, scratch.path(), outage_args).await,
            }
        } => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = terminate.recv() => Err(anyhow::anyhow!("terminated")),
    };
    // The future above owned the edge process and has killed it by now; the scratch
    // directory goes when `scratch` drops.
    if result.is_err() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if !lines.is_empty() {
            eprintln!("last lines of the edge agent's log:");
            for line in &lines[lines.len().saturating_sub(20)..] {
                eprintln!("  {}", strip_ansi(line));
            }
        }
    }
    result
}

/// The line without terminal colour sequences (`ESC [ … letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// forward

async fn forward(edge_binary: &Path, dir: &Path, load: LoadArgs) -> Result<()> {
    let total = load.total_readings()?;
    let ports = Ports::pick()?;
    let cloud = start_cloud(dir, &ports).await?;
    let tenant = Tenant::bootstrap(&cloud).await?;
    let setup = EdgeSetup::write(dir, &ports, &tenant, &load)?;
    let mut edge = EdgeProcess::spawn(edge_binary, &setup, dir)?;
    edge.wait_enrolled().await?;

    let pid = edge.pid();
    let cpu_before = cpu_seconds(pid)?;
    let own_cpu_before = cpu_seconds(std::process::id())?;
    let idle_rss_kb = proc_status_kb(pid, "VmRSS:")?;
    let mut devices = Devices::start(&setup, &load);
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut stall = Stall::default();
    let mut last_report = Instant::now();
    // VmHWM gives the peak but not its make-up: the private part (heap, stacks) is sampled.
    let mut peak_private_kb = 0;
    let (status, finished_at) = loop {
        tokio::time::sleep(Duration::from_millis(25)).await;
        peak_private_kb = peak_private_kb.max(proc_status_kb(pid, "RssAnon:").unwrap_or(0));
        let status = edge.status().await?;
        let done = devices.all_finished();
        if done && backlog(&status) == 0 {
            break (status, Instant::now());
        }
        stall.check(&status, &devices, total)?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "not done after {RUN_TIMEOUT:?}: {}",
            progress(&status, &devices, total)
        );
        if !load.json && last_report.elapsed() > Duration::from_secs(5) {
            eprintln!("  … {}", progress(&status, &devices, total));
            last_report = Instant::now();
        }
    };
    let cpu = cpu_seconds(pid)? - cpu_before;
    let own_cpu = cpu_seconds(std::process::id())? - own_cpu_before;
    let peak_rss_kb = proc_status_kb(pid, "VmHWM:")?;
    devices.join().await?;
    let started = devices
        .first_publish
        .get()
        .copied()
        .context("no device published")?;
    let elapsed = finished_at.duration_since(started).as_secs_f64();
    edge.stop().await?;

    let stored = tenant.api.stored_count().await?;
    cloud.shutdown().await?;

    let uplink = &status["uplinks"][0];
    let sent = uplink["readings_sent"].as_u64().unwrap_or(0);
    let bytes = uplink["bytes_sent"].as_u64().unwrap_or(0);
    let lost = total.saturating_sub(stored);
    let extra = stored.saturating_sub(total);
    // Counted at the cloud: readings it does not have do not count.
    let readings_per_s = stored.min(total) as f64 / elapsed;
    let cpu_per_100k = cpu / total as f64 * 100_000.0;
    let rss_mb = peak_rss_kb as f64 / 1024.0;
    let private_mb = peak_private_kb as f64 / 1024.0;
    let bytes_per_reading = bytes as f64 / sent.max(1) as f64;
    if load.json {
        println!(
            "{}",
            json!({
                "readings_per_s": readings_per_s.round() as u64,
                "edge_cpu_s_per_100k": round(cpu_per_100k, 3),
                "edge_peak_rss_mb": round(rss_mb, 1),
                "edge_peak_private_mb": round(private_mb, 1),
                "uplink_bytes_per_reading": round(bytes_per_reading, 3),
                "lost": lost,
            })
        );
    } else {
        println!(
            "fieldgate bench forward: {} devices × {} messages × 4 readings = {total} readings, QoS 1, {} in flight per device",
            load.devices, load.messages, load.inflight
        );
        println!(
            "  readings/s end to end        {readings_per_s:>12.0}   (first PUBLISH to all in the cloud: {elapsed:.2} s; aim ≥ 200,000)"
        );
        println!(
            "  edge CPU s per 100k readings {cpu_per_100k:>12.3}   ({cpu:.2} CPU s; aim ≤ 0.3; this process, cloud and devices: {own_cpu:.2} CPU s)"
        );
        println!(
            "  edge peak RSS (VmHWM)        {rss_mb:>9.1} MB   (aim ≤ 16 MB; {:.1} MB enrolled and idle before the load)",
            idle_rss_kb as f64 / 1024.0
        );
        println!(
            "    of which private (RssAnon) {private_mb:>9.1} MB   (the rest: the agent's code and shared libraries, file-backed)"
        );
        println!(
            "  uplink bytes per reading     {bytes_per_reading:>12.3}   ({bytes} bytes in {} batches; aim ≤ 2)",
            uplink["batches_sent"].as_u64().unwrap_or(0)
        );
        print_outcome(&status, &devices, total, stored, lost, extra);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// outage

async fn outage(edge_binary: &Path, dir: &Path, args: OutageArgs) -> Result<()> {
    let load = args.load;
    let total = load.total_readings()?;
    anyhow::ensure!(
        args.outage_readings > 0 && args.outage_readings < total,
        "--outage-readings must be between 1 and the run's {total} readings"
    );
    let ports = Ports::pick()?;
    // The cloud's TLS identity first, where the cloud looks for it (and reuses it): the edge's
    // configuration names the CA, and it must survive the cloud's restarts.
    let names = fieldgate_cloud::config::TlsConfig::default().names;
    fieldgate_cloud::pki::ensure_local_server_identity(&dir.join("cloud").join("tls"), &names)?;
    // The edge cannot enroll with a cloud that is down: up once for the tenant, the
    // enrollment token and the enrollment, then down before the devices start.
    let cloud = start_cloud(dir, &ports).await?;
    let tenant = Tenant::bootstrap(&cloud).await?;
    let setup = EdgeSetup::write(dir, &ports, &tenant, &load)?;
    let mut edge = EdgeProcess::spawn(edge_binary, &setup, dir)?;
    edge.wait_enrolled().await?;
    cloud.shutdown().await.context("stopping the cloud")?;

    let mut devices = Devices::start(&setup, &load);
    let deadline = Instant::now() + RUN_TIMEOUT;
    let poll = Duration::from_millis(5);
    loop {
        tokio::time::sleep(poll).await;
        let status = edge.status().await?;
        if journaled(&status) >= args.outage_readings {
            break;
        }
        anyhow::ensure!(
            !devices.all_finished() && Instant::now() < deadline,
            "the edge journaled only {} readings: {}",
            journaled(&status),
            progress(&status, &devices, total)
        );
    }
    let down_for = devices
        .first_publish
        .get()
        .map_or(0.0, |t| t.elapsed().as_secs_f64());
    let cloud = start_cloud(dir, &ports).await?;
    let up_at = Instant::now();
    let at_up = edge.status().await?;
    let backlog_at_up = backlog(&at_up);
    let sent_at_up = sent(&at_up);
    let failures_down = at_up["uplinks"][0]["failures"].as_u64().unwrap_or(0);
    let mut first_ack: Option<f64> = None;
    let mut drained: Option<f64> = None;
    let mut stall = Stall::default();
    let (status, caught_up) = loop {
        tokio::time::sleep(poll).await;
        let status = edge.status().await?;
        stall.check(&status, &devices, total)?;
        let now = up_at.elapsed().as_secs_f64();
        let sent_since = sent(&status) - sent_at_up;
        if first_ack.is_none() && sent_since > 0 {
            first_ack = Some(now);
        }
        if drained.is_none() && sent_since >= backlog_at_up {
            drained = Some(now);
        }
        if drained.is_some() && devices.all_finished() && backlog(&status) == 0 {
            break (status, now);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not drained after {RUN_TIMEOUT:?}: {}",
            progress(&status, &devices, total)
        );
    };
    let drain_s = drained.unwrap_or(caught_up);
    devices.join().await?;
    edge.stop().await?;
    let stored = tenant.api.stored_count().await?;
    cloud.shutdown().await?;
    let lost = total.saturating_sub(stored);
    let extra = stored.saturating_sub(total);
    if load.json {
        println!(
            "{}",
            json!({"lost": lost, "drain_s": round(drain_s, 3), "readings": backlog_at_up})
        );
    } else {
        println!(
            "fieldgate bench outage: {} devices × {} messages × 4 readings = {total} readings, the cloud down until {} are journaled",
            load.devices, load.messages, args.outage_readings
        );
        println!(
            "  cloud down for               {down_for:>9.2} s    (from the first PUBLISH; {failures_down} uplink failures meanwhile)"
        );
        println!("  backlog when the cloud came  {backlog_at_up:>9} readings");
        println!(
            "  first batch accepted after   {:>9.3} s    (the uplink's retry backoff)",
            first_ack.unwrap_or(f64::NAN)
        );
        println!(
            "  backlog drained after        {drain_s:>9.3} s    (cloud up to those readings all in the cloud; aim ≤ 1 s)"
        );
        println!(
            "  everything in the cloud after{caught_up:>9.3} s    (the devices kept publishing; backlog 0, all stored)"
        );
        print_outcome(&status, &devices, total, stored, lost, extra);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Pieces

impl LoadArgs {
    fn total_readings(&self) -> Result<u64> {
        anyhow::ensure!(
            self.devices > 0 && self.messages > 0,
            "--devices and --messages must be at least 1"
        );
        anyhow::ensure!(
            self.inflight > 0 && self.uplink_in_flight > 0,
            "--inflight and --uplink-in-flight must be at least 1"
        );
        Ok(self.devices as u64 * self.messages as u64 * READINGS_PER_MESSAGE)
    }
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

fn journaled(status: &Value) -> u64 {
    status["journal"]["next_seq"]
        .as_u64()
        .unwrap_or(1)
        .saturating_sub(1)
}

fn backlog(status: &Value) -> u64 {
    status["journal"]["backlog"][0][1]
        .as_u64()
        .unwrap_or(u64::MAX)
}

fn sent(status: &Value) -> u64 {
    status["uplinks"][0]["readings_sent"].as_u64().unwrap_or(0)
}

fn progress(status: &Value, devices: &Devices, total: u64) -> String {
    format!(
        "{} of {total} readings PUBACKed, {} journaled, {} in the cloud, backlog {}, uplink failures {} (last: {})",
        devices.acked.load(Ordering::Relaxed) * READINGS_PER_MESSAGE,
        journaled(status),
        sent(status),
        backlog(status),
        status["uplinks"][0]["failures"].as_u64().unwrap_or(0),
        status["uplinks"][0]["last_error"].as_str().unwrap_or("none"),
    )
}

/// Declares a run stuck when the uplink has sent nothing for [`STALL_TIMEOUT`] while readings
/// wait (a wedged uplink would otherwise only end at [`RUN_TIMEOUT`]).
#[derive(Default)]
struct Stall {
    sent: u64,
    since: Option<Instant>,
}

impl Stall {
    fn check(&mut self, status: &Value, devices: &Devices, total: u64) -> Result<()> {
        let now = Instant::now();
        if sent(status) != self.sent || backlog(status) == 0 || self.since.is_none() {
            self.sent = sent(status);
            self.since = Some(now);
            return Ok(());
        }
        anyhow::ensure!(
            self.since
                .is_some_and(|t| now.duration_since(t) < STALL_TIMEOUT),
            "the uplink has sent nothing for {STALL_TIMEOUT:?} with readings waiting: {}",
            progress(status, devices, total)
        );
        Ok(())
    }
}

fn print_outcome(
    status: &Value,
    devices: &Devices,
    total: u64,
    stored: u64,
    lost: u64,
    extra: u64,
) {
    let uplink = &status["uplinks"][0];
    println!(
        "  PUBACKed / journaled / sent  {} / {} / {}   (MQTT reconnects {}, rejected by cleaning {})",
        devices.acked.load(Ordering::Relaxed) * READINGS_PER_MESSAGE,
        journaled(status),
        sent(status),
        devices.reconnects.load(Ordering::Relaxed),
        total.saturating_sub(journaled(status)),
    );
    println!(
        "  stored in the cloud          {stored:>12}   (GET /v1/series counts; duplicates the cloud recognised {}, uplink failures {}, declared lost by the uplink {})",
        uplink["duplicates"].as_u64().unwrap_or(0),
        uplink["failures"].as_u64().unwrap_or(0),
        uplink["declared_lost"].as_u64().unwrap_or(0),
    );
    if extra > 0 {
        println!("  lost                         {lost:>12}   ({extra} readings stored TWICE)");
    } else {
        println!("  lost                         {lost:>12}");
    }
}

/// A fresh directory for the run's state, removed when dropped unless `FIELDGATE_BENCH_KEEP`
/// is set (then its path is printed, for the edge's log and configuration).
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("fieldgate-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::env::var_os("FIELDGATE_BENCH_KEEP").is_some() {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Loopback ports fixed for the whole run, so a restarted cloud is where the edge expects it.
struct Ports {
    cloud_https: u16,
    cloud_http: u16,
    edge_http: u16,
    edge_mqtt: u16,
}

impl Ports {
    fn pick() -> Result<Self> {
        // Held together while picking, so the four differ.
        let listeners = (0..4)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()?;
        let port = |i: usize| -> Result<u16> { Ok(listeners[i].local_addr()?.port()) };
        Ok(Self {
            cloud_https: port(0)?,
            cloud_http: port(1)?,
            edge_http: port(2)?,
            edge_mqtt: port(3)?,
        })
    }
}

async fn start_cloud(dir: &Path, ports: &Ports) -> Result<RunningCloud> {
    let mut config = fieldgate_cloud::CloudConfig::with_data_dir(dir.join("cloud"));
    config.listen = SocketAddr::from(([127, 0, 0, 1], ports.cloud_https));
    config.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], ports.cloud_http)));
    fieldgate_cloud::start(config)
        .await
        .context("starting the cloud")
}

/// A tenant with a site and an enrollment token for the edge.
struct Tenant {
    api: Api,
    site_id: String,
    token: String,
    ca_path: PathBuf,
}

impl Tenant {
    async fn bootstrap(cloud: &RunningCloud) -> Result<Self> {
        let Provisioned {
            api,
            site_id,
            token,
            ..
        } = provision(cloud, "bench", "bench plant").await?;
        Ok(Self {
            api,
            site_id,
            token,
            ca_path: cloud
                .ca_path
                .clone()
                .context("the bench cloud makes its own CA")?,
        })
    }
}

/// The edge's configuration on disk, and what the devices need to connect.
struct EdgeSetup {
    config_path: PathBuf,
    http: SocketAddr,
    mqtt_port: u16,
    /// (device id, password)
    devices: Vec<(String, String)>,
}

impl EdgeSetup {
    fn write(dir: &Path, ports: &Ports, tenant: &Tenant, load: &LoadArgs) -> Result<Self> {
        let data_dir = dir.join("edge");
        std::fs::create_dir_all(&data_dir)?;
        std::fs::write(data_dir.join("enrollment-token"), &tenant.token)?;
        let params =
            fieldgate_edge::ingress::mqtt::PasswordHashParams::new(load.password_kib, 2, 1, None)
                .map_err(|e| anyhow::anyhow!("--password-kib: {e}"))?;
        let devices: Vec<(String, String)> = (0..load.devices)
            .map(|i| {
                (
                    format!("bench-{i:02}"),
                    fieldgate_cloud::ids::random_hex(16),
                )
            })
            .collect();
        let mut mqtt_devices = String::new();
        for (id, password) in &devices {
            let hash = fieldgate_edge::ingress::mqtt::hash_password_with(password, params.clone())?;
            mqtt_devices.push_str(&format!(
                "[[mqtt.devices]]\nid = {id:?}\npassword_hash = {hash:?}\n\n"
            ));
        }
        let http = SocketAddr::from(([127, 0, 0, 1], ports.edge_http));
        let toml = format!(
            "# Written by `fieldgate bench`.\n[gateway]\nid = \"bench-gateway\"\ndata_dir = {data:?}\n\n\
             [http]\nlisten = \"{http}\"\n\n\
             [mqtt]\nmax_inflight = {inflight}\n\n[[mqtt.listeners]]\naddress = \"127.0.0.1:{mqtt}\"\n\n{mqtt_devices}\
             [[targets]]\nname = \"cloud\"\nendpoints = [\"https://127.0.0.1:{https}\"]\nca = {ca:?}\n\
             batch_max_readings = 10000\nbatch_max_age_ms = 100\nin_flight = {uplink_in_flight}\n\n\
             [targets.enrollment]\ntoken_file = \"enrollment-token\"\nsite_id = {site:?}\nname = \"bench-gateway\"\n",
            data = data_dir.display().to_string(),
            inflight = load.inflight,
            uplink_in_flight = load.uplink_in_flight,
            mqtt = ports.edge_mqtt,
            https = ports.cloud_https,
            ca = tenant.ca_path.display().to_string(),
            site = tenant.site_id,
        );
        let config_path = dir.join("edge.toml");
        std::fs::write(&config_path, toml)?;
        Ok(Self {
            config_path,
            http,
            mqtt_port: ports.edge_mqtt,
            devices,
        })
    }
}

/// The `fieldgate-edge` process; killed if dropped while running.
struct EdgeProcess {
    child: Child,
    status_url: String,
    client: reqwest::Client,
}

impl EdgeProcess {
    fn spawn(binary: &Path, setup: &EdgeSetup, dir: &Path) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(dir.join("edge.log"))?;
        let mut command = Command::new(binary);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec. The
        // agent dies with this process's (main) thread even if this process is killed.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&setup.config_path)
            .env("RUST_LOG", "warn,rumqttd=off")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self {
            child,
            status_url: format!("http://{}/status", setup.http),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's `/status`; an error if the agent has exited or stopped answering.
    async fn status(&mut self) -> Result<Value> {
        let mut attempts = 0;
        loop {
            if let Some(exit) = self.child.try_wait()? {
                anyhow::bail!("the edge agent exited: {exit}");
            }
            let response = async {
                self.client
                    .get(&self.status_url)
                    .send()
                    .await?
                    .error_for_status()?
                    .json::<Value>()
                    .await
            }
            .await;
            match response {
                Ok(status) => return Ok(status),
                Err(err) if attempts >= 20 => {
                    return Err(err).context("the edge agent's /status does not answer")
                }
                Err(_) => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Until the uplink has a gateway id (enrolled, or its identity loaded).
    async fn wait_enrolled(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.status().await?;
            if status["uplinks"][0]["gateway_id"].is_string() {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the edge has not enrolled after 60 s (last uplink error: {})",
                status["uplinks"][0]["last_error"]
                    .as_str()
                    .unwrap_or("none")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited after 15 s.
    async fn stop(mut self) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet (we hold the Child).
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(exit) = self.child.try_wait()? {
                anyhow::ensure!(exit.success(), "the edge agent exited with {exit}");
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!("the edge agent did not stop within 15 s of SIGTERM; killed");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// User plus system CPU seconds of a process (`/proc/PID/stat`).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name in parentheses, from field 3 (state) on.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .context("/proc/PID/stat without utime and stime")
    };
    let ticks = field(11)? + field(12)?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    anyhow::ensure!(per_second > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(ticks as f64 / per_second as f64)
}

/// A `kB` line of `/proc/PID/status`, such as `VmHWM:` (peak RSS).
fn proc_status_kb(pid: u32, key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

/// The simulated MQTT devices of a run.
struct Devices {
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
    /// When the first PUBLISH went out on a socket.
    first_publish: Arc<OnceLock<Instant>>,
    /// PUBACKs received (messages, not readings).
    acked: Arc<AtomicU64>,
    reconnects: Arc<AtomicU64>,
}

impl Devices {
    fn start(setup: &EdgeSetup, load: &LoadArgs) -> Self {
        let first_publish = Arc::new(OnceLock::new());
        let acked = Arc::new(AtomicU64::new(0));
        let reconnects = Arc::new(AtomicU64::new(0));
        // Timestamps one second apart, ending now: each device replays `messages` seconds of
        // a sensor's life as fast as the gateway takes it.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let first_ts = (now_ms / 1000 - load.messages as i64) * 1000;
        let tasks = setup
            .devices
            .iter()
            .enumerate()
            .map(|(index, (id, password))| {
                tokio::spawn(device(
                    DeviceSpec {
                        index,
                        id: id.clone(),
                        password: password.clone(),
                        port: setup.mqtt_port,
                        messages: load.messages,
                        inflight: load.inflight,
                        first_ts,
                    },
                    first_publish.clone(),
                    acked.clone(),
                    reconnects.clone(),
                ))
            })
            .collect();
        Self {
            tasks,
            first_publish,
            acked,
            reconnects,
        }
    }

    fn all_finished(&self) -> bool {
        self.tasks.iter().all(|t| t.is_finished())
    }

    /// The devices' outcomes (call once they have all finished).
    async fn join(&mut self) -> Result<()> {
        for task in &mut self.tasks {
            task.await.context("a device task")??;
        }
        Ok(())
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct DeviceSpec {
    index: usize,
    id: String,
    password: String,
    port: u16,
    messages: usize,
    inflight: u16,
    first_ts: i64,
}

/// A sensor whose four values drift in small random steps, at their sensors' decimals.
struct Sensor {
    rng: u64,
    temperature: f64,
    humidity: f64,
    pressure: f64,
    vibration: f64,
}

impl Sensor {
    fn new(seed: u64) -> Self {
        Self {
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            temperature: 21.53,
            humidity: 40.2,
            pressure: 1013.2,
            vibration: 0.013,
        }
    }

    /// -3..=3 steps, mostly small.
    fn step(&mut self) -> f64 {
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        const STEPS: [f64; 8] = [-3.0, -1.0, -1.0, 0.0, 0.0, 1.0, 1.0, 3.0];
        STEPS[(self.rng >> 61) as usize]
    }

    fn message(&mut self, ts: i64) -> String {
        self.temperature = (self.temperature + self.step() * 0.01).clamp(-40.0, 85.0);
        self.humidity = (self.humidity + self.step() * 0.1).clamp(0.0, 100.0);
        self.pressure = (self.pressure + self.step() * 0.1).clamp(900.0, 1100.0);
        self.vibration = (self.vibration + self.step() * 0.001).clamp(0.0, 1.0);
        // Fixed decimals, as sensors print them (so every value is a JSON float).
        format!(
            "{{\"ts\": {ts}, \"temperature\": {:.2}, \"humidity\": {:.1}, \"pressure\": {:.1}, \"vibration\": {:.3}}}",
            self.temperature, self.humidity, self.pressure, self.vibration
        )
    }
}

/// One device: publishes its messages at QoS 1 with `inflight` unacknowledged, and returns
/// once every one is acknowledged. The event loop is only ever awaited to completion (it is not
/// cancel-safe).
async fn device(
    spec: DeviceSpec,
    first_publish: Arc<OnceLock<Instant>>,
    acked_total: Arc<AtomicU64>,
    reconnects: Arc<AtomicU64>,
) -> Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut options = MqttOptions::new(&spec.id, "127.0.0.1", spec.port);
    options.set_credentials(&spec.id, &spec.password);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(false);
    options.set_inflight(spec.inflight);
    let (client, mut eventloop) = AsyncClient::new(options, usize::from(spec.inflight) * 2);
    let publisher = {
        let client = client.clone();
        let topic = format!("devices/{}/readings", spec.id);
        tokio::spawn(async move {
            let mut sensor = Sensor::new(spec.index as u64 + 1);
            for i in 0..spec.messages {
                let payload = sensor.message(spec.first_ts + i as i64 * 1000);
                if client
                    .publish(&topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    let mut acked = 0usize;
    let mut errors_in_a_row = 0u32;
    while acked < spec.messages {
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                first_publish.get_or_init(Instant::now);
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                acked += 1;
                errors_in_a_row = 0;
                acked_total.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(err) => {
                errors_in_a_row += 1;
                reconnects.fetch_add(1, Ordering::Relaxed);
                anyhow::ensure!(
                    errors_in_a_row < 20,
                    "{}: {err} ({acked} of {} acknowledged)",
                    spec.id,
                    spec.messages
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    publisher.await?;
    // Hang up cleanly: until the DISCONNECT is written or the connection ends.
    let _ = client.try_disconnect();
    loop {
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    Ok(())
}
