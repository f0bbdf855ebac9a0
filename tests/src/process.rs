//! Spawning server processes that cannot outlive the test, and finding their binaries.

#![allow(unsafe_code)]

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

/// A free TCP port on 127.0.0.1 (the kernel picks it; we release it for the server to take).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("binding a free port"))?;
    let port = listener
        .local_addr()
        .map_err(io("reading the free port"))?
        .port();
    Ok(port)
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

/// Waits until `addr` accepts TCP connections, the process dies, or `timeout` passes.
pub fn wait_for_port(
    server: &'static str,
    process: &mut ServerProcess,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
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
