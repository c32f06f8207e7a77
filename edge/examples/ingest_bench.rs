//! MQTT devices into the durable journal: BENCH.md's forward load (20 devices × 10,000 QoS 1
//! messages of 4 readings) against a real `fieldgate-edge` process, measured from outside.
//!
//! ```sh
//! cargo build --release -p fieldgate-edge --bin fieldgate-edge --example ingest_bench
//! ./target/release/examples/ingest_bench [--devices 20] [--messages 10000]
//! ```
//!
//! Prints readings/s (first publish to last PUBACK, and a PUBACK only follows the durable write),
//! the PUBACK latency p50/p99 (publish to durable), the agent's CPU seconds per 100,000 readings,
//! its peak RSS, and the bytes it wrote to disk per reading (/proc/PID/io).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// User plus system CPU seconds of a process.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::main]
async fn main() {
    let devices = arg("--devices", 20);
    let messages = arg("--messages", 10_000);
    let readings_total = devices * messages * 4;
    let agent_binary: PathBuf = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("fieldgate-edge");
    assert!(
        agent_binary.exists(),
        "build it first: cargo build --release -p fieldgate-edge"
    );

    let dir = tempfile::tempdir().unwrap();
    let (http, mqtt) = (free_port(), free_port());
    let password = "bench-device-password";
    let hash = fieldgate_edge::ingress::mqtt::hash_password(password).unwrap();
    let mut config = format!(
        "[gateway]\nid = \"gw-bench\"\ndata_dir = {:?}\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n\n[mqtt]\nmax_inflight = 1000\n[[mqtt.listeners]]\naddress = \"127.0.0.1:{mqtt}\"\n",
        dir.path().join("data").display().to_string()
    );
    for d in 0..devices {
        config += &format!("[[mqtt.devices]]\nid = \"dev-{d:02}\"\npassword_hash = \"{hash}\"\n");
    }
    let config_path = dir.path().join("edge.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut agent = Command::new(&agent_binary)
        .args(["run", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = agent.id();
    while std::net::TcpStream::connect(("127.0.0.1", http)).is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let idle_rss_kb = proc_field(pid, "status", "VmRSS:");
    let cpu_before = cpu_seconds(pid);
    let written_before = proc_field(pid, "io", "write_bytes:");

    let started = Instant::now();
    let mut tasks = Vec::new();
    for d in 0..devices {
        tasks.push(tokio::spawn(async move {
            let id = format!("dev-{d:02}");
            let mut options = MqttOptions::new(&id, "127.0.0.1", mqtt);
            options.set_credentials(&id, password);
            options.set_inflight(200);
            options.set_keep_alive(Duration::from_secs(60));
            let (client, mut eventloop) = AsyncClient::new(options, 1_000);
            let topic = format!("devices/{id}/readings");
            tokio::spawn(async move {
                let (mut t, mut h, mut p, mut v) = (21.53f64, 40.2f64, 1013.2f64, 0.013f64);
                for i in 0..messages {
                    // Values drift like real sensors, at their sensors' decimals.
                    let step = ((i * 7919 + d * 104_729) % 7) as f64 - 3.0;
                    t = ((t + step * 0.01) * 100.0).round() / 100.0;
                    h = ((h + step * 0.1) * 10.0).round() / 10.0;
                    p = ((p + step * 0.1) * 10.0).round() / 10.0;
                    v = ((v + step * 0.001).abs() * 1000.0).round() / 1000.0;
                    let payload = format!(
                        "{{\"ts\": {}, \"temperature\": {t}, \"humidity\": {h}, \"pressure\": {p}, \"vibration\": {v}}}",
                        1_767_225_600_000i64 + i as i64 * 1_000
                    );
                    client.publish(&topic, QoS::AtLeastOnce, false, payload).await.unwrap();
                }
            });
            let mut sent: HashMap<u16, Instant> = HashMap::new();
            let mut latencies = Vec::with_capacity(messages);
            while latencies.len() < messages {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        sent.insert(pkid, Instant::now());
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(at) = sent.remove(&ack.pkid) {
                            latencies.push(at.elapsed());
                        }
                    }
                    Ok(_) => {}
                    Err(err) => panic!("{id}: {err:?}"),
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu_before;
    let written = proc_field(pid, "io", "write_bytes:") - written_before;
    let peak_rss_kb = proc_field(pid, "status", "VmHWM:");
    latencies.sort();
    let percentile =
        |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    agent.wait().unwrap();

    println!("devices                     {devices}");
    println!("readings (durable, PUBACKed) {readings_total}");
    println!(
        "readings/s                  {:.0}",
        readings_total as f64 / elapsed
    );
    println!(
        "PUBACK latency p50          {:.1} ms",
        percentile(0.50).as_secs_f64() * 1e3
    );
    println!(
        "PUBACK latency p99          {:.1} ms",
        percentile(0.99).as_secs_f64() * 1e3
    );
    println!(
        "edge CPU s per 100k         {:.3}",
        cpu / readings_total as f64 * 100_000.0
    );
    println!(
        "edge peak RSS               {:.1} MB (idle before the load: {:.1} MB)",
        peak_rss_kb as f64 / 1024.0,
        idle_rss_kb as f64 / 1024.0
    );
    println!(
        "disk bytes written/reading  {:.2}",
        written as f64 / readings_total as f64
    );
}
