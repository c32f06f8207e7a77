//! `fieldgate-edge`: the gateway agent's command line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fieldgate_edge::config::EdgeConfig;

#[derive(Parser)]
#[command(
    name = "fieldgate-edge",
    version,
    about = "The Fieldgate gateway agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGTERM or Ctrl-C.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a configuration file and say what is wrong with it, without running anything.
    CheckConfig { config: PathBuf },
    /// Hash a device's MQTT password (argon2id) for its `password_hash` in the configuration.
    /// Reads the password from standard input, so it stays out of the shell history.
    HashPassword,
    /// Print a running agent's status (from its local HTTP API).
    Status {
        /// The agent's HTTP address.
        #[arg(long, default_value = "127.0.0.1:7780")]
        http: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => {
            let config = EdgeConfig::load(&config)?;
            println!(
                "ok: gateway {}, {} serial port(s), {} Modbus line(s), targets {}",
                config.gateway.id,
                config.serial.len(),
                config.modbus_pollers.len(),
                config
                    .targets
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
        Command::Run { config } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info,rumqttd=warn".into()),
                )
                .init();
            let config = EdgeConfig::load(&config)?;
            keep_large_allocations_returnable();
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(fieldgate_edge::agent::run(config, shutdown_signal()))
        }
        Command::HashPassword => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\n', '\r']);
            anyhow::ensure!(
                password.len() >= 12,
                "use a password of at least 12 characters"
            );
            println!(
                "{}",
                fieldgate_edge::ingress::mqtt::hash_password(password)?
            );
            Ok(())
        }
        Command::Status { http } => {
            let body = http_get(&http, "/status")?;
            println!("{body}");
            Ok(())
        }
    }
}

/// Each MQTT login verifies an argon2id hash with a 19 MiB buffer. glibc raises its mmap
/// threshold after the first such buffer is freed, so later ones come from per-thread arenas and
/// are never given back: 20 logins left the agent at 350 MB. A fixed threshold keeps large
/// buffers in mmap, returned to the system on free.
fn keep_large_allocations_returnable() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

/// A minimal HTTP/1.0 GET for the loopback status API, so the CLI needs no HTTP client.
fn http_get(address: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)
        .with_context(|| format!("connecting to the agent at {address} (is it running?)"))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "agent answered: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(body.to_owned())
}
