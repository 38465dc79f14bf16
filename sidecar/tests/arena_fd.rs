//! The arena handed to clients as a file descriptor (`SCM_RIGHTS` on the
//! `Hello` answer): a client that cannot resolve the arena's path (another
//! container, another mount namespace, a renamed directory) still maps it
//! and hits; a wrong number of descriptors or a descriptor of another file
//! is a miss, never a crash; no descriptor leaks on any path.

mod common;

use common::{item, Sidecar};
use std::io::{IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tidecache_client::protocol::{handoff, read_frame_len, write_frame};
use tidecache_client::{Client, ClientConfig, Local};

/// Tests that count this process's descriptors run one at a time.
static FDS: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    FDS.lock().unwrap_or_else(|p| p.into_inner())
}

fn client(socket: &Path) -> Client {
    let mut c = ClientConfig::new(socket);
    c.retry_after = Duration::from_millis(20);
    c.timeout = Duration::from_secs(2);
    Client::new(c)
}

/// A sidecar whose arena lives in `<dir>/arena/cache.arena`, apart from
/// its socket (`<dir>/tidecached.sock`).
fn sidecar_with_arena_apart() -> (Sidecar, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let arena_dir = dir.path().join("arena");
    std::fs::create_dir(&arena_dir).unwrap();
    let arena = arena_dir.join("cache.arena");
    let socket = dir.path().join("tidecached.sock");
    let sc = Sidecar::start_at(dir, socket, &["--cache-file", arena.to_str().unwrap()]);
    (sc, arena)
}

/// Stores revision (1, 5) = "one" as an open revision at view 10.
fn fill(socket: &Path) {
    let c = client(socket);
    c.attach("db", 10, None).unwrap();
    assert_eq!(c.store("db", vec![item(1, 5, None, 10, b"one")]).unwrap(), (1, 0));
}

/// A new client joins `db` and looks (1, 10) up in its mapped arena.
fn fresh_lookup(socket: &Path) -> Local {
    let c = client(socket);
    let joined = common::attach_proving(&c, "db", 10, |_, _| Some(5), |_| true);
    if joined.is_err() {
        return Local::Unavailable;
    }
    c.lookup_local("db", 1, 10)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Waits (bounded) for this process's descriptors to come back to
/// `baseline` (threads of the proxy below close theirs when the
/// connection ends); returns the last count.
fn settle(baseline: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = open_fds();
        if n <= baseline || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_client_that_cannot_resolve_the_arena_path_maps_the_descriptor_and_hits() {
    let _g = serial();
    let (sc, arena) = sidecar_with_arena_apart();
    fill(&sc.socket);
    // The path is gone for every new client: its directory moved away
    // (the sidecar keeps its mapping, its lock and the descriptor).
    let parent = arena.parent().unwrap();
    std::fs::rename(parent, parent.with_extension("moved")).unwrap();
    assert!(!arena.exists());
    match fresh_lookup(&sc.socket) {
        Local::Hit(f) => assert_eq!(f.state, b"one"),
        Local::Miss => panic!("a miss: the revision was stored"),
        Local::Unavailable => panic!("no arena mapped: the client needed the path"),
    }
}

#[test]
fn connecting_many_times_leaks_no_descriptor() {
    let _g = serial();
    let (sc, _arena) = sidecar_with_arena_apart();
    fill(&sc.socket);
    // One round first: whatever a first connection sets up once (the
    // tracing subscriber, the fork handler) is not counted.
    assert!(matches!(fresh_lookup(&sc.socket), Local::Hit(_)));
    let baseline = open_fds();
    for _ in 0..200 {
        assert!(matches!(fresh_lookup(&sc.socket), Local::Hit(_)));
    }
    assert_eq!(settle(baseline), baseline, "descriptors leaked over 200 connects");
}

/// What the proxy below hands the client with the `Hello` answer in place
/// of the sidecar's descriptor.
#[derive(Clone, Copy)]
enum Handed {
    /// No descriptor (a sidecar of an earlier version).
    Nothing,
    /// The sidecar's descriptor, twice.
    Twice,
    /// The sidecar's descriptor and 15 more (more than the client takes:
    /// its control message is truncated, `MSG_CTRUNC`).
    Many,
    /// A descriptor of another file.
    Other(&'static str),
}

/// A socket in front of the sidecar at `upstream` that forwards everything
/// but the descriptor of the `Hello` answer, for which it hands `handed`.
fn proxy(dir: &Path, upstream: PathBuf, handed: Handed) -> PathBuf {
    let path = dir.join("proxy.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let upstream = upstream.clone();
            std::thread::spawn(move || {
                let _ = forward(client, &upstream, handed);
            });
        }
    });
    path
}

fn forward(mut client: UnixStream, upstream: &Path, handed: Handed) -> std::io::Result<()> {
    let mut server = UnixStream::connect(upstream)?;
    let n = read_frame_len(&mut client)?;
    let mut hello = vec![0u8; n];
    client.read_exact(&mut hello)?;
    write_frame(&mut server, &hello)?;
    let answer = handoff::read_frame_with_fds(&server, 1 << 20).map_err(std::io::Error::other)?;
    let fd = answer.fds.first().expect("the sidecar hands over its arena").as_fd();
    match handed {
        Handed::Nothing => write_frame(&mut client, &answer.body)?,
        Handed::Twice => send_with(&client, &answer.body, &[fd, fd])?,
        Handed::Many => send_with(&client, &answer.body, &[fd; 16])?,
        Handed::Other(path) => {
            let other = std::fs::File::open(path)?;
            send_with(&client, &answer.body, &[other.as_fd()])?;
        }
    }
    drop(answer);
    let (mut c2, mut s2) = (client.try_clone()?, server.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut s2);
        let _ = s2.shutdown(std::net::Shutdown::Both);
    });
    let _ = std::io::copy(&mut server, &mut client);
    let _ = client.shutdown(std::net::Shutdown::Both);
    let _ = up.join();
    Ok(())
}

fn send_with(stream: &UnixStream, body: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(16))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    let sent = sendmsg(stream, &[IoSlice::new(&frame)], &mut control, SendFlags::empty())?;
    (&*stream).write_all(&frame[sent..])
}

/// `handed` in place of the arena's descriptor: what a new client's
/// lookup gives, and whether this process's descriptors came back to
/// their count (proxy included) after 51 such connects.
fn through_proxy(handed: Handed, hide_path: bool) -> (Local, bool) {
    let (sc, arena) = sidecar_with_arena_apart();
    fill(&sc.socket);
    if hide_path {
        let parent = arena.parent().unwrap();
        std::fs::rename(parent, parent.with_extension("moved")).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = proxy(dir.path(), sc.socket.clone(), handed);
    let baseline = open_fds();
    let first = fresh_lookup(&socket);
    for _ in 0..50 {
        let _ = fresh_lookup(&socket);
    }
    let after = settle(baseline);
    if after > baseline {
        for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            eprintln!("{:?} -> {:?}", e.file_name(), std::fs::read_link(e.path()));
        }
        eprintln!("{after} descriptors open, {baseline} before");
    }
    (first, after <= baseline)
}

#[test]
fn without_a_descriptor_the_client_maps_the_path() {
    let _g = serial();
    let (found, no_leak) = through_proxy(Handed::Nothing, false);
    assert!(
        matches!(found, Local::Hit(ref f) if f.state == b"one"),
        "expected a hit from the path"
    );
    assert!(no_leak);
    // And without the path, nothing to map: lookups leave the arena (the
    // client asks the sidecar over the socket instead), never a crash.
    let (found, no_leak) = through_proxy(Handed::Nothing, true);
    assert!(matches!(found, Local::Unavailable));
    assert!(no_leak);
}

#[test]
fn a_wrong_number_of_descriptors_degrades_to_misses_and_leaks_none() {
    let _g = serial();
    for handed in [Handed::Twice, Handed::Many] {
        let (found, no_leak) = through_proxy(handed, false);
        assert!(matches!(found, Local::Unavailable), "the connection must be refused");
        assert!(no_leak, "descriptors leaked");
    }
}

#[test]
fn a_descriptor_of_another_file_is_never_read_as_the_arena() {
    let _g = serial();
    for other in ["/proc/self/exe", "/dev/null"] {
        let (found, no_leak) = through_proxy(Handed::Other(other), false);
        assert!(matches!(found, Local::Unavailable), "{other} mapped as the arena");
        assert!(no_leak, "descriptors leaked");
    }
    // Another sidecar's arena (of another incarnation) is refused too.
    let (other_sc, other_arena) = sidecar_with_arena_apart();
    let leaked: &'static str = Box::leak(other_arena.to_str().unwrap().to_owned().into_boxed_str());
    let (found, no_leak) = through_proxy(Handed::Other(leaked), false);
    assert!(matches!(found, Local::Unavailable), "another sidecar's arena mapped");
    assert!(no_leak);
    drop(other_sc);
}

/// Set for the copy of this test binary started in a mount namespace.
const CHILD_SOCKET: &str = "TIDECACHE_TEST_NAMESPACE_SOCKET";
const CHILD_ARENA: &str = "TIDECACHE_TEST_NAMESPACE_ARENA";

#[test]
fn in_a_mount_namespace_without_the_arena_a_client_still_hits() {
    let _g = serial();
    let probe = tempfile::tempdir().unwrap();
    let usable = std::process::Command::new("unshare")
        .args(["-rm", "sh", "-c", "mount -t tmpfs tmpfs \"$0\""])
        .arg(probe.path())
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !usable {
        eprintln!("skipped: `unshare -rm` cannot mount a tmpfs here (no user or mount namespaces for this user)");
        return;
    }
    let (sc, arena) = sidecar_with_arena_apart();
    fill(&sc.socket);
    // As a container that mounts its own tmpfs where the sidecar's arena
    // directory is: the path resolves to nothing there.
    let out = std::process::Command::new("unshare")
        .args([
            "-rm",
            "sh",
            "-c",
            "mount -t tmpfs tmpfs \"$0\" && exec \"$1\" --exact --ignored --nocapture child_in_a_mount_namespace",
        ])
        .arg(arena.parent().unwrap())
        .arg(std::env::current_exe().unwrap())
        .env(CHILD_SOCKET, &sc.socket)
        .env(CHILD_ARENA, &arena)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child failed: {out:?}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "run by in_a_mount_namespace_without_the_arena_a_client_still_hits, in a mount namespace"]
fn child_in_a_mount_namespace() {
    let socket = PathBuf::from(std::env::var_os(CHILD_SOCKET).expect("started by the namespace test"));
    let arena = PathBuf::from(std::env::var_os(CHILD_ARENA).unwrap());
    assert!(!arena.exists(), "the arena's path must not resolve in this namespace");
    match fresh_lookup(&socket) {
        Local::Hit(f) => assert_eq!(f.state, b"one"),
        Local::Miss => panic!("a miss: the revision was stored"),
        Local::Unavailable => panic!("no arena mapped: the client needed the path"),
    }
}
