//! Bearer-token authentication (JWT) and the building scope of each principal.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use liftwire_proto::naming::BuildingId;
use serde::{Deserialize, Serialize};

use crate::problem::ApiError;
use crate::AppState;

/// What a token lets its holder do.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, in every building.
    Admin,
    /// Read the buildings listed in the token.
    Manager,
    /// Like a manager, and may acknowledge alerts and send device commands in those buildings.
    Technician,
}

/// The claims of a token liftwire signs itself (`liftwire-api mint-token`, development only).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: the user id.
    pub sub: String,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Role of the user.
    pub role: Role,
    /// Buildings the user may see (ignored for admins).
    #[serde(default)]
    pub buildings: Vec<String>,
}

/// What liftwire takes from a verified token. `aud` (a string or an array, as identity providers
/// send it), `iss`, `exp` and `nbf` are checked by the validation, not read here; `iat` is not
/// needed. `sub` and `exp` are required by the validation, which runs after this is read: their
/// defaults only let a token without them be refused as such rather than as malformed.
#[derive(Debug, Deserialize)]
struct VerifiedClaims {
    #[serde(default)]
    sub: String,
    #[serde(default)]
    exp: u64,
    role: Role,
    #[serde(default)]
    buildings: Vec<String>,
}

/// `[auth]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Expected `iss` claim.
    pub issuer: String,
    /// Expected `aud` claim.
    pub audience: String,
    /// Shared HS256 key for development tokens (`liftwire-api mint-token`).
    pub hs256_secret: Option<String>,
    /// JWKS URL of the identity provider (RS256, ES256 or EdDSA keys, picked by `kid`).
    pub jwks_url: Option<String>,
    /// How long fetched keys are trusted before they are fetched again.
    #[serde(with = "humantime_serde")]
    pub jwks_refresh: Duration,
    /// Shortest pause between two fetches of the key set, whatever triggered them (a stale set,
    /// an unknown `kid`) and whether the last one failed.
    #[serde(with = "humantime_serde")]
    pub jwks_min_refetch: Duration,
    /// Clock skew tolerated on `exp`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            issuer: "liftwire-dev".into(),
            audience: "liftwire-api".into(),
            hs256_secret: None,
            jwks_url: None,
            jwks_refresh: Duration::from_secs(300),
            jwks_min_refetch: Duration::from_secs(10),
            leeway: Duration::from_secs(30),
        }
    }
}

/// Why the authenticator could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// No verification key is configured.
    #[error("no token verification key: set auth.jwks_url or auth.hs256_secret")]
    NoKey,
    /// The development secret is too short to be safe.
    #[error("auth.hs256_secret must be at least 32 bytes")]
    WeakSecret,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// User id.
    pub subject: String,
    /// Role.
    pub role: Role,
    /// Buildings in scope (unused for admins).
    pub buildings: BTreeSet<BuildingId>,
    /// When the token expires (seconds since the Unix epoch); long-lived responses end then.
    pub expires_at: u64,
}

impl Principal {
    /// Time left until the token expires (zero if already expired).
    pub fn remaining(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Duration::from_secs(self.expires_at.saturating_sub(now))
    }

    /// Whether the caller may read `building`'s data.
    pub fn may_read(&self, building: &BuildingId) -> bool {
        self.role == Role::Admin || self.buildings.contains(building)
    }

    /// Whether the caller may act on `building` (acknowledge alerts, send commands).
    pub fn may_operate(&self, building: &BuildingId) -> bool {
        match self.role {
            Role::Admin => true,
            Role::Technician => self.buildings.contains(building),
            Role::Manager => false,
        }
    }
}

/// Keys fetched from a JWKS URL, by `kid`.
struct Jwks {
    url: String,
    http: reqwest::Client,
    refresh: Duration,
    min_refetch: Duration,
    keys: tokio::sync::RwLock<JwksKeys>,
    /// Held by the one request fetching the set; the others do not queue behind it when they
    /// have a key already.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct JwksKeys {
    by_kid: HashMap<String, (DecodingKey, Algorithm)>,
    /// Last successful fetch: the keys are fresh for `refresh` after it.
    fetched: Option<Instant>,
    /// Last fetch, successful or not: the next waits `min_refetch` after it.
    attempted: Option<Instant>,
}

fn jwk_algorithm(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Algorithm> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, KeyAlgorithm};
    if let Some(alg) = jwk.common.key_algorithm {
        return match alg {
            KeyAlgorithm::RS256 => Some(Algorithm::RS256),
            KeyAlgorithm::RS384 => Some(Algorithm::RS384),
            KeyAlgorithm::RS512 => Some(Algorithm::RS512),
            KeyAlgorithm::PS256 => Some(Algorithm::PS256),
            KeyAlgorithm::ES256 => Some(Algorithm::ES256),
            KeyAlgorithm::ES384 => Some(Algorithm::ES384),
            KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
            _ => None,
        };
    }
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Some(Algorithm::ES256)
        }
        AlgorithmParameters::OctetKeyPair(_) => Some(Algorithm::EdDSA),
        _ => None,
    }
}

impl Jwks {
    /// Fetches the key set; keys without a `kid` or of an unsupported kind are skipped.
    async fn fetch(&self) -> Result<HashMap<String, (DecodingKey, Algorithm)>, String> {
        let set: jsonwebtoken::jwk::JwkSet = self
            .http
            .get(&self.url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        Ok(set
            .keys
            .iter()
            .filter_map(|jwk| {
                let kid = jwk.common.key_id.clone()?;
                let alg = jwk_algorithm(jwk)?;
                Some((kid, (DecodingKey::from_jwk(jwk).ok()?, alg)))
            })
            .collect())
    }

    /// The key of `kid`, fetching the set when it is stale or does not know `kid`: one fetch at
    /// a time, at most once per `min_refetch` even when fetches fail, so neither unknown ids
    /// nor an identity provider that is down can hammer it or make requests queue. While a set
    /// is being fetched, a request whose key is known uses it as it is.
    async fn key(&self, kid: &str) -> Option<(DecodingKey, Algorithm)> {
        let known = {
            let keys = self.keys.read().await;
            let fresh = keys.fetched.is_some_and(|t| t.elapsed() < self.refresh);
            match keys.by_kid.get(kid) {
                Some(key) if fresh => return Some(key.clone()),
                known => known.cloned(),
            }
        };
        let _fetching = match self.fetching.try_lock() {
            Ok(guard) => guard,
            Err(_) if known.is_some() => return known,
            Err(_) => self.fetching.lock().await,
        };
        let may_fetch = {
            let keys = self.keys.read().await;
            keys.attempted
                .is_none_or(|t| t.elapsed() >= self.min_refetch)
        };
        if may_fetch {
            let fetched = self.fetch().await;
            let mut keys = self.keys.write().await;
            keys.attempted = Some(Instant::now());
            match fetched {
                Ok(by_kid) => {
                    keys.by_kid = by_kid;
                    keys.fetched = keys.attempted;
                }
                Err(e) => tracing::warn!(url = %self.url, error = %e, "fetching the JWKS failed"),
            }
        }
        self.keys.read().await.by_kid.get(kid).cloned()
    }
}

/// Verifies tokens: HS256 with the development secret, or keys of the configured JWKS.
#[derive(Clone)]
pub struct Authenticator {
    hs256: Option<DecodingKey>,
    jwks: Option<Arc<Jwks>>,
    validation: Validation,
}

impl Authenticator {
    /// Builds the verifier from the configuration (the JWKS is fetched on first use).
    pub fn new(config: &AuthConfig) -> Result<Self, AuthSetupError> {
        let hs256 = match config.hs256_secret.as_deref() {
            Some(secret) if secret.len() < 32 => return Err(AuthSetupError::WeakSecret),
            Some(secret) => Some(DecodingKey::from_secret(secret.as_bytes())),
            None => None,
        };
        let jwks = config.jwks_url.as_ref().map(|url| {
            Arc::new(Jwks {
                url: url.clone(),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap_or_default(),
                refresh: config.jwks_refresh,
                min_refetch: config.jwks_min_refetch,
                keys: tokio::sync::RwLock::new(JwksKeys::default()),
                fetching: tokio::sync::Mutex::new(()),
            })
        });
        if hs256.is_none() && jwks.is_none() {
            return Err(AuthSetupError::NoKey);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = config.leeway.as_secs();
        Ok(Self {
            hs256,
            jwks,
            validation,
        })
    }

    /// Verifies `token` and returns its principal.
    pub async fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        use jsonwebtoken::errors::ErrorKind;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| ApiError::Unauthenticated("token is malformed"))?;
        let (key, alg) = match (header.alg, &self.hs256, &self.jwks) {
            (Algorithm::HS256, Some(key), _) => (key.clone(), Algorithm::HS256),
            (_, _, Some(jwks)) if header.alg != Algorithm::HS256 => {
                let kid = header
                    .kid
                    .as_deref()
                    .ok_or(ApiError::Unauthenticated("token has no key id"))?;
                let (key, alg) = jwks.key(kid).await.ok_or(ApiError::Unauthenticated(
                    "token is signed with an unknown key",
                ))?;
                if alg != header.alg {
                    return Err(ApiError::Unauthenticated(
                        "token algorithm does not match its key",
                    ));
                }
                (key, alg)
            }
            _ => return Err(ApiError::Unauthenticated("token algorithm is not accepted")),
        };
        let mut validation = self.validation.clone();
        validation.algorithms = vec![alg];
        let data =
            jsonwebtoken::decode::<VerifiedClaims>(token, &key, &validation).map_err(|e| {
                ApiError::Unauthenticated(match e.kind() {
                    ErrorKind::ExpiredSignature => "token expired",
                    ErrorKind::ImmatureSignature => "token is not valid yet",
                    ErrorKind::InvalidAudience => "token has the wrong audience",
                    ErrorKind::InvalidIssuer => "token has the wrong issuer",
                    ErrorKind::InvalidSignature => "token signature is invalid",
                    ErrorKind::MissingRequiredClaim(_) => "token lacks a required claim",
                    _ => "token is malformed",
                })
            })?;
        let claims = data.claims;
        let buildings = claims
            .buildings
            .into_iter()
            .map(BuildingId::new)
            .collect::<Result<_, _>>()
            .map_err(|_| ApiError::Unauthenticated("token lists an invalid building id"))?;
        Ok(Principal {
            subject: claims.sub,
            role: claims.role,
            buildings,
            expires_at: claims.exp,
        })
    }
}

/// A token bucket per token: `per_second` requests sustained, `burst` at once. Per replica (the
/// API is stateless; the limit scales with replicas, which the ingress should know).
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: std::sync::Mutex<HashMap<String, (f64, Instant)>>,
}

/// Tokens tracked before idle ones are forgotten.
const MAX_TRACKED_TOKENS: usize = 10_000;

impl RateLimiter {
    /// A limiter; `per_second = 0` disables it.
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self {
            per_second,
            burst: f64::from(burst.max(1)),
            buckets: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request for `key` at `now`; `Err(seconds)` to wait when over the limit.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), u64> {
        if self.per_second <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED_TOKENS && !buckets.contains_key(key) {
            let full_after = Duration::from_secs_f64(self.burst / self.per_second);
            buckets.retain(|_, (_, at)| now.saturating_duration_since(*at) < full_after);
        }
        let (tokens, at) = buckets.entry(key.to_owned()).or_insert((self.burst, now));
        let refill = now.saturating_duration_since(*at).as_secs_f64() * self.per_second;
        *tokens = (*tokens + refill).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.per_second).ceil().max(1.0) as u64)
        }
    }
}

/// Signs a development token with the configured HS256 secret.
pub fn mint(
    config: &AuthConfig,
    subject: &str,
    role: Role,
    buildings: &[String],
    ttl: Duration,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let secret = config
        .hs256_secret
        .as_deref()
        .ok_or(AuthSetupError::NoKey)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = Claims {
        sub: subject.into(),
        iss: config.issuer.clone(),
        aud: config.audience.clone(),
        exp: now + ttl.as_secs(),
        iat: now,
        role,
        buildings: buildings.to_vec(),
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// The credentials of a `Bearer` authorization header (the scheme is case-insensitive, RFC 9110).
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or(ApiError::Unauthenticated("missing bearer token"))?;
        let token =
            header
                .to_str()
                .ok()
                .and_then(bearer_token)
                .ok_or(ApiError::Unauthenticated(
                    "authorization is not a bearer token",
                ))?;
        let token = token.trim();
        let principal = state.auth.verify(token).await?;
        // Keyed by the signature: one bucket per token.
        let key = token.rsplit('.').next().unwrap_or(token);
        state
            .limiter
            .check(key, Instant::now())
            .map_err(ApiError::TooManyRequests)?;
        Ok(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(role: Role, buildings: &[&str]) -> Principal {
        Principal {
            subject: "u".into(),
            expires_at: 0,
            role,
            buildings: buildings
                .iter()
                .map(|b| BuildingId::new(*b).unwrap())
                .collect(),
        }
    }

    #[test]
    fn building_scope_by_role() {
        let a = BuildingId::new("a").unwrap();
        let b = BuildingId::new("b").unwrap();
        let manager = principal(Role::Manager, &["a"]);
        assert!(manager.may_read(&a) && !manager.may_read(&b));
        assert!(!manager.may_operate(&a));
        let tech = principal(Role::Technician, &["a"]);
        assert!(tech.may_operate(&a) && !tech.may_operate(&b));
        let admin = principal(Role::Admin, &[]);
        assert!(admin.may_read(&b) && admin.may_operate(&b));
    }

    #[test]
    fn each_token_has_its_own_bucket() {
        let limiter = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check("a", t0).is_ok());
        }
        assert_eq!(limiter.check("a", t0), Err(1), "burst spent");
        assert!(
            limiter.check("b", t0).is_ok(),
            "another token is not affected"
        );
        assert!(
            limiter.check("a", t0 + Duration::from_millis(500)).is_ok(),
            "refilled"
        );
        assert!(limiter.check("a", t0 + Duration::from_millis(500)).is_err());
        assert!(RateLimiter::new(0.0, 0).check("a", t0).is_ok(), "disabled");
    }

    #[test]
    fn weak_or_missing_secrets_are_refused() {
        let mut config = AuthConfig::default();
        assert!(matches!(
            Authenticator::new(&config),
            Err(AuthSetupError::NoKey)
        ));
        config.hs256_secret = Some("short".into());
        assert!(matches!(
            Authenticator::new(&config),
            Err(AuthSetupError::WeakSecret)
        ));
    }
}
