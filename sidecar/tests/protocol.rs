//! The wire protocol against a running `tidecached`: the normal path and
//! every kind of bad input the issue names.

mod common;

use common::{item, Sidecar};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use tidecache_client::protocol::{
    encode, read_frame_len, write_frame, ErrorCode, Request, RequestBody, Response, ResponseBody, PROTOCOL_VERSION,
};
use tidecache_client::{Client, ClientConfig};

/// Looks up over the socket and in the mapped arena: both must agree.
fn both(
    c: &Client,
    db: &str,
    view: u64,
    oids: Vec<u64>,
) -> Result<Vec<Option<tidecache_client::protocol::Found>>, tidecache_client::ClientError> {
    let remote = c.lookup_remote(db, view, oids.clone())?;
    let local = c.lookup(db, view, oids)?;
    assert_eq!(remote, local, "the socket and the arena disagree at view {view}");
    Ok(remote)
}

fn raw(socket: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn send(s: &mut UnixStream, id: u64, body: RequestBody) {
    write_frame(s, &encode(&Request { id, body }).unwrap()).unwrap();
}

fn recv(s: &mut UnixStream) -> Response {
    let n = read_frame_len(s).unwrap();
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).unwrap();
    rmp_serde::from_slice(&buf).unwrap()
}

fn hello(s: &mut UnixStream) {
    send(
        s,
        1,
        RequestBody::Hello {
            version: PROTOCOL_VERSION,
            client: "test".into(),
        },
    );
    assert!(matches!(
        recv(s).body,
        ResponseBody::Hello {
            version: PROTOCOL_VERSION,
            ..
        }
    ));
}

/// The connection was closed by the sidecar: a read gets EOF.
fn assert_closed(s: &mut UnixStream) {
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0, "connection should be closed");
}

fn error_code(r: &Response) -> ErrorCode {
    match &r.body {
        ResponseBody::Error { code, .. } => *code,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn client(sc: &Sidecar) -> Client {
    let mut c = ClientConfig::new(&sc.socket);
    c.timeout = Duration::from_secs(2);
    Client::new(c)
}

#[test]
fn socket_is_created_0600() {
    let sc = Sidecar::start(&[]);
    let mode = std::fs::metadata(&sc.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn store_lookup_report_follow_the_mvcc_rules() {
    let sc = Sidecar::start(&[]);
    let c = client(&sc);
    c.attach("db", 10, None).unwrap();
    // Revision (1, serial 10) current at view 10; (2, 5) closed at 8.
    assert_eq!(
        c.store(
            "db",
            vec![item(1, 10, None, 10, b"one"), item(2, 5, Some(8), 10, b"two")]
        )
        .unwrap(),
        (2, 0)
    );
    let r = both(&c, "db", 10, vec![1, 2, 3]).unwrap();
    assert_eq!(r[0].as_ref().unwrap().state, b"one");
    assert!(r[1].is_none(), "(2, 5) ends at 8: not visible at 10");
    assert!(r[2].is_none());
    assert_eq!(both(&c, "db", 7, vec![2]).unwrap()[0].as_ref().unwrap().state, b"two");
    // An open revision does not answer past the horizon (invariant 2).
    assert!(both(&c, "db", 11, vec![1]).unwrap()[0].is_none());
    // Oid 1 changes at 12: visible at 11, not at 12.
    assert_eq!(c.report("db", 10, 12, vec![(1, 12)]).unwrap(), 12);
    assert!(both(&c, "db", 11, vec![1]).unwrap()[0].is_some());
    assert!(both(&c, "db", 12, vec![1]).unwrap()[0].is_none());
    // A late store of the stale revision is closed by the log (invariant 3).
    c.store("db", vec![item(3, 9, None, 10, b"three")]).unwrap();
    c.report("db", 12, 13, vec![(3, 13)]).unwrap();
    c.store("db", vec![item(3, 9, None, 11, b"three")]).unwrap();
    assert!(both(&c, "db", 13, vec![3]).unwrap()[0].is_none());
    // Databases do not share anything (invariant 7).
    assert!(c.lookup_remote("other", 10, vec![1]).unwrap()[0].is_none());

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tidecached"))
        .args(["stats", "--socket"])
        .arg(&sc.socket)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let db = &v["databases"]["db"];
    assert_eq!(db["horizon"], 13);
    // The lookups above are the sidecar's own (over the socket); no client
    // sent counts of its own (`hits`, `misses`: sidecar/tests/hit_counts.rs).
    assert_eq!(db["socket_hits"], 3);
    assert_eq!(db["hits"], 0);
    assert!(v["total"]["entries"].as_u64().unwrap() >= 2);
    for key in [
        "entries",
        "bytes",
        "hits",
        "misses",
        "stores",
        "views",
        "horizon",
        "low_water_mark",
    ] {
        assert!(db.get(key).is_some(), "stats lack {key}: {v}");
    }
    assert!(v.get("clients").is_some());
}

#[test]
fn a_client_below_the_horizon_is_told_and_a_restored_one_flushes() {
    let sc = Sidecar::start(&[]);
    let c = client(&sc);
    c.attach("db", 10, None).unwrap();
    c.store("db", vec![item(1, 5, Some(9), 10, b"old")]).unwrap();
    c.report("db", 10, 20, vec![]).unwrap();
    use tidecache_client::protocol::AttachState;
    // Below the horizon: nothing changes until the client decides.
    assert_eq!(c.attach("db", 15, None).unwrap(), (AttachState::Behind, 20));
    assert!(c.lookup_remote("db", 6, vec![1]).unwrap()[0].is_some());
    assert!(c.lookup("db", 6, vec![1]).is_err(), "not joined: not served");
    // A lagging client catches up, proves the horizon and joins.
    let nothing_known = AttachState::Prove {
        witness: vec![],
        open_sample: vec![],
    };
    assert_eq!(c.attach("db", 20, None).unwrap(), (nothing_known, 20));
    assert_eq!(c.attach("db", 20, Some(20)).unwrap(), (AttachState::Joined, 20));
    // A restored one does not: it flushes, then starts the log anew.
    c.flush("db").unwrap();
    assert_eq!(c.attach("db", 15, None).unwrap(), (AttachState::Started, 15));
    assert!(c.lookup("db", 6, vec![1]).unwrap()[0].is_none());
}

/// Invariant 7: at or past the horizon, a client joins only once it proved
/// its storage holds the horizon transaction; until then its lookups are
/// unavailable, its reports refused by the client, and a reconnect does not
/// join it by replaying a Resync.
#[test]
fn joining_needs_a_proof_and_an_unproven_client_is_never_replayed() {
    use tidecache_client::protocol::AttachState;
    use tidecache_client::{ClientError, Local};
    let sc = Sidecar::start(&[]);
    let a = client(&sc);
    assert_eq!(a.attach("db", 10, None).unwrap(), (AttachState::Started, 10));
    a.report("db", 10, 20, vec![(2, 15), (1, 20), (3, 20)]).unwrap();
    a.store("db", vec![item(1, 20, None, 20, b"one"), item(4, 5, None, 20, b"four")])
        .unwrap();
    let b = client(&sc);
    let asked = AttachState::Prove {
        witness: vec![1, 3],
        open_sample: vec![(1, 20), (4, 5)],
    };
    assert_eq!(b.attach("db", 25, None).unwrap(), (asked.clone(), 20));
    assert_eq!(b.lookup_local("db", 1, 20), Local::Unavailable);
    let e = b.report("db", 25, 26, vec![]).unwrap_err();
    assert!(matches!(e, ClientError::NotAttached { .. }), "{e}");
    assert!(matches!(b.resync("db", 26), Err(ClientError::NotAttached { .. })));
    // The horizon moves while b proves: b is asked again about the new one.
    a.report("db", 20, 22, vec![(4, 22)]).unwrap();
    let again = AttachState::Prove {
        witness: vec![4],
        open_sample: vec![(1, 20)],
    };
    assert_eq!(b.attach("db", 25, Some(20)).unwrap(), (again, 22));
    // A restart of the sidecar on the same file: a reconnects and is joined
    // again (it proved, or started, the log); b is not.
    let (dir, socket) = sc.kill();
    let sc = Sidecar::start_at(dir, socket, &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while a.stats().is_err() || b.stats().is_err() {
        assert!(std::time::Instant::now() < deadline, "never reconnected");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(matches!(a.lookup_local("db", 1, 20), Local::Hit(_)));
    assert_eq!(b.lookup_local("db", 1, 20), Local::Unavailable);
    assert!(!b.is_attached("db"));
    // After the restart the witness is gone (memory only): b proves with
    // its iterator and the open revisions found in the reopened file, which
    // are known once the background verification is done (before, the
    // sample is empty: a partial one could miss the newest revisions).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sc.log().contains("reopened arena verified") {
        assert!(std::time::Instant::now() < deadline, "never verified: {}", sc.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let after_restart = AttachState::Prove {
        witness: vec![],
        open_sample: vec![(1, 20)],
    };
    assert_eq!(b.attach("db", 25, None).unwrap(), (after_restart, 22));
    assert_eq!(b.attach("db", 25, Some(22)).unwrap(), (AttachState::Joined, 22));
    assert!(matches!(b.lookup_local("db", 1, 20), Local::Hit(_)));
    assert_eq!(b.report("db", 22, 25, vec![]).unwrap(), 25);
    drop(sc);
}

/// A tid more than a day past the sidecar's clock (tids are UTC
/// timestamps) would raise the horizon of every other client: refused, with
/// its own error code, for reports, resyncs and attaches.
#[test]
fn a_tid_far_past_the_wall_clock_is_refused() {
    use tidecache_client::ClientError;
    use tidecache_sidecar::server::tid_at;
    let sc = Sidecar::start(&[]);
    let c = client(&sc);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (today, in_two_days) = (tid_at(now), tid_at(now + 2 * 86_400));
    fn future<T>(r: Result<T, ClientError>) -> bool {
        matches!(
            r,
            Err(ClientError::Refused {
                code: ErrorCode::FutureTid,
                ..
            })
        )
    }
    assert!(future(c.attach("db", in_two_days, None)));
    c.attach("db", today, None).unwrap();
    assert!(future(c.report("db", today, in_two_days, vec![(1, in_two_days)])));
    assert!(future(c.report("db", today, u64::MAX, vec![])));
    assert!(future(c.resync("db", in_two_days)));
    // Within the day: a clock a few hours ahead is served.
    let later = tid_at(now + 3600);
    assert_eq!(c.report("db", today, later, vec![(1, later)]).unwrap(), later);
    let other = client(&sc);
    let (state, h) = other.attach("db", later, None).unwrap();
    assert_eq!(h, later, "{state:?}");
    assert_eq!(c.connects(), 1, "the connection is kept");
}

#[test]
fn a_gap_is_refused_and_the_connection_kept() {
    let sc = Sidecar::start(&[]);
    let c = client(&sc);
    c.attach("db", 10, None).unwrap();
    let e = c.report("db", 11, 12, vec![(1, 12)]).unwrap_err();
    assert!(e.is_gap(), "{e}");
    assert_eq!(c.report("db", 10, 12, vec![(1, 12)]).unwrap(), 12);
    assert_eq!(c.connects(), 1);
}

#[test]
fn oversized_frame_gets_an_error_and_only_that_connection_closes() {
    let sc = Sidecar::start(&["--max-frame-mb", "1"]);
    let other = client(&sc);
    other.attach("db", 1, None).unwrap();
    let mut s = raw(&sc.socket);
    hello(&mut s);
    s.write_all(&(2u32 << 20).to_be_bytes()).unwrap();
    let r = recv(&mut s);
    assert_eq!(error_code(&r), ErrorCode::FrameTooLarge);
    assert_closed(&mut s);
    assert!(
        other.lookup("db", 1, vec![1]).is_ok(),
        "another client keeps being served"
    );
    assert_eq!(other.connects(), 1);
}

#[test]
fn undecodable_body_gets_an_error_and_a_closed_connection() {
    let sc = Sidecar::start(&[]);
    let mut s = raw(&sc.socket);
    hello(&mut s);
    write_frame(&mut s, &[0xc1, 0xff, 0x00]).unwrap(); // 0xc1 is never valid MessagePack
    assert_eq!(error_code(&recv(&mut s)), ErrorCode::Malformed);
    assert_closed(&mut s);
}

#[test]
fn unknown_message_gets_an_error_and_the_connection_lives_on() {
    let sc = Sidecar::start(&[]);
    let mut s = raw(&sc.socket);
    hello(&mut s);
    let bytes = rmp_serde::to_vec(&(77u64, std::collections::BTreeMap::from([("Frobnicate", 1u8)]))).unwrap();
    write_frame(&mut s, &bytes).unwrap();
    let r = recv(&mut s);
    assert_eq!(r.id, 77);
    assert_eq!(error_code(&r), ErrorCode::UnknownMessage);
    send(&mut s, 78, RequestBody::Stats);
    assert!(matches!(recv(&mut s).body, ResponseBody::Stats(_)));
}

#[test]
fn requests_before_hello_and_wrong_versions_are_refused() {
    let sc = Sidecar::start(&[]);
    let mut s = raw(&sc.socket);
    send(&mut s, 5, RequestBody::Stats);
    let r = recv(&mut s);
    assert_eq!((r.id, error_code(&r)), (5, ErrorCode::NoHello));
    assert_closed(&mut s);
    let mut s = raw(&sc.socket);
    send(
        &mut s,
        6,
        RequestBody::Hello {
            version: 999,
            client: "future".into(),
        },
    );
    assert_eq!(error_code(&recv(&mut s)), ErrorCode::VersionMismatch);
    assert_closed(&mut s);
}

#[test]
fn bad_requests_are_refused_and_garbage_never_kills_the_sidecar() {
    let mut sc = Sidecar::start(&[]);
    let c = client(&sc);
    c.attach("db", 10, None).unwrap();
    // A store that ends before it starts; a report with a change outside it.
    assert!(c.store("db", vec![item(1, 9, Some(9), 10, b"x")]).is_err());
    assert!(c.report("db", 10, 12, vec![(1, 13)]).is_err());
    // A view that is not ours.
    let mut s = raw(&sc.socket);
    hello(&mut s);
    send(
        &mut s,
        2,
        RequestBody::ReleaseView {
            db: "db".into(),
            view: 424242,
        },
    );
    assert_eq!(error_code(&recv(&mut s)), ErrorCode::UnknownView);
    // Random bytes in many shapes.
    let mut seed = 0x2545F4914F6CDD1Du64;
    for i in 0..200 {
        let mut s = raw(&sc.socket);
        if i % 2 == 0 {
            hello(&mut s);
        }
        let n = (seed % 64) as usize + 1;
        let body: Vec<u8> = (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = write_frame(&mut s, &body);
    }
    assert!(sc.alive(), "tidecached died on garbage");
    assert!(c.lookup("db", 10, vec![1]).is_ok());
}

#[test]
fn a_disconnecting_client_releases_its_views() {
    let sc = Sidecar::start(&[]);
    let watcher = client(&sc);
    {
        let c = client(&sc);
        c.attach("db", 10, None).unwrap();
        c.register_view("db", 10);
        c.register_view("db", 12);
        let s = watcher.stats().unwrap();
        assert_eq!(s.databases["db"].views, 2);
        assert_eq!(s.databases["db"].low_water_mark, Some(10));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = watcher.stats().unwrap();
        if s.databases["db"].views == 0 {
            assert_eq!(s.databases["db"].low_water_mark, None);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "views not released");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn databases_nobody_is_attached_to_make_room_for_new_ones() {
    let sc = Sidecar::start(&["--max-databases", "2"]);
    let first = client(&sc);
    first.attach("a", 1, None).unwrap();
    first.attach("b", 1, None).unwrap();
    let second = client(&sc);
    let e = second.attach("c", 1, None).unwrap_err();
    assert!(
        matches!(
            e,
            tidecache_client::ClientError::Refused {
                code: ErrorCode::Limit,
                ..
            }
        ),
        "{e}"
    );
    first.close();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while second.attach("c", 1, None).is_err() {
        assert!(std::time::Instant::now() < deadline, "a and b were never dropped");
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = second.stats().unwrap();
    assert_eq!(s.databases.keys().collect::<Vec<_>>(), vec!["c"]);
}

#[test]
fn a_view_holding_the_log_back_is_detached_and_registers_again_when_it_moves() {
    let sc = Sidecar::start(&["--max-log-changes", "10", "--reclaim-interval-ms", "20"]);
    let c = client(&sc);
    c.attach("db", 10, None).unwrap();
    let old = c.register_view("db", 10);
    let changes: Vec<(u64, u64)> = (11..=40).map(|t| (t, t)).collect();
    c.report("db", 10, 40, changes).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = c.stats().unwrap();
        let db = &s.databases["db"];
        if db.detached == 1 {
            assert_eq!(db.views, 0);
            assert!(db.log_len <= 10, "log still holds {}", db.log_len);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never detached: {db:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A store from the detached view's time is refused; the view registers
    // again when its connection moves on.
    assert_eq!(c.store("db", vec![item(99, 10, None, 12, b"old")]).unwrap(), (0, 1));
    c.advance_view(old, 40);
    let db = &c.stats().unwrap().databases["db"];
    assert_eq!((db.views, db.low_water_mark), (1, Some(40)));
}

#[test]
fn a_lookup_answer_stays_within_half_a_frame_extra_oids_miss() {
    let sc = Sidecar::start(&["--max-frame-mb", "1"]);
    let c = client(&sc);
    c.attach("db", 10, None).unwrap();
    let big = vec![7u8; 100 * 1024];
    c.store("db", vec![item(1, 10, None, 10, &big)]).unwrap();
    // 20 copies of a 100 KiB revision would be 2 MiB: only what fits in
    // half a frame (512 KiB) is answered, the rest are misses.
    let r = c.lookup_remote("db", 10, vec![1; 20]).unwrap();
    let hits = r.iter().filter(|f| f.is_some()).count();
    assert_eq!(hits, 5, "{hits} hits");
    assert!(r[..5].iter().all(|f| f.as_ref().unwrap().state == big));
}

#[test]
fn the_client_refuses_an_oversized_answer_as_unavailable() {
    // A fake sidecar that answers Hello with a 3 GiB length prefix.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("liar.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let n = read_frame_len(&mut s).unwrap();
            let mut buf = vec![0; n];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&(3u32 << 30).to_be_bytes()).unwrap();
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let c = Client::new(ClientConfig::new(&path));
    let e = c.lookup_remote("db", 1, vec![1]).unwrap_err();
    assert!(e.to_string().contains("over the maximum"), "{e}");
}

/// Invariant 7 after a flush: a process that finds a restored backup
/// flushes the database; every other process, joined on the old history,
/// is cut off at once (its slot identity is gone: lookups miss, stores,
/// reports, resyncs and touches are refused `Stale`) until it proves the
/// new history. Without the check, the old process's stores land in the
/// new history (seen: its state served to the new one's views).
#[test]
fn a_flush_cuts_off_the_processes_still_on_the_old_history() {
    use tidecache_client::protocol::AttachState;
    use tidecache_client::{ClientError, Local};
    let sc = Sidecar::start(&[]);
    let (old, new) = (client(&sc), client(&sc));
    assert_eq!(old.attach("db", 10, None).unwrap().0, AttachState::Started);
    old.store("db", vec![item(1, 5, None, 10, b"old history")]).unwrap();
    assert!(matches!(old.lookup_local("db", 1, 10), Local::Hit(_)));
    // The restored backup: behind the horizon, so it flushes and starts.
    assert_eq!(new.attach("db", 8, None).unwrap().0, AttachState::Behind);
    new.flush("db").unwrap();
    assert_eq!(new.attach("db", 8, None).unwrap().0, AttachState::Started);
    // The old process misses in the arena...
    assert!(!matches!(old.lookup_local("db", 1, 10), Local::Hit(_)));
    // ...and its writes are refused, which makes it unjoined.
    let stale = old.store("db", vec![item(1, 5, None, 10, b"old history")]).unwrap_err();
    assert!(stale.is_stale(), "{stale}");
    assert!(!old.is_attached("db"));
    assert!(matches!(
        old.report("db", 10, 11, vec![(2, 11)]),
        Err(ClientError::NotAttached { .. })
    ));
    // Nothing of the old history reached the new one.
    new.store("db", vec![item(3, 7, None, 8, b"new history")]).unwrap();
    assert!(!matches!(new.lookup_local("db", 1, 8), Local::Hit(_)));
    assert!(matches!(new.lookup_local("db", 3, 8), Local::Hit(_)));
    // Nothing the old process sent moved the new history's horizon.
    let stats = old.stats().unwrap();
    assert_eq!(stats.databases["db"].horizon, Some(8));
}

/// A collapsed report (every oid changed in `(from, to]` with its newest
/// change or an upper bound of it) through the binary: the open revision of
/// a listed oid answers only views up to the prior horizon, an unlisted
/// one stays open up to the new horizon, a store loaded inside the
/// uncertain interval is refused, one loaded past it is kept open; gaps,
/// bad reports, future tids and stale identities are refused as for
/// `Report`; no witness is left for the next attach.
#[test]
fn a_collapsed_report_closes_conservatively() {
    use tidecache_client::protocol::AttachState;
    use tidecache_client::ClientError;
    use tidecache_sidecar::server::tid_at;
    let sc = Sidecar::start(&[]);
    let c = client(&sc);
    c.attach("db", 8, None).unwrap();
    // An exact report: oid 9 witnesses the horizon transaction 10.
    c.report("db", 8, 10, vec![(9, 10)]).unwrap();
    c.store("db", vec![item(1, 5, None, 10, b"one"), item(2, 6, None, 10, b"two")])
        .unwrap();
    // Oid 1 changed somewhere in (10, 20]: its newest change is at most 20.
    assert_eq!(c.report_collapsed("db", 8, 20, vec![(1, 20)]).unwrap(), 20);
    assert_eq!(both(&c, "db", 10, vec![1]).unwrap()[0].as_ref().unwrap().end, Some(11));
    for view in [11, 15, 20] {
        assert!(both(&c, "db", view, vec![1]).unwrap()[0].is_none(), "oid 1 at {view}");
        assert_eq!(
            both(&c, "db", view, vec![2]).unwrap()[0].as_ref().unwrap().state,
            b"two"
        );
    }
    // Loaded at 15, inside (10, 20]: refused; loaded at 20: open.
    assert_eq!(c.store("db", vec![item(1, 5, None, 15, b"one")]).unwrap(), (0, 1));
    assert_eq!(c.store("db", vec![item(1, 18, None, 20, b"new")]).unwrap(), (1, 0));
    assert_eq!(both(&c, "db", 20, vec![1]).unwrap()[0].as_ref().unwrap().state, b"new");
    // Refusals as for Report.
    assert!(c.report_collapsed("db", 21, 22, vec![]).unwrap_err().is_gap());
    let bad = c.report_collapsed("db", 20, 22, vec![(3, 23)]).unwrap_err();
    assert!(
        matches!(
            bad,
            ClientError::Refused {
                code: ErrorCode::BadRequest,
                ..
            }
        ),
        "{bad}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let future = c
        .report_collapsed("db", 20, tid_at(now + 2 * 86_400), vec![])
        .unwrap_err();
    assert!(
        matches!(
            future,
            ClientError::Refused {
                code: ErrorCode::FutureTid,
                ..
            }
        ),
        "{future}"
    );
    assert_eq!(c.connects(), 1, "the connection is kept");
    // The collapsed report moved the horizon: no witness (its tids may be
    // upper bounds), a joining client proves with its iterator.
    let other = client(&sc);
    let (state, h) = other.attach("db", 20, None).unwrap();
    assert_eq!(h, 20);
    match state {
        AttachState::Prove { witness, .. } => assert!(witness.is_empty(), "{witness:?}"),
        s => panic!("expected a proof, got {s:?}"),
    }
    // A flush makes the old identity stale.
    other.flush("db").unwrap();
    let stale = c.report_collapsed("db", 20, 21, vec![(1, 21)]).unwrap_err();
    assert!(stale.is_stale(), "{stale}");
}
