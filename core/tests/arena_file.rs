//! The arena in a real file: re-attaching it after the writer went away
//! without a word (as after `kill -9`), and refusing files that are
//! truncated, damaged or of another layout version.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;
use tidecache_core::arena::{layout, ArenaWriter, Geometry, LayoutError, Memory, SharedArena};
use tidecache_core::{Oid, Tid};

const BYTES: u64 = 4 << 20;

/// Builds an arena file: database "db" with horizon 20, oid 1 closed
/// `[5, 12)`, oid 2 open since 5, oid 3 open since 15.
fn build(path: &Path) {
    let memory = Arc::new(Memory::create_file(path, BYTES, None).unwrap());
    let g = Geometry::for_size(BYTES, 8).unwrap();
    let arena = SharedArena::new(ArenaWriter::create(memory, g, 1));
    let db = arena.database("db").unwrap();
    db.start_log(Tid(10));
    db.store(Oid(1), Tid(5), Some(Tid(12)), Tid(10), b"closed").unwrap();
    db.store(Oid(2), Tid(5), None, Tid(10), b"open").unwrap();
    db.report(Tid(10), Tid(20), &[(Oid(9), Tid(15))]).unwrap();
    db.store(Oid(3), Tid(15), None, Tid(20), b"open too").unwrap();
    // Dropped without any shutdown: what kill -9 leaves.
}

fn reopen(path: &Path) -> Result<(Arc<SharedArena>, tidecache_core::arena::Recovered), LayoutError> {
    let memory = Arc::new(Memory::open_file(path, None).unwrap());
    let (writer, report) = ArenaWriter::recover(memory, 2)?;
    Ok((SharedArena::new(writer), report))
}

#[test]
fn a_reopened_arena_answers_at_once_within_its_persisted_horizon() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.arena");
    build(&path);
    let (arena, report) = reopen(&path).unwrap();
    assert_eq!((report.databases, report.damaged_databases), (1, 0));
    assert_eq!(arena.stats().entries, 0, "records are counted once verified");
    let db = arena.database("db").unwrap();
    assert_eq!(db.horizon(), Some(Tid(20)), "the log restarts at the persisted horizon");
    // Closed revisions answer at any view in their interval.
    assert_eq!(db.lookup(Oid(1), Tid(11)).unwrap().state, b"closed");
    // Open ones only up to the persisted horizon, until a report moves it.
    assert_eq!(db.lookup(Oid(2), Tid(20)).unwrap().state, b"open");
    assert!(db.lookup(Oid(2), Tid(21)).is_none());
    // The first adapter supplies (20, 30]: oid 2 changed at 25.
    db.report(Tid(20), Tid(30), &[(Oid(2), Tid(25))]).unwrap();
    assert_eq!(db.lookup(Oid(2), Tid(24)).unwrap().end, Some(25));
    assert!(db.lookup(Oid(2), Tid(25)).is_none());
    assert_eq!(db.lookup(Oid(3), Tid(30)).unwrap().state, b"open too");
    // Verification finds nothing wrong.
    let mut w = arena.writer();
    assert!(w.stats().unverified_segments > 0);
    let total = verify_all(&mut w);
    assert_eq!(total, (3, 0));
    assert_eq!(w.stats().unverified_segments, 0);
    assert_eq!(w.stats().entries, 3);
    assert_eq!(w.slot_usage(db.slot().index).0, 3);
}

/// Verifies every segment a restart left unverified: `(checked, discarded)`.
fn verify_all(w: &mut ArenaWriter) -> (u64, u64) {
    let mut total = (0, 0);
    while let Some((checked, discarded)) = w.verify_next() {
        total = (total.0 + checked, total.1 + discarded);
    }
    total
}

fn flip(path: &Path, at: u64) {
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x40;
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&b).unwrap();
}

#[test]
fn a_damaged_record_is_discarded_by_verification_and_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.arena");
    build(&path);
    let (arena, _) = reopen(&path).unwrap();
    let (at, _, _) = {
        let w = arena.writer();
        let slot = w.slot(0).unwrap();
        w.revisions(slot, 2)[0]
    };
    drop(arena);
    // A bit flipped in oid 2's state, on disk.
    flip(&path, (at + layout::RECORD_HEADER_WORDS) as u64 * 8 + 1);
    let (arena, _) = reopen(&path).unwrap();
    let db = arena.database("db").unwrap();
    assert!(db.lookup(Oid(2), Tid(20)).is_none(), "a damaged record is a miss");
    let mut w = arena.writer();
    assert_eq!(verify_all(&mut w).1, 1);
    assert_eq!(w.stats().discarded, 1);
    assert_eq!(w.stats().entries, 2);
    drop(w);
    assert_eq!(db.lookup(Oid(1), Tid(11)).unwrap().state, b"closed");
}

#[test]
fn a_damaged_database_slot_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.arena");
    build(&path);
    let g = Geometry::for_size(BYTES, 8).unwrap();
    // The horizon word of slot 0.
    flip(&path, (g.db_slot_word(0) + layout::db_slot::HORIZON) as u64 * 8 + 2);
    let (arena, report) = reopen(&path).unwrap();
    assert_eq!((report.databases, report.damaged_databases), (0, 1));
    let db = arena.database("db").unwrap();
    assert_eq!(db.horizon(), None);
    assert!(db.lookup(Oid(1), Tid(11)).is_none());
}

#[test]
fn truncated_damaged_and_foreign_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.arena");
    build(&path);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(BYTES - 4096)
        .unwrap();
    assert!(matches!(reopen(&path), Err(LayoutError::Length { .. })));

    build(&path);
    flip(&path, layout::header::SEGMENTS as u64 * 8);
    assert_eq!(reopen(&path).err(), Some(LayoutError::HeaderChecksum));

    build(&path);
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(layout::header::VERSION as u64 * 8)).unwrap();
    // A file of layout version 1 (no slot identities) is refused.
    f.write_all(&1u64.to_ne_bytes()).unwrap();
    drop(f);
    assert!(matches!(reopen(&path), Err(LayoutError::Version { found: 1, .. })));
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(8)).unwrap();
    let other = layout::LAYOUT_VERSION + 5;
    f.write_all(&other.to_ne_bytes()).unwrap();
    drop(f);
    assert!(matches!(reopen(&path), Err(LayoutError::Version { found, .. }) if found == other));

    std::fs::write(&path, vec![0u8; BYTES as usize]).unwrap();
    assert_eq!(reopen(&path).err(), Some(LayoutError::Magic));
}

#[test]
fn after_a_reboot_only_verified_closed_revisions_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.arena");
    build(&path);
    // Within the same boot: the horizon and open revisions stay.
    let (arena, report) = reopen(&path).unwrap();
    assert!(!report.rebooted);
    assert_eq!(arena.database("db").unwrap().horizon(), Some(Tid(20)));
    drop(arena);
    // Another boot id in the header: the file may be torn.
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(layout::header::BOOT_ID as u64 * 8)).unwrap();
    f.write_all(&[0xa5; 16]).unwrap();
    drop(f);
    let (arena, report) = reopen(&path).unwrap();
    assert!(report.rebooted);
    assert_eq!(report.discarded, 2, "the two open revisions");
    assert_eq!(arena.stats().unverified_segments, 0, "verified before serving");
    assert_eq!(arena.stats().entries, 1);
    let db = arena.database("db").unwrap();
    assert_eq!(db.horizon(), None, "the log restarts empty");
    db.start_log(Tid(30));
    assert_eq!(db.lookup(Oid(1), Tid(11)).unwrap().state, b"closed");
    assert!(db.lookup(Oid(2), Tid(30)).is_none());
    assert!(db.lookup(Oid(3), Tid(30)).is_none());
    // The boot id is this boot's again: a second re-attach keeps the log.
    db.report(Tid(30), Tid(40), &[]).unwrap();
    drop((db, arena));
    let (arena, report) = reopen(&path).unwrap();
    assert!(!report.rebooted || tidecache_core::arena::boot::current() == [0, 0]);
    if !report.rebooted {
        assert_eq!(arena.database("db").unwrap().horizon(), Some(Tid(40)));
    }
}
