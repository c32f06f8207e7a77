//! The local MQTT ingress: devices on the plant network publish readings to the gateway over
//! MQTT 3.1.1 or 5, each with its own credentials and only under its own topics; readings go to
//! the journal and a device's QoS 1 message is acknowledged only once they are durable.
//!
//! # Design: our listener in front of an embedded rumqttd
//!
//! Devices connect to a listener of ours (`connection.rs`, over the sans-IO [`codec`]), not to
//! rumqttd. rumqttd 0.20 was read for what it offers, and it cannot meet three of the
//! requirements by itself:
//! - **Topic rules.** It has a username/password hook (`ConnectionSettings::set_auth_handler`)
//!   but no per-client topic ACL, and what a local `link` receives (`Notification::Forward`: a
//!   cursor, a size, the PUBLISH) does not say which client published it. The only
//!   publisher check it has, `validate-tenant-prefix`, needs client certificates. So the ingress
//!   could not even filter after the fact.
//! - **PUBACK after durable.** Its router PUBACKs a QoS 1 PUBLISH as soon as it is appended to
//!   the in-memory commit log (`router/routing.rs`, `handle_device_payload`), before any
//!   subscriber has seen it. With rumqttd in front, a power cut could lose acknowledged data;
//!   the window would be unbounded under load.
//! - **Telling the device.** Its server has no hook to answer a refused message with an MQTT 5
//!   reason code.
//!
//! Our listener terminates MQTT (and TLS) itself: it checks the CONNECT against the device's
//! argon2id hash, checks every PUBLISH topic and SUBSCRIBE filter, parses readings and holds
//! each QoS 1 PUBACK until the journal's commit answer. rumqttd stays embedded behind it for
//! what is not readings: a device's PUBLISHes on its other own topics and its subscriptions
//! (commands to it, say) go through a per-connection rumqttd `link` whose client id is the
//! device id, and the agent's local clients reach devices through [`LocalBroker::link`].
//!
//! # Topics
//! With `topic_root = "devices"` (the default), device `<id>` connects with user name `<id>`
//! and client id `<id>` (or an empty client id, which is then assigned `<id>`), and:
//! - publishes readings on `devices/<id>/readings` (QoS 0 or 1);
//! - may publish on any other topic under `devices/<id>/`, routed through the embedded broker
//!   (acknowledged once handed to it: these are not readings and not journaled);
//! - may subscribe to filters under `devices/<id>/` (granted QoS 0: deliveries are at most once;
//!   commands get their confirmation from the device's answer, not from MQTT);
//! - may leave a will under `devices/<id>/`.
//!
//! # Sessions
//! A device connecting with a persistent session (3.1.1: clean session 0; MQTT 5: clean start 0
//! and a session expiry interval above 0) gets its subscriptions back on its next connection and
//! a CONNACK with *session present*, which is what makes an MQTT client resend its
//! unacknowledged messages (with a clean session it drops them). The gateway keeps these
//! sessions in memory, one per configured device at most, until the device returns; a gateway
//! restart forgets them. A clean session starts empty. A second connection of a device closes
//! the first (MQTT 5: DISCONNECT 0x8E) and takes over its session once the first has saved it.
//!
//! # Payloads on the readings topic
//! Every message gives zero or more readings of the publishing device; a message with one bad
//! part is refused whole.
//! - **Flat JSON object** (the form of the forward workload):
//!   `{"ts": 1700000000000, "temperature": 21.53, "humidity": 40.2}`. `ts` is UTC milliseconds;
//!   every other key is a metric name (`readings` is reserved, see below).
//! - **Array of flat objects**: `[{"ts": 1, "a": 1.5}, {"ts": 2, "a": 1.6}]`.
//! - **Explicit readings**: `{"ts": 1700000000000, "readings": [{"metric": "a", "value": 1.5},
//!   {"metric": "b", "ts": 1700000000500, "value": true, "quality": "uncertain"}]}`; an entry
//!   without `ts` takes the object's; `quality` is `good` (default), `uncertain` or `bad`; no
//!   other keys.
//! - A reading without any `ts` takes the gateway's clock when the message arrived.
//! - Values: a number written without a fraction or exponent is an `I64` (out of range:
//!   refused), one with a fraction or exponent an `F64` parsed from its text (correctly rounded,
//!   so `21.53` is the f64 nearest 21.53); `true`/`false` are `Bool`; a string of at most 255
//!   bytes is `Str`; `null` is skipped and counted; objects and arrays are refused.
//! - **Binary, version 1** (the first byte tells it from JSON, which never starts with 0x01):
//!   ```text
//!   u8      0x01, the version
//!   varint  base timestamp, zig-zag, UTC ms
//!   then entries up to the end of the payload:
//!     varint  metric: 0 = a new name follows (u8 length, then the name's UTF-8 bytes; the
//!             first 1,024 new names get indices 1, 2, … in order), k ≥ 1 = the name with index k
//!     varint  timestamp delta from the previous entry (the first: from the base), zig-zag
//!     u8      tag: bits 0–2 the value kind, bits 3–4 the quality (0 good, 1 uncertain,
//!             2 bad), bits 5–7 zero
//!     value   kind 0: f64, 8 bytes little-endian; 1: i64, zig-zag varint; 2: false; 3: true
//!             (no bytes); 4: string, u8 length then UTF-8
//!   ```
//!   varints are LEB128 (7 bits a byte, low group first); zig-zag maps 0, -1, 1, -2 … to
//!   0, 1, 2, 3 …. [`BinaryPayloadEncoder`] writes this form.
//!
//! # Refusals: counted, and told where MQTT can
//! | what | counter | MQTT 5 | MQTT 3.1.1 |
//! |---|---|---|---|
//! | unknown device, wrong or no password | `auth_failures` | CONNACK 0x86 | CONNACK 4 |
//! | client id neither empty nor the user name | `auth_bad_client_ids` | CONNACK 0x85 | CONNACK 2 |
//! | PUBLISH under another device's topics | `rejected_unauthorised_publish` | DISCONNECT 0x87 | connection closed |
//! | SUBSCRIBE outside own topics | `rejected_unauthorised_subscribe` | SUBACK 0x87 for that filter | SUBACK 0x80 |
//! | payload not readings | `rejected_malformed` | PUBACK 0x99 with the reason | PUBACK (the message is dropped) |
//! | packet over `max_packet_bytes` | `rejected_oversized` | DISCONNECT 0x95 (the limit was in the CONNACK) | PUBLISH skipped unbuffered, PUBACKed (dropped) |
//! | QoS 2 PUBLISH | `rejected_qos2` | DISCONNECT 0x9B (CONNACK said maximum QoS 1) | connection closed |
//! | broken MQTT | `protocol_errors` | DISCONNECT 0x81/0x82 | connection closed |
//!
//! MQTT 3.1.1 cannot refuse a single message: a malformed or oversized message is acknowledged
//! and dropped, as the serial protocol NACKs a frame with bad content, so a device with an
//! encoding bug does not resend it for ever. Publishing under another device's topic is an
//! attack or a misconfiguration: the connection is closed. Counters are read with
//! [`MqttIngress::stats`] and [`MqttIngressStats::snapshot`].
//!
//! # Acknowledged only when durable
//! The complete PUBLISHes of one socket read become one [`IngressBatch`] (a
//! [`fieldgate_firmware_bridge::session::DeviceBatch`], so serial and MQTT ingress feed one
//! consumer). Its QoS 1 PUBACKs are written when the consumer sends `CommitOutcome::Durable`,
//! in PUBLISH order (refusals queued behind them keep their place). `Busy`, or a dropped
//! `commit`, means not stored: no PUBACK, and the connection is closed (MQTT 5: DISCONNECT 0x89)
//! because MQTT has no negative acknowledgement; a device with a persistent session sends the
//! messages again when it reconnects. Devices that must lose nothing therefore use a persistent
//! session: with a clean session, the client itself drops unacknowledged messages when the
//! connection closes, and after a gateway restart even a persistent session's client does (the
//! session is gone, so the CONNACK says so). At most `max_inflight` QoS 1 messages per
//! connection wait for commits; past that
//! the socket is not read, which slows the device down through TCP. QoS 0 messages are handed
//! over the same way and never acknowledged. Delivery is at least once: a PUBACK lost with the
//! connection makes the device resend a message already stored, which the cleaning pipeline's
//! duplicate suppression removes.
//!
//! # Configuration (`[mqtt]`)
//! ```toml
//! topic_root = "devices"        # default
//! max_packet_bytes = 65536      # default; advertised to MQTT 5 clients
//! max_inflight = 64             # QoS 1 messages awaiting the journal, per connection
//! max_connections = 1024
//! connect_timeout_ms = 10000    # TLS handshake and CONNECT
//! max_concurrent_auth = 1       # argon2id verifications at once (cores)
//! shutdown_grace_ms = 5000
//! [[mqtt.listeners]]
//! address = "0.0.0.0:1883"
//! [[mqtt.listeners]]
//! address = "0.0.0.0:8883"
//! tls = { cert_path = "/etc/fieldgate/mqtt.crt", key_path = "/etc/fieldgate/mqtt.key" }
//! [[mqtt.devices]]
//! id = "meter-07"
//! password_hash = "$argon2id$v=19$m=19456,t=2,p=1$…"   # from hash_password, never plaintext
//! ```

mod broker;
pub mod codec;
mod config;
mod connection;
pub mod payload;
mod stats;
pub mod topics;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

/// argon2id cost parameters for [`hash_password_with`].
pub use argon2::Params as PasswordHashParams;
pub use broker::{BrokerLinkError, LocalBroker};
pub use config::{
    hash_password, hash_password_with, ConfigError, DeviceCredentials, HashPasswordError,
    ListenerConfig, MqttIngressConfig, TlsFiles,
};
pub use fieldgate_firmware_bridge::session::CommitOutcome;
pub use payload::{BinaryPayloadEncoder, PayloadError, PayloadParser};
pub use stats::{MqttIngressSnapshot, MqttIngressStats};

use connection::Shared;

/// The readings of one or more messages of one device, and the channel for the journal's
/// answer: `commit.send(CommitOutcome::Durable)` once they are on disk. The same type the
/// serial session hands over, so one consumer serves both.
pub type IngressBatch = fieldgate_firmware_bridge::session::DeviceBatch;

/// Why the ingress could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum MqttIngressError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("mqtt listener {address}: cannot listen: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("mqtt listener TLS: {}: {reason}", path.display())]
    Tls { path: PathBuf, reason: String },
    #[error("the consumer of the MQTT ingress's batches has gone")]
    SinkClosed,
}

struct BoundListener {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
}

/// The MQTT ingress with its sockets bound and its broker started, ready to [`run`](Self::run).
pub struct MqttIngress {
    config: MqttIngressConfig,
    listeners: Vec<BoundListener>,
    local_addrs: Vec<SocketAddr>,
    stats: Arc<MqttIngressStats>,
    broker: LocalBroker,
}

impl MqttIngress {
    /// Validates the configuration, loads TLS material, binds every listener and starts the
    /// embedded broker.
    pub async fn bind(config: MqttIngressConfig) -> Result<Self, MqttIngressError> {
        config.validate()?;
        let mut listeners = Vec::with_capacity(config.listeners.len());
        let mut local_addrs = Vec::with_capacity(config.listeners.len());
        for listener_config in &config.listeners {
            let tls = listener_config.tls.as_ref().map(load_tls).transpose()?;
            let listener = TcpListener::bind(listener_config.address)
                .await
                .map_err(|source| MqttIngressError::Bind {
                    address: listener_config.address,
                    source,
                })?;
            let local_addr = listener
                .local_addr()
                .map_err(|source| MqttIngressError::Bind {
                    address: listener_config.address,
                    source,
                })?;
            tracing::info!(address = %local_addr, tls = tls.is_some(), "MQTT ingress listening");
            local_addrs.push(local_addr);
            listeners.push(BoundListener { listener, tls });
        }
        let broker = LocalBroker::start(
            &config.topic_root,
            config.devices.len() + 64,
            config.max_packet_bytes,
        );
        Ok(Self {
            config,
            listeners,
            local_addrs,
            stats: Arc::default(),
            broker,
        })
    }

    /// The bound addresses, in the order of `listeners` (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// The counters; [`MqttIngressStats::snapshot`] reads them.
    pub fn stats(&self) -> Arc<MqttIngressStats> {
        self.stats.clone()
    }

    /// The embedded broker, for the agent's local clients.
    pub fn broker(&self) -> LocalBroker {
        self.broker.clone()
    }

    /// Serves devices until `shutdown` completes or `sink`'s receiver is dropped, then closes
    /// every connection (waiting up to `shutdown_grace_ms` for outstanding commits, so what is
    /// durable is still acknowledged) and returns once all are closed.
    pub async fn run(
        self,
        sink: mpsc::Sender<IngressBatch>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), MqttIngressError> {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let config = self.config;
        let mut credentials = HashMap::with_capacity(config.devices.len());
        for device in &config.devices {
            // Validated in `bind`.
            if let Ok(hash) = config::parse_password_hash(&device.password_hash) {
                credentials.insert(device.id.clone(), hash);
            }
        }
        let shared = Arc::new(Shared {
            topic_root: config.topic_root.clone(),
            max_packet_bytes: config.max_packet_bytes,
            max_inflight: usize::from(config.max_inflight),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            shutdown_grace: Duration::from_millis(config.shutdown_grace_ms),
            credentials,
            auth_slots: Semaphore::new(config.max_concurrent_auth),
            stats: self.stats.clone(),
            broker: self.broker.clone(),
            sessions: Mutex::new(HashMap::new()),
            saved_sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(0),
            sink: sink.clone(),
            shutdown: shutdown_rx,
        });
        // Every task holds a clone of `done_tx`; `done_rx` yields None once all have ended.
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        for listener in self.listeners {
            tokio::spawn(accept_loop(
                listener,
                shared.clone(),
                config.max_connections,
                done_tx.clone(),
            ));
        }
        drop(done_tx);
        drop(shared);
        let result = tokio::select! {
            () = shutdown => Ok(()),
            () = sink.closed() => Err(MqttIngressError::SinkClosed),
        };
        tracing::info!("MQTT ingress stopping");
        let _ = shutdown_tx.send(true);
        let _ = done_rx.recv().await;
        result
    }
}

/// Binds, serves until `shutdown`, and closes: [`MqttIngress::bind`] then [`MqttIngress::run`].
pub async fn run(
    config: MqttIngressConfig,
    sink: mpsc::Sender<IngressBatch>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), MqttIngressError> {
    MqttIngress::bind(config).await?.run(sink, shutdown).await
}

async fn accept_loop(
    bound: BoundListener,
    shared: Arc<Shared>,
    max_connections: usize,
    done: mpsc::Sender<()>,
) {
    let mut shutdown = shared.shutdown.clone();
    let stats = shared.stats.clone();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = bound.listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, mostly: wait for connections to close.
                tracing::warn!(error = %err, "accepting an MQTT connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        MqttIngressStats::bump(&stats.connections_accepted, 1);
        let open = stats
            .connections_open
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if open as usize >= max_connections {
            stats.connection_closed();
            MqttIngressStats::bump(&stats.connections_over_limit, 1);
            tracing::debug!(%peer, "connection limit reached; closed");
            continue;
        }
        let _ = socket.set_nodelay(true);
        let shared = shared.clone();
        let tls = bound.tls.clone();
        let done = done.clone();
        tokio::spawn(async move {
            connection::serve_socket(shared, socket, peer, tls).await;
            drop(done);
        });
    }
}

fn load_tls(files: &TlsFiles) -> Result<TlsAcceptor, MqttIngressError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls_error = |path: &Path, reason: String| MqttIngressError::Tls {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(&files.cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| tls_error(&files.cert_path, err.to_string()))?;
    if certs.is_empty() {
        return Err(tls_error(
            &files.cert_path,
            "no certificate in the file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key_path)
        .map_err(|err| tls_error(&files.key_path, err.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| tls_error(&files.cert_path, err.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|err| tls_error(&files.cert_path, err.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(server_config)))
}
