//! A private PostgreSQL cluster per fixture, copied from a cached `initdb` template.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::{free_port, unprivileged_user, wait_for_port, ServerProcess};
use crate::{io, Error, Result, START_TIMEOUT};

/// Superuser of the test clusters (trust authentication on loopback).
pub const SUPERUSER: &str = "liftwire";
/// Database created fresh in every fixture.
pub const DATABASE: &str = "liftwire";

/// A PostgreSQL server with a fresh, empty database, on a free port. Stopped and deleted on
/// drop. Being private to the fixture, it can also be stopped and restarted by the test.
#[derive(Debug)]
pub struct Postgres {
    process: ServerProcess,
    bin: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
    dir: TempDir,
}

fn pg_bin_dir() -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| Some(e.ok()?.path().join("bin")))
                .collect()
        })
        .unwrap_or_default();
    // Newest major version first.
    candidates.sort_by_key(|p| {
        std::cmp::Reverse(
            p.parent()
                .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
                .unwrap_or(0),
        )
    });
    candidates
        .into_iter()
        .find(|bin| bin.join("initdb").is_file() && bin.join("postgres").is_file())
        .ok_or(Error::Missing {
            binary: "PostgreSQL server (initdb, postgres)",
            looked: "searched /usr/lib/postgresql/*/bin".into(),
        })
}

fn chown(path: &Path, run_as: Option<(u32, u32)>) -> Result<()> {
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(io(format!("chown {}", path.display())))?;
    }
    Ok(())
}

/// Returns the cached template cluster, creating it with `initdb` on first use. Concurrent test
/// processes race benignly: each builds into its own directory and the first rename wins.
fn template(bin: &Path, run_as: Option<(u32, u32)>) -> Result<PathBuf> {
    let version = bin
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|v| v.to_str())
        .unwrap_or("pg");
    let root = std::env::temp_dir().join("liftwire-testkit");
    let uid = run_as.map_or_else(|| "self".to_owned(), |(uid, _)| uid.to_string());
    let template = root.join(format!("pg{version}-template-{uid}"));
    if template.join("PG_VERSION").is_file() {
        return Ok(template);
    }
    std::fs::create_dir_all(&root).map_err(io("creating the template root"))?;
    let building = tempfile::Builder::new()
        .prefix("pg-template-building-")
        .tempdir_in(&root)
        .map_err(io("creating the template build directory"))?;
    chown(building.path(), run_as)?;
    let data = building.path().join("data");
    let mut cmd = Command::new(bin.join("initdb"));
    cmd.args(["--no-sync", "--auth=trust", "--encoding=UTF8", "--locale=C"])
        .arg(format!("--username={SUPERUSER}"))
        .arg("-D")
        .arg(&data);
    if let Some((uid, gid)) = run_as {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(gid);
    }
    let out = cmd.output().map_err(io("running initdb"))?;
    if !out.status.success() {
        return Err(Error::Client {
            what: "initdb failed",
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    match std::fs::rename(&data, &template) {
        Ok(()) => Ok(template),
        Err(_) if template.join("PG_VERSION").is_file() => Ok(template),
        Err(e) => Err(io("installing the template cluster")(e)),
    }
}

impl Postgres {
    /// Starts a cluster and creates the empty database [`DATABASE`].
    pub async fn start() -> Result<Self> {
        let bin = pg_bin_dir()?;
        let run_as = unprivileged_user();
        let template = template(&bin, run_as)?;
        let dir = tempfile::Builder::new()
            .prefix("liftwire-pg-")
            .tempdir()
            .map_err(io("creating the PostgreSQL directory"))?;
        chown(dir.path(), run_as)?;
        let status = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(dir.path().join("data"))
            .status()
            .map_err(io("copying the template cluster"))?;
        if !status.success() {
            return Err(Error::Client {
                what: "copying the template cluster",
                detail: format!("cp exited with {status}"),
            });
        }
        let mut last = None;
        for _ in 0..5 {
            let port = free_port()?;
            match Self::spawn(&bin, dir.path(), port, run_as) {
                Ok(process) => {
                    let pg = Self {
                        process,
                        bin,
                        port,
                        run_as,
                        dir,
                    };
                    pg.create_default_database().await?;
                    return Ok(pg);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Client {
            what: "starting PostgreSQL",
            detail: "no attempt made".into(),
        }))
    }

    fn spawn(
        bin: &Path,
        dir: &Path,
        port: u16,
        run_as: Option<(u32, u32)>,
    ) -> Result<ServerProcess> {
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.arg("-D")
            .arg(dir.join("data"))
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "shared_buffers=32MB",
                "-c",
                "max_connections=60",
            ]);
        let log = dir.join("postgres.log");
        // SIGINT is PostgreSQL's "fast shutdown": it rolls back sessions and exits cleanly.
        let mut process = ServerProcess::spawn(cmd, &log, run_as, libc::SIGINT)?;
        chown(&log, run_as)?;
        wait_for_port(
            "PostgreSQL",
            &mut process,
            SocketAddr::from(([127, 0, 0, 1], port)),
            START_TIMEOUT,
        )?;
        Ok(process)
    }

    async fn create_default_database(&self) -> Result<()> {
        let admin = self.url_for("postgres");
        let deadline = Instant::now() + START_TIMEOUT;
        // The port opens slightly before the server accepts sessions.
        let conn = loop {
            match sqlx::PgPool::connect(&admin).await {
                Ok(pool) => break pool,
                Err(e) if Instant::now() > deadline => {
                    return Err(Error::Client {
                        what: "connecting to the test PostgreSQL",
                        detail: e.to_string(),
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let created = sqlx::query(&format!("CREATE DATABASE {DATABASE}"))
            .execute(&conn)
            .await;
        conn.close().await;
        created.map(drop).map_err(|e| Error::Client {
            what: "creating the test database",
            detail: e.to_string(),
        })
    }

    fn url_for(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// URL of the fixture's database.
    pub fn url(&self) -> String {
        self.url_for(DATABASE)
    }

    /// Creates another empty database on this server (for a second owner, e.g. the gateway's
    /// registry beside telemetry's tables) and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String> {
        let admin = sqlx::PgPool::connect(&self.url_for("postgres"))
            .await
            .map_err(|e| Error::Client {
                what: "connecting to the test PostgreSQL",
                detail: e.to_string(),
            })?;
        let created = sqlx::query(&format!("CREATE DATABASE \"{}\"", name.replace('"', "")))
            .execute(&admin)
            .await;
        admin.close().await;
        created.map_err(|e| Error::Client {
            what: "creating a test database",
            detail: e.to_string(),
        })?;
        Ok(self.url_for(name))
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection pool to the fixture's database.
    pub async fn pool(&self) -> Result<sqlx::PgPool> {
        sqlx::PgPool::connect(&self.url())
            .await
            .map_err(|e| Error::Client {
                what: "connecting to the test database",
                detail: e.to_string(),
            })
    }

    /// Stops the server (fast shutdown); the data stays.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Starts the server again on the same port with the same data.
    pub fn restart(&mut self) -> Result<()> {
        self.process.stop();
        self.process = Self::spawn(&self.bin, self.dir.path(), self.port, self.run_as)?;
        Ok(())
    }
}
