//! The snapshot cache under real threads (the production skiplist and
//! moka, which loom does not model): a writer commits and reports, loaders
//! store what `loadBefore` gave them, readers look up at random views and
//! check every hit against the history, a reclaimer reclaims, and the size
//! bound evicts. Zero wrong hits, and plenty of hits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tidecache_core::{Database, Oid, Tid, ENTRY_OVERHEAD};

const OIDS: u64 = 64;

#[derive(Default)]
struct History {
    revisions: HashMap<u64, Vec<u64>>,
    last: u64,
}

impl History {
    fn load_before(&self, oid: u64, view: u64) -> Option<(u64, Option<u64>)> {
        let s = self.revisions.get(&oid)?;
        let i = s.partition_point(|&x| x <= view);
        (i > 0).then(|| (s[i - 1], s.get(i).copied()))
    }
}

fn state_of(oid: u64, serial: u64) -> Vec<u8> {
    format!("{oid}@{serial}").into_bytes()
}

/// A small xorshift generator: each thread its own, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
fn concurrent_commits_stores_lookups_and_reclamation_never_give_a_wrong_hit() {
    // Room for about 200 revisions: the size bound evicts all the time.
    let db: Arc<Database<Vec<u8>>> = Arc::new(Database::new(200 * (ENTRY_OVERHEAD as u64 + 16)));
    let history = Arc::new(RwLock::new(History::default()));
    {
        let mut h = history.write().unwrap();
        h.last = 1;
        for oid in 0..OIDS {
            h.revisions.insert(oid, vec![1]);
        }
    }
    db.attach(Tid(1), None);
    let stop = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(AtomicU64::new(0));
    let commits = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();

    // Writer: commit to the history first (the storage knows), then report.
    {
        let (db, history, stop, commits) = (db.clone(), history.clone(), stop.clone(), commits.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(7);
            let mut reported = 1;
            while !stop.load(Ordering::Relaxed) {
                let tid = {
                    let mut h = history.write().unwrap();
                    h.last += 1 + rng.below(2);
                    let tid = h.last;
                    for _ in 0..1 + rng.below(3) {
                        let oid = rng.below(OIDS);
                        let revs = h.revisions.get_mut(&oid).unwrap();
                        if *revs.last().unwrap() != tid {
                            revs.push(tid);
                        }
                    }
                    tid
                };
                let changes: Vec<(Oid, Tid)> = {
                    let h = history.read().unwrap();
                    h.revisions
                        .iter()
                        .filter(|(_, s)| s.iter().any(|&t| t > reported && t <= tid))
                        .flat_map(|(&o, s)| {
                            s.iter()
                                .filter(|&&t| t > reported && t <= tid)
                                .map(move |&t| (Oid(o), Tid(t)))
                        })
                        .collect()
                };
                db.report(Tid(reported), Tid(tid), &changes).unwrap();
                reported = tid;
                commits.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200));
            }
        }));
    }
    // Loaders: loadBefore at a recent view, store, with the view registered.
    for seed in 0..2u64 {
        let (db, history, stop) = (db.clone(), history.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(11 + seed);
            while !stop.load(Ordering::Relaxed) {
                let (oid, view, found) = {
                    let h = history.read().unwrap();
                    let view = h.last.saturating_sub(rng.below(20)).max(1);
                    let oid = rng.below(OIDS);
                    (oid, view, h.load_before(oid, view))
                };
                let v = db.register_view(Tid(view));
                if let Some((serial, end)) = found {
                    db.store(
                        Oid(oid),
                        Tid(serial),
                        end.map(Tid),
                        Tid(view),
                        Arc::new(state_of(oid, serial)),
                    )
                    .unwrap();
                }
                db.release_view(v).unwrap();
            }
        }));
    }
    // Readers: every hit must be the history's answer at its view.
    for seed in 0..2u64 {
        let (db, history, stop, hits) = (db.clone(), history.clone(), stop.clone(), hits.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(101 + seed);
            while !stop.load(Ordering::Relaxed) {
                let last = history.read().unwrap().last;
                let view = last.saturating_sub(rng.below(30));
                let oid = rng.below(OIDS);
                if let Some(hit) = db.lookup(Oid(oid), Tid(view)) {
                    hits.fetch_add(1, Ordering::Relaxed);
                    let truth = history.read().unwrap().load_before(oid, view).unwrap();
                    assert_eq!(hit.serial.0, truth.0, "wrong hit: oid {oid} at view {view}");
                    assert_eq!(*hit.state, state_of(oid, truth.0));
                    if let Some(end) = hit.end {
                        assert_eq!(Some(end.0), truth.1, "wrong end: oid {oid} at view {view}");
                    }
                }
            }
        }));
    }
    // Reclaimer.
    {
        let (db, stop) = (db.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                db.reclaim();
                std::thread::sleep(Duration::from_millis(1));
            }
        }));
    }
    // The run ends on work done, not on time: at least 5,000 commits, 1,000
    // hits and some eviction or reclamation, whatever the scheduler does.
    // The bound only turns a stuck run into a failure with a message.
    let enough = || {
        let s = db.stats();
        commits.load(Ordering::Relaxed) >= 5_000
            && hits.load(Ordering::Relaxed) >= 1_000
            && (s.cache.evicted > 0 || s.cache.reclaimed > 0)
    };
    let t = Instant::now();
    while !enough() {
        std::thread::sleep(Duration::from_millis(20));
        if threads.iter().any(|t| t.is_finished()) {
            break; // a thread panicked: stop and report it
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "no progress: {} commits, {} hits, {:?}",
            commits.load(Ordering::Relaxed),
            hits.load(Ordering::Relaxed),
            db.stats()
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a thread found a wrong hit or failed");
    }
    let s = db.stats();
    assert!(hits.load(Ordering::Relaxed) >= 1_000);
    assert!(s.cache.evicted > 0 || s.cache.reclaimed > 0, "{s:?}");
}
