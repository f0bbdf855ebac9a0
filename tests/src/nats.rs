//! A private `nats-server` with JetStream.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use tempfile::TempDir;

use crate::process::{find_binary, free_port, wait_for_port, ServerProcess};
use crate::{io, Result, START_TIMEOUT};

/// A `nats-server` with JetStream (file storage in a temporary directory) on a free port.
/// Killed and deleted on drop.
#[derive(Debug)]
pub struct Nats {
    process: ServerProcess,
    port: u16,
    binary: PathBuf,
    dir: TempDir,
}

impl Nats {
    /// Starts the server and waits until it accepts connections.
    pub fn start() -> Result<Self> {
        let binary = find_binary("nats-server", &[])?;
        let dir = tempfile::Builder::new()
            .prefix("liftwire-nats-")
            .tempdir()
            .map_err(io("creating the NATS data directory"))?;
        let mut last = None;
        // The port is free when we look; another process may grab it before the server binds.
        for _ in 0..5 {
            let port = free_port()?;
            match Self::spawn(&binary, dir.path(), port) {
                Ok(process) => {
                    return Ok(Self {
                        process,
                        port,
                        binary,
                        dir,
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| crate::Error::Client {
            what: "starting nats-server",
            detail: "no attempt made".into(),
        }))
    }

    fn spawn(binary: &PathBuf, dir: &std::path::Path, port: u16) -> Result<ServerProcess> {
        let config = dir.join("nats.conf");
        let store = dir.join("jetstream");
        std::fs::write(
            &config,
            format!(
                "server_name: liftwire_test\nlisten: \"127.0.0.1:{port}\"\nmax_payload: 1MB\njetstream {{\n  store_dir: {store:?}\n  max_memory_store: 256MB\n  max_file_store: 1GB\n}}\n"
            ),
        )
        .map_err(io("writing nats.conf"))?;
        let mut cmd = Command::new(binary);
        cmd.arg("--config").arg(&config);
        let mut process = ServerProcess::spawn(cmd, &dir.join("nats.log"), None, libc::SIGTERM)?;
        wait_for_port(
            "nats-server",
            &mut process,
            SocketAddr::from(([127, 0, 0, 1], port)),
            START_TIMEOUT,
        )?;
        Ok(process)
    }

    /// Client URL, e.g. `nats://127.0.0.1:34567`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connected client.
    pub async fn client(&self) -> Result<async_nats::Client> {
        async_nats::connect(self.url())
            .await
            .map_err(|e| crate::Error::Client {
                what: "connecting to the test nats-server",
                detail: e.to_string(),
            })
    }

    /// Stops the server (as on SIGTERM); JetStream data stays in the data directory.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Starts the server again on the same port with the same data (after [`Nats::stop`]).
    pub fn restart(&mut self) -> Result<()> {
        self.process.stop();
        self.process = Self::spawn(&self.binary, self.dir.path(), self.port)?;
        Ok(())
    }
}
