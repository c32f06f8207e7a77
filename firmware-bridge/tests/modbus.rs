//! Modbus RTU polling end to end, over pseudo-terminals: against pymodbus as an independent
//! device, and against this crate's simulator with injected faults (stray bytes, answers
//! trickling in byte by byte, silent units, exceptions, bad CRCs, a port that disappears).
//!
//! Timing is never asserted: timeouts in the configs are short where a timeout is the point and
//! generous elsewhere, and every wait has a deadline far above what a loaded machine needs.

#[path = "support/modbus_peers.rs"]
mod modbus_peers;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fieldgate_firmware_bridge::modbus::simulator::EXCEPTION_SERVER_DEVICE_FAILURE;
use fieldgate_firmware_bridge::modbus::{
    spawn_poller, DeviceConfig, Fault, ModbusSimulator, PollerConfig, PollerError, PollerStats,
    PollingConfig, RegisterMap, SimulatedUnit, SimulatedValues, SimulatorOptions,
};
use fieldgate_firmware_bridge::transport::{Rs485Config, SerialPortConfig};
use fieldgate_shared::{DeviceId, MetricName, Quality, Reading, Value};
use modbus_peers::{collect_readings, wait_until};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Far above what any step needs, even on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(60);

fn map(toml: &str) -> Arc<RegisterMap> {
    Arc::new(RegisterMap::from_toml_str(toml, "<test>").unwrap_or_else(|err| panic!("{err}")))
}

fn device_id(name: &str) -> DeviceId {
    DeviceId::new(name).unwrap()
}

fn metric(name: &str) -> MetricName {
    MetricName::new(name).unwrap()
}

/// A poller config for the line at `path`, at 19200 8N1 (the pymodbus server's rate) with short
/// reopening waits; [`RunningPoller::start`] adds the devices.
fn line(path: &Path, request_timeout_ms: u64) -> PollerConfig {
    PollerConfig {
        port: SerialPortConfig {
            baud_rate: 19_200,
            ..SerialPortConfig::new(path.to_str().expect("test paths are UTF-8"))
        },
        polling: PollingConfig {
            request_timeout_ms,
            reopen_backoff_initial_ms: 20,
            reopen_backoff_max_ms: 200,
            ..PollingConfig::default()
        },
        devices: Vec::new(),
    }
}

/// A running poller, its readings and its counters; stopped cleanly by [`RunningPoller::stop`].
struct RunningPoller {
    readings: mpsc::Receiver<Reading>,
    stats: PollerStats,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), PollerError>>,
}

impl RunningPoller {
    fn start(line: PollerConfig, devices: Vec<DeviceConfig>) -> Self {
        let (readings_tx, readings) = mpsc::channel(100_000);
        let (stop, stop_requested) = oneshot::channel::<()>();
        let config = PollerConfig { devices, ..line };
        let (task, stats) = spawn_poller(config, readings_tx, async move {
            let _ = stop_requested.await;
        })
        .unwrap_or_else(|err| panic!("{err}"));
        Self {
            readings,
            stats,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the poller stops when told")
            .expect("the poller task did not panic")
            .expect("the poller stopped cleanly");
    }
}

fn assert_readings(
    latest: &BTreeMap<MetricName, Reading>,
    device: &DeviceId,
    expected: &[(&str, Value)],
) {
    for (name, value) in expected {
        let reading = latest
            .get(&metric(name))
            .unwrap_or_else(|| panic!("no reading of {name}"));
        assert_eq!(&reading.value, value, "{name}");
        assert_eq!(reading.quality, Quality::Good, "{name}");
        assert_eq!(&reading.device, device, "{name}");
        // Stamped with the poll time: after 2024, and not in the future by more than a minute.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!(
            (1_704_067_200_000..now_ms + 60_000).contains(&reading.ts_ms),
            "{name}: {}",
            reading.ts_ms
        );
    }
}

/// Against pymodbus, an independent implementation, over a socat pty pair.
mod modbus_against_pymodbus {
    use super::*;

    /// The register map of the pymodbus test: every type, both word orders, coils and discretes.
    const PEER_MAP: &str = r#"
    model = "pymodbus-peer"
    poll_ms = 100

    [[registers]]
    metric = "u16"
    kind = "holding"
    address = 0
    type = "u16"

    [[registers]]
    metric = "i16"
    kind = "holding"
    address = 1
    type = "i16"

    [[registers]]
    metric = "u32.big"
    kind = "holding"
    address = 2
    type = "u32"

    [[registers]]
    metric = "u32.little"
    kind = "holding"
    address = 4
    type = "u32"
    word_order = "little"

    [[registers]]
    metric = "f32.big"
    kind = "holding"
    address = 6
    type = "f32"

    [[registers]]
    metric = "f32.little"
    kind = "holding"
    address = 8
    type = "f32"
    word_order = "little"

    [[registers]]
    metric = "i32.little"
    kind = "holding"
    address = 10
    type = "i32"
    word_order = "little"

    [[registers]]
    metric = "temperature"
    kind = "input"
    address = 0
    type = "i16"
    scale = 0.01
    decimals = 2

    [[registers]]
    metric = "voltage"
    kind = "input"
    address = 5
    type = "f32"
    decimals = 1

    [[registers]]
    metric = "relay.a"
    kind = "coil"
    address = 0

    [[registers]]
    metric = "relay.b"
    kind = "coil"
    address = 1

    [[registers]]
    metric = "relay.c"
    kind = "coil"
    address = 2

    [[registers]]
    metric = "alarm"
    kind = "discrete"
    address = 3
    "#;

    /// The values pymodbus serves, encoded by Python's `struct`, not by this crate.
    const PEER_SPEC: &str = r#"{
      "holding": [
        {"address": 0, "type": "u16", "value": 54321},
        {"address": 1, "type": "i16", "value": -1234},
        {"address": 2, "type": "u32", "value": 305419896},
        {"address": 4, "type": "u32", "word_order": "little", "value": 4000000000},
        {"address": 6, "type": "f32", "value": 21.5},
        {"address": 8, "type": "f32", "word_order": "little", "value": -1013.25},
        {"address": 10, "type": "i32", "word_order": "little", "value": -123456}
      ],
      "input": [
        {"address": 0, "type": "i16", "value": 2153},
        {"address": 5, "type": "f32", "value": 230.1}
      ],
      "coils": [
        {"address": 0, "value": true},
        {"address": 1, "value": false},
        {"address": 2, "value": true}
      ],
      "discrete": [
        {"address": 3, "value": true}
      ]
    }"#;

    #[tokio::test]
    async fn pymodbus_device_is_polled_with_exact_values() {
        let missing = modbus_peers::missing_pymodbus_peers();
        if !missing.is_empty() {
            modbus_peers::skip_or_fail("pymodbus_device_is_polled_with_exact_values", &missing);
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (_socat, poller_end, device_end) = modbus_peers::start_pty_pair(dir.path()).await;
        let mut server =
            modbus_peers::start_pymodbus_server(dir.path(), &device_end, 17, PEER_SPEC);

        let device = device_id("pymodbus-17");
        let mut poller = RunningPoller::start(
            line(&poller_end, 1_000),
            vec![DeviceConfig {
                id: device.clone(),
                unit_id: 17,
                map: map(PEER_MAP),
            }],
        );
        let n_metrics = 13;
        let latest = collect_readings(&mut poller.readings, DEADLINE, |latest| {
            latest.len() == n_metrics
        })
        .await;
        server.assert_running();
        assert_readings(
            &latest,
            &device,
            &[
                ("u16", Value::I64(54_321)),
                ("i16", Value::I64(-1_234)),
                ("u32.big", Value::I64(0x1234_5678)),
                ("u32.little", Value::I64(4_000_000_000)),
                ("f32.big", Value::F64(21.5)),
                ("f32.little", Value::F64(-1013.25)),
                ("i32.little", Value::I64(-123_456)),
                ("temperature", Value::F64(21.53)),
                ("voltage", Value::F64(230.1)),
                ("relay.a", Value::Bool(true)),
                ("relay.b", Value::Bool(false)),
                ("relay.c", Value::Bool(true)),
                ("alarm", Value::Bool(true)),
            ],
        );
        let counters = poller.stats.snapshot().device(&device);
        assert!(counters.successful_polls >= 4, "{counters:?}");
        assert_eq!(counters.exceptions(), 0, "{counters:?}");
        poller.stop().await;
    }
}

/// Against this crate's simulator, with injected faults.
mod modbus_against_the_simulator {
    use super::*;

    /// A small sensor: registers in three tables, polled fast.
    const SENSOR_MAP: &str = r#"
    model = "test-sensor"
    poll_ms = 50

    [[registers]]
    metric = "level"
    kind = "input"
    address = 0
    type = "u16"

    [[registers]]
    metric = "temperature"
    kind = "holding"
    address = 10
    type = "f32"
    decimals = 2

    [[registers]]
    metric = "pressure"
    kind = "holding"
    address = 12
    type = "f32"
    word_order = "little"

    [[registers]]
    metric = "energy_wh"
    kind = "holding"
    address = 14
    type = "u32"

    [[registers]]
    metric = "offset"
    kind = "holding"
    address = 16
    type = "i16"
    scale = 0.1
    decimals = 1

    [[registers]]
    metric = "door_open"
    kind = "coil"
    address = 0
    "#;

    /// What the simulated sensor serves, and so what the poller must read back exactly.
    fn expected_sensor_readings() -> Vec<(&'static str, Value)> {
        vec![
            ("level", Value::I64(42)),
            ("temperature", Value::F64(21.53)),
            ("pressure", Value::F64(1013.25)),
            ("energy_wh", Value::I64(3_000_000_123)),
            ("offset", Value::F64(-12.5)),
            ("door_open", Value::Bool(true)),
        ]
    }

    fn sensor_values() -> BTreeMap<MetricName, Value> {
        expected_sensor_readings()
            .into_iter()
            .map(|(name, value)| (metric(name), value))
            .collect()
    }

    fn fixed_sensor(unit_id: u8, fault: Fault) -> SimulatedUnit {
        SimulatedUnit {
            unit_id,
            map: map(SENSOR_MAP),
            values: SimulatedValues::Fixed(sensor_values()),
            fault,
        }
    }

    /// One stray 0x00 before each answer of unit 4: the case where tokio-modbus's own decoder waits
    /// for a ninth byte that never comes (see `modbus::transport`). The poller still gets every
    /// reading, without a single timeout.
    #[tokio::test]
    async fn stray_byte_before_each_answer_still_delivers_readings() {
        let simulator = ModbusSimulator::start(
            &[fixed_sensor(4, Fault::StrayBytesBefore(vec![0x00]))],
            SimulatorOptions::default(),
        )
        .unwrap();
        let device = device_id("sensor-4");
        let mut poller = RunningPoller::start(
            line(simulator.port_path(), 5_000),
            vec![DeviceConfig {
                id: device.clone(),
                unit_id: 4,
                map: map(SENSOR_MAP),
            }],
        );
        let latest =
            collect_readings(&mut poller.readings, DEADLINE, |latest| latest.len() == 6).await;
        assert_readings(&latest, &device, &expected_sensor_readings());
        let counters = poller.stats.snapshot().device(&device);
        assert!(
            counters.stray_bytes_discarded >= counters.successful_polls
                && counters.successful_polls >= 3,
            "{counters:?}"
        );
        assert_eq!(counters.timeouts, 0, "{counters:?}");
        assert_eq!(counters.crc_or_framing_errors, 0, "{counters:?}");
        poller.stop().await;
        simulator.stop().await;
    }

    /// Each answer trickles in one byte at a time with pauses: the decoder waits for the whole
    /// frame, and the readings are exact.
    #[tokio::test]
    async fn answer_arriving_byte_by_byte_still_delivers_readings() {
        let simulator = ModbusSimulator::start(
            &[fixed_sensor(
                1,
                Fault::ByteByByte {
                    pause: Duration::from_millis(2),
                },
            )],
            SimulatorOptions::default(),
        )
        .unwrap();
        let device = device_id("sensor-1");
        let mut poller = RunningPoller::start(
            line(simulator.port_path(), 5_000),
            vec![DeviceConfig {
                id: device.clone(),
                unit_id: 1,
                map: map(SENSOR_MAP),
            }],
        );
        let latest =
            collect_readings(&mut poller.readings, DEADLINE, |latest| latest.len() == 6).await;
        assert_readings(&latest, &device, &expected_sensor_readings());
        let counters = poller.stats.snapshot().device(&device);
        assert_eq!(counters.timeouts, 0, "{counters:?}");
        assert_eq!(counters.crc_or_framing_errors, 0, "{counters:?}");
        poller.stop().await;
        simulator.stop().await;
    }

    /// One unit never answers, one answers every request with exception 4, one is good: the good
    /// one's readings keep flowing while the others' timeouts and exceptions are counted.
    #[tokio::test]
    async fn polling_continues_past_silent_and_failing_devices() {
        let simulator = ModbusSimulator::start(
            &[
                SimulatedUnit {
                    unit_id: 1,
                    map: map(SENSOR_MAP),
                    values: SimulatedValues::Generated {
                        seed: 42,
                        sample_interval: Duration::from_millis(100),
                    },
                    fault: Fault::None,
                },
                fixed_sensor(2, Fault::Exception(EXCEPTION_SERVER_DEVICE_FAILURE)),
            ],
            SimulatorOptions::default(),
        )
        .unwrap();
        let (good, failing, silent) =
            (device_id("good"), device_id("failing"), device_id("silent"));
        let devices = [(&good, 1), (&failing, 2), (&silent, 3)]
            .into_iter()
            .map(|(id, unit_id)| DeviceConfig {
                id: id.clone(),
                unit_id,
                map: map(SENSOR_MAP),
            })
            .collect();
        let mut poller = RunningPoller::start(line(simulator.port_path(), 100), devices);
        let stats = poller.stats.clone();

        let describe = || format!("{:#?}", stats.snapshot());
        wait_until(
            DEADLINE,
            || {
                let snapshot = stats.snapshot();
                snapshot.device(&good).readings >= 30
                    && snapshot.device(&silent).timeouts >= 3
                    && snapshot
                        .device(&failing)
                        .exceptions_by_code
                        .get(&EXCEPTION_SERVER_DEVICE_FAILURE)
                        .is_some_and(|&count| count >= 3)
            },
            describe,
        )
        .await;
        // And it goes on: more good readings while the silent unit keeps timing out.
        let before = stats.snapshot();
        wait_until(
            DEADLINE,
            || {
                let snapshot = stats.snapshot();
                snapshot.device(&good).readings >= before.device(&good).readings + 30
                    && snapshot.device(&silent).timeouts > before.device(&silent).timeouts
                    && snapshot.device(&failing).exceptions() > before.device(&failing).exceptions()
            },
            describe,
        )
        .await;

        let snapshot = stats.snapshot();
        let (silent_counters, failing_counters) =
            (snapshot.device(&silent), snapshot.device(&failing));
        assert_eq!(silent_counters.readings, 0, "{silent_counters:?}");
        assert_eq!(failing_counters.readings, 0, "{failing_counters:?}");
        assert_eq!(
            failing_counters
                .exceptions_by_code
                .keys()
                .copied()
                .collect::<Vec<u8>>(),
            [EXCEPTION_SERVER_DEVICE_FAILURE],
            "{failing_counters:?}"
        );
        assert_eq!(failing_counters.timeouts, 0, "{failing_counters:?}");
        assert_eq!(snapshot.port.losses, 0, "{snapshot:?}");

        // Every reading that came out is the good device's, with plausible generated values.
        let mut n_good_readings = 0;
        while let Ok(reading) = poller.readings.try_recv() {
            assert_eq!(reading.device, good, "{reading:?}");
            assert_eq!(reading.quality, Quality::Good, "{reading:?}");
            match (reading.metric.as_str(), &reading.value) {
                ("door_open", Value::Bool(_)) | ("level" | "energy_wh", Value::I64(_)) => {}
                (_, Value::F64(value)) => assert!(value.is_finite(), "{reading:?}"),
                _ => panic!("unexpected {reading:?}"),
            }
            n_good_readings += 1;
        }
        assert!(n_good_readings >= 60, "{n_good_readings}");
        poller.stop().await;
        simulator.stop().await;
    }

    /// Answers with a corrupted CRC are counted as CRC/framing errors (not timeouts, since bytes did
    /// arrive) and re-asked; once the line is clean, readings flow.
    #[tokio::test]
    async fn bad_crc_answers_are_counted_and_polling_recovers() {
        let simulator = ModbusSimulator::start(
            &[fixed_sensor(1, Fault::BadCrc)],
            SimulatorOptions::default(),
        )
        .unwrap();
        let device = device_id("sensor-1");
        let mut poller = RunningPoller::start(
            line(simulator.port_path(), 300),
            vec![DeviceConfig {
                id: device.clone(),
                unit_id: 1,
                map: map(SENSOR_MAP),
            }],
        );
        let stats = poller.stats.clone();
        wait_until(
            DEADLINE,
            || stats.snapshot().device(&device).crc_or_framing_errors >= 4,
            || format!("{:#?}", stats.snapshot()),
        )
        .await;
        let counters = stats.snapshot().device(&device);
        assert_eq!(counters.readings, 0, "{counters:?}");
        // Each garbled answer is asked again once: more requests than distinct polls.
        assert!(
            counters.polls >= counters.crc_or_framing_errors,
            "{counters:?}"
        );

        simulator.set_fault(1, Fault::None);
        let latest =
            collect_readings(&mut poller.readings, DEADLINE, |latest| latest.len() == 6).await;
        assert_readings(&latest, &device, &expected_sensor_readings());
        poller.stop().await;
        simulator.stop().await;
    }

    /// The adapter is unplugged (the simulator's pseudo-terminal closes and its path vanishes) and
    /// plugged back in: the poller counts the loss, reopens the port with backoff, and readings
    /// resume, with the new device's values.
    #[tokio::test]
    async fn poller_reopens_a_port_that_disappears() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("ttyUSB-sim");
        let options = SimulatorOptions {
            link_path: Some(link.clone()),
            ..SimulatorOptions::default()
        };
        let first =
            ModbusSimulator::start(&[fixed_sensor(1, Fault::None)], options.clone()).unwrap();
        let device = device_id("sensor-1");
        let mut poller = RunningPoller::start(
            line(&link, 1_000),
            vec![DeviceConfig {
                id: device.clone(),
                unit_id: 1,
                map: map(SENSOR_MAP),
            }],
        );
        collect_readings(&mut poller.readings, DEADLINE, |latest| latest.len() == 6).await;

        first.stop().await;
        let stats = poller.stats.clone();
        wait_until(
            DEADLINE,
            || stats.snapshot().port.losses >= 1,
            || format!("{:#?}", stats.snapshot()),
        )
        .await;

        let mut replugged_values = sensor_values();
        replugged_values.insert(metric("level"), Value::I64(7));
        let second = ModbusSimulator::start(
            &[SimulatedUnit {
                values: SimulatedValues::Fixed(replugged_values),
                ..fixed_sensor(1, Fault::None)
            }],
            options,
        )
        .unwrap();
        collect_readings(&mut poller.readings, DEADLINE, |latest| {
            latest
                .get(&metric("level"))
                .is_some_and(|reading| reading.value == Value::I64(7))
        })
        .await;
        let snapshot = stats.snapshot();
        assert!(snapshot.port.opens >= 2, "{snapshot:?}");
        assert!(snapshot.device(&device).io_errors >= 1, "{snapshot:?}");
        poller.stop().await;
        second.stop().await;
    }

    /// `[port.rs485]` reaches the port: the poller opens its line with the crate's `open_port`,
    /// which enables RS-485 with an ioctl. A pseudo-terminal is no RS-485 UART and refuses it, so
    /// the poller counts failed opens and keeps retrying rather than polling without RS-485.
    #[tokio::test]
    async fn rs485_settings_are_applied_when_the_port_opens() {
        let simulator =
            ModbusSimulator::start(&[fixed_sensor(1, Fault::None)], SimulatorOptions::default())
                .unwrap();
        let mut config = line(simulator.port_path(), 1_000);
        config.port.rs485 = Some(Rs485Config {
            rts_on_send: true,
            rts_after_send: false,
            delay_before_send_ms: 0,
            delay_after_send_ms: 0,
        });
        let device = device_id("sensor-1");
        let poller = RunningPoller::start(
            config,
            vec![DeviceConfig {
                id: device.clone(),
                unit_id: 1,
                map: map(SENSOR_MAP),
            }],
        );
        let stats = poller.stats.clone();
        wait_until(
            DEADLINE,
            || stats.snapshot().port.open_failures >= 3,
            || format!("{:#?}", stats.snapshot()),
        )
        .await;
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.port.opens, 0, "{snapshot:?}");
        assert_eq!(snapshot.device(&device).polls, 0, "{snapshot:?}");
        poller.stop().await;
        simulator.stop().await;
    }
}
