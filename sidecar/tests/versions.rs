//! Rolling upgrades: a sidecar serves clients of its protocol version and
//! of the previous one (`tidecache_protocol::previous`), in raw frames of
//! that version, and refuses older ones with `VersionMismatch` and one log
//! line.

mod common;

use common::{item, Sidecar};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use tidecache_client::protocol::{
    encode, previous, read_frame_len, write_frame, ArenaStats, AttachState, ErrorCode, Request, RequestBody, Response,
    ResponseBody, PROTOCOL_VERSION,
};
use tidecache_client::{Client, ClientConfig};

const OLD: u32 = PROTOCOL_VERSION - 1;

/// The requests of version 6 whose encoding differs from version 7's.
#[derive(Serialize)]
enum OldRequest {
    Touch {
        db: String,
        revisions: Vec<(u64, u64)>,
        identity: Option<u64>,
    },
}

/// Version 6's `DatabaseStats`, decoded as a version 6 client does (an
/// array with more elements than fields is an error in rmp-serde).
#[derive(Deserialize, Debug)]
#[allow(dead_code)]
struct OldDatabaseStats {
    entries: u64,
    bytes: u64,
    hits: u64,
    misses: u64,
    stores: u64,
    refused: u64,
    invalidations: u64,
    reclaimed: u64,
    evicted: u64,
    views: u64,
    horizon: Option<u64>,
    low_water_mark: Option<u64>,
    log_start: Option<u64>,
    log_len: u64,
    detached: u64,
}

#[derive(Deserialize, Debug)]
#[allow(dead_code)]
struct OldServerStats {
    server: String,
    uptime_s: u64,
    clients: u64,
    capacity_bytes: u64,
    arena: ArenaStats,
    total: OldDatabaseStats,
    databases: BTreeMap<String, OldDatabaseStats>,
}

#[derive(Deserialize, Debug)]
enum OldStatsAnswer {
    Stats(OldServerStats),
}

fn raw(sc: &Sidecar) -> UnixStream {
    let s = UnixStream::connect(&sc.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn send_bytes(s: &mut UnixStream, body: &[u8]) {
    write_frame(s, body).unwrap();
}

fn send(s: &mut UnixStream, id: u64, body: RequestBody) {
    send_bytes(s, &encode(&Request { id, body }).unwrap());
}

fn recv_bytes(s: &mut UnixStream) -> Vec<u8> {
    let n = read_frame_len(s).unwrap();
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

/// An answer every message but `Stats` has in the same shape in both
/// versions: decoded with this version's types.
fn recv(s: &mut UnixStream, id: u64) -> ResponseBody {
    let r: Response = rmp_serde::from_slice(&recv_bytes(s)).unwrap();
    assert_eq!(r.id, id);
    r.body
}

#[test]
fn a_client_of_the_previous_version_is_served_in_its_own_encoding() {
    assert_eq!(OLD, previous::VERSION);
    let sc = Sidecar::start(&[]);
    let mut s = raw(&sc);
    send(
        &mut s,
        1,
        RequestBody::Hello {
            version: OLD,
            client: "old worker".into(),
        },
    );
    // Answered in its version: a client checks the version it gets back.
    let ResponseBody::Hello { version, .. } = recv(&mut s, 1) else {
        panic!("no Hello")
    };
    assert_eq!(version, OLD);

    send(
        &mut s,
        2,
        RequestBody::Attach {
            db: "old".into(),
            last_tid: 100,
            proven: None,
        },
    );
    let ResponseBody::Attached {
        state: AttachState::Started,
        identity,
        ..
    } = recv(&mut s, 2)
    else {
        panic!("not attached")
    };
    send(
        &mut s,
        3,
        RequestBody::Store {
            db: "old".into(),
            revisions: vec![item(1, 100, None, 100, b"one")],
            identity: Some(identity),
        },
    );
    assert_eq!(recv(&mut s, 3), ResponseBody::Stored { kept: 1, refused: 0 });
    send(
        &mut s,
        4,
        RequestBody::Lookup {
            db: "old".into(),
            view: 100,
            oids: vec![1, 2],
        },
    );
    let ResponseBody::Found { results } = recv(&mut s, 4) else {
        panic!("no Found")
    };
    assert_eq!(
        results[0].as_ref().map(|f| (f.serial, f.state.clone())),
        Some((100, b"one".to_vec()))
    );
    assert!(results[1].is_none());
    send(
        &mut s,
        5,
        RequestBody::Report {
            db: "old".into(),
            from: 100,
            to: 101,
            changes: vec![(2, 101)],
            identity: Some(identity),
        },
    );
    assert_eq!(recv(&mut s, 5), ResponseBody::Reported { horizon: 101 });
    // Version 6's Touch: three fields, no counts.
    send_bytes(
        &mut s,
        &encode(&(
            6u64,
            OldRequest::Touch {
                db: "old".into(),
                revisions: vec![(1, 100)],
                identity: Some(identity),
            },
        ))
        .unwrap(),
    );
    assert_eq!(recv(&mut s, 6), ResponseBody::Done);
    // Stats in version 6's shape: decodes strictly.
    send(&mut s, 7, RequestBody::Stats);
    let bytes = recv_bytes(&mut s);
    let (id, OldStatsAnswer::Stats(old)): (u64, OldStatsAnswer) =
        rmp_serde::from_slice(&bytes).expect("a version 6 client decodes the Stats answer");
    assert_eq!(id, 7);
    let db = &old.databases["old"];
    assert_eq!((db.entries, db.horizon, db.hits), (1, Some(101), 0), "{db:?}");

    // A client of this version sees what the old one did: one lookup the
    // sidecar answered itself with a revision, none counted by clients.
    let mut cfg = ClientConfig::new(&sc.socket);
    cfg.timeout = Duration::from_secs(5);
    let st = Client::new(cfg).stats().unwrap();
    let db = &st.databases["old"];
    assert_eq!(
        (db.socket_hits, db.socket_misses, db.hits, db.misses),
        (1, 1, 0, 0),
        "{db:?}"
    );
    assert!(
        sc.log().contains("client said hello client=old worker version=6"),
        "{}",
        sc.log()
    );
}

/// Refused at `Hello` with `VersionMismatch`, and the connection closed.
fn refused(sc: &Sidecar, version: u32) -> String {
    let mut s = raw(sc);
    send(
        &mut s,
        1,
        RequestBody::Hello {
            version,
            client: format!("worker of version {version}"),
        },
    );
    let ResponseBody::Error { code, message, .. } = recv(&mut s, 1) else {
        panic!("version {version} was not refused")
    };
    assert_eq!(code, ErrorCode::VersionMismatch);
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0, "the connection is closed");
    message
}

/// Polls the sidecar's log (written by another process) for `needle`.
fn wait_for_log(sc: &Sidecar, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = sc.log();
        if log.contains(needle) || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn two_versions_back_or_a_newer_one_is_refused_with_a_clear_line() {
    let sc = Sidecar::start(&[]);
    let too_old = PROTOCOL_VERSION - 2;
    let message = refused(&sc, too_old);
    assert!(
        message.contains(&format!("protocol version {too_old} is not spoken by this tidecached"))
            && message.contains("upgrade the client"),
        "{message}"
    );
    let line = format!("refused a client of protocol version {too_old}: {message}");
    let log = wait_for_log(&sc, &line);
    assert!(log.contains(&line), "{log}");
    assert!(log.contains(&format!("client=worker of version {too_old}")), "{log}");
    // Again at once: refused, not logged again (one line a minute).
    refused(&sc, too_old);
    let newer = refused(&sc, PROTOCOL_VERSION + 1);
    assert!(newer.contains("upgrade tidecached first"), "{newer}");
    let log = wait_for_log(
        &sc,
        &format!("refused a client of protocol version {}", PROTOCOL_VERSION + 1),
    );
    assert_eq!(log.matches(&line).count(), 1, "{log}");
    // The sidecar serves on.
    let mut cfg = ClientConfig::new(&sc.socket);
    cfg.timeout = Duration::from_secs(5);
    assert!(Client::new(cfg).stats().is_ok());
}
