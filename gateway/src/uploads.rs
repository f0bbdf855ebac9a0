//! Device uploads without files on the bus: a device asks on its `upload-request` topic, the
//! gateway answers on its `upload-grant` topic with an object reference and a presigned PUT URL
//! for S3-compatible storage; the device uploads directly, and messages only ever carry the
//! reference.

use std::time::{Duration, SystemTime};

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::presigning::PresigningConfig;
use liftwire_proto::naming::{validate_id, Audience, Downlink, DownlinkKind};
use liftwire_proto::{timestamp, v1, Message};
use serde::Deserialize;

use crate::session::Incoming;

/// `[uploads]`: where devices upload files.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadsConfig {
    /// S3 endpoint, e.g. `http://127.0.0.1:8014` (path-style addressing is used).
    pub endpoint: String,
    /// Region the store expects.
    #[serde(default = "default_region")]
    pub region: String,
    /// Bucket for device uploads.
    pub bucket: String,
    /// Access key of the gateway.
    pub access_key: String,
    /// Secret key of the gateway.
    pub secret_key: String,
    /// Lifetime of a presigned URL.
    #[serde(with = "humantime_serde", default = "default_ttl")]
    pub url_ttl: Duration,
    /// Largest file a device may upload.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
}

impl std::fmt::Debug for UploadsConfig {
    /// Never prints the secret key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadsConfig")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .field("url_ttl", &self.url_ttl)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

fn default_region() -> String {
    "us-east-1".into()
}

fn default_ttl() -> Duration {
    Duration::from_secs(15 * 60)
}

fn default_max_bytes() -> u64 {
    100 * 1024 * 1024
}

/// Issues presigned upload URLs.
#[derive(Clone, Debug)]
pub struct Uploads {
    client: aws_sdk_s3::Client,
    config: UploadsConfig,
}

/// Why a request is refused (sent back to the device in `UploadGrant.error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Larger than `max_bytes`.
    #[error("too_large")]
    TooLarge,
    /// The declared SHA-256 is not 32 bytes.
    #[error("bad_sha256")]
    BadDigest,
    /// The declared content type is not a media type (`type/subtype`, printable ASCII, at most
    /// 255 bytes): it could not be sent as a header.
    #[error("bad_content_type")]
    BadContentType,
    /// Presigning failed.
    #[error("unavailable")]
    Unavailable,
}

/// True for a content type that can be signed and sent as a header.
fn valid_content_type(content_type: &str) -> bool {
    content_type.len() <= 255
        && content_type.contains('/')
        && content_type.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// Longest lifetime SigV4 allows a presigned URL.
pub const MAX_URL_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why `[uploads]` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UploadsError {
    /// `url_ttl` is zero or longer than SigV4 allows ([`MAX_URL_TTL`]): every grant would fail.
    #[error("uploads.url_ttl must be more than 0 and at most 7 days, not {0:?}")]
    UrlTtl(Duration),
}

impl Uploads {
    /// A presigner for `config`; refuses a configuration no grant could be made with.
    pub fn new(config: UploadsConfig) -> Result<Self, UploadsError> {
        if config.url_ttl.is_zero() || config.url_ttl > MAX_URL_TTL {
            return Err(UploadsError::UrlTtl(config.url_ttl));
        }
        let s3 = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .endpoint_url(&config.endpoint)
            .force_path_style(true)
            .credentials_provider(Credentials::new(
                &config.access_key,
                &config.secret_key,
                None,
                None,
                "liftwire-gateway",
            ))
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        Ok(Self {
            client: aws_sdk_s3::Client::from_conf(s3),
            config,
        })
    }

    /// The grant (or refusal) for an accepted `upload-request`, and the subject to publish it on.
    pub async fn answer(&self, incoming: &Incoming, seq: u64) -> Option<(String, v1::Downlink)> {
        let envelope = v1::Envelope::decode(incoming.payload.as_ref()).ok()?;
        let Some(v1::envelope::Body::UploadRequest(request)) = envelope.body else {
            return None;
        };
        let grant = match self.presign(incoming, seq, &request).await {
            Ok(target) => v1::UploadGrant {
                request_id: request.request_id.clone(),
                target: Some(target),
                error: String::new(),
            },
            Err(refusal) => v1::UploadGrant {
                request_id: request.request_id.clone(),
                target: None,
                error: refusal.to_string(),
            },
        };
        let subject = Downlink {
            building: incoming.identity.building.clone(),
            audience: Audience::Device(incoming.identity.device.clone()),
            kind: DownlinkKind::UploadGrant,
        }
        .nats_subject();
        let message = v1::Downlink {
            message_id: format!("{}:{seq}:upload", incoming.identity.device),
            issued_at: Some(timestamp(SystemTime::now())),
            body: Some(v1::downlink::Body::UploadGrant(grant)),
        };
        Some((subject, message))
    }

    async fn presign(
        &self,
        incoming: &Incoming,
        seq: u64,
        request: &v1::UploadRequest,
    ) -> Result<v1::ObjectRef, Refusal> {
        if request.size > self.config.max_bytes {
            return Err(Refusal::TooLarge);
        }
        if request.sha256.len() != 32 {
            return Err(Refusal::BadDigest);
        }
        // The key is built from authenticated facts only; the device's free text is sanitised.
        let purpose = if validate_id(&request.purpose).is_ok() {
            request.purpose.as_str()
        } else {
            "file"
        };
        let key = format!(
            "uploads/{}/{}/{seq}-{purpose}",
            incoming.identity.building, incoming.identity.device
        );
        let content_type = if request.content_type.is_empty() {
            "application/octet-stream"
        } else {
            request.content_type.as_str()
        };
        if !valid_content_type(content_type) {
            return Err(Refusal::BadContentType);
        }
        // Within bounds: checked in [`Uploads::new`].
        let presigning =
            PresigningConfig::expires_in(self.config.url_ttl).map_err(|_| Refusal::Unavailable)?;
        let presigned = self
            .client
            .put_object()
            .bucket(&self.config.bucket)
            .key(&key)
            .content_type(content_type)
            // Signed: the store refuses a body of any other length than the one granted.
            .content_length(i64::try_from(request.size).map_err(|_| Refusal::TooLarge)?)
            .presigned(presigning)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "presigning an upload failed");
                Refusal::Unavailable
            })?;
        Ok(v1::ObjectRef {
            bucket: self.config.bucket.clone(),
            key,
            size: request.size,
            sha256: request.sha256.clone(),
            content_type: content_type.to_owned(),
            presigned: Some(v1::PresignedUrl {
                url: presigned.uri().to_owned(),
                method: "PUT".into(),
                expires_at: Some(timestamp(SystemTime::now() + self.config.url_ttl)),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url_ttl: Duration) -> UploadsConfig {
        UploadsConfig {
            endpoint: "http://127.0.0.1:1".into(),
            region: default_region(),
            bucket: "b".into(),
            access_key: "a".into(),
            secret_key: "s".into(),
            url_ttl,
            max_bytes: default_max_bytes(),
        }
    }

    #[test]
    fn a_url_lifetime_sigv4_cannot_sign_is_refused_at_start() {
        for ttl in [Duration::ZERO, MAX_URL_TTL + Duration::from_secs(1)] {
            assert!(
                matches!(Uploads::new(config(ttl)), Err(UploadsError::UrlTtl(t)) if t == ttl),
                "{ttl:?}"
            );
        }
        assert!(Uploads::new(config(MAX_URL_TTL)).is_ok());
        assert!(Uploads::new(config(default_ttl())).is_ok());
    }
}
