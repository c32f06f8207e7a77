//! The fleet: sites, enrollment tokens, gateway enrollment and certificate renewal, and the
//! gateway registry (list, get, relabel, decommission). [`GatewayIdentity`] is the extractor
//! for endpoints gateways call with their client certificate.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::accounts::RequestSource;
use crate::api::{page_limit, ApiJson, ApiPath, ApiQuery};
use crate::audit;
use crate::auth::{source_ip, Principal, Role};
use crate::db::{is_unique_violation, now_ms, Db};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::ids::{new_id, random_hex, secret_hash};
use crate::pki;
use crate::tls::ClientCert;
use crate::AppState;

/// A gateway seen within this long is `online`.
const ONLINE_WITHIN_MS: i64 = 5 * 60 * 1000;

// ---------------------------------------------------------------------------------------------
// Sites

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Site {
    pub id: String,
    pub name: String,
    pub created_at: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct NewSite {
    #[schema(pattern = "^[^\\x00-\\x1F\\x7F-\\x9F]{1,100}$")]
    pub name: String,
}

/// 404 unless the site exists in this tenant.
pub async fn site_exists(db: &Db, tenant_id: &str, site_id: &str) -> ApiResult<()> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT id FROM sites WHERE id = $1 AND tenant_id = $2")
            .bind(site_id)
            .bind(tenant_id)
            .fetch_optional(&db.pool)
            .await?;
    row.map(|_| ()).ok_or_else(|| ApiError::not_found("site"))
}

/// The tenant's sites (a key limited to one site sees that one).
#[utoipa::path(get, path = "/v1/sites", tag = "fleet", security(("bearer" = [])),
    responses((status = 200, body = Vec<Site>), (status = 401, body = ErrorBody)))]
pub async fn list_sites(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Vec<Site>>> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT id, name, created_at FROM sites WHERE tenant_id = $1 AND ($2 = '' OR id = $2) ORDER BY name",
    )
    .bind(&principal.tenant_id)
    .bind(principal.scope.site_id.clone().unwrap_or_default())
    .fetch_all(&state.db.pool)
    .await?;
    Ok(Json(
        rows.into_iter()
            .map(|(id, name, created_at)| Site {
                id,
                name,
                created_at,
            })
            .collect(),
    ))
}

/// One site.
#[utoipa::path(get, path = "/v1/sites/{id}", tag = "fleet", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = Site), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_site(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Site>> {
    if principal
        .scope
        .site_id
        .as_ref()
        .is_some_and(|site| *site != id)
    {
        return Err(ApiError::not_found("site"));
    }
    let row: Option<(String, String, i64)> =
        sqlx::query_as("SELECT id, name, created_at FROM sites WHERE id = $1 AND tenant_id = $2")
            .bind(&id)
            .bind(&principal.tenant_id)
            .fetch_optional(&state.db.pool)
            .await?;
    let (id, name, created_at) = row.ok_or_else(|| ApiError::not_found("site"))?;
    Ok(Json(Site {
        id,
        name,
        created_at,
    }))
}

/// Create a site.
#[utoipa::path(post, path = "/v1/sites", tag = "fleet", security(("bearer" = [])), request_body = NewSite,
    responses((status = 201, body = Site), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_site(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(request): ApiJson<NewSite>,
) -> ApiResult<(StatusCode, Json<Site>)> {
    principal.require(Role::Installer)?;
    principal.require_unscoped()?;
    validate_display_name(&request.name, "site name")?;
    let site = Site {
        id: new_id("st"),
        name: request.name,
        created_at: now_ms(),
    };
    let mut tx = state.db.pool.begin().await?;
    let inserted =
        sqlx::query("INSERT INTO sites (id, tenant_id, name, created_at) VALUES ($1, $2, $3, $4)")
            .bind(&site.id)
            .bind(&principal.tenant_id)
            .bind(&site.name)
            .bind(site.created_at)
            .execute(&mut *tx)
            .await;
    match inserted {
        Err(err) if is_unique_violation(&err) => {
            return Err(ApiError::conflict("a site with this name exists"))
        }
        other => other?,
    };
    audit::record(
        &mut *tx,
        &principal,
        "site.create",
        &site.id,
        serde_json::json!({"name": site.name}),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(site)))
}

fn validate_display_name(name: &str, what: &str) -> ApiResult<()> {
    if (1..=100).contains(&name.chars().count()) && !name.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "a {what} is 1-100 printable characters"
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// Enrollment tokens and enrollment

#[derive(Debug, Deserialize, ToSchema)]
pub struct NewEnrollmentToken {
    pub site_id: String,
    /// Hours until the token expires (1 up to the service's limit, a week by default).
    #[schema(minimum = 1, maximum = 168)]
    #[serde(deserialize_with = "crate::api::whole_u32")]
    pub expires_in_hours: u32,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnrollmentToken {
    pub id: String,
    pub site_id: String,
    pub created_by: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
    pub gateway_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedEnrollmentToken {
    pub token: EnrollmentToken,
    /// Shown once: goes into the gateway's provisioning. Good for one enrollment.
    pub secret: String,
}

/// Make a one-time, expiring enrollment token bound to a site.
#[utoipa::path(post, path = "/v1/enrollment-tokens", tag = "fleet", security(("bearer" = [])),
    request_body = NewEnrollmentToken,
    responses((status = 201, body = CreatedEnrollmentToken), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn create_enrollment_token(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(request): ApiJson<NewEnrollmentToken>,
) -> ApiResult<(StatusCode, Json<CreatedEnrollmentToken>)> {
    principal.require(Role::Installer)?;
    refuse_label_scope(&principal)?;
    if principal
        .scope
        .site_id
        .as_ref()
        .is_some_and(|site| *site != request.site_id)
    {
        return Err(ApiError::not_found("site"));
    }
    site_exists(&state.db, &principal.tenant_id, &request.site_id).await?;
    let max_hours = state.config.gateways.max_enrollment_token_hours;
    if request.expires_in_hours == 0 || u64::from(request.expires_in_hours) > max_hours {
        return Err(ApiError::bad_request(format!(
            "expires_in_hours is 1..={max_hours}"
        )));
    }
    let secret = format!("fge_{}", random_hex(32));
    let now = now_ms();
    let token = EnrollmentToken {
        id: new_id("et"),
        site_id: request.site_id,
        created_by: principal.actor.clone(),
        created_at: now,
        expires_at: now + i64::from(request.expires_in_hours) * 3_600_000,
        used_at: None,
        gateway_id: None,
    };
    let mut tx = state.db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO enrollment_tokens (id, tenant_id, site_id, token_hash, created_by, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&token.id)
    .bind(&principal.tenant_id)
    .bind(&token.site_id)
    .bind(secret_hash(&secret))
    .bind(&token.created_by)
    .bind(token.created_at)
    .bind(token.expires_at)
    .execute(&mut *tx)
    .await?;
    audit::record(
        &mut *tx,
        &principal,
        "enrollment_token.create",
        &token.id,
        serde_json::json!({"site_id": token.site_id, "expires_at": token.expires_at}),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedEnrollmentToken { token, secret }),
    ))
}

/// The tenant's enrollment tokens (never their secrets).
#[utoipa::path(get, path = "/v1/enrollment-tokens", tag = "fleet", security(("bearer" = [])),
    responses((status = 200, body = Vec<EnrollmentToken>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn list_enrollment_tokens(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Vec<EnrollmentToken>>> {
    principal.require(Role::Installer)?;
    refuse_label_scope(&principal)?;
    type Row = (
        String,
        String,
        String,
        i64,
        i64,
        Option<i64>,
        Option<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, site_id, created_by, created_at, expires_at, used_at, gateway_id FROM enrollment_tokens \
         WHERE tenant_id = $1 AND ($2 = '' OR site_id = $2) ORDER BY created_at DESC, id",
    )
    .bind(&principal.tenant_id)
    .bind(principal.scope.site_id.clone().unwrap_or_default())
    .fetch_all(&state.db.pool)
    .await?;
    Ok(Json(
        rows.into_iter()
            .map(
                |(id, site_id, created_by, created_at, expires_at, used_at, gateway_id)| {
                    EnrollmentToken {
                        id,
                        site_id,
                        created_by,
                        created_at,
                        expires_at,
                        used_at,
                        gateway_id,
                    }
                },
            )
            .collect(),
    ))
}

/// Enrollment is per site: a key limited to a label cannot say which gateways it will enroll.
fn refuse_label_scope(principal: &Principal) -> ApiResult<()> {
    if principal.scope.label.is_some() {
        return Err(ApiError::forbidden(
            "an API key limited to a label cannot enroll gateways; use a key limited to the site",
        ));
    }
    Ok(())
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnrollRequest {
    /// The enrollment token from the gateway's provisioning.
    pub token: String,
    /// The site the gateway is installed at; must be the token's.
    pub site_id: String,
    /// The gateway's name, unique in the tenant.
    #[schema(pattern = "^[^\\x00-\\x1F\\x7F-\\x9F]{1,100}$")]
    pub name: String,
    /// A PKCS#10 certificate signing request (PEM) for the gateway's own key pair.
    pub csr_pem: String,
    #[schema(max_length = 64)]
    pub version: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IssuedCertificate {
    pub gateway_id: String,
    pub tenant_id: String,
    /// The gateway's client certificate (PEM); present it for ingest and control.
    pub certificate_pem: String,
    /// The tenant's gateway CA (PEM).
    pub ca_pem: String,
    pub not_after: i64,
}

/// Enroll a gateway: spend a one-time token, get a client certificate for the gateway's key.
/// Needs no other credential; failures are rate limited per address.
#[utoipa::path(post, path = "/v1/enroll", tag = "gateway", request_body = EnrollRequest,
    responses((status = 201, body = IssuedCertificate), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 429, body = ErrorBody)))]
pub async fn enroll(
    State(state): State<AppState>,
    RequestSource(ip): RequestSource,
    ApiJson(request): ApiJson<EnrollRequest>,
) -> ApiResult<(StatusCode, Json<IssuedCertificate>)> {
    let limiter_key = [format!("enroll-ip:{ip}")];
    if let Some(wait) = state.logins.locked_for(&limiter_key) {
        return Err(ApiError::rate_limited(
            "too many failed enrollments from this address",
            wait,
        ));
    }
    let result = enroll_inner(&state, &ip, request).await;
    if matches!(&result, Err(err) if err.status == StatusCode::UNAUTHORIZED || err.status == StatusCode::FORBIDDEN)
    {
        state.logins.record_failure(&limiter_key);
    }
    result.map(|issued| (StatusCode::CREATED, Json(issued)))
}

async fn enroll_inner(
    state: &AppState,
    ip: &str,
    request: EnrollRequest,
) -> ApiResult<IssuedCertificate> {
    validate_display_name(&request.name, "gateway name")?;
    if request.version.as_ref().is_some_and(|v| v.len() > 64) {
        return Err(ApiError::bad_request("version is at most 64 characters"));
    }
    let now = now_ms();
    let mut tx = state.db.pool.begin().await?;
    // Spend the token first: the write locks it, so two gateways cannot both use it.
    let spent: Option<(String, String, String)> = sqlx::query_as(
        "UPDATE enrollment_tokens SET used_at = $1 \
         WHERE token_hash = $2 AND used_at IS NULL AND expires_at > $1 RETURNING id, tenant_id, site_id",
    )
    .bind(now)
    .bind(secret_hash(&request.token))
    .fetch_optional(&mut *tx)
    .await?;
    let Some((token_id, tenant_id, site_id)) = spent else {
        let known: Option<(i64, Option<i64>)> = sqlx::query_as(
            "SELECT expires_at, used_at FROM enrollment_tokens WHERE token_hash = $1",
        )
        .bind(secret_hash(&request.token))
        .fetch_optional(&mut *tx)
        .await?;
        return Err(match known {
            None => ApiError::unauthorized("unknown enrollment token"),
            Some((_, Some(_))) => {
                ApiError::unauthorized("this enrollment token has been used already")
            }
            Some(_) => ApiError::unauthorized("this enrollment token has expired"),
        });
    };
    if site_id != request.site_id {
        // Dropping the transaction rolls the spending back: the token stays good for its site.
        return Err(ApiError::forbidden(
            "this enrollment token is for another site",
        ));
    }
    let (ca_pem, ca_key): (String, String) =
        sqlx::query_as("SELECT ca_cert_pem, ca_key_pem FROM tenants WHERE id = $1")
            .bind(&tenant_id)
            .fetch_one(&mut *tx)
            .await?;
    let gateway_id = new_id("gw");
    let validity = Duration::from_secs(state.config.gateways.cert_validity_days * 86_400);
    let issued = pki::sign_gateway_csr(&ca_pem, &ca_key, &request.csr_pem, &gateway_id, validity)
        .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    let inserted = sqlx::query(
        "INSERT INTO gateways (id, tenant_id, site_id, name, version, status, created_at) \
         VALUES ($1, $2, $3, $4, $5, 'active', $6)",
    )
    .bind(&gateway_id)
    .bind(&tenant_id)
    .bind(&site_id)
    .bind(&request.name)
    .bind(&request.version)
    .bind(now)
    .execute(&mut *tx)
    .await;
    match inserted {
        Err(err) if is_unique_violation(&err) => {
            return Err(ApiError::conflict(
                "an active gateway with this name exists in the tenant; decommission it or pick another name",
            ))
        }
        other => other?,
    };
    insert_cert(&mut tx, &tenant_id, &gateway_id, &issued, now).await?;
    sqlx::query("UPDATE enrollment_tokens SET gateway_id = $1 WHERE id = $2")
        .bind(&gateway_id)
        .bind(&token_id)
        .execute(&mut *tx)
        .await?;
    audit::record_as(&mut *tx, &tenant_id, &format!("gateway:{gateway_id}"), ip, "gateway.enroll", &gateway_id,
        serde_json::json!({"name": request.name, "site_id": site_id, "token_id": token_id, "serial": issued.serial})).await?;
    tx.commit().await?;
    Ok(IssuedCertificate {
        gateway_id,
        tenant_id,
        certificate_pem: issued.pem,
        ca_pem,
        not_after: issued.not_after_ms,
    })
}

async fn insert_cert(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    tenant_id: &str,
    gateway_id: &str,
    issued: &pki::IssuedCert,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO gateway_certs (fingerprint, tenant_id, gateway_id, serial, not_before, not_after, issued_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&issued.fingerprint)
    .bind(tenant_id)
    .bind(gateway_id)
    .bind(&issued.serial)
    .bind(issued.not_before_ms)
    .bind(issued.not_after_ms)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Gateway identity (mutual TLS)

/// A gateway authenticated by its client certificate: one the tenant's CA issued to it, not
/// revoked, within its validity, of a gateway that is not decommissioned.
#[derive(Clone, Debug)]
pub struct GatewayIdentity {
    pub tenant_id: String,
    pub gateway_id: String,
    pub fingerprint: String,
    pub source_ip: String,
}

impl FromRequestParts<AppState> for GatewayIdentity {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let cert = parts.extensions.get::<ClientCert>().ok_or_else(|| {
            ApiError::unauthorized(
                "this endpoint needs the gateway's client certificate (mutual TLS)",
            )
        })?;
        let fingerprint = pki::fingerprint(&cert.0);
        let now = now_ms();
        type Row = (
            String,
            String,
            i64,
            i64,
            i64,
            Option<i64>,
            Option<i64>,
            String,
        );
        let row: Option<Row> = sqlx::query_as(
            "SELECT c.tenant_id, c.gateway_id, c.not_before, c.not_after, c.issued_at, c.first_used_at, c.revoked_at, g.status \
             FROM gateway_certs c JOIN gateways g ON g.id = c.gateway_id AND g.tenant_id = c.tenant_id \
             WHERE c.fingerprint = $1",
        )
        .bind(&fingerprint)
        .fetch_optional(&state.db.pool)
        .await?;
        let Some((
            tenant_id,
            gateway_id,
            not_before,
            not_after,
            issued_at,
            first_used_at,
            revoked_at,
            status,
        )) = row
        else {
            return Err(ApiError::unauthorized(
                "the client certificate was not issued to any gateway",
            ));
        };
        if status != "active" {
            return Err(ApiError::forbidden("this gateway has been decommissioned"));
        }
        if revoked_at.is_some() {
            return Err(ApiError::unauthorized(
                "this client certificate has been revoked",
            ));
        }
        if now < not_before || now >= not_after {
            return Err(ApiError::unauthorized(
                "this client certificate has expired; enroll again",
            ));
        }
        let identity = GatewayIdentity {
            tenant_id,
            gateway_id,
            fingerprint,
            source_ip: source_ip(parts),
        };
        if first_used_at.is_none() {
            complete_rotation(&state.db, &identity, issued_at, now).await?;
        }
        Ok(identity)
    }
}

/// The first request with a new certificate: revoke the ones issued before it.
async fn complete_rotation(
    db: &Db,
    identity: &GatewayIdentity,
    issued_at: i64,
    now: i64,
) -> Result<(), sqlx::Error> {
    let mut tx = db.pool.begin().await?;
    let first = sqlx::query("UPDATE gateway_certs SET first_used_at = $1 WHERE fingerprint = $2 AND first_used_at IS NULL")
        .bind(now)
        .bind(&identity.fingerprint)
        .execute(&mut *tx)
        .await?;
    if first.rows_affected() == 1 {
        let revoked = sqlx::query(
            "UPDATE gateway_certs SET revoked_at = $1 \
             WHERE gateway_id = $2 AND fingerprint <> $3 AND issued_at <= $4 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(&identity.gateway_id)
        .bind(&identity.fingerprint)
        .bind(issued_at)
        .execute(&mut *tx)
        .await?;
        if revoked.rows_affected() > 0 {
            audit::record_as(
                &mut *tx,
                &identity.tenant_id,
                &format!("gateway:{}", identity.gateway_id),
                &identity.source_ip,
                "gateway.certificate.rotated",
                &identity.gateway_id,
                serde_json::json!({"revoked_previous": revoked.rows_affected()}),
            )
            .await?;
        }
    }
    tx.commit().await
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RenewRequest {
    /// A CSR for the gateway's new key pair (PEM).
    pub csr_pem: String,
}

/// Renew the calling gateway's certificate (mutual TLS with the current one). The current
/// certificate stays valid until the new one is first used, then it is revoked.
#[utoipa::path(post, path = "/v1/gateway/certificate", tag = "gateway", request_body = RenewRequest,
    responses((status = 201, body = IssuedCertificate), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn renew_certificate(
    State(state): State<AppState>,
    gateway: GatewayIdentity,
    ApiJson(request): ApiJson<RenewRequest>,
) -> ApiResult<(StatusCode, Json<IssuedCertificate>)> {
    let (ca_pem, ca_key): (String, String) =
        sqlx::query_as("SELECT ca_cert_pem, ca_key_pem FROM tenants WHERE id = $1")
            .bind(&gateway.tenant_id)
            .fetch_one(&state.db.pool)
            .await?;
    let validity = Duration::from_secs(state.config.gateways.cert_validity_days * 86_400);
    let issued = pki::sign_gateway_csr(
        &ca_pem,
        &ca_key,
        &request.csr_pem,
        &gateway.gateway_id,
        validity,
    )
    .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    let now = now_ms();
    let mut tx = state.db.pool.begin().await?;
    insert_cert(
        &mut tx,
        &gateway.tenant_id,
        &gateway.gateway_id,
        &issued,
        now,
    )
    .await?;
    audit::record_as(
        &mut *tx,
        &gateway.tenant_id,
        &format!("gateway:{}", gateway.gateway_id),
        &gateway.source_ip,
        "gateway.certificate.renew",
        &gateway.gateway_id,
        serde_json::json!({"serial": issued.serial}),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(IssuedCertificate {
            gateway_id: gateway.gateway_id,
            tenant_id: gateway.tenant_id,
            certificate_pem: issued.pem,
            ca_pem,
            not_after: issued.not_after_ms,
        }),
    ))
}

// ---------------------------------------------------------------------------------------------
// The registry

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GatewayHealth {
    /// Seen within the last five minutes.
    Online,
    /// Seen before, not lately.
    Stale,
    NeverSeen,
    Decommissioned,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Gateway {
    pub id: String,
    pub name: String,
    pub site_id: String,
    #[schema(schema_with = labels_schema)]
    pub labels: BTreeMap<String, String>,
    /// The agent version the gateway last reported.
    pub version: Option<String>,
    pub last_seen_at: Option<i64>,
    /// Readings waiting in the gateway's journal, as it last reported.
    pub backlog: Option<i64>,
    /// `active` or `decommissioned`.
    pub status: String,
    pub health: GatewayHealth,
    pub created_at: i64,
    pub decommissioned_at: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GatewayPage {
    pub gateways: Vec<Gateway>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GatewayQuery {
    pub site_id: Option<String>,
    /// `key=value`.
    #[param(pattern = "^[^=]+=.+$")]
    pub label: Option<String>,
    pub status: Option<GatewayStatus>,
    /// The `next_after` of the previous page.
    pub after: Option<String>,
    /// 1..=500, default 100.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GatewayStatus {
    Active,
    Decommissioned,
}

impl GatewayStatus {
    fn as_str(self) -> &'static str {
        match self {
            GatewayStatus::Active => "active",
            GatewayStatus::Decommissioned => "decommissioned",
        }
    }
}

type GatewayRow = (
    String,
    String,
    String,
    Option<String>,
    Option<i64>,
    Option<i64>,
    String,
    i64,
    Option<i64>,
);

const GATEWAY_COLUMNS: &str =
    "g.id, g.name, g.site_id, g.version, g.last_seen_at, g.backlog, g.status, g.created_at, g.decommissioned_at";

fn parse_label(text: &str) -> ApiResult<(String, String)> {
    text.split_once('=')
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| ApiError::bad_request("label must be key=value"))
}

async fn labels_of(
    db: &Db,
    tenant_id: &str,
    ids: &[String],
) -> Result<HashMap<String, BTreeMap<String, String>>, sqlx::Error> {
    let mut labels: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    if ids.is_empty() {
        return Ok(labels);
    }
    let placeholders: Vec<String> = (0..ids.len()).map(|i| format!("${}", i + 2)).collect();
    let sql = format!(
        "SELECT gateway_id, key, value FROM gateway_labels WHERE tenant_id = $1 AND gateway_id IN ({})",
        placeholders.join(", ")
    );
    let mut query = sqlx::query_as::<_, (String, String, String)>(&sql).bind(tenant_id);
    for id in ids {
        query = query.bind(id);
    }
    for (gateway_id, key, value) in query.fetch_all(&db.pool).await? {
        labels.entry(gateway_id).or_default().insert(key, value);
    }
    Ok(labels)
}

fn gateway_from_row(row: GatewayRow, labels: BTreeMap<String, String>, now: i64) -> Gateway {
    let (id, name, site_id, version, last_seen_at, backlog, status, created_at, decommissioned_at) =
        row;
    let health = if status != "active" {
        GatewayHealth::Decommissioned
    } else {
        match last_seen_at {
            None => GatewayHealth::NeverSeen,
            Some(seen) if now - seen <= ONLINE_WITHIN_MS => GatewayHealth::Online,
            Some(_) => GatewayHealth::Stale,
        }
    };
    Gateway {
        id,
        name,
        site_id,
        labels,
        version,
        last_seen_at,
        backlog,
        status,
        health,
        created_at,
        decommissioned_at,
    }
}

/// Gateways of the tenant (within the caller's scope), filtered, in pages.
#[utoipa::path(get, path = "/v1/gateways", tag = "fleet", security(("bearer" = [])), params(GatewayQuery),
    responses((status = 200, body = GatewayPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn list_gateways(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<GatewayQuery>,
) -> ApiResult<Json<GatewayPage>> {
    let limit = page_limit(query.limit, 100, 500)?;
    let label = query.label.as_deref().map(parse_label).transpose()?;
    let scope_label = principal.scope.label.clone();
    let mut sql =
        format!("SELECT {GATEWAY_COLUMNS} FROM gateways g WHERE g.tenant_id = $1 AND g.id > $2");
    let mut binds: Vec<String> = vec![
        principal.tenant_id.clone(),
        query.after.clone().unwrap_or_default(),
    ];
    let mut push = |sql: &mut String, clause: &str, values: &[&str]| {
        let mut clause = clause.to_string();
        for value in values {
            binds.push(value.to_string());
            clause = clause.replacen('?', &format!("${}", binds.len()), 1);
        }
        sql.push_str(&clause);
    };
    if let Some(site) = &query.site_id {
        push(&mut sql, " AND g.site_id = ?", &[site]);
    }
    if let Some(site) = &principal.scope.site_id {
        push(&mut sql, " AND g.site_id = ?", &[site]);
    }
    if let Some(status) = query.status {
        push(&mut sql, " AND g.status = ?", &[status.as_str()]);
    }
    for (key, value) in label.iter().chain(scope_label.iter()) {
        push(&mut sql,
            " AND EXISTS (SELECT 1 FROM gateway_labels l WHERE l.gateway_id = g.id AND l.key = ? AND l.value = ?)",
            &[key, value]);
    }
    sql.push_str(&format!(" ORDER BY g.id LIMIT {}", limit + 1));
    let mut q = sqlx::query_as::<_, GatewayRow>(&sql);
    for value in &binds {
        q = q.bind(value);
    }
    let mut rows = q.fetch_all(&state.db.pool).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let ids: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let mut labels = labels_of(&state.db, &principal.tenant_id, &ids).await?;
    let now = now_ms();
    let gateways: Vec<Gateway> = rows
        .into_iter()
        .map(|row| {
            let l = labels.remove(&row.0).unwrap_or_default();
            gateway_from_row(row, l, now)
        })
        .collect();
    let next_after = if more {
        gateways.last().map(|g| g.id.clone())
    } else {
        None
    };
    Ok(Json(GatewayPage {
        gateways,
        next_after,
    }))
}

/// A gateway of the caller's tenant and scope, or 404.
pub async fn load_gateway(db: &Db, principal: &Principal, id: &str) -> ApiResult<Gateway> {
    let row: Option<GatewayRow> = sqlx::query_as(&format!(
        "SELECT {GATEWAY_COLUMNS} FROM gateways g WHERE g.id = $1 AND g.tenant_id = $2"
    ))
    .bind(id)
    .bind(&principal.tenant_id)
    .fetch_optional(&db.pool)
    .await?;
    let row = row.ok_or_else(|| ApiError::not_found("gateway"))?;
    let labels = labels_of(db, &principal.tenant_id, std::slice::from_ref(&row.0))
        .await?
        .remove(&row.0)
        .unwrap_or_default();
    let gateway = gateway_from_row(row, labels, now_ms());
    let labels: HashMap<String, String> = gateway.labels.clone().into_iter().collect();
    if !principal.sees_gateway(&gateway.site_id, &labels) {
        return Err(ApiError::not_found("gateway"));
    }
    Ok(gateway)
}

/// One gateway.
#[utoipa::path(get, path = "/v1/gateways/{id}", tag = "fleet", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = Gateway), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_gateway(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Gateway>> {
    load_gateway(&state.db, &principal, &id).await.map(Json)
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct GatewayUpdate {
    #[schema(pattern = "^[^\\x00-\\x1F\\x7F-\\x9F]{1,100}$")]
    pub name: Option<String>,
    /// Replaces all labels: at most 32, keys 1-64 of `a-z 0-9 . _ - /`, values 1-128 printable.
    #[schema(schema_with = optional_labels_schema)]
    pub labels: Option<BTreeMap<String, String>>,
}

/// The labels object as the schema describes it (what `validate_labels` accepts).
fn labels_schema() -> utoipa::openapi::Object {
    labels_object(utoipa::openapi::Type::Object.into())
}

/// Labels, or null for "leave them as they are".
fn optional_labels_schema() -> utoipa::openapi::Object {
    use utoipa::openapi::{schema::SchemaType, Type};
    labels_object(SchemaType::from_iter([Type::Object, Type::Null]))
}

fn labels_object(schema_type: utoipa::openapi::schema::SchemaType) -> utoipa::openapi::Object {
    use utoipa::openapi::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(schema_type)
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[a-z0-9._/-]{1,64}$")),
        ))
        .additional_properties(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[^\\x00-\\x1F\\x7F-\\x9F]{1,128}$")),
        ))
        .max_properties(Some(32))
        .build()
}

fn validate_labels(labels: &BTreeMap<String, String>) -> ApiResult<()> {
    if labels.len() > 32 {
        return Err(ApiError::bad_request("at most 32 labels"));
    }
    for (key, value) in labels {
        let key_ok = (1..=64).contains(&key.len())
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b));
        let value_ok =
            (1..=128).contains(&value.chars().count()) && !value.chars().any(char::is_control);
        if !key_ok || !value_ok {
            return Err(ApiError::bad_request(format!(
                "bad label {key:?}: keys are 1-64 of a-z 0-9 . _ - /, values 1-128 printable"
            )));
        }
    }
    Ok(())
}

/// Rename a gateway or replace its labels.
#[utoipa::path(patch, path = "/v1/gateways/{id}", tag = "fleet", security(("bearer" = [])),
    params(("id" = String, Path)), request_body = GatewayUpdate,
    responses((status = 200, body = Gateway), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn update_gateway(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
    ApiJson(update): ApiJson<GatewayUpdate>,
) -> ApiResult<Json<Gateway>> {
    principal.require(Role::Operator)?;
    load_gateway(&state.db, &principal, &id).await?;
    if let Some(name) = &update.name {
        validate_display_name(name, "gateway name")?;
    }
    if let Some(labels) = &update.labels {
        validate_labels(labels)?;
        if let Some((key, value)) = &principal.scope.label {
            if labels.get(key) != Some(value) {
                return Err(ApiError::forbidden(format!(
                    "this API key is limited to gateways labelled {key}={value} and cannot remove that label"
                )));
            }
        }
    }
    let mut tx = state.db.pool.begin().await?;
    if let Some(name) = &update.name {
        let renamed = sqlx::query("UPDATE gateways SET name = $1 WHERE id = $2 AND tenant_id = $3")
            .bind(name)
            .bind(&id)
            .bind(&principal.tenant_id)
            .execute(&mut *tx)
            .await;
        match renamed {
            Err(err) if is_unique_violation(&err) => {
                return Err(ApiError::conflict("another gateway has this name"))
            }
            other => other?,
        };
    }
    if let Some(labels) = &update.labels {
        sqlx::query("DELETE FROM gateway_labels WHERE gateway_id = $1 AND tenant_id = $2")
            .bind(&id)
            .bind(&principal.tenant_id)
            .execute(&mut *tx)
            .await?;
        for (key, value) in labels {
            sqlx::query("INSERT INTO gateway_labels (gateway_id, tenant_id, key, value) VALUES ($1, $2, $3, $4)")
                .bind(&id)
                .bind(&principal.tenant_id)
                .bind(key)
                .bind(value)
                .execute(&mut *tx)
                .await?;
        }
    }
    audit::record(
        &mut *tx,
        &principal,
        "gateway.update",
        &id,
        serde_json::json!({"name": update.name, "labels": update.labels}),
    )
    .await?;
    tx.commit().await?;
    load_gateway(&state.db, &principal, &id).await.map(Json)
}

/// Decommission a gateway: its certificates are revoked and it is refused from the next
/// request on. Cannot be undone; a replacement enrolls anew.
#[utoipa::path(post, path = "/v1/gateways/{id}/decommission", tag = "fleet", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = Gateway), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn decommission_gateway(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Gateway>> {
    principal.require(Role::Operator)?;
    load_gateway(&state.db, &principal, &id).await?;
    let now = now_ms();
    let mut tx = state.db.pool.begin().await?;
    let changed = sqlx::query(
        "UPDATE gateways SET status = 'decommissioned', decommissioned_at = $1 \
         WHERE id = $2 AND tenant_id = $3 AND status = 'active'",
    )
    .bind(now)
    .bind(&id)
    .bind(&principal.tenant_id)
    .execute(&mut *tx)
    .await?;
    if changed.rows_affected() == 0 {
        // Decommissioned already: nothing to do, nothing to record.
        return load_gateway(&state.db, &principal, &id).await.map(Json);
    }
    sqlx::query("UPDATE gateway_certs SET revoked_at = $1 WHERE gateway_id = $2 AND tenant_id = $3 AND revoked_at IS NULL")
        .bind(now)
        .bind(&id)
        .bind(&principal.tenant_id)
        .execute(&mut *tx)
        .await?;
    audit::record(
        &mut *tx,
        &principal,
        "gateway.decommission",
        &id,
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await?;
    load_gateway(&state.db, &principal, &id).await.map(Json)
}

/// Record that a gateway was seen, with what it reported.
pub async fn touch_gateway(
    db: &Db,
    gateway: &GatewayIdentity,
    version: Option<&str>,
    backlog: Option<i64>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE gateways SET last_seen_at = $1, version = COALESCE($2, version), backlog = COALESCE($3, backlog) \
         WHERE id = $4 AND tenant_id = $5",
    )
    .bind(now_ms())
    .bind(version)
    .bind(backlog)
    .bind(&gateway.gateway_id)
    .bind(&gateway.tenant_id)
    .execute(&db.pool)
    .await?;
    Ok(())
}
