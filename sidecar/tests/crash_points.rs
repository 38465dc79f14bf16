//! Crash consistency (invariant 8): for every crash point of the arena
//! writer (`tidecache_core::crash`), a real `tidecached` runs a seeded
//! workload of commits, stores, flushes, resyncs and short-lived databases
//! until it kills itself (`SIGKILL`) at that point; it is then restarted on
//! the same arena file and every lookup of every oid at every view is
//! compared with the storage's history, the reference model: a hit must be
//! exactly what `loadBefore(oid, view + 1)` returns.
//!
//! `make test` runs each point with two seeds; `make soak` runs
//! the same test for `TIDECACHE_SOAK_SECONDS` more with fresh seeds.

mod common;

use common::{item, Sidecar};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tidecache_client::protocol::AttachState;
use tidecache_client::{Client, ClientConfig, ClientError, Local};
use tidecache_core::crash;

const DATABASES: [&str; 2] = ["a", "b"];
const OIDS: u64 = 24;
const FIRST_TID: u64 = 1000;

/// The storage's history of one database: serials of every oid.
#[derive(Default, Clone)]
struct History {
    serials: BTreeMap<u64, Vec<u64>>,
}

impl History {
    /// `loadBefore(oid, view + 1)`: `(serial, end)`.
    fn load_before(&self, oid: u64, view: u64) -> Option<(u64, Option<u64>)> {
        let s = self.serials.get(&oid)?;
        let i = s.partition_point(|&x| x <= view);
        (i > 0).then(|| (s[i - 1], s.get(i).copied()))
    }
}

/// What the storages hold: every database's history, one tid sequence.
struct Truth {
    dbs: BTreeMap<&'static str, History>,
    /// Last tid committed in each database.
    last: BTreeMap<&'static str, u64>,
}

fn state(db: &str, oid: u64, serial: u64) -> Vec<u8> {
    // 200 bytes to 3 KiB, so that a 1 MiB arena evicts all the time.
    let len = 200 + ((oid * 7919 + serial * 104_729) % 2900) as usize;
    let seed = format!("{db}/{oid}@{serial};");
    seed.bytes().cycle().take(len).collect()
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn client(socket: &std::path::Path) -> Client {
    let mut c = ClientConfig::new(socket);
    c.retry_after = Duration::from_millis(10);
    c.timeout = Duration::from_secs(5);
    Client::new(c)
}

/// Attaches `db` at `last` as the Python adapter does: proves the
/// sidecar's horizon with the history when asked (flushes if the proof
/// fails), then fills in the changes after the horizon.
fn attach(c: &Client, db: &str, history: &History, last: u64) -> Result<(), ClientError> {
    let (state, horizon) = common::attach_proving(
        c,
        db,
        last,
        |oid, h| history.load_before(oid, h).map(|(s, _)| s),
        |h| history.serials.values().any(|s| s.contains(&h)),
    )?;
    if state == AttachState::Joined && horizon < last {
        let mut changes: Vec<(u64, u64)> = history
            .serials
            .iter()
            .flat_map(|(&oid, s)| s.iter().filter(|&&t| t > horizon && t <= last).map(move |&t| (oid, t)))
            .collect();
        changes.sort_by_key(|&(o, t)| (t, o));
        c.report(db, horizon, last, changes)?;
    }
    Ok(())
}

/// Runs the workload until the sidecar dies or `steps` are done; returns
/// whether it died.
fn workload(sc: &mut Sidecar, truth: &mut Truth, rng: &mut Rng, steps: usize) -> bool {
    let c = client(&sc.socket);
    for db in DATABASES {
        let last = truth.last[db];
        if attach(&c, db, &truth.dbs[db], last).is_err() {
            return died(sc);
        }
    }
    let mut transient = 0u64;
    for _ in 0..steps {
        let db = DATABASES[rng.below(2) as usize];
        let result: Result<(), ClientError> = match rng.below(100) {
            // A commit of one to three oids, reported.
            0..=29 => {
                let from = truth.last[db];
                let tid = from + 1 + rng.below(2);
                let mut changes = Vec::new();
                for _ in 0..1 + rng.below(3) {
                    let oid = rng.below(OIDS);
                    let s = truth.dbs.get_mut(db).unwrap().serials.entry(oid).or_default();
                    if s.last() != Some(&tid) {
                        s.push(tid);
                        changes.push((oid, tid));
                    }
                }
                truth.last.insert(db, tid);
                c.report(db, from, tid, changes).map(|_| ())
            }
            // ZEO's reconnect: two or three commits told as one collapsed
            // report, every oid at the newest tid (an upper bound).
            30..=34 => {
                let from = truth.last[db];
                let mut tid = from;
                let mut oids = std::collections::BTreeSet::new();
                for _ in 0..2 + rng.below(2) {
                    tid += 1 + rng.below(2);
                    let oid = rng.below(OIDS);
                    truth.dbs.get_mut(db).unwrap().serials.entry(oid).or_default().push(tid);
                    oids.insert(oid);
                }
                truth.last.insert(db, tid);
                let changes = oids.into_iter().map(|o| (o, tid)).collect();
                c.report_collapsed(db, from, tid, changes).map(|_| ())
            }
            // Stores of what loadBefore gives at a recent view.
            35..=84 => {
                let last = truth.last[db];
                let items: Vec<_> = (0..1 + rng.below(4))
                    .filter_map(|_| {
                        let oid = rng.below(OIDS);
                        let view = last.saturating_sub(rng.below(12)).max(FIRST_TID);
                        let (serial, end) = truth.dbs[db].load_before(oid, view)?;
                        Some(item(oid, serial, end, view, &state(db, oid, serial)))
                    })
                    .collect();
                c.store(db, items).map(|_| ())
            }
            // Hit hints: eviction copies what is read.
            85..=89 => {
                let oid = rng.below(OIDS);
                match truth.dbs[db].load_before(oid, truth.last[db]) {
                    Some((serial, _)) => c.touch(db, vec![(oid, serial)]),
                    None => Ok(()),
                }
            }
            90..=92 => c.flush(db),
            // Lost invalidations (a ZEO reconnect): a commit the sidecar
            // never hears of, then a resync at the new last tid.
            93..=95 => {
                let tid = truth.last[db] + 1;
                let oid = rng.below(OIDS);
                truth.dbs.get_mut(db).unwrap().serials.entry(oid).or_default().push(tid);
                truth.last.insert(db, tid);
                c.resync(db, tid).map(|_| ())
            }
            // A short-lived database on its own connection: at
            // --max-databases its slot is released for the next one.
            _ => {
                transient += 1;
                let name = format!("transient-{transient}");
                let t = client(&sc.socket);
                t.attach(&name, FIRST_TID, None)
                    .and_then(|_| t.store(&name, vec![item(1, FIRST_TID, None, FIRST_TID, b"transient")]))
                    .map(|_| t.close())
            }
        };
        match result {
            // A flush or a lost report left the log behind: resync, as the
            // adapter does.
            Err(e) if e.is_gap() && c.resync(db, truth.last[db]).is_err() && died(sc) => return true,
            Err(ClientError::Unavailable { .. }) if died(sc) => return true,
            _ => {}
        }
    }
    !sc.alive()
}

/// Whether the sidecar is dying: a client sees its socket close before the
/// kernel lets the process be reaped, so a failed call waits (boundedly)
/// for the exit instead of sampling it once.
fn died(sc: &mut Sidecar) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while sc.alive() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// After a restart: every lookup of every oid at every view of every
/// database equals the history; returns the number of hits.
fn check(sc: &Sidecar, truth: &Truth, when: &str) -> usize {
    let c = client(&sc.socket);
    let mut hits = 0;
    for db in DATABASES {
        let history = &truth.dbs[db];
        let last = truth.last[db];
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = attach(&c, db, history, last) {
            assert!(Instant::now() < deadline, "{when}: cannot attach {db}: {e}");
            std::thread::sleep(Duration::from_millis(10));
        }
        for oid in 0..OIDS {
            for view in FIRST_TID..=last {
                let found = match c.lookup_local(db, oid, view) {
                    Local::Hit(f) => f,
                    Local::Miss => continue,
                    Local::Unavailable => panic!("{when}: no arena to read for {db}"),
                };
                hits += 1;
                let Some((serial, end)) = history.load_before(oid, view) else {
                    panic!(
                        "{when}: {db} oid {oid} at view {view}: hit {} but no revision exists",
                        found.serial
                    );
                };
                assert_eq!(
                    found.serial, serial,
                    "{when}: {db} oid {oid} at view {view}: wrong revision"
                );
                assert_eq!(
                    found.state,
                    state(db, oid, serial),
                    "{when}: {db} oid {oid} at view {view}: wrong state"
                );
                if let Some(e) = found.end {
                    // The next change, or earlier after a collapsed report
                    // (a lower bound), never later.
                    assert!(
                        e > view && end.map_or(e <= last + 1, |n| e <= n),
                        "{when}: {db} oid {oid}@{serial}: wrong end {e}, next change {end:?}"
                    );
                }
            }
        }
    }
    hits
}

fn fresh_truth() -> Truth {
    let mut truth = Truth {
        dbs: BTreeMap::new(),
        last: BTreeMap::new(),
    };
    for db in DATABASES {
        let mut h = History::default();
        for oid in 0..OIDS {
            h.serials.insert(oid, vec![FIRST_TID]);
        }
        truth.dbs.insert(db, h);
        truth.last.insert(db, FIRST_TID);
    }
    truth
}

const ARGS: [&str; 4] = ["--memory-mb", "1", "--max-databases", "3"];

/// One run: warm up without crashing, then crash at `point` on its `n`th
/// pass, restart, check; then a second crash-free round on the restarted
/// file, and check again. Returns the hits seen.
fn run(point: &str, n: u64, seed: u64) -> usize {
    let mut truth = fresh_truth();
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tidecached.sock");
    let mut sc = Sidecar::start_at_with_env(dir, socket, &ARGS, &[]);
    assert!(
        !workload(&mut sc, &mut truth, &mut rng, 150),
        "died without a crash point"
    );
    let (dir, socket) = sc.kill();
    let spec = format!("{point}:{n}");
    let mut sc = Sidecar::start_at_with_env(dir, socket, &ARGS, &[("TIDECACHED_CRASH_AT", &spec)]);
    // Up to 30,000 steps: some points (a close of a stored open revision)
    // come by rarely in some seeds' workloads.
    let died = (0..10).any(|_| workload(&mut sc, &mut truth, &mut rng, 3000));
    assert!(died, "seed {seed}: crash point {spec} was never reached");
    let (dir, socket) = sc.kill();
    let mut sc = Sidecar::start_at_with_env(dir, socket, &ARGS, &[]);
    let when = format!("seed {seed}, after a crash at {spec}");
    let mut hits = check(&sc, &truth, &when);
    assert!(!workload(&mut sc, &mut truth, &mut rng, 300), "{when}: died afterwards");
    hits += check(&sc, &truth, &format!("{when}, then more work"));
    assert!(sc.alive(), "{when}: {}", sc.log());
    hits
}

/// Every crash point with two seeds; under `make soak`
/// (`TIDECACHE_SOAK_SECONDS`) fresh seeds until the time is up, then one
/// `SOAK` line.
#[test]
fn a_kill_at_any_write_step_never_leads_to_a_wrong_hit() {
    let mut hits = 0;
    for (i, point) in crash::ALL.iter().enumerate() {
        for seed in [1u64, 2] {
            let seed = seed * 7919 + i as u64;
            hits += run(point, 1 + seed % 5, seed);
        }
    }
    assert!(hits > 0, "the checks never hit: they checked nothing");
    let Some(seconds) = std::env::var("TIDECACHE_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    else {
        return;
    };
    let started = Instant::now();
    let first = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64 >> 16);
    let (mut runs, mut seed) = (0u64, first);
    while started.elapsed() < Duration::from_secs(seconds) {
        for point in crash::ALL {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let s = seed >> 16;
            hits += run(point, 1 + s % 20, s);
            runs += 1;
        }
    }
    println!(
        "SOAK crash points: {} points, {runs} kills and restarts, {hits} hits checked, 0 wrong hits (first seed {first})",
        crash::ALL.len()
    );
}
