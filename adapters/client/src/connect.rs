//! Connecting to the sidecar's socket within the call's timeout.
//!
//! `UnixStream::connect` waits without bound when the listener's backlog
//! is full: a sidecar that stopped accepting (`SIGSTOP`, `docker pause`, a
//! frozen cgroup) fills it with the connections its clients keep retrying,
//! and then every connect would hang the application (invariant 8: faults
//! degrade to misses). Linux bounds a Unix socket's connect by the
//! socket's send timeout (`SO_SNDTIMEO`), so it is set before connecting:
//! a full backlog then fails with `EAGAIN` after `timeout`.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A stream connected to the Unix socket at `path`, the connect bounded by
/// `timeout` (at least 1 ms). The stream keeps `timeout` as its write
/// timeout; the caller sets its read timeout.
///
/// # Errors
/// As `connect(2)`: `NotFound`, `ConnectionRefused`, `WouldBlock` (the
/// backlog stayed full for `timeout`), `InvalidInput` (a path too long).
pub(crate) fn connect(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is a valid value to be filled in.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path empty, too long or holding a NUL byte",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket creation; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let stream = UnixStream::from(fd);
    stream.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    loop {
        // SAFETY: a valid descriptor and an initialised address of `len`
        // bytes.
        let r = unsafe {
            libc::connect(
                std::os::fd::AsRawFd::as_raw_fd(&stream),
                std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
                len as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok(stream);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
