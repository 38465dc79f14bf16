//! What an operator runs: `stats --format`, the `--metrics-listen`
//! endpoint scraped over TCP, `check`, `clean`, readiness to systemd
//! (`NOTIFY_SOCKET`), and starts that fail leaving no arena behind. Every
//! test starts the real `tidecached`.

mod common;

use common::{item, Sidecar};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tidecache_client::{Client, ClientConfig};
use tidecache_sidecar::server::tid_at;

fn tidecached(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidecached"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tidecached")
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn client(socket: &Path) -> Client {
    let mut c = ClientConfig::new(socket);
    c.timeout = Duration::from_secs(2);
    Client::new(c)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Database "db" attached with its horizon one minute ago, one revision
/// stored and looked up over the socket twice (1 hit), one miss, one
/// resync. Returns the client (its connection stays open) and the horizon.
fn some_traffic(socket: &Path) -> (Client, u64) {
    let c = client(socket);
    let h = tid_at(unix_now() - 60);
    c.attach("db", h, None).unwrap();
    c.store("db", vec![item(1, h, None, h, b"one")]).unwrap();
    assert!(c.lookup_remote("db", h, vec![1]).unwrap()[0].is_some());
    assert!(c.lookup_remote("db", h, vec![2]).unwrap()[0].is_none());
    // What workers counted of their lookups (arena hits included): 3 hits,
    // 1 miss; the two lookups above are the sidecar's socket counts.
    c.touch_counted("db", Vec::new(), 3, 1).unwrap();
    c.resync("db", h).unwrap();
    (c, h)
}

/// Checks the Prometheus text exposition format line by line: `# HELP name
/// text`, `# TYPE name counter|gauge`, or `name{label="value",...} value`
/// of a family whose TYPE came before. Returns the samples, `(name with
/// labels, value)`.
fn parse_exposition(text: &str) -> Vec<(String, f64)> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut typed = std::collections::HashSet::new();
    let mut samples = Vec::new();
    assert!(text.ends_with('\n'), "the exposition must end with a line feed");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(name_ok(name) && !help.is_empty(), "{line}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(name_ok(name), "{line}");
            assert!(matches!(kind, "counter" | "gauge"), "{line}");
            assert!(typed.insert(name.to_owned()), "TYPE twice: {line}");
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
            let name = match series.split_once('{') {
                None => series,
                Some((name, labels)) => {
                    let labels = labels.strip_suffix('}').unwrap_or_else(|| panic!("labels: {line}"));
                    // label="value" pairs; values may hold escaped quotes.
                    let mut rest = labels;
                    while !rest.is_empty() {
                        let (label, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("label: {line}"));
                        assert!(name_ok(label), "{line}");
                        let mut end = None;
                        let mut escaped = false;
                        for (i, c) in after.char_indices() {
                            match c {
                                _ if escaped => escaped = false,
                                '\\' => escaped = true,
                                '"' => {
                                    end = Some(i);
                                    break;
                                }
                                _ => {}
                            }
                        }
                        let end = end.unwrap_or_else(|| panic!("unterminated label value: {line}"));
                        rest = &after[end + 1..];
                        rest = rest.strip_prefix(',').unwrap_or(rest);
                    }
                    name
                }
            };
            assert!(name_ok(name), "{line}");
            assert!(typed.contains(name), "sample before its TYPE: {line}");
            samples.push((series.to_owned(), value));
        }
    }
    samples
}

fn sample(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(s, _)| s == series)
        .unwrap_or_else(|| panic!("no sample {series}"))
        .1
}

#[test]
fn stats_formats() {
    let sc = Sidecar::start(&[]);
    let (_c, h) = some_traffic(&sc.socket);
    let sock = sc.socket.as_os_str();

    // json, the default: today's object plus the horizon as a time.
    let out = tidecached(&[os("stats"), os("--socket"), sock]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(stdout(&out).lines().count(), 1);
    let db = &v["databases"]["db"];
    assert_eq!(db["horizon"], h);
    assert_eq!((db["hits"].as_u64(), db["misses"].as_u64()), (Some(3), Some(1)));
    assert_eq!(
        (db["socket_hits"].as_u64(), db["socket_misses"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        (db["hit_ratio"].as_f64(), v["total"]["hit_ratio"].as_f64()),
        (Some(0.75), Some(0.75))
    );
    let lag = db["horizon_lag_s"].as_f64().unwrap();
    assert!((59.0..3600.0).contains(&lag), "lag {lag}");
    assert!(db["horizon_time"].as_str().unwrap().ends_with('Z'));
    // This command's connection is not counted; the client's is.
    assert_eq!(v["clients"], 1);
    let json = tidecached(&[os("stats"), os("--socket"), sock, os("--format"), os("json")]);
    let v2: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(v2["databases"]["db"]["horizon"], h);

    // text: the horizon as hex, ISO time and lag.
    let out = tidecached(&[os("stats"), os("--socket"), sock, os("--format"), os("text")]);
    assert!(out.status.success());
    let text = stdout(&out);
    let iso = db["horizon_time"].as_str().unwrap();
    assert!(text.contains(&format!("horizon        {h:#018x} = {iso} (")), "{text}");
    assert!(text.contains("database db\n"), "{text}");
    assert!(
        text.contains("lookups counted by the clients: 3 hits, 1 misses (75.0% hits)"),
        "{text}"
    );
    assert!(text.contains("over its socket: 1 hits, 1 misses"), "{text}");

    // prometheus: the format, and the values.
    let out = tidecached(&[os("stats"), os("--socket"), sock, os("--format"), os("prometheus")]);
    assert!(out.status.success());
    let samples = parse_exposition(&stdout(&out));
    assert_eq!(sample(&samples, "tidecache_hits_total{database=\"db\"}"), 3.0);
    assert_eq!(sample(&samples, "tidecache_misses_total{database=\"db\"}"), 1.0);
    assert_eq!(sample(&samples, "tidecache_hit_ratio{database=\"db\"}"), 0.75);
    assert_eq!(
        sample(&samples, "tidecache_socket_lookup_hits_total{database=\"db\"}"),
        1.0
    );
    assert_eq!(sample(&samples, "tidecache_host_hits_total"), 3.0);
    assert_eq!(sample(&samples, "tidecache_host_hit_ratio"), 0.75);
    assert_eq!(sample(&samples, "tidecache_entries{database=\"db\"}"), 1.0);
    assert_eq!(sample(&samples, "tidecache_clients"), 1.0);
    let lag = sample(&samples, "tidecache_horizon_lag_seconds{database=\"db\"}");
    assert!((59.0..3600.0).contains(&lag), "lag {lag}");
    // Resyncs and hit hints are known inside the sidecar only: not over
    // the socket.
    assert!(!samples
        .iter()
        .any(|(s, _)| s.starts_with("tidecache_resyncs_total") || s.starts_with("tidecache_hit_hints_total")));

    let out = tidecached(&[os("stats"), os("--socket"), sock, os("--format"), os("xml")]);
    assert!(!out.status.success());
}

/// The sidecar's log line naming the metrics address it bound.
fn metrics_address(sc: &Sidecar) -> String {
    let log = sc.log();
    let at = log.find("metrics served at http://").expect("metrics address logged") + 25;
    log[at..].split('/').next().unwrap().to_owned()
}

/// One HTTP exchange: `request` sent as is, the whole answer read.
fn http(addr: &str, request: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let mut answer = Vec::new();
    // The server closes the connection after each answer; a reset after a
    // refused oversized request is fine too.
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head: {answer:?}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

#[test]
fn metrics_endpoint_serves_prometheus_text() {
    let sc = Sidecar::start(&["--metrics-listen", "127.0.0.1:0"]);
    let addr = metrics_address(&sc);
    let (_c, _) = some_traffic(&sc.socket);

    let (status, head, body) = http(&addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("Content-Type: text/plain; version=0.0.4"), "{head}");
    assert!(head.contains(&format!("Content-Length: {}", body.len())), "{head}");
    let samples = parse_exposition(&body);
    for name in [
        "tidecache_hits_total{database=\"db\"}",
        "tidecache_misses_total{database=\"db\"}",
        "tidecache_entries{database=\"db\"}",
        "tidecache_bytes{database=\"db\"}",
        "tidecache_evictions_total{database=\"db\"}",
        "tidecache_stores_refused_total{database=\"db\"}",
        "tidecache_views{database=\"db\"}",
        "tidecache_horizon_lag_seconds{database=\"db\"}",
        "tidecache_clients",
        "tidecache_databases",
        "tidecache_arena_bytes",
        "tidecache_arena_capacity_bytes",
        "tidecache_arena_unverified_segments",
        "tidecache_arena_evictions_total",
    ] {
        sample(&samples, name);
    }
    assert_eq!(sample(&samples, "tidecache_hits_total{database=\"db\"}"), 3.0);
    assert_eq!(sample(&samples, "tidecache_resyncs_total{database=\"db\"}"), 1.0);
    assert_eq!(sample(&samples, "tidecache_hit_hints_total{database=\"db\"}"), 0.0);
    // The endpoint is no client: the one connection is some_traffic's.
    assert_eq!(sample(&samples, "tidecache_clients"), 1.0);
    assert_eq!(sample(&samples, "tidecache_arena_capacity_bytes"), (16u64 << 20) as f64);

    // Hit hints (what workers send of their arena hits) are counted apart.
    let c = client(&sc.socket);
    let h = tid_at(unix_now() - 60);
    c.touch("db", vec![(1, h), (1, h), (2, h)]).unwrap();
    let (_, _, body) = http(&addr, b"GET /metrics HTTP/1.1\r\n\r\n");
    let samples = parse_exposition(&body);
    assert_eq!(sample(&samples, "tidecache_hit_hints_total{database=\"db\"}"), 3.0);
    assert_eq!(sample(&samples, "tidecache_hits_total{database=\"db\"}"), 3.0);
    // Counts sent with hints add up.
    c.touch_counted("db", vec![(1, h)], 2, 0).unwrap();
    let (_, _, body) = http(&addr, b"GET /metrics HTTP/1.1\r\n\r\n");
    let samples = parse_exposition(&body);
    assert_eq!(sample(&samples, "tidecache_hits_total{database=\"db\"}"), 5.0);
    assert_eq!(sample(&samples, "tidecache_hit_hints_total{database=\"db\"}"), 4.0);
    drop(c);

    let (status, _, body) = http(&addr, b"HEAD /metrics HTTP/1.0\r\n\r\n");
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(http(&addr, b"GET / HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(http(&addr, b"GET /metrics/x HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(http(&addr, b"POST /metrics HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(http(&addr, b"garbage\r\n\r\n").0, 400);
    let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
    huge.extend(vec![b'a'; 9000]);
    assert_eq!(http(&addr, &huge).0, 431);
    // Still serving.
    assert_eq!(http(&addr, b"GET /metrics HTTP/1.1\r\n\r\n").0, 200);
}

#[test]
fn metrics_port_alone_listens_on_loopback() {
    let sc = Sidecar::start(&["--metrics-listen", "0"]);
    let addr = metrics_address(&sc);
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert_eq!(http(&addr, b"GET /metrics HTTP/1.1\r\n\r\n").0, 200);
}

#[test]
fn check_says_ok_or_the_error() {
    let sc = Sidecar::start(&[]);
    let (_c, _) = some_traffic(&sc.socket);
    let out = tidecached(&[os("check"), os("--socket"), sc.socket.as_os_str()]);
    assert!(out.status.success(), "{out:?}");
    let line = stdout(&out);
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.starts_with("ok: 1 databases, 1 clients, arena "), "{line}");
    assert!(line.trim_end().ends_with("% full"), "{line}");

    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("absent.sock");
    let out = tidecached(&[os("check"), os("--socket"), absent.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).starts_with("error: no socket at "), "{out:?}");

    let file = dir.path().join("file.sock");
    std::fs::write(&file, b"not a socket").unwrap();
    let out = tidecached(&[os("check"), os("--socket"), file.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).starts_with("error: ") && stdout(&out).contains("is not a socket"),
        "{out:?}"
    );

    // A socket file nobody listens on (a sidecar that died).
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let out = tidecached(&[os("check"), os("--socket"), stale.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("unavailable"), "{out:?}");
    assert_eq!(stdout(&out).lines().count(), 1);
}

fn clean(args: &[&std::ffi::OsStr]) -> Output {
    let mut all = vec![os("clean")];
    all.extend_from_slice(args);
    tidecached(&all)
}

#[test]
fn clean_refuses_an_arena_in_use() {
    let sc = Sidecar::start(&[]);
    let arena = sc.dir.path().join("cache.arena");
    let len = std::fs::metadata(&arena).unwrap().len();
    for dry in [true, false] {
        let mut args = vec![os("--cache-file"), arena.as_os_str()];
        if dry {
            args.push(os("--dry-run"));
        }
        let out = clean(&args);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            stderr(&out).contains("in use by a running tidecached (pid "),
            "{}",
            stderr(&out)
        );
        assert_eq!(std::fs::metadata(&arena).unwrap().len(), len);
    }
    // The sidecar still serves from its file.
    let (_c, _) = some_traffic(&sc.socket);
}

#[test]
fn clean_refuses_what_is_not_an_arena() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("Data.fs");
    std::fs::write(&data, b"FS21 a ZODB FileStorage").unwrap();
    let empty = dir.path().join("empty.arena");
    std::fs::write(&empty, b"").unwrap();
    for path in [&data, &empty] {
        let out = clean(&[os("--cache-file"), path.as_os_str()]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            stderr(&out).contains("is not a tidecache arena file"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(std::fs::read(&data).unwrap(), b"FS21 a ZODB FileStorage");
    assert!(empty.exists());
    let out = clean(&[os("--cache-file"), dir.path().join("absent").as_os_str()]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("nothing to remove"));
}

/// The first word of the arena file, read through a read-only mapping:
/// SIGBUS (the test dies) if the file was truncated under it.
struct Mapping(*const u64, usize);

impl Mapping {
    fn of(path: &Path) -> Mapping {
        let f = std::fs::File::open(path).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        // SAFETY: a read-only shared mapping of an open file, unmapped on
        // drop; the descriptor may close after mmap.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Mapping(p as *const u64, len)
    }

    fn last_page_word(&self) -> u64 {
        // SAFETY: within the mapping.
        unsafe { std::ptr::read_volatile(self.0.add(self.1 / 8 - 1)) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `of`.
        unsafe { libc::munmap(self.0 as *mut libc::c_void, self.1) };
    }
}

#[test]
fn clean_unlinks_an_unused_arena_under_its_mappings() {
    let sc = Sidecar::start(&[]);
    let (dir, socket) = sc.kill();
    let arena = dir.path().join("cache.arena");
    let lock = dir.path().join("cache.arena.lock");
    assert!(arena.exists() && lock.exists());
    let mapping = Mapping::of(&arena);
    let before = mapping.last_page_word();

    let out = clean(&[os("--cache-file"), arena.as_os_str(), os("--dry-run")]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).starts_with("would remove "), "{}", stdout(&out));
    assert!(arena.exists() && lock.exists(), "a dry run changes nothing");

    let out = clean(&[os("--cache-file"), arena.as_os_str()]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).starts_with("removed "), "{}", stdout(&out));
    assert!(!arena.exists() && !lock.exists());
    // Unlinked, not truncated: the mapping still reads its pages.
    assert_eq!(mapping.last_page_word(), before);
    drop(mapping);

    // A start on the same path afterwards makes a new arena.
    let sc = Sidecar::start_at(dir, socket, &[]);
    assert!(sc.dir.path().join("cache.arena").exists());
}

/// Nothing but what the test put in `dir` is left there.
fn only(dir: &Path, expected: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected: Vec<String> = expected.iter().map(|s| (*s).to_owned()).collect();
    expected.sort();
    assert_eq!(names, expected, "files left in {}", dir.display());
}

fn serve_fails(args: &[&std::ffi::OsStr]) -> Output {
    let mut all = vec![os("serve"), os("--memory-mb"), os("16")];
    all.extend_from_slice(args);
    let out = tidecached(&all);
    assert!(!out.status.success(), "a start that must fail succeeded: {out:?}");
    out
}

#[test]
fn failed_starts_leave_no_arena_behind() {
    let dir = tempfile::tempdir().unwrap();
    let arena = dir.path().join("cache.arena");
    // A socket path too long for a Unix socket address (108 bytes): every
    // check passes, the arena is created, then binding the socket fails.
    let long = dir.path().join(format!("{}.sock", "s".repeat(120)));
    let out = serve_fails(&[os("--socket"), long.as_os_str(), os("--cache-file"), arena.as_os_str()]);
    assert!(stderr(&out).contains("binding"), "{}", stderr(&out));
    only(dir.path(), &[]);

    // The socket in a missing directory: refused before anything.
    let missing = dir.path().join("missing").join("s.sock");
    serve_fails(&[
        os("--socket"),
        missing.as_os_str(),
        os("--cache-file"),
        arena.as_os_str(),
    ]);
    only(dir.path(), &[]);

    // A metrics address in use: refused before anything.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let socket = dir.path().join("s.sock");
    let out = serve_fails(&[
        os("--socket"),
        socket.as_os_str(),
        os("--cache-file"),
        arena.as_os_str(),
        os("--metrics-listen"),
        os(&addr),
    ]);
    assert!(stderr(&out).contains("--metrics-listen"), "{}", stderr(&out));
    only(dir.path(), &[]);
}

#[test]
fn failed_start_keeps_a_warm_arena() {
    // A previous run's arena is that run's warm cache: a failed start
    // re-attaching it leaves it in place.
    let sc = Sidecar::start(&[]);
    let (_c, _) = some_traffic(&sc.socket);
    let (dir, _) = sc.kill();
    let arena = dir.path().join("cache.arena");
    let long = dir.path().join(format!("{}.sock", "s".repeat(120)));
    serve_fails(&[os("--socket"), long.as_os_str(), os("--cache-file"), arena.as_os_str()]);
    assert!(arena.exists());
}

/// Receives one datagram, waiting at most 20 s.
fn receive(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification within 20 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn serve_notifies_ready_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let socket = dir.path().join("tidecached.sock");
    let mut sc = Sidecar::start_at_with_env(
        tempfile::tempdir().unwrap(),
        socket.clone(),
        &[],
        &[("NOTIFY_SOCKET", notify.to_str().unwrap())],
    );
    let ready = receive(&listener);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=serving ") && l.contains("tidecached.sock")),
        "{ready:?}"
    );
    // READY=1 comes once the socket accepts connections.
    client(&socket).stats().unwrap();

    // SAFETY: a signal to our own child.
    assert_eq!(unsafe { libc::kill(sc.child.id() as i32, libc::SIGTERM) }, 0);
    let stopping = receive(&listener);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while sc.alive() {
        assert!(Instant::now() < deadline, "tidecached did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!socket.exists());
}

#[test]
fn clean_by_socket_names_the_default_arena_file() {
    // `--socket` instead of `--cache-file`: the file `serve` would use by
    // default, /dev/shm/tidecache-<uid>-<CRC-32 of the socket path>.arena.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("never-served.sock");
    let out = clean(&[os("--socket"), socket.as_os_str(), os("--dry-run")]);
    assert!(out.status.success(), "{out:?}");
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let expected = if Path::new("/dev/shm").is_dir() {
        format!("no file at /dev/shm/tidecache-{uid}-")
    } else {
        format!("no file at {}.arena", socket.display())
    };
    assert!(stdout(&out).starts_with(&expected), "{}", stdout(&out));
    let both = clean(&[
        os("--socket"),
        socket.as_os_str(),
        os("--cache-file"),
        socket.as_os_str(),
    ]);
    assert_eq!(
        both.status.code(),
        Some(2),
        "--socket and --cache-file conflict: {both:?}"
    );
}

/// A worker whose storage lags behind the horizon (or was restored from a
/// backup) asks to attach every 20 ms for up to 2 s before it flushes: the
/// sidecar logs that at INFO once per connection and database, not at
/// every attempt (it logged a hundred identical lines).
#[test]
fn a_client_behind_the_horizon_is_logged_once_per_connection() {
    let sc = Sidecar::start(&[]);
    let h = tid_at(unix_now() - 60);
    let first = client(&sc.socket);
    first.attach("db", h, None).unwrap();
    first.report("db", h, h + 100, vec![(1, h + 50)]).unwrap();
    let lagging = client(&sc.socket);
    for _ in 0..5 {
        let (state, _) = lagging.attach("db", h + 10, None).unwrap();
        assert_eq!(state, tidecache_protocol::AttachState::Behind);
    }
    let line = "a client's lastTransaction is below the horizon";
    assert_eq!(sc.log().matches(line).count(), 1, "{}", sc.log());
    // Another connection behind says so too (once).
    let other = client(&sc.socket);
    for _ in 0..3 {
        other.attach("db", h + 20, None).unwrap();
    }
    assert_eq!(sc.log().matches(line).count(), 2, "{}", sc.log());
}

/// A view detached for holding the invalidation log past
/// `--max-log-changes` is logged at WARNING with what it costs and what to
/// do (docs/operations.md, "Failure behaviour").
#[test]
fn a_detached_view_is_logged_with_what_to_do() {
    let sc = Sidecar::start(&["--max-log-changes", "5", "--reclaim-interval-ms", "10"]);
    let h = tid_at(unix_now() - 60);
    let c = client(&sc.socket);
    c.attach("db", h, None).unwrap();
    c.register_view("db", h);
    let changes: Vec<(u64, u64)> = (1..=10).map(|i| (i, h + i)).collect();
    c.report("db", h, h + 10, changes).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        if let Some(l) = sc.log().lines().find(|l| l.contains("detached views")) {
            break l.to_owned();
        }
        assert!(Instant::now() < deadline, "no detach logged: {}", sc.log());
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(line.contains(" WARN "), "{line}");
    assert!(
        line.contains("their stores are refused, their lookups stay correct")
            && line.contains("close ZODB connections kept open")
            && line.contains("or raise --max-log-changes"),
        "{line}"
    );
}

/// `--help` and docs/operations.md say the same: every option of every
/// command is in the guide's table of options, on a row of its command,
/// with the default `--help` shows.
#[test]
fn every_option_and_default_of_help_is_in_the_operators_guide() {
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md")).unwrap();
    for command in ["serve", "stats", "check", "clean"] {
        let help = stdout(&tidecached(&[os(command), os("--help")]));
        let mut options = 0;
        for (i, line) in help.lines().enumerate() {
            let Some(option) = line.trim_start().strip_prefix("--") else {
                continue;
            };
            let option = format!("--{}", option.split([' ', '<']).next().unwrap());
            if option == "--help" {
                continue;
            }
            options += 1;
            let row = guide
                .lines()
                .find(|l| l.starts_with(&format!("| `{command}` | `{option}")))
                .unwrap_or_else(|| panic!("{command} {option} is not in the table of docs/operations.md"));
            // Its default, if --help gives one, a few lines below.
            let default = help
                .lines()
                .skip(i + 1)
                .take_while(|l| !l.trim_start().starts_with("--"))
                .find_map(|l| {
                    l.trim()
                        .strip_prefix("[default: ")
                        .map(|d| d.trim_end_matches(']').to_owned())
                });
            if let Some(d) = default {
                assert!(
                    row.contains(&format!("`{d}`")),
                    "{command} {option}: default {d} not in {row}"
                );
            }
        }
        assert!(options > 0, "no options found in {command} --help:\n{help}");
    }
}
