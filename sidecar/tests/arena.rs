//! The arena as clients and operators see it: a file mapped read-only,
//! lookups without the socket, permissions, and warm restart after
//! `kill -9` on the same `--cache-file`, with damaged files discarded.

mod common;

use common::{item, Sidecar};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};
use tidecache_client::{Client, ClientConfig, Local};

fn client(socket: &std::path::Path) -> Client {
    let mut c = ClientConfig::new(socket);
    c.retry_after = Duration::from_millis(20);
    c.timeout = Duration::from_secs(2);
    Client::new(c)
}

fn hit(c: &Client, oid: u64, view: u64) -> Option<Vec<u8>> {
    match c.lookup_local("db", oid, view) {
        Local::Hit(f) => Some(f.state),
        Local::Miss => None,
        Local::Unavailable => panic!("no arena to read"),
    }
}

/// Waits until the client is connected again (after a restart).
fn reconnect(c: &Client) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.stats().is_err() {
        assert!(Instant::now() < deadline, "client never reconnected");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_arena_file_is_private_and_lookups_need_no_socket() {
    let sc = Sidecar::start(&[]);
    let path = sc.dir.path().join("cache.arena");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let c = client(&sc.socket);
    c.attach("db", 10, None).unwrap();
    c.store("db", vec![item(1, 5, None, 10, b"one")]).unwrap();
    assert_eq!(hit(&c, 1, 10).as_deref(), Some(&b"one"[..]));
    // With the sidecar stopped, the arena still answers: no socket, no lock
    // (a lookup that needed the sidecar would miss or fail here).
    let pid = sc.child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let hits = (0..1000).filter(|_| hit(&c, 1, 10).is_some()).count();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(hits, 1000);
}

#[test]
fn group_widens_file_and_socket_to_one_group() {
    use std::os::unix::fs::MetadataExt;
    // The process's own group, which it may always chown to; as root, a
    // group it is not in (root may give files to any group), so that the
    // files' group shows the option took effect.
    let own = unsafe { libc::getgid() };
    let gid = if unsafe { libc::geteuid() } == 0 {
        own + 4242
    } else {
        own
    };
    let sc = Sidecar::start(&["--group", &gid.to_string()]);
    let meta = |p: &std::path::Path| std::fs::metadata(p).unwrap();
    let arena = sc.dir.path().join("cache.arena");
    // What docs/operations.md ("Security model") says: the group may use
    // the socket and read the arena, never write it; the lock file stays
    // the owner's.
    assert_eq!(meta(&arena).permissions().mode() & 0o777, 0o640);
    assert_eq!(meta(&arena).gid(), gid);
    assert_eq!(meta(&sc.socket).permissions().mode() & 0o777, 0o660);
    assert_eq!(meta(&sc.socket).gid(), gid);
    let lock = sc.dir.path().join("cache.arena.lock");
    assert_eq!(meta(&lock).permissions().mode() & 0o777, 0o600);
}

#[test]
fn without_group_the_socket_and_files_are_the_owners_only() {
    let sc = Sidecar::start(&[]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&sc.dir.path().join("cache.arena")), 0o600);
    assert_eq!(mode(&sc.dir.path().join("cache.arena.lock")), 0o600);
    assert_eq!(mode(&sc.socket), 0o600);
    // The arena file is exactly --memory-mb MiB (16 here), all of it
    // allocated.
    let meta = std::fs::metadata(sc.dir.path().join("cache.arena")).unwrap();
    assert_eq!(meta.len(), 16 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 >= 16 << 20, "{} blocks", meta.blocks());
}

#[test]
fn after_kill_9_a_restart_on_the_same_file_serves_at_once() {
    let sc = Sidecar::start(&[]);
    let c = client(&sc.socket);
    c.attach("db", 10, None).unwrap();
    c.store(
        "db",
        vec![item(1, 5, Some(8), 10, b"closed"), item(2, 5, None, 10, b"open")],
    )
    .unwrap();
    c.report("db", 10, 20, vec![(3, 15)]).unwrap();
    let (dir, socket) = sc.kill();
    let sc = Sidecar::start_at(dir, socket, &[]);
    let t = Instant::now();
    reconnect(&c);
    // Closed revisions answer at once; the open one up to the persisted
    // horizon (20) only.
    assert_eq!(hit(&c, 1, 7).as_deref(), Some(&b"closed"[..]));
    assert_eq!(hit(&c, 2, 20).as_deref(), Some(&b"open"[..]));
    assert!(hit(&c, 2, 21).is_none());
    let first_hit = t.elapsed();
    assert!(first_hit < Duration::from_secs(5), "first hit after {first_hit:?}");
    // The first adapter supplies what changed since (oid 2 at 25).
    c.report("db", 20, 30, vec![(2, 25)]).unwrap();
    assert_eq!(hit(&c, 2, 24).as_deref(), Some(&b"open"[..]));
    assert!(hit(&c, 2, 25).is_none());
    let log = sc.log();
    assert!(log.contains("re-attached the arena file"), "{log}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sc.log().contains("reopened arena verified") {
        assert!(Instant::now() < deadline, "verification never finished: {}", sc.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(c.stats().unwrap().arena.unverified_segments, 0);
}

/// Something done to an arena file on disk.
type Damage = Box<dyn Fn(&std::path::Path)>;

#[test]
fn damaged_truncated_and_foreign_files_are_discarded_with_a_log_line() {
    // (offset, bytes written, what the log says)
    let damages: [(&str, Damage, &str); 3] = [
        (
            "a flipped header byte",
            Box::new(|p| poke(p, 5 * 8, &[0x5a])),
            "header checksum mismatch",
        ),
        (
            "a truncated file",
            Box::new(|p| {
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(f.metadata().unwrap().len() - 4096).unwrap();
            }),
            "truncated or extended",
        ),
        (
            "another layout version",
            Box::new(|p| poke(p, 8, &7u64.to_ne_bytes())),
            // Never mapped, never written: a line of its own
            // (sidecar/tests/startup.rs has the details).
            "has format version 7, this tidecached writes 2: starting cold",
        ),
    ];
    for (what, damage, says) in damages {
        let sc = Sidecar::start(&[]);
        let c = client(&sc.socket);
        c.attach("db", 10, None).unwrap();
        c.store("db", vec![item(1, 5, Some(8), 10, b"closed")]).unwrap();
        let (dir, socket) = sc.kill();
        damage(&dir.path().join("cache.arena"));
        let mut sc = Sidecar::start_at(dir, socket, &[]);
        reconnect(&c);
        assert!(sc.alive(), "{what}: the sidecar died");
        let log = sc.log();
        let other_version = what == "another layout version";
        assert!(
            log.contains("discarding the arena file") != other_version && log.contains(says),
            "{what}: {log}"
        );
        assert!(
            !matches!(c.lookup_local("db", 1, 7), Local::Hit(_)),
            "{what}: served from a discarded file"
        );
        // The new file's slot has another identity: the reconnect's Resync
        // was refused as stale and the client attaches again (its log
        // starts at 10).
        assert!(!c.is_attached("db"), "{what}: joined a new file without attaching");
        c.attach("db", 10, None).unwrap();
        c.store("db", vec![item(1, 5, Some(8), 10, b"closed")]).unwrap();
        assert!(hit(&c, 1, 7).is_some(), "{what}");
    }
}

fn poke(path: &std::path::Path, at: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(bytes).unwrap();
}

#[test]
fn an_unknown_group_or_a_bad_size_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tidecached"))
            .arg("serve")
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .arg("--cache-file")
            .arg(dir.path().join("cache.arena"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--group", "no-such-group-tidecache"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no group named"),
        "{out:?}"
    );
    // The size is named as the option gives it: MiB, with the range.
    for size in ["0", "32769", "18446744073709551615"] {
        let out = run(&["--memory-mb", size]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("tidecached: --memory-mb")
                && err.contains("between 1 and 32768")
                && err.contains(&format!("got {size}")),
            "{out:?}"
        );
    }
    assert!(!dir.path().join("s.sock").exists(), "nothing left behind");
}

/// Database keys that include a pid (MappingStorage, DemoStorage) are new
/// after every restart: the slots the previous run left in the file must
/// not fill the table for good.
#[test]
fn slots_left_by_a_previous_run_are_freed_for_new_keys() {
    let args = ["--max-databases", "4"];
    let sc = Sidecar::start(&args);
    let c = client(&sc.socket);
    for i in 0..4 {
        c.attach(&format!("pid 1 db {i}"), 10, None).unwrap();
        c.store(&format!("pid 1 db {i}"), vec![item(1, 5, None, 10, b"old")])
            .unwrap();
    }
    drop(c);
    let (dir, socket) = sc.kill();
    let sc = Sidecar::start_at(dir, socket, &args);
    let watcher = client(&sc.socket);
    for round in 2..4 {
        let c = client(&sc.socket);
        for i in 0..4 {
            let db = format!("pid {round} db {i}");
            let attached = c.attach(&db, 10, None);
            assert!(attached.is_ok(), "{db}: {attached:?}\n{}", sc.log());
            c.store(&db, vec![item(1, 5, None, 10, b"new")]).unwrap();
            match c.lookup_local(&db, 1, 10) {
                Local::Hit(f) => assert_eq!(f.state, b"new"),
                other => panic!("{db}: {other:?}"),
            }
        }
        // Gone: its attachments end, its slots may be freed for the next.
        c.close();
        let deadline = Instant::now() + Duration::from_secs(5);
        while watcher.stats().unwrap().clients > 1 {
            assert!(Instant::now() < deadline, "the connection never ended");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A client reads the arena with the slot number Attach gave it until its
/// next socket call. A restart that frees that slot (its checksum failed:
/// killed between storing a horizon and resealing the slot) and gives it to
/// another database must not make that client read the other database.
#[test]
fn a_stale_slot_never_reads_another_database_after_a_restart() {
    let sc = Sidecar::start(&[]);
    let c = client(&sc.socket);
    c.attach("db", 10, None).unwrap();
    c.store("db", vec![item(1, 5, None, 10, b"mine")]).unwrap();
    assert!(matches!(c.lookup_local("db", 1, 10), Local::Hit(_)));
    let (dir, socket) = sc.kill();
    // Slot 0's horizon word (the table starts at word 512) changed
    // without its CRC.
    poke(&dir.path().join("cache.arena"), (512 + 1) * 8, &[0x77]);
    let sc = Sidecar::start_at(dir, socket, &[]);
    let other = client(&sc.socket);
    other.attach("other", 10, None).unwrap();
    other.store("other", vec![item(1, 7, None, 10, b"theirs")]).unwrap();
    assert!(matches!(other.lookup_local("other", 1, 10), Local::Hit(_)));
    assert!(sc.log().contains("damaged_databases=1"), "{}", sc.log());
    // `c` has made no socket call since: it still holds slot 0.
    match c.lookup_local("db", 1, 10) {
        Local::Hit(f) => panic!("read another database's revision: {:?}", f.state),
        Local::Miss | Local::Unavailable => {}
    }
}
