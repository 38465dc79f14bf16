//! Fault campaign, live part: a real `tidecached` fed, over many
//! connections at once, random bytes, mutated valid frames (bit flips,
//! truncations, lying length prefixes, huge length claims, deep nesting)
//! and well-formed but hostile requests (huge oid lists, oids over 48 bits,
//! states over the maximum, absurd report intervals, other connections'
//! views, Touch floods), while a well-behaved client attaches, stores,
//! reports and looks up (in the arena and over the socket) and must keep
//! being served correctly: each of its hits is the revision its history
//! says `loadBefore(oid, view + 1)` returns. The sidecar never crashes
//! (process alive, no panic in its log, `stats` answers) and every bad
//! connection gets answers that decode, then is closed.
//!
//! `make test` runs a few hundred connections; `make soak` runs for
//! `TIDECACHE_SOAK_SECONDS` with fresh seeds and prints a summary line.
//! A failure prints the seed; `TIDECACHE_FUZZ_SEED=<seed>` replays it.

mod common;

use common::{History, Sidecar};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tidecache_client::protocol::{
    encode, ErrorCode, Request, RequestBody, Response, ResponseBody, StoreItem, PROTOCOL_VERSION,
};
use tidecache_client::{Client, ClientConfig};

const GOOD: &str = "good";
const OIDS: u64 = 60;
const FIRST: u64 = 100;

fn soak_seconds() -> Option<u64> {
    std::env::var("TIDECACHE_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
}

fn seed() -> u64 {
    std::env::var("TIDECACHE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..))
}

// ----- the well-behaved client -----------------------------------------

fn state(oid: u64, serial: u64) -> Vec<u8> {
    let mut s = format!("{oid}@{serial}:").into_bytes();
    s.resize(20 + ((oid * 37 + serial) % 900) as usize, (oid ^ serial) as u8);
    s
}

/// Attaches, then per round: one transaction reported, stores at views up
/// to the horizon, lookups (arena and socket) checked against the history.
/// Returns the hits checked; `Err` on a wrong hit or a refused call.
fn good_client(socket: &std::path::Path, seed: u64, stop: &AtomicBool, rounds: u64) -> Result<u64, String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut cfg = ClientConfig::new(socket);
    cfg.timeout = Duration::from_secs(60);
    let c = Client::new(cfg);
    let mut h = History((1..=OIDS).map(|o| (o, vec![FIRST])).collect());
    c.attach(GOOD, FIRST, None).map_err(|e| format!("attach: {e}"))?;
    let view = c.register_view(GOOD, FIRST);
    let mut horizon = FIRST;
    let mut hits = 0;
    let mut round = 0;
    while !(stop.load(Ordering::Relaxed) && round >= rounds) {
        round += 1;
        let tid = horizon + 1;
        let mut changes = Vec::new();
        for _ in 0..rng.usize(0..3) {
            let oid = rng.u64(1..=OIDS);
            if h.0[&oid].last() != Some(&tid) {
                h.0.get_mut(&oid).unwrap().push(tid);
                changes.push((oid, tid));
            }
        }
        c.report(GOOD, horizon, tid, changes)
            .map_err(|e| format!("report: {e}"))?;
        horizon = tid;
        c.advance_view(view, horizon);
        let mut items = Vec::new();
        for _ in 0..8 {
            let oid = rng.u64(1..=OIDS);
            let at = rng.u64(FIRST..=horizon);
            let (serial, next) = h.visible(oid, at).unwrap();
            items.push(StoreItem {
                oid,
                serial,
                end: next.filter(|&n| n <= horizon),
                view: at,
                state: state(oid, serial),
            });
        }
        c.store(GOOD, items).map_err(|e| format!("store: {e}"))?;
        let oids: Vec<u64> = (0..16).map(|_| rng.u64(1..=OIDS)).collect();
        let at = rng.u64(FIRST - 3..=horizon + 3);
        let local = c.lookup(GOOD, at, oids.clone()).map_err(|e| format!("lookup: {e}"))?;
        let remote = c
            .lookup_remote(GOOD, at, oids.clone())
            .map_err(|e| format!("remote lookup: {e}"))?;
        for (oid, found) in oids.iter().zip(local.iter().chain(remote.iter())) {
            let Some(f) = found else { continue };
            let want = h.visible(*oid, at);
            let right = want.is_some_and(|(s, next)| {
                s == f.serial && f.state == state(*oid, s) && f.end.is_none_or(|e| Some(e) == next)
            });
            if !right {
                return Err(format!(
                    "wrong hit: oid {oid} view {at}: serial {} end {:?}, history {want:?}",
                    f.serial, f.end
                ));
            }
            hits += 1;
        }
    }
    c.stats().map_err(|e| format!("stats: {e}"))?;
    Ok(hits)
}

// ----- the bad connections ---------------------------------------------

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

fn request(id: u64, body: RequestBody) -> Vec<u8> {
    framed(&encode(&Request { id, body }).unwrap())
}

/// A hostile but well-formed request (sent after Hello), and whether its
/// answer must be the error `UnknownView`.
fn hostile(rng: &mut fastrand::Rng) -> (RequestBody, bool) {
    let own = format!("hostile-{}", rng.u8(..4));
    let big = |rng: &mut fastrand::Rng| [rng.u64(..), u64::MAX, 1 << 48, (1 << 48) - 1, 0][rng.usize(..5)];
    let body = match rng.u8(..11) {
        0 => RequestBody::Lookup {
            db: GOOD.into(),
            view: big(rng),
            oids: (0..rng.usize(1..200_000)).map(|_| big(rng)).collect(),
        },
        1 => RequestBody::Store {
            identity: rng.bool().then(|| rng.u64(..)),
            db: own,
            revisions: (0..rng.usize(1..20))
                .map(|_| StoreItem {
                    oid: big(rng),
                    serial: big(rng),
                    end: [None, Some(0), Some(big(rng))][rng.usize(..3)],
                    view: big(rng),
                    state: vec![0x55; [0, 10, 300 << 10, (1 << 20) + 1][rng.usize(..4)]],
                })
                .collect(),
        },
        2 => RequestBody::Report {
            identity: rng.bool().then(|| rng.u64(..)),
            db: own,
            from: big(rng),
            to: big(rng),
            changes: (0..rng.usize(0..50_000)).map(|_| (big(rng), big(rng))).collect(),
        },
        3 => {
            return (
                RequestBody::ReleaseView {
                    db: GOOD.into(),
                    view: rng.u64(0..50),
                },
                true,
            )
        }
        4 => {
            return (
                RequestBody::AdvanceView {
                    db: GOOD.into(),
                    view: rng.u64(0..50),
                    tid: big(rng),
                },
                true,
            )
        }
        5 => RequestBody::Touch {
            identity: rng.bool().then(|| rng.u64(..)),
            db: GOOD.into(),
            revisions: (0..rng.usize(1..200_000))
                .map(|_| (rng.u64(0..OIDS + 2), big(rng)))
                .collect(),
            // Counts that overflow when summed.
            hits: big(rng),
            misses: big(rng),
        },
        6 => RequestBody::Attach {
            db: own,
            last_tid: big(rng),
            proven: rng.bool().then(|| big(rng)),
        },
        7 => RequestBody::RegisterView { db: own, tid: big(rng) },
        8 => RequestBody::Resync {
            db: own,
            tid: big(rng),
            identity: rng.bool().then(|| rng.u64(..)),
        },
        9 => RequestBody::Flush { db: own },
        _ => RequestBody::Hello {
            version: rng.u32(..),
            client: "again".into(),
        },
    };
    (body, false)
}

/// Damages a frame (prefix and body) once.
fn mutate(rng: &mut fastrand::Rng, frame: &mut Vec<u8>) {
    let mut body = frame.split_off(4);
    let mut lie = None;
    match rng.u8(..7) {
        0 | 1 if !body.is_empty() => {
            let i = rng.usize(..body.len());
            body[i] ^= 1 << rng.u8(..8);
        }
        2 => body.truncate(rng.usize(..=body.len())),
        3 => {
            let i = rng.usize(..=body.len());
            let marker = [0xdcu8, 0xdd, 0xde, 0xdf, 0xc5, 0xc6, 0xda, 0xdb][rng.usize(..8)];
            let claim: u32 = [u32::MAX, 1 << 31, rng.u32(..)][rng.usize(..3)];
            let mut b = vec![marker];
            let width = if matches!(marker, 0xdc | 0xde | 0xc5 | 0xda) {
                2
            } else {
                4
            };
            b.extend_from_slice(&claim.to_be_bytes()[4 - width..]);
            let end = (i + b.len()).min(body.len());
            body.splice(i..end, b);
        }
        4 => {
            let depth = rng.usize(1..5000);
            let mut nested = vec![0x91u8; depth];
            nested.extend_from_slice(&body);
            body = nested;
        }
        5 => lie = Some([u32::MAX, 0, rng.u32(..), (64 << 20) + 1, body.len() as u32 + 1][rng.usize(..5)]),
        _ => {
            let i = rng.usize(..=body.len());
            let n = rng.usize(1..8);
            body.splice(i..i, (0..n).map(|_| rng.u8(..)));
        }
    }
    let len = lie.unwrap_or(body.len() as u32);
    frame.clear();
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
}

/// A frame to send: random bytes, or a valid request damaged 1 to 3 times.
fn bad_frame(rng: &mut fastrand::Rng) -> Vec<u8> {
    match rng.u8(..4) {
        0 => {
            let n = rng.usize(0..200);
            (0..n).map(|_| rng.u8(..)).collect()
        }
        _ => {
            let (body, _) = hostile(rng);
            let body = match body {
                // Keep damaged frames small: the big ones are sent whole.
                RequestBody::Lookup { db, view, oids } => RequestBody::Lookup {
                    db,
                    view,
                    oids: oids.into_iter().take(20).collect(),
                },
                RequestBody::Touch {
                    db,
                    revisions,
                    identity,
                    hits,
                    misses,
                } => RequestBody::Touch {
                    db,
                    revisions: revisions.into_iter().take(20).collect(),
                    identity,
                    hits,
                    misses,
                },
                RequestBody::Report {
                    db,
                    from,
                    to,
                    changes,
                    identity,
                } => RequestBody::Report {
                    db,
                    from,
                    to,
                    changes: changes.into_iter().take(20).collect(),
                    identity,
                },
                RequestBody::Store {
                    db,
                    revisions,
                    identity,
                } => RequestBody::Store {
                    db,
                    revisions: revisions.into_iter().filter(|r| r.state.len() < 1000).collect(),
                    identity,
                },
                b => b,
            };
            let mut f = request(rng.u64(..), body);
            for _ in 0..rng.usize(1..=3) {
                mutate(rng, &mut f);
            }
            f
        }
    }
}

/// One bad connection: maybe a Hello, then frames, then the write side
/// closed; every answer must decode, and the sidecar must close the
/// connection. Returns the frames sent.
fn bad_connection(socket: &std::path::Path, rng: &mut fastrand::Rng) -> Result<u64, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut frames = 0;
    let mut out = Vec::new();
    let mut expect_unknown_view = Vec::new();
    if rng.u8(..10) < 8 {
        out.extend(request(
            1,
            RequestBody::Hello {
                version: PROTOCOL_VERSION,
                client: "fuzz".into(),
            },
        ));
        frames += 1;
        for i in 0..rng.usize(0..4) {
            let (body, unknown_view) = hostile(rng);
            let id = 100 + i as u64;
            if unknown_view {
                expect_unknown_view.push(id);
            }
            out.extend(request(id, body));
            frames += 1;
        }
    }
    for _ in 0..rng.usize(0..3) {
        out.extend(bad_frame(rng));
        frames += 1;
    }
    // The sidecar may close early (a malformed frame): a failed write is fine.
    let _ = s.write_all(&out);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answers = Vec::new();
    match s.read_to_end(&mut answers) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => return Err(format!("the sidecar neither answered nor closed: {e}")),
    }
    let mut rest = &answers[..];
    while rest.len() >= 4 {
        let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        let Some(body) = rest.get(4..4 + n) else {
            return Err(format!("a truncated answer of {n} bytes"));
        };
        let resp: Response = rmp_serde::from_slice(body).map_err(|e| format!("undecodable answer: {e}"))?;
        if expect_unknown_view.contains(&resp.id)
            && !matches!(
                resp.body,
                ResponseBody::Error {
                    code: ErrorCode::UnknownView,
                    ..
                }
            )
        {
            return Err(format!("another connection's view was not refused: {:?}", resp.body));
        }
        rest = &rest[4 + n..];
    }
    if !rest.is_empty() {
        return Err("trailing bytes after the answers".into());
    }
    Ok(frames)
}

/// Runs the campaign against a fresh sidecar: `fuzzers` threads of bad
/// connections and one good client, `connections` each (or until the
/// deadline). Returns `(frames, hits)`.
fn campaign(seed: u64, connections: u64, deadline: Option<Instant>) -> Result<(u64, u64), Vec<String>> {
    let mut sc = Sidecar::start(&["--max-frame-mb", "8", "--reclaim-interval-ms", "50"]);
    let socket = sc.socket.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let frames = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let good = {
        let (socket, stop) = (socket.clone(), stop.clone());
        std::thread::spawn(move || good_client(&socket, seed, &stop, 30))
    };
    let fuzzers: Vec<_> = (0..3u64)
        .map(|t| {
            let (socket, frames, failures) = (socket.clone(), frames.clone(), failures.clone());
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(seed ^ (t + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                for i in 0.. {
                    if deadline.map_or(i >= connections, |d| Instant::now() >= d) {
                        break;
                    }
                    match bad_connection(&socket, &mut rng) {
                        Ok(n) => {
                            frames.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(e) => failures.lock().unwrap().push(format!("fuzzer {t} connection {i}: {e}")),
                    }
                }
            })
        })
        .collect();
    for f in fuzzers {
        let _ = f.join();
    }
    stop.store(true, Ordering::Relaxed);
    let hits = match good.join() {
        Ok(Ok(hits)) => hits,
        Ok(Err(e)) => {
            failures.lock().unwrap().push(format!("the good client: {e}"));
            0
        }
        Err(_) => {
            failures.lock().unwrap().push("the good client panicked".into());
            0
        }
    };
    let mut failures = std::mem::take(&mut *failures.lock().unwrap());
    if !sc.alive() {
        failures.push(format!("tidecached died: {:?}", sc.child.try_wait()));
    }
    let log = sc.log();
    if let Some(line) = log.lines().find(|l| l.contains("panicked")) {
        failures.push(format!("tidecached panicked: {line}"));
    }
    let frames = frames.load(Ordering::Relaxed);
    if failures.is_empty() {
        Ok((frames, hits))
    } else {
        Err(failures.into_iter().map(|f| format!("seed {seed}: {f}")).collect())
    }
}

#[test]
fn a_live_sidecar_survives_bad_and_hostile_connections_and_serves_the_good_client() {
    let soak = soak_seconds();
    let end = Instant::now() + Duration::from_secs(soak.unwrap_or(0));
    let (mut frames, mut hits, mut runs) = (0, 0, 0);
    let mut failures = Vec::new();
    loop {
        let seed = seed();
        let deadline = soak.map(|_| end.min(Instant::now() + Duration::from_secs(60)));
        match campaign(seed, 60, deadline) {
            Ok((f, h)) => {
                frames += f;
                hits += h;
            }
            Err(e) => failures.extend(e),
        }
        runs += 1;
        if soak.is_none() || Instant::now() >= end {
            break;
        }
    }
    let crashes = failures
        .iter()
        .filter(|f| f.contains("died") || f.contains("panicked"))
        .count();
    println!(
        "SOAK live sidecar: sidecars {runs}, frames fuzzed {frames}, good client's hits checked {hits}, wrong hits {}, crashes {crashes}, other failures {}",
        failures.iter().filter(|f| f.contains("wrong hit")).count(),
        failures.len() - crashes
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(hits > 0, "the good client never hit");
}
