//! Tenants, people and API keys: bootstrapping a tenant with its first owner, logging in and
//! out, managing people and keys. Passwords and keys are shown once, when made, and stored only
//! as hashes.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::{ApiJson, ApiPath};
use crate::audit;
use crate::auth::{self, Principal, Role};
use crate::db::{is_unique_violation, now_ms, Db};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::ids::{new_id, secret_hash};
use crate::AppState;

/// What bootstrapping a tenant hands out, once.
#[derive(Debug, Serialize)]
pub struct Bootstrapped {
    pub tenant_id: String,
    pub owner_id: String,
    pub owner_email: String,
    pub owner_password: String,
    pub api_key: String,
}

/// Create a tenant (with its gateway CA) and its first owner, who gets a generated password and
/// an owner API key. There is no default account: this is how the first person gets in.
pub async fn bootstrap_tenant(
    db: &Db,
    tenant_name: &str,
    owner_email: &str,
) -> anyhow::Result<Bootstrapped> {
    validate_tenant_name(tenant_name).map_err(|e| anyhow::anyhow!(e.body.message))?;
    validate_email(owner_email).map_err(|e| anyhow::anyhow!(e.body.message))?;
    let tenant_id = new_id("tn");
    let owner_id = new_id("us");
    let key_id = new_id("ak");
    let (ca_cert, ca_key) = crate::pki::new_tenant_ca(tenant_name)?;
    let password = auth::generate_password();
    let password_hash = auth::hash_password(password.clone()).await?;
    let api_key = auth::new_api_key(&key_id);
    let now = now_ms();
    let mut tx = db.pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO tenants (id, name, created_at, ca_cert_pem, ca_key_pem) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&tenant_id)
    .bind(tenant_name)
    .bind(now)
    .bind(&ca_cert)
    .bind(&ca_key)
    .execute(&mut *tx)
    .await;
    if let Err(err) = inserted {
        if is_unique_violation(&err) {
            anyhow::bail!("a tenant named {tenant_name:?} exists already");
        }
        return Err(err.into());
    }
    sqlx::query(
        "INSERT INTO users (id, tenant_id, email, password_hash, role, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&owner_id)
    .bind(&tenant_id)
    .bind(owner_email)
    .bind(&password_hash)
    .bind(Role::Owner.as_str())
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, name, secret_hash, role, created_by, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&key_id)
    .bind(&tenant_id)
    .bind("bootstrap")
    .bind(secret_hash(&api_key))
    .bind(Role::Owner.as_str())
    .bind(format!("user:{owner_id}"))
    .bind(now)
    .execute(&mut *tx)
    .await?;
    audit::record_as(
        &mut *tx,
        &tenant_id,
        "admin",
        "local",
        "tenant.bootstrap",
        &tenant_id,
        serde_json::json!({"name": tenant_name, "owner": owner_email}),
    )
    .await?;
    tx.commit().await?;
    Ok(Bootstrapped {
        tenant_id,
        owner_id,
        owner_email: owner_email.to_string(),
        owner_password: password,
        api_key,
    })
}

fn validate_tenant_name(name: &str) -> ApiResult<()> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "a tenant name is 1-64 characters of a-z, 0-9, '-' and '_'",
        ))
    }
}

fn validate_email(email: &str) -> ApiResult<()> {
    let ok = email.chars().count() <= 254
        && email
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty())
        && !email.chars().any(|c| c == ' ' || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request("not an email address"))
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginRequest {
    /// The tenant's name.
    pub tenant: String,
    pub email: String,
    pub password: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LoginResponse {
    /// Send as `Authorization: Bearer <token>`.
    pub token: String,
    pub expires_at: i64,
    pub role: Role,
}

/// Log in with a password; returns a session token. Repeated failures lock the account and
/// the source address out for a while (429 with `Retry-After`).
#[utoipa::path(post, path = "/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = LoginResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn login(
    State(state): State<AppState>,
    parts: RequestSource,
    ApiJson(request): ApiJson<LoginRequest>,
) -> ApiResult<Json<LoginResponse>> {
    let account_key = format!(
        "account:{}:{}",
        request.tenant,
        request.email.to_lowercase()
    );
    let ip_key = format!("ip:{}", parts.0);
    let keys = [account_key.clone(), ip_key];
    if let Some(wait) = state.logins.locked_for(&keys) {
        state.metrics.login_failures.inc();
        return Err(ApiError::rate_limited(
            "too many failed logins; wait and try again",
            wait,
        ));
    }
    let row: Option<(String, String, String, String)> = sqlx::query_as(
        "SELECT u.id, u.tenant_id, u.password_hash, u.role FROM users u \
         JOIN tenants t ON t.id = u.tenant_id WHERE t.name = $1 AND u.email = $2",
    )
    .bind(&request.tenant)
    .bind(&request.email)
    .fetch_optional(&state.db.pool)
    .await?;
    let verified = match &row {
        Some((_, _, hash, _)) => auth::verify_password(request.password, hash.clone()).await,
        None => {
            // Spend what a verification costs, so timing does not tell unknown accounts apart.
            let _ = auth::hash_password(request.password).await;
            false
        }
    };
    let Some((user_id, tenant_id, _, role)) = row.filter(|_| verified) else {
        state.logins.record_failure(&keys);
        state.metrics.login_failures.inc();
        return Err(ApiError::unauthorized("wrong tenant, email or password"));
    };
    state.logins.record_success(&account_key);
    let token = auth::new_session_token();
    let now = now_ms();
    let expires_at = now + auth::SESSION_LIFETIME.as_millis() as i64;
    sqlx::query(
        "INSERT INTO login_sessions (token_hash, tenant_id, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(secret_hash(&token))
    .bind(&tenant_id)
    .bind(&user_id)
    .bind(now)
    .bind(expires_at)
    .execute(&state.db.pool)
    .await?;
    sqlx::query("DELETE FROM login_sessions WHERE expires_at < $1")
        .bind(now)
        .execute(&state.db.pool)
        .await?;
    Ok(Json(LoginResponse {
        token,
        expires_at,
        role: Role::parse(&role).ok_or_else(ApiError::internal)?,
    }))
}

/// The caller's source address, for handlers that run before authentication.
pub struct RequestSource(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for RequestSource {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(RequestSource(auth::source_ip(parts)))
    }
}

/// End the caller's login session.
#[utoipa::path(post, path = "/v1/auth/logout", tag = "auth", security(("bearer" = [])),
    responses((status = 204), (status = 401, body = ErrorBody)))]
pub async fn logout(
    State(state): State<AppState>,
    principal: Principal,
    headers: axum::http::HeaderMap,
) -> ApiResult<StatusCode> {
    if principal.actor.starts_with("user:") {
        if let Some(token) = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        {
            sqlx::query("DELETE FROM login_sessions WHERE token_hash = $1 AND tenant_id = $2")
                .bind(secret_hash(token.trim()))
                .bind(&principal.tenant_id)
                .execute(&state.db.pool)
                .await?;
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Me {
    pub tenant_id: String,
    pub tenant_name: String,
    pub actor: String,
    pub role: Role,
    /// For a limited API key: the only site it sees.
    pub scope_site_id: Option<String>,
    /// For a limited API key: the label (`key=value`) its gateways carry.
    pub scope_label: Option<String>,
}

/// Who the caller is.
#[utoipa::path(get, path = "/v1/me", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = Me), (status = 401, body = ErrorBody)))]
pub async fn me(State(state): State<AppState>, principal: Principal) -> ApiResult<Json<Me>> {
    let (tenant_name,): (String,) = sqlx::query_as("SELECT name FROM tenants WHERE id = $1")
        .bind(&principal.tenant_id)
        .fetch_one(&state.db.pool)
        .await?;
    Ok(Json(Me {
        tenant_id: principal.tenant_id,
        tenant_name,
        actor: principal.actor,
        role: principal.role,
        scope_site_id: principal.scope.site_id,
        scope_label: principal.scope.label.map(|(k, v)| format!("{k}={v}")),
    }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct User {
    pub id: String,
    pub email: String,
    pub role: Role,
    pub created_at: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct NewUser {
    #[schema(
        max_length = 254,
        pattern = "^[^@\\x00-\\x20\\x7F-\\x9F]+@[^\\x00-\\x20\\x7F-\\x9F]+$"
    )]
    pub email: String,
    pub role: Role,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedUser {
    pub user: User,
    /// Shown once; the person should change it... by asking an owner for a new account.
    pub password: String,
}

/// People of the tenant.
#[utoipa::path(get, path = "/v1/users", tag = "people", security(("bearer" = [])),
    responses((status = 200, body = Vec<User>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn list_users(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Vec<User>>> {
    principal.require(Role::Owner)?;
    principal.require_unscoped()?;
    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT id, email, role, created_at FROM users WHERE tenant_id = $1 ORDER BY email",
    )
    .bind(&principal.tenant_id)
    .fetch_all(&state.db.pool)
    .await?;
    rows.into_iter()
        .map(|(id, email, role, created_at)| {
            Ok(User {
                id,
                email,
                role: Role::parse(&role).ok_or_else(ApiError::internal)?,
                created_at,
            })
        })
        .collect::<ApiResult<Vec<_>>>()
        .map(Json)
}

/// Add a person; the answer carries their generated password, once.
#[utoipa::path(post, path = "/v1/users", tag = "people", security(("bearer" = [])), request_body = NewUser,
    responses((status = 201, body = CreatedUser), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_user(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(request): ApiJson<NewUser>,
) -> ApiResult<(StatusCode, Json<CreatedUser>)> {
    principal.require(Role::Owner)?;
    principal.require_unscoped()?;
    validate_email(&request.email)?;
    let password = auth::generate_password();
    let hash = auth::hash_password(password.clone()).await?;
    let user = User {
        id: new_id("us"),
        email: request.email,
        role: request.role,
        created_at: now_ms(),
    };
    let mut tx = state.db.pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO users (id, tenant_id, email, password_hash, role, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&user.id)
    .bind(&principal.tenant_id)
    .bind(&user.email)
    .bind(&hash)
    .bind(user.role.as_str())
    .bind(user.created_at)
    .execute(&mut *tx)
    .await;
    match inserted {
        Err(err) if is_unique_violation(&err) => {
            return Err(ApiError::conflict(
                "a person with this email exists already",
            ))
        }
        other => other?,
    };
    audit::record(
        &mut *tx,
        &principal,
        "user.create",
        &user.id,
        serde_json::json!({"email": user.email, "role": user.role}),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(CreatedUser { user, password })))
}

/// Remove a person, end their sessions and revoke the API keys they made.
#[utoipa::path(delete, path = "/v1/users/{id}", tag = "people", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_user(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    principal.require(Role::Owner)?;
    principal.require_unscoped()?;
    if principal.actor == format!("user:{id}") {
        return Err(ApiError::conflict("you cannot remove yourself"));
    }
    let mut tx = state.db.pool.begin().await?;
    let owners: Vec<(String,)> =
        sqlx::query_as("SELECT id FROM users WHERE tenant_id = $1 AND role = 'owner'")
            .bind(&principal.tenant_id)
            .fetch_all(&mut *tx)
            .await?;
    if owners.len() == 1 && owners[0].0 == id {
        return Err(ApiError::conflict(
            "this is the tenant's last owner; make another owner first",
        ));
    }
    sqlx::query("DELETE FROM login_sessions WHERE user_id = $1 AND tenant_id = $2")
        .bind(&id)
        .bind(&principal.tenant_id)
        .execute(&mut *tx)
        .await?;
    // The keys the person made go with them.
    sqlx::query(
        "UPDATE api_keys SET revoked_at = $1 WHERE created_by = $2 AND tenant_id = $3 AND revoked_at IS NULL",
    )
    .bind(now_ms())
    .bind(format!("user:{id}"))
    .bind(&principal.tenant_id)
    .execute(&mut *tx)
    .await?;
    let deleted = sqlx::query("DELETE FROM users WHERE id = $1 AND tenant_id = $2")
        .bind(&id)
        .bind(&principal.tenant_id)
        .execute(&mut *tx)
        .await?;
    if deleted.rows_affected() == 0 {
        return Err(ApiError::not_found("person"));
    }
    audit::record(
        &mut *tx,
        &principal,
        "user.delete",
        &id,
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub site_id: Option<String>,
    /// `key=value`: the key sees only gateways carrying this label.
    pub label: Option<String>,
    pub created_by: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct NewApiKey {
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
    /// At most the caller's own role.
    pub role: Role,
    /// Days until the key stops working (1..=3650); absent: no expiry.
    #[schema(minimum = 1, maximum = 3650)]
    #[serde(default, deserialize_with = "crate::api::whole_u32_opt")]
    pub expires_in_days: Option<u32>,
    /// Limit the key to the gateways of one site.
    pub site_id: Option<String>,
    /// Limit the key to gateways carrying this label, `key=value`.
    #[schema(pattern = "^[^=]+=.+$")]
    pub label: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedApiKey {
    pub key: ApiKey,
    /// Shown once: send as `Authorization: Bearer <secret>`.
    pub secret: String,
}

type KeyRow = (
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    i64,
    Option<i64>,
    Option<i64>,
);

fn key_from_row(row: KeyRow) -> ApiResult<ApiKey> {
    let (
        id,
        name,
        role,
        site_id,
        label_key,
        label_value,
        created_by,
        created_at,
        expires_at,
        revoked_at,
    ) = row;
    Ok(ApiKey {
        id,
        name,
        role: Role::parse(&role).ok_or_else(ApiError::internal)?,
        site_id,
        label: label_key.zip(label_value).map(|(k, v)| format!("{k}={v}")),
        created_by,
        created_at,
        expires_at,
        revoked_at,
    })
}

/// The tenant's API keys (never their secrets).
#[utoipa::path(get, path = "/v1/api-keys", tag = "people", security(("bearer" = [])),
    responses((status = 200, body = Vec<ApiKey>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn list_keys(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Vec<ApiKey>>> {
    principal.require(Role::Owner)?;
    principal.require_unscoped()?;
    let rows: Vec<KeyRow> = sqlx::query_as(
        "SELECT id, name, role, site_id, label_key, label_value, created_by, created_at, expires_at, revoked_at \
         FROM api_keys WHERE tenant_id = $1 ORDER BY created_at, id",
    )
    .bind(&principal.tenant_id)
    .fetch_all(&state.db.pool)
    .await?;
    rows.into_iter()
        .map(key_from_row)
        .collect::<ApiResult<Vec<_>>>()
        .map(Json)
}

/// Make an API key, optionally expiring and limited to a site or label; the secret is in the
/// answer, once.
#[utoipa::path(post, path = "/v1/api-keys", tag = "people", security(("bearer" = [])), request_body = NewApiKey,
    responses((status = 201, body = CreatedApiKey), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn create_key(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(request): ApiJson<NewApiKey>,
) -> ApiResult<(StatusCode, Json<CreatedApiKey>)> {
    principal.require(Role::Owner)?;
    principal.require_unscoped()?;
    if request.name.is_empty() || request.name.chars().count() > 100 {
        return Err(ApiError::bad_request("a key name is 1-100 characters"));
    }
    if request.role > principal.role {
        return Err(ApiError::forbidden(
            "a key cannot have more rights than its maker",
        ));
    }
    let label = match &request.label {
        None => None,
        Some(text) => Some(
            text.split_once('=')
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| ApiError::bad_request("label must be key=value"))?,
        ),
    };
    if let Some(site_id) = &request.site_id {
        crate::fleet::site_exists(&state.db, &principal.tenant_id, site_id).await?;
    }
    let now = now_ms();
    let expires_at = match request.expires_in_days {
        None => None,
        Some(days @ 1..=3650) => Some(now + i64::from(days) * 86_400_000),
        Some(_) => return Err(ApiError::bad_request("expires_in_days is 1..=3650")),
    };
    let id = new_id("ak");
    let secret = auth::new_api_key(&id);
    let mut tx = state.db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, name, secret_hash, role, site_id, label_key, label_value, \
         created_by, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&id)
    .bind(&principal.tenant_id)
    .bind(&request.name)
    .bind(secret_hash(&secret))
    .bind(request.role.as_str())
    .bind(&request.site_id)
    .bind(label.as_ref().map(|(k, _)| k.clone()))
    .bind(label.as_ref().map(|(_, v)| v.clone()))
    .bind(&principal.actor)
    .bind(now)
    .bind(expires_at)
    .execute(&mut *tx)
    .await?;
    audit::record(&mut *tx, &principal, "api_key.create", &id,
        serde_json::json!({"name": request.name, "role": request.role, "site_id": request.site_id, "label": request.label})).await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiKey {
            key: ApiKey {
                id,
                name: request.name,
                role: request.role,
                site_id: request.site_id,
                label: request.label,
                created_by: principal.actor,
                created_at: now,
                expires_at,
                revoked_at: None,
            },
            secret,
        }),
    ))
}

/// Revoke an API key at once.
#[utoipa::path(delete, path = "/v1/api-keys/{id}", tag = "people", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn revoke_key(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    principal.require(Role::Owner)?;
    principal.require_unscoped()?;
    if principal.actor == format!("key:{id}") {
        return Err(ApiError::conflict(
            "a key cannot revoke itself; use another key or a login session",
        ));
    }
    let mut tx = state.db.pool.begin().await?;
    let revoked = sqlx::query(
        "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND tenant_id = $3 AND revoked_at IS NULL",
    )
    .bind(now_ms())
    .bind(&id)
    .bind(&principal.tenant_id)
    .execute(&mut *tx)
    .await?;
    if revoked.rows_affected() == 0 {
        return Err(ApiError::not_found("API key"));
    }
    audit::record(
        &mut *tx,
        &principal,
        "api_key.revoke",
        &id,
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
