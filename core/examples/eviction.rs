//! Replays a key sequence through an arena and prints its hit ratio: the
//! eviction measurement of `make bench` (`bench/eviction.py` writes the
//! traces, runs this, and runs RelStorage's `LocalClient` on the same ones).
//!
//! ```text
//! cargo run --release -p tidecache-core --example eviction -- TRACE ARENA_BYTES POLICY TOUCH_EVERY
//! ```
//!
//! TRACE: little-endian records of `oid: u64, state length: u32`. On a hit
//! (oid at view 1), every TOUCH_EVERY-th hit is reported to the writer (the
//! Python client reports 1 in 8); on a miss, the revision is stored. POLICY
//! is `s3fifo` or `fifo`. Prints one JSON object.

use std::sync::Arc;
use tidecache_core::arena::{layout::OPEN, reader, ArenaWriter, Geometry, Memory, Policy};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: eviction TRACE ARENA_BYTES s3fifo|fifo TOUCH_EVERY");
        std::process::exit(2);
    }
    let trace = std::fs::read(&args[1]).unwrap_or_else(|e| {
        eprintln!("{}: {e}", args[1]);
        std::process::exit(1)
    });
    let bytes: u64 = args[2].parse().expect("ARENA_BYTES: a number");
    let policy = match args[3].as_str() {
        "s3fifo" => Policy::S3Fifo,
        "fifo" => Policy::Fifo,
        p => panic!("unknown policy {p}"),
    };
    let touch_every: u64 = args[4].parse().expect("TOUCH_EVERY: a number");
    let g = Geometry::for_size(bytes, 1).expect("arena size");
    let memory = Arc::new(Memory::heap(g.file_bytes));
    let mut w = ArenaWriter::create(memory.clone(), g, 1);
    w.set_policy(policy);
    let slot = w.attach_database("trace").expect("slot");
    w.publish_horizon(slot, 1);
    let payload = vec![0x5au8; g.max_state_bytes()];
    let (mut hits, mut requests, mut touched) = (0u64, 0u64, 0u64);
    for rec in trace.chunks_exact(12) {
        let oid = u64::from_le_bytes(rec[..8].try_into().unwrap());
        let len = u32::from_le_bytes(rec[8..].try_into().unwrap()) as usize;
        requests += 1;
        match reader::locate_visible(memory.words(), &g, slot, oid, 1) {
            Ok(found) => {
                hits += 1;
                if hits % touch_every == 0 {
                    w.touch(slot, oid, found.serial);
                    touched += 1;
                }
            }
            Err(_) => {
                let _ = w.insert(slot, oid, 1, OPEN, &payload[..len.min(payload.len())]);
            }
        }
    }
    let s = w.stats();
    println!(
        "{{\"requests\": {requests}, \"hits\": {hits}, \"hit_ratio\": {:.5}, \"touched\": {touched}, \"entries\": {}, \"evicted\": {}, \"promoted\": {}, \"reinserted\": {}, \"ghost_hits\": {}}}",
        hits as f64 / requests.max(1) as f64,
        s.entries,
        s.evicted,
        s.promoted,
        s.reinserted,
        s.ghost_hits
    );
}
