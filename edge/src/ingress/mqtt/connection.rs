//! One device connection: TLS, CONNECT and authentication, then the session loop that checks
//! every packet against the device's topics, hands readings to the journal and acknowledges
//! them once they are durable.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::password_hash::PasswordHashString;
use bytes::{Buf, Bytes, BytesMut};
use fieldgate_firmware_bridge::session::CommitOutcome;
use fieldgate_shared::{DeviceId, Reading};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use tokio_rustls::TlsAcceptor;

use super::broker::LocalBroker;
use super::codec::{self, reason, DecodeError, Packet, Version};
use super::config::verify_password;
use super::payload::PayloadParser;
use super::stats::{MqttIngressStats, Rejection};
use super::topics::{DeviceTopics, TopicClass};
use super::IngressBatch;

/// Bytes asked of the socket per read; a read's complete PUBLISHes become one batch.
const READ_CHUNK: usize = 16 * 1024;
/// Largest CONNECT accepted: before authentication a peer gets little memory.
const MAX_CONNECT_BYTES: usize = 8 * 1024;
/// A device that does not take our bytes for this long is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What every connection of one ingress shares.
pub(crate) struct Shared {
    pub topic_root: String,
    pub max_packet_bytes: usize,
    pub max_inflight: usize,
    pub connect_timeout: Duration,
    pub shutdown_grace: Duration,
    pub credentials: HashMap<DeviceId, PasswordHashString>,
    pub auth_slots: Semaphore,
    pub stats: Arc<MqttIngressStats>,
    pub broker: LocalBroker,
    /// The connected session of each device, to close it when the device connects again: the
    /// session id and a channel to ask it to close, which it answers once it has saved its state.
    pub sessions: Mutex<HashMap<DeviceId, (u64, Kick)>>,
    /// The subscriptions of devices with a persistent session, kept while they are away.
    pub saved_sessions: Mutex<HashMap<DeviceId, Vec<String>>>,
    pub next_session: AtomicU64,
    pub sink: mpsc::Sender<IngressBatch>,
    pub shutdown: watch::Receiver<bool>,
}

/// Asks a session to close; it answers on the enclosed sender once its state is saved.
pub(crate) type Kick = oneshot::Sender<oneshot::Sender<()>>;

/// Serves one accepted socket to its end. Never fails: every ending is counted and logged.
pub(crate) async fn serve_socket(
    shared: Arc<Shared>,
    socket: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
) {
    let deadline = Instant::now() + shared.connect_timeout;
    match tls {
        None => serve(&shared, socket, peer, deadline).await,
        Some(acceptor) => match timeout_at(deadline, acceptor.accept(socket)).await {
            Ok(Ok(stream)) => serve(&shared, stream, peer, deadline).await,
            Ok(Err(err)) => {
                MqttIngressStats::bump(&shared.stats.tls_failures, 1);
                tracing::debug!(%peer, error = %err, "TLS handshake failed");
            }
            Err(_) => {
                MqttIngressStats::bump(&shared.stats.connect_timeouts, 1);
                tracing::debug!(%peer, "no TLS handshake in time");
            }
        },
    }
    shared.stats.connection_closed();
}

/// What the session keeps of the CONNECT.
struct ConnectInfo {
    version: Version,
    client_id: String,
    clean_start: bool,
    keep_alive: u16,
    username: Option<String>,
    password: Option<Vec<u8>>,
    will: Option<(String, Bytes)>,
    session_expiry_interval: u32,
    maximum_packet_size: Option<u32>,
    request_problem_information: bool,
    enhanced_auth: bool,
}

impl ConnectInfo {
    fn from_packet(connect: &codec::Connect<'_>) -> Self {
        Self {
            version: connect.version,
            client_id: connect.client_id.to_owned(),
            clean_start: connect.clean_start,
            keep_alive: connect.keep_alive,
            username: connect.username.map(str::to_owned),
            password: connect.password.map(<[u8]>::to_vec),
            will: connect
                .will
                .as_ref()
                .map(|will| (will.topic.to_owned(), Bytes::copy_from_slice(will.payload))),
            session_expiry_interval: connect.session_expiry_interval,
            maximum_packet_size: connect.maximum_packet_size,
            request_problem_information: connect.request_problem_information,
            enhanced_auth: connect.authentication_method.is_some(),
        }
    }

    /// Whether the session outlives this connection: 3.1.1's clean session 0, or MQTT 5's
    /// session expiry interval above 0 (the ingress keeps such sessions until the device comes
    /// back, whatever the interval).
    fn persistent(&self) -> bool {
        match self.version {
            Version::V311 => !self.clean_start,
            Version::V5 => self.session_expiry_interval > 0,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    mut stream: S,
    peer: SocketAddr,
    deadline: Instant,
) {
    // Small until the device has authenticated: idle or hostile sockets cost little memory.
    let mut rbuf = BytesMut::with_capacity(1024);
    let mut connect = match timeout_at(deadline, read_connect(shared, &mut stream, &mut rbuf)).await
    {
        Ok(Ok(connect)) => connect,
        Ok(Err(ConnectFailure::Closed)) => return,
        Ok(Err(ConnectFailure::Refuse(version, code))) => {
            refuse(&mut stream, version, code).await;
            return;
        }
        Err(_) => {
            MqttIngressStats::bump(&shared.stats.connect_timeouts, 1);
            tracing::debug!(%peer, "no CONNECT in time");
            return;
        }
    };
    let version = connect.version;
    let persistent = connect.persistent();
    let authenticated = authenticate(shared, &connect).await;
    // The password is not kept for the life of the connection.
    connect.password = None;
    let device = match authenticated {
        Ok(device) => device,
        Err(code) => {
            tracing::info!(%peer, user = connect.username.as_deref().unwrap_or(""), code, "MQTT CONNECT refused");
            refuse(&mut stream, version, code).await;
            return;
        }
    };
    let topics = DeviceTopics::new(&shared.topic_root, &device);
    if let Some((will_topic, _)) = &connect.will {
        if topics.classify_publish(will_topic) != TopicClass::Own {
            MqttIngressStats::bump(&shared.stats.connects_refused, 1);
            tracing::warn!(%device, will_topic, "will topic outside the device's own topics");
            refuse(&mut stream, version, reason::NOT_AUTHORIZED).await;
            return;
        }
    }

    // One session per device: a new connection closes the old one, and waits for it to save
    // its state so a persistent session carries over.
    let session_id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let (kick_tx, mut kick_rx) = oneshot::channel();
    let previous = lock(&shared.sessions).insert(device.clone(), (session_id, kick_tx));
    if let Some((_, kick)) = previous {
        MqttIngressStats::bump(&shared.stats.sessions_taken_over, 1);
        let (saved_tx, saved_rx) = oneshot::channel();
        if kick.send(saved_tx).is_ok() {
            let _ = timeout(Duration::from_secs(5), saved_rx).await;
        }
    }
    // A clean start drops what was saved; a resumed session finds its subscriptions again.
    let saved = lock(&shared.saved_sessions).remove(&device);
    let saved = saved.filter(|_| !connect.clean_start);
    let session_present = saved.is_some();

    let link = match shared.broker.device_link(&device).await {
        Ok(link) => Some(link),
        Err(err) => {
            tracing::warn!(%device, error = %err, "no broker link: subscriptions will be refused");
            None
        }
    };

    let mut connack = Vec::new();
    let assigned_client_id = connect.client_id.is_empty().then(|| device.as_str());
    codec::encode_connack(
        &mut connack,
        version,
        session_present,
        reason::SUCCESS,
        &codec::ConnAckProperties {
            receive_maximum: shared.max_inflight.min(usize::from(u16::MAX)) as u16,
            maximum_packet_size: shared.max_packet_bytes as u32,
            assigned_client_id,
            reason_string: None,
        },
    );
    if write_all(&mut stream, &connack).await.is_err() {
        end_session(shared, &device, session_id, &mut kick_rx, saved);
        return;
    }
    MqttIngressStats::bump(&shared.stats.sessions_started, 1);
    tracing::info!(%device, %peer, ?version, session_present, "device connected over MQTT");

    let (link_tx, link_rx) = match link {
        Some((tx, rx)) => (Some(tx), Some(rx)),
        None => (None, None),
    };
    let mut session = Session {
        shared,
        version,
        device: device.clone(),
        topics,
        client_max_packet: connect
            .maximum_packet_size
            .map_or(usize::MAX, |size| size as usize),
        problem_info: connect.request_problem_information,
        parser: PayloadParser::new(),
        batch_readings: Vec::new(),
        batch_pkids: Vec::new(),
        batch_messages: 0,
        pending: VecDeque::new(),
        pending_acks: 0,
        wbuf: Vec::with_capacity(1024),
        link_tx,
        subscriptions: Vec::new(),
        will: connect.will.take(),
        discard: None,
        taken_over: None,
    };
    for filter in saved.unwrap_or_default() {
        session.subscribe(&filter);
    }
    let ending = session
        .run(&mut stream, rbuf, link_rx, &mut kick_rx, connect.keep_alive)
        .await;
    session.finish(&mut stream, ending).await;
    let keep = persistent.then(|| std::mem::take(&mut session.subscriptions));
    if let Some(saved) = session.taken_over.take() {
        // The newer connection waits for this one's state: save it first.
        end_session(shared, &device, session_id, &mut kick_rx, keep);
        let _ = saved.send(());
    } else {
        end_session(shared, &device, session_id, &mut kick_rx, keep);
    }
}

/// Saves a persistent session's subscriptions, leaves the registry (unless a newer connection
/// has taken the device's place), and tells a newer connection waiting for this one that the
/// state is saved.
fn end_session(
    shared: &Shared,
    device: &DeviceId,
    session_id: u64,
    kick: &mut oneshot::Receiver<oneshot::Sender<()>>,
    keep: Option<Vec<String>>,
) {
    if let Some(subscriptions) = keep {
        lock(&shared.saved_sessions).insert(device.clone(), subscriptions);
    }
    let mut sessions = lock(&shared.sessions);
    if sessions
        .get(device)
        .is_some_and(|(id, _)| *id == session_id)
    {
        sessions.remove(device);
    }
    drop(sessions);
    if let Ok(saved) = kick.try_recv() {
        let _ = saved.send(());
    }
}

enum ConnectFailure {
    /// The peer went away or sent something that is not MQTT; nothing to answer.
    Closed,
    /// Answer with a CONNACK carrying this MQTT 5 reason code, then close.
    Refuse(Version, u8),
}

async fn read_connect<S: AsyncRead + Unpin>(
    shared: &Shared,
    stream: &mut S,
    rbuf: &mut BytesMut,
) -> Result<ConnectInfo, ConnectFailure> {
    loop {
        match codec::decode(rbuf, None, shared.max_packet_bytes.min(MAX_CONNECT_BYTES)) {
            Ok(Some((Packet::Connect(connect), len))) => {
                let info = ConnectInfo::from_packet(&connect);
                rbuf.advance(len);
                return Ok(info);
            }
            Ok(Some(_)) => unreachable!("decode returns only a CONNECT before the session"),
            Ok(None) => {}
            Err(DecodeError::UnsupportedVersion(level)) => {
                MqttIngressStats::bump(&shared.stats.connects_refused, 1);
                tracing::debug!(level, "MQTT protocol level not supported");
                // A 3.1.1-style CONNACK is what clients of either older level understand.
                return Err(ConnectFailure::Refuse(
                    Version::V311,
                    reason::UNSUPPORTED_PROTOCOL_VERSION,
                ));
            }
            Err(err) => {
                MqttIngressStats::bump(&shared.stats.protocol_errors, 1);
                tracing::debug!(error = %err, "bad CONNECT");
                return Err(ConnectFailure::Closed);
            }
        }
        if rbuf.capacity() == rbuf.len() {
            rbuf.reserve(1024);
        }
        match stream.read_buf(rbuf).await {
            Ok(0) | Err(_) => return Err(ConnectFailure::Closed),
            Ok(_) => {}
        }
    }
}

/// Checks the CONNECT's credentials; the error is the MQTT 5 reason code for the CONNACK.
async fn authenticate(shared: &Shared, connect: &ConnectInfo) -> Result<DeviceId, u8> {
    let stats = &shared.stats;
    let refuse_credentials = || {
        MqttIngressStats::bump(&stats.auth_failures, 1);
        reason::BAD_USER_NAME_OR_PASSWORD
    };
    if connect.enhanced_auth {
        MqttIngressStats::bump(&stats.connects_refused, 1);
        return Err(reason::BAD_AUTHENTICATION_METHOD);
    }
    let Some(username) = &connect.username else {
        return Err(refuse_credentials());
    };
    let Ok(device) = DeviceId::new(username) else {
        return Err(refuse_credentials());
    };
    let client_id_ok = if connect.client_id.is_empty() {
        // 3.1.1 allows an empty client id only for a clean session.
        connect.version == Version::V5 || connect.clean_start
    } else {
        connect.client_id == device.as_str()
    };
    if !client_id_ok {
        MqttIngressStats::bump(&stats.auth_bad_client_ids, 1);
        return Err(reason::CLIENT_IDENTIFIER_NOT_VALID);
    }
    let (Some(hash), Some(password)) = (shared.credentials.get(&device), &connect.password) else {
        return Err(refuse_credentials());
    };
    let Ok(_permit) = shared.auth_slots.acquire().await else {
        return Err(reason::SERVER_UNAVAILABLE);
    };
    let hash = hash.clone();
    let password = password.clone();
    let verified = tokio::task::spawn_blocking(move || verify_password(&hash, &password))
        .await
        .unwrap_or(false);
    if verified {
        Ok(device)
    } else {
        Err(refuse_credentials())
    }
}

async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, version: Version, code: u8) {
    let mut out = Vec::new();
    codec::encode_connack(&mut out, version, false, code, &Default::default());
    let _ = write_all(stream, &out).await;
    let _ = stream.shutdown().await;
}

async fn write_all<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    let write = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    };
    match timeout(WRITE_TIMEOUT, write).await {
        Ok(result) => result,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// Answers to the device that must wait for the durable commits before them: MQTT wants
/// PUBACKs in the order of the PUBLISHes.
enum Pending {
    /// QoS 1 messages of one batch, acknowledged when the batch is durable.
    Commit {
        commit: oneshot::Receiver<CommitOutcome>,
        pkids: Vec<u16>,
    },
    /// An encoded answer (a refusal's PUBACK, a SUBACK) to send after what is before it.
    Reply(Vec<u8>),
}

/// A PUBLISH over the size limit being skipped (MQTT 3.1.1 only).
struct Discard {
    remaining: usize,
    pkid: Option<u16>,
}

/// Why the session ended.
enum Ending {
    /// The device sent DISCONNECT; `keep_will` if it asked for its will anyway.
    ClientDisconnected { keep_will: bool },
    /// The socket closed or failed.
    ConnectionLost,
    /// The gateway closes: an MQTT 5 device gets a DISCONNECT with this reason.
    Close { reason: u8, detail: Option<String> },
}

impl Ending {
    fn close(reason: u8, detail: impl Into<String>) -> Self {
        Ending::Close {
            reason,
            detail: Some(detail.into()),
        }
    }
}

struct Session<'s> {
    shared: &'s Shared,
    version: Version,
    device: DeviceId,
    topics: DeviceTopics,
    /// Largest packet the device accepts (MQTT 5).
    client_max_packet: usize,
    /// Whether the device wants reason strings (MQTT 5).
    problem_info: bool,
    parser: PayloadParser,
    /// Readings and QoS 1 packet ids from the current read, sent as one batch.
    batch_readings: Vec<Reading>,
    batch_pkids: Vec<u16>,
    batch_messages: u64,
    pending: VecDeque<Pending>,
    /// QoS 1 messages in `pending` not acknowledged yet.
    pending_acks: usize,
    wbuf: Vec<u8>,
    link_tx: Option<LinkTx>,
    subscriptions: Vec<String>,
    will: Option<(String, Bytes)>,
    discard: Option<Discard>,
    /// Set when a newer connection of the device closed this one; told once the state is saved.
    taken_over: Option<oneshot::Sender<()>>,
}

impl Session<'_> {
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        mut rbuf: BytesMut,
        mut link_rx: Option<LinkRx>,
        kick: &mut oneshot::Receiver<oneshot::Sender<()>>,
        keep_alive: u16,
    ) -> Ending {
        let mut shutdown = self.shared.shutdown.clone();
        let keep_alive =
            (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let mut keep_alive_deadline = keep_alive.map(|period| Instant::now() + period);
        let mut grace_deadline: Option<Instant> = None;
        if *shutdown.borrow_and_update() {
            return Ending::Close {
                reason: reason::SERVER_SHUTTING_DOWN,
                detail: None,
            };
        }
        // Bytes that came with the CONNECT.
        if !rbuf.is_empty() {
            if let Err(ending) = self.process(&mut rbuf, now_ms()).await {
                return ending;
            }
        }
        loop {
            if grace_deadline.is_some() && self.pending.is_empty() {
                return Ending::Close {
                    reason: reason::SERVER_SHUTTING_DOWN,
                    detail: None,
                };
            }
            if !self.wbuf.is_empty() {
                if write_all(stream, &self.wbuf).await.is_err() {
                    return Ending::ConnectionLost;
                }
                self.wbuf.clear();
            }
            let can_read = grace_deadline.is_none() && self.pending_acks < self.shared.max_inflight;
            if rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
                rbuf.reserve(READ_CHUNK);
            }
            let has_commit = matches!(self.pending.front(), Some(Pending::Commit { .. }));
            tokio::select! {
                biased;
                saved = &mut *kick => {
                    // Answered in `end_session`, once this session's state is saved.
                    self.taken_over = saved.ok();
                    tracing::info!(device = %self.device, "device connected again; closing its older connection");
                    return Ending::Close { reason: reason::SESSION_TAKEN_OVER, detail: None };
                }
                _ = shutdown.changed(), if grace_deadline.is_none() => {
                    grace_deadline = Some(Instant::now() + self.shared.shutdown_grace);
                }
                _ = sleep_until(grace_deadline.unwrap_or_else(Instant::now)), if grace_deadline.is_some() => {
                    return Ending::Close { reason: reason::SERVER_SHUTTING_DOWN, detail: None };
                }
                outcome = front_commit(&mut self.pending), if has_commit => {
                    if let Err(ending) = self.commit_answered(outcome) {
                        return ending;
                    }
                    // Reading may have paused for the journal: silence from then is not the
                    // device's.
                    keep_alive_deadline = keep_alive.map(|period| Instant::now() + period);
                }
                read = stream.read_buf(&mut rbuf), if can_read => {
                    match read {
                        Ok(0) | Err(_) => return Ending::ConnectionLost,
                        Ok(_) => {
                            keep_alive_deadline = keep_alive.map(|period| Instant::now() + period);
                            if let Err(ending) = self.process(&mut rbuf, now_ms()).await {
                                return ending;
                            }
                        }
                    }
                }
                notification = next_notification(&mut link_rx), if link_rx.is_some() => {
                    match notification {
                        Ok(Some(Notification::Forward(forward))) => {
                            self.deliver(&forward.publish.topic, &forward.publish.payload);
                        }
                        Ok(_) => {}
                        Err(_) => {
                            tracing::debug!(device = %self.device, "broker link closed");
                            link_rx = None;
                            self.link_tx = None;
                        }
                    }
                }
                _ = sleep_until(keep_alive_deadline.unwrap_or_else(Instant::now)), if keep_alive_deadline.is_some() && can_read => {
                    MqttIngressStats::bump(&self.shared.stats.keep_alive_timeouts, 1);
                    tracing::info!(device = %self.device, "device silent past its keep-alive");
                    return Ending::Close { reason: reason::KEEP_ALIVE_TIMEOUT, detail: None };
                }
            }
        }
    }

    /// Says goodbye as the ending asks, publishes the will if it is due, and leaves the broker.
    async fn finish<S: AsyncWrite + Unpin>(&mut self, stream: &mut S, ending: Ending) {
        let keep_will = match &ending {
            Ending::ClientDisconnected { keep_will } => *keep_will,
            Ending::ConnectionLost => true,
            Ending::Close { reason, .. } => *reason != reason::SERVER_SHUTTING_DOWN,
        };
        match ending {
            Ending::Close { reason, detail } => {
                // Answers already due go first, then the MQTT 5 DISCONNECT.
                codec::encode_disconnect(
                    &mut self.wbuf,
                    self.version,
                    reason,
                    detail.as_deref().filter(|_| self.problem_info),
                );
                let _ = write_all(stream, &self.wbuf).await;
                let _ = timeout(Duration::from_secs(1), stream.shutdown()).await;
                tracing::info!(device = %self.device, reason, "closed the device's MQTT connection");
            }
            Ending::ClientDisconnected { .. } | Ending::ConnectionLost => {
                tracing::info!(device = %self.device, "device disconnected");
            }
        }
        if let Some(link_tx) = &mut self.link_tx {
            if keep_will {
                if let Some((topic, payload)) = self.will.take() {
                    let _ = link_tx.try_publish(topic, payload);
                }
            }
            // The router keeps routing to a link until told otherwise; the list itself stays
            // for a persistent session to save.
            for filter in &self.subscriptions {
                let _ = link_tx.try_unsubscribe(filter.as_str());
            }
        }
    }

    /// Handles every complete packet in `rbuf`, then hands the readings read to the journal,
    /// also when a packet ends the connection: readings before it were good (QoS 0 ones would
    /// otherwise be lost; QoS 1 ones come again, unacknowledged, as duplicates).
    async fn process(&mut self, rbuf: &mut BytesMut, received_ms: i64) -> Result<(), Ending> {
        let handled = self.process_packets(rbuf, received_ms).await;
        let flushed = self.flush_batch().await;
        handled.and(flushed)
    }

    async fn process_packets(
        &mut self,
        rbuf: &mut BytesMut,
        received_ms: i64,
    ) -> Result<(), Ending> {
        loop {
            if let Some(discard) = &mut self.discard {
                let n = discard.remaining.min(rbuf.len());
                rbuf.advance(n);
                discard.remaining -= n;
                if discard.remaining > 0 {
                    break;
                }
                let pkid = discard.pkid;
                self.discard = None;
                if let Some(pkid) = pkid {
                    let version = self.version;
                    self.reply(|out| {
                        codec::encode_puback(out, version, pkid, reason::QUOTA_EXCEEDED, None)
                    })
                    .await?;
                }
                continue;
            }
            let (packet, len) =
                match codec::decode(rbuf, Some(self.version), self.shared.max_packet_bytes) {
                    Ok(Some(decoded)) => decoded,
                    Ok(None) => {
                        if let Ok(Some(header)) = codec::parse_frame_header(rbuf) {
                            rbuf.reserve(header.frame_len().saturating_sub(rbuf.len()));
                        }
                        break;
                    }
                    Err(DecodeError::TooLarge(header)) => {
                        if self.start_discard(rbuf, header)? {
                            continue;
                        }
                        break;
                    }
                    Err(err) => {
                        self.reject(Rejection::ProtocolError, &err);
                        let code = match err {
                            DecodeError::Malformed(_) => reason::MALFORMED_PACKET,
                            _ => reason::PROTOCOL_ERROR,
                        };
                        return Err(Ending::close(code, err.to_string()));
                    }
                };
            self.handle(packet, received_ms).await?;
            rbuf.advance(len);
        }
        Ok(())
    }

    /// A packet over the limit. MQTT 5 requires a DISCONNECT (the limit was in the CONNACK).
    /// MQTT 3.1.1 has no way to refuse one message, so a PUBLISH is skipped without buffering
    /// it and acknowledged so the device drops it instead of resending it for ever. Returns
    /// whether skipping started (false: more bytes are needed to read its topic).
    fn start_discard(
        &mut self,
        rbuf: &BytesMut,
        header: codec::FrameHeader,
    ) -> Result<bool, Ending> {
        let detail = format!(
            "packet of {} bytes; the limit is {}",
            header.frame_len(),
            self.shared.max_packet_bytes
        );
        if self.version == Version::V5 || header.packet_type != codec::PUBLISH {
            self.reject(Rejection::Oversized, &detail);
            return Err(Ending::close(reason::PACKET_TOO_LARGE, detail));
        }
        let qos = (header.flags >> 1) & 0x03;
        let at = header.header_len;
        let Some(topic_len) = rbuf
            .get(at..at + 2)
            .map(|bytes| usize::from(u16::from_be_bytes([bytes[0], bytes[1]])))
        else {
            return Ok(false);
        };
        let pkid_len = if qos > 0 { 2 } else { 0 };
        let needed = at + 2 + topic_len + pkid_len;
        if needed > header.frame_len() || qos == 3 {
            self.reject(Rejection::ProtocolError, &"malformed oversized PUBLISH");
            return Err(Ending::close(reason::MALFORMED_PACKET, "malformed PUBLISH"));
        }
        if rbuf.len() < needed {
            return Ok(false);
        }
        let topic = std::str::from_utf8(&rbuf[at + 2..at + 2 + topic_len]).unwrap_or("");
        if self.topics.classify_publish(topic) == TopicClass::Foreign {
            return Err(self.foreign_publish(topic));
        }
        let pkid = (qos > 0).then(|| u16::from_be_bytes([rbuf[needed - 2], rbuf[needed - 1]]));
        self.reject(Rejection::Oversized, &detail);
        self.discard = Some(Discard {
            remaining: header.frame_len(),
            pkid,
        });
        Ok(true)
    }

    async fn handle(&mut self, packet: Packet<'_>, received_ms: i64) -> Result<(), Ending> {
        let version = self.version;
        match packet {
            Packet::Publish(publish) => self.publish(publish, received_ms).await,
            Packet::Subscribe(subscribe) => {
                let mut codes = Vec::with_capacity(subscribe.filters.len());
                for filter in &subscribe.filters {
                    let code = if !self.topics.may_subscribe(filter.filter) {
                        self.reject(Rejection::UnauthorisedSubscribe, &filter.filter);
                        reason::NOT_AUTHORIZED
                    } else if self.subscribe(filter.filter) {
                        reason::GRANTED_QOS_0
                    } else {
                        reason::UNSPECIFIED_ERROR
                    };
                    codes.push(code);
                }
                let pkid = subscribe.pkid;
                self.reply(|out| codec::encode_suback(out, version, pkid, &codes))
                    .await
            }
            Packet::Unsubscribe(unsubscribe) => {
                for filter in &unsubscribe.filters {
                    if let Some(index) = self.subscriptions.iter().position(|s| s == filter) {
                        self.subscriptions.swap_remove(index);
                        if let Some(link_tx) = &mut self.link_tx {
                            let _ = link_tx.try_unsubscribe(*filter);
                        }
                    }
                }
                let (pkid, n_filters) = (unsubscribe.pkid, unsubscribe.filters.len());
                self.reply(|out| codec::encode_unsuback(out, version, pkid, n_filters))
                    .await
            }
            Packet::PingReq => {
                codec::encode_pingresp(&mut self.wbuf);
                Ok(())
            }
            Packet::Disconnect { reason } => Err(Ending::ClientDisconnected {
                // MQTT 5 reason 0x04: "disconnect with will message".
                keep_will: reason == 0x04,
            }),
            // Deliveries to devices are QoS 0; an acknowledgement of one is harmless.
            Packet::PubAck { .. } => Ok(()),
            Packet::PubRec { .. }
            | Packet::PubRel { .. }
            | Packet::PubComp { .. }
            | Packet::Auth
            | Packet::Connect(_) => {
                self.reject(Rejection::ProtocolError, &"QoS 2 flow or AUTH packet");
                Err(Ending::close(
                    reason::PROTOCOL_ERROR,
                    "QoS 2 and AUTH are not offered",
                ))
            }
        }
    }

    async fn publish(
        &mut self,
        publish: codec::Publish<'_>,
        received_ms: i64,
    ) -> Result<(), Ending> {
        let version = self.version;
        if publish.qos == 2 {
            self.reject(Rejection::QoS2, &publish.topic);
            return Err(Ending::close(
                reason::QOS_NOT_SUPPORTED,
                "QoS 2 is not offered",
            ));
        }
        if publish.topic_alias.is_some() {
            self.reject(Rejection::ProtocolError, &"topic alias");
            return Err(Ending::close(
                reason::TOPIC_ALIAS_INVALID,
                "topic aliases are not offered",
            ));
        }
        match self.topics.classify_publish(publish.topic) {
            TopicClass::Invalid => {
                self.reject(Rejection::ProtocolError, &publish.topic);
                Err(Ending::close(
                    reason::TOPIC_NAME_INVALID,
                    "not a topic name",
                ))
            }
            TopicClass::Foreign => Err(self.foreign_publish(publish.topic)),
            TopicClass::Readings => {
                match self.parser.parse(
                    publish.payload,
                    &self.device,
                    received_ms,
                    &mut self.batch_readings,
                ) {
                    Ok(parsed) => {
                        if parsed.nulls_skipped > 0 {
                            MqttIngressStats::bump(
                                &self.shared.stats.null_values_skipped,
                                parsed.nulls_skipped as u64,
                            );
                        }
                        self.batch_messages += 1;
                        if publish.qos == 1 {
                            self.batch_pkids.push(publish.pkid);
                        }
                        Ok(())
                    }
                    Err(err) => {
                        self.reject(Rejection::Malformed, &err);
                        if publish.qos == 1 {
                            let detail = err.to_string();
                            let detail = Some(detail.as_str()).filter(|_| self.problem_info);
                            let pkid = publish.pkid;
                            self.reply(|out| {
                                codec::encode_puback(
                                    out,
                                    version,
                                    pkid,
                                    reason::PAYLOAD_FORMAT_INVALID,
                                    detail,
                                )
                            })
                            .await?;
                        }
                        Ok(())
                    }
                }
            }
            TopicClass::Own => {
                let routed = self.link_tx.as_mut().is_some_and(|link_tx| {
                    link_tx
                        .try_publish(
                            Bytes::copy_from_slice(publish.topic.as_bytes()),
                            Bytes::copy_from_slice(publish.payload),
                        )
                        .is_ok()
                });
                if routed {
                    MqttIngressStats::bump(&self.shared.stats.messages_routed, 1);
                }
                if publish.qos == 1 {
                    let code = if routed {
                        reason::SUCCESS
                    } else {
                        reason::UNSPECIFIED_ERROR
                    };
                    let pkid = publish.pkid;
                    self.reply(|out| codec::encode_puback(out, version, pkid, code, None))
                        .await?;
                }
                Ok(())
            }
        }
    }

    fn foreign_publish(&self, topic: &str) -> Ending {
        let detail = format!(
            "topic {topic:?} is not under {}/{}/",
            self.shared.topic_root, self.device
        );
        self.reject(Rejection::UnauthorisedPublish, &detail);
        Ending::close(reason::NOT_AUTHORIZED, detail)
    }

    fn reject(&self, rejection: Rejection, detail: &dyn std::fmt::Display) {
        self.shared
            .stats
            .rejected(self.device.as_str(), rejection, detail);
    }

    /// Hands the readings gathered from one read to the journal; their QoS 1 messages wait
    /// for its durable commit.
    async fn flush_batch(&mut self) -> Result<(), Ending> {
        if self.batch_readings.is_empty() {
            // Messages without readings (`{}`): nothing to store, acknowledge in order.
            let version = self.version;
            let pkids = std::mem::take(&mut self.batch_pkids);
            for pkid in pkids {
                self.queue_reply(|out| {
                    codec::encode_puback(out, version, pkid, reason::SUCCESS, None)
                });
            }
            self.batch_messages = 0;
            return Ok(());
        }
        // A fresh, empty vector: handing on the buffer's capacity would make every later small
        // batch as large as the largest one, and batches wait in queues until their commit.
        let readings = std::mem::take(&mut self.batch_readings);
        let pkids = std::mem::take(&mut self.batch_pkids);
        let n_messages = std::mem::take(&mut self.batch_messages);
        let n_readings = readings.len() as u64;
        let (commit, answer) = oneshot::channel();
        let batch = IngressBatch {
            device: self.device.clone(),
            readings,
            commit,
        };
        // The consumer may stop taking batches when the gateway shuts down: wait for it no
        // longer than the shutdown grace then.
        let mut shutdown = self.shared.shutdown.clone();
        let grace = self.shared.shutdown_grace;
        let sent = tokio::select! {
            sent = self.shared.sink.send(batch) => sent.is_ok(),
            () = async {
                let _ = shutdown.wait_for(|stop| *stop).await;
                tokio::time::sleep(grace).await;
            } => false,
        };
        if !sent {
            return Err(Ending::Close {
                reason: reason::SERVER_SHUTTING_DOWN,
                detail: None,
            });
        }
        MqttIngressStats::bump(&self.shared.stats.messages_accepted, n_messages);
        MqttIngressStats::bump(&self.shared.stats.readings_accepted, n_readings);
        if !pkids.is_empty() {
            self.pending_acks += pkids.len();
            self.pending.push_back(Pending::Commit {
                commit: answer,
                pkids,
            });
        }
        // QoS 0 only: nobody waits for the answer.
        Ok(())
    }

    /// Queues an answer behind everything not yet acknowledged, first sending the open batch
    /// if it holds QoS 1 messages (they come before this answer).
    async fn reply(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> Result<(), Ending> {
        if !self.batch_pkids.is_empty() {
            self.flush_batch().await?;
        }
        self.queue_reply(encode);
        Ok(())
    }

    fn queue_reply(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        if self.pending.is_empty() {
            encode(&mut self.wbuf);
        } else {
            let mut bytes = Vec::new();
            encode(&mut bytes);
            self.pending.push_back(Pending::Reply(bytes));
        }
    }

    /// The journal answered the oldest waiting batch.
    fn commit_answered(
        &mut self,
        outcome: Result<CommitOutcome, oneshot::error::RecvError>,
    ) -> Result<(), Ending> {
        let Some(Pending::Commit { pkids, .. }) = self.pending.pop_front() else {
            unreachable!("answers are awaited only for a commit at the front");
        };
        if outcome != Ok(CommitOutcome::Durable) {
            // Not stored: no PUBACK, so the device keeps the messages. Closing the connection
            // is the only way MQTT has to make it send them again.
            MqttIngressStats::bump(&self.shared.stats.commits_busy, 1);
            tracing::warn!(device = %self.device, n_messages = pkids.len(), "journal busy; closing so the device resends");
            return Err(Ending::close(
                reason::SERVER_BUSY,
                "the gateway could not store the messages; send them again",
            ));
        }
        self.pending_acks -= pkids.len();
        for pkid in pkids {
            codec::encode_puback(&mut self.wbuf, self.version, pkid, reason::SUCCESS, None);
        }
        while let Some(Pending::Reply(_)) = self.pending.front() {
            if let Some(Pending::Reply(bytes)) = self.pending.pop_front() {
                self.wbuf.extend_from_slice(&bytes);
            }
        }
        Ok(())
    }

    /// Subscribes the device's broker link to an allowed filter.
    fn subscribe(&mut self, filter: &str) -> bool {
        let Some(link_tx) = &mut self.link_tx else {
            return false;
        };
        if link_tx.try_subscribe(filter).is_err() {
            return false;
        }
        if !self.subscriptions.iter().any(|s| s == filter) {
            self.subscriptions.push(filter.to_owned());
        }
        true
    }

    /// A message from the broker for a topic the device subscribed to, delivered at QoS 0.
    fn deliver(&mut self, topic: &[u8], payload: &[u8]) {
        if codec::publish_len(self.version, topic, payload) > self.client_max_packet
            || topic.len() > usize::from(u16::MAX)
        {
            tracing::debug!(device = %self.device, "message larger than the device accepts; dropped");
            return;
        }
        codec::encode_publish(&mut self.wbuf, self.version, topic, payload);
        MqttIngressStats::bump(&self.shared.stats.messages_delivered, 1);
    }
}

async fn front_commit(
    pending: &mut VecDeque<Pending>,
) -> Result<CommitOutcome, oneshot::error::RecvError> {
    match pending.front_mut() {
        Some(Pending::Commit { commit, .. }) => commit.await,
        _ => std::future::pending().await,
    }
}

async fn next_notification(
    link_rx: &mut Option<LinkRx>,
) -> Result<Option<Notification>, rumqttd::local::LinkError> {
    match link_rx {
        Some(link_rx) => link_rx.next().await,
        None => std::future::pending().await,
    }
}
