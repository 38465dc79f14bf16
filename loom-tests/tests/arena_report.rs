//! The arena's report ordering, the path the sidecar runs
//! (`tidecache_core::arena::ArenaCache`): a report closes the revisions it
//! ends (`end`, then the CRC word) before it publishes the new horizon
//! (Release); a lookup loads the horizon (Acquire) before any record.
//!
//! Oid 1 has revision 1 (current at view 1) and is changed at tid 2. A
//! store of revision 1 as current, the report of the change, and lookups
//! race. In every interleaving a lookup at view 2 misses (revision 2 is not
//! cached; revision 1 is not visible there) and one at view 1 returns
//! revision 1 or nothing. The first model fails if `ArenaCache::report`
//! publishes the horizon before closing (tried); the second shows a store
//! that arrives after the report is closed by the log (invariant 3).

#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use tidecache_core::arena::{ArenaCache, ArenaWriter, Geometry, Memory, SharedArena};
use tidecache_core::{Oid, Tid};

fn database() -> Arc<ArenaCache> {
    let g = Geometry::small(4, 64);
    let arena = SharedArena::new(ArenaWriter::create(
        std::sync::Arc::new(Memory::heap(g.file_bytes)),
        g,
        1,
    ));
    let db = arena.database("m").unwrap();
    db.start_log(Tid(1));
    Arc::new(db)
}

#[test]
fn a_closed_revision_is_never_served_past_its_end() {
    tidecache_loom_tests::check(|| {
        let db = database();
        db.store(Oid(1), Tid(1), None, Tid(1), b"r1").unwrap();
        let report = {
            let db = db.clone();
            thread::spawn(move || {
                db.report(Tid(1), Tid(2), &[(Oid(1), Tid(2))]).unwrap();
            })
        };
        let at2 = db.lookup(Oid(1), Tid(2));
        assert!(at2.is_none(), "wrong hit at view 2: {at2:?}");
        if let Some(hit) = db.lookup(Oid(1), Tid(1)) {
            assert_eq!(hit.serial, 1);
        }
        report.join().unwrap();
        assert!(db.lookup(Oid(1), Tid(2)).is_none());
        assert_eq!(db.lookup(Oid(1), Tid(1)).map(|h| h.end), Some(Some(2)));
    });
}

#[test]
fn an_open_revision_stored_after_the_report_is_closed_by_the_log() {
    tidecache_loom_tests::check(|| {
        let db = database();
        let late_store = {
            let db = db.clone();
            // Loaded at view 1 when revision 1 was current; arrives whenever.
            thread::spawn(move || {
                db.store(Oid(1), Tid(1), None, Tid(1), b"r1").unwrap();
            })
        };
        db.report(Tid(1), Tid(2), &[(Oid(1), Tid(2))]).unwrap();
        assert!(db.lookup(Oid(1), Tid(2)).is_none());
        late_store.join().unwrap();
        assert!(db.lookup(Oid(1), Tid(2)).is_none());
        assert_eq!(db.lookup(Oid(1), Tid(1)).map(|h| h.serial), Some(1));
    });
}

/// A collapsed report (oid 1 changed somewhere in `(1, 3]`) races lookups:
/// the open revision 1 is closed at the prior horizon + 1 before the new
/// horizon 3 is published, so a view in `(1, 3]` never sees it, in any
/// interleaving. Fails if `ArenaCache::report_collapsed` publishes the
/// horizon before closing.
#[test]
fn a_collapsed_report_never_lets_an_open_revision_answer_past_the_prior_horizon() {
    tidecache_loom_tests::check(|| {
        let db = database();
        db.store(Oid(1), Tid(1), None, Tid(1), b"r1").unwrap();
        let report = {
            let db = db.clone();
            thread::spawn(move || {
                db.report_collapsed(Tid(1), Tid(3), &[(Oid(1), Tid(3))]).unwrap();
            })
        };
        let at3 = db.lookup(Oid(1), Tid(3));
        assert!(at3.is_none(), "wrong hit at view 3: {at3:?}");
        let at2 = db.lookup(Oid(1), Tid(2));
        assert!(at2.is_none(), "wrong hit at view 2: {at2:?}");
        report.join().unwrap();
        assert!(db.lookup(Oid(1), Tid(2)).is_none());
        assert_eq!(db.lookup(Oid(1), Tid(1)).map(|h| h.end), Some(Some(2)));
    });
}

/// A store loaded at view 1 races the collapsed report of `(1, 3]`: before
/// it, the report closes it; after it, the log refuses it (loaded inside
/// the uncertain interval). Views 2 and 3 never see it.
#[test]
fn an_open_store_racing_a_collapsed_report_never_answers_past_the_prior_horizon() {
    tidecache_loom_tests::check(|| {
        let db = database();
        let late_store = {
            let db = db.clone();
            thread::spawn(move || {
                db.store(Oid(1), Tid(1), None, Tid(1), b"r1").unwrap();
            })
        };
        db.report_collapsed(Tid(1), Tid(3), &[(Oid(1), Tid(3))]).unwrap();
        assert!(db.lookup(Oid(1), Tid(3)).is_none());
        late_store.join().unwrap();
        assert!(db.lookup(Oid(1), Tid(2)).is_none());
        assert!(db.lookup(Oid(1), Tid(3)).is_none());
        if let Some(hit) = db.lookup(Oid(1), Tid(1)) {
            assert_eq!((hit.serial, hit.end), (1, Some(2)));
        }
    });
}
