//! Real servers for liftwire's integration tests.
//!
//! Each fixture starts its own server process on a free loopback port with a private temporary
//! data directory, and kills it and deletes the directory when dropped. Servers also die with the
//! test process if it is killed (`PR_SET_PDEATHSIG`), so a crashed test run leaves no orphans.
//! Tests can therefore run in parallel without sharing any state:
//!
//! * [`Nats`]: `nats-server` with JetStream;
//! * [`Postgres`]: a private PostgreSQL cluster (copied from a cached `initdb` template) with a
//!   fresh database;
//! * [`S3`]: an `s3s-fs` server (real SigV4 and presigned-URL checks) with a fresh bucket.
//!
//! A missing server binary is reported as [`Error::Missing`], naming `deploy/setup.sh`, which
//! installs them.

mod nats;
mod postgres;
pub mod process;
mod s3;

pub use nats::Nats;
pub use postgres::Postgres;
pub use s3::S3;

use std::time::Duration;

/// Why a test server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A server binary is not installed.
    #[error("{binary} not found ({looked}); install it with `deploy/setup.sh`")]
    Missing {
        /// The binary that is missing.
        binary: &'static str,
        /// Where it was looked for.
        looked: String,
    },
    /// Spawning or preparing the server failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The server did not become ready in time.
    #[error("{server} did not become ready within {timeout:?}; its log ends with:\n{log_tail}")]
    NotReady {
        /// Which server.
        server: &'static str,
        /// How long we waited.
        timeout: Duration,
        /// The last lines of its log.
        log_tail: String,
    },
    /// Talking to the started server failed.
    #[error("{what}: {detail}")]
    Client {
        /// What was being done.
        what: &'static str,
        /// The client's error.
        detail: String,
    },
}

/// Result of the test kit.
pub type Result<T> = std::result::Result<T, Error>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// How long a server may take to start before the fixture gives up.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
