//! Ingest exactness on both backends: resends, overlaps, out-of-order batches, gaps,
//! concurrent senders, declared losses, size and rate limits.

mod support;

use reqwest::StatusCode;
use support::{batch, expected, Backend, TestCloud};

backend_tests!(
    the_same_batch_three_times_is_stored_once,
    overlapping_batches_are_trimmed,
    gaps_are_refused_with_where_to_resume,
    out_of_order_batches_store_each_reading_once,
    concurrent_senders_store_each_reading_once,
    a_declared_loss_is_accepted_and_recorded,
    a_large_backlog_compacts_into_chunks_that_read_back,
);

async fn setup(backend: Backend) -> Option<(TestCloud, support::Tenant, support::TestGateway)> {
    let cloud = TestCloud::start(backend).await?;
    let tenant = cloud.tenant("acme").await;
    let (site, token) = cloud.site_and_token(&tenant.key, "plant-1").await;
    let gateway = cloud.enroll(&token, &site, "gw-1").await;
    Some((cloud, tenant, gateway))
}

async fn the_same_batch_three_times_is_stored_once(backend: Backend) {
    let Some((cloud, tenant, gw)) = setup(backend).await else {
        return;
    };
    let b = batch(&gw.id, "raw", 0, 999);
    let (status, ack) = cloud.ingest(&gw, &b).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(
        (
            ack["stored"].as_u64(),
            ack["duplicates"].as_u64(),
            ack["high_water_mark"].as_u64()
        ),
        (Some(1000), Some(0), Some(999))
    );
    for _ in 0..2 {
        let (status, ack) = cloud.ingest(&gw, &b).await;
        assert_eq!(status, StatusCode::OK, "{ack}");
        assert_eq!(
            (ack["stored"].as_u64(), ack["duplicates"].as_u64()),
            (Some(0), Some(1000))
        );
    }
    assert_eq!(
        cloud.stored_readings(&tenant.key, &gw.id).await,
        expected(0..1000)
    );
    cloud.stop().await;
}

async fn overlapping_batches_are_trimmed(backend: Backend) {
    let Some((cloud, tenant, gw)) = setup(backend).await else {
        return;
    };
    assert_eq!(
        cloud.ingest(&gw, &batch(&gw.id, "raw", 0, 99)).await.0,
        StatusCode::OK
    );
    let (status, ack) = cloud.ingest(&gw, &batch(&gw.id, "raw", 50, 149)).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(
        (ack["stored"].as_u64(), ack["duplicates"].as_u64()),
        (Some(50), Some(50))
    );
    let (status, ack) = cloud.ingest(&gw, &batch(&gw.id, "raw", 149, 149)).await;
    assert_eq!((status, ack["stored"].as_u64()), (StatusCode::OK, Some(0)));
    assert_eq!(
        cloud.stored_readings(&tenant.key, &gw.id).await,
        expected(0..150)
    );
    cloud.stop().await;
}

async fn gaps_are_refused_with_where_to_resume(backend: Backend) {
    let Some((cloud, tenant, gw)) = setup(backend).await else {
        return;
    };
    assert_eq!(
        cloud.ingest(&gw, &batch(&gw.id, "raw", 10, 19)).await.0,
        StatusCode::OK,
        "a stream may start anywhere"
    );
    let (status, err) = cloud.ingest(&gw, &batch(&gw.id, "raw", 25, 30)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    assert_eq!(err["code"], "stream_gap");
    assert_eq!(err["resume_from"].as_u64(), Some(20));
    assert_eq!(
        cloud.ingest(&gw, &batch(&gw.id, "raw", 20, 30)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        cloud.stored_readings(&tenant.key, &gw.id).await,
        expected(10..31)
    );
    cloud.stop().await;
}

async fn out_of_order_batches_store_each_reading_once(backend: Backend) {
    let Some((cloud, tenant, gw)) = setup(backend).await else {
        return;
    };
    let batches: Vec<(u64, u64)> = (0..10).map(|i| (i * 100, i * 100 + 99)).collect();
    // A gateway retrying after timeouts: later batches arrive first, earlier ones again.
    let order = [0usize, 2, 1, 3, 5, 4, 4, 6, 9, 7, 8, 9, 0, 5];
    for &i in &order {
        let (first, last) = batches[i];
        let (status, body) = cloud.ingest(&gw, &batch(&gw.id, "raw", first, last)).await;
        assert!(
            status == StatusCode::OK
                || (status == StatusCode::CONFLICT && body["code"] == "stream_gap"),
            "{status} {body}"
        );
    }
    // Then it catches up from where the cloud said to resume.
    for &(first, last) in &batches {
        let (status, body) = cloud.ingest(&gw, &batch(&gw.id, "raw", first, last)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(
        cloud.stored_readings(&tenant.key, &gw.id).await,
        expected(0..1000)
    );
    cloud.stop().await;
}

async fn concurrent_senders_store_each_reading_once(backend: Backend) {
    let Some((cloud, tenant, gw)) = setup(backend).await else {
        return;
    };
    let cloud = std::sync::Arc::new(cloud);
    let gw = std::sync::Arc::new(gw);
    // Four senders race over the same stream, each sending overlapping windows until the cloud
    // has everything: the high-water mark serialises them.
    let mut tasks = Vec::new();
    for sender in 0..4u64 {
        let cloud = cloud.clone();
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            let mut next = 0u64;
            while next < 2000 {
                let last = (next + 150 + sender * 10).min(1999);
                let (status, body) = cloud.ingest(&gw, &batch(&gw.id, "raw", next, last)).await;
                match status {
                    StatusCode::OK => next = body["high_water_mark"].as_u64().unwrap() + 1,
                    StatusCode::CONFLICT => next = body["resume_from"].as_u64().unwrap(),
                    other => panic!("{other} {body}"),
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(
        cloud.stored_readings(&tenant.key, &gw.id).await,
        expected(0..2000)
    );
}

async fn a_declared_loss_is_accepted_and_recorded(backend: Backend) {
    let Some((cloud, tenant, gw)) = setup(backend).await else {
        return;
    };
    assert_eq!(
        cloud.ingest(&gw, &batch(&gw.id, "raw", 0, 9)).await.0,
        StatusCode::OK
    );
    // A declaration that does not start at the high-water mark (stale, racing) is a gap.
    let (status, err) = cloud
        .ingest_with(
            &gw,
            &batch(&gw.id, "raw", 100, 109),
            &[("fieldgate-declared-loss", "5")],
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    assert_eq!(err["resume_from"].as_u64(), Some(10));
    let (status, ack) = cloud
        .ingest_with(
            &gw,
            &batch(&gw.id, "raw", 100, 109),
            &[("fieldgate-declared-loss", "10")],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    let gaps: Vec<(i64, i64)> = sqlx::query_as("SELECT from_seq, to_seq FROM stream_gaps")
        .fetch_all(&cloud.db().pool)
        .await
        .unwrap();
    assert_eq!(gaps, vec![(10, 99)]);
    assert_eq!(
        cloud.stored_readings(&tenant.key, &gw.id).await,
        expected((0..10).chain(100..110))
    );
    cloud.stop().await;
}

async fn a_large_backlog_compacts_into_chunks_that_read_back(backend: Backend) {
    let Some((cloud, tenant, gw)) = setup(backend).await else {
        return;
    };
    // 450,000 readings: each of the 4 series gets more than a chunk holds (when one compaction
    // run sees them together it splits them), and every reading reads back once.
    for i in 0..3u64 {
        let (status, ack) = cloud
            .ingest(
                &gw,
                &batch(&gw.id, "raw", i * 150_000, i * 150_000 + 149_999),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{ack}");
    }
    assert_eq!(
        cloud.stored_readings(&tenant.key, &gw.id).await,
        expected(0..450_000)
    );
    let (chunks,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM chunks")
        .fetch_one(&cloud.db().pool)
        .await
        .unwrap();
    assert!(
        chunks > 4,
        "{chunks} chunks for 4 series of 112,500 readings"
    );
    cloud.stop().await;
}
