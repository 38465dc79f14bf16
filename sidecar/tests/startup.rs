//! Starting `tidecached serve` never damages anything: a second start on a
//! live sidecar, a start that fails (a bad directory, a socket path that is
//! a file, a full /dev/shm), or a `--cache-file` naming some other file
//! leaves every file as it was; and an arena file re-attached after a
//! reboot (pages torn by a power loss) serves only revisions really stored.

mod common;

use common::{item, Sidecar};
use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tidecache_client::{Client, ClientConfig, Local};
use tidecache_core::arena::layout::{header, Geometry, HEADER_WORDS};

fn client(socket: &Path) -> Client {
    let mut c = ClientConfig::new(socket);
    c.retry_after = Duration::from_millis(20);
    c.timeout = Duration::from_secs(2);
    Client::new(c)
}

fn hit(c: &Client, oid: u64, view: u64) -> Option<tidecache_client::protocol::Found> {
    match c.lookup_local("db", oid, view) {
        Local::Hit(f) => Some(f),
        Local::Miss => None,
        Local::Unavailable => panic!("no arena to read"),
    }
}

/// Runs `tidecached serve` with `args` and waits (bounded) for it to exit:
/// every start here must fail.
fn serve_must_fail(args: &[&std::ffi::OsStr]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_tidecached"))
        .arg("serve")
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tidecached");
    let pid = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut child = child;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tidecached {args:?} did not exit (pid {pid})");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("output");
    assert_eq!(out.status.signal(), None, "killed by a signal: {out:?}");
    assert!(!out.status.success(), "a start that must fail succeeded: {out:?}");
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

fn header_bytes(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    bytes[..HEADER_WORDS * 8].to_vec()
}

fn word(bytes: &[u8], i: usize) -> u64 {
    u64::from_ne_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap())
}

#[test]
fn a_second_start_on_a_live_sidecar_changes_nothing() {
    let sc = Sidecar::start(&[]);
    let arena = sc.dir.path().join("cache.arena");
    let c = client(&sc.socket);
    c.attach("db", 10, None).unwrap();
    c.store("db", vec![item(1, 5, Some(8), 10, b"closed")]).unwrap();
    assert_eq!(hit(&c, 1, 7).unwrap().state, b"closed");
    let before = header_bytes(&arena);
    assert_eq!(word(&before, header::LIVE), 1);

    // The same socket and file.
    let out = serve_must_fail(&[
        os("--socket"),
        sc.socket.as_os_str(),
        os("--cache-file"),
        arena.as_os_str(),
        os("--memory-mb"),
        os("16"),
    ]);
    assert!(stderr(&out).contains("another tidecached"), "{out:?}");
    assert!(stderr(&out).contains(&*sc.socket.to_string_lossy()), "{out:?}");
    // ... and says what to do.
    assert!(
        stderr(&out).contains("stop it first, or give this one another --socket"),
        "{out:?}"
    );
    // Another socket, the same file: the lock names the first one's pid.
    let other = sc.dir.path().join("other.sock");
    let out = serve_must_fail(&[
        os("--socket"),
        other.as_os_str(),
        os("--cache-file"),
        arena.as_os_str(),
        os("--memory-mb"),
        os("16"),
    ]);
    let pid = format!("pid {}", sc.child.id());
    assert!(
        stderr(&out).contains("another tidecached") && stderr(&out).contains(&pid),
        "{out:?}"
    );
    assert!(!other.exists(), "the second start bound its socket");

    let after = header_bytes(&arena);
    assert_eq!(word(&after, header::LIVE), 1);
    assert_eq!(word(&after, header::INCARNATION), word(&before, header::INCARNATION));
    assert_eq!(after, before, "the arena header changed");
    // The client that attached before still reads its hits from the arena.
    assert_eq!(hit(&c, 1, 7).unwrap().state, b"closed");
    assert!(c.stats().is_ok());
}

/// The arena file under another name (a symlink to it, a hard link, a
/// symlinked directory) is the same file: a second sidecar on it must be
/// refused as on the same path. Found by the review: the lock was
/// `<name given>.lock`, so a second sidecar re-attached the live arena
/// through a symlink and both wrote it (the first one's clients were
/// served the second one's states, 2999 of 2999 lookups).
#[test]
fn a_second_start_on_the_arena_under_another_name_changes_nothing() {
    let sc = Sidecar::start(&[]);
    let arena = sc.dir.path().join("cache.arena");
    let c = client(&sc.socket);
    c.attach("db", 10, None).unwrap();
    c.store("db", vec![item(1, 5, Some(8), 10, b"closed")]).unwrap();
    let before = header_bytes(&arena);
    let symlink = sc.dir.path().join("symlink.arena");
    std::os::unix::fs::symlink(&arena, &symlink).unwrap();
    let hard = sc.dir.path().join("hard.arena");
    std::fs::hard_link(&arena, &hard).unwrap();
    let linked_dir = sc.dir.path().join("linked-dir");
    std::os::unix::fs::symlink(sc.dir.path(), &linked_dir).unwrap();
    let through_dir = linked_dir.join("cache.arena");
    for (i, name) in [&symlink, &hard, &through_dir].into_iter().enumerate() {
        let other = sc.dir.path().join(format!("other-{i}.sock"));
        let out = serve_must_fail(&[
            os("--socket"),
            other.as_os_str(),
            os("--cache-file"),
            name.as_os_str(),
            os("--memory-mb"),
            os("16"),
        ]);
        assert!(stderr(&out).contains("another tidecached"), "{name:?}: {out:?}");
        assert!(!other.exists(), "the second start bound its socket");
        assert_eq!(header_bytes(&arena), before, "the arena header changed ({name:?})");
    }
    assert_eq!(hit(&c, 1, 7).unwrap().state, b"closed");
}

/// A tmpfs of `size` mounted at a new temporary directory, unmounted when
/// dropped; `None` (with the reason printed) where mounting is not
/// permitted.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            Ok(o) => {
                println!(
                    "SKIPPED: cannot mount a tmpfs: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                println!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect()
}

#[test]
fn a_small_dev_shm_is_a_clear_error_not_a_sigbus() {
    let Some(shm) = Tmpfs::mount("4m") else { return };
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("s.sock");
    let arena = shm.path().join("cache.arena");
    // 1 GiB: its bucket array alone (4 MiB) is more than the mount holds,
    // so a sparse file died of SIGBUS while it was being laid out.
    let out = serve_must_fail(&[
        os("--socket"),
        socket.as_os_str(),
        os("--cache-file"),
        arena.as_os_str(),
        os("--memory-mb"),
        os("1024"),
    ]);
    let msg = stderr(&out);
    assert!(
        msg.contains("needs 1024 MiB")
            && msg.contains(&*shm.path().to_string_lossy())
            && msg.contains("lower --memory-mb or enlarge the mount"),
        "{out:?}"
    );
    assert_eq!(entries(shm.path()), Vec::<PathBuf>::new(), "a file was left behind");
    assert!(!socket.exists());

    // A damaged arena of the right size (sparse: it fits) is replaced by a
    // new one, which does not fit: the allocation fails cleanly, the old
    // file stays as it was and no new one is left half made.
    let f = std::fs::File::create(&arena).unwrap();
    f.set_len(16 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"TIDECACH", 0).unwrap();
    drop(f);
    let before = std::fs::read(&arena).unwrap();
    let out = serve_must_fail(&[
        os("--socket"),
        socket.as_os_str(),
        os("--cache-file"),
        arena.as_os_str(),
        os("--memory-mb"),
        os("16"),
    ]);
    let msg = stderr(&out);
    assert!(
        msg.contains("needs 16 MiB") && msg.contains("enlarge the mount"),
        "{out:?}"
    );
    assert_eq!(std::fs::read(&arena).unwrap(), before, "the old file changed");
    // Its format version word (0) is not this build's: it could never be
    // re-attached, so the room for a new one is checked before the lock is
    // taken, and not even a lock file is left.
    assert_eq!(entries(shm.path()), vec![arena.clone()]);
}

#[test]
fn a_cache_file_that_is_not_an_arena_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    for (name, bytes) in [
        ("Data.fs", &b"FS21\x00\x00\x00\x00 a FileStorage, say"[..]),
        ("notes.txt", &b"some text\n"[..]),
        ("tiny", &b"TIDE"[..]),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let out = serve_must_fail(&[
            os("--socket"),
            socket.as_os_str(),
            os("--cache-file"),
            path.as_os_str(),
            os("--memory-mb"),
            os("16"),
        ]);
        assert!(
            stderr(&out).contains("is not a tidecache arena file") && stderr(&out).contains(name),
            "{name}: {out:?}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "{name} was changed");
        assert!(!socket.exists());
    }
}

#[test]
fn a_failing_start_leaves_a_warm_arena_as_it_was() {
    let sc = Sidecar::start(&[]);
    let c = client(&sc.socket);
    c.attach("db", 10, None).unwrap();
    c.store("db", vec![item(1, 5, Some(8), 10, b"closed")]).unwrap();
    let (dir, socket) = sc.kill();
    let arena = dir.path().join("cache.arena");
    let before = std::fs::read(&arena).unwrap();

    let missing = dir.path().join("no-such-dir").join("s.sock");
    let a_file = dir.path().join("a-file");
    std::fs::write(&a_file, b"not a socket").unwrap();
    let failures: [(&Path, &str); 2] = [
        (&missing, "does not exist"),
        (
            &a_file,
            "is not a socket; refusing to replace it: remove it or give another --socket",
        ),
    ];
    for (bad_socket, says) in failures {
        let out = serve_must_fail(&[
            os("--socket"),
            bad_socket.as_os_str(),
            os("--cache-file"),
            arena.as_os_str(),
            os("--memory-mb"),
            os("16"),
        ]);
        assert!(stderr(&out).contains(says), "{out:?}");
        assert!(
            std::fs::read(&arena).unwrap() == before,
            "a failed start ({says}) changed the arena"
        );
    }
    // A normal start still finds it warm.
    let sc = Sidecar::start_at(dir, socket, &[]);
    let c = client(&sc.socket);
    // The storage: oid 1 written at 5 and 8, the last transaction at 10.
    let serial_at = |oid: u64, at: u64| (oid == 1).then_some(if at >= 8 { 8 } else { 5 });
    let (state, _) = common::attach_proving(&c, "db", 10, serial_at, |at| [5, 8, 10].contains(&at)).unwrap();
    assert_eq!(state, tidecache_client::protocol::AttachState::Joined);
    assert_eq!(hit(&c, 1, 7).unwrap().state, b"closed");
    assert!(sc.log().contains("re-attached the arena file"), "{}", sc.log());
}

/// The revision of `oid` visible at `view` in the history the test made.
type History = HashMap<u64, Vec<(u64, Option<u64>, Vec<u8>)>>;

fn visible(history: &History, oid: u64, view: u64) -> Option<(u64, Vec<u8>)> {
    history
        .get(&oid)?
        .iter()
        .find(|(serial, end, _)| *serial <= view && end.is_none_or(|e| view < e))
        .map(|(s, _, state)| (*s, state.clone()))
}

#[test]
fn after_a_reboot_a_torn_arena_serves_only_revisions_really_stored() {
    let sc = Sidecar::start(&[]);
    let arena = sc.dir.path().join("cache.arena");
    let c = client(&sc.socket);
    c.attach("db", 10, None).unwrap();
    let mut history = History::new();
    // Open at 5 (oids 1..=40), closed [3, 8) (oids 100..=120).
    let mut items = Vec::new();
    for oid in 1..=40u64 {
        let state = format!("oid {oid} serial 5").into_bytes();
        items.push(item(oid, 5, None, 10, &state));
        history.insert(oid, vec![(5, None, state)]);
    }
    for oid in 100..=120u64 {
        let state = format!("oid {oid} serial 3").into_bytes();
        items.push(item(oid, 3, Some(8), 10, &state));
        history.insert(oid, vec![(3, Some(8), state)]);
    }
    c.store("db", items).unwrap();
    // The file as the disk may hold it: this far, and no further.
    let old = std::fs::read(&arena).unwrap();
    // Oids 1..=20 change at 15: serial 5 closes, serial 15 is stored.
    let changes: Vec<(u64, u64)> = (1..=20).map(|oid| (oid, 15)).collect();
    assert_eq!(c.report("db", 10, 20, changes).unwrap(), 20);
    let mut items = Vec::new();
    for oid in 1..=20u64 {
        let state = format!("oid {oid} serial 15").into_bytes();
        items.push(item(oid, 15, None, 20, &state));
        let revisions = history.get_mut(&oid).unwrap();
        revisions[0].1 = Some(15);
        revisions.push((15, None, state));
    }
    c.store("db", items).unwrap();
    assert_eq!(hit(&c, 1, 16).unwrap().serial, 15);
    let (dir, socket) = sc.kill();
    let new = std::fs::read(&arena).unwrap();
    assert_eq!(old.len(), new.len());

    let g = Geometry::for_size(16 << 20, 64).unwrap();
    let page = 4096;
    // Torn images: the header and the database table (horizon 20) from the
    // newer file, everything else from the older one (the closings at 15
    // lost); then pages picked at random between the two.
    let split = g.bucket_word as usize * 8;
    let mut images = vec![[&new[..split], &old[split..]].concat()];
    let mut rng = fastrand::Rng::with_seed(7);
    images.push(
        (0..new.len() / page)
            .flat_map(|p| {
                let from = if p == 0 || rng.bool() { &new } else { &old };
                from[p * page..(p + 1) * page].to_vec()
            })
            .collect(),
    );
    let mut dir = dir;
    for (n, mut image) in images.into_iter().enumerate() {
        // Another boot's id.
        image[header::BOOT_ID * 8..header::BOOT_ID * 8 + 16].copy_from_slice(&[0x5a; 16]);
        std::fs::write(&arena, &image).unwrap();
        let sc = Sidecar::start_at(dir, socket.clone(), &[]);
        let c = client(&sc.socket);
        c.attach("db", 30, None).unwrap();
        let mut closed_hits = 0;
        for &oid in history.keys() {
            for view in [2, 3, 4, 7, 8, 9, 12, 14, 15, 16, 20, 25, 30] {
                let Some(found) = hit(&c, oid, view) else { continue };
                assert!(
                    found.end.is_some(),
                    "image {n}: an open revision answered: oid {oid} at {view}: {found:?}"
                );
                assert_eq!(
                    Some((found.serial, found.state.clone())),
                    visible(&history, oid, view),
                    "image {n}: oid {oid} at view {view} is not what was stored"
                );
                closed_hits += 1;
            }
        }
        if n == 0 {
            // Every closed record was in the older file: all are kept.
            assert_eq!(closed_hits, 21 * 3, "image {n}: closed revisions lost");
        }
        assert!(sc.log().contains("before a reboot"), "image {n}: {}", sc.log());
        (dir, _) = sc.kill();
    }
}

/// Rewrites the header of the arena file at `path` as another format
/// version would: the version word changed, the header's CRC made to match
/// (so only the version is different).
fn set_format_version(path: &Path, version: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut words = [0u64; header::CHECKED];
    for (i, w) in words.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        file.read_exact_at(&mut b, i as u64 * 8).unwrap();
        *w = u64::from_ne_bytes(b);
    }
    words[header::VERSION] = version;
    let crc = u64::from(tidecache_core::arena::layout::words_crc(words.iter().copied()));
    file.write_all_at(&version.to_ne_bytes(), header::VERSION as u64 * 8)
        .unwrap();
    file.write_all_at(&crc.to_ne_bytes(), header::CRC as u64 * 8).unwrap();
}

#[test]
fn an_arena_of_another_format_version_is_replaced_never_mapped_and_never_read_by_clients() {
    use std::os::unix::fs::MetadataExt;
    use tidecache_client::protocol::AttachState;
    use tidecache_client::{MapError, MappedArena};
    use tidecache_core::arena::layout::{LayoutError, LAYOUT_VERSION};

    let sc = Sidecar::start(&[]);
    let c = client(&sc.socket);
    c.attach("db", 10, None).unwrap();
    c.store("db", vec![item(1, 5, Some(8), 10, b"closed")]).unwrap();
    assert_eq!(hit(&c, 1, 7).unwrap().state, b"closed");
    drop(c);
    let (dir, socket) = sc.kill();
    let arena = dir.path().join("cache.arena");
    let incarnation = word(&header_bytes(&arena), header::INCARNATION);
    assert!(
        MappedArena::open(&arena, incarnation).is_ok(),
        "the file as its sidecar left it maps"
    );

    let other = LAYOUT_VERSION + 1;
    set_format_version(&arena, other);
    // A client never reads an arena of another format version, by path or
    // by descriptor: it is refused (its lookups miss in the arena).
    for mapped in [
        MappedArena::open(&arena, incarnation),
        MappedArena::from_file(&std::fs::File::open(&arena).unwrap(), incarnation),
    ] {
        match mapped {
            Err(MapError::Layout(LayoutError::Version { found, expected })) => {
                assert_eq!((found, expected), (other, LAYOUT_VERSION))
            }
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("an arena of format version {other} was mapped"),
        }
    }
    // What a worker of the other version still holds: the old file, open.
    let old = std::fs::File::open(&arena).unwrap();
    let old_inode = old.metadata().unwrap().ino();
    let before = std::fs::read(&arena).unwrap();

    let sc = Sidecar::start_at(dir, socket, &[]);
    let line = format!(
        "arena {} has format version {other}, this tidecached writes {LAYOUT_VERSION}: starting cold, \
         the old file is replaced (unlinked, never truncated",
        arena.display()
    );
    assert!(sc.log().contains(&line), "expected {line:?} in:\n{}", sc.log());
    // The old file is neither truncated nor written (not even retired: its
    // words may mean other things in its layout); a new file is at the path.
    let mut still = Vec::new();
    std::io::Read::read_to_end(&mut &old, &mut still).unwrap();
    assert!(still == before, "the old file of another format version was changed");
    assert_ne!(std::fs::metadata(&arena).unwrap().ino(), old_inode);
    assert_eq!(word(&header_bytes(&arena), header::VERSION), LAYOUT_VERSION);
    // Served cold, and correctly: the database starts anew, nothing of the
    // old file answers, new stores hit.
    let c = client(&sc.socket);
    assert_eq!(c.attach("db", 10, None).unwrap().0, AttachState::Started);
    assert!(hit(&c, 1, 7).is_none(), "a revision of the old file was served");
    c.store("db", vec![item(1, 5, Some(8), 10, b"again")]).unwrap();
    assert_eq!(hit(&c, 1, 7).unwrap().state, b"again");
}
