//! Bearer-token authentication (JWT) and the building scope of each principal.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use liftwire_proto::naming::BuildingId;
use serde::{Deserialize, Serialize};

use crate::problem::ApiError;
use crate::AppState;

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, in every building.
    Admin,
    /// Read the buildings listed in the token.
    Manager,
    /// Like a manager, and may acknowledge alerts and send device commands in those buildings.
    Technician,
}

/// The claims liftwire reads from a token.
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
            leeway: Duration::from_secs(30),
        }
    }
}

/// Why the authenticator could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// No verification key is configured.
    #[error("no token verification key: set auth.hs256_secret")]
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

/// Verifies tokens.
#[derive(Clone)]
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
}

impl Authenticator {
    /// Builds the verifier from the configuration.
    pub fn new(config: &AuthConfig) -> Result<Self, AuthSetupError> {
        let secret = config
            .hs256_secret
            .as_deref()
            .ok_or(AuthSetupError::NoKey)?;
        if secret.len() < 32 {
            return Err(AuthSetupError::WeakSecret);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = config.leeway.as_secs();
        Ok(Self {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        })
    }

    /// Verifies `token` and returns its principal.
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        use jsonwebtoken::errors::ErrorKind;
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
                ApiError::Unauthenticated(match e.kind() {
                    ErrorKind::ExpiredSignature => "token expired",
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

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or(ApiError::Unauthenticated("missing bearer token"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthenticated(
                "authorization is not a bearer token",
            ))?;
        state.auth.verify(token.trim())
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
