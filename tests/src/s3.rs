//! A private S3-compatible server (`s3s-fs`) with a fresh bucket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use tempfile::TempDir;

use crate::process::{find_binary, free_port, wait_for_port, ServerProcess};
use crate::{io, Error, Result, START_TIMEOUT};

/// Region the test server and clients agree on.
pub const REGION: &str = "us-east-1";

/// An `s3s-fs` server on a free port, storing into a temporary directory, with one fresh
/// bucket. It verifies SigV4 and presigned signatures for real. Killed and deleted on drop.
#[derive(Debug)]
pub struct S3 {
    _process: ServerProcess,
    port: u16,
    access_key: String,
    secret_key: String,
    bucket: String,
    _dir: TempDir,
}

impl S3 {
    /// Starts the server and creates the bucket [`S3::bucket`].
    pub async fn start() -> Result<Self> {
        let cargo_bin = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
            .map(|p| p.join("bin"));
        let binary = find_binary("s3s-fs", cargo_bin.as_slice())?;
        let dir = tempfile::Builder::new()
            .prefix("liftwire-s3-")
            .tempdir()
            .map_err(io("creating the S3 data directory"))?;
        let root = dir.path().join("data");
        std::fs::create_dir(&root).map_err(io("creating the S3 root"))?;
        let access_key = format!("AK{}", uuid::Uuid::new_v4().simple());
        let secret_key = format!("SK{}", uuid::Uuid::new_v4().simple());
        let mut last = None;
        for _ in 0..5 {
            let port = free_port()?;
            let mut cmd = Command::new(&binary);
            cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", &access_key, "--secret-key", &secret_key])
                .arg(&root);
            let mut process =
                ServerProcess::spawn(cmd, &dir.path().join("s3.log"), None, libc::SIGTERM)?;
            match wait_for_port(
                "s3s-fs",
                &mut process,
                SocketAddr::from(([127, 0, 0, 1], port)),
                START_TIMEOUT,
            ) {
                Ok(()) => {
                    let s3 = Self {
                        _process: process,
                        port,
                        access_key,
                        secret_key,
                        bucket: format!("test-{}", uuid::Uuid::new_v4().simple()),
                        _dir: dir,
                    };
                    s3.client()
                        .create_bucket()
                        .bucket(&s3.bucket)
                        .send()
                        .await
                        .map_err(|e| Error::Client {
                            what: "creating the test bucket",
                            detail: format!("{:?}", e.into_service_error()),
                        })?;
                    return Ok(s3);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Client {
            what: "starting s3s-fs",
            detail: "no attempt made".into(),
        }))
    }

    /// Endpoint URL, e.g. `http://127.0.0.1:34567`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The fixture's bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Access key accepted by the server.
    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    /// Secret key accepted by the server.
    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// A client signing with the server's credentials (path-style addressing).
    pub fn client(&self) -> aws_sdk_s3::Client {
        self.client_with_secret(&self.secret_key)
    }

    /// A client signing with another secret: every request it makes must be refused.
    pub fn client_with_secret(&self, secret_key: &str) -> aws_sdk_s3::Client {
        let config = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(self.endpoint())
            .force_path_style(true)
            .credentials_provider(Credentials::new(
                &self.access_key,
                secret_key,
                None,
                None,
                "liftwire-testkit",
            ))
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }
}
