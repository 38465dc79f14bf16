//! The view registry's low-water mark under concurrent register, advance
//! and release (invariant 5: nothing a registered view can see is
//! reclaimed, so the low-water mark must never pass a registered view).

#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use tidecache_core::{Tid, ViewRegistry};

#[test]
fn low_water_mark_never_passes_a_registered_view() {
    tidecache_loom_tests::check(|| {
        let r = Arc::new(ViewRegistry::new());
        let old = r.register(Tid(5));
        let a = {
            let r = r.clone();
            thread::spawn(move || {
                let v = r.register(Tid(3));
                // While registered, the low-water mark is at most 3.
                assert!(r.low_water_mark().unwrap() <= Tid(3));
                r.advance(v, Tid(7)).unwrap();
                assert!(r.low_water_mark().unwrap() <= Tid(7));
                r.release(v).unwrap();
            })
        };
        let b = {
            let r = r.clone();
            thread::spawn(move || {
                r.advance(old, Tid(6)).unwrap();
                assert!(r.low_water_mark().unwrap() <= Tid(6));
            })
        };
        // A reader: whatever it sees is some registered view's tid, never
        // above the old view's (5, then 6).
        let seen = r.low_water_mark().unwrap();
        assert!(seen <= Tid(6), "low-water mark {seen:?} passed a registered view");
        a.join().unwrap();
        b.join().unwrap();
        assert_eq!(r.low_water_mark(), Some(Tid(6)));
        r.release(old).unwrap();
        assert_eq!(r.low_water_mark(), None);
    });
}
