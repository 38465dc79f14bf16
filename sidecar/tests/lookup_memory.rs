//! Finding of the fault campaign: a well-formed Lookup of millions of oids
//! made the sidecar hold 57 times its frame (48 bytes of answer per 1-byte
//! oid): one 64 MiB frame, 3.6 GiB. Now more than `MAX_LOOKUP_OIDS` oids
//! are refused before an answer is built, and the client library splits
//! longer lists.

mod common;

use common::{item, Sidecar};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use tidecache_client::protocol::{
    encode, ErrorCode, Request, RequestBody, Response, ResponseBody, MAX_LOOKUP_OIDS, PROTOCOL_VERSION,
};
use tidecache_client::{Client, ClientConfig};

/// The process's peak resident set, KiB.
fn peak_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn send(s: &mut UnixStream, req: &Request) -> Response {
    let body = encode(req).unwrap();
    s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
    s.write_all(&body).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).unwrap();
    rmp_serde::from_slice(&buf).unwrap()
}

#[test]
fn a_lookup_of_millions_of_oids_is_refused_without_building_its_answer() {
    let sc = Sidecar::start(&[]);
    let mut s = UnixStream::connect(&sc.socket).unwrap();
    let hello = RequestBody::Hello {
        version: PROTOCOL_VERSION,
        client: "lookup_memory".into(),
    };
    send(&mut s, &Request { id: 1, body: hello });
    let before = peak_kib(sc.child.id());
    let req = Request {
        id: 2,
        body: RequestBody::Lookup {
            db: "db".into(),
            view: 1,
            oids: (0..4_000_000u64).map(|i| i % 100).collect(),
        },
    };
    let frame = encode(&req).unwrap().len() as u64;
    let answer = send(&mut s, &req);
    let grown = (peak_kib(sc.child.id()) - before) * 1024;
    assert!(
        matches!(
            answer.body,
            ResponseBody::Error {
                code: ErrorCode::Limit,
                ..
            }
        ),
        "{:?}",
        answer.body
    );
    // Decoding the oids takes 8 bytes per 1-byte oid, plus the frame.
    assert!(
        grown < 12 * frame,
        "a {frame}-byte Lookup made the sidecar's peak grow by {grown} bytes"
    );
}

#[test]
fn the_client_splits_a_long_lookup() {
    let sc = Sidecar::start(&[]);
    // 131,075 oids in three requests: the 50 ms default bound on a call
    // failed now and then on a loaded machine; this test is about the
    // split, not the time.
    let mut config = ClientConfig::new(&sc.socket);
    config.timeout = std::time::Duration::from_secs(30);
    let c = Client::new(config);
    c.attach("db", 10, None).unwrap();
    c.store("db", vec![item(7, 5, None, 10, b"seven")]).unwrap();
    let oids: Vec<u64> = (0..MAX_LOOKUP_OIDS as u64 * 2 + 3).collect();
    let found = c.lookup_remote("db", 10, oids).unwrap();
    assert_eq!(found.len(), MAX_LOOKUP_OIDS * 2 + 3);
    assert_eq!(found[7].as_ref().map(|f| f.state.as_slice()), Some(&b"seven"[..]));
    assert_eq!(found.iter().filter(|f| f.is_some()).count(), 1);
}
