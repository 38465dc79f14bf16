//! tidecache-client against an absent, stopped, killed and restarted
//! `tidecached` (invariant 8: faults degrade to misses, fast).

mod common;

use common::Sidecar;
use std::time::{Duration, Instant};
use tidecache_client::{Client, ClientConfig, ClientError};

fn fast_client(socket: &std::path::Path) -> Client {
    let mut c = ClientConfig::new(socket);
    c.retry_after = Duration::from_millis(20);
    Client::new(c)
}

#[test]
fn absent_sidecar_is_unavailable_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let c = fast_client(&dir.path().join("nobody.sock"));
    let e = c.attach("db", 1, None).unwrap_err();
    assert!(matches!(e, ClientError::Unavailable { .. }), "{e}");
    // Never joined: lookups are refused by the client itself.
    let e = c.lookup("db", 1, vec![1]).unwrap_err();
    assert!(matches!(e, ClientError::NotAttached { .. }), "{e}");
    let e = c.lookup_remote("db", 1, vec![1]).unwrap_err();
    assert!(matches!(e, ClientError::Unavailable { .. }), "{e}");
    // A refused connect, not a wait: the error says so.
    assert!(e.to_string().contains("connect"), "{e}");
}

#[test]
fn a_stopped_sidecar_costs_one_timeout_then_nothing() {
    let sc = Sidecar::start(&[]);
    // A retry delay far longer than the test: once down, the client stays
    // down, so what follows does not depend on how fast the machine is.
    let mut config = ClientConfig::new(&sc.socket);
    config.retry_after = Duration::from_secs(3600);
    // A bound no busy machine reaches for the calls that must be answered
    // (the default 50 ms was, once, for the attach).
    config.timeout = Duration::from_secs(2);
    let c = Client::new(config);
    c.attach("db", 1, None).unwrap();
    // SIGSTOP: the socket accepts but nobody answers.
    let pid = sc.child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // SIGSTOP lands asynchronously: wait until the kernel says stopped.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap()
        .contains(") T ")
    {
        assert!(Instant::now() < deadline, "tidecached did not stop");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Lookups read the arena: no socket, so they do not notice...
    assert_eq!(c.lookup("db", 1, vec![1]).unwrap(), vec![None]);
    // ...until a call that uses the socket runs into its timeout (the
    // receive fails: the bound is the socket's read timeout)...
    match c.stats() {
        Err(e @ ClientError::Unavailable { .. }) => assert!(e.to_string().contains("receive"), "{e}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    // ...and from then on calls fail at once, without touching the socket:
    // no new connection, and the error says the client is waiting.
    let connects = c.connects();
    for _ in 0..100 {
        let e = c.lookup("db", 1, vec![1]).unwrap_err();
        assert!(e.to_string().contains("down; waiting"), "{e}");
    }
    assert_eq!(c.connects(), connects);
    unsafe { libc::kill(pid, libc::SIGCONT) };
}

#[test]
fn the_client_reconnects_after_a_restart_and_re_registers_its_views() {
    let sc = Sidecar::start(&[]);
    let c = fast_client(&sc.socket);
    c.attach("db", 10, None).unwrap();
    c.report("db", 10, 15, vec![(1, 12)]).unwrap();
    let view = c.register_view("db", 15);
    let (dir, socket) = sc.kill();
    assert!(c.stats().is_err());
    assert!(c.lookup("db", 15, vec![1]).is_err(), "down: lookups miss");
    let sc = Sidecar::start_at(dir, socket, &[]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let stats = loop {
        if let Ok(s) = c.stats() {
            break s;
        }
        assert!(Instant::now() < deadline, "client never reconnected");
        std::thread::sleep(Duration::from_millis(20));
    };
    let db = &stats.databases["db"];
    assert_eq!(db.views, 1, "the view was registered again");
    assert_eq!(
        db.horizon,
        Some(15),
        "the log restarted where this client's reports ended"
    );
    c.advance_view(view, 16);
    assert_eq!(c.stats().unwrap().databases["db"].low_water_mark, Some(16));
    assert!(c.connects() >= 2);
    drop(sc);
}
