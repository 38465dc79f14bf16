//! A client forked while another thread of the parent is inside a call
//! (a catch-up or ZEO thread mid-report in a gunicorn `--preload` master):
//! the child must never wait on the lock that thread holds.
//!
//! Alone in its file: the test forks, and a forked child of a test binary
//! must not meet locks held by other tests' threads.

mod common;

use common::Sidecar;
use std::io::Read;
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};
use tidecache_client::protocol::{read_frame_len, AttachState};
use tidecache_client::{Client, ClientConfig, Session};

/// Exit codes of the child.
const CHILD_OK: i32 = 0;
const CHILD_ATTACH_FAILED: i32 = 2;
const CHILD_STATS_FAILED: i32 = 3;
const CHILD_SESSION_FAILED: i32 = 4;

/// Waits for `pid` at most `bound`; kills it on overrun. Returns its exit
/// code, or `None` if it had to be killed.
fn wait_bounded(pid: libc::pid_t, bound: Duration) -> Option<i32> {
    let deadline = Instant::now() + bound;
    loop {
        let mut status = 0;
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(r >= 0, "waitpid: {}", std::io::Error::last_os_error());
        if r == pid {
            assert!(libc::WIFEXITED(status), "the child died abnormally: status {status:#x}");
            return Some(libc::WEXITSTATUS(status));
        }
        if Instant::now() > deadline {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            unsafe { libc::waitpid(pid, &mut status, 0) };
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_child_forked_while_a_parent_thread_is_inside_a_call_does_not_wait_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tidecached.sock");
    // A fake sidecar that accepts, reads the request and never answers.
    let fake = UnixListener::bind(&socket).unwrap();
    let mut config = ClientConfig::new(&socket);
    config.timeout = Duration::from_secs(60);
    config.retry_after = Duration::from_millis(1);
    let client = std::sync::Arc::new(Client::new(config.clone()));
    let session = std::sync::Arc::new(Session::new(config, "db"));
    let blocked = {
        let client = client.clone();
        std::thread::spawn(move || client.stats())
    };
    let (mut held, _) = fake.accept().unwrap();
    // The client's Hello arrived: the thread is inside the call, holding the
    // client's lock, waiting for an answer that never comes.
    let n = read_frame_len(&mut held).unwrap();
    let mut hello = vec![0u8; n];
    held.read_exact(&mut hello).unwrap();
    // A real sidecar takes the fake's place for the child's calls.
    drop(fake);
    std::fs::remove_file(&socket).unwrap();
    let sidecar = Sidecar::start_at(dir, socket, &[]);
    // The session's store queue runs in the parent before the fork (a
    // session stores only once joined: it starts the database's log at 5).
    assert!(matches!(session.attach(5, None), Ok(AttachState::Started)));
    assert!(session.store_later(1, 5, None, b"parent".to_vec(), 5));

    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // The child: only async-signal-safe exits, no test harness.
        // The horizon is 5, which this history (the parent's) holds.
        let code = match client.attach("db", 5, Some(5)) {
            Ok((AttachState::Started | AttachState::Joined, _)) => match client.stats() {
                Ok(s) if s.databases.contains_key("db") => {
                    let ok = session.attach(5, Some(5)).is_ok()
                        && session.store_later(2, 5, None, b"child".to_vec(), 5)
                        && session.wait_for_stores(Duration::from_secs(5))
                        && session.lookup(5, vec![2]).is_ok_and(|r| r[0].is_some());
                    if ok {
                        CHILD_OK
                    } else {
                        CHILD_SESSION_FAILED
                    }
                }
                _ => CHILD_STATS_FAILED,
            },
            _ => CHILD_ATTACH_FAILED,
        };
        unsafe { libc::_exit(code) };
    }
    let code = wait_bounded(pid, Duration::from_secs(20));
    // Unblock the parent's thread: the fake sidecar hangs up.
    drop(held);
    let parent = blocked.join().unwrap();
    assert!(parent.is_err(), "the fake sidecar never answered the parent");
    assert_eq!(
        code,
        Some(CHILD_OK),
        "the child (None: hung on a lock of the parent's and was killed)"
    );
    drop(sidecar);
}
