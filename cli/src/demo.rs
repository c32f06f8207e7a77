//! `fieldgate demo`: the whole system on one machine. A cloud on SQLite, a tenant with an owner
//! and an enrollment token, an edge agent (embedded MQTT broker, sled journal) that enrolls with
//! the token, simulated devices on serial lines (pseudo-terminals, the Fieldgate serial
//! protocol) and MQTT; live progress; at the end a summary that checks that every reading the
//! devices got acknowledged reached the cloud exactly once.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use fieldgate_firmware_bridge::sim_serial::{spawn_devices, DeviceConfig};
use serde_json::{json, Value};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where all state goes (cloud database, edge journal, keys, credentials).
    #[arg(long, default_value = "fieldgate-demo")]
    pub dir: PathBuf,
    /// Keep the state of a previous run and continue from it (default: start clean).
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many seconds (default: on Ctrl-C).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Simulated serial devices (each on its own pseudo-terminal).
    #[arg(long, default_value_t = 4)]
    pub serial_devices: usize,
    /// Simulated MQTT devices.
    #[arg(long, default_value_t = 4)]
    pub mqtt_devices: usize,
    /// Milliseconds between an MQTT device's messages (4 readings each).
    #[arg(long, default_value_t = 50)]
    pub mqtt_interval_ms: u64,
    /// Two clouds: every raw reading to a private one, 1-minute aggregates of the numeric ones
    /// (min, max, sum, count, mean) to a public one.
    #[arg(long)]
    pub hybrid: bool,
}

const MARKER: &str = ".fieldgate-demo";

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn prepare_dir(dir: &Path, resume: bool) -> Result<()> {
    if dir.exists() && !resume {
        anyhow::ensure!(
            dir.join(MARKER).exists() || dir.read_dir()?.next().is_none(),
            "{} exists and is not a demo directory; pick another --dir",
            dir.display()
        );
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(MARKER), "state of `fieldgate demo`\n")?;
    Ok(())
}

/// The tenant's secrets, kept (mode 0600) so a resumed demo can use them.
#[derive(serde::Serialize, serde::Deserialize)]
struct Credentials {
    owner_email: String,
    owner_password: String,
    api_key: String,
    site_id: String,
    mqtt_passwords: Vec<(String, String)>,
    /// With `--hybrid`: the public cloud's owner key and site.
    #[serde(default)]
    public: Option<(String, String)>,
}

use fieldgate_cloud::pki::write_private;

/// A tenant bootstrapped in a running cloud (as `fieldgate-cloud admin create-tenant` does),
/// with a site and a one-hour enrollment token for it (also used by `fieldgate bench`).
pub(crate) struct Provisioned {
    pub(crate) made: fieldgate_cloud::accounts::Bootstrapped,
    pub(crate) api: Api,
    pub(crate) site_id: String,
    pub(crate) token: String,
}

pub(crate) async fn provision(
    cloud: &fieldgate_cloud::RunningCloud,
    tenant: &str,
    site: &str,
) -> Result<Provisioned> {
    let made = fieldgate_cloud::accounts::bootstrap_tenant(
        &cloud.db,
        tenant,
        &format!("owner@{tenant}.example"),
    )
    .await?;
    let api = Api {
        client: reqwest::Client::new(),
        base: format!("http://{}", cloud.http_addr.context("loopback HTTP")?),
        key: made.api_key.clone(),
    };
    let site = api
        .call(
            reqwest::Method::POST,
            "/v1/sites",
            Some(json!({"name": site})),
        )
        .await?;
    let site_id = site["id"].as_str().context("site id")?.to_string();
    let token = api
        .call(
            reqwest::Method::POST,
            "/v1/enrollment-tokens",
            Some(json!({"site_id": site_id, "expires_in_hours": 1})),
        )
        .await?;
    let token = token["secret"].as_str().context("token")?.to_string();
    Ok(Provisioned {
        made,
        api,
        site_id,
        token,
    })
}

/// The cloud's loopback HTTP API with a tenant's key (also used by `fieldgate bench`).
pub(crate) struct Api {
    pub(crate) client: reqwest::Client,
    pub(crate) base: String,
    pub(crate) key: String,
}

impl Api {
    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        anyhow::ensure!(status.is_success(), "{path}: {status} {text}");
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        })
    }

    /// Readings stored in the cloud, per (device, metric), and how many distinct keys.
    /// Readings stored, distinct (series, timestamp) among them, numeric among them, and the
    /// sum of the values of `*.count` series (what aggregates say they summarise).
    async fn stored(&self) -> Result<(u64, u64, u64, u64)> {
        let mut total = 0u64;
        let mut distinct = 0u64;
        let mut numeric = 0u64;
        let mut counted = 0u64;
        let mut after: Option<String> = None;
        loop {
            let mut path = "/v1/series?limit=500".to_string();
            if let Some(a) = &after {
                path.push_str(&format!("&after={a}"));
            }
            let page = self.call(reqwest::Method::GET, &path, None).await?;
            for series in page["series"].as_array().into_iter().flatten() {
                let id = series["id"].as_str().unwrap_or_default();
                let is_count = series["metric"]
                    .as_str()
                    .is_some_and(|m| m.ends_with(".count"));
                let mut seen = std::collections::HashSet::new();
                let mut cursor: Option<String> = None;
                loop {
                    let mut path = format!("/v1/series/{id}/readings?limit=10000");
                    if let Some(c) = &cursor {
                        path.push_str(&format!("&after={c}"));
                    }
                    let readings = self.call(reqwest::Method::GET, &path, None).await?;
                    for r in readings["readings"].as_array().into_iter().flatten() {
                        total += 1;
                        seen.insert(r["ts_ms"].as_i64().unwrap_or_default());
                        if r["value"].is_number() {
                            numeric += 1;
                        }
                        if is_count {
                            counted += r["value"].as_u64().unwrap_or(0);
                        }
                    }
                    match readings["next_after"].as_str() {
                        Some(c) => cursor = Some(c.to_string()),
                        None => break,
                    }
                }
                distinct += seen.len() as u64;
            }
            match page["next_after"].as_str() {
                Some(a) => after = Some(a.to_string()),
                None => break,
            }
        }
        Ok((total, distinct, numeric, counted))
    }

    pub(crate) async fn stored_count(&self) -> Result<u64> {
        let mut total = 0;
        let mut after: Option<String> = None;
        loop {
            let mut path = "/v1/series?limit=500".to_string();
            if let Some(a) = &after {
                path.push_str(&format!("&after={a}"));
            }
            let page = self.call(reqwest::Method::GET, &path, None).await?;
            for series in page["series"].as_array().into_iter().flatten() {
                total += series["count"].as_u64().unwrap_or(0);
            }
            match page["next_after"].as_str() {
                Some(a) => after = Some(a.to_string()),
                None => return Ok(total),
            }
        }
    }
}

/// One simulated MQTT device: publishes 4 readings per message at QoS 1 until stopped, then
/// waits for its last acknowledgements. Counts acknowledged messages.
async fn mqtt_device(
    id: String,
    password: String,
    port: u16,
    interval: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
    acked: Arc<AtomicU64>,
) {
    let mut options = rumqttc::MqttOptions::new(&id, "127.0.0.1", port);
    options.set_credentials(&id, &password);
    options.set_keep_alive(Duration::from_secs(10));
    options.set_clean_session(false);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
    let topic = format!("devices/{id}/readings");
    let publisher = {
        let client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            let mut ticker = tokio::time::interval(interval);
            while !*stop.borrow() {
                ticker.tick().await;
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                let phase = i as f64 / 50.0;
                let payload = json!({
                    "ts": ts,
                    "temperature": ((21.5 + phase.sin() * 2.0) * 100.0).round() / 100.0,
                    "humidity": ((40.0 + phase.cos() * 5.0) * 10.0).round() / 10.0,
                    "pressure": ((1013.2 + (phase / 3.0).sin()) * 10.0).round() / 10.0,
                    "vibration": ((0.013 + (phase * 7.0).sin().abs() * 0.01) * 1000.0).round() / 1000.0,
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
                i += 1;
            }
            // Leave time for the last acknowledgements, then hang up (which ends the loop below
            // if it has not ended on the last PUBACK already).
            tokio::time::sleep(Duration::from_secs(3)).await;
            let _ = client.disconnect().await;
        })
    };
    // The event loop is not cancel-safe: it is only ever awaited to completion.
    loop {
        match eventloop.poll().await {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                acked.fetch_add(1, Ordering::Relaxed);
                if publisher.is_finished() && eventloop.state.inflight() == 0 {
                    break;
                }
            }
            Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(_) if publisher.is_finished() && eventloop.state.inflight() == 0 => break,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let dir = std::path::absolute(&args.dir)?;
    prepare_dir(&dir, args.resume)?;
    println!("fieldgate demo: all state in {}", dir.display());

    // The cloud.
    let mut cloud_config = fieldgate_cloud::CloudConfig::with_data_dir(dir.join("cloud"));
    cloud_config.listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    cloud_config.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], free_port()?)));
    let cloud = fieldgate_cloud::start(cloud_config)
        .await
        .context("starting the cloud")?;
    let ca_path = cloud
        .ca_path
        .clone()
        .context("the demo cloud makes its own CA")?;
    let https = format!("https://127.0.0.1:{}", cloud.https_addr.port());
    let http = format!("http://{}", cloud.http_addr.context("loopback HTTP")?);
    println!(
        "cloud: API on {https} (and {http} on loopback), SQLite in {}",
        dir.join("cloud").display()
    );

    // The tenant, its owner, a site, an enrollment token, the MQTT devices' passwords.
    let credentials_path = dir.join("credentials.json");
    let credentials: Credentials = if args.resume && credentials_path.exists() {
        serde_json::from_slice(&std::fs::read(&credentials_path)?)?
    } else {
        let Provisioned {
            made,
            site_id,
            token,
            ..
        } = provision(&cloud, "demo", "demo plant").await?;
        std::fs::create_dir_all(dir.join("edge"))?;
        write_private(&dir.join("edge/enrollment-token"), token.as_bytes())?;
        let mqtt_passwords = (1..=args.mqtt_devices)
            .map(|i| (format!("mqtt-{i}"), fieldgate_cloud::ids::random_hex(16)))
            .collect();
        let credentials = Credentials {
            owner_email: made.owner_email,
            owner_password: made.owner_password,
            api_key: made.api_key,
            site_id,
            mqtt_passwords,
            public: None,
        };
        write_private(&credentials_path, &serde_json::to_vec_pretty(&credentials)?)?;
        credentials
    };
    let api = Api {
        client: reqwest::Client::new(),
        base: http.clone(),
        key: credentials.api_key.clone(),
    };

    // With --hybrid, a second cloud: the public one, which gets aggregates only.
    let mut credentials = credentials;
    let public = if args.hybrid {
        let mut config = fieldgate_cloud::CloudConfig::with_data_dir(dir.join("public"));
        config.listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        config.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], free_port()?)));
        let public = fieldgate_cloud::start(config)
            .await
            .context("starting the public cloud")?;
        let public_http = format!("http://{}", public.http_addr.context("loopback HTTP")?);
        if credentials.public.is_none() {
            let Provisioned {
                made,
                site_id,
                token,
                ..
            } = provision(&public, "demo", "demo plant").await?;
            std::fs::create_dir_all(dir.join("edge"))?;
            write_private(&dir.join("edge/public-enrollment-token"), token.as_bytes())?;
            credentials.public = Some((made.api_key, site_id));
            write_private(&credentials_path, &serde_json::to_vec_pretty(&credentials)?)?;
        }
        println!(
            "public cloud: API on https://{} (and {public_http}), gets 1-minute aggregates",
            public.https_addr
        );
        Some(public)
    } else {
        None
    };

    // Simulated serial devices on pseudo-terminals.
    let mut serial = spawn_devices(args.serial_devices, |i| {
        let mut config = DeviceConfig::for_index(i);
        config.keep_acked_readings = false;
        config
    })
    .context("starting the simulated serial devices")?;
    let mut held_open = Vec::new();
    let mut serial_ports = String::new();
    for device in &mut serial.devices {
        serial_ports.push_str(&format!(
            "[[serial]]\npath = {:?}\n\n",
            device.path.display().to_string()
        ));
        held_open.push(device.gateway_end.take());
    }

    // The edge agent's configuration, written where the user can read it.
    let mqtt_port = free_port()?;
    let edge_http = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut mqtt_devices = String::new();
    for (id, password) in &credentials.mqtt_passwords {
        let hash = fieldgate_edge::ingress::mqtt::hash_password(password)?;
        mqtt_devices.push_str(&format!(
            "[[mqtt.devices]]\nid = {id:?}\npassword_hash = {hash:?}\n\n"
        ));
    }
    let edge_toml = format!(
        "# Written by `fieldgate demo`.\n[gateway]\nid = \"demo-gateway\"\ndata_dir = {data:?}\n\n\
         [http]\nlisten = \"{edge_http}\"\n\n{serial_ports}\
         [mqtt]\n[[mqtt.listeners]]\naddress = \"127.0.0.1:{mqtt_port}\"\n\n{mqtt_devices}\
         [[targets]]\nname = \"cloud\"\nendpoints = [{https:?}]\nca = {ca:?}\n\n\
         [targets.enrollment]\ntoken_file = \"enrollment-token\"\nsite_id = {site:?}\nname = \"demo-gateway\"\n",
        data = dir.join("edge").display().to_string(),
        ca = ca_path.display().to_string(),
        site = credentials.site_id,
    );
    let mut edge_toml = edge_toml;
    if let (Some(public), Some((_, public_site))) = (&public, &credentials.public) {
        edge_toml.push_str(&format!(
            "\n[[targets]]\nname = \"public\"\nendpoints = [\"https://{}\"]\nca = {:?}\nbatch_max_age_ms = 1000\n\
             [targets.aggregate]\nwindow_s = 60\n\
             [targets.enrollment]\ntoken_file = \"public-enrollment-token\"\nsite_id = {public_site:?}\nname = \"demo-gateway\"\n",
            public.https_addr,
            public.ca_path.as_ref().context("the public cloud's CA")?.display().to_string(),
        ));
    }
    let edge_config_path = dir.join("edge.toml");
    std::fs::write(&edge_config_path, &edge_toml)?;
    let edge_config = fieldgate_edge::config::EdgeConfig::load(&edge_config_path)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (edge_stop_tx, mut edge_stop) = tokio::sync::watch::channel(false);
    let edge = tokio::spawn(fieldgate_edge::agent::run(edge_config, async move {
        let _ = edge_stop.wait_for(|s| *s).await;
    }));
    println!("edge: agent with MQTT on 127.0.0.1:{mqtt_port}, status on http://{edge_http}/status, config {}", edge_config_path.display());

    // MQTT devices (after the listener is up).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (devices_stop_tx, devices_stop) = tokio::sync::watch::channel(false);
    let mqtt_acked = Arc::new(AtomicU64::new(0));
    let mut mqtt_tasks = Vec::new();
    for (id, password) in &credentials.mqtt_passwords {
        mqtt_tasks.push(tokio::spawn(mqtt_device(
            id.clone(),
            password.clone(),
            mqtt_port,
            Duration::from_millis(args.mqtt_interval_ms),
            devices_stop.clone(),
            mqtt_acked.clone(),
        )));
    }
    println!(
        "devices: {} serial ({}), {} MQTT (4 readings per message every {} ms)",
        args.serial_devices,
        serial
            .devices
            .iter()
            .map(|d| d.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        args.mqtt_devices,
        args.mqtt_interval_ms
    );
    match args.duration {
        Some(s) => println!("running for {s} s (Ctrl-C stops sooner)\n"),
        None => println!("running; Ctrl-C stops\n"),
    }

    // Live progress until stopped.
    let snapshots: Vec<_> = serial.devices.iter().map(|d| d.snapshots.clone()).collect();
    let serial_acked = || {
        snapshots
            .iter()
            .map(|s| s.borrow().stats.readings_acked)
            .sum::<u64>()
    };
    let status_client = reqwest::Client::new();
    let edge_status = || {
        let client = status_client.clone();
        async move {
            client
                .get(format!("http://{edge_http}/status"))
                .send()
                .await
                .ok()?
                .json::<Value>()
                .await
                .ok()
        }
    };
    let tty = std::io::stdout().is_terminal();
    let started = Instant::now();
    let deadline = args.duration.map(|s| started + Duration::from_secs(s));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ticker = tokio::time::interval(Duration::from_millis(if tty { 500 } else { 2000 }));
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = ticker.tick() => {}
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let produced = serial_acked() + mqtt_acked.load(Ordering::Relaxed) * 4;
        let status = edge_status().await.unwrap_or_default();
        let journaled = status["journal"]["next_seq"]
            .as_u64()
            .unwrap_or(1)
            .saturating_sub(1);
        let backlog = status["journal"]["backlog"][0][1].as_u64().unwrap_or(0);
        let synced = status["uplinks"][0]["readings_sent"].as_u64().unwrap_or(0);
        let rejected = status["mqtt"]["rejected"].as_u64().unwrap_or(0);
        let line = format!(
            "{:>5.1}s  produced {produced:>8}  journaled {journaled:>8}  synced {synced:>8}  backlog {backlog:>6}  mqtt rejects {rejected}",
            started.elapsed().as_secs_f64()
        );
        if tty {
            print!("\r{line}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
        } else {
            println!("{line}");
        }
    }
    if tty {
        println!();
    }

    // Stop the devices, let the edge sync what it has, stop the edge.
    println!("stopping devices, then waiting for the edge to sync its backlog...");
    let _ = devices_stop_tx.send(true);
    for task in mqtt_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    let serial_devices = serial.shutdown().await;
    drop(held_open);
    let serial_total: u64 = serial_devices
        .iter()
        .map(|d| d.stats().readings_acked)
        .sum();
    let mqtt_total = mqtt_acked.load(Ordering::Relaxed) * 4;
    let sync_deadline = Instant::now() + Duration::from_secs(60);
    let mut status = Value::Null;
    while Instant::now() < sync_deadline {
        status = edge_status().await.unwrap_or_default();
        let drained = status["journal"]["backlog"]
            .as_array()
            .is_some_and(|targets| targets.iter().all(|t| t[1].as_u64() == Some(0)));
        if drained {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // What cleaning kept out of the journal (quarantined: spikes, ranges, duplicates, …).
    let metrics = status_client
        .get(format!("http://{edge_http}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let counter = |name: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let rejected = counter("fieldgate_clean_input_total ")
        .saturating_sub(counter("fieldgate_clean_accepted_total "));
    let _ = edge_stop_tx.send(true);
    edge.await?.context("the edge agent")?;

    // Sequence numbers start at 1.
    let journaled = status["journal"]["next_seq"]
        .as_u64()
        .unwrap_or(1)
        .saturating_sub(1);
    let uplink = &status["uplinks"][0];
    let synced = uplink["readings_sent"].as_u64().unwrap_or(0);
    let bytes = uplink["bytes_sent"].as_u64().unwrap_or(0);
    let (stored, distinct, numeric, _) = api.stored().await?;
    let stored_count = api.stored_count().await?;
    let produced = serial_total + mqtt_total;

    println!("\nsummary");
    println!(
        "  acknowledged to devices   {produced:>9}  ({serial_total} serial, {mqtt_total} MQTT)"
    );
    println!(
        "  kept out by cleaning      {rejected:>9}  (quarantined; see /quarantine while it runs)"
    );
    println!("  journaled at the edge     {journaled:>9}");
    println!(
        "  sent to the cloud         {synced:>9}  ({} duplicates the cloud recognised)",
        uplink["duplicates"].as_u64().unwrap_or(0)
    );
    println!(
        "  stored in the cloud       {stored:>9}  ({distinct} distinct device, metric and time)"
    );
    if synced > 0 {
        println!(
            "  uplink bytes per reading  {:>9.3}",
            bytes as f64 / synced as f64
        );
    }
    // Resends the cloud recognised are fine (that is what the high-water mark is for); what
    // counts is that the cloud holds what the journal holds, and the journal what devices were
    // told is safe, less what cleaning quarantined.
    let exact = stored == journaled
        && stored == stored_count
        && (args.resume || produced == journaled + rejected);
    if exact {
        println!("  CHECK: every acknowledged reading reached the cloud exactly once");
    } else {
        println!("  CHECK FAILED: the counts above differ");
    }
    let mut exact = exact;
    if let (Some(public), Some((public_key, _))) = (&public, &credentials.public) {
        let public_api = Api {
            client: reqwest::Client::new(),
            base: format!("http://{}", public.http_addr.context("loopback HTTP")?),
            key: public_key.clone(),
        };
        let (aggregates, _, _, counted) = public_api.stored().await?;
        println!("  public cloud: {aggregates} aggregate readings summarising {counted} readings (the private cloud holds {numeric} numeric ones)");
        let aggregates_exact = counted == numeric;
        if aggregates_exact {
            println!("  CHECK: the public cloud's 1-minute aggregates cover every numeric reading exactly once");
        } else {
            println!("  CHECK FAILED: the aggregates' counts differ from the raw readings");
        }
        exact &= aggregates_exact;
    }
    println!("\nexplore the API:");
    println!("  API key   {}", credentials.api_key);
    println!(
        "  owner     {} / {} (tenant demo)",
        credentials.owner_email, credentials.owner_password
    );
    println!(
        "  try       curl -s -H 'Authorization: Bearer {}' {http}/v1/gateways",
        credentials.api_key
    );
    println!(
        "  OpenAPI   {http}/v1/openapi.json; CA for HTTPS: {}",
        ca_path.display()
    );
    if tty && args.duration.is_none() {
        println!("the cloud keeps serving; Ctrl-C again to leave");
        let _ = tokio::signal::ctrl_c().await;
    } else {
        println!(
            "the cloud stops with the demo; serve its data again with\n  cargo run --release -p fieldgate-cloud -- serve --data-dir {} --http-listen {}",
            dir.join("cloud").display(),
            http.trim_start_matches("http://")
        );
    }
    cloud.shutdown().await?;
    if let Some(public) = public {
        public.shutdown().await?;
    }
    anyhow::ensure!(exact, "the demo's exactness check failed");
    Ok(())
}
