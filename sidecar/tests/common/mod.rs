//! A real `tidecached`, started on a socket in a temporary directory and
//! killed when dropped.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Sidecar {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Sidecar {
    pub fn start(args: &[&str]) -> Sidecar {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("tidecached.sock");
        Self::start_at(dir, socket, args)
    }

    pub fn start_at(dir: tempfile::TempDir, socket: PathBuf, args: &[&str]) -> Sidecar {
        Self::start_at_with_env(dir, socket, args, &[])
    }

    /// [`Sidecar::start_at`] with extra environment variables.
    pub fn start_at_with_env(dir: tempfile::TempDir, socket: PathBuf, args: &[&str], env: &[(&str, &str)]) -> Sidecar {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidecached"));
        cmd.envs(env.iter().copied());
        cmd.arg("serve").arg("--socket").arg(&socket).args(args);
        if !args.contains(&"--cache-file") {
            // Beside the socket, not in /dev/shm: removed with the directory.
            cmd.arg("--cache-file").arg(dir.path().join("cache.arena"));
        }
        if !args.contains(&"--memory-mb") {
            cmd.args(["--memory-mb", "16"]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("tidecached.log"))
            .expect("log file");
        let child = cmd
            .env("RUST_LOG", "info")
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start tidecached");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "tidecached did not come up");
            std::thread::sleep(Duration::from_millis(10));
        }
        Sidecar { child, socket, dir }
    }

    /// Kills it (SIGKILL) and keeps the directory.
    pub fn kill(mut self) -> (tempfile::TempDir, PathBuf) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (dir, self.socket.clone())
    }

    /// What it logged so far (every run in this directory).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tidecached.log")).unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().map(|s| s.is_none()).unwrap_or(false)
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A store of revision `(oid, serial)` loaded at `view`.
pub fn item(oid: u64, serial: u64, end: Option<u64>, view: u64, state: &[u8]) -> tidecache_client::protocol::StoreItem {
    tidecache_client::protocol::StoreItem {
        oid,
        serial,
        end,
        view,
        state: state.to_vec(),
    }
}

/// Attaches `db` at `last` as the Python adapter does (invariant 7): when
/// the sidecar asks for a proof of its horizon `H`, `serial_at(oid, H)`
/// (the storage's `loadBefore(oid, H + 1)` serial) answers it, and
/// `committed_at(H)` says whether the storage has a transaction at `H`; a
/// failed proof flushes the database. Returns the final state and horizon.
pub fn attach_proving(
    c: &tidecache_client::Client,
    db: &str,
    last: u64,
    serial_at: impl Fn(u64, u64) -> Option<u64>,
    committed_at: impl Fn(u64) -> bool,
) -> Result<(tidecache_client::protocol::AttachState, u64), tidecache_client::ClientError> {
    use tidecache_client::protocol::AttachState;
    let (state, horizon) = c.attach(db, last, None)?;
    let AttachState::Prove { witness, open_sample } = &state else {
        return Ok((state, horizon));
    };
    let h = horizon;
    let proved = witness.iter().all(|&oid| serial_at(oid, h) == Some(h))
        && (!witness.is_empty() || committed_at(h))
        && open_sample.iter().all(|&(oid, s)| serial_at(oid, h) == Some(s));
    if proved {
        c.attach(db, last, Some(h))
    } else {
        c.flush(db)?;
        c.attach(db, last, None)
    }
}

/// A storage's history, as tests keep it: every oid's serials, ascending.
pub struct History(pub std::collections::BTreeMap<u64, Vec<u64>>);

impl History {
    /// `loadBefore(oid, view + 1)`: the revision visible at `view`,
    /// `(serial, end)`.
    pub fn visible(&self, oid: u64, view: u64) -> Option<(u64, Option<u64>)> {
        let s = self.0.get(&oid)?;
        let i = s.partition_point(|&x| x <= view).checked_sub(1)?;
        Some((s[i], s.get(i + 1).copied()))
    }

    /// Every change in `(from, to]`, `(oid, tid)`, in tid order: an exact
    /// invalidation report.
    pub fn changes(&self, from: u64, to: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = self
            .0
            .iter()
            .flat_map(|(&o, s)| s.iter().filter(|&&t| t > from && t <= to).map(move |&t| (o, t)))
            .collect();
        out.sort_by_key(|&(o, t)| (t, o));
        out
    }
}
