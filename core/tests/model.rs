//! Property tests of both caches (the in-process `SnapshotCache` and the
//! shared-memory `ArenaCache`) against a reference model.
//!
//! The model is the whole history of a small database, kept plainly: every
//! revision of every oid, in commit order. Its `load_before` is exact. Random
//! programs of commits, reports (contiguous, duplicated, and with gaps),
//! loads at random views whose stores arrive late and out of order, view
//! register / advance / release, reclamation, resyncs and evictions run
//! through the real `Database` and the model side by side, and every hit
//! must equal the model's `loadBefore` (invariant 1 of docs/invariants.md).
//!
//! `make test` runs 10,000 cases; `TIDECACHE_MODEL_CASES=1000000 cargo test
//! --release -p tidecache-core --test model` runs a longer search.

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tidecache_core::arena::{ArenaCache, ArenaWriter, Geometry, Memory, SharedArena};
use tidecache_core::{
    CoreError, DatabaseOf, Hit, Oid, Revisions, SnapshotCache, StoreOutcome, Tid, ViewId, ENTRY_OVERHEAD,
};

/// A hit of either cache: serial, end, state.
trait Answer {
    fn parts(&self) -> (u64, Option<u64>, &[u8]);
}

impl Answer for Hit<Vec<u8>> {
    fn parts(&self) -> (u64, Option<u64>, &[u8]) {
        (self.serial.0, self.end.map(|t| t.0), &self.state)
    }
}

impl Answer for tidecache_core::arena::Found {
    fn parts(&self) -> (u64, Option<u64>, &[u8]) {
        (self.serial, self.end, &self.state)
    }
}

/// What the model needs of a cache beyond [`Revisions`].
trait UnderTest: Revisions<State = Vec<u8>> + Sized
where
    Self::Hit: Answer,
{
    fn evict(&self, oid: Oid, serial: Tid);
    fn settle(&self) {}
}

impl UnderTest for ArenaCache {
    fn evict(&self, oid: Oid, serial: Tid) {
        ArenaCache::evict(self, oid, serial);
    }
}

/// The in-process cache, adapted to `Vec<u8>` states.
struct InProcess(SnapshotCache<Vec<u8>>);

impl Revisions for InProcess {
    type State = Vec<u8>;
    type Hit = Hit<Vec<u8>>;
    fn lookup(&self, oid: Oid, view: Tid) -> Option<Self::Hit> {
        self.0.lookup(oid, view)
    }
    fn store(
        &self,
        oid: Oid,
        serial: Tid,
        end: Option<Tid>,
        view: Tid,
        state: Vec<u8>,
    ) -> Result<StoreOutcome, CoreError> {
        self.0.store(oid, serial, end, view, Arc::new(state))
    }
    fn report(&self, from: Tid, to: Tid, changes: &[(Oid, Tid)]) -> Result<Tid, CoreError> {
        self.0.report(from, to, changes)
    }
    fn report_collapsed(&self, from: Tid, to: Tid, changes: &[(Oid, Tid)]) -> Result<Tid, CoreError> {
        self.0.report_collapsed(from, to, changes)
    }
    fn start_log(&self, at: Tid) {
        self.0.start_log(at);
    }
    fn flush(&self) {
        self.0.flush();
    }
    fn reclaim(&self, low_water: Tid) -> usize {
        self.0.reclaim(low_water)
    }
    fn horizon(&self) -> Option<Tid> {
        self.0.horizon()
    }
    fn log_start(&self) -> Option<Tid> {
        self.0.log_start()
    }
    fn witness(&self) -> Option<(Tid, Vec<Oid>)> {
        self.0.witness()
    }
    fn revision_at(&self, oid: Oid, view: Tid) -> Option<(Tid, Option<Tid>)> {
        self.0.lookup(oid, view).map(|h| (h.serial, h.end))
    }
    fn open_revisions(&self, limit: usize) -> Option<Vec<(Oid, Tid)>> {
        self.0.open_revisions(limit)
    }
    fn log_len(&self) -> usize {
        self.0.log_len()
    }
    fn stats(&self) -> tidecache_core::CacheStats {
        self.0.stats()
    }
}

impl UnderTest for InProcess {
    fn evict(&self, oid: Oid, serial: Tid) {
        self.0.evict(oid, serial);
    }
    fn settle(&self) {
        self.0.run_pending_tasks();
    }
}

fn in_process(capacity: u64) -> DatabaseOf<InProcess> {
    DatabaseOf::with_cache(InProcess(SnapshotCache::new(capacity)))
}

/// An arena of `segments` segments of `segment_words` words.
fn in_arena(segments: u64, segment_words: u64) -> DatabaseOf<ArenaCache> {
    let g = Geometry::small(segments, segment_words);
    let writer = ArenaWriter::create(Arc::new(Memory::heap(g.file_bytes)), g, 1);
    DatabaseOf::with_cache(SharedArena::new(writer).database("model").unwrap())
}

const OIDS: u64 = 6;

/// The reference: every revision ever committed.
#[derive(Default)]
struct History {
    revisions: BTreeMap<u64, Vec<u64>>,
    last: u64,
    /// Committed transactions: tid and the oids it changed.
    transactions: Vec<(u64, Vec<u64>)>,
}

fn state_of(oid: u64, serial: u64) -> Vec<u8> {
    format!("state of {oid} written by {serial}").into_bytes()
}

impl History {
    /// `loadBefore(oid, view + 1)`: `(serial, end)` of the revision visible
    /// at `view`, `end` as the storage knows it now.
    fn load_before(&self, oid: u64, view: u64) -> Option<(u64, Option<u64>)> {
        let serials = self.revisions.get(&oid)?;
        let i = serials.partition_point(|&s| s <= view);
        if i == 0 {
            return None;
        }
        Some((serials[i - 1], serials.get(i).copied()))
    }

    fn commit(&mut self, step: u64, oids: &[u64]) -> u64 {
        self.last += step;
        let tid = self.last;
        let mut changed: Vec<u64> = oids.to_vec();
        changed.sort_unstable();
        changed.dedup();
        for &o in &changed {
            self.revisions.entry(o).or_default().push(tid);
        }
        self.transactions.push((tid, changed));
        tid
    }
}

#[derive(Debug, Clone)]
enum Op {
    Commit {
        step: u64,
        oids: Vec<u64>,
    },
    Report {
        n: usize,
    },
    /// A collapsed report of the next `n` transactions: every oid changed
    /// in `(from, to]` once, with its exact newest tid or (`exact` false)
    /// `to`, as ZEO's reconnect gives; `from` is `back` reported
    /// transactions before the horizon (0: at it).
    Collapsed {
        n: usize,
        exact: bool,
        back: usize,
    },
    Gap,
    Replay,
    Load {
        oid: u64,
        view: u64,
    },
    ApplyStore {
        pick: usize,
    },
    Lookup {
        oid: u64,
        view: u64,
    },
    /// Read again what was loaded before, at the same view or a later one.
    Reread {
        pick: usize,
        later: u64,
    },
    Register {
        view: u64,
    },
    Advance {
        pick: usize,
        view: u64,
    },
    Release {
        pick: usize,
    },
    Reclaim,
    Evict {
        oid: u64,
        view: u64,
    },
    Settle,
    Resync,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u64..3, prop::collection::vec(0..OIDS, 1..3)).prop_map(|(step, oids)| Op::Commit { step, oids }),
        3 => (1usize..4).prop_map(|n| Op::Report { n }),
        2 => (1usize..4, any::<bool>(), 0usize..3).prop_map(|(n, exact, back)| Op::Collapsed { n, exact, back }),
        1 => Just(Op::Gap),
        1 => Just(Op::Replay),
        6 => (0..OIDS, any::<u64>()).prop_map(|(oid, view)| Op::Load { oid, view }),
        6 => any::<usize>().prop_map(|pick| Op::ApplyStore { pick }),
        6 => (0..OIDS, any::<u64>()).prop_map(|(oid, view)| Op::Lookup { oid, view }),
        6 => (any::<usize>(), 0u64..3).prop_map(|(pick, later)| Op::Reread { pick, later }),
        1 => any::<u64>().prop_map(|view| Op::Register { view }),
        1 => (any::<usize>(), any::<u64>()).prop_map(|(pick, view)| Op::Advance { pick, view }),
        1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        1 => Just(Op::Reclaim),
        1 => (0..OIDS, any::<u64>()).prop_map(|(oid, view)| Op::Evict { oid, view }),
        1 => Just(Op::Settle),
        1 => Just(Op::Resync),
    ]
}

/// `(from, to, changes)` of a report, kept to replay it.
type Report = (u64, u64, Vec<(Oid, Tid)>);

struct PendingStore {
    oid: u64,
    serial: u64,
    end: Option<u64>,
    view: u64,
}

static HITS: AtomicU64 = AtomicU64::new(0);
static OPEN_HITS: AtomicU64 = AtomicU64::new(0);
static LOOKUPS: AtomicU64 = AtomicU64::new(0);

/// Runs one program; returns Err with a description of the first wrong hit.
fn run<C: UnderTest>(ops: &[Op], db: DatabaseOf<C>) -> Result<(), TestCaseError>
where
    C::Hit: Answer,
{
    let mut h = History::default();
    h.commit(1, &[0, 1, 2]);
    // The first client attaches with lastTransaction = 1.
    db.attach(Tid(h.last), None);
    let mut reported = 0usize; // transactions delivered in reports
    while reported < h.transactions.len() && h.transactions[reported].0 <= h.last {
        reported += 1;
    }
    let mut reported_to = h.last;
    let mut pending: Vec<PendingStore> = Vec::new();
    let mut views: Vec<(ViewId, u64)> = Vec::new();
    let mut loaded: Vec<(u64, u64)> = Vec::new();
    let mut last_report: Option<Report> = None;

    for op in ops {
        match op.clone() {
            Op::Commit { step, oids } => {
                h.commit(step, &oids);
            }
            Op::Report { n } => {
                let upto = (reported + n).min(h.transactions.len());
                if upto == reported {
                    continue;
                }
                let to = h.transactions[upto - 1].0;
                let changes: Vec<(Oid, Tid)> = h.transactions[reported..upto]
                    .iter()
                    .flat_map(|(t, oids)| oids.iter().map(move |&o| (Oid(o), Tid(*t))))
                    .collect();
                let r = db.report(Tid(reported_to), Tid(to), &changes);
                prop_assert_eq!(r, Ok(Tid(to)));
                last_report = Some((reported_to, to, changes));
                reported = upto;
                reported_to = to;
            }
            Op::Collapsed { n, exact, back } => {
                let upto = (reported + n).min(h.transactions.len());
                if upto == reported {
                    continue;
                }
                let to = h.transactions[upto - 1].0;
                let from = match reported.checked_sub(back) {
                    Some(i) if back > 0 && i > 0 => h.transactions[i - 1].0,
                    Some(_) if back > 0 => 0,
                    _ => reported_to,
                }
                .min(reported_to);
                let mut newest: BTreeMap<u64, u64> = BTreeMap::new();
                for (t, oids) in h.transactions.iter().filter(|(t, _)| from < *t && *t <= to) {
                    for &o in oids {
                        newest.insert(o, if exact { *t } else { to });
                    }
                }
                let changes: Vec<(Oid, Tid)> = newest.into_iter().map(|(o, t)| (Oid(o), Tid(t))).collect();
                let r = db.report_collapsed(Tid(from), Tid(to), &changes);
                prop_assert_eq!(r, Ok(Tid(to)));
                reported = upto;
                reported_to = to;
            }
            Op::Gap => {
                // Skip the next transaction: the cache must refuse.
                if h.transactions.len() < reported + 2 {
                    continue;
                }
                let (skipped, _) = h.transactions[reported];
                let (t, ref oids) = h.transactions[reported + 1];
                let changes: Vec<(Oid, Tid)> = oids.iter().map(|&o| (Oid(o), Tid(t))).collect();
                let before = db.stats().horizon;
                let r = db.report(Tid(skipped), Tid(t), &changes);
                prop_assert!(matches!(r, Err(CoreError::Gap { .. })), "a gap was accepted: {:?}", r);
                prop_assert_eq!(db.stats().horizon, before);
            }
            Op::Replay => {
                if let Some((from, to, changes)) = &last_report {
                    let r = db.report(Tid(*from), Tid(*to), changes);
                    prop_assert!(r.is_ok(), "replay refused: {:?}", r);
                }
            }
            Op::Load { oid, view } => {
                let view = pick_view(view, h.last, reported_to, 0);
                if let Some((serial, end)) = h.load_before(oid, view) {
                    pending.push(PendingStore { oid, serial, end, view });
                }
            }
            Op::ApplyStore { pick } => {
                if pending.is_empty() {
                    continue;
                }
                let s = pending.swap_remove(pick % pending.len());
                loaded.push((s.oid, s.view));
                let out = db.store(
                    Oid(s.oid),
                    Tid(s.serial),
                    s.end.map(Tid),
                    Tid(s.view),
                    state_of(s.oid, s.serial),
                );
                prop_assert!(out.is_ok(), "a true store was refused as malformed: {:?}", out);
                if let (Ok(StoreOutcome::Closed(end)), None) = (out, s.end) {
                    // Closed from the log: at the exact next change, or
                    // earlier (an uncertain interval of a collapsed
                    // report), never before its view nor after the truth.
                    let truth = h.load_before(s.oid, s.serial).and_then(|r| r.1);
                    prop_assert!(end.0 > s.view, "closed at {} before its view {}", end.0, s.view);
                    prop_assert!(
                        truth.is_none_or(|t| end.0 <= t),
                        "closed at {} after the next change {:?}",
                        end.0,
                        truth
                    );
                }
            }
            Op::Lookup { .. } | Op::Reread { .. } => {
                let (oid, view) = match op {
                    Op::Lookup { oid, view } => (*oid, pick_view(*view, h.last, reported_to, 2)),
                    Op::Reread { pick, later } if !loaded.is_empty() => {
                        let (oid, view) = loaded[pick % loaded.len()];
                        (oid, view + later)
                    }
                    _ => continue,
                };
                LOOKUPS.fetch_add(1, Ordering::Relaxed);
                if let Some(hit) = db.lookup(Oid(oid), Tid(view)) {
                    let (serial, end, state) = hit.parts();
                    HITS.fetch_add(1, Ordering::Relaxed);
                    if end.is_none() {
                        OPEN_HITS.fetch_add(1, Ordering::Relaxed);
                    }
                    prop_assert!(view <= h.last, "hit at view {} beyond the last commit {}", view, h.last);
                    let truth = h.load_before(oid, view);
                    prop_assert_eq!(
                        truth.map(|t| t.0),
                        Some(serial),
                        "wrong hit for oid {} at view {}",
                        oid,
                        view
                    );
                    prop_assert_eq!(state, &state_of(oid, serial)[..]);
                    if let Some(end) = end {
                        // The next change, or earlier after a collapsed
                        // report (a lower bound; ZODB is handed serial and
                        // state only), never later.
                        let next = truth.and_then(|t| t.1);
                        prop_assert!(
                            next.is_some_and(|n| end <= n) || next.is_none() && end <= h.last + 1,
                            "wrong end {} for oid {} at view {}: next change {:?}",
                            end,
                            oid,
                            view,
                            next
                        );
                    }
                }
            }
            Op::Register { view } => {
                let v = view % (h.last + 1);
                views.push((db.register_view(Tid(v)), v));
            }
            Op::Advance { pick, view } => {
                if views.is_empty() {
                    continue;
                }
                let i = pick % views.len();
                let v = views[i].1 + view % (h.last + 1 - views[i].1);
                db.advance_view(views[i].0, Tid(v))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                views[i].1 = v;
            }
            Op::Release { pick } => {
                if views.is_empty() {
                    continue;
                }
                let (id, _) = views.swap_remove(pick % views.len());
                prop_assert!(db.release_view(id).is_ok());
            }
            Op::Reclaim => {
                db.reclaim();
                // Reclamation only drops what no registered view sees:
                // every registered view still finds what it found before
                // (checked by the lookups that follow).
                if let (Some(lw), Some(start)) = (db.stats().low_water_mark, db.stats().log_start) {
                    prop_assert!(start <= lw || start <= db.stats().horizon.unwrap());
                }
            }
            Op::Evict { oid, view } => {
                if let Some(hit) = db.lookup(Oid(oid), Tid(view % (h.last + 1))) {
                    db.cache().evict(Oid(oid), Tid(hit.parts().0));
                }
            }
            Op::Settle => db.cache().settle(),
            Op::Resync => {
                // The client lost invalidations (ZEO's invalidateCache) and
                // restarts from its lastTransaction.
                db.resync(Tid(h.last));
                reported = h.transactions.len();
                reported_to = h.last;
                last_report = None;
            }
        }
    }
    Ok(())
}

/// Views as connections hold them: most at the last commit or at the
/// horizon, the rest anywhere in `[0, last + extra]`.
fn pick_view(raw: u64, last: u64, horizon: u64, extra: u64) -> u64 {
    match raw % 4 {
        0 => last,
        1 => horizon,
        _ => (raw >> 2) % (last + 1 + extra),
    }
}

fn cases() -> u32 {
    std::env::var("TIDECACHE_MODEL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 10_000, ..ProptestConfig::default() })]

    /// Zero wrong hits, with room for everything.
    #[test]
    fn every_hit_equals_load_before(ops in prop::collection::vec(op(), 1..80)) {
        run(&ops, in_process(1 << 20))?;
    }

    /// Zero wrong hits while the size bound evicts (room for ~4 revisions).
    #[test]
    fn every_hit_equals_load_before_under_eviction(ops in prop::collection::vec(op(), 1..80)) {
        run(&ops, in_process(4 * (ENTRY_OVERHEAD as u64 + 32)))?;
    }

    /// The arena, with room for everything.
    #[test]
    fn every_arena_hit_equals_load_before(ops in prop::collection::vec(op(), 1..80)) {
        run(&ops, in_arena(8, 4096))?;
    }

    /// The arena while it recycles segments: 8 segments of 3 records each.
    #[test]
    fn every_arena_hit_equals_load_before_under_eviction(ops in prop::collection::vec(op(), 1..80)) {
        run(&ops, in_arena(8, 40))?;
    }
}

/// The property tests would pass vacuously if the cache never hit: make sure
/// a modest run of the same generator produces plenty of hits.
#[test]
fn the_model_test_is_not_vacuous() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (h0, l0, o0) = (
        HITS.load(Ordering::Relaxed),
        LOOKUPS.load(Ordering::Relaxed),
        OPEN_HITS.load(Ordering::Relaxed),
    );
    for _ in 0..300 {
        let ops = prop::collection::vec(op(), 40..80)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        run(&ops, in_process(1 << 20)).unwrap();
        run(&ops, in_arena(8, 4096)).unwrap();
    }
    let hits = HITS.load(Ordering::Relaxed) - h0;
    let lookups = LOOKUPS.load(Ordering::Relaxed) - l0;
    let open = OPEN_HITS.load(Ordering::Relaxed) - o0;
    assert!(hits * 10 > lookups, "only {hits} hits in {lookups} lookups");
    assert!(
        open * 8 > hits && (hits - open) * 8 > hits,
        "{open} of {hits} hits on open revisions"
    );
}
