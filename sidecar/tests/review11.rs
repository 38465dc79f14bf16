//! Review of issue 11's operator surface (`check`, `clean`, the metrics
//! endpoint, the client's connect): each test is a defect the review
//! found, seen failing before its fix.

mod common;

use common::Sidecar;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidecache_client::{Client, ClientConfig, ClientError};

fn tidecached(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidecached"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tidecached")
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// A listening Unix socket that never accepts, its backlog full: what a
/// stopped sidecar (`SIGSTOP`, `docker pause`) turns into once its
/// clients' retries have filled the backlog. The filling connections are
/// kept open.
struct FullBacklog {
    _listener: UnixListener,
    _queued: Vec<std::os::fd::OwnedFd>,
}

fn full_backlog(path: &Path) -> FullBacklog {
    use std::os::fd::FromRawFd;
    let listener = UnixListener::bind(path).unwrap();
    // SAFETY: listen again on a listening socket: a backlog of 0.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    let mut queued = Vec::new();
    loop {
        // SAFETY: a new non-blocking socket, owned at once.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
        assert!(fd >= 0);
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: a valid descriptor and address.
        let r = unsafe { libc::connect(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::EAGAIN), "{e}");
            break;
        }
        queued.push(fd);
        assert!(queued.len() < 64, "the backlog does not fill");
    }
    FullBacklog {
        _listener: listener,
        _queued: queued,
    }
}

/// `check --timeout-ms` bounds the connect too: a sidecar that stopped
/// accepting gets `error: ...` and exit 1, not a health check that hangs
/// (`connect(2)` on a full backlog waits without bound). Before the fix
/// the check never returned.
#[test]
fn check_of_a_sidecar_that_stopped_accepting_ends_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("stopped.sock");
    let _stopped = full_backlog(&socket);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidecached"))
        .args([
            os("check"),
            os("--socket"),
            socket.as_os_str(),
            os("--timeout-ms"),
            os("200"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tidecached check still waits on a sidecar that stopped accepting");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1));
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(out.starts_with("error: ") && out.contains("connect"), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
}

/// The application's client too (invariant 8: faults degrade to misses):
/// its call against a sidecar that stopped accepting is `Unavailable`
/// after its timeout; before the fix the connect hung, holding the
/// client's lock, so every thread of the worker waited.
#[test]
fn a_client_call_to_a_sidecar_that_stopped_accepting_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("stopped.sock");
    let _stopped = full_backlog(&socket);
    let (tx, rx) = std::sync::mpsc::channel();
    let path = socket.clone();
    std::thread::spawn(move || {
        let mut config = ClientConfig::new(&path);
        config.timeout = Duration::from_millis(100);
        let result = Client::new(config).stats();
        let _ = tx.send(result.map(|_| ()));
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Err(ClientError::Unavailable { reason, .. })) => assert!(reason.contains("connect"), "{reason}"),
        Ok(other) => panic!("expected Unavailable, got {other:?}"),
        Err(_) => panic!("the client's call still waits on a sidecar that stopped accepting"),
    }
}

/// The metrics endpoint's bound on a connection is a deadline: a client
/// that trickles its request a byte at a time (each read well inside the
/// per-read timeout) is cut off after `CONNECTION_TIMEOUT`, and the next
/// scrape is answered. Before the fix it held the (one) metrics thread
/// for as long as it trickled: up to 8192 bytes, 5 s each.
#[test]
fn a_trickling_metrics_client_does_not_hold_the_endpoint() {
    let sc = Sidecar::start(&["--metrics-listen", "127.0.0.1:0"]);
    let log = sc.log();
    let at = log.find("metrics served at http://").expect("metrics address logged") + 25;
    let addr = log[at..].split('/').next().unwrap().to_owned();

    let done = Arc::new(AtomicBool::new(false));
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.write_all(b"G").unwrap();
    let stop = done.clone();
    let trickler = std::thread::spawn(move || {
        // Until the server closes the connection, or the test ends.
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(250));
            if slow.write_all(b"E").is_err() {
                return true;
            }
        }
        false
    });

    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    done.store(true, Ordering::Relaxed);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200 OK"),
        "the scrape got {answer:?}: the trickling client held the endpoint"
    );
    assert!(answer.contains("tidecache_"), "{answer}");
    let _ = trickler.join();
}

/// `clean --cache-file LINK`, LINK a symlink to an unused arena: the
/// arena is removed (and named), not only the link. Before the fix the
/// link was unlinked, `removed LINK (16 MiB)` printed, and the 16 MiB
/// arena stayed, with its LIVE word cleared and its lock file gone.
#[test]
fn clean_through_a_symlink_removes_the_arena() {
    let sc = Sidecar::start(&[]);
    let (dir, _socket) = sc.kill();
    let arena = dir.path().join("cache.arena");
    let link = dir.path().join("link.arena");
    std::os::unix::fs::symlink(&arena, &link).unwrap();
    let out = tidecached(&[os("clean"), os("--cache-file"), link.as_os_str()]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!arena.exists(), "the arena is still there after: {said}");
    assert!(!dir.path().join("cache.arena.lock").exists());
    let real = std::fs::canonicalize(dir.path()).unwrap().join("cache.arena");
    assert!(said.contains(&real.display().to_string()), "{said}");
}

/// A start refused because the arena is in use under another name (a
/// hard link) changes nothing: before the fix it left
/// `<hard link>.lock` behind, and so did `clean` refused the same way.
#[test]
fn a_refusal_by_hard_link_leaves_no_lock_file() {
    let sc = Sidecar::start(&[]);
    let arena = sc.dir.path().join("cache.arena");
    let other_dir = tempfile::tempdir().unwrap();
    let hard = other_dir.path().join("hard.arena");
    std::fs::hard_link(&arena, &hard).unwrap();
    let lock = other_dir.path().join("hard.arena.lock");

    let out = tidecached(&[os("clean"), os("--cache-file"), hard.as_os_str()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!lock.exists(), "clean refused but left {}", lock.display());

    let socket = other_dir.path().join("second.sock");
    let out = tidecached(&[
        os("serve"),
        os("--socket"),
        socket.as_os_str(),
        os("--cache-file"),
        hard.as_os_str(),
        os("--memory-mb"),
        os("16"),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!lock.exists(), "a refused start left {}", lock.display());
    assert!(!socket.exists());
    drop(sc);
}

/// A start killed while allocating its arena (a service manager's start
/// timeout, `kill`) leaves `<cache-file>.new-<pid>`, empty or as large as
/// the arena. Before the fix nothing ever removed it: not the next start,
/// not `clean` ("no file at ...: nothing to remove"). Now both do, under
/// the arena's lock.
#[test]
fn the_unfinished_arena_file_of_a_killed_start_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let arena = dir.path().join("cache.arena");
    let dead = dir.path().join("cache.arena.new-4194304");
    let unrelated = dir.path().join("cache.arena.new-notapid");
    std::fs::write(&dead, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&unrelated, b"keep").unwrap();

    let out = tidecached(&[os("clean"), os("--cache-file"), arena.as_os_str()]);
    assert!(out.status.success(), "{out:?}");
    assert!(!dead.exists(), "clean left {}", dead.display());
    assert!(unrelated.exists());

    std::fs::write(&dead, vec![0u8; 1 << 20]).unwrap();
    let socket = dir.path().join("tidecached.sock");
    let sc = Sidecar::start_at(dir, socket, &[]);
    assert!(!dead.exists(), "a start left {}", dead.display());
    assert!(unrelated.exists());
    drop(sc);
}

/// A sidecar stopped (SIGTERM) after its socket file was removed by hand
/// and a second sidecar started on the same path leaves the second one's
/// socket alone. Before the fix it removed the path, whatever was there
/// now: the running sidecar became unreachable.
#[test]
fn a_stopping_sidecar_removes_only_its_own_socket() {
    let first = Sidecar::start(&[]);
    std::fs::remove_file(&first.socket).unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let second = Sidecar::start_at(other_dir, first.socket.clone(), &[]);
    // SAFETY: signalling a child process of this test.
    assert_eq!(unsafe { libc::kill(first.child.id() as i32, libc::SIGTERM) }, 0);
    let mut first = first;
    let deadline = Instant::now() + Duration::from_secs(20);
    while first.alive() {
        assert!(Instant::now() < deadline, "the first sidecar did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        second.socket.exists(),
        "the stopping sidecar removed the second one's socket"
    );
    let out = tidecached(&[os("check"), os("--socket"), second.socket.as_os_str()]);
    assert!(out.status.success(), "{out:?}");
}

/// An arena file owned by another user is never re-attached: its owner
/// can write it whenever it likes, so what it plants would be served to
/// every worker (the default arena's name in the world-writable /dev/shm
/// is predictable: any local user could create it before the sidecar
/// starts). Before the fix a root sidecar re-attached a file owned by
/// `nobody`. Needs root to give the file away; skipped otherwise.
#[test]
fn an_arena_owned_by_another_user_is_refused() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to chown a file to another user");
        return;
    }
    let sc = Sidecar::start(&[]);
    let (dir, socket) = sc.kill();
    let arena = dir.path().join("cache.arena");
    let lock = dir.path().join("cache.arena.lock");
    let _ = std::fs::remove_file(&lock);
    std::os::unix::fs::chown(&arena, Some(65534), None).unwrap();
    let before = std::fs::read(&arena).unwrap();
    // Spawned, bounded: a sidecar that accepts the file serves for ever.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidecached"))
        .args([
            os("serve"),
            os("--socket"),
            socket.as_os_str(),
            os("--cache-file"),
            arena.as_os_str(),
        ])
        .args(["--memory-mb", "16"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the sidecar re-attached an arena owned by another user and serves it");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1));
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("owned by uid 65534"), "{err}");
    assert_eq!(std::fs::read(&arena).unwrap(), before, "the refused file was changed");
    assert!(!lock.exists(), "a refused start left {}", lock.display());
}
