//! The arena record's reader/writer validation protocol
//! (`tidecache_core::arena::record`): the single writer reuses a record
//! while a reader copies it. In every interleaving the reader gets the old
//! record whole, the new one whole, or a miss; never a mix.

#![cfg(loom)]

use loom::sync::atomic::AtomicU64;
use loom::sync::Arc;
use loom::thread;
use tidecache_core::arena::{record::words_for, RecordWords};

#[test]
fn a_reader_never_accepts_a_record_being_reused() {
    tidecache_loom_tests::check(|| {
        let words: Arc<Vec<AtomicU64>> = Arc::new((0..words_for(8)).map(|_| AtomicU64::new(0)).collect());
        assert!(RecordWords::new(&words).unwrap().write(1, 10, None, b"old one!"));
        let writer = {
            let words = words.clone();
            thread::spawn(move || {
                let r = RecordWords::new(&words).unwrap();
                r.write(2, 20, Some(30), b"new one!");
                r.set_end(40);
            })
        };
        let r = RecordWords::new(&words).unwrap();
        if let Some(rec) = r.read() {
            let h = rec.header;
            let whole_old = (h.oid, h.serial, h.end, rec.state.as_slice()) == (1, 10, None, b"old one!".as_slice());
            let whole_new = (h.oid, h.serial, rec.state.as_slice()) == (2, 20, b"new one!".as_slice())
                && (h.end == Some(30) || h.end == Some(40));
            assert!(whole_old || whole_new, "torn record accepted: {rec:?}");
        }
        writer.join().unwrap();
        let last = r.read().unwrap();
        assert_eq!((last.header.oid, last.header.end), (2, Some(40)));
    });
}
