//! The arena's reader/writer protocol (`tidecache_core::arena`): the single
//! writer recycles the segment holding a revision (unlinks it, makes the
//! segment's generation odd, takes it into use again with a new generation
//! and writes another revision of the same oid over the same words) while a
//! reader follows a pointer into it. In every interleaving the reader gets
//! the old revision whole, the new one whole, or a miss.
//!
//! The first model checks the generation protocol alone (no CRC): it is
//! what makes a torn copy impossible, the CRC only guards against damage.
//! It fails without the writer's generation bump, without the Release fence
//! that follows it, or without the reader's second generation load (each
//! tried).

#![cfg(loom)]

use loom::thread;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tidecache_core::arena::{reader, ArenaWriter, Geometry, Memory, Slot};

const OLD: &[u8; 16] = b"old one!old one!";
const NEW: &[u8; 16] = b"new one!new one!";

/// Four segments of one 16-byte record each; oid 1 (serial 1) in segment 0,
/// oids 3 and 4 in segments 1 and 2: the next store recycles segment 0.
fn arena() -> (Geometry, Arc<Memory>, ArenaWriter, Slot) {
    let g = Geometry::small(4, 4 + 5 + 2);
    let memory = Arc::new(Memory::heap(g.file_bytes));
    let mut w = ArenaWriter::create(memory.clone(), g, 1);
    let slot = w.attach_database("m").unwrap();
    w.publish_horizon(slot, 10);
    w.insert(slot, 1, 1, u64::MAX, OLD).unwrap();
    w.insert(slot, 3, 1, u64::MAX, OLD).unwrap();
    w.insert(slot, 4, 1, u64::MAX, OLD).unwrap();
    (g, memory, w, slot)
}

fn whole(serial: u64, state: &[u8]) -> bool {
    (serial, state) == (1, &OLD[..]) || (serial, state) == (2, &NEW[..])
}

#[test]
fn the_generation_protocol_alone_rejects_torn_copies() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    tidecache_loom_tests::check(|| {
        RUNS.fetch_add(1, Ordering::Relaxed);
        let (g, memory, mut w, slot) = arena();
        let writer = thread::spawn(move || {
            w.insert(slot, 1, 2, u64::MAX, NEW).unwrap();
            assert_eq!(w.stats().evicted, 1, "segment 0 was recycled");
        });
        if let Ok(found) = reader::locate_visible(memory.words(), &g, slot, 1, 10) {
            let mut buf = vec![0u8; found.len()];
            if found.copy_unchecked(memory.words(), &mut buf) {
                assert!(
                    whole(found.serial, &buf),
                    "torn copy accepted: serial {} {:?}",
                    found.serial,
                    buf
                );
            }
        }
        writer.join().unwrap();
    });
    assert!(RUNS.load(Ordering::Relaxed) > 10);
}

#[test]
fn a_lookup_never_returns_a_torn_or_reused_record() {
    tidecache_loom_tests::check(|| {
        let (g, memory, mut w, slot) = arena();
        let writer = thread::spawn(move || {
            w.insert(slot, 1, 2, u64::MAX, NEW).unwrap();
        });
        if let Ok(f) = reader::lookup(memory.words(), &g, slot, 1, 10) {
            assert!(whole(f.serial, &f.state), "torn record: {f:?}");
        }
        if let Ok(f) = reader::lookup(memory.words(), &g, slot, 3, 10) {
            assert_eq!(f.state, OLD, "a record of another segment");
        }
        writer.join().unwrap();
        assert_eq!(reader::lookup(memory.words(), &g, slot, 1, 10).unwrap().state, NEW);
    });
}

/// The reader loads the slot's state, its horizon and its state again
/// while the writer flushes the database (horizon 0, then a new
/// generation) and publishes a lower horizon for the new generation: the
/// reader gets a pair that existed, horizon 0 (a miss: the flush clears
/// the horizon first), or nothing; never the new generation
/// with the old horizon (which would serve the new generation's open
/// revisions past its own horizon) nor the old one with the new.
#[test]
fn a_reader_never_pairs_a_generation_with_another_ones_horizon() {
    tidecache_loom_tests::check(|| {
        let g = Geometry::small(4, 4 + 5 + 2);
        let memory = Arc::new(Memory::heap(g.file_bytes));
        let mut w = ArenaWriter::create(memory.clone(), g, 1);
        let slot = w.attach_database("m").unwrap();
        w.publish_horizon(slot, 100);
        let writer = thread::spawn(move || {
            w.flush_database(slot);
            w.publish_horizon(slot, 50);
        });
        if let Some(seen) = reader::database(memory.words(), &g, slot) {
            assert!(
                seen.1 == 0 || seen == (1, 100) || seen == (2, 50),
                "generation and horizon of different states: {seen:?}"
            );
        }
        writer.join().unwrap();
    });
}
