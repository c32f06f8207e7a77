//! The uplink: for each target with endpoints, sends the journal's readings to a cloud and
//! moves the target's journal cursor only after the cloud has acknowledged them.
//!
//! - Identity: on first start the gateway enrolls with the token from its provisioning (its own
//!   key pair, a CSR) and keeps key, certificate and gateway id under
//!   `<data_dir>/identity/<target>/` (files mode 0600). Every later request uses mutual TLS.
//! - Batches: the readings of journal range `[from, to]` that the target's rules select,
//!   encoded with the shared codec; a batch is cut at `batch_max_readings`, `batch_max_bytes`
//!   or when its oldest reading has waited `batch_max_age_ms`. The batch's sequence range is the
//!   journal range it covers, so consecutive batches are contiguous for the cloud's
//!   high-water mark even when rules skip readings.
//! - Several batches are in flight; acknowledgements commit in order (the cursor moves only
//!   over a prefix of acknowledged batches). Any failure drops the rest and resends from the
//!   cursor: the cloud's high-water mark makes resends harmless.
//! - Errors: connection failures and 5xx move to the next endpoint and back off (exponential,
//!   full jitter, reset by the first success, so a recovered cloud gets full speed at once);
//!   429/503 wait exactly `Retry-After`; a `stream_gap` answer moves the cursor to where the
//!   cloud resumes (a gap below the cursor is usually a stale answer to a request that overtook
//!   an earlier one, so it is believed only when a lone request gets it again); readings the
//!   journal dropped before they were sent (its overflow policy) are declared with
//!   `Fieldgate-Declared-Loss: <first lost seq>`, so the loss is recorded, not hidden.
//!   After a failover the primary endpoint is tried again after a minute.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fieldgate_shared::api::IngestAck;
use fieldgate_shared::codec::{BatchMeta, EncodeOptions, Encoder};
use fieldgate_shared::model::{GatewayId, Reading, StreamId};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::{RouteRule, TargetConfig};
use crate::journal::Journal;

const RETURN_TO_PRIMARY_AFTER: Duration = Duration::from_secs(60);
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const IDLE_POLL: Duration = Duration::from_millis(10);
/// While backing off from an endpoint that did not accept connections, it is looked for this
/// often (a bare TCP connect), so sending resumes within this long of its return.
const PROBE_PERIOD: Duration = Duration::from_millis(250);

/// What an uplink has done, for `/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct UplinkStats {
    pub batches_sent: AtomicU64,
    pub readings_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Readings the cloud already had (resends after a lost acknowledgement).
    pub duplicates: AtomicU64,
    pub failures: AtomicU64,
    pub failovers: AtomicU64,
    pub throttled: AtomicU64,
    /// Readings the cloud was told are lost (the journal dropped them before they were sent).
    pub declared_lost: AtomicU64,
    pub endpoint: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    pub gateway_id: Mutex<Option<String>>,
}

impl UplinkStats {
    fn error(&self, message: String) {
        tracing::warn!(error = %message, "uplink");
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
    }
}

/// The gateway's identity at one cloud.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identity {
    pub gateway_id: String,
    pub tenant_id: String,
    /// When the certificate was received and when it expires (ms since the epoch): it is
    /// renewed once two thirds of that time have passed.
    #[serde(default)]
    pub issued_at_ms: i64,
    #[serde(default)]
    pub not_after_ms: i64,
    #[serde(skip)]
    pub key_pem: String,
    #[serde(skip)]
    pub cert_pem: String,
}

impl Identity {
    pub fn renewal_due(&self, now_ms: i64) -> bool {
        self.not_after_ms > self.issued_at_ms
            && now_ms >= self.issued_at_ms + (self.not_after_ms - self.issued_at_ms) * 2 / 3
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn identity_dir(data_dir: &Path, target: &str) -> PathBuf {
    data_dir.join("identity").join(target)
}

/// The identity kept on disk, if the gateway has enrolled.
pub fn load_identity(data_dir: &Path, target: &str) -> Result<Option<Identity>> {
    let dir = identity_dir(data_dir, target);
    let previous = dir.with_extension("old");
    if !dir.exists() && previous.exists() {
        // A renewal was interrupted between its two renames: the previous identity is whole.
        std::fs::rename(&previous, &dir)?;
    }
    let meta = dir.join("identity.json");
    if !meta.exists() {
        return Ok(None);
    }
    let mut identity: Identity = serde_json::from_slice(&std::fs::read(&meta)?)
        .with_context(|| format!("reading {}", meta.display()))?;
    identity.key_pem = std::fs::read_to_string(dir.join("key.pem"))?;
    identity.cert_pem = std::fs::read_to_string(dir.join("cert.pem"))?;
    Ok(Some(identity))
}

fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Write an identity as a whole: into a new directory, then swapped in by rename, so a crash
/// never leaves a key beside another key's certificate.
fn save_identity(data_dir: &Path, target: &str, identity: &Identity) -> Result<()> {
    let dir = identity_dir(data_dir, target);
    let fresh = dir.with_extension("new");
    let previous = dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&fresh);
    write_identity_files(&fresh, identity)?;
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&previous);
        std::fs::rename(&dir, &previous)?;
    }
    std::fs::rename(&fresh, &dir)?;
    let _ = std::fs::remove_dir_all(&previous);
    Ok(())
}

fn write_identity_files(dir: &Path, identity: &Identity) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    write_private(&dir.join("key.pem"), identity.key_pem.as_bytes())?;
    write_private(&dir.join("cert.pem"), identity.cert_pem.as_bytes())?;
    // Written last: its presence means the identity is complete.
    write_private(
        &dir.join("identity.json"),
        &serde_json::to_vec_pretty(identity)?,
    )?;
    Ok(())
}

/// A key pair and a CSR for it: (key PEM, CSR PEM).
fn new_key_and_csr(name: &str) -> Result<(String, String)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

fn resolve(data_dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        data_dir.join(path)
    }
}

/// Everything an uplink needs.
pub struct Uplink {
    pub target: TargetConfig,
    pub data_dir: PathBuf,
    pub gateway_name: String,
    pub journal: Arc<Mutex<Journal>>,
    pub stats: Arc<UplinkStats>,
}

#[derive(Debug)]
enum SendError {
    /// Wait this long and resend (429, 503).
    RetryAfter(Duration),
    /// The cloud continues the stream at this sequence number.
    Resume(u64),
    /// The batch is too large for the cloud.
    TooLarge,
    /// Connection, timeout, 5xx: try the next endpoint.
    Transient(String),
    /// The cloud refuses this gateway or batch (401, 403, 400): wait long, alert.
    Refused(String),
}

struct Prepared {
    /// Set when the journal no longer held readings from here to `first_seq` (dropped by its
    /// overflow policy before they were sent).
    lost_from: Option<u64>,
    first_seq: u64,
    last_seq: u64,
    readings: u64,
    bytes: bytes::Bytes,
}

impl Uplink {
    /// Runs until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_INITIAL;
        let client_base = match self.base_client() {
            Ok(client) => client,
            Err(err) => {
                self.stats
                    .error(format!("target {}: {err:#}", self.target.name));
                return;
            }
        };
        loop {
            if *stop.borrow() {
                return;
            }
            let identity = match self.identity(&client_base).await {
                Ok(identity) => identity,
                Err(err) => {
                    self.stats.error(format!("enrollment: {err:#}"));
                    if sleep_or_stop(&mut stop, jitter(backoff)).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            *self
                .stats
                .gateway_id
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(identity.gateway_id.clone());
            let client = match self.client_with(&identity) {
                Ok(client) => client,
                Err(err) => {
                    self.stats.error(format!("loading the identity: {err:#}"));
                    if sleep_or_stop(&mut stop, BACKOFF_MAX).await {
                        return;
                    }
                    continue;
                }
            };
            if identity.renewal_due(now_ms()) {
                match self.renew(&client, &identity).await {
                    Ok(_) => {
                        tracing::info!(target = %self.target.name, "certificate renewed");
                        backoff = BACKOFF_INITIAL;
                        continue;
                    }
                    Err(err) => {
                        // The current certificate keeps working; renewal is tried again later.
                        self.stats
                            .error(format!("renewing the certificate: {err:#}"));
                        if sleep_or_stop(&mut stop, jitter(backoff)).await {
                            return;
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
            if self.send_loop(&client, &identity, &mut stop).await {
                return;
            }
        }
    }

    fn ca(&self) -> Result<reqwest::Certificate> {
        let path = resolve(
            &self.data_dir,
            self.target.ca.as_deref().context("the target has no ca")?,
        );
        let pem = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        reqwest::Certificate::from_pem(&pem).context("the target's ca is not a PEM certificate")
    }

    fn builder(&self) -> Result<reqwest::ClientBuilder> {
        Ok(reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(self.ca()?)
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_millis(self.target.request_timeout_ms))
            .tcp_keepalive(Duration::from_secs(15))
            .pool_max_idle_per_host(self.target.in_flight))
    }

    fn base_client(&self) -> Result<reqwest::Client> {
        Ok(self.builder()?.build()?)
    }

    fn client_with(&self, identity: &Identity) -> Result<reqwest::Client> {
        let pem = format!("{}\n{}", identity.cert_pem, identity.key_pem);
        Ok(self
            .builder()?
            .identity(reqwest::Identity::from_pem(pem.as_bytes())?)
            .build()?)
    }

    /// The identity on disk, or a new one from enrolling with the provisioning token.
    async fn identity(&self, client: &reqwest::Client) -> Result<Identity> {
        if let Some(identity) = load_identity(&self.data_dir, &self.target.name)? {
            return Ok(identity);
        }
        let enrollment = self.target.enrollment.as_ref().context(
            "not enrolled and no enrollment in the provisioning; add [targets.enrollment]",
        )?;
        let token = match (&enrollment.token, &enrollment.token_file) {
            (Some(token), _) => token.clone(),
            (None, Some(file)) => {
                let path = resolve(&self.data_dir, file);
                std::fs::read_to_string(&path)
                    .with_context(|| format!("reading the enrollment token {}", path.display()))?
                    .trim()
                    .to_string()
            }
            (None, None) => anyhow::bail!("the enrollment has no token"),
        };
        let name = enrollment
            .name
            .clone()
            .unwrap_or_else(|| self.gateway_name.clone());
        let (key_pem, csr_pem) = new_key_and_csr(&name)?;
        let mut last_error = None;
        for endpoint in &self.target.endpoints {
            let response = client
                .post(format!("{endpoint}/v1/enroll"))
                .json(&serde_json::json!({
                    "token": token,
                    "site_id": enrollment.site_id,
                    "name": name,
                    "csr_pem": csr_pem,
                    "version": env!("CARGO_PKG_VERSION"),
                }))
                .send()
                .await;
            match response {
                Ok(response) if response.status() == reqwest::StatusCode::CREATED => {
                    let issued: serde_json::Value = response.json().await?;
                    let identity = Identity {
                        gateway_id: issued["gateway_id"]
                            .as_str()
                            .context("no gateway_id")?
                            .into(),
                        tenant_id: issued["tenant_id"].as_str().context("no tenant_id")?.into(),
                        issued_at_ms: now_ms(),
                        not_after_ms: issued["not_after"].as_i64().unwrap_or(0),
                        key_pem,
                        cert_pem: issued["certificate_pem"]
                            .as_str()
                            .context("no certificate")?
                            .into(),
                    };
                    save_identity(&self.data_dir, &self.target.name, &identity)?;
                    tracing::info!(target = %self.target.name, gateway_id = %identity.gateway_id, "enrolled");
                    return Ok(identity);
                }
                Ok(response) => {
                    let status = response.status();
                    let body = response.text().await.unwrap_or_default();
                    anyhow::bail!("{endpoint} refused the enrollment ({status}): {body}");
                }
                Err(err) => last_error = Some(format!("{endpoint}: {err}")),
            }
        }
        anyhow::bail!("no endpoint answered: {}", last_error.unwrap_or_default())
    }

    /// A new key and certificate over the current certificate's mutual TLS; the cloud revokes
    /// the old certificate once the new one is first used.
    async fn renew(&self, client: &reqwest::Client, identity: &Identity) -> Result<Identity> {
        let (key_pem, csr_pem) = new_key_and_csr(&identity.gateway_id)?;
        let response = client
            .post(format!("{}/v1/gateway/certificate", self.endpoint()))
            .json(&serde_json::json!({ "csr_pem": csr_pem }))
            .send()
            .await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        anyhow::ensure!(status == reqwest::StatusCode::CREATED, "{status}: {body}");
        let renewed = Identity {
            gateway_id: identity.gateway_id.clone(),
            tenant_id: identity.tenant_id.clone(),
            issued_at_ms: now_ms(),
            not_after_ms: body["not_after"].as_i64().unwrap_or(0),
            key_pem,
            cert_pem: body["certificate_pem"]
                .as_str()
                .context("no certificate")?
                .to_string(),
        };
        save_identity(&self.data_dir, &self.target.name, &renewed)?;
        Ok(renewed)
    }

    fn endpoint(&self) -> &str {
        let i = self.stats.endpoint.load(Ordering::Relaxed) as usize;
        &self.target.endpoints[i % self.target.endpoints.len()]
    }

    /// Sends until stopped (true) or until the identity must be reloaded (false).
    async fn send_loop(
        &self,
        client: &reqwest::Client,
        identity: &Identity,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let gateway = match GatewayId::new(&identity.gateway_id) {
            Ok(id) => id,
            Err(err) => {
                self.stats
                    .error(format!("the enrolled gateway id is unusable: {err}"));
                return sleep_or_stop(stop, BACKOFF_MAX).await;
            }
        };
        let stream_name = self
            .target
            .stream
            .clone()
            .unwrap_or_else(|| self.target.name.clone());
        let stream = match StreamId::new(&stream_name) {
            Ok(stream) => stream,
            Err(err) => {
                self.stats.error(format!("stream name: {err}"));
                return sleep_or_stop(stop, BACKOFF_MAX).await;
            }
        };
        let stream_start = match self.stream_start(&stream_name) {
            Ok(start) => start,
            Err(err) => {
                self.stats.error(format!("the stream's start: {err:#}"));
                return sleep_or_stop(stop, BACKOFF_MAX).await;
            }
        };
        let mut encoder = Encoder::new(EncodeOptions::default()).expect("zstd context");
        let mut backoff = BACKOFF_INITIAL;
        let mut max_readings = self.target.batch_max_readings;
        // The first lost sequence number to declare with the next batch (the journal dropped
        // readings before they were sent).
        let mut declare_loss: Option<u64> = None;
        // A `stream_gap` below our cursor: usually a stale answer to a request that overtook an
        // earlier one. It is believed only when a lone request gets it again.
        let mut suspected_loss: Option<u64> = None;
        let mut failed_over_at: Option<Instant> = None;
        // A backoff may end early once per run of failures (when an unreachable endpoint comes
        // back); an endpoint that keeps failing after that is only paced by the backoff.
        let mut may_end_early = true;
        'resend: loop {
            let Some(mut send_from) = self.cursor() else {
                self.stats.error(format!(
                    "the journal has no cursor for {}",
                    self.target.name
                ));
                return sleep_or_stop(stop, BACKOFF_MAX).await;
            };
            let mut in_flight = InFlight::default();
            let mut waiting_since: Option<Instant> = None;
            loop {
                if *stop.borrow() {
                    return true;
                }
                if let Some(at) = failed_over_at {
                    if at.elapsed() > RETURN_TO_PRIMARY_AFTER {
                        self.stats.endpoint.store(0, Ordering::Relaxed);
                        failed_over_at = None;
                    }
                }
                // Fill the pipeline (one request at a time while a loss is being checked).
                let window = if suspected_loss.is_some() {
                    1
                } else {
                    self.target.in_flight
                };
                while in_flight.len() < window {
                    let prepared = match self.prepare(
                        &mut encoder,
                        &gateway,
                        &stream,
                        send_from,
                        max_readings,
                        &mut waiting_since,
                    ) {
                        Ok(Some(prepared)) => prepared,
                        Ok(None) => break,
                        Err(err) => {
                            self.stats.error(format!("reading the journal: {err:#}"));
                            if sleep_or_stop(stop, BACKOFF_MAX).await {
                                return true;
                            }
                            continue 'resend;
                        }
                    };
                    send_from = prepared.last_seq + 1;
                    if let Some(lost_from) = prepared.lost_from {
                        declare_loss = Some(lost_from);
                    }
                    let request = self.send(client, prepared, declare_loss.take(), stream_start);
                    in_flight.push(Box::pin(request));
                }
                if in_flight.is_empty() {
                    if identity.renewal_due(now_ms()) {
                        // Back to `run`, which renews and comes back with the new certificate.
                        return false;
                    }
                    if sleep_or_stop(stop, IDLE_POLL).await {
                        return true;
                    }
                    continue;
                }
                let outcome = tokio::select! {
                    outcome = in_flight.next() => outcome,
                    _ = stop.wait_for(|s| *s) => return true,
                };
                let Some((prepared, result)) = outcome else {
                    continue;
                };
                match result {
                    Ok(ack) => {
                        suspected_loss = None;
                        backoff = BACKOFF_INITIAL;
                        may_end_early = true;
                        if let Err(err) = self.ack(prepared.last_seq) {
                            self.stats
                                .error(format!("moving the journal cursor: {err:#}"));
                            continue 'resend;
                        }
                        self.stats.batches_sent.fetch_add(1, Ordering::Relaxed);
                        self.stats
                            .readings_sent
                            .fetch_add(prepared.readings, Ordering::Relaxed);
                        self.stats
                            .bytes_sent
                            .fetch_add(prepared.bytes.len() as u64, Ordering::Relaxed);
                        self.stats
                            .duplicates
                            .fetch_add(ack.duplicates, Ordering::Relaxed);
                    }
                    Err(SendError::RetryAfter(wait)) => {
                        self.stats.throttled.fetch_add(1, Ordering::Relaxed);
                        if settle_then_sleep(stop, in_flight, wait).await {
                            return true;
                        }
                        continue 'resend;
                    }
                    Err(SendError::Resume(resume_from)) => {
                        if settle(stop, in_flight, SETTLE_AT_MOST).await.is_none() {
                            return true;
                        }
                        let cursor = self.cursor().unwrap_or(prepared.first_seq);
                        if resume_from > cursor {
                            // The cloud has everything before `resume_from` already.
                            if let Err(err) = self.ack(resume_from - 1) {
                                self.stats
                                    .error(format!("moving the journal cursor: {err:#}"));
                            }
                        } else if resume_from < cursor {
                            if suspected_loss == Some(resume_from) {
                                // Asked alone, the cloud still wants readings this gateway
                                // acknowledged and no longer holds: record the loss.
                                let lost = cursor - resume_from;
                                self.stats.declared_lost.fetch_add(lost, Ordering::Relaxed);
                                self.stats.error(format!(
                                    "the cloud lacks readings {resume_from}..{cursor} this gateway no longer holds; declaring them lost"
                                ));
                                declare_loss = Some(resume_from);
                                suspected_loss = None;
                            } else {
                                suspected_loss = Some(resume_from);
                            }
                        }
                        continue 'resend;
                    }
                    Err(SendError::TooLarge) => {
                        if settle(stop, in_flight, SETTLE_AT_MOST).await.is_none() {
                            return true;
                        }
                        max_readings = (max_readings / 2).max(1);
                        self.stats.error(format!(
                            "batch too large; now at most {max_readings} readings"
                        ));
                        continue 'resend;
                    }
                    Err(SendError::Transient(message)) => {
                        self.stats.error(format!("{}: {message}", self.endpoint()));
                        let wait = jitter(backoff);
                        let started = Instant::now();
                        let Some(others_got_through) =
                            settle(stop, in_flight, wait.min(SETTLE_AT_MOST)).await
                        else {
                            return true;
                        };
                        // When others got through, the endpoint works and this connection failed
                        // on its own: no failover. The backoff still grows until the next
                        // success, so a batch that fails every time is paced, not hammered.
                        if !others_got_through && self.target.endpoints.len() > 1 {
                            self.stats.endpoint.fetch_add(1, Ordering::Relaxed);
                            self.stats.failovers.fetch_add(1, Ordering::Relaxed);
                            failed_over_at = Some(Instant::now());
                        }
                        let rest = wait.saturating_sub(started.elapsed());
                        let endpoint = self.endpoint().to_owned(); // the one tried next
                        match backoff_or_return(stop, rest, &endpoint, may_end_early).await {
                            Backoff::Stopped => return true,
                            Backoff::EndedEarly => may_end_early = false,
                            Backoff::WaitedOut => {}
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue 'resend;
                    }
                    Err(SendError::Refused(message)) => {
                        self.stats.error(format!("{}: {message}", self.endpoint()));
                        let wait = jitter(backoff.max(Duration::from_secs(5)));
                        if settle_then_sleep(stop, in_flight, wait).await {
                            return true;
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue 'resend;
                    }
                }
            }
        }
    }

    fn stream_name(&self) -> String {
        self.target
            .stream
            .clone()
            .unwrap_or_else(|| self.target.name.clone())
    }

    /// Where this target's stream starts: the journal cursor when it was first sent, kept with
    /// the identity so the cloud can tell a first batch that arrives late from a resend.
    fn stream_start(&self, stream: &str) -> Result<u64> {
        let path =
            identity_dir(&self.data_dir, &self.target.name).join(format!("stream-{stream}.start"));
        if let Ok(text) = std::fs::read_to_string(&path) {
            return text
                .trim()
                .parse()
                .with_context(|| format!("reading {}", path.display()));
        }
        let start = self
            .cursor()
            .context("the journal has no cursor for this target")?;
        write_private(&path, start.to_string().as_bytes())?;
        Ok(start)
    }

    fn cursor(&self) -> Option<u64> {
        let journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        journal.cursor(&self.target.name)
    }

    fn ack(&self, through: u64) -> Result<()> {
        let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        journal.ack(&self.target.name, through)?;
        Ok(())
    }

    /// The next batch from `from`, or None to wait (nothing new, or too little and too young).
    fn prepare(
        &self,
        encoder: &mut Encoder,
        gateway: &GatewayId,
        stream: &StreamId,
        from: u64,
        max_readings: usize,
        waiting_since: &mut Option<Instant>,
    ) -> Result<Option<Prepared>> {
        // With routing rules some readings are not this target's: look further, but not
        // without bound (the journal is locked meanwhile; the rest waits for the next batch).
        let scan_limit = if self.target.include.is_empty() {
            max_readings
        } else {
            max_readings.saturating_mul(4).max(4096)
        };
        let (selection, end) = {
            let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
            let end = journal.next_seq();
            let selection = journal.read_selected(from, max_readings, scan_limit, |reading| {
                selected(&self.target.include, reading)
            })?;
            (selection, end)
        };
        let Some(selection) = selection else {
            *waiting_since = None;
            return Ok(None);
        };
        let (from, lost_from) = if selection.first_seq > from {
            self.stats
                .declared_lost
                .fetch_add(selection.first_seq - from, Ordering::Relaxed);
            (selection.first_seq, Some(from))
        } else {
            (from, None)
        };
        let mut last_seq = selection.last_seq;
        let mut readings: Vec<Reading> = selection
            .readings
            .into_iter()
            .map(|(_, reading)| reading)
            .collect();
        let full = readings.len() >= max_readings;
        let caught_up = last_seq + 1 >= end;
        if readings.is_empty() {
            // Nothing here for this target. Once the range has waited its batch age, the cloud
            // is told to skip it (an empty `Prepared`), so the journal can let it go.
            let since = *waiting_since.get_or_insert_with(Instant::now);
            if since.elapsed() < Duration::from_millis(self.target.batch_max_age_ms) {
                return Ok(None);
            }
            *waiting_since = None;
            return Ok(Some(Prepared {
                lost_from,
                first_seq: from,
                last_seq,
                readings: 0,
                bytes: bytes::Bytes::new(),
            }));
        }
        if !full && caught_up {
            let since = *waiting_since.get_or_insert_with(Instant::now);
            if since.elapsed() < Duration::from_millis(self.target.batch_max_age_ms) {
                return Ok(None);
            }
        }
        *waiting_since = None;
        let meta = BatchMeta {
            gateway: gateway.clone(),
            stream: stream.clone(),
            first_seq: from,
            last_seq,
        };
        if let Some(form) = &self.target.aggregate {
            let aggregates = aggregate(&readings, form.window_s.saturating_mul(1000) as i64);
            let bytes = if aggregates.is_empty() {
                Vec::new() // nothing numeric: a skip
            } else {
                encoder.encode(&meta, &aggregates)?
            };
            return Ok(Some(Prepared {
                lost_from,
                first_seq: from,
                last_seq,
                readings: aggregates.len() as u64,
                bytes: bytes.into(),
            }));
        }
        let mut bytes = encoder.encode(&meta, &readings)?;
        // Too many bytes: halve the batch (the readings are all still in the journal).
        while bytes.len() > self.target.batch_max_bytes && readings.len() > 1 {
            readings.truncate(readings.len() / 2);
            let last = from + readings.len() as u64 - 1;
            let meta = BatchMeta {
                last_seq: last,
                ..meta.clone()
            };
            if self.target.include.is_empty() {
                bytes = encoder.encode(&meta, &readings)?;
                last_seq = last;
            } else {
                // With rules the journal range of a truncated batch is not simply its length:
                // send it whole rather than guess.
                break;
            }
        }
        Ok(Some(Prepared {
            lost_from,
            first_seq: from,
            last_seq,
            readings: readings.len() as u64,
            bytes: bytes.into(),
        }))
    }

    fn send(
        &self,
        client: &reqwest::Client,
        prepared: Prepared,
        declare_loss: Option<u64>,
        stream_start: u64,
    ) -> impl std::future::Future<Output = (Prepared, Result<IngestAck, SendError>)> + Send + 'static
    {
        let url = format!("{}/v1/ingest", self.endpoint());
        let backlog = {
            let journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
            journal.backlog(&self.target.name).unwrap_or(0)
        };
        let mut request = client
            .post(url)
            .header("content-type", "application/octet-stream")
            .header("fieldgate-stream", self.stream_name())
            .header(
                "fieldgate-form",
                if self.target.aggregate.is_some() {
                    "aggregate"
                } else {
                    "raw"
                },
            )
            .header("fieldgate-backlog", backlog.to_string())
            .header("fieldgate-version", env!("CARGO_PKG_VERSION"))
            .header("fieldgate-stream-start", stream_start.to_string())
            .body(prepared.bytes.clone()); // a reference count, not a copy
        if let Some(lost_from) = declare_loss {
            request = request.header("fieldgate-declared-loss", lost_from.to_string());
        }
        if prepared.bytes.is_empty() {
            request = request.header(
                "fieldgate-skip",
                format!("{}-{}", prepared.first_seq, prepared.last_seq),
            );
        }
        async move {
            let result = match request.send().await {
                Err(err) => Err(SendError::Transient(err.to_string())),
                Ok(response) => classify(response).await,
            };
            (prepared, result)
        }
    }
}

async fn classify(response: reqwest::Response) -> Result<IngestAck, SendError> {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = response
        .text()
        .await
        .map_err(|e| SendError::Transient(e.to_string()))?;
    if status.is_success() {
        return serde_json::from_str(&body).map_err(|e| {
            SendError::Transient(format!("an acknowledgement that does not parse: {e}"))
        });
    }
    let error: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    match status.as_u16() {
        409 => match error["resume_from"].as_u64() {
            Some(resume_from) => Err(SendError::Resume(resume_from)),
            None => Err(SendError::Refused(format!("409: {body}"))),
        },
        429 | 503 => Err(SendError::RetryAfter(Duration::from_secs(
            retry_after.unwrap_or(1),
        ))),
        413 => Err(SendError::TooLarge),
        400..=499 => Err(SendError::Refused(format!("{status}: {body}"))),
        _ => Err(SendError::Transient(format!("{status}: {body}"))),
    }
}

/// Windowed aggregates of the numeric readings: per (device, metric, window) the readings
/// `<metric>.min/.max/.sum/.count/.mean` stamped with the window start, in a stable order.
/// Metrics whose suffixed names would be too long are left out.
pub fn aggregate(readings: &[Reading], window_ms: i64) -> Vec<Reading> {
    use fieldgate_shared::model::{MetricName, Quality, Value};
    use std::collections::BTreeMap;
    let window_ms = window_ms.max(1);
    /// (device, metric, window start) → (min, max, sum, count).
    type Windows = BTreeMap<(String, String, i64), (f64, f64, f64, i64)>;
    let mut windows = Windows::new();
    let mut devices = std::collections::HashMap::new();
    for reading in readings {
        let x = match reading.value {
            Value::F64(x) if x.is_finite() => x,
            Value::I64(x) => x as f64,
            _ => continue,
        };
        let start = reading.ts_ms.div_euclid(window_ms) * window_ms;
        devices
            .entry(reading.device.as_str().to_string())
            .or_insert_with(|| reading.device.clone());
        let entry = windows
            .entry((
                reading.device.as_str().to_string(),
                reading.metric.as_str().to_string(),
                start,
            ))
            .or_insert((f64::INFINITY, f64::NEG_INFINITY, 0.0, 0));
        entry.0 = entry.0.min(x);
        entry.1 = entry.1.max(x);
        entry.2 += x;
        entry.3 += 1;
    }
    let mut out = Vec::with_capacity(windows.len() * 5);
    for ((device, metric, start), (min, max, sum, count)) in windows {
        let device = devices[&device].clone();
        let values = [
            ("min", Value::F64(min)),
            ("max", Value::F64(max)),
            ("sum", Value::F64(sum)),
            ("count", Value::I64(count)),
            ("mean", Value::F64(sum / count as f64)),
        ];
        for (suffix, value) in values {
            let Ok(metric) = MetricName::new(&format!("{metric}.{suffix}")) else {
                continue;
            };
            out.push(Reading {
                device: device.clone(),
                metric,
                ts_ms: start,
                value,
                quality: Quality::Good,
            });
        }
    }
    out
}

/// Whether a reading goes to a target with these rules (none: everything).
pub fn selected(rules: &[RouteRule], reading: &Reading) -> bool {
    rules.is_empty()
        || rules.iter().any(|rule| {
            glob(&rule.devices, reading.device.as_str())
                && glob(&rule.metrics, reading.metric.as_str())
        })
}

/// `*` (any run) and `?` (any one character) glob matching.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Full jitter: a random wait up to `backoff`.
fn jitter(backoff: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let fraction = f64::from(nanos % 1000 + 1) / 1000.0;
    backoff.mul_f64(fraction).max(Duration::from_millis(10))
}

/// Requests in flight behind a failed one are let finish for up to this long rather than cut
/// off: a cut request takes its connection down with it, and on a flaky network the sound
/// connections are the ones worth keeping.
const SETTLE_AT_MOST: Duration = Duration::from_secs(1);

type InFlight = futures_ordered::Queue<(Prepared, Result<IngestAck, SendError>)>;

/// Lets the requests still in `in_flight` finish for up to `wait` (their results are not used:
/// everything from the cursor on is sent again) and says whether any of them reached the cloud;
/// None if `stop` turned true meanwhile.
async fn settle(
    stop: &mut watch::Receiver<bool>,
    in_flight: InFlight,
    wait: Duration,
) -> Option<bool> {
    if in_flight.is_empty() {
        return Some(false);
    }
    let finished = tokio::select! {
        finished = in_flight.settle(wait) => finished,
        _ = stop.wait_for(|s| *s) => return None,
    };
    Some(
        finished
            .iter()
            .any(|(_, result)| !matches!(result, Err(SendError::Transient(_)))),
    )
}

/// Waits `wait`, letting the requests in flight finish meanwhile (see [`settle`]); true if
/// `stop` turned true.
async fn settle_then_sleep(
    stop: &mut watch::Receiver<bool>,
    in_flight: InFlight,
    wait: Duration,
) -> bool {
    let started = Instant::now();
    settle(stop, in_flight, wait).await.is_none()
        || sleep_or_stop(stop, wait.saturating_sub(started.elapsed())).await
}

/// How a backoff ended.
#[derive(Debug, PartialEq, Eq)]
enum Backoff {
    WaitedOut,
    /// The endpoint, unreachable at first, accepted a connection.
    EndedEarly,
    Stopped,
}

/// Backs off for `wait` after a failed send to `endpoint`. With `may_end_early`, the backoff
/// ends as soon as the endpoint, unreachable at first, accepts connections again (a bare TCP
/// connect every [`PROBE_PERIOD`]): after an outage sending resumes at once instead of after a
/// backoff grown long. An endpoint that was reachable all along (the failure was something
/// else) is waited out in full.
async fn backoff_or_return(
    stop: &mut watch::Receiver<bool>,
    wait: Duration,
    endpoint: &str,
    may_end_early: bool,
) -> Backoff {
    let deadline = tokio::time::Instant::now() + wait;
    let address = reqwest::Url::parse(endpoint)
        .ok()
        .and_then(|url| Some((url.host_str()?.to_owned(), url.port_or_known_default()?)));
    let reachable = || async {
        let Some(address) = &address else {
            return false;
        };
        let connect = tokio::net::TcpStream::connect((address.0.as_str(), address.1));
        matches!(tokio::time::timeout(PROBE_PERIOD, connect).await, Ok(Ok(_)))
    };
    let waited_out = |stopped: bool| {
        if stopped {
            Backoff::Stopped
        } else {
            Backoff::WaitedOut
        }
    };
    if !may_end_early || wait <= PROBE_PERIOD || reachable().await {
        let rest = deadline.saturating_duration_since(tokio::time::Instant::now());
        return waited_out(sleep_or_stop(stop, rest).await);
    }
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return waited_out(*stop.borrow());
        }
        if sleep_or_stop(stop, PROBE_PERIOD.min(deadline - now)).await {
            return Backoff::Stopped;
        }
        let found = tokio::select! {
            found = reachable() => found,
            _ = stop.wait_for(|s| *s) => return Backoff::Stopped,
        };
        if found {
            return Backoff::EndedEarly;
        }
    }
}

/// Sleeps; true if `stop` turned true meanwhile.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, duration: Duration) -> bool {
    let stopped = tokio::select! {
        _ = tokio::time::sleep(duration) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    stopped || *stop.borrow()
}

/// A minimal in-order queue of futures (what `FuturesOrdered` does, for one consumer).
mod futures_ordered {
    use std::collections::VecDeque;
    use std::future::Future;
    use std::pin::Pin;

    type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

    /// Futures polled together, results taken in the order they were pushed.
    pub struct Queue<T> {
        futures: VecDeque<(Boxed<T>, Option<T>)>,
    }

    impl<T> Default for Queue<T> {
        fn default() -> Self {
            Self {
                futures: VecDeque::new(),
            }
        }
    }

    impl<T: Send + 'static> Queue<T> {
        pub fn push(&mut self, future: Boxed<T>) {
            self.futures.push_back((future, None));
        }

        pub fn len(&self) -> usize {
            self.futures.len()
        }

        pub fn is_empty(&self) -> bool {
            self.futures.is_empty()
        }

        /// Runs every future to completion for at most `wait`, then drops the unfinished ones;
        /// the outputs of those that finished, in no particular order.
        pub async fn settle(mut self, wait: std::time::Duration) -> Vec<T> {
            let mut finished: Vec<T> = Vec::new();
            let mut pending: Vec<Boxed<T>> = Vec::new();
            for (future, output) in self.futures.drain(..) {
                match output {
                    Some(value) => finished.push(value),
                    None => pending.push(future),
                }
            }
            let all = std::future::poll_fn(|cx| {
                pending.retain_mut(|future| match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => {
                        finished.push(value);
                        false
                    }
                    std::task::Poll::Pending => true,
                });
                if pending.is_empty() {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                }
            });
            let _ = tokio::time::timeout(wait, all).await;
            finished
        }

        /// The first pushed future's output, once it is ready (the others make progress too).
        pub async fn next(&mut self) -> Option<T> {
            if self.futures.is_empty() {
                return None;
            }
            std::future::poll_fn(|cx| {
                for (future, output) in self.futures.iter_mut() {
                    if output.is_none() {
                        if let std::task::Poll::Ready(value) = future.as_mut().poll(cx) {
                            *output = Some(value);
                        }
                    }
                }
                match self.futures.front_mut() {
                    Some((_, output)) if output.is_some() => {
                        let value = output.take();
                        self.futures.pop_front();
                        std::task::Poll::Ready(value)
                    }
                    _ => std::task::Poll::Pending,
                }
            })
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settling keeps what finished in time and drops what did not (a half-open connection).
    #[tokio::test]
    async fn settling_keeps_what_finishes_and_drops_the_rest() {
        let mut queue = futures_ordered::Queue::<u32>::default();
        queue.push(Box::pin(async { 1 }));
        queue.push(Box::pin(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            2
        }));
        queue.push(Box::pin(std::future::pending()));
        let mut finished = queue.settle(Duration::from_millis(500)).await;
        finished.sort();
        assert_eq!(finished, vec![1, 2]);
    }

    /// A backoff grown long after an outage ends as soon as the cloud listens again; one that
    /// follows a failure at a reachable endpoint, or a second one in a run of failures, is
    /// waited out; stopping ends any.
    #[tokio::test]
    async fn a_backoff_ends_when_an_unreachable_endpoint_comes_back() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoint = format!("https://127.0.0.1:{port}");
        let listen_soon = move || {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(600)).await;
                tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .unwrap()
            })
        };
        let backoff = |may_end_early: bool, limit: Duration| {
            let endpoint = endpoint.clone();
            async move {
                let (_stop_tx, mut stop) = watch::channel(false);
                tokio::time::timeout(
                    limit,
                    backoff_or_return(&mut stop, Duration::from_secs(60), &endpoint, may_end_early),
                )
                .await
            }
        };

        let back = listen_soon();
        assert_eq!(
            backoff(true, Duration::from_secs(20)).await,
            Ok(Backoff::EndedEarly),
            "the 60 s backoff did not end when the endpoint came back"
        );
        let listener = back.await.unwrap();

        // Reachable all along: the failure was something else, so the backoff runs its course.
        assert!(
            backoff(true, Duration::from_secs(2)).await.is_err(),
            "a reachable endpoint's backoff ended early"
        );

        // Once a backoff ended early in a run of failures, the next is waited out even if the
        // endpoint comes back (it may be flapping).
        drop(listener);
        let back = listen_soon();
        assert!(
            backoff(false, Duration::from_secs(2)).await.is_err(),
            "a second early end in one run of failures"
        );
        drop(back.await.unwrap());

        let (stop_tx, mut stop) = watch::channel(false);
        let stopping = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            stop_tx.send(true).unwrap();
            stop_tx
        });
        let waited = tokio::time::timeout(
            Duration::from_secs(20),
            backoff_or_return(&mut stop, Duration::from_secs(60), &endpoint, true),
        )
        .await;
        assert_eq!(waited, Ok(Backoff::Stopped));
        drop(stopping.await.unwrap());
    }

    #[test]
    fn aggregates_are_exact_per_window() {
        use fieldgate_shared::model::{DeviceId, MetricName, Quality, Value};
        let r = |device: &str, metric: &str, ts: i64, value: Value| Reading {
            device: DeviceId::new(device).unwrap(),
            metric: MetricName::new(metric).unwrap(),
            ts_ms: ts,
            value,
            quality: Quality::Good,
        };
        let readings = vec![
            r("d1", "t", 1_000, Value::F64(1.0)),
            r("d1", "t", 59_000, Value::F64(3.0)),
            r("d1", "t", 60_000, Value::F64(10.0)),
            r("d1", "n", 5_000, Value::I64(7)),
            r("d1", "flag", 5_000, Value::Bool(true)),
        ];
        let out = aggregate(&readings, 60_000);
        let get = |metric: &str, ts: i64| {
            out.iter()
                .find(|x| x.metric.as_str() == metric && x.ts_ms == ts)
                .map(|x| x.value.clone())
        };
        assert_eq!(get("t.min", 0), Some(Value::F64(1.0)));
        assert_eq!(get("t.max", 0), Some(Value::F64(3.0)));
        assert_eq!(get("t.sum", 0), Some(Value::F64(4.0)));
        assert_eq!(get("t.count", 0), Some(Value::I64(2)));
        assert_eq!(get("t.mean", 0), Some(Value::F64(2.0)));
        assert_eq!(get("t.count", 60_000), Some(Value::I64(1)));
        assert_eq!(get("n.sum", 0), Some(Value::F64(7.0)));
        assert!(out.iter().all(|x| !x.metric.as_str().starts_with("flag")));
        assert_eq!(out.len(), 3 * 5);
    }

    #[test]
    fn globs_match_like_shells() {
        assert!(glob("*", "anything"));
        assert!(glob("pump-*", "pump-7"));
        assert!(!glob("pump-*", "fan-7"));
        assert!(glob("*.temp", "hall.temp"));
        assert!(glob("dev-?", "dev-3"));
        assert!(!glob("dev-?", "dev-31"));
        assert!(glob("a*b*c", "a-x-b-y-c"));
        assert!(!glob("a*b*c", "a-x-c"));
        assert!(glob("", ""));
        assert!(!glob("", "x"));
    }
}
