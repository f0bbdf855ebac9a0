//! Connecting to NATS and declaring the contract's JetStream streams.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use liftwire_proto::naming::{StreamSpec, DEAD_LETTER_STREAM, PRESENCE_STREAM, UPLINK_STREAM};
use serde::Deserialize;

/// `[nats]` settings shared by every binary that talks to NATS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// Optional `.creds` file (NATS decentralized auth).
    pub credentials_file: Option<std::path::PathBuf>,
    /// How long one connection attempt may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Messages buffered by the client while disconnected (publishes beyond it fail fast).
    pub client_capacity: usize,
    /// JetStream storage for the contract's streams (`file` in production).
    pub stream_storage: StreamStorage,
    /// Replicas of the contract's streams (1 for a single server, 3 for a cluster).
    pub stream_replicas: usize,
    /// How long JetStream remembers each `Nats-Msg-Id` to drop a re-published duplicate. The
    /// server keeps one entry per message for this long (uplink rate × window: 1.2 million at
    /// 10k msg/s for 2 min), so a longer window costs its memory and garbage collection; a
    /// duplicate older than the window is stored again and dropped by the consumers, which
    /// de-duplicate on the device's sequence number anyway.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// How long `LW_UPLINK` keeps a message (`0s`: for ever). The stream is the buffer between
    /// the devices and the telemetry service, so this is the longest telemetry outage it
    /// absorbs; older messages are removed, read or not (a device still holding one resends
    /// it, see ARCHITECTURE.md, "Losslessness"). Disk needed: uplink rate × this × ~400 bytes.
    /// `LW_PRESENCE` (presence changes, far fewer) keeps its messages as long.
    #[serde(with = "humantime_serde")]
    pub uplink_max_age: Duration,
    /// How long `LW_DLQ` keeps a dead letter for inspection (`0s`: for ever).
    #[serde(with = "humantime_serde")]
    pub dead_letter_max_age: Duration,
}

/// Where JetStream keeps stream data.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StreamStorage {
    /// On disk: survives a server restart.
    #[default]
    File,
    /// In memory: for throwaway setups only.
    Memory,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            credentials_file: None,
            connect_timeout: Duration::from_secs(5),
            client_capacity: 65_536,
            stream_storage: StreamStorage::File,
            stream_replicas: 1,
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            uplink_max_age: DEFAULT_UPLINK_MAX_AGE,
            dead_letter_max_age: DEFAULT_DEAD_LETTER_MAX_AGE,
        }
    }
}

impl NatsConfig {
    /// How long `spec`'s stream keeps a message: the configured age for the uplink and
    /// dead-letter streams, for ever (zero) for the others (`LW_RETAINED` keeps the latest
    /// message per subject however old it is).
    pub fn max_age(&self, spec: &StreamSpec) -> Duration {
        if *spec == UPLINK_STREAM || *spec == PRESENCE_STREAM {
            self.uplink_max_age
        } else if *spec == DEAD_LETTER_STREAM {
            self.dead_letter_max_age
        } else {
            Duration::ZERO
        }
    }
}

/// Why NATS could not be reached or set up.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// Reading the credentials file failed.
    #[error("cannot read NATS credentials {path}: {source}")]
    Credentials {
        /// The configured file.
        path: std::path::PathBuf,
        /// I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The first connection failed.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// The configured URL.
        url: String,
        /// Client error.
        #[source]
        source: async_nats::ConnectError,
    },
    /// A stream could not be created or updated.
    #[error("cannot declare JetStream stream {stream}: {source}")]
    Stream {
        /// Stream name.
        stream: &'static str,
        /// JetStream error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stream would forget messages before it stops recognising their duplicates.
    #[error(
        "stream {stream}: max age {max_age:?} is shorter than nats.duplicate_window \
         {duplicate_window:?}"
    )]
    MaxAgeBelowDuplicateWindow {
        /// Stream name.
        stream: &'static str,
        /// Its configured max age.
        max_age: Duration,
        /// The configured duplicate window.
        duplicate_window: Duration,
    },
}

/// Connects to NATS as `client_name`. The client reconnects by itself after the first
/// connection; the first one is retried until it succeeds, so binaries can start before NATS.
pub async fn connect(
    config: &NatsConfig,
    client_name: &str,
) -> Result<async_nats::Client, NatsError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(client_name)
        .connection_timeout(config.connect_timeout)
        .client_capacity(config.client_capacity)
        .retry_on_initial_connect()
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                other => tracing::info!(event = %other, "NATS client event"),
            }
        });
    if let Some(path) = &config.credentials_file {
        options =
            options
                .credentials_file(path)
                .await
                .map_err(|source| NatsError::Credentials {
                    path: path.clone(),
                    source,
                })?;
    }
    options
        .connect(config.url.as_str())
        .await
        .map_err(|source| NatsError::Connect {
            url: config.url.clone(),
            source,
        })
}

/// Default [`NatsConfig::duplicate_window`]: NATS's own default, well beyond the gateway's
/// publish retries (their backoff tops out at 5 s).
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(2 * 60);

/// Default [`NatsConfig::uplink_max_age`]: a week, so a telemetry outage over a long weekend
/// loses nothing from the stream.
pub const DEFAULT_UPLINK_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Default [`NatsConfig::dead_letter_max_age`]: 30 days to look into rejected messages.
pub const DEFAULT_DEAD_LETTER_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Creates `spec`'s stream, or updates it to the contract's settings if it exists.
pub async fn ensure_stream(
    js: &jetstream::Context,
    spec: &StreamSpec,
    config: &NatsConfig,
) -> Result<stream::Stream, NatsError> {
    let max_age = config.max_age(spec);
    if !max_age.is_zero() && max_age < config.duplicate_window {
        return Err(NatsError::MaxAgeBelowDuplicateWindow {
            stream: spec.name,
            max_age,
            duplicate_window: config.duplicate_window,
        });
    }
    let wanted = stream::Config {
        name: spec.name.to_owned(),
        description: Some(spec.description.to_owned()),
        subjects: spec.subjects.iter().map(|s| (*s).to_owned()).collect(),
        storage: match config.stream_storage {
            StreamStorage::File => stream::StorageType::File,
            StreamStorage::Memory => stream::StorageType::Memory,
        },
        num_replicas: config.stream_replicas,
        duplicate_window: config.duplicate_window,
        max_age,
        max_messages_per_subject: spec.max_msgs_per_subject,
        ..Default::default()
    };
    let err = |source: Box<dyn std::error::Error + Send + Sync>| NatsError::Stream {
        stream: spec.name,
        source,
    };
    match js.get_stream(spec.name).await {
        Ok(_) => {
            js.update_stream(&wanted)
                .await
                .map_err(|e| err(Box::new(e)))?;
            js.get_stream(spec.name).await.map_err(|e| err(Box::new(e)))
        }
        Err(_) => js.create_stream(wanted).await.map_err(|e| err(Box::new(e))),
    }
}
