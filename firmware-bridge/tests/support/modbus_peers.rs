//! Helpers for the Modbus integration tests: finding and starting the real peers (socat pty
//! pairs, a pymodbus RTU server), and collecting a poller's readings against a deadline.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fieldgate_shared::{MetricName, Reading};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How the peers are installed; printed when one is missing.
pub const INSTALL_HINT: &str =
    "apt-get install -y socat && python3 -m pip install 'pymodbus>=3.6,<4' pyserial";

/// Whether a missing peer must fail the test (CI sets FIELDGATE_REQUIRE_ALL=1).
pub fn require_all() -> bool {
    std::env::var("FIELDGATE_REQUIRE_ALL").is_ok_and(|value| value == "1")
}

fn command_succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The peers of the pymodbus test that this machine lacks.
pub fn missing_pymodbus_peers() -> Vec<&'static str> {
    let mut missing = Vec::new();
    if !command_succeeds("socat", &["-V"]) {
        missing.push("socat");
    }
    if !command_succeeds("python3", &["-c", "import pymodbus, serial"]) {
        missing.push("python3 with pymodbus and pyserial");
    }
    missing
}

/// Skips loudly, or fails when FIELDGATE_REQUIRE_ALL=1.
pub fn skip_or_fail(test: &str, missing: &[&str]) {
    let message = format!(
        "{test}: missing {}; install with: {INSTALL_HINT}",
        missing.join(" and ")
    );
    if require_all() {
        panic!("{message} (FIELDGATE_REQUIRE_ALL=1 forbids skipping)");
    }
    eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!!! SKIPPED {message}");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
}

/// A child process that is killed when the test ends, and whose log is printed if it failed.
pub struct ChildGuard {
    name: &'static str,
    child: Child,
    log_path: PathBuf,
}

impl ChildGuard {
    pub fn spawn(name: &'static str, command: &mut Command, log_path: PathBuf) -> Self {
        let log = File::create(&log_path)
            .unwrap_or_else(|err| panic!("creating {}: {err}", log_path.display()));
        let log_for_stderr = log
            .try_clone()
            .unwrap_or_else(|err| panic!("cloning {}: {err}", log_path.display()));
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            .spawn()
            .unwrap_or_else(|err| panic!("starting {name}: {err}"));
        Self {
            name,
            child,
            log_path,
        }
    }

    /// Panics with the child's log if it has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited early ({status}); its log:\n{}",
                self.name,
                std::fs::read_to_string(&self.log_path).unwrap_or_default()
            );
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- log of {} ---\n{}",
                self.name,
                std::fs::read_to_string(&self.log_path).unwrap_or_default()
            );
        }
    }
}

/// Waits until `path` exists.
pub async fn wait_for_path(path: &Path, within: Duration) {
    let deadline = Instant::now() + within;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {within:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `socat -d -d pty,raw,echo=0 pty,raw,echo=0` with stable symlinks in `dir`; returns
/// the guard and the two ends (poller side, device side).
pub async fn start_pty_pair(dir: &Path) -> (ChildGuard, PathBuf, PathBuf) {
    let poller_end = dir.join("tty-poller");
    let device_end = dir.join("tty-device");
    let mut socat = ChildGuard::spawn(
        "socat",
        Command::new("socat").args([
            "-d".to_string(),
            "-d".to_string(),
            format!("pty,raw,echo=0,link={}", poller_end.display()),
            format!("pty,raw,echo=0,link={}", device_end.display()),
        ]),
        dir.join("socat.log"),
    );
    wait_for_path(&poller_end, Duration::from_secs(20)).await;
    wait_for_path(&device_end, Duration::from_secs(20)).await;
    socat.assert_running();
    (socat, poller_end, device_end)
}

/// Starts the pymodbus RTU server script on `port`, serving `spec` (see the script's docs).
pub fn start_pymodbus_server(dir: &Path, port: &Path, unit_id: u8, spec: &str) -> ChildGuard {
    let spec_path = dir.join("pymodbus-spec.json");
    std::fs::write(&spec_path, spec).expect("writing the pymodbus spec");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/pymodbus_rtu_server.py");
    ChildGuard::spawn(
        "pymodbus RTU server",
        Command::new("python3")
            .arg(script)
            .arg("--port")
            .arg(port)
            .arg("--unit")
            .arg(unit_id.to_string())
            .arg("--spec")
            .arg(&spec_path)
            .arg("--baudrate")
            .arg("19200"),
        dir.join("pymodbus.log"),
    )
}

/// Receives readings until `done` says the latest reading of each metric is enough, or the
/// deadline passes (then panics with what arrived). Returns the latest reading per metric.
pub async fn collect_readings(
    readings: &mut mpsc::Receiver<Reading>,
    within: Duration,
    mut done: impl FnMut(&BTreeMap<MetricName, Reading>) -> bool,
) -> BTreeMap<MetricName, Reading> {
    let deadline = Instant::now() + within;
    let mut latest: BTreeMap<MetricName, Reading> = BTreeMap::new();
    while !done(&latest) {
        match tokio::time::timeout_at(deadline, readings.recv()).await {
            Ok(Some(reading)) => {
                latest.insert(reading.metric.clone(), reading);
            }
            Ok(None) => panic!("the readings channel closed; got {latest:#?}"),
            Err(_) => panic!("not done within {within:?}; got {latest:#?}"),
        }
    }
    latest
}

/// Waits until `condition` holds, checking every few milliseconds; panics with `describe()`
/// after the deadline.
pub async fn wait_until(
    within: Duration,
    mut condition: impl FnMut() -> bool,
    describe: impl Fn() -> String,
) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {within:?}: {}",
            describe()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
