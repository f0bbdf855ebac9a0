//! A simulated in-cabin screen: it shows the content published for it (or for its whole
//! building), fetching media only through the presigned URL in each object reference, never
//! from the bus, and acknowledges "content X version V displayed at T".

use std::collections::HashMap;
use std::time::SystemTime;

use liftwire_proto::naming::DeviceId;
use liftwire_proto::{timestamp, v1, SCHEMA_VERSION};
use sha2::{Digest, Sha256};

/// Why content could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum ScreenError {
    /// A media reference has no presigned URL.
    #[error("media {0} has no presigned URL")]
    NoUrl(String),
    /// The download failed.
    #[error("fetching media {key}: {source}")]
    Fetch {
        /// Object key.
        key: String,
        /// HTTP error.
        #[source]
        source: reqwest::Error,
    },
    /// The store answered with an error status.
    #[error("fetching media {key}: HTTP {status}")]
    Status {
        /// Object key.
        key: String,
        /// HTTP status.
        status: u16,
    },
    /// Size or digest differ from the reference.
    #[error("media {0} does not match its reference (size or sha256)")]
    Mismatch(String),
}

/// One screen.
#[derive(Debug)]
pub struct Screen {
    device: DeviceId,
    http: reqwest::Client,
    next_seq: u64,
    shown: HashMap<String, u64>,
    acks: Vec<v1::Envelope>,
    /// Media files downloaded (and verified) so far.
    pub media_fetched: u64,
}

impl Screen {
    /// A screen with nothing shown yet.
    pub fn new(device: DeviceId) -> Self {
        Self {
            device,
            http: reqwest::Client::new(),
            next_seq: 1,
            shown: HashMap::new(),
            acks: Vec::new(),
            media_fetched: 0,
        }
    }

    /// The device id.
    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    /// Continues numbering at `seq` (from the outbox).
    pub fn set_next_seq(&mut self, seq: u64) {
        self.next_seq = seq;
    }

    /// Shows `content` unless this version (or a newer one) is already on screen; queues the
    /// acknowledgement.
    pub async fn show(&mut self, content: &v1::ScreenContent) -> Result<(), ScreenError> {
        if self
            .shown
            .get(&content.content_id)
            .is_some_and(|v| *v >= content.version)
        {
            return Ok(());
        }
        for media in &content.media {
            let url = media
                .presigned
                .as_ref()
                .map(|p| p.url.as_str())
                .ok_or_else(|| ScreenError::NoUrl(media.key.clone()))?;
            let fetch = |source| ScreenError::Fetch {
                key: media.key.clone(),
                source,
            };
            let response = self.http.get(url).send().await.map_err(fetch)?;
            if !response.status().is_success() {
                return Err(ScreenError::Status {
                    key: media.key.clone(),
                    status: response.status().as_u16(),
                });
            }
            let bytes = response.bytes().await.map_err(fetch)?;
            if bytes.len() as u64 != media.size
                || Sha256::digest(&bytes).as_slice() != media.sha256.as_slice()
            {
                return Err(ScreenError::Mismatch(media.key.clone()));
            }
            self.media_fetched += 1;
        }
        self.shown
            .insert(content.content_id.clone(), content.version);
        let at = timestamp(SystemTime::now());
        self.acks.push(v1::Envelope {
            schema_version: SCHEMA_VERSION,
            device_id: self.device.to_string(),
            seq: self.next_seq,
            device_time: Some(at),
            body: Some(v1::envelope::Body::ScreenAck(v1::ScreenAck {
                content_id: content.content_id.clone(),
                content_version: content.version,
                displayed_at: Some(at),
            })),
        });
        self.next_seq += 1;
        Ok(())
    }

    /// Acknowledgements produced since the last call.
    pub fn take_acks(&mut self) -> Vec<v1::Envelope> {
        std::mem::take(&mut self.acks)
    }
}
