//! Fault campaign, corrupt-file part: a real arena (several databases,
//! open and closed revisions, reports, eviction) written by the sidecar's
//! own code, then damaged at random (bit flips in the header, the database
//! table, the buckets, segment headers and records; truncations and
//! extensions; foreign files: random bytes, a text file that starts with
//! the magic word, an arena of another size or slot count) and re-attached
//! as `tidecached` does (`Geometry::read`, then `ArenaWriter::recover`).
//! Then lookups, reports, stores and verification run on it. Never a
//! panic, and never a wrong hit: every hit is compared with the history
//! the test generated (the revision `loadBefore(oid, view + 1)` returns,
//! with its true end).
//!
//! `make test` tries a few hundred files; `make soak` runs for
//! `TIDECACHE_SOAK_SECONDS` with fresh seeds and prints a summary line.
//! A failure prints its seed; `TIDECACHE_FUZZ_SEED=<seed>` replays it.
//! (A few files go through the real binary in
//! `sidecar/tests/corrupt_arena.rs`.)

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidecache_core::arena::layout::{self, header, segment};
use tidecache_core::arena::{ArenaCache, ArenaWriter, Geometry, Memory, SharedArena};
use tidecache_core::{Oid, Tid};

const BYTES: u64 = 1 << 20;
const SLOTS: u64 = 8;
const DATABASES: [&str; 3] = ["zeo:/a.sock:1", "file:/var/Data.fs", "pg:tidecache"];
const OIDS: u64 = 40;
/// First tid of every history; every oid is created by it.
const FIRST: u64 = 100;

/// One database's true history: the serials of each oid, up to `last`.
struct History {
    serials: BTreeMap<u64, Vec<u64>>,
    last: u64,
}

impl History {
    fn new(rng: &mut fastrand::Rng, last: u64) -> Self {
        let mut serials: BTreeMap<u64, Vec<u64>> = (1..=OIDS).map(|o| (o, vec![FIRST])).collect();
        for tid in FIRST + 1..=last {
            for _ in 0..rng.usize(0..3) {
                let oid = rng.u64(1..=OIDS);
                serials.get_mut(&oid).unwrap().push(tid);
            }
        }
        for s in serials.values_mut() {
            s.dedup();
        }
        History { serials, last }
    }

    /// `(serial, next serial)` of the revision of `oid` visible at `view`.
    fn visible(&self, oid: u64, view: u64) -> Option<(u64, Option<u64>)> {
        let s = self.serials.get(&oid)?;
        let i = s.partition_point(|&x| x <= view).checked_sub(1)?;
        Some((s[i], s.get(i + 1).copied()))
    }

    /// Changes in `(from, to]`.
    fn changes(&self, from: u64, to: u64) -> Vec<(Oid, Tid)> {
        let mut out: Vec<(Oid, Tid)> = self
            .serials
            .iter()
            .flat_map(|(&o, s)| {
                s.iter()
                    .filter(|&&t| t > from && t <= to)
                    .map(move |&t| (Oid(o), Tid(t)))
            })
            .collect();
        out.sort_by_key(|&(o, t)| (t, o));
        out
    }
}

/// The state of revision `(oid, serial)` of database `db`: its identity,
/// then filler of a length the identity fixes.
fn state(db: usize, oid: u64, serial: u64) -> Vec<u8> {
    let mut s = format!("{db}:{oid}:{serial}:").into_bytes();
    let len = 16 + ((oid * 131 + serial * 17) % 1500) as usize;
    s.extend((0..len).map(|i| (i as u64 ^ oid ^ serial) as u8));
    s
}

/// A hit is right when it is exactly what `loadBefore(oid, view + 1)`
/// returns: the revision visible at `view`, its true end, its state.
fn check_hit(
    h: &History,
    db: usize,
    oid: u64,
    view: u64,
    serial: u64,
    end: Option<u64>,
    got: &[u8],
) -> Result<(), String> {
    let want = h.visible(oid, view);
    let ok = match want {
        Some((s, next)) => {
            s == serial && got == state(db, oid, serial) && end.is_none_or(|e| Some(e) == next && e > view)
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "wrong hit: db {db} oid {oid} view {view}: got serial {serial} end {end:?} ({} bytes), history says {want:?}",
            got.len()
        ))
    }
}

/// Stores what a client at `view` would have loaded for `oid`.
fn store_at(cache: &ArenaCache, h: &History, db: usize, oid: u64, view: u64, horizon: u64) {
    if let Some((serial, next)) = h.visible(oid, view) {
        let end = next.filter(|&n| n <= horizon);
        let _ = cache.store(Oid(oid), Tid(serial), end.map(Tid), Tid(view), &state(db, oid, serial));
    }
}

/// Looks up every oid at a spread of views and checks every hit.
fn check_all(cache: &ArenaCache, h: &History, db: usize, rng: &mut fastrand::Rng) -> Result<u64, String> {
    let mut hits = 0;
    for oid in 1..=OIDS {
        for _ in 0..4 {
            let view = rng.u64(FIRST - 5..=h.last + 5);
            if let Some(f) = cache.lookup(Oid(oid), Tid(view)) {
                check_hit(h, db, oid, view, f.serial, f.end, &f.state)?;
                hits += 1;
            }
        }
    }
    Ok(hits)
}

/// An arena built by the real writer from fresh histories: the file's
/// bytes, the histories, and the horizon each database reached.
struct Built {
    bytes: Vec<u8>,
    /// The file partway through the build: pages a host that lost power
    /// may not have written back since.
    earlier: Vec<u8>,
    histories: Vec<History>,
    horizons: Vec<u64>,
}

fn words_to_bytes(m: &Memory) -> Vec<u8> {
    m.words()
        .iter()
        .flat_map(|w| w.load(Ordering::Relaxed).to_ne_bytes())
        .collect()
}

fn memory_of(bytes: &[u8]) -> Arc<Memory> {
    let m = Memory::heap(bytes.len() as u64);
    for (w, chunk) in m.words().iter().zip(bytes.chunks_exact(8)) {
        w.store(u64::from_ne_bytes(chunk.try_into().unwrap()), Ordering::Relaxed);
    }
    Arc::new(m)
}

fn build(rng: &mut fastrand::Rng, bytes: u64, slots: u64) -> Built {
    let g = Geometry::for_size(bytes, slots).unwrap();
    let memory = Arc::new(Memory::heap(g.file_bytes));
    let arena = SharedArena::new(ArenaWriter::create(memory.clone(), g, 7));
    let mut histories = Vec::new();
    let mut horizons = Vec::new();
    let mut earlier = Vec::new();
    for (db, key) in DATABASES.iter().enumerate() {
        let h = History::new(rng, FIRST + 200);
        let cache = arena.database(key).unwrap();
        let mut horizon = FIRST + 20;
        cache.start_log(Tid(horizon));
        let end_at = FIRST + 100 + rng.u64(0..60);
        while horizon < end_at {
            for _ in 0..rng.usize(5..20) {
                let view = rng.u64(FIRST + 20..=horizon);
                store_at(&cache, &h, db, rng.u64(1..=OIDS), view, horizon);
            }
            let to = horizon + rng.u64(1..6);
            cache.report(Tid(horizon), Tid(to), &h.changes(horizon, to)).unwrap();
            horizon = to;
            if db == 1 && earlier.is_empty() && horizon > FIRST + 60 {
                earlier = words_to_bytes(&memory);
            }
            if rng.u8(..) < 40 {
                // A hit some client reported: eviction keeps it.
                let oid = rng.u64(1..=OIDS);
                if let Some((serial, _)) = h.visible(oid, horizon) {
                    arena.touch(cache.slot(), &[(oid, serial)]);
                }
            }
        }
        horizons.push(horizon);
        histories.push(h);
    }
    // Dropped without a word: what kill -9 leaves.
    Built {
        bytes: words_to_bytes(&memory),
        earlier,
        histories,
        horizons,
    }
}

/// Where a damage lands.
#[derive(Debug, Clone, Copy)]
enum Region {
    Header,
    DatabaseTable,
    Buckets,
    SegmentHeaders,
    Records,
    Anywhere,
}

/// What was done to the file (printed with a failure).
#[derive(Debug)]
#[allow(dead_code)] // fields read through Debug, in failure messages
enum Damage {
    Flips(Region, Vec<usize>),
    Truncate(usize),
    Extend(usize),
    RandomBytes,
    MagicText,
    OtherArena {
        bytes: u64,
        slots: u64,
    },
    /// Pages of an earlier state, in a file last served in another boot
    /// (what a power loss leaves).
    StalePages(Vec<usize>),
}

fn damage(rng: &mut fastrand::Rng, built: &Built) -> (Damage, Vec<u8>) {
    let mut bytes = built.bytes.clone();
    let g = Geometry::for_size(BYTES, SLOTS).unwrap();
    let word = |w: u64| (w * 8) as usize;
    let roll = rng.u8(..100);
    let d = if roll < 80 {
        let region = match rng.u8(..6) {
            0 => Region::Header,
            1 => Region::DatabaseTable,
            2 => Region::Buckets,
            3 => Region::SegmentHeaders,
            4 => Region::Records,
            _ => Region::Anywhere,
        };
        let segments_in_use: Vec<u64> = (0..g.segments)
            .filter(|&s| {
                let at = word(g.data_word + s * g.segment_words + segment::META as u64);
                u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap()) & 0xff != 0
            })
            .collect();
        let mut at = Vec::new();
        for _ in 0..rng.usize(1..=4) {
            let byte = match region {
                Region::Header => rng.usize(..word(header::LIVE as u64 + 1)),
                Region::DatabaseTable => rng.usize(word(g.db_word)..word(g.db_word + 3 * 32)),
                Region::Buckets => rng.usize(word(g.bucket_word)..word(g.data_word)),
                Region::SegmentHeaders | Region::Records => {
                    let seg = segments_in_use
                        .get(rng.usize(..segments_in_use.len().max(1)))
                        .copied()
                        .unwrap_or(0);
                    let base = word(g.data_word + seg * g.segment_words);
                    if matches!(region, Region::SegmentHeaders) {
                        base + rng.usize(..word(layout::SEGMENT_HEADER_WORDS as u64))
                    } else {
                        let fill =
                            u64::from_ne_bytes(bytes[base + word(segment::FILL as u64)..][..8].try_into().unwrap())
                                .clamp(layout::SEGMENT_HEADER_WORDS as u64 + 1, g.segment_words);
                        base + rng.usize(word(layout::SEGMENT_HEADER_WORDS as u64)..word(fill))
                    }
                }
                Region::Anywhere => rng.usize(..bytes.len()),
            };
            bytes[byte] ^= 1 << rng.u8(..8);
            at.push(byte);
        }
        Damage::Flips(region, at)
    } else if roll < 86 {
        let len = match rng.u8(..4) {
            0 => 0,
            1 => rng.usize(..4096),
            _ => rng.usize(..bytes.len()),
        };
        bytes.truncate(len);
        Damage::Truncate(len)
    } else if roll < 90 {
        let more = [8, 4096, rng.usize(1..1 << 16)][rng.usize(..3)];
        bytes.resize(bytes.len() + more, 0);
        Damage::Extend(more)
    } else if roll < 93 {
        rng.fill(&mut bytes);
        Damage::RandomBytes
    } else if roll < 95 {
        let pages: Vec<usize> = (0..rng.usize(1..8)).map(|_| rng.usize(..bytes.len() / 4096)).collect();
        for &p in &pages {
            bytes[p * 4096..(p + 1) * 4096].copy_from_slice(&built.earlier[p * 4096..(p + 1) * 4096]);
        }
        // Another boot id in the header: the file outlived a reboot.
        for (i, v) in [0x0b00_7000_0000_0001u64, 2].into_iter().enumerate() {
            let at = (header::BOOT_ID + i) * 8;
            bytes[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        }
        Damage::StalePages(pages)
    } else if roll < 96 {
        let text = b"TIDECACHE is a text file, not an arena.\n".repeat(bytes.len() / 40);
        bytes[..text.len()].copy_from_slice(&text);
        bytes.truncate(text.len().max(64));
        Damage::MagicText
    } else {
        let (b, s) = [(2 << 20, SLOTS), (BYTES, 4)][rng.usize(..2)];
        bytes = build(rng, b, s).bytes;
        Damage::OtherArena { bytes: b, slots: s }
    };
    (d, bytes)
}

/// Counts of a campaign.
#[derive(Default)]
struct Tally {
    files: u64,
    refused: u64,
    reattached: u64,
    hits: u64,
    discarded: u64,
    wrong: Vec<String>,
    panics: Vec<String>,
}

/// Re-attaches `bytes` as the sidecar does and exercises it; `Ok` is
/// `None` for a refused file, else the hits checked and records discarded.
fn exercise(bytes: &[u8], built: &Built, rng: &mut fastrand::Rng) -> Result<Option<(u64, u64)>, String> {
    let g = Geometry::for_size(BYTES, SLOTS).unwrap();
    let memory = memory_of(bytes);
    match Geometry::read(memory.words(), memory.len_bytes()) {
        Ok(found) if found == g => {}
        _ => return Ok(None),
    }
    let Ok((writer, _)) = ArenaWriter::recover(memory, 9) else {
        return Ok(None);
    };
    let arena = SharedArena::new(writer);
    let caches: Vec<ArenaCache> = DATABASES.iter().map(|k| arena.database(k).unwrap()).collect();
    let mut hits = 0;
    // Served at once, before verification.
    for (db, cache) in caches.iter().enumerate() {
        hits += check_all(cache, &built.histories[db], db, rng)?;
    }
    // The first adapter of each database reports what changed since (or,
    // for a slot the damage freed, starts a new log), stores, and reads.
    for (db, cache) in caches.iter().enumerate() {
        let h = &built.histories[db];
        let from = built.horizons[db];
        let to = (from + rng.u64(1..20)).min(h.last);
        match cache.horizon() {
            Some(Tid(horizon)) => {
                cache
                    .report(Tid(horizon), Tid(to), &h.changes(horizon, to))
                    .map_err(|e| e.to_string())?;
            }
            None => cache.start_log(Tid(to)),
        }
        for _ in 0..10 {
            let view = rng.u64(FIRST + 20..=to);
            store_at(cache, h, db, rng.u64(1..=OIDS), view, to);
        }
        hits += check_all(cache, h, db, rng)?;
    }
    let mut discarded = 0;
    {
        let mut w = arena.writer();
        while let Some((_, d)) = w.verify_next() {
            discarded += d;
        }
    }
    for (db, cache) in caches.iter().enumerate() {
        hits += check_all(cache, &built.histories[db], db, rng)?;
    }
    Ok(Some((hits, discarded)))
}

fn campaign(seed: u64, files: u64, deadline: Option<Instant>, tally: &mut Tally) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let built = build(&mut rng, BYTES, SLOTS);
    for i in 0.. {
        if deadline.map_or(i >= files, |d| Instant::now() >= d && i > 0) {
            break;
        }
        let case_seed = rng.u64(..);
        let mut case_rng = fastrand::Rng::with_seed(case_seed);
        let (what, bytes) = damage(&mut case_rng, &built);
        tally.files += 1;
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exercise(&bytes, &built, &mut case_rng)));
        let at = format!("seed {seed} case {case_seed} ({what:?})");
        match run {
            Ok(Ok(None)) => tally.refused += 1,
            Ok(Ok(Some((hits, discarded)))) => {
                tally.reattached += 1;
                tally.hits += hits;
                tally.discarded += discarded;
            }
            Ok(Err(wrong)) => tally.wrong.push(format!("{at}: {wrong}")),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                tally.panics.push(format!("{at}: panic: {msg}"));
            }
        }
    }
}

/// Replays one damaged file (`TIDECACHE_FUZZ_SEED=<seed>:<case>`).
fn replay(seed: u64, case: u64) -> Result<Option<(u64, u64)>, String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let built = build(&mut rng, BYTES, SLOTS);
    let mut case_rng = fastrand::Rng::with_seed(case);
    let (what, bytes) = damage(&mut case_rng, &built);
    eprintln!("replaying {what:?}");
    exercise(&bytes, &built, &mut case_rng)
}

#[test]
fn damaged_arena_files_never_crash_and_never_give_a_wrong_hit() {
    if let Some((seed, case)) = std::env::var("TIDECACHE_FUZZ_SEED").ok().and_then(|s| {
        s.split_once(':')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
    }) {
        let out = replay(seed, case);
        assert!(out.is_ok(), "{out:?}");
        return;
    }
    let soak: Option<u64> = std::env::var("TIDECACHE_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let mut tally = Tally::default();
    match soak {
        None => {
            for _ in 0..3 {
                campaign(fastrand::u64(..), 100, None, &mut tally);
            }
        }
        Some(secs) => {
            let end = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < end {
                // A fresh arena every 500 files.
                let seed = fastrand::u64(..);
                let round_end = end.min(Instant::now() + Duration::from_secs(20));
                campaign(seed, 0, Some(round_end), &mut tally);
            }
        }
    }
    println!(
        "SOAK corrupt files: corrupt files tried {} (refused {}, re-attached {}), hits checked {}, records discarded {}, wrong hits {}, crashes {}",
        tally.files,
        tally.refused,
        tally.reattached,
        tally.hits,
        tally.discarded,
        tally.wrong.len(),
        tally.panics.len()
    );
    let failures: Vec<&String> = tally.wrong.iter().chain(&tally.panics).take(20).collect();
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(tally.hits > 0, "the campaign checked no hit at all");
}

// ----- findings of the campaign, each pinned by a minimal case -----

/// A fresh 1 MiB arena (heap) with database "db" whose log starts at 10.
fn fresh() -> (Arc<SharedArena>, ArenaCache) {
    let g = Geometry::for_size(BYTES, SLOTS).unwrap();
    let arena = SharedArena::new(ArenaWriter::create(Arc::new(Memory::heap(g.file_bytes)), g, 1));
    let db = arena.database("db").unwrap();
    db.start_log(Tid(10));
    (arena, db)
}

/// The arena's bytes with bit `bit` of word `word` flipped, re-attached.
fn reopen_flipped(arena: &SharedArena, word: usize, bit: u32) -> (Arc<SharedArena>, ArenaCache) {
    let mut bytes = words_to_bytes(arena.writer().memory());
    bytes[word * 8 + (bit / 8) as usize] ^= 1 << (bit % 8);
    let (writer, _) = ArenaWriter::recover(memory_of(&bytes), 2).unwrap();
    let arena = SharedArena::new(writer);
    let db = arena.database("db").unwrap();
    (arena, db)
}

/// Finding 1: a report closing a revision whose record a restart left
/// damaged (and not verified yet) wrote a fresh CRC over the damaged
/// bytes, which made them a hit.
#[test]
fn closing_a_damaged_record_of_a_reopened_file_never_makes_it_a_hit() {
    let (arena, db) = fresh();
    db.store(Oid(1), Tid(5), None, Tid(10), b"the true state of oid 1")
        .unwrap();
    db.report(Tid(10), Tid(20), &[]).unwrap();
    let (at, _, _) = arena.writer().revisions(db.slot(), 1)[0];
    // One bit of the state, as a damaged page would leave it.
    let (arena, db) = reopen_flipped(&arena, at + layout::RECORD_HEADER_WORDS, 3);
    assert!(db.lookup(Oid(1), Tid(20)).is_none(), "the CRC refuses it");
    db.report(Tid(20), Tid(30), &[(Oid(1), Tid(25))]).unwrap();
    if let Some(hit) = db.lookup(Oid(1), Tid(24)) {
        assert_eq!(hit.state, b"the true state of oid 1", "a damaged state served as a hit");
    }
    assert_eq!(
        arena.writer().verify_next().map(|(_, d)| d),
        Some(0),
        "removed when closed"
    );
}

/// Finding 2: a damaged length word (8 MiB more state than a 1 MiB file
/// holds) made the writer read past the end of the mapping when a report closed the
/// revision (a panic, the sidecar's connection thread gone with the
/// arena's lock poisoned).
#[test]
fn a_damaged_length_at_the_end_of_the_file_is_never_read_past() {
    let (arena, db) = fresh();
    let oid = 7;
    db.store(Oid(oid), Tid(5), None, Tid(10), &[7; 1000]).unwrap();
    let (at, _, _) = arena.writer().revisions(db.slot(), oid)[0];
    db.report(Tid(10), Tid(20), &[]).unwrap();
    // Bit 23 of the length: the record claims 8 MiB more state.
    let (_arena, db) = reopen_flipped(&arena, at + layout::record::LENGTH, 23);
    assert!(db.lookup(Oid(oid), Tid(20)).is_none());
    db.report(Tid(20), Tid(30), &[(Oid(oid), Tid(25))]).unwrap();
    assert!(db.lookup(Oid(oid), Tid(24)).is_none());
}
