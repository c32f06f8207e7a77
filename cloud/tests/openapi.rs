//! The served OpenAPI document against the running service: schemathesis (PyPI) generates
//! requests from `/v1/openapi.json` (valid and invalid, with a real owner key, with stateful
//! sequences) and checks that nothing answers 5xx and every response matches the document.
//! Needs `schemathesis` on PATH (`pip install 'schemathesis>=4,<5'`); skips loudly without it,
//! fails under `FIELDGATE_REQUIRE_ALL=1`.

mod support;

use std::process::Command;

use reqwest::{Method, StatusCode};
use support::{Backend, TestCloud};

fn schemathesis() -> Option<String> {
    let found = Command::new("schemathesis")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("schemathesis".into());
    }
    let message = "schemathesis is not installed: pip install 'schemathesis>=4,<5'";
    if std::env::var("FIELDGATE_REQUIRE_ALL").as_deref() == Ok("1") {
        panic!("FIELDGATE_REQUIRE_ALL=1: {message}");
    }
    eprintln!("SKIPPED (schemathesis): {message}");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_as_documented_and_never_5xx() {
    let Some(program) = schemathesis() else {
        return;
    };
    let cloud = TestCloud::start(Backend::Sqlite).await.unwrap();
    let tenant = cloud.tenant("fuzzed").await;
    // Some data to find: a site, a gateway, a series.
    let (site, token) = cloud.site_and_token(&tenant.key, "plant").await;
    let gateway = cloud.enroll(&token, &site, "gw").await;
    assert_eq!(
        cloud
            .ingest(&gateway, &support::batch(&gateway.id, "raw", 0, 99))
            .await
            .0,
        StatusCode::OK
    );
    let (status, _) = cloud
        .call(Method::GET, "/v1/openapi.json", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);

    // A key of its own: the fuzzer may delete the bootstrap owner, whose keys go with them.
    let (status, made) = cloud
        .call(
            Method::POST,
            "/v1/api-keys",
            Some(&tenant.key),
            Some(serde_json::json!({"name": "fuzzer", "role": "owner"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let key = made["secret"].as_str().unwrap().to_string();

    let url = format!("{}/v1/openapi.json", cloud.http_base);
    let out = tokio::process::Command::new(program)
        .args([
            "run",
            &url,
            "--checks",
            "all",
            "--max-examples",
            "40",
            "--seed",
            "20261125",
            "--no-color",
        ])
        .args(["--header", &format!("Authorization: Bearer {key}")])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The key it used must still work: no operation let it lock itself out.
    let (status, me) = cloud.call(Method::GET, "/v1/me", Some(&key), None).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    cloud.stop().await;
}
