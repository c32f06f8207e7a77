//! The MQTT ingress over real sockets, with real clients as devices: rumqttc (3.1.1 and 5),
//! raw bytes for what clients will not send, and the independent `mosquitto_pub` and paho-mqtt.
//!
//! No test asserts on time; every wait has a generous timeout so a loaded machine only makes
//! them slower.

// One module, so `cargo test -p fieldgate-edge mqtt` selects every test here.
mod mqtt {
    use std::net::SocketAddr;
    use std::process::Stdio;
    use std::sync::Arc;
    use std::time::Duration;

    use fieldgate_edge::ingress::mqtt::{
        hash_password_with, CommitOutcome, IngressBatch, MqttIngress, MqttIngressConfig,
        MqttIngressError, MqttIngressSnapshot, MqttIngressStats, PasswordHashParams,
    };
    use fieldgate_shared::{Quality, Reading, ShortStr, Value};
    use rumqttc::{
        AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::{mpsc, oneshot};
    use tokio::task::JoinHandle;

    /// Long enough for a loaded 2-core machine; a passing test never waits this long.
    const TIMEOUT: Duration = Duration::from_secs(60);
    /// Unauthenticated connections held open while a good device publishes.
    const N_IDLE_CONNECTIONS: usize = 2000;
    /// Authenticated devices publishing at once in the crowd test.
    const N_CROWD_DEVICES: usize = 100;

    const TS: i64 = 1_700_000_000_000;

    fn cheap_hash(password: &str) -> String {
        // Small argon2id costs keep debug-build tests quick; the format is the production one.
        hash_password_with(password, PasswordHashParams::new(256, 1, 1, None).unwrap()).unwrap()
    }

    fn config_text(devices: &[(String, String)], extra: &str) -> String {
        let mut text = format!("{extra}\n[[listeners]]\naddress = \"127.0.0.1:0\"\n");
        for (id, password) in devices {
            text.push_str(&format!(
                "[[devices]]\nid = \"{id}\"\npassword_hash = \"{}\"\n",
                cheap_hash(password)
            ));
        }
        text
    }

    struct Gateway {
        addr: SocketAddr,
        ingress_stats: Arc<MqttIngressStats>,
        broker: fieldgate_edge::ingress::mqtt::LocalBroker,
        batches: Option<mpsc::Receiver<IngressBatch>>,
        stop: Option<oneshot::Sender<()>>,
        task: Option<JoinHandle<Result<(), MqttIngressError>>>,
    }

    impl Gateway {
        async fn start(devices: &[(&str, &str)], extra: &str) -> Gateway {
            let devices: Vec<(String, String)> = devices
                .iter()
                .map(|(id, pw)| (id.to_string(), pw.to_string()))
                .collect();
            Self::start_owned(&devices, extra).await
        }

        async fn start_owned(devices: &[(String, String)], extra: &str) -> Gateway {
            let config: MqttIngressConfig = toml::from_str(&config_text(devices, extra)).unwrap();
            let ingress = MqttIngress::bind(config).await.unwrap();
            let addr = ingress.local_addrs()[0];
            let ingress_stats = ingress.stats();
            let broker = ingress.broker();
            let (sink, batches) = mpsc::channel(64);
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(ingress.run(sink, async move {
                let _ = stopped.await;
            }));
            Gateway {
                addr,
                ingress_stats,
                broker,
                batches: Some(batches),
                stop: Some(stop),
                task: Some(task),
            }
        }

        fn stats(&self) -> MqttIngressSnapshot {
            self.ingress_stats.snapshot()
        }

        /// Commits every batch as durable and forwards its readings.
        fn auto_commit(&mut self) -> mpsc::UnboundedReceiver<Reading> {
            let mut batches = self.batches.take().expect("batches taken already");
            let (readings_tx, readings_rx) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Some(batch) = batches.recv().await {
                    for reading in batch.readings {
                        let _ = readings_tx.send(reading);
                    }
                    let _ = batch.commit.send(CommitOutcome::Durable);
                }
            });
            readings_rx
        }

        async fn next_batch(&mut self) -> IngressBatch {
            let batches = self.batches.as_mut().expect("batches taken");
            tokio::time::timeout(TIMEOUT, batches.recv())
                .await
                .expect("no batch in time")
                .expect("ingress ended")
        }

        /// Waits until `check` holds for the counters.
        async fn wait_stats(&self, what: &str, check: impl Fn(&MqttIngressSnapshot) -> bool) {
            let deadline = tokio::time::Instant::now() + TIMEOUT;
            loop {
                let snapshot = self.stats();
                if check(&snapshot) {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{what}: counters never got there: {snapshot:#?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        async fn shut_down(mut self) {
            let _ = self.stop.take().unwrap().send(());
            let result = tokio::time::timeout(TIMEOUT, self.task.take().unwrap())
                .await
                .expect("ingress did not stop")
                .unwrap();
            result.unwrap();
        }
    }

    fn options(addr: SocketAddr, client_id: &str, user: &str, password: &str) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_credentials(user, password);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(1 << 20, 1 << 20);
        options
    }

    fn device(addr: SocketAddr, id: &str, password: &str) -> (AsyncClient, EventLoop) {
        AsyncClient::new(options(addr, id, id, password), 100)
    }

    /// Polls an event loop in a task and forwards what it yields; stops at the first error unless
    /// `reconnect`.
    fn drive(
        mut eventloop: EventLoop,
        reconnect: bool,
    ) -> mpsc::UnboundedReceiver<Result<Event, String>> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let failed = event.is_err();
                if tx.send(event.map_err(|err| format!("{err:?}"))).is_err() {
                    return;
                }
                if failed {
                    if !reconnect {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        rx
    }

    /// Waits for an event that `pick` accepts, skipping others; panics on an error unless `pick`
    /// accepts errors too.
    async fn wait_event<T>(
        events: &mut mpsc::UnboundedReceiver<Result<Event, String>>,
        what: &str,
        mut pick: impl FnMut(&Result<Event, String>) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let event = tokio::time::timeout_at(deadline, events.recv())
                .await
                .unwrap_or_else(|_| panic!("{what}: no such event in time"))
                .unwrap_or_else(|| panic!("{what}: event loop ended"));
            if let Some(found) = pick(&event) {
                return found;
            }
        }
    }

    async fn wait_pubacks(events: &mut mpsc::UnboundedReceiver<Result<Event, String>>, n: usize) {
        for i in 0..n {
            wait_event(events, &format!("PUBACK {i} of {n}"), |event| match event {
                Ok(Event::Incoming(Packet::PubAck(_))) => Some(()),
                Err(err) => panic!("connection failed while waiting for PUBACKs: {err}"),
                _ => None,
            })
            .await;
        }
    }

    async fn take_readings(
        readings: &mut mpsc::UnboundedReceiver<Reading>,
        n: usize,
    ) -> Vec<Reading> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let reading = tokio::time::timeout(TIMEOUT, readings.recv())
                .await
                .unwrap_or_else(|_| panic!("only {} of {n} readings arrived", out.len()))
                .expect("consumer ended");
            out.push(reading);
        }
        out
    }

    fn flat_json(i: i64) -> String {
        format!(
            r#"{{"ts": {}, "temperature": 21.53, "humidity": 40, "door_open": false, "state": "run"}}"#,
            TS + i
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn good_device_publishes_flat_json_at_qos1() {
        let mut gateway = Gateway::start(&[("meter-1", "pw-1")], "").await;
        let mut readings = gateway.auto_commit();
        let (client, eventloop) = device(gateway.addr, "meter-1", "pw-1");
        let mut events = drive(eventloop, false);
        const N: i64 = 50;
        for i in 0..N {
            client
                .publish(
                    "devices/meter-1/readings",
                    QoS::AtLeastOnce,
                    false,
                    flat_json(i),
                )
                .await
                .unwrap();
        }
        wait_pubacks(&mut events, N as usize).await;
        let got = take_readings(&mut readings, 4 * N as usize).await;
        assert!(got.iter().all(|r| r.device.as_str() == "meter-1"));
        let first: Vec<(&str, i64, &Value)> = got[..4]
            .iter()
            .map(|r| (r.metric.as_str(), r.ts_ms, &r.value))
            .collect();
        assert_eq!(
            first,
            [
                ("temperature", TS, &Value::F64(21.53)),
                ("humidity", TS, &Value::I64(40)),
                ("door_open", TS, &Value::Bool(false)),
                ("state", TS, &Value::Str(ShortStr::new("run").unwrap())),
            ]
        );
        assert_eq!(got.last().unwrap().ts_ms, TS + N - 1);
        assert!(got.iter().all(|r| r.quality == Quality::Good));
        let stats = gateway.stats();
        assert_eq!(stats.messages_accepted, N as u64);
        assert_eq!(stats.readings_accepted, 4 * N as u64);
        assert_eq!(stats.sessions_started, 1);
        gateway.shut_down().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_credentials_are_refused() {
        let gateway = Gateway::start(&[("meter-1", "pw-1"), ("meter-2", "pw-2")], "").await;
        let refused = |opts: MqttOptions| async move {
            let (_client, eventloop) = AsyncClient::new(opts, 10);
            let mut events = drive(eventloop, false);
            wait_event(&mut events, "refusal", |event| match event {
                Err(err) => Some(err.clone()),
                Ok(Event::Incoming(Packet::ConnAck(ack))) => panic!("connected: {ack:?}"),
                _ => None,
            })
            .await
        };
        let addr = gateway.addr;
        let bad_password = format!(
            "{:?}",
            ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword)
        );
        assert_eq!(
            refused(options(addr, "meter-1", "meter-1", "pw-2")).await,
            bad_password
        );
        assert_eq!(
            refused(options(addr, "meter-9", "meter-9", "pw-1")).await,
            bad_password
        );
        // Another device's password is no good either.
        assert_eq!(
            refused(options(addr, "meter-2", "meter-2", "pw-1")).await,
            bad_password
        );
        assert_eq!(
            refused(options(addr, "meter-2", "meter-1", "pw-1")).await,
            format!(
                "{:?}",
                ConnectionError::ConnectionRefused(ConnectReturnCode::BadClientId)
            )
        );
        let mut anonymous = MqttOptions::new("meter-1", addr.ip().to_string(), addr.port());
        anonymous.set_keep_alive(Duration::from_secs(30));
        assert_eq!(refused(anonymous).await, bad_password);
        let stats = gateway.stats();
        assert_eq!(stats.auth_failures, 4, "{stats:#?}");
        assert_eq!(stats.auth_bad_client_ids, 1);
        assert_eq!(stats.sessions_started, 0);
        gateway.shut_down().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishing_under_another_device_disconnects_the_offender() {
        let mut gateway = Gateway::start(&[("meter-1", "pw-1"), ("meter-2", "pw-2")], "").await;
        let mut readings = gateway.auto_commit();
        let (good, good_loop) = device(gateway.addr, "meter-2", "pw-2");
        let mut good_events = drive(good_loop, false);

        // MQTT 3.1.1: the connection is closed.
        let (offender, offender_loop) = device(gateway.addr, "meter-1", "pw-1");
        let mut offender_events = drive(offender_loop, false);
        offender
            .publish(
                "devices/meter-2/readings",
                QoS::AtLeastOnce,
                false,
                flat_json(0),
            )
            .await
            .unwrap();
        let error = wait_event(
            &mut offender_events,
            "offender closed",
            |event| match event {
                Err(err) => Some(err.clone()),
                Ok(Event::Incoming(Packet::PubAck(_))) => panic!("foreign publish acknowledged"),
                _ => None,
            },
        )
        .await;
        assert!(!error.is_empty());

        // MQTT 5: told why.
        let mut options5 = rumqttc::v5::MqttOptions::new(
            "meter-1",
            gateway.addr.ip().to_string(),
            gateway.addr.port(),
        );
        options5.set_credentials("meter-1", "pw-1");
        let (offender5, mut offender5_loop) = rumqttc::v5::AsyncClient::new(options5, 10);
        offender5
            .publish(
                "devices/meter-2/readings",
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                flat_json(1),
            )
            .await
            .unwrap();
        let reason = tokio::time::timeout(TIMEOUT, async {
            loop {
                match offender5_loop.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(
                        rumqttc::v5::mqttbytes::v5::Packet::PubAck(ack),
                    )) => {
                        panic!("foreign publish acknowledged: {ack:?}")
                    }
                    Ok(_) => {}
                    Err(err) => return format!("{err:?}"),
                }
            }
        })
        .await
        .unwrap();
        assert!(
            reason.contains("ServerDisconnect") && reason.contains("NotAuthorized"),
            "{reason}"
        );

        // Nothing of theirs was stored, and the good device is served.
        good.publish(
            "devices/meter-2/readings",
            QoS::AtLeastOnce,
            false,
            flat_json(2),
        )
        .await
        .unwrap();
        wait_pubacks(&mut good_events, 1).await;
        let got = take_readings(&mut readings, 4).await;
        assert!(
            got.iter()
                .all(|r| r.device.as_str() == "meter-2" && r.ts_ms == TS + 2),
            "{got:?}"
        );
        let stats = gateway.stats();
        assert_eq!(stats.rejected_unauthorised_publish, 2, "{stats:#?}");
        assert_eq!(stats.messages_accepted, 1);
        gateway.shut_down().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_and_garbage_payloads_are_refused_and_counted() {
        let mut gateway = Gateway::start(&[("meter-1", "pw-1")], "max_packet_bytes = 2048").await;
        let mut readings = gateway.auto_commit();
        let (client, eventloop) = device(gateway.addr, "meter-1", "pw-1");
        let mut events = drive(eventloop, false);
        let topic = "devices/meter-1/readings";
        for garbage in [
            &b"not json"[..],
            b"{\"a\": [1]}",
            b"{\"bad name\": 1}",
            b"\x07\x00",
            b"",
        ] {
            client
                .publish(topic, QoS::AtLeastOnce, false, garbage.to_vec())
                .await
                .unwrap();
        }
        // MQTT 3.1.1 cannot refuse one message: each is acknowledged, and dropped.
        wait_pubacks(&mut events, 5).await;
        let big = format!(r#"{{"ts": 1, "blob": "{}"}}"#, "x".repeat(10_000));
        client
            .publish(topic, QoS::AtLeastOnce, false, big)
            .await
            .unwrap();
        wait_pubacks(&mut events, 1).await;
        // The stream is still in step after skipping the big one.
        client
            .publish(topic, QoS::AtLeastOnce, false, flat_json(7))
            .await
            .unwrap();
        wait_pubacks(&mut events, 1).await;
        let got = take_readings(&mut readings, 4).await;
        assert!(got.iter().all(|r| r.ts_ms == TS + 7), "{got:?}");
        let stats = gateway.stats();
        assert_eq!(stats.rejected_malformed, 5, "{stats:#?}");
        assert_eq!(stats.rejected_oversized, 1, "{stats:#?}");
        assert_eq!(stats.messages_accepted, 1);
        assert_eq!(stats.readings_accepted, 4);

        // MQTT 5: a malformed payload gets PUBACK 0x99 with the reason.
        let mut options5 = rumqttc::v5::MqttOptions::new(
            "meter-1",
            gateway.addr.ip().to_string(),
            gateway.addr.port(),
        );
        options5.set_credentials("meter-1", "pw-1");
        let (client5, mut loop5) = rumqttc::v5::AsyncClient::new(options5, 10);
        client5
            .publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                "{\"a\": nope}",
            )
            .await
            .unwrap();
        let ack = tokio::time::timeout(TIMEOUT, async {
            loop {
                if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(
                    ack,
                )) = loop5.poll().await.unwrap()
                {
                    return ack;
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(
            ack.reason,
            rumqttc::v5::mqttbytes::v5::PubAckReason::PayloadFormatInvalid
        );
        let why = ack
            .properties
            .and_then(|p| p.reason_string)
            .unwrap_or_default();
        assert!(why.contains("not readings JSON"), "{why}");

        // MQTT 5: an oversized packet (the limit was in the CONNACK) gets DISCONNECT 0x95.
        let mut raw = RawClient::connect(gateway.addr, 5, "meter-1", "pw-1").await;
        raw.send(&publish_packet(5, topic, 1, 9, &vec![b'x'; 5000]))
            .await;
        assert_disconnect(raw.read_packet().await, 0x95);
        assert_eq!(raw.read_packet().await, None);
        gateway
            .wait_stats("v5 refusals", |s| {
                s.rejected_malformed == 6 && s.rejected_oversized == 2
            })
            .await;
        gateway.shut_down().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn puback_follows_the_durable_commit_and_busy_makes_the_device_resend() {
        let mut gateway = Gateway::start(&[("meter-1", "pw-1")], "").await;
        // A persistent session: MQTT clients resend unacknowledged messages only into one.
        let mut persistent = options(gateway.addr, "meter-1", "meter-1", "pw-1");
        persistent.set_clean_session(false);
        let (client, eventloop) = AsyncClient::new(persistent, 100);
        let mut events = drive(eventloop, true);
        let topic = "devices/meter-1/readings";
        let no_puback_for = |events: &mut mpsc::UnboundedReceiver<Result<Event, String>>| {
            // The batch reached the consumer, so the gateway has processed the PUBLISH; an early
            // PUBACK would already be on its way.
            let mut seen = Vec::new();
            while let Ok(event) = events.try_recv() {
                seen.push(event);
            }
            assert!(
                !seen
                    .iter()
                    .any(|e| matches!(e, Ok(Event::Incoming(Packet::PubAck(_))))),
                "PUBACK before the durable commit: {seen:?}"
            );
        };

        client
            .publish(topic, QoS::AtLeastOnce, false, flat_json(1))
            .await
            .unwrap();
        let first = gateway.next_batch().await;
        client
            .publish(topic, QoS::AtLeastOnce, false, flat_json(2))
            .await
            .unwrap();
        let second = gateway.next_batch().await;
        assert_eq!(first.readings[0].ts_ms, TS + 1);
        assert_eq!(second.readings[0].ts_ms, TS + 2);
        tokio::time::sleep(Duration::from_millis(300)).await;
        no_puback_for(&mut events);
        // The second batch is durable first: its PUBACK still waits for the first's.
        second.commit.send(CommitOutcome::Durable).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        no_puback_for(&mut events);
        first.commit.send(CommitOutcome::Durable).unwrap();
        let pkids: Vec<u16> = {
            let mut pkids = Vec::new();
            for _ in 0..2 {
                pkids.push(
                    wait_event(&mut events, "PUBACK", |event| match event {
                        Ok(Event::Incoming(Packet::PubAck(ack))) => Some(ack.pkid),
                        _ => None,
                    })
                    .await,
                );
            }
            pkids
        };
        assert!(pkids[0] < pkids[1], "PUBACKs out of order: {pkids:?}");

        // Busy: no PUBACK, the connection closes, and the device sends the message again.
        client
            .publish(topic, QoS::AtLeastOnce, false, flat_json(3))
            .await
            .unwrap();
        let busy = gateway.next_batch().await;
        assert_eq!(busy.readings[0].ts_ms, TS + 3);
        busy.commit.send(CommitOutcome::Busy).unwrap();
        let again = gateway.next_batch().await;
        assert_eq!(again.readings, busy.readings);
        again.commit.send(CommitOutcome::Durable).unwrap();
        wait_event(
            &mut events,
            "PUBACK of the resent message",
            |event| match event {
                Ok(Event::Incoming(Packet::PubAck(_))) => Some(()),
                _ => None,
            },
        )
        .await;
        let stats = gateway.stats();
        assert_eq!(stats.commits_busy, 1, "{stats:#?}");
        assert_eq!(stats.sessions_started, 2);
        gateway.shut_down().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_clients_do_not_stop_a_good_device() {
        let extra = format!(
            "max_connections = {}\nconnect_timeout_ms = 120000",
            N_IDLE_CONNECTIONS + 200
        );
        let mut gateway = Gateway::start(&[("good", "pw-good"), ("evil", "pw-evil")], &extra).await;
        let mut readings = gateway.auto_commit();
        let addr = gateway.addr;

        // Sockets that never say CONNECT.
        let mut idle = Vec::with_capacity(N_IDLE_CONNECTIONS);
        for _ in 0..N_IDLE_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut hostile = Vec::new();
        // Garbage bytes, over and over.
        for seed in 0..4u8 {
            let mut stop = stop_rx.clone();
            hostile.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !*stop.borrow_and_update() {
                    if let Ok(mut socket) = TcpStream::connect(addr).await {
                        let junk: Vec<u8> = (0..256u32)
                            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                            .collect();
                        let _ = socket.write_all(&junk).await;
                        let mut buf = [0u8; 64];
                        let _ = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf))
                            .await;
                    }
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                n
            }));
        }
        // Wrong passwords, over and over.
        {
            let mut stop = stop_rx.clone();
            hostile.push(tokio::spawn(async move {
                let mut n = 0;
                while !*stop.borrow_and_update() {
                    let (_c, eventloop) =
                        AsyncClient::new(options(addr, "good", "good", "guess"), 10);
                    let mut events = drive(eventloop, false);
                    let _ = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
                    n += 1;
                }
                n
            }));
        }
        // An authenticated device publishing under another's topic and garbage, reconnecting.
        {
            let mut stop = stop_rx.clone();
            hostile.push(tokio::spawn(async move {
                let mut n = 0;
                while !*stop.borrow_and_update() {
                    let (client, eventloop) = device(addr, "evil", "pw-evil");
                    let mut events = drive(eventloop, false);
                    for _ in 0..20 {
                        let _ = client
                            .publish("devices/evil/readings", QoS::AtMostOnce, false, "garbage")
                            .await;
                    }
                    let _ = client
                        .publish(
                            "devices/good/readings",
                            QoS::AtLeastOnce,
                            false,
                            flat_json(-1),
                        )
                        .await;
                    while let Ok(Some(event)) =
                        tokio::time::timeout(Duration::from_secs(10), events.recv()).await
                    {
                        if event.is_err() {
                            break;
                        }
                    }
                    n += 1;
                }
                n
            }));
        }

        let (client, eventloop) = device(addr, "good", "pw-good");
        let mut events = drive(eventloop, false);
        const N: i64 = 300;
        for i in 0..N {
            client
                .publish(
                    "devices/good/readings",
                    QoS::AtLeastOnce,
                    false,
                    flat_json(i),
                )
                .await
                .unwrap();
        }
        wait_pubacks(&mut events, N as usize).await;
        let got = take_readings(&mut readings, 4 * N as usize).await;
        assert!(
            got.iter()
                .all(|r| r.device.as_str() == "good" && r.ts_ms >= TS),
            "a hostile reading got through"
        );
        stop_tx.send(true).unwrap();
        for task in hostile {
            let rounds = task.await.unwrap();
            assert!(rounds > 0);
        }
        let stats = gateway.stats();
        assert!(
            stats.connections_accepted as usize > N_IDLE_CONNECTIONS,
            "{stats:#?}"
        );
        assert!(stats.protocol_errors > 0, "{stats:#?}");
        assert!(stats.auth_failures > 0, "{stats:#?}");
        assert!(stats.rejected_unauthorised_publish > 0, "{stats:#?}");
        assert!(stats.rejected_malformed > 0, "{stats:#?}");
        assert_eq!(stats.messages_accepted, N as u64, "{stats:#?}");
        drop(idle);
        gateway.shut_down().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crowd_of_devices_is_served_at_once() {
        let devices: Vec<(String, String)> = (0..N_CROWD_DEVICES)
            .map(|i| (format!("dev-{i}"), format!("pw-{i}")))
            .collect();
        let mut gateway = Gateway::start_owned(&devices, "max_concurrent_auth = 2").await;
        let mut readings = gateway.auto_commit();
        const MESSAGES: usize = 10;
        let mut clients = Vec::new();
        for (id, password) in &devices {
            let (client, eventloop) = device(gateway.addr, id, password);
            let events = drive(eventloop, false);
            let topic = format!("devices/{id}/readings");
            clients.push(tokio::spawn(async move {
                let mut events = events;
                for i in 0..MESSAGES {
                    client
                        .publish(topic.clone(), QoS::AtLeastOnce, false, flat_json(i as i64))
                        .await
                        .unwrap();
                }
                wait_pubacks(&mut events, MESSAGES).await;
                client
            }));
        }
        let mut connected = Vec::new();
        for task in clients {
            connected.push(task.await.unwrap());
        }
        let got = take_readings(&mut readings, N_CROWD_DEVICES * MESSAGES * 4).await;
        let mut per_device = std::collections::HashMap::new();
        for reading in &got {
            *per_device.entry(reading.device.clone()).or_insert(0) += 1;
        }
        assert_eq!(per_device.len(), N_CROWD_DEVICES);
        assert!(per_device.values().all(|&n| n == MESSAGES * 4));
        assert_eq!(gateway.stats().connections_open as usize, N_CROWD_DEVICES);
        drop(connected);
        gateway.shut_down().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn persistent_sessions_keep_their_subscriptions() {
        let gateway = Gateway::start(&[("meter-1", "pw-1")], "").await;
        let connect = |clean: bool| {
            let mut opts = options(gateway.addr, "meter-1", "meter-1", "pw-1");
            opts.set_clean_session(clean);
            let (client, eventloop) = AsyncClient::new(opts, 10);
            (client, drive(eventloop, false))
        };
        async fn session_present(
            events: &mut mpsc::UnboundedReceiver<Result<Event, String>>,
        ) -> bool {
            wait_event(events, "CONNACK", |event| match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => Some(ack.session_present),
                _ => None,
            })
            .await
        }
        let (client, mut events) = connect(false);
        assert!(!session_present(&mut events).await);
        client
            .subscribe("devices/meter-1/commands/#", QoS::AtMostOnce)
            .await
            .unwrap();
        wait_event(&mut events, "SUBACK", |event| {
            matches!(event, Ok(Event::Incoming(Packet::SubAck(_)))).then_some(())
        })
        .await;
        client.disconnect().await.unwrap();
        gateway
            .wait_stats("session saved", |s| s.connections_open == 0)
            .await;

        // Back with a persistent session: subscribed without asking again.
        let (_client, mut events) = connect(false);
        assert!(session_present(&mut events).await);
        let broker = gateway.broker.clone();
        let (mut control_tx, _control_rx) =
            tokio::task::spawn_blocking(move || broker.link("control"))
                .await
                .unwrap()
                .unwrap();
        tokio::time::timeout(TIMEOUT, async {
            loop {
                control_tx
                    .publish("devices/meter-1/commands/ping", "1")
                    .unwrap();
                if let Ok(Some(Ok(Event::Incoming(Packet::Publish(_))))) =
                    tokio::time::timeout(Duration::from_millis(300), events.recv()).await
                {
                    return;
                }
            }
        })
        .await
        .expect("no delivery on the resumed subscription");

        // A second connection while the first is open takes the session over, state and all.
        let (_second, mut events) = connect(false);
        assert!(session_present(&mut events).await);
        gateway
            .wait_stats("taken over", |s| s.sessions_taken_over == 1)
            .await;

        // A clean session starts empty.
        let (_clean, mut events) = connect(true);
        assert!(!session_present(&mut events).await);
        gateway.shut_down().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn devices_subscribe_only_to_their_own_topics_and_get_commands() {
        let gateway = Gateway::start(&[("meter-1", "pw-1")], "").await;
        let (client, eventloop) = device(gateway.addr, "meter-1", "pw-1");
        let mut events = drive(eventloop, false);
        client
            .subscribe("devices/meter-1/commands/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        client
            .subscribe("devices/meter-2/#", QoS::AtMostOnce)
            .await
            .unwrap();
        client.subscribe("#", QoS::AtMostOnce).await.unwrap();
        let mut codes = Vec::new();
        for _ in 0..3 {
            codes.push(
                wait_event(&mut events, "SUBACK", |event| match event {
                    Ok(Event::Incoming(Packet::SubAck(ack))) => Some(ack.return_codes.clone()),
                    _ => None,
                })
                .await,
            );
        }
        use rumqttc::SubscribeReasonCode;
        assert_eq!(
            codes,
            [
                vec![SubscribeReasonCode::Success(QoS::AtMostOnce)],
                vec![SubscribeReasonCode::Failure],
                vec![SubscribeReasonCode::Failure]
            ]
        );
        assert_eq!(gateway.stats().rejected_unauthorised_subscribe, 2);

        // The agent publishes a command through the embedded broker.
        let broker = gateway.broker.clone();
        let (mut control_tx, _control_rx) =
            tokio::task::spawn_blocking(move || broker.link("control"))
                .await
                .unwrap()
                .unwrap();
        let delivered = tokio::time::timeout(TIMEOUT, async {
            loop {
                control_tx
                    .publish("devices/meter-1/commands/reboot", "in 5 s")
                    .unwrap();
                if let Ok(Some(Ok(Event::Incoming(Packet::Publish(publish))))) =
                    tokio::time::timeout(Duration::from_millis(300), events.recv()).await
                {
                    return publish;
                }
            }
        })
        .await
        .expect("command never delivered");
        assert_eq!(delivered.topic, "devices/meter-1/commands/reboot");
        assert_eq!(&delivered.payload[..], b"in 5 s");
        gateway.shut_down().await;
    }

    /// An MQTT 5 DISCONNECT with this reason code (and maybe a reason string).
    fn assert_disconnect(packet: Option<Vec<u8>>, reason: u8) {
        let packet = packet.expect("connection closed without a DISCONNECT");
        assert!(
            packet.len() >= 3 && packet[0] == 0xE0 && packet[2] == reason,
            "expected DISCONNECT {reason:#04x}, got {packet:?}"
        );
    }

    // ---- A raw client, for what real clients will not send --------------------------------------

    struct RawClient {
        socket: TcpStream,
        buf: Vec<u8>,
    }

    fn put_str(out: &mut Vec<u8>, text: &[u8]) {
        out.extend_from_slice(&(text.len() as u16).to_be_bytes());
        out.extend_from_slice(text);
    }

    fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![byte1];
        let mut len = body.len();
        loop {
            let byte = (len & 0x7f) as u8;
            len >>= 7;
            out.push(if len > 0 { byte | 0x80 } else { byte });
            if len == 0 {
                break;
            }
        }
        out.extend_from_slice(body);
        out
    }

    fn publish_packet(level: u8, topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        put_str(&mut body, topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        if level == 5 {
            body.push(0);
        }
        body.extend_from_slice(payload);
        frame(0x30 | (qos << 1), &body)
    }

    impl RawClient {
        async fn connect(addr: SocketAddr, level: u8, id: &str, password: &str) -> RawClient {
            let mut body = Vec::new();
            put_str(&mut body, b"MQTT");
            body.extend_from_slice(&[level, 0xC2, 0, 30]);
            if level == 5 {
                body.push(0);
            }
            put_str(&mut body, id.as_bytes());
            put_str(&mut body, id.as_bytes());
            put_str(&mut body, password.as_bytes());
            let mut client = RawClient {
                socket: TcpStream::connect(addr).await.unwrap(),
                buf: Vec::new(),
            };
            client.send(&frame(0x10, &body)).await;
            let connack = client.read_packet().await.expect("no CONNACK");
            assert_eq!(connack[0], 0x20);
            client
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.socket.write_all(bytes).await.unwrap();
        }

        /// The next whole packet, or None at end of stream.
        async fn read_packet(&mut self) -> Option<Vec<u8>> {
            loop {
                if self.buf.len() >= 2 {
                    let mut len = 0usize;
                    let mut i = 1;
                    let mut complete = false;
                    while i < self.buf.len() && i <= 4 {
                        len |= usize::from(self.buf[i] & 0x7f) << (7 * (i - 1));
                        if self.buf[i] & 0x80 == 0 {
                            complete = true;
                            break;
                        }
                        i += 1;
                    }
                    if complete && self.buf.len() >= i + 1 + len {
                        return Some(self.buf.drain(..i + 1 + len).collect());
                    }
                }
                let mut chunk = [0u8; 4096];
                match tokio::time::timeout(TIMEOUT, self.socket.read(&mut chunk)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return None,
                    Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(_) => panic!("nothing from the gateway in time"),
                }
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raw_clients_get_the_documented_answers() {
        let mut gateway = Gateway::start(&[("meter-1", "pw-1")], "").await;
        let mut readings = gateway.auto_commit();
        let topic = "devices/meter-1/readings";
        // MQTT 3.1.1 CONNACK for a bad password: return code 4.
        let mut socket = TcpStream::connect(gateway.addr).await.unwrap();
        let mut body = Vec::new();
        put_str(&mut body, b"MQTT");
        body.extend_from_slice(&[4, 0xC2, 0, 30]);
        for part in [&b"meter-1"[..], b"meter-1", b"nope"] {
            put_str(&mut body, part);
        }
        socket.write_all(&frame(0x10, &body)).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(TIMEOUT, socket.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer, [0x20, 2, 0, 4]);

        // MQTT 3.1 (level 3) gets "unacceptable protocol version".
        let mut socket = TcpStream::connect(gateway.addr).await.unwrap();
        let mut body = Vec::new();
        put_str(&mut body, b"MQIsdp");
        body.extend_from_slice(&[3, 0x02, 0, 30]);
        put_str(&mut body, b"x");
        socket.write_all(&frame(0x10, &body)).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(TIMEOUT, socket.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer, [0x20, 2, 0, 1]);

        // QoS 2 is refused (MQTT 5: DISCONNECT 0x9B).
        let mut raw = RawClient::connect(gateway.addr, 5, "meter-1", "pw-1").await;
        raw.send(&publish_packet(5, topic, 2, 1, flat_json(0).as_bytes()))
            .await;
        assert_disconnect(raw.read_packet().await, 0x9B);

        // Several PUBLISHes in one write become one batch, acknowledged in order; a refused one in
        // the middle keeps its place (MQTT 5 PUBACK 0x99 with a reason string).
        let mut raw = RawClient::connect(gateway.addr, 5, "meter-1", "pw-1").await;
        let mut bytes = publish_packet(5, topic, 1, 1, flat_json(1).as_bytes());
        bytes.extend(publish_packet(5, topic, 1, 2, b"{oops"));
        bytes.extend(publish_packet(5, topic, 1, 3, flat_json(3).as_bytes()));
        bytes.extend(publish_packet(5, topic, 0, 0, flat_json(4).as_bytes()));
        raw.send(&bytes).await;
        assert_eq!(raw.read_packet().await, Some(vec![0x40, 2, 0, 1]));
        let refusal = raw.read_packet().await.unwrap();
        assert_eq!(&refusal[..5], &[0x40, refusal[1], 0, 2, 0x99]);
        assert_eq!(raw.read_packet().await, Some(vec![0x40, 2, 0, 3]));
        let got = take_readings(&mut readings, 12).await;
        let ts: Vec<i64> = got.iter().map(|r| r.ts_ms - TS).collect();
        assert_eq!(ts, [1, 1, 1, 1, 3, 3, 3, 3, 4, 4, 4, 4]);

        // A second connection of the same device takes over (MQTT 5: DISCONNECT 0x8E).
        let _newer = RawClient::connect(gateway.addr, 5, "meter-1", "pw-1").await;
        assert_disconnect(raw.read_packet().await, 0x8E);
        assert_eq!(gateway.stats().sessions_taken_over, 1);

        // QoS 0 and DISCONNECT in one write: the readings are still handed over.
        let mut quick = RawClient::connect(gateway.addr, 4, "meter-1", "pw-1").await;
        let mut bytes = publish_packet(4, topic, 0, 0, flat_json(5).as_bytes());
        bytes.extend_from_slice(&[0xE0, 0]);
        quick.send(&bytes).await;
        assert_eq!(quick.read_packet().await, None);
        let got = take_readings(&mut readings, 4).await;
        assert!(got.iter().all(|r| r.ts_ms == TS + 5), "{got:?}");
        gateway.shut_down().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn binary_and_explicit_payloads_arrive() {
        use fieldgate_edge::ingress::mqtt::BinaryPayloadEncoder;
        use fieldgate_shared::MetricName;
        let mut gateway = Gateway::start(&[("meter-1", "pw-1")], "").await;
        let mut readings = gateway.auto_commit();
        let (client, eventloop) = device(gateway.addr, "meter-1", "pw-1");
        let mut events = drive(eventloop, false);
        let mut encoder = BinaryPayloadEncoder::new(TS);
        let power = MetricName::new("power").unwrap();
        encoder.push(&power, TS, &Value::F64(1013.25), Quality::Good);
        encoder.push(&power, TS + 1000, &Value::I64(-3), Quality::Bad);
        let topic = "devices/meter-1/readings";
        client
            .publish(topic, QoS::AtLeastOnce, false, encoder.finish())
            .await
            .unwrap();
        client
        .publish(
            topic,
            QoS::AtLeastOnce,
            false,
            r#"{"ts": 5, "readings": [{"metric": "a", "value": 0.1}, {"metric": "b", "ts": 6, "value": "x", "quality": "uncertain"}]}"#,
        )
        .await
        .unwrap();
        wait_pubacks(&mut events, 2).await;
        let got = take_readings(&mut readings, 4).await;
        let summary: Vec<(String, i64, Value, Quality)> = got
            .into_iter()
            .map(|r| (r.metric.to_string(), r.ts_ms, r.value, r.quality))
            .collect();
        assert_eq!(
            summary,
            [
                ("power".to_owned(), TS, Value::F64(1013.25), Quality::Good),
                ("power".to_owned(), TS + 1000, Value::I64(-3), Quality::Bad),
                ("a".to_owned(), 5, Value::F64(0.1), Quality::Good),
                (
                    "b".to_owned(),
                    6,
                    Value::Str(ShortStr::new("x").unwrap()),
                    Quality::Uncertain
                ),
            ]
        );
        gateway.shut_down().await;
    }

    // ---- Independent peers ----------------------------------------------------------------------

    /// Whether an external peer is there (`found`). When it is not, says loudly what to install;
    /// fails instead when FIELDGATE_REQUIRE_ALL=1 (CI).
    fn peer_available(found: bool, what: &str, install: &str) -> bool {
        if !found {
            let message = format!(
            "\n\n!!!!! {what} is missing: this test did NOT run. Install it with: {install} !!!!!\n"
        );
            if std::env::var("FIELDGATE_REQUIRE_ALL").as_deref() == Ok("1") {
                panic!("{message}(FIELDGATE_REQUIRE_ALL=1)");
            }
            eprintln!("{message}");
        }
        found
    }

    /// Whether `program` can be started at all (its exit status does not matter).
    fn runs(program: &str, args: &[&str]) -> bool {
        std::process::Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    }

    fn mosquitto_available() -> bool {
        peer_available(
            runs("mosquitto_pub", &["--help"]),
            "mosquitto_pub (Debian package mosquitto-clients)",
            "apt-get install -y mosquitto-clients",
        )
    }

    async fn run_peer(
        command: &mut tokio::process::Command,
        stdin: Option<&str>,
    ) -> (bool, String) {
        command
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().unwrap();
        if let Some(text) = stdin {
            let mut pipe = child.stdin.take().unwrap();
            pipe.write_all(text.as_bytes()).await.unwrap();
            drop(pipe);
        }
        let output = tokio::time::timeout(TIMEOUT, child.wait_with_output())
            .await
            .expect("peer did not finish in time")
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }

    fn mosquitto_pub(
        addr: SocketAddr,
        id: &str,
        password: &str,
        version: &str,
    ) -> tokio::process::Command {
        mosquitto_pub_to(&addr.ip().to_string(), addr.port(), id, password, version)
    }

    fn mosquitto_pub_to(
        host: &str,
        port: u16,
        id: &str,
        password: &str,
        version: &str,
    ) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("mosquitto_pub");
        command
            .args(["-h", host, "-p", &port.to_string()])
            .args(["-i", id, "-u", id, "-P", password, "-V", version, "-q", "1"])
            .args(["-t", &format!("devices/{id}/readings")]);
        command
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mosquitto_pub_as_a_device() {
        if !mosquitto_available() {
            return;
        }
        let mut gateway = Gateway::start(&[("meter-1", "pw-1")], "").await;
        let mut readings = gateway.auto_commit();
        for (i, version) in ["mqttv311", "mqttv5"].into_iter().enumerate() {
            let (ok, output) = run_peer(
                mosquitto_pub(gateway.addr, "meter-1", "pw-1", version)
                    .args(["-m", &flat_json(i as i64)]),
                None,
            )
            .await;
            assert!(ok, "mosquitto_pub -V {version}: {output}");
        }
        // The forward workload's load generator: one message per line.
        let lines: String = (10..30).map(|i| flat_json(i) + "\n").collect();
        let (ok, output) = run_peer(
            mosquitto_pub(gateway.addr, "meter-1", "pw-1", "mqttv311").arg("-l"),
            Some(&lines),
        )
        .await;
        assert!(ok, "mosquitto_pub -l: {output}");
        let got = take_readings(&mut readings, 4 * 22).await;
        assert_eq!(got[0].value, Value::F64(21.53));
        assert_eq!(got[4].ts_ms, TS + 1);
        assert_eq!(got.last().unwrap().ts_ms, TS + 29);
        // A wrong password makes it fail.
        let (ok, output) = run_peer(
            mosquitto_pub(gateway.addr, "meter-1", "wrong", "mqttv311").args(["-m", "{}"]),
            None,
        )
        .await;
        assert!(!ok, "{output}");
        assert!(
            output.to_lowercase().contains("not authorised")
                || output.to_lowercase().contains("bad user"),
            "{output}"
        );
        // Another device's topic: the connection is closed.
        let mut foreign = tokio::process::Command::new("mosquitto_pub");
        foreign
            .args([
                "-h",
                &gateway.addr.ip().to_string(),
                "-p",
                &gateway.addr.port().to_string(),
            ])
            .args([
                "-i", "meter-1", "-u", "meter-1", "-P", "pw-1", "-V", "mqttv5", "-q", "1",
            ])
            .args(["-t", "devices/meter-2/readings", "-m", "{}"]);
        let (ok, output) = run_peer(&mut foreign, None).await;
        assert!(!ok, "{output}");
        gateway
            .wait_stats("mosquitto refusals", |s| {
                s.auth_failures == 1 && s.rejected_unauthorised_publish == 1
            })
            .await;
        gateway.shut_down().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mosquitto_pub_over_tls() {
        if !mosquitto_available()
            || !peer_available(
                runs("openssl", &["version"]),
                "openssl (Debian package openssl)",
                "apt-get install -y openssl",
            )
        {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let status = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
            ])
            .args(["-days", "1", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let extra = format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\ntls = {{ cert_path = {:?}, key_path = {:?} }}",
        cert.display().to_string(),
        key.display().to_string()
    );
        // The TLS listener takes the place of the plain one.
        let devices = vec![("meter-1".to_owned(), "pw-1".to_owned())];
        let text = config_text(&devices, "").replacen(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n",
            &format!("{extra}\n"),
            1,
        );
        let config: MqttIngressConfig = toml::from_str(&text).unwrap();
        let ingress = MqttIngress::bind(config).await.unwrap();
        let tls_addr = ingress.local_addrs()[0];
        let stats = ingress.stats();
        let (sink, mut batches) = mpsc::channel(8);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(ingress.run(sink, async move {
            let _ = stopped.await;
        }));
        let mut command =
            mosquitto_pub_to("localhost", tls_addr.port(), "meter-1", "pw-1", "mqttv311");
        command
            .arg("--cafile")
            .arg(&cert)
            .args(["-m", &flat_json(0)]);
        // The consumer lives as long as the test: the ingress stops when its consumer goes.
        let (first_tx, first_rx) = oneshot::channel();
        tokio::spawn(async move {
            let mut first_tx = Some(first_tx);
            while let Some(batch) = batches.recv().await {
                batch.commit.send(CommitOutcome::Durable).unwrap();
                if let Some(first_tx) = first_tx.take() {
                    let _ = first_tx.send(batch.readings);
                }
            }
        });
        let (ok, output) = run_peer(&mut command, None).await;
        assert!(ok, "mosquitto_pub over TLS: {output}");
        let got = tokio::time::timeout(TIMEOUT, first_rx)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), 4);
        // Plain MQTT on the TLS port is not accepted.
        let (ok, _) = run_peer(
            mosquitto_pub(tls_addr, "meter-1", "pw-1", "mqttv311").args(["-m", "{}"]),
            None,
        )
        .await;
        assert!(!ok);
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while stats.snapshot().tls_failures == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "TLS failure not counted: {:#?}",
                stats.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop.send(());
        tokio::time::timeout(TIMEOUT, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    const PAHO_DEVICE: &str = r#"
import sys
import paho.mqtt.client as mqtt
host, port, device, password, version, topic, payload = sys.argv[1:8]
protocol = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=protocol)
client.username_pw_set(device, password)
result = {}
def on_connect(client, userdata, flags, reason_code, properties):
    result["connect"] = str(reason_code)
def on_publish(client, userdata, mid, reason_code, properties):
    result["puback"] = str(reason_code)
client.on_connect = on_connect
client.on_publish = on_publish
client.connect(host, int(port), keepalive=30)
client.loop_start()
info = client.publish(topic, payload, qos=1)
info.wait_for_publish(timeout=60)
client.disconnect()
client.loop_stop()
print("connect=%s puback=%s published=%s" % (result.get("connect"), result.get("puback"), info.is_published()))
"#;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paho_mqtt_as_a_device() {
        let paho_found = std::process::Command::new("python3")
            .args(["-c", "import paho.mqtt.client"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !peer_available(
            paho_found,
            "paho-mqtt (PyPI, for python3)",
            "pip install paho-mqtt",
        ) {
            return;
        }
        let mut gateway = Gateway::start(&[("meter-1", "pw-1")], "").await;
        let mut readings = gateway.auto_commit();
        let paho = |version: &str, topic: &str, payload: String| {
            let mut command = tokio::process::Command::new("python3");
            command.args(["-c", PAHO_DEVICE]).args([
                gateway.addr.ip().to_string(),
                gateway.addr.port().to_string(),
                "meter-1".into(),
                "pw-1".into(),
                version.into(),
                topic.into(),
                payload,
            ]);
            command
        };
        let topic = "devices/meter-1/readings";
        for (i, version) in ["3", "5"].into_iter().enumerate() {
            let (ok, output) = run_peer(&mut paho(version, topic, flat_json(i as i64)), None).await;
            assert!(
                ok && output.contains("published=True"),
                "paho MQTT {version}: {output}"
            );
        }
        let got = take_readings(&mut readings, 8).await;
        assert_eq!(got[0].value, Value::F64(21.53));
        assert_eq!(got[4].ts_ms, TS + 1);
        // MQTT 5: a malformed payload is refused with its reason code.
        let (ok, output) = run_peer(&mut paho("5", topic, "{nope".into()), None).await;
        assert!(
            ok && output.contains("puback=Payload format invalid"),
            "{output}"
        );
        gateway
            .wait_stats("paho refusal", |s| s.rejected_malformed == 1)
            .await;
        gateway.shut_down().await;
    }
}
