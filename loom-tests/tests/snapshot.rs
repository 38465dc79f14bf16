//! The in-process snapshot cache's insert / invalidate / reclaim race
//! (`SnapshotCache`, kept for the shared-state layer; the sidecar's arena
//! has its own model in `arena_report.rs`).
//!
//! Oid 1 has revision 1 (current at view 1) and is changed at tid 2. A
//! store of revision 1 as current, the report of the change, reclamation,
//! and lookups run concurrently. In every interleaving, a lookup at view 2
//! must miss (revision 2 is not cached; revision 1 is not visible there)
//! and a lookup at view 1 may only return revision 1. This is what the
//! ordering protocol of `tidecache_core::snapshot` (close, then publish the
//! horizon; load the horizon, then read `end`) and the writer lock around
//! the store check guarantee.

#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use tidecache_core::{Database, Oid, Tid};

#[test]
fn a_closed_revision_is_never_served_past_its_end() {
    tidecache_loom_tests::check(|| {
        let db: Arc<Database<Vec<u8>>> = Arc::new(Database::new(1 << 20));
        db.attach(Tid(1), None);
        let store = {
            let db = db.clone();
            thread::spawn(move || {
                db.store(Oid(1), Tid(1), None, Tid(1), std::sync::Arc::new(b"r1".to_vec()))
                    .unwrap();
            })
        };
        let report = {
            let db = db.clone();
            thread::spawn(move || {
                db.report(Tid(1), Tid(2), &[(Oid(1), Tid(2))]).unwrap();
                db.reclaim();
            })
        };
        let reader = {
            let db = db.clone();
            thread::spawn(move || {
                let at2 = db.lookup(Oid(1), Tid(2));
                assert!(at2.is_none(), "wrong hit at view 2: {at2:?}");
                if let Some(hit) = db.lookup(Oid(1), Tid(1)) {
                    assert_eq!(hit.serial, Tid(1));
                }
            })
        };
        store.join().unwrap();
        report.join().unwrap();
        reader.join().unwrap();
        assert!(db.lookup(Oid(1), Tid(2)).is_none());
    });
}

#[test]
fn an_open_revision_stored_after_the_report_is_closed_by_the_log() {
    tidecache_loom_tests::check(|| {
        let db: Arc<Database<Vec<u8>>> = Arc::new(Database::new(1 << 20));
        db.attach(Tid(1), None);
        let late_store = {
            let db = db.clone();
            // Loaded at view 1 when revision 1 was current; arrives whenever.
            thread::spawn(move || {
                db.store(Oid(1), Tid(1), None, Tid(1), std::sync::Arc::new(b"r1".to_vec()))
                    .unwrap();
            })
        };
        db.report(Tid(1), Tid(2), &[(Oid(1), Tid(2))]).unwrap();
        assert!(db.lookup(Oid(1), Tid(2)).is_none());
        late_store.join().unwrap();
        assert!(db.lookup(Oid(1), Tid(2)).is_none());
        assert_eq!(db.lookup(Oid(1), Tid(1)).map(|h| h.serial), Some(Tid(1)));
    });
}

/// A collapsed report (oid 1 changed somewhere in `(1, 3]`) races a store
/// of revision 1 loaded at view 1 and a reader: the open revision is closed
/// at 2 before horizon 3 is published, or refused by the log if it comes
/// after; views 2 and 3 never see it.
#[test]
fn a_collapsed_report_never_lets_an_open_revision_answer_past_the_prior_horizon() {
    tidecache_loom_tests::check(|| {
        let db: Arc<Database<Vec<u8>>> = Arc::new(Database::new(1 << 20));
        db.attach(Tid(1), None);
        let store = {
            let db = db.clone();
            thread::spawn(move || {
                db.store(Oid(1), Tid(1), None, Tid(1), std::sync::Arc::new(b"r1".to_vec()))
                    .unwrap();
            })
        };
        let report = {
            let db = db.clone();
            thread::spawn(move || {
                db.report_collapsed(Tid(1), Tid(3), &[(Oid(1), Tid(3))]).unwrap();
            })
        };
        for view in [3, 2] {
            let hit = db.lookup(Oid(1), Tid(view));
            assert!(hit.is_none(), "wrong hit at view {view}: {hit:?}");
        }
        store.join().unwrap();
        report.join().unwrap();
        assert!(db.lookup(Oid(1), Tid(2)).is_none());
        if let Some(hit) = db.lookup(Oid(1), Tid(1)) {
            assert_eq!((hit.serial, hit.end), (Tid(1), Some(Tid(2))));
        }
    });
}
