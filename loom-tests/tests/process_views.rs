//! A process's views and the one minimum its sender publishes: after
//! concurrent register, advance and release from several threads and the
//! sender's reads, no decrease of the minimum is lost (invariant 5: the
//! sidecar's low-water mark must not pass a view; a decrease is published
//! because the change that made it woke the sender, or the sender's read
//! came after it).

#![cfg(loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use tidecache_core::{Change, ProcessViews};

#[test]
fn the_published_minimum_never_loses_a_decrease() {
    tidecache_loom_tests::check(|| {
        let v = Arc::new(ProcessViews::default());
        let (first, c) = v.register(10);
        assert_eq!(c, Change::Wake);
        assert_eq!(v.take(), Some(10));
        // Wakes asked for and not yet served by the sender.
        let wakes = Arc::new(AtomicUsize::new(0));
        let a = {
            let (v, wakes) = (v.clone(), wakes.clone());
            thread::spawn(move || {
                let (id, c) = v.register(4);
                if c == Change::Wake {
                    wakes.fetch_add(1, Ordering::SeqCst);
                }
                v.release(id);
                let (_, c) = v.register(6);
                if c == Change::Wake {
                    wakes.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        let b = {
            let (v, wakes) = (v.clone(), wakes.clone());
            thread::spawn(move || {
                // An increase of its own; it may still find another
                // thread's decrease unpublished (the sender cleared the
                // flag and has not read yet) and be the one to wake it.
                if v.advance(first, 12) == Change::Wake {
                    wakes.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        // The sender, concurrently: one read.
        let _ = v.take();
        a.join().unwrap();
        b.join().unwrap();
        // No lost update: unless a wake is still due (dirty), the published
        // minimum is at or below every open view.
        let truth = v.minimum();
        assert_eq!(truth, Some(6));
        if !v.is_dirty() {
            let published = v.published().expect("a view is open: one was published");
            assert!(published <= 6, "published {published} passed the open view at 6");
        } else {
            assert!(
                wakes.load(Ordering::SeqCst) >= 1,
                "dirty, but nobody was told to wake the sender"
            );
        }
        // The sender's next read (it was woken, or ticks) publishes the truth.
        assert_eq!(v.take(), truth);
    });
}
