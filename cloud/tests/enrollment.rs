//! Gateway identity on both backends: enrollment tokens (expiry, one use, site binding, bad
//! CSRs, duplicate names, the per-address failure limit), mutual TLS (no certificate, certificates
//! the cloud did not issue, another tenant's gateway), decommissioning, certificate rotation and
//! expiry, ingest size and rate limits, login lockout, and malformed ingest bodies.

mod support;

use std::time::Duration;

use fieldgate_cloud::pki;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value as Json};
use support::{batch, expected, Backend, TestCloud, TestGateway};

backend_tests!(
    expired_used_and_unknown_tokens_are_refused,
    a_token_for_another_site_is_refused_and_stays_good_for_its_own,
    a_garbage_csr_and_a_duplicate_name_do_not_spend_the_token,
    repeated_enrollment_failures_lock_the_address_out,
    a_gateway_cannot_ingest_for_another_tenants_gateway,
    ingest_needs_a_certificate_the_cloud_issued,
    a_decommissioned_gateway_is_refused_on_its_next_request,
    a_renewed_certificate_replaces_the_old_one_on_first_use,
    an_expired_certificate_is_refused,
    batches_above_the_size_limits_get_413,
    a_throttled_backlog_is_delayed_never_dropped,
    repeated_login_failures_lock_the_account_out,
    malformed_batches_get_400_and_leave_the_stream_unchanged,
);

// ---------------------------------------------------------------------------------------------
// Helpers

/// A cloud (limits adjusted), tenant `acme`, and site `plant-1` with gateway `gw-1` enrolled.
async fn setup(
    backend: Backend,
    adjust: impl FnOnce(&mut fieldgate_cloud::CloudConfig),
) -> Option<(TestCloud, support::Tenant, String, TestGateway)> {
    let cloud = TestCloud::start_with(backend, adjust).await?;
    let tenant = cloud.tenant("acme").await;
    let (site, token) = cloud.site_and_token(&tenant.key, "plant-1").await;
    let gateway = cloud.enroll(&token, &site, "gw-1").await;
    Some((cloud, tenant, site, gateway))
}

/// Any request; returns the status, the headers and the JSON body (Null if none).
async fn request(
    client: &reqwest::Client,
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<Json>,
) -> (StatusCode, HeaderMap, Json) {
    let mut request = client.request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = if text.is_empty() {
        Json::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Json::String(text))
    };
    (status, headers, body)
}

/// POST raw bytes to /v1/ingest with `client` (whatever certificate it presents, if any).
async fn post_batch(
    cloud: &TestCloud,
    client: &reqwest::Client,
    bytes: &[u8],
) -> (StatusCode, HeaderMap, Json) {
    let response = client
        .post(format!("{}/v1/ingest", cloud.base))
        .header("content-type", "application/octet-stream")
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Json::String(text)),
    )
}

/// POST /v1/gateway/certificate with `client`'s certificate.
async fn renew(cloud: &TestCloud, client: &reqwest::Client, csr_pem: &str) -> (StatusCode, Json) {
    let url = format!("{}/v1/gateway/certificate", cloud.base);
    support::call_with(
        client,
        Method::POST,
        &url,
        None,
        Some(json!({ "csr_pem": csr_pem })),
    )
    .await
}

/// POST /v1/enroll with a fresh key pair.
async fn enroll_request(
    cloud: &TestCloud,
    token: &str,
    site_id: &str,
    name: &str,
    csr_pem: &str,
) -> (StatusCode, Json) {
    let body = json!({"token": token, "site_id": site_id, "name": name, "csr_pem": csr_pem});
    cloud
        .call(Method::POST, "/v1/enroll", None, Some(body))
        .await
}

/// A new enrollment token for `site_id`: (token id, secret).
async fn token_with_id(cloud: &TestCloud, key: &str, site_id: &str) -> (String, String) {
    let body = json!({"site_id": site_id, "expires_in_hours": 1});
    let (status, token) = cloud
        .call(Method::POST, "/v1/enrollment-tokens", Some(key), Some(body))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{token}");
    (
        token["token"]["id"].as_str().unwrap().to_string(),
        token["secret"].as_str().unwrap().to_string(),
    )
}

/// The enrollment token `id` as GET /v1/enrollment-tokens lists it.
async fn listed_token(cloud: &TestCloud, key: &str, id: &str) -> Json {
    let (status, tokens) = cloud
        .call(Method::GET, "/v1/enrollment-tokens", Some(key), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .cloned()
        .unwrap()
}

/// `pem` with one base64 character of its body changed: well-formed PEM, damaged content.
fn damage_pem(pem: &str) -> String {
    let mut lines: Vec<String> = pem.lines().map(str::to_string).collect();
    let line = &mut lines[2];
    let c = line.as_bytes()[10];
    let other = if c == b'A' { "B" } else { "A" };
    line.replace_range(10..11, other);
    let damaged = lines.join("\n") + "\n";
    assert_ne!(damaged.trim(), pem.trim());
    damaged
}

/// A raw batch of `first..=last` with pseudo-random values, which no codec can make small.
fn incompressible_batch(gateway: &str, first: u64, last: u64) -> Vec<u8> {
    use fieldgate_shared::codec::{encode, BatchMeta};
    use fieldgate_shared::model::{
        DeviceId, GatewayId, MetricName, Quality, Reading, StreamId, Value,
    };
    let mut noise = xorshift(first + 1);
    let readings: Vec<Reading> = (first..=last)
        .map(|seq| Reading {
            device: DeviceId::new("dev-0").unwrap(),
            metric: MetricName::new("noise").unwrap(),
            ts_ms: 1_700_000_000_000 + seq as i64 * 10,
            value: Value::I64(noise() as i64),
            quality: Quality::Good,
        })
        .collect();
    let meta = BatchMeta {
        gateway: GatewayId::new(gateway).unwrap(),
        stream: StreamId::new("raw").unwrap(),
        first_seq: first,
        last_seq: last,
    };
    encode(&meta, &readings).unwrap()
}

/// A deterministic pseudo-random sequence (xorshift64).
fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// The error message of an error body, lowercased.
fn message(body: &Json) -> String {
    body["message"].as_str().unwrap_or_default().to_lowercase()
}

/// `Retry-After` as whole seconds (panics unless it is a non-negative integer).
fn retry_after(headers: &HeaderMap) -> u64 {
    let value = headers
        .get("retry-after")
        .expect("a Retry-After header")
        .to_str()
        .unwrap();
    value
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After {value:?} is not whole seconds"))
}

/// Assert a 429 with consistent `Retry-After` and `retry_after_s`; returns the wait in seconds.
fn assert_rate_limited(status: StatusCode, headers: &HeaderMap, body: &Json) -> u64 {
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["code"], "rate_limited", "{body}");
    let wait = retry_after(headers);
    assert!(wait >= 1, "Retry-After {wait}");
    assert_eq!(body["retry_after_s"].as_u64(), Some(wait), "{body}");
    wait
}

/// (actor, action, object) of every audit entry of the tenant, newest first.
async fn audit_entries(cloud: &TestCloud, key: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let mut path = "/v1/audit?limit=500".to_string();
        if let Some(b) = &before {
            path.push_str(&format!("&before={b}"));
        }
        let (status, page) = cloud.call(Method::GET, &path, Some(key), None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for e in page["entries"].as_array().unwrap() {
            let field = |name: &str| e[name].as_str().unwrap().to_string();
            out.push((field("actor"), field("action"), field("object")));
        }
        match page["next_before"].as_str() {
            Some(b) => before = Some(b.to_string()),
            None => return out,
        }
    }
}

async fn count(cloud: &TestCloud, sql: &str, bind: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sql)
        .bind(bind)
        .fetch_one(&cloud.db().pool)
        .await
        .unwrap();
    n
}

// ---------------------------------------------------------------------------------------------
// Enrollment tokens

async fn expired_used_and_unknown_tokens_are_refused(backend: Backend) {
    let Some(cloud) = TestCloud::start(backend).await else {
        return;
    };
    let tenant = cloud.tenant("acme").await;
    let (site, expired_token) = cloud.site_and_token(&tenant.key, "plant-1").await;
    // The only token so far: expire it.
    sqlx::query("UPDATE enrollment_tokens SET expires_at = 1")
        .execute(&cloud.db().pool)
        .await
        .unwrap();
    let (status, body, _) = cloud.try_enroll(&expired_token, &site, "gw-expired").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(message(&body).contains("expired"), "{body}");

    let (token_id, token) = token_with_id(&cloud, &tenant.key, &site).await;
    let first = cloud.enroll(&token, &site, "gw-1").await;
    let (status, body, _) = cloud.try_enroll(&token, &site, "gw-2").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(message(&body).contains("used"), "{body}");
    let listed = listed_token(&cloud, &tenant.key, &token_id).await;
    assert!(listed["used_at"].is_i64(), "{listed}");
    assert_eq!(
        listed["gateway_id"],
        first.id.as_str(),
        "the token records the gateway it enrolled"
    );

    let (status, body, _) = cloud
        .try_enroll("fge_0123456789abcdef", &site, "gw-3")
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(message(&body).contains("unknown"), "{body}");

    // Only the one enrollment happened.
    assert_eq!(
        count(
            &cloud,
            "SELECT COUNT(*) FROM gateways WHERE tenant_id = $1",
            &tenant.id
        )
        .await,
        1
    );
    cloud.stop().await;
}

async fn a_token_for_another_site_is_refused_and_stays_good_for_its_own(backend: Backend) {
    let Some(cloud) = TestCloud::start(backend).await else {
        return;
    };
    let tenant = cloud.tenant("acme").await;
    let (site_1, _) = cloud.site_and_token(&tenant.key, "plant-1").await;
    let (site_2, _) = cloud.site_and_token(&tenant.key, "plant-2").await;
    let (token_id, token) = token_with_id(&cloud, &tenant.key, &site_1).await;

    let (status, body, _) = cloud.try_enroll(&token, &site_2, "gw-1").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(message(&body).contains("another site"), "{body}");
    let listed = listed_token(&cloud, &tenant.key, &token_id).await;
    assert!(
        listed["used_at"].is_null(),
        "a refused enrollment does not spend the token: {listed}"
    );
    assert_eq!(
        count(
            &cloud,
            "SELECT COUNT(*) FROM gateways WHERE tenant_id = $1",
            &tenant.id
        )
        .await,
        0
    );

    let gateway = cloud.enroll(&token, &site_1, "gw-1").await;
    let (status, body) = cloud
        .call(
            Method::GET,
            &format!("/v1/gateways/{}", gateway.id),
            Some(&tenant.key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["site_id"], site_1.as_str());
    cloud.stop().await;
}

async fn a_garbage_csr_and_a_duplicate_name_do_not_spend_the_token(backend: Backend) {
    let Some((cloud, tenant, site, _gw)) = setup(backend, |_| {}).await else {
        return;
    };
    let (token_id, token) = token_with_id(&cloud, &tenant.key, &site).await;

    let (status, body) = enroll_request(
        &cloud,
        &token,
        &site,
        "gw-2",
        "-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], "bad_request", "{body}");
    let (_key, csr) = pki::new_key_and_csr("gw-2").unwrap();
    let damaged = damage_pem(&csr);
    let (status, body) = enroll_request(&cloud, &token, &site, "gw-2", &damaged).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(listed_token(&cloud, &tenant.key, &token_id).await["used_at"].is_null());

    // gw-1 exists (from setup).
    let (status, body, _) = cloud.try_enroll(&token, &site, "gw-1").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "conflict", "{body}");
    assert!(listed_token(&cloud, &tenant.key, &token_id).await["used_at"].is_null());
    assert_eq!(
        count(
            &cloud,
            "SELECT COUNT(*) FROM gateways WHERE tenant_id = $1",
            &tenant.id
        )
        .await,
        1
    );

    // The token is still good.
    let gw2 = cloud.enroll(&token, &site, "gw-2").await;
    let (status, ack) = cloud.ingest(&gw2, &batch(&gw2.id, "raw", 0, 9)).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    cloud.stop().await;
}

async fn repeated_enrollment_failures_lock_the_address_out(backend: Backend) {
    let Some(cloud) = TestCloud::start(backend).await else {
        return;
    };
    let tenant = cloud.tenant("acme").await;
    let (site, token) = cloud.site_and_token(&tenant.key, "plant-1").await;
    for i in 0..5 {
        let (status, body, _) = cloud
            .try_enroll(&format!("fge_guess{i}"), &site, "gw-1")
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }
    // Even a good token is refused from this address now, and not spent.
    let (_key, csr) = pki::new_key_and_csr("gw-1").unwrap();
    let url = format!("{}/v1/enroll", cloud.base);
    let body = json!({"token": token, "site_id": site, "name": "gw-1", "csr_pem": csr});
    let (status, headers, body) =
        request(&cloud.client(), Method::POST, &url, None, Some(body)).await;
    assert_rate_limited(status, &headers, &body);
    let (used,): (Option<i64>,) = sqlx::query_as("SELECT used_at FROM enrollment_tokens")
        .fetch_one(&cloud.db().pool)
        .await
        .unwrap();
    assert_eq!(used, None);
    cloud.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Mutual TLS

async fn a_gateway_cannot_ingest_for_another_tenants_gateway(backend: Backend) {
    let Some((cloud, a, _site, a_gw)) = setup(backend, |_| {}).await else {
        return;
    };
    let b = cloud.tenant("globex").await;
    let (b_site, b_token) = cloud.site_and_token(&b.key, "plant-1").await;
    let b_gw = cloud.enroll(&b_token, &b_site, "gw-1").await;

    let (status, body) = cloud.ingest(&a_gw, &batch(&b_gw.id, "raw", 0, 99)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["code"], "forbidden", "{body}");
    assert!(cloud.stored_readings(&b.key, &b_gw.id).await.is_empty());
    assert_eq!(
        count(
            &cloud,
            "SELECT COUNT(*) FROM streams WHERE gateway_id = $1",
            &b_gw.id
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &cloud,
            "SELECT COUNT(*) FROM series WHERE tenant_id = $1",
            &b.id
        )
        .await,
        0
    );
    // B's own gateway is unaffected: its stream starts where it likes.
    let (status, ack) = cloud.ingest(&b_gw, &batch(&b_gw.id, "raw", 0, 99)).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(ack["stored"].as_u64(), Some(100));

    // Tenant A's key sees nothing of B's gateway, and cannot act on it.
    let path = format!("/v1/gateways/{}", b_gw.id);
    assert_eq!(
        cloud.call(Method::GET, &path, Some(&a.key), None).await.0,
        StatusCode::NOT_FOUND
    );
    let path = format!("/v1/gateways/{}/decommission", b_gw.id);
    assert_eq!(
        cloud.call(Method::POST, &path, Some(&a.key), None).await.0,
        StatusCode::NOT_FOUND
    );
    assert!(cloud.stored_readings(&a.key, &b_gw.id).await.is_empty());
    assert_eq!(
        cloud.stored_readings(&b.key, &b_gw.id).await,
        expected(0..100)
    );
    cloud.stop().await;
}

async fn ingest_needs_a_certificate_the_cloud_issued(backend: Backend) {
    let Some((cloud, tenant, _site, gw)) = setup(backend, |_| {}).await else {
        return;
    };
    let good = batch(&gw.id, "raw", 0, 99);

    // No client certificate at all.
    let (status, _, body) = post_batch(&cloud, &cloud.client(), &good).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (_key, csr) = pki::new_key_and_csr("gw-1").unwrap();
    assert_eq!(
        renew(&cloud, &cloud.client(), &csr).await.0,
        StatusCode::UNAUTHORIZED
    );

    // A self-signed certificate.
    let self_signed = rcgen::generate_simple_self_signed(vec![gw.id.clone()]).unwrap();
    let client = cloud.client_with_identity(
        &self_signed.signing_key.serialize_pem(),
        &self_signed.cert.pem(),
    );
    let (status, _, body) = post_batch(&cloud, &client, &good).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(
        renew(&cloud, &client, &csr).await.0,
        StatusCode::UNAUTHORIZED
    );

    // A well-formed gateway certificate naming this very gateway, from a CA the cloud does not know.
    let (rogue_ca, rogue_ca_key) = pki::new_tenant_ca("acme").unwrap();
    let (rogue_key, rogue_csr) = pki::new_key_and_csr("gw-1").unwrap();
    let rogue = pki::sign_gateway_csr(
        &rogue_ca,
        &rogue_ca_key,
        &rogue_csr,
        &gw.id,
        Duration::from_secs(86_400),
    )
    .unwrap();
    let client = cloud.client_with_identity(&rogue_key, &rogue.pem);
    let (status, _, body) = post_batch(&cloud, &client, &good).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(message(&body).contains("not issued"), "{body}");
    assert_eq!(
        renew(&cloud, &client, &csr).await.0,
        StatusCode::UNAUTHORIZED
    );

    assert!(cloud.stored_readings(&tenant.key, &gw.id).await.is_empty());
    assert_eq!(
        count(
            &cloud,
            "SELECT COUNT(*) FROM gateway_certs WHERE gateway_id = $1",
            &gw.id
        )
        .await,
        1
    );
    // The real certificate works.
    let (status, ack) = cloud.ingest(&gw, &good).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    cloud.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Decommissioning, rotation, expiry

async fn a_decommissioned_gateway_is_refused_on_its_next_request(backend: Backend) {
    let Some((cloud, tenant, _site, gw)) = setup(backend, |_| {}).await else {
        return;
    };
    // The gateway's client holds a kept-alive connection from these.
    for i in 0..3 {
        let (status, ack) = cloud
            .ingest(&gw, &batch(&gw.id, "raw", i * 100, i * 100 + 99))
            .await;
        assert_eq!(status, StatusCode::OK, "{ack}");
    }
    let path = format!("/v1/gateways/{}/decommission", gw.id);
    let (status, body) = cloud
        .call(Method::POST, &path, Some(&tenant.key), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "decommissioned", "{body}");
    assert_eq!(body["health"], "decommissioned", "{body}");

    let (status, body) = cloud.ingest(&gw, &batch(&gw.id, "raw", 300, 399)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(message(&body).contains("decommissioned"), "{body}");
    let (_key, csr) = pki::new_key_and_csr("gw-1").unwrap();
    let (status, body) = renew(&cloud, &gw.client, &csr).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // A fresh connection is refused the same way.
    let fresh = cloud.client_with_identity(&gw.key_pem, &gw.cert_pem);
    let (status, _, body) = post_batch(&cloud, &fresh, &batch(&gw.id, "raw", 300, 399)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    assert_eq!(
        cloud.stored_readings(&tenant.key, &gw.id).await,
        expected(0..300)
    );
    let revoked = count(
        &cloud,
        "SELECT COUNT(*) FROM gateway_certs WHERE gateway_id = $1 AND revoked_at IS NOT NULL",
        &gw.id,
    );
    assert_eq!(revoked.await, 1);
    let audit = audit_entries(&cloud, &tenant.key).await;
    assert!(
        audit
            .iter()
            .any(|(_, action, object)| action == "gateway.decommission" && *object == gw.id),
        "{audit:?}"
    );
    // A replacement box may take the decommissioned gateway's name.
    let (site_id, _) = gateway_site(&cloud, &tenant.key, &gw.id).await;
    let token = cloud.enrollment_token(&tenant.key, &site_id).await;
    let replacement = cloud.enroll(&token, &site_id, "gw-1").await;
    assert_ne!(replacement.id, gw.id);
    cloud.stop().await;
}

async fn gateway_site(cloud: &TestCloud, key: &str, gateway_id: &str) -> (String, String) {
    let (status, body) = cloud
        .call(
            Method::GET,
            &format!("/v1/gateways/{gateway_id}"),
            Some(key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    (
        body["site_id"].as_str().unwrap().to_string(),
        body["name"].as_str().unwrap().to_string(),
    )
}

async fn a_renewed_certificate_replaces_the_old_one_on_first_use(backend: Backend) {
    let Some((cloud, tenant, _site, old)) = setup(backend, |_| {}).await else {
        return;
    };
    let (status, ack) = cloud.ingest(&old, &batch(&old.id, "raw", 0, 99)).await;
    assert_eq!(status, StatusCode::OK, "{ack}");

    let (new_key, csr) = pki::new_key_and_csr("gw-1").unwrap();
    let (status, issued) = renew(&cloud, &old.client, &csr).await;
    assert_eq!(status, StatusCode::CREATED, "{issued}");
    assert_eq!(issued["gateway_id"], old.id.as_str());
    assert_eq!(issued["tenant_id"], tenant.id.as_str());
    assert_ne!(issued["certificate_pem"].as_str().unwrap(), old.cert_pem);
    assert!(issued["ca_pem"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    assert!(issued["not_after"].as_i64().unwrap() > fieldgate_cloud::db::now_ms());
    let new = cloud.gateway_from(&issued, new_key);

    // Until the new certificate is used, the old one keeps working (the gateway may not have
    // received the answer).
    let (status, ack) = cloud.ingest(&old, &batch(&old.id, "raw", 100, 199)).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    let (status, ack) = cloud.ingest(&new, &batch(&new.id, "raw", 200, 299)).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    // The first use revoked the old one, on its kept-alive connection and on a fresh one.
    let (status, body) = cloud.ingest(&old, &batch(&old.id, "raw", 300, 399)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(message(&body).contains("revoked"), "{body}");
    let fresh_old = cloud.client_with_identity(&old.key_pem, &old.cert_pem);
    let (status, _, body) = post_batch(&cloud, &fresh_old, &batch(&old.id, "raw", 300, 399)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (_key, csr) = pki::new_key_and_csr("gw-1").unwrap();
    assert_eq!(
        renew(&cloud, &old.client, &csr).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, ack) = cloud.ingest(&new, &batch(&new.id, "raw", 300, 399)).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(
        cloud.stored_readings(&tenant.key, &old.id).await,
        expected(0..400)
    );

    let audit = audit_entries(&cloud, &tenant.key).await;
    let actor = format!("gateway:{}", old.id);
    for action in ["gateway.certificate.renew", "gateway.certificate.rotated"] {
        let found = audit
            .iter()
            .filter(|(who, what, object)| *who == actor && what == action && *object == old.id);
        assert_eq!(found.count(), 1, "{action} in {audit:?}");
    }
    cloud.stop().await;
}

async fn an_expired_certificate_is_refused(backend: Backend) {
    let Some((cloud, tenant, _site, gw)) = setup(backend, |_| {}).await else {
        return;
    };
    let (status, ack) = cloud.ingest(&gw, &batch(&gw.id, "raw", 0, 99)).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    sqlx::query("UPDATE gateway_certs SET not_after = 1 WHERE gateway_id = $1")
        .bind(&gw.id)
        .execute(&cloud.db().pool)
        .await
        .unwrap();
    let (status, body) = cloud.ingest(&gw, &batch(&gw.id, "raw", 100, 199)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(message(&body).contains("expired"), "{body}");
    let (_key, csr) = pki::new_key_and_csr("gw-1").unwrap();
    let (status, body) = renew(&cloud, &gw.client, &csr).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "an expired certificate cannot renew itself: {body}"
    );
    assert_eq!(
        cloud.stored_readings(&tenant.key, &gw.id).await,
        expected(0..100)
    );
    cloud.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Limits

async fn batches_above_the_size_limits_get_413(backend: Backend) {
    let Some((cloud, tenant, _site, gw)) =
        setup(backend, |c| c.limits.max_batch_readings = 500).await
    else {
        return;
    };
    let (status, body) = cloud.ingest(&gw, &batch(&gw.id, "raw", 0, 999)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["code"], "payload_too_large", "{body}");
    let (status, ack) = cloud.ingest(&gw, &batch(&gw.id, "raw", 0, 499)).await;
    assert_eq!(status, StatusCode::OK, "the limit is inclusive: {ack}");
    assert_eq!(
        cloud.stored_readings(&tenant.key, &gw.id).await,
        expected(0..500)
    );
    cloud.stop().await;

    let Some((cloud, tenant, _site, gw)) =
        setup(backend, |c| c.limits.max_batch_bytes = 1024).await
    else {
        return;
    };
    let big = incompressible_batch(&gw.id, 0, 499);
    assert!(big.len() > 1024, "the test batch is {} bytes", big.len());
    let (status, body) = cloud.ingest(&gw, &big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["code"], "payload_too_large", "{body}");
    let small = batch(&gw.id, "raw", 0, 9);
    assert!(
        small.len() <= 1024,
        "the test batch is {} bytes",
        small.len()
    );
    let (status, ack) = cloud.ingest(&gw, &small).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(
        cloud.stored_readings(&tenant.key, &gw.id).await,
        expected(0..10)
    );
    cloud.stop().await;
}

async fn a_throttled_backlog_is_delayed_never_dropped(backend: Backend) {
    let adjust = |c: &mut fieldgate_cloud::CloudConfig| {
        c.limits.ingest_readings_per_s = 2000;
        c.limits.max_batch_readings = 1000;
    };
    let Some((cloud, tenant, _site, gw)) = setup(backend, adjust).await else {
        return;
    };
    let mut throttled = 0;
    for i in 0..10u64 {
        let bytes = batch(&gw.id, "raw", i * 1000, i * 1000 + 999);
        let mut attempts = 0;
        loop {
            attempts += 1;
            assert!(attempts <= 20, "batch {i} was never admitted");
            let (status, headers, body) = post_batch(&cloud, &gw.client, &bytes).await;
            if status == StatusCode::OK {
                assert_eq!(body["stored"].as_u64(), Some(1000), "{body}");
                assert_eq!(
                    body["high_water_mark"].as_u64(),
                    Some(i * 1000 + 999),
                    "{body}"
                );
                break;
            }
            let wait = assert_rate_limited(status, &headers, &body);
            assert!(
                wait <= 2,
                "1,000 readings at 2,000/s need at most a second or so, not {wait}"
            );
            throttled += 1;
            tokio::time::sleep(Duration::from_secs(wait)).await;
        }
    }
    assert!(
        throttled > 0,
        "10,000 readings at 2,000/s must be throttled"
    );
    assert_eq!(
        cloud.stored_readings(&tenant.key, &gw.id).await,
        expected(0..10_000)
    );
    cloud.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Login

async fn repeated_login_failures_lock_the_account_out(backend: Backend) {
    let Some(cloud) = TestCloud::start(backend).await else {
        return;
    };
    let tenant = cloud.tenant("acme").await;
    let url = format!("{}/v1/auth/login", cloud.base);
    let login = |email: &str, password: &str| json!({"tenant": tenant.name, "email": email, "password": password});
    let client = cloud.client();

    // A correct login before any failure works, and its token is good.
    let (status, _, body) = request(
        &client,
        Method::POST,
        &url,
        None,
        Some(login(&tenant.owner_email, &tenant.owner_password)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["role"], "owner", "{body}");
    let session = body["token"].as_str().unwrap().to_string();
    let (status, me) = cloud
        .call(Method::GET, "/v1/me", Some(&session), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["tenant_id"], tenant.id.as_str(), "{me}");
    assert_eq!(me["tenant_name"], "acme", "{me}");
    assert!(me["actor"].as_str().unwrap().starts_with("user:"), "{me}");

    let (status, other) = cloud
        .call(
            Method::POST,
            "/v1/users",
            Some(&session),
            Some(json!({"email": "op@acme.example", "role": "operator"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{other}");
    let other_password = other["password"].as_str().unwrap().to_string();

    for _ in 0..5 {
        let (status, _, body) = request(
            &client,
            Method::POST,
            &url,
            None,
            Some(login(&tenant.owner_email, "wrong")),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }
    // Locked: even the right password is refused, with how long to wait.
    let (status, headers, body) = request(
        &client,
        Method::POST,
        &url,
        None,
        Some(login(&tenant.owner_email, &tenant.owner_password)),
    )
    .await;
    let wait = assert_rate_limited(status, &headers, &body);
    assert!(
        wait <= 301,
        "the lockout is login_lockout_s (300 s), not {wait}"
    );
    // The failures all came from 127.0.0.1, which is locked too: another account cannot log in
    // from it either.
    let (status, headers, body) = request(
        &client,
        Method::POST,
        &url,
        None,
        Some(login("op@acme.example", &other_password)),
    )
    .await;
    assert_rate_limited(status, &headers, &body);
    // A session made before the lock still works.
    assert_eq!(
        cloud
            .call(Method::GET, "/v1/me", Some(&session), None)
            .await
            .0,
        StatusCode::OK
    );
    cloud.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Malformed batches

async fn malformed_batches_get_400_and_leave_the_stream_unchanged(backend: Backend) {
    let Some((cloud, tenant, _site, gw)) = setup(backend, |_| {}).await else {
        return;
    };
    let assert_bad = |status: StatusCode, body: &Json, what: &str| {
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
        assert_eq!(body["code"], "bad_batch", "{what}: {body}");
    };

    let (status, body) = cloud.ingest(&gw, &[]).await;
    assert_bad(status, &body, "an empty body");
    // 100 pseudo-random bytes (fixed seed: the same bytes every run).
    let mut random = xorshift(7);
    let noise: Vec<u8> = (0..100).map(|_| (random() >> 56) as u8).collect();
    let (status, body) = cloud.ingest(&gw, &noise).await;
    assert_bad(status, &body, "random bytes");

    // A valid batch with one byte flipped, for every byte position.
    let good = batch(&gw.id, "raw", 0, 99);
    for at in 0..good.len() {
        let mut damaged = good.clone();
        damaged[at] ^= 0xff;
        let (status, body) = cloud.ingest(&gw, &damaged).await;
        assert_bad(
            status,
            &body,
            &format!("byte {at} of {} flipped", good.len()),
        );
    }
    assert_eq!(
        count(
            &cloud,
            "SELECT COUNT(*) FROM streams WHERE gateway_id = $1",
            &gw.id
        )
        .await,
        0
    );
    let (status, ack) = cloud.ingest(&gw, &good).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(
        (ack["stored"].as_u64(), ack["high_water_mark"].as_u64()),
        (Some(100), Some(99)),
        "{ack}"
    );

    // Once the stream exists, damaged batches leave its high-water mark where it was.
    let next = batch(&gw.id, "raw", 100, 199);
    for at in [0, next.len() / 2, next.len() - 1] {
        let mut damaged = next.clone();
        damaged[at] ^= 0xff;
        let (status, body) = cloud.ingest(&gw, &damaged).await;
        assert_bad(status, &body, &format!("byte {at} flipped"));
    }
    let (status, body) = cloud.ingest(&gw, &next[..next.len() - 1]).await;
    assert_bad(status, &body, "a truncated batch");
    let (status, ack) = cloud.ingest(&gw, &next).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(
        (
            ack["stored"].as_u64(),
            ack["duplicates"].as_u64(),
            ack["high_water_mark"].as_u64()
        ),
        (Some(100), Some(0), Some(199)),
        "{ack}"
    );
    assert_eq!(
        cloud.stored_readings(&tenant.key, &gw.id).await,
        expected(0..200)
    );
    cloud.stop().await;
}
