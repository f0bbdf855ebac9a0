//! Spawning server processes that cannot outlive the test, and finding their binaries.

#![allow(unsafe_code)]

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::{io, Error, Result};

/// Finds `binary` on `PATH` or in the extra directories.
pub fn find_binary(binary: &'static str, extra_dirs: &[PathBuf]) -> Result<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let dirs: Vec<PathBuf> = path_dirs
        .into_iter()
        .chain(extra_dirs.iter().cloned())
        .collect();
    dirs.iter()
        .map(|d| d.join(binary))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| Error::Missing {
            binary,
            looked: format!("searched PATH and {extra_dirs:?}"),
        })
}

/// Ports [`free_port`] has handed out in this process.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A free TCP port on 127.0.0.1 (the kernel picks it; we release it for the server to take),
/// never one handed out before in this process: a server a test stops and restarts on its port
/// keeps it free of the other tests' servers in between.
pub fn free_port() -> Result<u16> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    // Listeners on ports already handed out stay bound until we have a new one, so that the
    // kernel does not pick them again.
    let mut held = Vec::new();
    for _ in 0..64 {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(io("binding a free port"))?;
        let port = listener
            .local_addr()
            .map_err(io("reading the free port"))?
            .port();
        if handed_out.insert(port) {
            return Ok(port);
        }
        held.push(listener);
    }
    Err(Error::Client {
        what: "finding a free port",
        detail: format!(
            "64 ports in a row had been handed out already ({} in all)",
            handed_out.len()
        ),
    })
}

/// Whether `pid` holds a socket listening on `port` (any address, IPv4 or IPv6: a dual-stack
/// listener answers on 127.0.0.1 too). `None` when this cannot tell: `/proc` is not readable or
/// lists no listener on the port.
fn listens_on(pid: u32, port: u16) -> Option<bool> {
    let suffix = format!(":{port:04X}");
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(table) = std::fs::read_to_string(table) else {
            continue;
        };
        // Columns: sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode.
        inodes.extend(table.lines().skip(1).filter_map(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            (columns.len() > 9 && columns[1].ends_with(&suffix) && columns[3] == "0A")
                .then(|| format!("socket:[{}]", columns[9]))
        }));
    }
    if inodes.is_empty() {
        return None;
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            inodes
                .iter()
                .any(|inode| target.as_os_str() == inode.as_str())
        })
    }))
}

/// A server child process, killed (and reaped) on drop.
#[derive(Debug)]
pub struct ServerProcess {
    child: Option<Child>,
    /// Signal sent first on drop; SIGKILL follows if it does not exit in time.
    stop_signal: libc::c_int,
    log: PathBuf,
}

impl ServerProcess {
    /// Spawns `cmd` with stdout/stderr appended to `log`, optionally as `uid`/`gid`, and arranges
    /// for it to receive SIGKILL if the test process dies first.
    pub fn spawn(
        mut cmd: Command,
        log: &Path,
        run_as: Option<(u32, u32)>,
        stop_signal: libc::c_int,
    ) -> Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io(format!("opening {}", log.display())))?;
        let err = out.try_clone().map_err(io("duplicating the log handle"))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        if let Some((uid, gid)) = run_as {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent. It runs
            // after the uid change (which would otherwise reset the death signal).
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .map_err(io(format!("spawning {:?}", cmd.get_program())))?;
        Ok(Self {
            child: Some(child),
            stop_signal,
            log: log.to_owned(),
        })
    }

    /// The process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops the server: `stop_signal`, up to 10 s to exit, then SIGKILL.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill() only sends a signal to our own, not yet reaped, child.
            unsafe {
                libc::kill(pid, self.stop_signal);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `process` accepts TCP connections on `addr`, dies, or `timeout` passes. A
/// connection accepted by another process (one that took the port first) does not count: the
/// server then fails to bind and exits, and the error says so.
pub fn wait_for_port(
    server: &'static str,
    process: &mut ServerProcess,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            let ours = process
                .id()
                .and_then(|pid| listens_on(pid, addr.port()))
                .unwrap_or(true);
            if ours {
                return Ok(());
            }
        }
        if process.exited() || Instant::now() > deadline {
            return Err(Error::NotReady {
                server,
                timeout,
                log_tail: process.log_tail(20),
            });
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The uid/gid to run a server as when it refuses to run as root (PostgreSQL): the `postgres`
/// user if it exists, else `nobody`. `None` when we are not root.
pub fn unprivileged_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let lookup = |name: &str| {
        passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() > 3 && fields[0] == name)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
    };
    lookup("postgres")
        .or_else(|| lookup("nobody"))
        .or(Some((65534, 65534)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_server_names_the_install_script() {
        let err =
            find_binary("liftwire-no-such-server", &[PathBuf::from("/nonexistent")]).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("liftwire-no-such-server"), "{message}");
        assert!(message.contains("deploy/setup.sh"), "{message}");
    }

    #[test]
    fn free_ports_are_bindable() {
        let port = free_port().unwrap();
        assert_ne!(port, 0);
        TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
    }
}
