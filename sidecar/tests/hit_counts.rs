//! Host-wide hit counters: each client counts its lookups (hits read from
//! the arena never reach the sidecar) and sends them with its hit hints;
//! the sidecar's per-database `hits` and `misses` are the sums.

mod common;

use common::{item, Sidecar};
use std::time::Duration;
use tidecache_client::protocol::{AttachState, ServerStats};
use tidecache_client::session::Read;
use tidecache_client::{Client, ClientConfig, Session};

fn config(sc: &Sidecar) -> ClientConfig {
    let mut c = ClientConfig::new(&sc.socket);
    c.timeout = Duration::from_secs(5);
    c
}

fn stats(sc: &Sidecar) -> ServerStats {
    Client::new(config(sc)).stats().expect("stats")
}

/// A session of `db` joined at tid 100 with oid 1 stored (open at 100).
fn session(sc: &Sidecar, db: &str) -> Session {
    let s = Session::new(config(sc), db);
    assert_eq!(s.attach(100, None).unwrap(), AttachState::Started);
    assert!(s.store(item(1, 100, None, 100, b"state of 1")).unwrap());
    s
}

/// Reads `oid` at view 100 from the arena, as the Python adapter does.
fn read(s: &Session, oid: u64) -> Read<Vec<u8>> {
    s.lookup_into(oid, 100, |len, copy| {
        let mut buf = vec![0; len];
        copy(&mut buf).then_some(buf)
    })
}

#[test]
fn hits_from_the_arena_reach_the_sidecar_after_a_flush() {
    let sc = Sidecar::start(&[]);
    let s = session(&sc, "a");
    let (n, m) = (37, 5);
    for _ in 0..n {
        assert!(matches!(read(&s, 1), Read::Hit { serial: 100, .. }));
    }
    for _ in 0..m {
        assert_eq!(read(&s, 2), Read::Miss);
    }
    assert_eq!(s.lookups(), (n, m));
    // Whatever went out before (with a hint batch, or after
    // COUNTS_INTERVAL), the flush sends the rest: no sleep needed.
    assert!(s.send_counts(Duration::from_secs(5)), "the counts were sent");
    let st = stats(&sc);
    let db = &st.databases["a"];
    assert_eq!((db.hits, db.misses), (n, m), "{db:?}");
    assert_eq!((st.total.hits, st.total.misses), (n, m));
    // The sidecar answered no lookup itself.
    assert_eq!((db.socket_hits, db.socket_misses), (0, 0));
    // A second flush with nothing new adds nothing.
    assert!(s.send_counts(Duration::from_secs(5)));
    assert_eq!(stats(&sc).databases["a"].hits, n);
    s.close();
}

#[test]
fn closing_sends_the_counts_and_databases_and_processes_add_up() {
    let sc = Sidecar::start(&[]);
    let a = session(&sc, "a");
    let b = Session::new(config(&sc), "b");
    assert_eq!(b.attach(100, None).unwrap(), AttachState::Started);
    let a2 = Session::new(config(&sc), "a");
    // The proof of the horizon (oid 1 at 100 is in the history), then joined.
    assert!(matches!(a2.attach(100, None).unwrap(), AttachState::Prove { .. }));
    assert_eq!(a2.attach(100, Some(100)).unwrap(), AttachState::Joined);
    for _ in 0..10 {
        assert!(matches!(read(&a, 1), Read::Hit { .. }));
    }
    for _ in 0..3 {
        assert!(matches!(read(&a2, 1), Read::Hit { .. }));
    }
    assert_eq!(read(&a2, 9), Read::Miss);
    // Lookups through `lookup` (arena or socket) count too; the misses of
    // `b` (nothing stored) as well.
    assert_eq!(b.lookup(100, vec![1, 2, 3]).unwrap(), vec![None, None, None]);
    // A probe counts nothing.
    assert!(matches!(a.peek_into(1, 100, |len, _| Some(len)), Read::Hit { .. }));
    a.close();
    a2.close();
    b.close();
    let st = stats(&sc);
    assert_eq!((st.databases["a"].hits, st.databases["a"].misses), (13, 1));
    assert_eq!((st.databases["b"].hits, st.databases["b"].misses), (0, 3));
    assert_eq!((st.total.hits, st.total.misses), (13, 4));
}
