//! Who is calling: people (argon2id passwords, login sessions), API keys (scoped, expiring,
//! stored hashed, shown once), their roles, and the [`Principal`] extractor every API handler
//! takes. Failed logins are rate limited per account and per source address.
//!
//! Every handler scopes its queries to `principal.tenant_id` and answers 404 for objects of
//! other tenants; [`Principal::require`] checks the role and [`Principal::sees_gateway`] the
//! key's site/label scope.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::db::now_ms;
use crate::error::ApiError;
use crate::ids::{random_hex, secret_hash};
use crate::AppState;

/// What a person or key may do. Roles are cumulative: owner ⊃ operator ⊃ installer ⊃ viewer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads the fleet, series and readings.
    Viewer,
    /// Also creates sites and enrollment tokens.
    Installer,
    /// Also changes and decommissions gateways.
    Operator,
    /// Also manages people, API keys and reads the audit log.
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Installer => "installer",
            Role::Operator => "operator",
            Role::Owner => "owner",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "viewer" => Some(Role::Viewer),
            "installer" => Some(Role::Installer),
            "operator" => Some(Role::Operator),
            "owner" => Some(Role::Owner),
            _ => None,
        }
    }
}

/// A key's limit to part of the fleet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// Only gateways of this site.
    pub site_id: Option<String>,
    /// Only gateways carrying this label (`key=value`).
    pub label: Option<(String, String)>,
}

impl Scope {
    pub fn is_unlimited(&self) -> bool {
        self.site_id.is_none() && self.label.is_none()
    }
}

/// An authenticated caller of the `/v1` API.
#[derive(Clone, Debug)]
pub struct Principal {
    pub tenant_id: String,
    /// `user:<id>` or `key:<id>`, as written to the audit log.
    pub actor: String,
    pub role: Role,
    pub scope: Scope,
    pub source_ip: String,
}

impl Principal {
    /// Refuse with 403 unless the caller's role is at least `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this needs the {} role; the caller has {}",
                role.as_str(),
                self.role.as_str()
            )))
        }
    }

    /// Refuse with 403 unless the caller is unscoped (keys limited to a site or label cannot
    /// manage tenant-wide objects).
    pub fn require_unscoped(&self) -> Result<(), ApiError> {
        if self.scope.is_unlimited() {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "this API key is limited to part of the fleet",
            ))
        }
    }

    /// Whether a gateway of this site with these labels is inside the caller's scope.
    pub fn sees_gateway(&self, site_id: &str, labels: &HashMap<String, String>) -> bool {
        if let Some(site) = &self.scope.site_id {
            if site != site_id {
                return false;
            }
        }
        if let Some((key, value)) = &self.scope.label {
            if labels.get(key) != Some(value) {
                return false;
            }
        }
        true
    }
}

const SESSION_PREFIX: &str = "fgs_";
const KEY_PREFIX: &str = "fgk_";
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// A new login-session token (returned to the person once; stored as its hash).
pub fn new_session_token() -> String {
    format!("{SESSION_PREFIX}{}", random_hex(32))
}

/// A new API key secret: `fgk_<key id>_<secret>`; the id lets the key be found, only the hash of
/// the whole is stored.
pub fn new_api_key(key_id: &str) -> String {
    format!("{KEY_PREFIX}{key_id}.{}", random_hex(32))
}

fn api_key_id(token: &str) -> Option<&str> {
    token
        .strip_prefix(KEY_PREFIX)?
        .split_once('.')
        .map(|(id, _)| id)
}

/// Hash a password with argon2id (on a blocking thread: it takes tens of milliseconds).
pub async fn hash_password(password: String) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::encode_b64(random_hex(16).as_bytes())
            .map_err(|e| anyhow::anyhow!("salt: {e}"))?;
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))
    })
    .await?
}

/// Check a password against its stored argon2id hash (on a blocking thread).
pub async fn verify_password(password: String, hash: String) -> bool {
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash)
            .map(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

/// A password strong enough to hand out once: 24 characters from 62.
pub fn generate_password() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut rng = rand::rng();
    (0..24)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Refuses logins after repeated failures: per account and per source address, `max_failures`
/// within `window` lock the account (or address) out until the window has passed.
#[derive(Debug)]
pub struct LoginLimiter {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
    max_failures: u32,
    window: Duration,
}

impl LoginLimiter {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self {
            failures: Mutex::new(HashMap::new()),
            max_failures,
            window,
        }
    }

    /// Seconds to wait if any of `keys` is locked out.
    pub fn locked_for(&self, keys: &[String]) -> Option<u64> {
        let now = Instant::now();
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        keys.iter()
            .filter_map(|key| failures.get(key))
            .filter(|(count, since)| {
                *count >= self.max_failures && now.duration_since(*since) < self.window
            })
            .map(|(_, since)| (self.window - now.duration_since(*since)).as_secs() + 1)
            .max()
    }

    pub fn record_failure(&self, keys: &[String]) {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.retain(|_, (_, since)| now.duration_since(*since) < self.window);
        for key in keys {
            let entry = failures.entry(key.clone()).or_insert((0, now));
            entry.0 += 1;
        }
    }

    pub fn record_success(&self, account_key: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(account_key);
    }
}

/// The caller's address, as the connection saw it.
pub fn source_ip(parts: &Parts) -> String {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]))
        .to_string()
}

fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or_else(|| {
            ApiError::unauthorized("send `Authorization: Bearer <session token or API key>`")
        })?;
        let source_ip = source_ip(parts);
        let now = now_ms();
        let hash = secret_hash(token);
        if token.starts_with(SESSION_PREFIX) {
            let row: Option<(String, String, String)> = sqlx::query_as(
                "SELECT s.tenant_id, u.id, u.role FROM login_sessions s \
                 JOIN users u ON u.id = s.user_id AND u.tenant_id = s.tenant_id \
                 WHERE s.token_hash = $1 AND s.expires_at > $2",
            )
            .bind(&hash)
            .bind(now)
            .fetch_optional(&state.db.pool)
            .await?;
            let (tenant_id, user_id, role) =
                row.ok_or_else(|| ApiError::unauthorized("the session is unknown or expired"))?;
            return Ok(Principal {
                tenant_id,
                actor: format!("user:{user_id}"),
                role: Role::parse(&role).ok_or_else(ApiError::internal)?,
                scope: Scope::default(),
                source_ip,
            });
        }
        let key_id = api_key_id(token)
            .ok_or_else(|| ApiError::unauthorized("the token is not a session or an API key"))?;
        type KeyRow = (
            String,
            String,
            String,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let row: Option<KeyRow> = sqlx::query_as(
            "SELECT tenant_id, secret_hash, role, site_id, label_key, label_value FROM api_keys \
             WHERE id = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2)",
        )
        .bind(key_id)
        .bind(now)
        .fetch_optional(&state.db.pool)
        .await?;
        let Some((tenant_id, stored_hash, role, site_id, label_key, label_value)) = row else {
            return Err(ApiError::unauthorized(
                "the API key is unknown, revoked or expired",
            ));
        };
        if !constant_time_eq(stored_hash.as_bytes(), hash.as_bytes()) {
            return Err(ApiError::unauthorized(
                "the API key is unknown, revoked or expired",
            ));
        }
        Ok(Principal {
            tenant_id,
            actor: format!("key:{key_id}"),
            role: Role::parse(&role).ok_or_else(ApiError::internal)?,
            scope: Scope {
                site_id,
                label: label_key.zip(label_value),
            },
            source_ip,
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Owner > Role::Operator);
        assert!(Role::Operator > Role::Installer);
        assert!(Role::Installer > Role::Viewer);
        for role in [Role::Viewer, Role::Installer, Role::Operator, Role::Owner] {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
    }

    #[test]
    fn api_key_ids_are_found_in_the_token() {
        let token = new_api_key("ak_0123");
        assert_eq!(api_key_id(&token), Some("ak_0123"));
        assert_eq!(api_key_id("fgk_nodot"), None);
        assert_eq!(api_key_id("other"), None);
    }

    #[test]
    fn login_limiter_locks_after_max_failures_and_forgets_success() {
        let limiter = LoginLimiter::new(3, Duration::from_secs(60));
        let keys = vec!["acct".to_string(), "ip".to_string()];
        for _ in 0..2 {
            limiter.record_failure(&keys);
        }
        assert_eq!(limiter.locked_for(&keys), None);
        limiter.record_failure(&keys);
        assert!(limiter.locked_for(&keys).unwrap() <= 61);
        limiter.record_success("acct");
        // The address stays locked: someone is guessing from it.
        assert!(limiter.locked_for(&["ip".to_string()]).is_some());
        assert_eq!(limiter.locked_for(&["acct".to_string()]), None);
    }

    #[tokio::test]
    async fn passwords_verify_only_themselves() {
        let hash = hash_password("correct horse".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse".into(), hash.clone()).await);
        assert!(!verify_password("wrong".into(), hash).await);
    }
}
