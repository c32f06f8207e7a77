//! The agent binary with simulated serial devices on pseudo-terminals: readings reach the
//! journal, the local API reports them, and `kill -9` at random moments never loses a reading
//! that a device saw acknowledged.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fieldgate_edge::journal::{Journal, JournalConfig, OverflowPolicy};
use fieldgate_firmware_bridge::sim_serial::{spawn_devices, DeviceConfig, SerialFleet};
use fieldgate_shared::generate::Rng;
use fieldgate_shared::Reading;

const DEVICES: usize = 3;

struct Agent {
    child: Child,
    http: String,
}

impl Agent {
    fn start(config: &Path, http: &str) -> Agent {
        let child = Command::new(env!("CARGO_BIN_EXE_fieldgate-edge"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the agent starts");
        Agent {
            child,
            http: http.to_owned(),
        }
    }

    fn status(&self) -> Option<serde_json::Value> {
        let mut stream = std::net::TcpStream::connect(&self.http).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET /status HTTP/1.0\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        serde_json::from_str(response.split_once("\r\n\r\n")?.1).ok()
    }

    fn get(&self, path: &str) -> Option<String> {
        let mut stream = std::net::TcpStream::connect(&self.http).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        Some(response.split_once("\r\n\r\n")?.1.to_owned())
    }

    fn next_seq(&self) -> Option<u64> {
        self.status()?["journal"]["next_seq"].as_u64()
    }

    fn kill_9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn terminate(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "the agent exits cleanly on SIGTERM: {status}"
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Simulated devices sampling every 20 ms; their gateway ends stay open (unread) so the ptys
/// stay up while the agent comes and goes.
fn devices() -> (SerialFleet, Vec<Option<tokio_serial::SerialStream>>) {
    let mut fleet = spawn_devices(DEVICES, |i| {
        let mut config = DeviceConfig::for_index(i);
        config.sample_interval_ms = 20;
        config.retransmit_initial_ms = 100;
        config.retransmit_max_ms = 500;
        config.link_timeout_ms = 1_000;
        config
    })
    .expect("pseudo-terminals");
    let held = fleet
        .devices
        .iter_mut()
        .map(|d| d.gateway_end.take())
        .collect();
    (fleet, held)
}

fn write_config(dir: &Path, fleet: &SerialFleet, http: &str) -> std::path::PathBuf {
    write_config_with(dir, fleet, http, "")
}

fn write_config_with(
    dir: &Path,
    fleet: &SerialFleet,
    http: &str,
    extra: &str,
) -> std::path::PathBuf {
    let mut text = format!(
        "[gateway]\nid = \"gw-test\"\ndata_dir = {:?}\n\n[journal]\n\n[http]\nlisten = \"{http}\"\n",
        dir.join("data").display().to_string()
    );
    text += extra;
    for device in &fleet.devices {
        text += &format!(
            "\n[[serial]]\npath = {:?}\n",
            device.path.display().to_string()
        );
    }
    let path = dir.join("edge.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn journal_readings(dir: &Path) -> Vec<Reading> {
    let (mut journal, report) = Journal::open(JournalConfig {
        path: dir.join("data").join("journal"),
        targets: vec!["cloud".into()],
        quota_bytes: u64::MAX,
        overflow: OverflowPolicy::PushBack,
        compaction_slack_bytes: u64::MAX,
    })
    .unwrap();
    assert_eq!(report.moved_aside, None, "the journal survived");
    journal
        .read_from(1, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect()
}

fn key(r: &Reading) -> (String, String, i64) {
    (r.device.to_string(), r.metric.to_string(), r.ts_ms)
}

async fn wait_until(what: &str, deadline: Duration, mut ready: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < deadline,
            "{what} did not happen within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_devices_reach_the_journal_and_the_status_api() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, _held) = devices();
    let http = format!("127.0.0.1:{}", free_port());
    let config = write_config(dir.path(), &fleet, &http);
    let agent = Agent::start(&config, &http);
    wait_until(
        "readings reach the journal",
        Duration::from_secs(20),
        || agent.next_seq().unwrap_or(0) > 300,
    )
    .await;
    let status = agent.status().unwrap();
    assert_eq!(status["gateway"], "gw-test");
    assert_eq!(status["serial_links"].as_array().unwrap().len(), DEVICES);
    let metrics = {
        let mut stream = std::net::TcpStream::connect(&http).unwrap();
        write!(stream, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    };
    assert!(
        metrics.contains("fieldgate_readings_durable_total"),
        "{metrics}"
    );
    assert!(metrics.contains("fieldgate_journal_backlog_readings{target=\"cloud\"}"));
    agent.terminate();

    let devices = fleet.shutdown().await;
    let stored: HashSet<_> = journal_readings(dir.path()).iter().map(key).collect();
    for device in &devices {
        for reading in device.acked_readings() {
            assert!(
                stored.contains(&key(reading)),
                "acknowledged but not journaled: {reading:?}"
            );
        }
    }
}

/// At least 200 kill points: the agent is killed with SIGKILL at a random moment (5 to 150 ms
/// after it is back to ingesting), restarted, and must be ingesting again within 5 s; at the end
/// every reading any device saw acknowledged is in the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_no_acknowledged_reading() {
    let kill_points: usize = std::env::var("FIELDGATE_KILL_POINTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().unwrap();
    let (fleet, _held) = devices();
    let http = format!("127.0.0.1:{}", free_port());
    let config = write_config(dir.path(), &fleet, &http);
    let mut rng = Rng::new(99);
    let mut agent = Agent::start(&config, &http);
    for _ in 0..kill_points {
        // Back to ingesting: the journal grows.
        let mut before = None;
        wait_until(
            "the agent ingests again",
            Duration::from_secs(5),
            || match (agent.next_seq(), before) {
                (Some(seq), None) => {
                    before = Some(seq);
                    false
                }
                (Some(seq), Some(first)) => seq > first,
                (None, _) => false,
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(5 + rng.next_u64() % 145)).await;
        agent.kill_9();
        agent = Agent::start(&config, &http);
    }
    // A last clean stop, so that what the devices saw acknowledged last is on disk for sure.
    wait_until("the agent ingests again", Duration::from_secs(5), || {
        agent.next_seq().is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.terminate();
    let devices = fleet.shutdown().await;

    let journaled = journal_readings(dir.path());
    let stored: HashSet<_> = journaled.iter().map(key).collect();
    let mut acked = 0;
    for device in &devices {
        for reading in device.acked_readings() {
            acked += 1;
            assert!(
                stored.contains(&key(reading)),
                "acknowledged but lost: {reading:?}"
            );
        }
    }
    assert!(acked > 1_000, "only {acked} readings acknowledged");
    eprintln!(
        "{kill_points} kill points: {acked} readings acknowledged, {} journaled ({} distinct)",
        journaled.len(),
        stored.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_readings_are_quarantined_counted_and_not_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, _held) = devices();
    let http = format!("127.0.0.1:{}", free_port());
    // Humidity above 0 % is "out of range" here: every humidity reading is rejected.
    let rule = "\n[[clean.range.rules]]\nmetric = \"humidity\"\nmax = 0.0\n";
    let config = write_config_with(dir.path(), &fleet, &http, rule);
    let agent = Agent::start(&config, &http);
    wait_until(
        "readings reach the journal",
        Duration::from_secs(20),
        || agent.next_seq().unwrap_or(0) > 300,
    )
    .await;
    let quarantine: serde_json::Value =
        serde_json::from_str(&agent.get("/quarantine?limit=5").unwrap()).unwrap();
    let entries = quarantine["entries"].as_array().unwrap();
    assert!(!entries.is_empty() && entries.len() <= 5, "{quarantine}");
    assert_eq!(entries[0]["reading"]["metric"], "humidity", "{quarantine}");
    let metrics = agent.get("/metrics").unwrap();
    let above_max = metrics
        .lines()
        .find(|l| l.starts_with("fieldgate_clean_rejected_total{reason=\"above_max\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(above_max > 10, "{metrics}");
    agent.terminate();
    let _ = fleet.shutdown().await;
    let journaled = journal_readings(dir.path());
    assert!(!journaled.is_empty());
    assert!(journaled.iter().all(|r| r.metric.as_str() != "humidity"));
}

const MQTT_DEVICE: &str = "meter-7";
const MQTT_PASSWORD: &str = "a-long-device-password";

/// The `[mqtt]` section: a listener on `port` and the one device, `meter-7`.
fn mqtt_section(port: u16) -> String {
    let hash = fieldgate_edge::ingress::mqtt::hash_password(MQTT_PASSWORD).unwrap();
    format!(
        "\n[mqtt]\n[[mqtt.listeners]]\naddress = \"127.0.0.1:{port}\"\n[[mqtt.devices]]\nid = \"{MQTT_DEVICE}\"\npassword_hash = \"{hash}\"\n"
    )
}

/// Publishes every payload at QoS 1 as `meter-7` and returns once each is PUBACKed, that is
/// durable; panics if the PUBACKs stop coming.
async fn publish_until_all_acknowledged(port: u16, payloads: Vec<String>) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut options = MqttOptions::new(MQTT_DEVICE, "127.0.0.1", port);
    options.set_credentials(MQTT_DEVICE, MQTT_PASSWORD);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let expected = payloads.len();
    tokio::spawn(async move {
        for payload in payloads {
            let topic = format!("devices/{MQTT_DEVICE}/readings");
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
    });
    let mut pubacks = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while pubacks < expected {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => pubacks += 1,
            Ok(Ok(_)) => {}
            Ok(Err(err)) => panic!("MQTT connection failed after {pubacks} PUBACKs: {err:?}"),
            Err(_) => panic!("only {pubacks} of {expected} PUBACKs: collection stalled"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_devices_are_acknowledged_once_their_readings_are_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, _held) = devices();
    let http = format!("127.0.0.1:{}", free_port());
    let mqtt_port = free_port();
    let config = write_config_with(dir.path(), &fleet, &http, &mqtt_section(mqtt_port));
    let agent = Agent::start(&config, &http);
    wait_until("the agent is up", Duration::from_secs(20), || {
        agent.next_seq().is_some()
    })
    .await;
    let payloads = (0..20i64)
        .map(|i| {
            format!(
                "{{\"ts\": {}, \"temperature\": 21.53, \"count\": {i}}}",
                1_767_225_600_000 + i * 1_000
            )
        })
        .collect();
    publish_until_all_acknowledged(mqtt_port, payloads).await;
    let status = agent.status().unwrap();
    assert!(status["mqtt"].is_object(), "{status}");
    agent.terminate();
    let _ = fleet.shutdown().await;
    let from_mqtt: Vec<Reading> = journal_readings(dir.path())
        .into_iter()
        .filter(|r| r.device.as_str() == MQTT_DEVICE)
        .collect();
    // Every PUBACKed message's two readings are in the journal.
    assert_eq!(from_mqtt.len(), 40, "{from_mqtt:?}");
}

/// Every cloud target unreachable (none ever acknowledges) for long enough that the journal hits
/// its quota: collection goes on, the drop-oldest policy makes room, and /metrics says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_goes_on_when_no_target_ever_acknowledges() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, _held) = devices();
    let http = format!("127.0.0.1:{}", free_port());
    let mqtt_port = free_port();
    let targets = "\n[[targets]]\nname = \"private\"\n[[targets]]\nname = \"public\"\n";
    let extra = mqtt_section(mqtt_port) + targets;
    let config = write_config_with(dir.path(), &fleet, &http, &extra);
    // A 20 kB journal that drops its oldest readings when full.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[journal]\n",
        "[journal]\nquota_mb = 0.02\noverflow = \"drop-oldest\"\n",
    );
    std::fs::write(&config, text).unwrap();
    let agent = Agent::start(&config, &http);
    wait_until("the agent is up", Duration::from_secs(20), || {
        agent.next_seq().is_some()
    })
    .await;
    let payloads = (0..5_000i64)
        .map(|i| {
            format!(
                "{{\"ts\": {}, \"temperature\": {}, \"humidity\": {}, \"pressure\": 1013.2, \"vibration\": 0.013}}",
                1_767_225_600_000 + i * 1_000,
                20.0 + (i % 100) as f64 / 100.0,
                40.0 + (i % 37) as f64 / 10.0
            )
        })
        .collect();
    publish_until_all_acknowledged(mqtt_port, payloads).await;
    let status = agent.status().unwrap();
    let journal = &status["journal"];
    assert!(
        journal["stats"]["readings_dropped_for_quota"]
            .as_u64()
            .unwrap()
            > 0,
        "{status}"
    );
    assert!(
        journal["held_bytes"].as_u64().unwrap() <= 20_972,
        "{status}"
    );
    // Both targets are behind by exactly what is held.
    let held = journal["readings_held"].as_u64().unwrap();
    for backlog in journal["backlog"].as_array().unwrap() {
        assert_eq!(backlog[1].as_u64().unwrap(), held, "{status}");
    }
    agent.terminate();
    let _ = fleet.shutdown().await;
}

/// A Modbus RTU line (the simulator on a pty, polled per the example energy-meter map) feeds
/// the journal through the agent's supervised poller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_units_are_polled_into_the_journal() {
    use fieldgate_firmware_bridge::modbus::{
        Fault, ModbusSimulator, RegisterMap, SimulatedUnit, SimulatedValues, SimulatorOptions,
    };
    let dir = tempfile::tempdir().unwrap();
    let maps =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-bridge/examples/register-maps");
    let map = std::sync::Arc::new(RegisterMap::from_file(&maps.join("energy-meter.toml")).unwrap());
    let simulator = ModbusSimulator::start(
        &[SimulatedUnit {
            unit_id: 1,
            map,
            values: SimulatedValues::Generated {
                seed: 1,
                sample_interval: Duration::from_millis(100),
            },
            fault: Fault::None,
        }],
        SimulatorOptions::default(),
    )
    .unwrap();
    let poller = dir.path().join("modbus.toml");
    std::fs::write(
        &poller,
        format!(
            "[port]\npath = {:?}\nbaud_rate = 9600\n\n[polling]\nrequest_timeout_ms = 500\n\n[[devices]]\nid = \"meter-01\"\nunit_id = 1\nmap = {:?}\n",
            simulator.port_path().display().to_string(),
            maps.join("energy-meter.toml").display().to_string()
        ),
    )
    .unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "modbus = [\"modbus.toml\"]\n\n[gateway]\nid = \"gw-test\"\ndata_dir = {:?}\n\n[http]\nlisten = \"{http}\"\n",
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let agent = Agent::start(&config, &http);
    wait_until(
        "Modbus readings reach the journal",
        Duration::from_secs(30),
        || agent.next_seq().unwrap_or(0) > 20,
    )
    .await;
    agent.terminate();
    simulator.stop().await;
    let journaled = journal_readings(dir.path());
    assert!(journaled.iter().all(|r| r.device.as_str() == "meter-01"));
    assert!(journaled.len() >= 20);
}
