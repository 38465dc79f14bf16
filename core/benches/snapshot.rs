//! The production read path, the arena lookup every worker process runs
//! (`arena::reader::lookup`: validated copy of a 1 KiB state out of the
//! shared memory), and `SnapshotCache::lookup` (the in-process cache),
//! against two anchors in the same process: a `RwLock<HashMap>` get (the
//! plain in-process cache) and a moka get. Also the sidecar's write path:
//! an arena store and a one-change report. Criterion prints each; the
//! summary of medians goes to `bench-results/core.json` for
//! docs/benchmarks.md.

use criterion::{black_box, Criterion};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tidecache_core::arena::{reader, ArenaWriter, Geometry, Memory, SharedArena};
use tidecache_core::{Database, Oid, Tid};

const N: u64 = 100_000;

/// The anchor: a plain in-process map behind a read-write lock.
type Anchor = RwLock<HashMap<(u64, u64), Arc<Vec<u8>>>>;
const STATE: usize = 1024;

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(3));
    let db: Database<Vec<u8>> = Database::new(1 << 30);
    db.attach(Tid(1), None);
    let map: Anchor = RwLock::new(HashMap::new());
    let moka: moka::sync::Cache<(u64, u64), Arc<Vec<u8>>> = moka::sync::Cache::new(N * 2);
    for oid in 0..N {
        let state = Arc::new(vec![oid as u8; STATE]);
        db.store(Oid(oid), Tid(1), None, Tid(1), state.clone()).unwrap();
        map.write().unwrap().insert((oid, 1), state.clone());
        moka.insert((oid, 1), state);
    }
    // The arena, as the sidecar fills it and a worker reads it.
    let geometry = Geometry::for_size(512 << 20, 4).expect("geometry");
    let memory = Arc::new(Memory::heap(geometry.file_bytes));
    let arena = SharedArena::new(ArenaWriter::create(memory.clone(), geometry, 1));
    let adb = arena.database("bench").expect("slot");
    adb.start_log(Tid(1));
    for oid in 0..N {
        adb.store(Oid(oid), Tid(1), None, Tid(1), &vec![oid as u8; STATE])
            .unwrap();
    }
    let (words, slot) = (memory.words(), adb.slot());
    let mut i = 0u64;
    let mut next = move || {
        i = (i + 7919) % N;
        i
    };
    let mut group = c.benchmark_group("lookup_1KiB_hit");
    group.bench_function("anchor_rwlock_hashmap", |b| {
        b.iter(|| black_box(map.read().unwrap().get(&(next(), 1)).cloned()))
    });
    group.bench_function("anchor_moka_get", |b| b.iter(|| black_box(moka.get(&(next(), 1)))));
    group.bench_function("tidecache_snapshot_lookup", |b| {
        b.iter(|| black_box(db.lookup(Oid(next()), Tid(1))))
    });
    group.bench_function("tidecache_snapshot_miss", |b| {
        b.iter(|| black_box(db.lookup(Oid(N + next()), Tid(1))))
    });
    group.bench_function("tidecache_arena_lookup", |b| {
        b.iter(|| black_box(reader::lookup(words, &geometry, slot, next(), 1).ok()))
    });
    group.bench_function("tidecache_arena_miss", |b| {
        b.iter(|| black_box(reader::lookup(words, &geometry, slot, N + next(), 1).ok()))
    });
    group.finish();
    // The sidecar's write path: a store of a new 1 KiB revision (checked
    // against the log, written, linked; eviction as the arena fills) and a
    // report of one change that closes an open revision.
    let mut group = c.benchmark_group("write_1KiB");
    let state = vec![7u8; STATE];
    let mut tid = 1u64;
    group.bench_function("tidecache_arena_report_and_store", |b| {
        b.iter(|| {
            let oid = next();
            tid += 1;
            adb.report(Tid(tid - 1), Tid(tid), &[(Oid(oid), Tid(tid))]).unwrap();
            black_box(adb.store(Oid(oid), Tid(tid), None, Tid(tid), &state).unwrap())
        })
    });
    group.finish();
    // A skewed workload's hot set: 64 revisions read over and over.
    let mut j = 0u64;
    let mut hot = move || {
        j = (j + 1) % 64;
        j * 1013 % N
    };
    let mut group = c.benchmark_group("lookup_1KiB_hot64");
    group.bench_function("anchor_rwlock_hashmap", |b| {
        b.iter(|| black_box(map.read().unwrap().get(&(hot(), 1)).cloned()))
    });
    group.bench_function("anchor_moka_get", |b| b.iter(|| black_box(moka.get(&(hot(), 1)))));
    group.bench_function("tidecache_snapshot_lookup", |b| {
        b.iter(|| black_box(db.lookup(Oid(hot()), Tid(1))))
    });
    group.bench_function("tidecache_arena_lookup", |b| {
        b.iter(|| black_box(reader::lookup(words, &geometry, slot, hot(), 1).ok()))
    });
    group.finish();
    c.final_summary();
    write_summary();
}

/// Reads criterion's estimates and writes medians (ns) and ratios.
fn write_summary() {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/criterion");
    let median = |name: &str| -> Option<f64> {
        let text = std::fs::read_to_string(base.join(name).join("new/estimates.json")).ok()?;
        let key = "\"median\":{\"confidence_interval\":";
        let at = text.find(key)?;
        let rest = &text[at..];
        let p = rest.find("\"point_estimate\":")? + "\"point_estimate\":".len();
        rest[p..].split([',', '}']).next()?.parse().ok()
    };
    let names = [
        "lookup_1KiB_hit/anchor_rwlock_hashmap",
        "lookup_1KiB_hit/anchor_moka_get",
        "lookup_1KiB_hit/tidecache_snapshot_lookup",
        "lookup_1KiB_hit/tidecache_snapshot_miss",
        "lookup_1KiB_hit/tidecache_arena_lookup",
        "lookup_1KiB_hit/tidecache_arena_miss",
        "write_1KiB/tidecache_arena_report_and_store",
        "lookup_1KiB_hot64/anchor_rwlock_hashmap",
        "lookup_1KiB_hot64/anchor_moka_get",
        "lookup_1KiB_hot64/tidecache_snapshot_lookup",
        "lookup_1KiB_hot64/tidecache_arena_lookup",
    ];
    let values: Vec<String> = names
        .iter()
        .filter_map(|n| median(n).map(|v| format!("  \"{}_ns\": {v:.1}", n.replace('/', "."))))
        .collect();
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench-results");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("core.json"), format!("{{\n{}\n}}\n", values.join(",\n")));
    println!("medians written to bench-results/core.json");
}
