//! Fault campaign, corrupt files through the real binary: an arena file a
//! killed `tidecached` left (three databases, open and closed revisions),
//! damaged at random (bit flips in the header, the database table, the
//! buckets, the segments; truncation, extension, foreign bytes), then a
//! new `tidecached` started on it. It never crashes, logs whether it
//! re-attached or discarded the file (and why), and every hit its clients
//! get is the revision their history says `loadBefore(oid, view + 1)`
//! returns. (`core/tests/corrupt_files.rs` tries thousands of files
//! in-process; this runs a few through the binary.)
//!
//! `TIDECACHE_SOAK_SECONDS` makes it run for that long; a failure prints
//! its seed; `TIDECACHE_FUZZ_SEED=<seed>` replays it.

mod common;

use common::{History, Sidecar};
use std::path::Path;
use std::time::{Duration, Instant};
use tidecache_client::protocol::{AttachState, StoreItem};
use tidecache_client::{Client, ClientConfig};
use tidecache_core::arena::Geometry;

const DATABASES: [&str; 3] = ["zeo:/a.sock:1", "file:/var/Data.fs", "pg:tidecache"];
const OIDS: u64 = 40;
const FIRST: u64 = 100;
const MEMORY_MB: &str = "2";

fn state(db: usize, oid: u64, serial: u64) -> Vec<u8> {
    let mut s = format!("{db}:{oid}@{serial}:").into_bytes();
    s.resize(20 + ((oid * 37 + serial * 11) % 1200) as usize, (oid ^ serial) as u8);
    s
}

fn client(socket: &Path) -> Client {
    let mut c = ClientConfig::new(socket);
    c.timeout = Duration::from_secs(30);
    Client::new(c)
}

/// Lookups of every oid at a spread of views, in the arena and over the
/// socket, each hit checked. Returns the hits.
fn check(c: &Client, db: usize, h: &History, last: u64, rng: &mut fastrand::Rng) -> Result<u64, String> {
    let mut hits = 0;
    for _ in 0..4 {
        let view = rng.u64(FIRST - 3..=last + 3);
        let oids: Vec<u64> = (1..=OIDS).collect();
        let local = c.lookup(DATABASES[db], view, oids.clone()).map_err(|e| e.to_string())?;
        let remote = c
            .lookup_remote(DATABASES[db], view, oids.clone())
            .map_err(|e| e.to_string())?;
        for (oid, f) in oids.iter().cycle().zip(local.iter().chain(&remote)) {
            let Some(f) = f else { continue };
            let want = h.visible(*oid, view);
            let right = want.is_some_and(|(s, next)| {
                s == f.serial && f.state == state(db, *oid, s) && f.end.is_none_or(|e| Some(e) == next)
            });
            if !right {
                return Err(format!(
                    "wrong hit: db {db} oid {oid} view {view}: serial {} end {:?}, history {want:?}",
                    f.serial, f.end
                ));
            }
            hits += 1;
        }
    }
    Ok(hits)
}

/// Fills a sidecar's arena, kills it, and returns the file's bytes, the
/// histories (up to `last`) and each database's horizon.
fn build(rng: &mut fastrand::Rng) -> (Vec<u8>, Vec<History>, u64) {
    let sc = Sidecar::start(&["--memory-mb", MEMORY_MB]);
    let c = client(&sc.socket);
    let last = FIRST + 150;
    let mut histories = Vec::new();
    for (db, key) in DATABASES.iter().enumerate() {
        let mut h = History((1..=OIDS).map(|o| (o, vec![FIRST])).collect());
        for tid in FIRST + 1..=last {
            for _ in 0..rng.usize(0..3) {
                let s = h.0.get_mut(&rng.u64(1..=OIDS)).unwrap();
                if s.last() != Some(&tid) {
                    s.push(tid);
                }
            }
        }
        c.attach(key, FIRST + 20, None).unwrap();
        let mut horizon = FIRST + 20;
        // Reports stop short of `last`: the restarted clients bring the rest.
        while horizon < last - 30 {
            let items: Vec<StoreItem> = (0..10)
                .map(|_| {
                    let oid = rng.u64(1..=OIDS);
                    let view = rng.u64(FIRST + 20..=horizon);
                    let (serial, next) = h.visible(oid, view).unwrap();
                    StoreItem {
                        oid,
                        serial,
                        end: next.filter(|&n| n <= horizon),
                        view,
                        state: state(db, oid, serial),
                    }
                })
                .collect();
            c.store(key, items).unwrap();
            let to = horizon + rng.u64(1..6);
            c.report(key, horizon, to, h.changes(horizon, to)).unwrap();
            horizon = to;
        }
        histories.push(h);
    }
    let (dir, _) = sc.kill();
    (std::fs::read(dir.path().join("cache.arena")).unwrap(), histories, last)
}

fn damage(rng: &mut fastrand::Rng, bytes: &mut Vec<u8>) -> String {
    let g = Geometry::for_size(2 << 20, 64).unwrap();
    let w = |x: u64| (x * 8) as usize;
    let flip = |lo: usize, hi: usize, rng: &mut fastrand::Rng, bytes: &mut Vec<u8>| {
        let at = rng.usize(lo..hi);
        bytes[at] ^= 1 << rng.u8(..8);
        at
    };
    match rng.u8(..9) {
        0 => format!("header flip at {}", flip(0, w(13), rng, bytes)),
        1 => format!(
            "database table flip at {}",
            flip(w(g.db_word), w(g.db_word + 96), rng, bytes)
        ),
        2 => format!("bucket flip at {}", flip(w(g.bucket_word), w(g.data_word), rng, bytes)),
        3 | 4 => {
            let ats: Vec<usize> = (0..rng.usize(1..8))
                .map(|_| flip(w(g.data_word), w(g.data_word + 8 * g.segment_words), rng, bytes))
                .collect();
            format!("segment flips at {ats:?}")
        }
        5 => {
            let n = rng.usize(..bytes.len());
            bytes.truncate(n);
            format!("truncated to {n}")
        }
        6 => {
            bytes.extend(std::iter::repeat_n(0, 4096));
            "extended by 4096".into()
        }
        7 => {
            rng.fill(bytes);
            "random bytes".into()
        }
        _ => {
            let text = b"TIDECACHE plain text\n".repeat(100);
            bytes[..text.len()].copy_from_slice(&text);
            "text with the magic word".into()
        }
    }
}

/// Starts a sidecar on the damaged file and lets a client per database
/// attach, catch up, store and look up. Returns the hits checked.
fn exercise(bytes: &[u8], histories: &[History], last: u64, rng: &mut fastrand::Rng) -> Result<u64, String> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cache.arena"), bytes).unwrap();
    let socket = dir.path().join("tidecached.sock");
    // A file that is not an arena at all is refused at start (the sidecar
    // exits with a message, never replacing a file it did not make).
    let log = dir.path().join("tidecached.log");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tidecached"));
    cmd.arg("serve")
        .arg("--socket")
        .arg(&socket)
        .args(["--memory-mb", MEMORY_MB]);
    cmd.arg("--cache-file").arg(dir.path().join("cache.arena"));
    cmd.env("RUST_LOG", "info");
    let child = cmd.stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    let mut sc = Sidecar { child, socket, dir };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&sc.socket).is_err() {
        if let Some(status) = sc.child.try_wait().unwrap() {
            let err = sc.log();
            if status.code() == Some(1) && !err.contains("panicked") && !err.trim().is_empty() {
                return Ok(0); // refused to start, with a message
            }
            return Err(format!("tidecached crashed at start ({status:?}): {err}"));
        }
        if Instant::now() > deadline {
            return Err("tidecached neither came up nor exited".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let c = client(&sc.socket);
    let mut hits = 0;
    for (db, h) in histories.iter().enumerate() {
        let key = DATABASES[db];
        let (attached, horizon) = common::attach_proving(
            &c,
            key,
            last,
            |oid, at| h.visible(oid, at).map(|(s, _)| s),
            |at| h.0.values().any(|s| s.contains(&at)),
        )
        .map_err(|e| e.to_string())?;
        if attached == AttachState::Joined && horizon < last {
            // What the first adapter does after a restart: report what
            // its storage committed since the persisted horizon.
            c.report(key, horizon, last, h.changes(horizon, last))
                .map_err(|e| e.to_string())?;
        }
        hits += check(&c, db, h, last, rng)?;
    }
    let log = sc.log();
    if !log.contains("re-attached the arena file")
        && !log.contains("discarding the arena file")
        && !log.contains("starting cold, the old file is replaced")
    {
        return Err(format!("no log line says what became of the file: {log}"));
    }
    if log.contains("discarding the arena file") && !log.contains("reason=") {
        return Err(format!("the discard has no reason: {log}"));
    }
    if !sc.alive() || log.contains("panicked") {
        return Err(format!("tidecached crashed: {log}"));
    }
    c.stats().map_err(|e| format!("stats: {e}"))?;
    Ok(hits)
}

#[test]
fn the_binary_restarted_on_damaged_files_never_crashes_nor_gives_a_wrong_hit() {
    let soak: Option<u64> = std::env::var("TIDECACHE_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let seed = std::env::var("TIDECACHE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let end = Instant::now() + Duration::from_secs(soak.unwrap_or(0));
    let mut rng = fastrand::Rng::with_seed(seed);
    let (pristine, histories, last) = build(&mut rng);
    let (mut files, mut hits, mut failures) = (0u64, 0u64, Vec::new());
    loop {
        let case = rng.u64(..);
        let mut case_rng = fastrand::Rng::with_seed(case);
        let mut bytes = pristine.clone();
        let what = damage(&mut case_rng, &mut bytes);
        files += 1;
        match exercise(&bytes, &histories, last, &mut case_rng) {
            Ok(h) => hits += h,
            Err(e) => failures.push(format!("seed {seed} case {case} ({what}): {e}")),
        }
        let more = match soak {
            None => files < 8,
            Some(_) => Instant::now() < end,
        };
        if !more {
            break;
        }
    }
    println!(
        "SOAK corrupt files through tidecached: corrupt files tried {files}, hits checked {hits}, wrong hits {}, crashes {}, other failures {}",
        failures.iter().filter(|f| f.contains("wrong hit")).count(),
        failures.iter().filter(|f| f.contains("crashed")).count(),
        failures.iter().filter(|f| !f.contains("wrong hit") && !f.contains("crashed")).count(),
    );
    assert!(failures.is_empty(), "{failures:#?}");
}
