//! Fault campaign, decoder part: random bytes and mutated valid frames
//! (bit flips, truncations, lying length prefixes, huge array/bin/str/map
//! length claims, deep nesting) fed to every decoding step the sidecar and
//! the client take: `read_frame_len`, and rmp-serde's decoding of
//! [`Request`], [`Response`], `IgnoredAny` and `(u64, IgnoredAny)` from the
//! frame's bytes. Never a panic, and never an allocation out of proportion
//! to the frame: a counting allocator measures the peak bytes each decode
//! holds at once (serde preallocates at most 1 MiB for a claimed sequence
//! length; everything else is bounded by the bytes present).
//!
//! `make test` runs a few thousand frames; `make soak` runs for
//! `TIDECACHE_SOAK_SECONDS` with fresh seeds and prints a summary line.
//! A failure prints the seed; `TIDECACHE_FUZZ_SEED=<seed>` replays it.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};
use tidecache_client::protocol::{
    self, encode, ArenaInfo, AttachState, DatabaseStats, ErrorCode, Found, Request, RequestBody, Response,
    ResponseBody, ServerStats, StoreItem, PROTOCOL_VERSION,
};

/// Counts the bytes each thread holds, and the peak since the last reset.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get() + delta;
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

// SAFETY: forwards to the system allocator; the bookkeeping allocates
// nothing (const-initialised thread locals of `Cell`).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size() as isize);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size() as isize);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size as isize - layout.size() as isize);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Peak bytes held by `f` beyond what was held before it.
fn peak_of<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    (r, (PEAK.with(Cell::get) - base).max(0) as usize)
}

/// What a decode of `len` bytes may hold at once: serde's preallocation
/// cap (1 MiB) per open sequence, a few of them nested, plus a constant
/// factor of the bytes present (a 1-byte MessagePack integer becomes an
/// 8-byte `u64`, a 7-byte store item a 64-byte `StoreItem`).
fn allowance(len: usize) -> usize {
    4 * (1 << 20) + 64 * len
}

/// Decodes `frame` (length prefix and body) as the sidecar and the client
/// do; `Err` names what went wrong.
fn decode_all(frame: &[u8]) -> Result<(), String> {
    let mut r = frame;
    let Ok(n) = protocol::read_frame_len(&mut r) else {
        return Ok(()); // under 4 bytes: a closed connection
    };
    // The sidecar refuses a length over its maximum before allocating; a
    // lying length within it reads what is there (a short read is an EOF).
    if n > protocol::DEFAULT_MAX_FRAME {
        return Ok(());
    }
    let body = &r[..n.min(r.len())];
    let len = body.len();
    let checks: [(&str, &dyn Fn()); 4] = [
        ("Request", &|| {
            let _ = rmp_serde::from_slice::<Request>(body);
        }),
        ("Response", &|| {
            let _ = rmp_serde::from_slice::<Response>(body);
        }),
        ("IgnoredAny", &|| {
            let _ = rmp_serde::from_slice::<serde::de::IgnoredAny>(body);
        }),
        ("(u64, IgnoredAny)", &|| {
            let _ = rmp_serde::from_slice::<(u64, serde::de::IgnoredAny)>(body);
        }),
    ];
    for (what, check) in checks {
        let (outcome, peak) = peak_of(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)));
        if outcome.is_err() {
            return Err(format!("decoding {what} panicked on {}", hex(frame)));
        }
        if peak > allowance(len) {
            return Err(format!(
                "decoding {what} held {peak} bytes for a {len}-byte frame: {}",
                hex(frame)
            ));
        }
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    let shown: String = b.iter().take(96).map(|x| format!("{x:02x}")).collect();
    if b.len() > 96 {
        format!("{shown}... ({} bytes)", b.len())
    } else {
        shown
    }
}

/// A valid message of each kind, chosen by `pick`, sized by `size`.
fn valid_body(pick: u8, size: u8) -> Vec<u8> {
    let n = usize::from(size);
    let db = "zeo:/tmp/zeo.sock:1".to_owned();
    let req = |body| {
        encode(&Request {
            id: u64::from(pick) * 7,
            body,
        })
        .unwrap()
    };
    let resp = |body| {
        encode(&Response {
            id: u64::from(size),
            body,
        })
        .unwrap()
    };
    match pick % 16 {
        0 => req(RequestBody::Hello {
            version: PROTOCOL_VERSION,
            client: "fuzz".into(),
        }),
        1 => req(RequestBody::Attach {
            db,
            last_tid: 1 << 60,
            proven: None,
        }),
        2 => req(RequestBody::Lookup {
            db,
            view: 99,
            oids: (0..n as u64).collect(),
        }),
        3 => req(RequestBody::Store {
            identity: Some(u64::MAX),
            db,
            revisions: (0..n.min(8) as u64)
                .map(|i| StoreItem {
                    oid: i,
                    serial: i + 1,
                    end: (i % 2 == 0).then_some(i + 5),
                    view: i + 9,
                    state: vec![i as u8; n],
                })
                .collect(),
        }),
        4 => req(RequestBody::Report {
            identity: Some(u64::MAX),
            db,
            from: 1,
            to: 2,
            changes: (0..n as u64).map(|i| (i, 2)).collect(),
        }),
        5 => req(RequestBody::Touch {
            identity: Some(u64::MAX),
            db,
            revisions: (0..n as u64).map(|i| (i, i)).collect(),
            hits: n as u64,
            misses: u64::MAX,
        }),
        6 => req(RequestBody::AdvanceView { db, view: 3, tid: 4 }),
        7 => req(RequestBody::Stats),
        8 => resp(ResponseBody::Found {
            results: (0..n.min(8) as u64)
                .map(|i| {
                    (i % 3 != 0).then(|| Found {
                        serial: i,
                        end: None,
                        state: vec![7; n],
                    })
                })
                .collect(),
        }),
        9 => resp(ResponseBody::Hello {
            version: PROTOCOL_VERSION,
            server: "tidecached".into(),
            arena: ArenaInfo {
                path: "/dev/shm/x".into(),
                incarnation: 5,
            },
        }),
        10 => resp(ResponseBody::Attached {
            state: AttachState::Joined,
            horizon: 4,
            slot: 2,
            identity: 0x1d,
        }),
        11 => resp(ResponseBody::Error {
            code: ErrorCode::Gap,
            message: "gap".into(),
            horizon: Some(3),
        }),
        12 => {
            let mut s = ServerStats::default();
            for i in 0..n.min(4) {
                s.databases.insert(format!("db{i}"), DatabaseStats::default());
            }
            resp(ResponseBody::Stats(s))
        }
        13 => resp(ResponseBody::Stored { kept: 1, refused: 2 }),
        14 => req(RequestBody::Resync {
            db,
            tid: 8,
            identity: None,
        }),
        _ => req(RequestBody::Flush { db }),
    }
}

/// One way of damaging a frame.
#[derive(Debug, Clone)]
enum Mutation {
    /// Flip bit `bit` of the byte at `at` (modulo the length).
    Flip { at: usize, bit: u8 },
    /// Cut the frame at `at` (modulo the length).
    Truncate { at: usize },
    /// Insert bytes at `at`.
    Insert { at: usize, bytes: Vec<u8> },
    /// Overwrite at `at` with a MessagePack marker claiming a huge length
    /// (array32, map32, bin32, str32, ext32) of `claim`.
    Claim { at: usize, marker: u8, claim: u32 },
    /// Put `depth` one-element array (or map) markers in front.
    Nest { depth: usize, map: bool },
    /// Make the 4-byte length prefix say `len`.
    Lie { len: u32 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        3 => (
            any::<usize>(),
            prop::sample::select(vec![0xdcu8, 0xdd, 0xde, 0xdf, 0xc4, 0xc5, 0xc6, 0xd9, 0xda, 0xdb, 0xc9]),
            prop_oneof![Just(u32::MAX), Just(1 << 31), Just(1 << 20), any::<u32>()],
        )
            .prop_map(|(at, marker, claim)| Mutation::Claim { at, marker, claim }),
        1 => (1usize..3000, any::<bool>()).prop_map(|(depth, map)| Mutation::Nest { depth, map }),
        1 => prop_oneof![Just(u32::MAX), Just(0), any::<u32>()].prop_map(|len| Mutation::Lie { len }),
    ]
}

/// Applies `m` to `frame` (prefix and body); the prefix is kept true
/// unless the mutation is a lie.
fn apply(frame: &mut Vec<u8>, m: &Mutation) {
    let mut body = frame.split_off(4);
    let mut lie = None;
    match m {
        Mutation::Flip { at, bit } if !body.is_empty() => {
            let i = at % body.len();
            body[i] ^= 1 << bit;
        }
        Mutation::Truncate { at } => body.truncate(at % (body.len() + 1)),
        Mutation::Insert { at, bytes } => {
            let i = at % (body.len() + 1);
            body.splice(i..i, bytes.iter().copied());
        }
        Mutation::Claim { at, marker, claim } => {
            let i = at % (body.len() + 1);
            let width = match marker {
                0xc4 | 0xd9 => 1,
                0xc5 | 0xda | 0xdc | 0xde => 2,
                _ => 4,
            };
            let mut bytes = vec![*marker];
            bytes.extend_from_slice(&claim.to_be_bytes()[4 - width..]);
            if *marker == 0xc9 {
                bytes.push(1); // ext type
            }
            let end = (i + bytes.len()).min(body.len());
            body.splice(i..end, bytes);
        }
        Mutation::Nest { depth, map } => {
            let mut nested = Vec::with_capacity(depth * 2 + body.len());
            for _ in 0..*depth {
                if *map {
                    nested.extend_from_slice(&[0x81, 0x01]);
                } else {
                    nested.push(0x91);
                }
            }
            nested.extend_from_slice(&body);
            body = nested;
        }
        Mutation::Lie { len } => lie = Some(*len),
        Mutation::Flip { .. } => {}
    }
    let len = lie.unwrap_or(body.len() as u32);
    frame.clear();
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    protocol::write_frame(&mut out, body).unwrap();
    out
}

/// A frame: random bytes, or a valid message damaged by 1 to 4 mutations.
fn frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..300),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| framed(&b)),
        6 => (any::<u8>(), any::<u8>(), prop::collection::vec(mutation(), 1..5)).prop_map(|(pick, size, ms)| {
            let mut f = framed(&valid_body(pick, size % 40));
            for m in &ms {
                apply(&mut f, m);
            }
            f
        }),
    ]
}

fn soak_seconds() -> Option<u64> {
    std::env::var("TIDECACHE_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
}

/// Runs the campaign: a fixed number of frames (`make test`) or as many
/// as fit in `TIDECACHE_SOAK_SECONDS`, in rounds of fresh seeds.
#[test]
fn decoding_damaged_frames_never_panics_nor_allocates_past_the_frame() {
    let soak = soak_seconds();
    let deadline = Instant::now() + Duration::from_secs(soak.unwrap_or(0));
    let fixed = std::env::var("TIDECACHE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    let mut frames = 0u64;
    let mut failures = Vec::new();
    loop {
        let seed = fixed.unwrap_or_else(|| fastrand::u64(..));
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
        let config = Config {
            cases: 2000,
            failure_persistence: None,
            ..Config::default()
        };
        let mut runner = TestRunner::new_with_rng(config, rng);
        let count = std::cell::Cell::new(0u64);
        let result = runner.run(&frame(), |f| {
            count.set(count.get() + 1);
            decode_all(&f).map_err(TestCaseError::fail)
        });
        frames += count.get();
        if let Err(e) = result {
            failures.push(format!("seed {seed}: {e}"));
        }
        if soak.is_none() || fixed.is_some() || Instant::now() >= deadline {
            break;
        }
    }
    println!(
        "SOAK decoder: frames fuzzed {frames}, failures {} (panics or oversized allocations)",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The cases the campaign is built around, spelled out: a 4 GiB bin, str,
/// array and map claimed inside a short frame; nesting past rmp-serde's
/// depth limit.
#[test]
fn huge_length_claims_and_deep_nesting_are_refused_cheaply() {
    let store = valid_body(3, 4);
    for marker in [0xc6u8, 0xdb, 0xdd, 0xdf] {
        for at in 0..store.len() {
            let mut body = store.clone();
            body.truncate(at);
            body.push(marker);
            body.extend_from_slice(&u32::MAX.to_be_bytes());
            body.extend_from_slice(&[0; 16]);
            decode_all(&framed(&body)).unwrap();
        }
    }
    for depth in [100, 1025, 100_000] {
        let mut body = vec![0x91u8; depth];
        body.push(0);
        decode_all(&framed(&body)).unwrap();
        let mut wrapped = vec![0x92u8, 0x01];
        wrapped.extend_from_slice(&body);
        decode_all(&framed(&wrapped)).unwrap();
    }
}
