//! Cloud ingest throughput: `cargo run --release -p fieldgate-cloud --example cloud_ingest_bench --
//! [--backend sqlite|postgres] [--batch 1000] [--readings 1000000] [--mode store|https]`.
//!
//! `store` calls the ingest path after HTTP (check, admit, decode, stage the batch, commit)
//! batch after batch; `https` posts the same batches over
//! mutual TLS from 4 concurrent gateways' streams. Prints readings/s and batches/s (wall), the
//! process's CPU seconds and readings per CPU second (the figure "on one core"), and stored
//! bytes per reading; then compacts everything staged into series chunks and prints the same
//! figures through compaction. PostgreSQL needs FIELDGATE_TEST_POSTGRES_URL (a role that may create
//! databases); a fresh database is made for the run.

use std::time::{Duration, Instant};

use fieldgate_cloud::fleet::GatewayIdentity;
use fieldgate_cloud::{accounts, ingest, pki, AppState, CloudConfig};
use fieldgate_shared::codec::{BatchMeta, EncodeOptions, Encoder};
use fieldgate_shared::generate::{FleetConfig, SensorFleet};
use fieldgate_shared::model::{GatewayId, Reading, StreamId};
use serde_json::json;

struct Args {
    backend: String,
    batch: usize,
    readings: usize,
    mode: String,
    devices: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        backend: "sqlite".into(),
        batch: 1000,
        readings: 1_000_000,
        mode: "store".into(),
        devices: 100,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--backend" => args.backend = value,
            "--batch" => args.batch = value.parse().expect("--batch N"),
            "--readings" => args.readings = value.parse().expect("--readings N"),
            "--mode" => args.mode = value,
            "--devices" => args.devices = value.parse().expect("--devices N"),
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

fn cpu_seconds() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args();
    let dir = tempfile::tempdir()?;
    let mut config = CloudConfig::with_data_dir(dir.path().to_path_buf());
    config.listen = "127.0.0.1:0".parse()?;
    config.limits.ingest_readings_per_s = u64::MAX / 4;
    if args.backend == "postgres" {
        let admin =
            std::env::var("FIELDGATE_TEST_POSTGRES_URL").expect("FIELDGATE_TEST_POSTGRES_URL");
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&admin).await?;
        let name = format!("fieldgate_bench_{}", fieldgate_cloud::ids::random_hex(6));
        sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str()).await?;
        config.database_url = Some(format!("{}/{name}", admin.rsplit_once('/').unwrap().0));
    }
    let cloud = fieldgate_cloud::start(config.clone()).await?;
    let tenant = accounts::bootstrap_tenant(&cloud.db, "bench", "owner@bench.example").await?;
    let ca = std::fs::read(cloud.ca_path.as_ref().unwrap())?;
    let base = format!("https://127.0.0.1:{}", cloud.https_addr.port());
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
        .build()?;
    let site: serde_json::Value = client
        .post(format!("{base}/v1/sites"))
        .bearer_auth(&tenant.api_key)
        .json(&json!({"name": "bench"}))
        .send()
        .await?
        .json()
        .await?;
    let token: serde_json::Value = client
        .post(format!("{base}/v1/enrollment-tokens"))
        .bearer_auth(&tenant.api_key)
        .json(&json!({"site_id": site["id"], "expires_in_hours": 1}))
        .send()
        .await?
        .json()
        .await?;
    let (key_pem, csr_pem) = pki::new_key_and_csr("bench-gw")?;
    let issued: serde_json::Value = client
        .post(format!("{base}/v1/enroll"))
        .json(&json!({"token": token["secret"], "site_id": site["id"], "name": "bench-gw", "csr_pem": csr_pem}))
        .send()
        .await?
        .json()
        .await?;
    let gateway_id = issued["gateway_id"].as_str().unwrap().to_string();
    let cert_pem = issued["certificate_pem"].as_str().unwrap().to_string();

    // The workload: a fleet's readings, batched per stream with contiguous sequence numbers.
    let streams = if args.mode == "https" { 4 } else { 1 };
    let mut fleet = SensorFleet::new(FleetConfig {
        devices: args.devices,
        ..FleetConfig::default()
    });
    let mut encoder = Encoder::new(EncodeOptions::default())?;
    let per_stream = args.readings / streams;
    let mut batches: Vec<Vec<Vec<u8>>> = vec![Vec::new(); streams];
    let mut wire_bytes = 0usize;
    for (s, stream_batches) in batches.iter_mut().enumerate() {
        let mut seq = 0u64;
        while (seq as usize) < per_stream {
            let n = args.batch.min(per_stream - seq as usize);
            let readings: Vec<Reading> = fleet.by_ref().take(n).collect();
            let meta = BatchMeta {
                gateway: GatewayId::new(&gateway_id)?,
                stream: StreamId::new(&format!("s{s}"))?,
                first_seq: seq,
                last_seq: seq + n as u64 - 1,
            };
            let bytes = encoder.encode(&meta, &readings)?;
            wire_bytes += bytes.len();
            stream_batches.push(bytes);
            seq += n as u64;
        }
    }
    let total_batches: usize = batches.iter().map(Vec::len).sum();
    let total_readings = per_stream * streams;

    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    match args.mode.as_str() {
        "store" => {
            let state = AppState::new(cloud.db.clone(), config.clone());
            let fingerprint = {
                let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
                    .next()
                    .unwrap()?;
                pki::fingerprint(&der)
            };
            let gateway = GatewayIdentity {
                tenant_id: tenant.tenant_id.clone(),
                gateway_id: gateway_id.clone(),
                fingerprint,
                source_ip: "127.0.0.1".into(),
            };
            for bytes in &batches[0] {
                ingest::ingest_batch(&state, &gateway, bytes, None, Some(0), false)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}", e.body.message))?;
            }
        }
        "https" => {
            let identity =
                reqwest::Identity::from_pem(format!("{cert_pem}\n{key_pem}").as_bytes())?;
            let gateway_client = reqwest::Client::builder()
                .use_rustls_tls()
                .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
                .identity(identity)
                .timeout(Duration::from_secs(120))
                .build()?;
            let mut tasks = Vec::new();
            for stream_batches in batches {
                let client = gateway_client.clone();
                let url = format!("{base}/v1/ingest");
                tasks.push(tokio::spawn(async move {
                    for bytes in stream_batches {
                        let response = client.post(&url).body(bytes).send().await?;
                        anyhow::ensure!(
                            response.status().is_success(),
                            "{}",
                            response.text().await?
                        );
                    }
                    anyhow::Ok(())
                }));
            }
            for task in tasks {
                task.await??;
            }
        }
        other => anyhow::bail!("unknown --mode {other}"),
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    // Then everything staged into series chunks (the background compactor ran meanwhile too).
    let compactor = fieldgate_cloud::compact::Compactor::default();
    compactor.run(&cloud.db).await?;
    let wall_all = t0.elapsed().as_secs_f64();
    let cpu_all = cpu_seconds() - cpu0;

    let (stored,): (i64,) = sqlx::query_as("SELECT CAST(SUM(count) AS BIGINT) FROM chunks")
        .fetch_one(&cloud.db.pool)
        .await?;
    let (chunk_bytes,): (i64,) =
        sqlx::query_as("SELECT CAST(SUM(LENGTH(data)) AS BIGINT) FROM chunks")
            .fetch_one(&cloud.db.pool)
            .await?;
    anyhow::ensure!(
        stored as usize == total_readings,
        "stored {stored} of {total_readings}"
    );
    let report = json!({
        "backend": args.backend,
        "mode": args.mode,
        "batch": args.batch,
        "readings": total_readings,
        "batches": total_batches,
        "readings_per_s": (total_readings as f64 / wall).round(),
        "batches_per_s": (total_batches as f64 / wall * 10.0).round() / 10.0,
        "cpu_s": (cpu * 100.0).round() / 100.0,
        "readings_per_cpu_s": (total_readings as f64 / cpu).round(),
        "compacted_readings_per_s": (total_readings as f64 / wall_all).round(),
        "compacted_readings_per_cpu_s": (total_readings as f64 / cpu_all).round(),
        "wire_bytes_per_reading": (wire_bytes as f64 / total_readings as f64 * 1000.0).round() / 1000.0,
        "chunk_bytes_per_reading": (chunk_bytes as f64 / total_readings as f64 * 1000.0).round() / 1000.0,
    });
    println!("{report}");
    cloud.shutdown().await?;
    Ok(())
}
