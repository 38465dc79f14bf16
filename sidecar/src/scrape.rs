//! The Prometheus endpoint of `tidecached serve --metrics-listen ADDR`: a
//! minimal HTTP/1.x responder on a TCP socket, in a thread of its own.
//!
//! `GET /metrics` (or `HEAD`) answers 200 with [`crate::metrics::Readout`]
//! in the text exposition format; any other path 404, any other method
//! 405, a request line that does not parse 400, a request head over
//! [`MAX_REQUEST_HEAD`] bytes 431. Every answer closes the connection.
//! Connections are served one at a time, each bounded by
//! [`CONNECTION_TIMEOUT`] in all for reading the request and writing the
//! answer (a deadline, not a bound per read: a client trickling a byte at a
//! time is cut off too), then by `DRAIN_TIMEOUT` in all while its last
//! bytes are read, so a stuck scraper holds the thread for at most that
//! long and never anything of the server's:
//! rendering takes the locks [`crate::Server::readout`] names, each for a
//! copy of counters.

use crate::metrics::Readout;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The longest request head read (request line and headers), bytes.
pub const MAX_REQUEST_HEAD: usize = 8192;

/// Bound on reading a request and writing its answer, in all (a deadline
/// from the connection's accept).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// After an answer, how long the client is given to close, and how much
/// more of its request is read meanwhile.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_DRAIN: usize = 64 * 1024;

/// Why `--metrics-listen` cannot be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// The address does not parse or resolve.
    #[error(
        "--metrics-listen {addr:?}: {reason}; give host:port (127.0.0.1:9187, [::1]:9187, \
         0.0.0.0:9187 for every interface) or a port alone (loopback)"
    )]
    Address {
        /// As given.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The address cannot be bound (in use, not this host's, privileged).
    #[error("--metrics-listen {addr}: cannot listen: {source}")]
    Bind {
        /// The resolved address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The socket address `--metrics-listen` names: `PORT` or `:PORT` is the
/// loopback interface (127.0.0.1); `HOST:PORT` is that host's first
/// address (`0.0.0.0:PORT` or `[::]:PORT` for every interface).
///
/// # Errors
/// [`ListenError::Address`].
pub fn listen_address(addr: &str) -> Result<SocketAddr, ListenError> {
    let bad = |reason: &str| ListenError::Address {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    };
    let port_only = addr.strip_prefix(':').unwrap_or(addr);
    if let Ok(port) = port_only.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    let mut resolved = addr.to_socket_addrs().map_err(|e| bad(&e.to_string()))?;
    resolved.next().ok_or_else(|| bad("it resolves to no address"))
}

/// A bound metrics endpoint, not yet serving.
#[derive(Debug)]
pub struct MetricsEndpoint {
    listener: TcpListener,
}

impl MetricsEndpoint {
    /// Binds `addr` ([`listen_address`]). Done before the arena is touched:
    /// a bad address fails the start with nothing changed.
    ///
    /// # Errors
    /// [`ListenError`].
    pub fn bind(addr: &str) -> Result<Self, ListenError> {
        let addr = listen_address(addr)?;
        let listener = TcpListener::bind(addr).map_err(|source| ListenError::Bind { addr, source })?;
        Ok(MetricsEndpoint { listener })
    }

    /// The address bound (its port if `:0` was asked).
    ///
    /// # Errors
    /// As `TcpListener::local_addr`.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves scrapes in a thread named `metrics` until the process ends,
    /// each answered with what `readout` returns then.
    ///
    /// # Errors
    /// The thread cannot be started.
    pub fn spawn(self, readout: impl Fn() -> Readout + Send + 'static) -> io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("metrics".into()).spawn(move || {
            for stream in self.listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(e) = answer(stream, &readout) {
                            tracing::debug!(error = %e, "metrics connection ended");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        // Out of descriptors, say: do not spin.
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Asked {
    /// `GET /metrics` (`head`: `HEAD`, no body).
    Metrics {
        /// A `HEAD` request.
        head: bool,
    },
    /// Another path: 404.
    NotFound,
    /// Another method: 405.
    MethodNotAllowed,
    /// Not a request line: 400.
    BadRequest,
}

/// Parses the request line of `head` (`METHOD SP TARGET SP HTTP/1.x`, the
/// bytes before the first CRLF or LF). The target's query, if any, is
/// ignored.
pub fn parse_request(head: &[u8]) -> Asked {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = head[..line_end].strip_suffix(b"\r").unwrap_or(&head[..line_end]);
    let Ok(line) = std::str::from_utf8(line) else {
        return Asked::BadRequest;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Asked::BadRequest;
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    if !token(method) || !target.starts_with('/') || !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return Asked::BadRequest;
    }
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Asked::MethodNotAllowed,
    };
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path == "/metrics" {
        Asked::Metrics { head }
    } else {
        Asked::NotFound
    }
}

/// Sets the read and write timeouts of `stream` to what is left until
/// `deadline`; `TimedOut` once it has passed.
fn until(stream: &TcpStream, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))
}

/// Reads the request head, at most [`MAX_REQUEST_HEAD`] bytes, by
/// `deadline`; `None` if it is longer.
fn read_head(stream: &mut TcpStream, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(buf));
        }
        if buf.len() >= MAX_REQUEST_HEAD {
            return Ok(None);
        }
        let want = (MAX_REQUEST_HEAD - buf.len()).min(chunk.len());
        until(stream, deadline)?;
        let n = stream.read(&mut chunk[..want])?;
        if n == 0 {
            // Closed before the end of the head: answer what came.
            return Ok(Some(buf));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn answer(mut stream: TcpStream, readout: &impl Fn() -> Readout) -> io::Result<()> {
    let deadline = Instant::now() + CONNECTION_TIMEOUT;
    let asked = match read_head(&mut stream, deadline)? {
        Some(head) => parse_request(&head),
        None => {
            return respond(
                &mut stream,
                deadline,
                "431 Request Header Fields Too Large",
                "",
                b"request head too large\n",
                false,
            )
        }
    };
    match asked {
        Asked::Metrics { head } => {
            let body = readout().prometheus();
            respond(
                &mut stream,
                deadline,
                "200 OK",
                "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n",
                body.as_bytes(),
                head,
            )
        }
        Asked::NotFound => respond(
            &mut stream,
            deadline,
            "404 Not Found",
            "",
            b"not found: the metrics are at /metrics\n",
            false,
        ),
        Asked::MethodNotAllowed => respond(
            &mut stream,
            deadline,
            "405 Method Not Allowed",
            "Allow: GET, HEAD\r\n",
            b"method not allowed\n",
            false,
        ),
        Asked::BadRequest => respond(&mut stream, deadline, "400 Bad Request", "", b"bad request\n", false),
    }
}

fn respond(
    stream: &mut TcpStream,
    deadline: Instant,
    status: &str,
    headers: &str,
    body: &[u8],
    head_only: bool,
) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\n{headers}{}Content-Length: {}\r\nConnection: close\r\n\r\n",
        if headers.contains("Content-Type") {
            ""
        } else {
            "Content-Type: text/plain; charset=utf-8\r\n"
        },
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    let mut written = 0;
    while written < out.len() {
        until(stream, deadline)?;
        match stream.write(&out[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    // Closing with unread bytes would reset the connection, and the client
    // could lose the answer: read what it still sends (bounded) until it
    // closes, by a deadline of its own.
    stream.shutdown(std::net::Shutdown::Write)?;
    let drain_until = Instant::now() + DRAIN_TIMEOUT;
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < MAX_DRAIN {
        if until(stream, drain_until).is_err() {
            break;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Asked::Metrics { head: false }
        );
        assert_eq!(
            parse_request(b"HEAD /metrics?x=1 HTTP/1.0\n\n"),
            Asked::Metrics { head: true }
        );
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\n\r\n"), Asked::NotFound);
        assert_eq!(parse_request(b"GET /metricsx HTTP/1.1\r\n\r\n"), Asked::NotFound);
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Asked::MethodNotAllowed
        );
        assert_eq!(parse_request(b"GET /metrics\r\n\r\n"), Asked::BadRequest);
        assert_eq!(parse_request(b"GET  /metrics HTTP/1.1\r\n\r\n"), Asked::BadRequest);
        assert_eq!(parse_request(b"GET /metrics HTTP/2\r\n\r\n"), Asked::BadRequest);
        assert_eq!(parse_request(b"G(T /metrics HTTP/1.1\r\n\r\n"), Asked::BadRequest);
        assert_eq!(parse_request(b"\xff /metrics HTTP/1.1\r\n\r\n"), Asked::BadRequest);
        assert_eq!(parse_request(b""), Asked::BadRequest);
    }

    #[test]
    fn addresses() {
        assert_eq!(listen_address("9187").unwrap(), "127.0.0.1:9187".parse().unwrap());
        assert_eq!(listen_address(":9187").unwrap(), "127.0.0.1:9187".parse().unwrap());
        assert_eq!(listen_address("0.0.0.0:9187").unwrap(), "0.0.0.0:9187".parse().unwrap());
        assert_eq!(listen_address("[::1]:9187").unwrap(), "[::1]:9187".parse().unwrap());
        assert!(listen_address("localhost:9187").unwrap().ip().is_loopback());
        assert!(listen_address("nonsense").is_err());
        assert!(listen_address("1.2.3.4:99999").is_err());
    }
}
