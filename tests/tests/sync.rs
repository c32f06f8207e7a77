//! Devices → edge → cloud with real processes on loopback: exact counts through a long cloud
//! outage, an edge killed with -9 mid-sync, a dying endpoint (failover), a fault-injecting
//! proxy, and two targets where one is slow.

use std::time::Duration;

use fieldgate_e2e::{
    fault_proxy, publish, tenant, wait_until, Api, CloudNode, EdgeNode, Faults, TargetSpec,
};

const DEVICES: usize = 4;

async fn cloud(dir: &std::path::Path) -> CloudNode {
    CloudNode::start(dir, fieldgate_e2e::free_port(), fieldgate_e2e::free_port())
        .await
        .unwrap()
}

fn target(
    name: &str,
    endpoints: Vec<String>,
    node: &CloudNode,
    t: &fieldgate_e2e::Tenant,
) -> TargetSpec {
    TargetSpec {
        name: name.into(),
        endpoints,
        ca: node.ca_path(),
        token: t.token.clone(),
        site_id: t.site_id.clone(),
        include: Vec::new(),
        aggregate_window_s: None,
    }
}

/// Waits until the cloud holds `expected` readings and the edge's backlog is empty, then
/// checks every reading is there exactly once.
async fn assert_exactly_once(api: &Api, edge: &EdgeNode, target: &str, expected: u64) {
    let drained = wait_until(
        Duration::from_secs(240),
        "the backlog to drain into the cloud",
        || async {
            edge.backlog(target).await.is_ok_and(|b| b == 0)
                && api.count().await.is_ok_and(|n| n >= expected)
        },
    )
    .await;
    if let Err(err) = drained {
        panic!(
            "{err}: edge status {}, cloud count {:?}",
            edge.status().await.unwrap_or_default(),
            api.count().await
        );
    }
    let (stored, distinct) = api.stored().await.unwrap();
    assert_eq!(stored, expected, "stored readings");
    assert_eq!(distinct, expected, "every stored reading is distinct");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_to_cloud_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = cloud(&dir.path().join("cloud")).await;
    let t = tenant(&node, "acme").await.unwrap();
    let edge = EdgeNode::start(
        &dir.path().join("edge"),
        DEVICES,
        &[target("cloud", vec![node.https_base()], &node, &t)],
    )
    .await
    .unwrap();
    let acked = publish(&edge, 500, 0).await;
    assert!(acked.iter().all(|&n| n == 500), "{acked:?}");
    let api = Api {
        base: node.http_base(),
        key: t.api_key.clone(),
    };
    assert_exactly_once(&api, &edge, "cloud", DEVICES as u64 * 500 * 4).await;
    // The registry saw the gateway, its version and backlog.
    let gateways = api.get("/v1/gateways").await.unwrap();
    assert_eq!(gateways["gateways"][0]["health"], "online", "{gateways}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_cloud_outage_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = cloud(&dir.path().join("cloud")).await;
    let t = tenant(&node, "acme").await.unwrap();
    let edge = EdgeNode::start(
        &dir.path().join("edge"),
        DEVICES,
        &[target("cloud", vec![node.https_base()], &node, &t)],
    )
    .await
    .unwrap();
    // Enrolled and syncing, then the cloud dies for the rest of the publishing.
    publish(&edge, 100, 0).await;
    node.kill().await;
    let acked = publish(&edge, 1000, 100).await;
    assert!(acked.iter().all(|&n| n == 1000), "{acked:?}");
    assert!(
        edge.backlog("cloud").await.unwrap() > 0,
        "the edge holds the outage's readings"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    node.restart().await.unwrap();
    let api = Api {
        base: node.http_base(),
        key: t.api_key.clone(),
    };
    assert_exactly_once(&api, &edge, "cloud", DEVICES as u64 * 1100 * 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_killed_mid_sync_resumes_without_loss_or_doubles() {
    let dir = tempfile::tempdir().unwrap();
    let node = cloud(&dir.path().join("cloud")).await;
    let t = tenant(&node, "acme").await.unwrap();
    // Slow the uplink down so the kill lands while batches are in flight.
    let (proxy, _) = fault_proxy(
        format!("127.0.0.1:{}", node.https_port).parse().unwrap(),
        Faults {
            delay: Duration::from_millis(20),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let mut edge = EdgeNode::start(
        &dir.path().join("edge"),
        DEVICES,
        &[target(
            "cloud",
            vec![format!("https://127.0.0.1:{}", proxy.port())],
            &node,
            &t,
        )],
    )
    .await
    .unwrap();
    let acked = publish(&edge, 1500, 0).await;
    assert!(acked.iter().all(|&n| n == 1500), "{acked:?}");
    let journaled = edge.journaled().await.unwrap();
    assert!(
        edge.backlog("cloud").await.unwrap() > 0,
        "still syncing when killed"
    );
    edge.kill9().await;
    edge.restart().await.unwrap();
    assert_eq!(
        edge.journaled().await.unwrap(),
        journaled,
        "the journal survived kill -9"
    );
    let api = Api {
        base: node.http_base(),
        key: t.api_key.clone(),
    };
    assert_exactly_once(&api, &edge, "cloud", journaled).await;
    assert_eq!(journaled, DEVICES as u64 * 1500 * 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dying_endpoint_fails_over_to_the_next() {
    let dir = tempfile::tempdir().unwrap();
    // Two nodes of one cloud: the same SQLite database and TLS identity.
    let data = dir.path().join("cloud");
    let mut primary = cloud(&data).await;
    let secondary = cloud(&data).await;
    let t = tenant(&primary, "acme").await.unwrap();
    let edge = EdgeNode::start(
        &dir.path().join("edge"),
        DEVICES,
        &[target(
            "cloud",
            vec![primary.https_base(), secondary.https_base()],
            &primary,
            &t,
        )],
    )
    .await
    .unwrap();
    publish(&edge, 200, 0).await;
    primary.kill().await;
    let acked = publish(&edge, 800, 200).await;
    assert!(acked.iter().all(|&n| n == 800), "{acked:?}");
    let api = Api {
        base: secondary.http_base(),
        key: t.api_key.clone(),
    };
    assert_exactly_once(&api, &edge, "cloud", DEVICES as u64 * 1000 * 4).await;
    let status = edge.status().await.unwrap();
    assert!(
        status["uplinks"][0]["failovers"].as_u64().unwrap() >= 1,
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulty_network_delays_but_never_loses_or_doubles() {
    let dir = tempfile::tempdir().unwrap();
    let node = cloud(&dir.path().join("cloud")).await;
    let t = tenant(&node, "acme").await.unwrap();
    let (proxy, connections) = fault_proxy(
        format!("127.0.0.1:{}", node.https_port).parse().unwrap(),
        Faults {
            delay: Duration::from_millis(2),
            reset_every: 2,
            half_open_every: 5,
            drop_every: 3,
        },
    )
    .await
    .unwrap();
    let edge = EdgeNode::start(
        &dir.path().join("edge"),
        DEVICES,
        &[target(
            "cloud",
            vec![format!("https://127.0.0.1:{}", proxy.port())],
            &node,
            &t,
        )],
    )
    .await
    .unwrap();
    let acked = publish(&edge, 1000, 0).await;
    assert!(acked.iter().all(|&n| n == 1000), "{acked:?}");
    let api = Api {
        base: node.http_base(),
        key: t.api_key.clone(),
    };
    assert_exactly_once(&api, &edge, "cloud", DEVICES as u64 * 1000 * 4).await;
    // Every second connection is reset, every third refused, every fifth left half-open (fewer
    // than a third work): the uplink met failures, kept its sound connections, and still nothing
    // was lost or doubled.
    let status = edge.status().await.unwrap();
    assert!(
        connections.load(std::sync::atomic::Ordering::Relaxed) >= 2,
        "{status}"
    );
    assert!(
        status["uplinks"][0]["failures"].as_u64().unwrap_or(0) > 0,
        "the faults reached the uplink: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_target_never_holds_back_another() {
    let dir = tempfile::tempdir().unwrap();
    let private = cloud(&dir.path().join("private")).await;
    let public = cloud(&dir.path().join("public")).await;
    let tp = tenant(&private, "acme").await.unwrap();
    let tq = tenant(&public, "acme").await.unwrap();
    // The public cloud is far away: every chunk of every connection waits 200 ms.
    let (slow, _) = fault_proxy(
        format!("127.0.0.1:{}", public.https_port).parse().unwrap(),
        Faults {
            delay: Duration::from_millis(200),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let mut public_target = target(
        "public",
        vec![format!("https://127.0.0.1:{}", slow.port())],
        &public,
        &tq,
    );
    // Only temperatures go public.
    public_target.include = vec![("*".into(), "temperature".into())];
    let edge = EdgeNode::start(
        &dir.path().join("edge"),
        DEVICES,
        &[
            target("private", vec![private.https_base()], &private, &tp),
            public_target,
        ],
    )
    .await
    .unwrap();
    let acked = publish(&edge, 1000, 0).await;
    assert!(acked.iter().all(|&n| n == 1000), "{acked:?}");
    let total = DEVICES as u64 * 1000 * 4;
    let private_api = Api {
        base: private.http_base(),
        key: tp.api_key.clone(),
    };
    assert_exactly_once(&private_api, &edge, "private", total).await;
    let public_api = Api {
        base: public.http_base(),
        key: tq.api_key.clone(),
    };
    assert_exactly_once(&public_api, &edge, "public", total / 4).await;
    let series = public_api.get("/v1/series").await.unwrap();
    assert!(
        series["series"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["metric"] == "temperature"),
        "{series}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_due_for_renewal_is_rotated_without_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let node = cloud(&dir.path().join("cloud")).await;
    let t = tenant(&node, "acme").await.unwrap();
    let mut edge = EdgeNode::start(
        &dir.path().join("edge"),
        DEVICES,
        &[target("cloud", vec![node.https_base()], &node, &t)],
    )
    .await
    .unwrap();
    publish(&edge, 100, 0).await;
    let api = Api {
        base: node.http_base(),
        key: t.api_key.clone(),
    };
    assert_exactly_once(&api, &edge, "cloud", DEVICES as u64 * 100 * 4).await;
    // Two thirds of the certificate's life have passed (as far as the gateway knows).
    edge.stop().await;
    let meta = dir.path().join("edge/identity/cloud/identity.json");
    let mut identity: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let old_cert = std::fs::read(dir.path().join("edge/identity/cloud/cert.pem")).unwrap();
    identity["issued_at_ms"] = serde_json::json!(0);
    std::fs::write(&meta, serde_json::to_vec(&identity).unwrap()).unwrap();
    edge.restart().await.unwrap();
    publish(&edge, 100, 100).await;
    assert_exactly_once(&api, &edge, "cloud", DEVICES as u64 * 200 * 4).await;
    let new_cert = std::fs::read(dir.path().join("edge/identity/cloud/cert.pem")).unwrap();
    assert_ne!(old_cert, new_cert, "the certificate was renewed");
    let audit = api.get("/v1/audit").await.unwrap();
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"gateway.certificate.renew"),
        "{actions:?}"
    );
    assert!(
        actions.contains(&"gateway.certificate.rotated"),
        "{actions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_to_private_and_exact_aggregates_to_public() {
    let dir = tempfile::tempdir().unwrap();
    let private = cloud(&dir.path().join("private")).await;
    let public = cloud(&dir.path().join("public")).await;
    let tp = tenant(&private, "acme").await.unwrap();
    let tq = tenant(&public, "acme").await.unwrap();
    let mut public_target = target("public", vec![public.https_base()], &public, &tq);
    public_target.aggregate_window_s = Some(60);
    let edge = EdgeNode::start(
        &dir.path().join("edge"),
        DEVICES,
        &[
            target("private", vec![private.https_base()], &private, &tp),
            public_target,
        ],
    )
    .await
    .unwrap();
    let acked = publish(&edge, 1000, 0).await;
    assert!(acked.iter().all(|&n| n == 1000), "{acked:?}");
    let total = DEVICES as u64 * 1000 * 4;
    let private_api = Api {
        base: private.http_base(),
        key: tp.api_key.clone(),
    };
    assert_exactly_once(&private_api, &edge, "private", total).await;
    wait_until(
        Duration::from_secs(60),
        "the aggregates to sync",
        || async { edge.backlog("public").await.is_ok_and(|b| b == 0) },
    )
    .await
    .unwrap();
    // Partial aggregates merge exactly: the counts of every window add up to every reading.
    let public_api = Api {
        base: public.http_base(),
        key: tq.api_key.clone(),
    };
    let series = public_api.get("/v1/series?limit=500").await.unwrap();
    let mut counted = 0u64;
    let mut metrics = std::collections::BTreeSet::new();
    for s in series["series"].as_array().unwrap() {
        let metric = s["metric"].as_str().unwrap().to_string();
        if metric.ends_with(".count") {
            let id = s["id"].as_str().unwrap();
            let readings = public_api
                .get(&format!("/v1/series/{id}/readings?limit=10000"))
                .await
                .unwrap();
            counted += readings["readings"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["value"].as_u64().unwrap())
                .sum::<u64>();
        }
        metrics.insert(metric);
    }
    assert_eq!(counted, total, "aggregated counts");
    assert!(
        metrics.contains("temperature.mean") && metrics.contains("humidity.max"),
        "{metrics:?}"
    );
}
