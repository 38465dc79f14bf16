//! tidecache-protocol: the tidecached wire protocol, version
//! [`PROTOCOL_VERSION`]. docs/protocol.md is its specification; this crate
//! is its definition, shared by the sidecar (which depends on nothing else
//! of the client) and by `tidecache-client`, which re-exports it as
//! `tidecache_client::protocol`.
//!
//! Transport: a Unix domain socket. Every message is a *frame*: a 4-byte
//! big-endian length `n`, then `n` bytes of MessagePack (rmp-serde,
//! structs as arrays in field order, enums as a one-key map from variant
//! name to content). The client sends [`Request`]s, the sidecar answers each
//! with one [`Response`] carrying the same `id`, in order.
//!
//! The first request on a connection must be [`RequestBody::Hello`].

#![warn(missing_docs)]

pub mod handoff;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};

pub mod previous;

/// Version spoken by this build; the Hello of both sides carries it. A
/// sidecar also accepts clients of [`previous::VERSION`] (rolling upgrades:
/// docs/protocol.md, "Versions").
pub const PROTOCOL_VERSION: u32 = 7;

/// Default largest frame body the sidecar accepts, bytes (64 MiB).
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;

/// Most oids one `Lookup` may ask for; a longer list is refused with
/// [`ErrorCode::Limit`] (its answer would hold about 48 bytes per oid, 57
/// times its frame). The client library's `Client::lookup_remote` splits
/// longer lists.
pub const MAX_LOOKUP_OIDS: usize = 1 << 16;

/// A request: an id the response echoes, and the message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the client; echoed by the response.
    pub id: u64,
    /// The message.
    pub body: RequestBody,
}

/// One revision to store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreItem {
    /// Oid (`u64` of ZODB's 8-byte oid).
    pub oid: u64,
    /// Tid that wrote the revision.
    pub serial: u64,
    /// Serial of the next revision, or `None` if current at `view`.
    pub end: Option<u64>,
    /// The view the revision was loaded at (`loadBefore(oid, view + 1)`).
    pub view: u64,
    /// The pickle record, opaque to the sidecar.
    #[serde(with = "serde_bytes")]
    pub state: Vec<u8>,
}

/// A revision found by a lookup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Found {
    /// Tid that wrote the revision.
    pub serial: u64,
    /// Serial of the next revision, or `None` while current.
    pub end: Option<u64>,
    /// The pickle record.
    #[serde(with = "serde_bytes")]
    pub state: Vec<u8>,
}

/// Every request. Each names its database (`db`, a key the adapter derives
/// from the base storage) except `Hello` and `Stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RequestBody {
    /// First message of a connection. Answered by `Hello`, or by an error
    /// `VersionMismatch` and a closed connection.
    Hello {
        /// [`PROTOCOL_VERSION`] of the client.
        version: u32,
        /// Free text naming the client, for logs (`"zodb pid 4242"`).
        client: String,
    },
    /// A client whose storage's `lastTransaction()` is `last_tid` attaches
    /// to `db`. Starts the log of a new database (or of one flushed); answers
    /// `Behind` without changing anything when `last_tid` is below the
    /// horizon, `Prove` when the client has not proved (`proven`) that its
    /// storage holds the current horizon transaction, `Joined` when it has.
    /// Answer: `Attached`.
    Attach {
        /// Database key.
        db: String,
        /// The storage's `lastTransaction()`.
        last_tid: u64,
        /// The horizon the client proved its storage holds, after a `Prove`
        /// answer (see [`AttachState::Prove`]); `None` (nil, or absent) at
        /// first.
        #[serde(default)]
        proven: Option<u64>,
    },
    /// Look up the revisions of `oids` visible at `view`. Answer: `Found`,
    /// one entry per oid, in order; error `Limit` for more than
    /// [`MAX_LOOKUP_OIDS`] oids.
    Lookup {
        /// Database key.
        db: String,
        /// The connection's view (ZODB's `_start - 1`).
        view: u64,
        /// Oids to look up.
        oids: Vec<u64>,
    },
    /// Store revisions loaded from the base storage. Answer: `Stored`.
    Store {
        /// Database key.
        db: String,
        /// The revisions.
        revisions: Vec<StoreItem>,
        /// The slot identity the client attached to (`Attached.identity`):
        /// the sidecar refuses the request with `Stale` if the database
        /// was flushed since (its slot has a new identity). Nil: no check
        /// (tools).
        #[serde(default)]
        identity: Option<u64>,
    },
    /// An invalidation report: every change in `(from, to]`. Answer:
    /// `Reported`, or error `Gap` if `from` is past the horizon.
    Report {
        /// Database key.
        db: String,
        /// Start of the interval, exclusive.
        from: u64,
        /// End of the interval, inclusive.
        to: u64,
        /// `(oid, tid)` of every change in the interval.
        changes: Vec<(u64, u64)>,
        /// The slot identity the client attached to (`Attached.identity`):
        /// the sidecar refuses the request with `Stale` if the database
        /// was flushed since (its slot has a new identity). Nil: no check
        /// (tools).
        #[serde(default)]
        identity: Option<u64>,
    },
    /// A collapsed invalidation report: every oid changed in `(from, to]`,
    /// each with a tid `T`, `from < T <= to`, at or after its newest change
    /// in the interval (the exact newest, or an upper bound such as `to`:
    /// ZEO's reconnect and `getInvalidations`, RelStorage's poll). Applied
    /// conservatively (docs/invariants.md, invariants 3 and 4). Answer:
    /// `Reported`, or the errors of `Report`.
    CollapsedReport {
        /// Database key.
        db: String,
        /// Start of the interval, exclusive.
        from: u64,
        /// End of the interval, inclusive.
        to: u64,
        /// `(oid, T)` of every oid changed in the interval.
        changes: Vec<(u64, u64)>,
        /// The slot identity the client attached to (`Attached.identity`):
        /// the sidecar refuses the request with `Stale` if the database
        /// was flushed since (its slot has a new identity). Nil: no check
        /// (tools).
        #[serde(default)]
        identity: Option<u64>,
    },
    /// The client lost invalidations up to `tid` (ZEO's `invalidateCache`, a
    /// refused gap): drop open revisions and restart the log at `tid` unless
    /// the horizon covers it already. Answer: `Resynced`.
    Resync {
        /// Database key.
        db: String,
        /// The client's `lastTransaction()`.
        tid: u64,
        /// The slot identity the client attached to (`Attached.identity`):
        /// the sidecar refuses the request with `Stale` if the database
        /// was flushed since (its slot has a new identity). Nil: no check
        /// (tools).
        #[serde(default)]
        identity: Option<u64>,
    },
    /// Register a connection's view at `tid`. Answer: `ViewRegistered`.
    /// Views are released when the connection that registered them closes.
    RegisterView {
        /// Database key.
        db: String,
        /// The view's tid.
        tid: u64,
    },
    /// Move a view to `tid`. Answer: `Done`.
    AdvanceView {
        /// Database key.
        db: String,
        /// View id from `ViewRegistered`.
        view: u64,
        /// New tid.
        tid: u64,
    },
    /// Release a view. Answer: `Done`.
    ReleaseView {
        /// Database key.
        db: String,
        /// View id from `ViewRegistered`.
        view: u64,
    },
    /// Drop every revision of `db` (after a pack). Answer: `Done`.
    Flush {
        /// Database key.
        db: String,
    },
    /// Counters of the sidecar and each database. Answer: `Stats`.
    Stats,
    /// Revisions a client read from the arena (a sample of its hits), so
    /// eviction keeps them, and the client's lookups counted since its last
    /// `Touch` (the host-wide hit counters). Answer: `Done`.
    Touch {
        /// Database key.
        db: String,
        /// `(oid, serial)` of each revision read; may be empty (a `Touch`
        /// that only carries counts).
        revisions: Vec<(u64, u64)>,
        /// The slot identity the client attached to (`Attached.identity`):
        /// the sidecar refuses the request with `Stale` if the database
        /// was flushed since (its slot has a new identity). Nil: no check
        /// (tools). The counts below are added before this check.
        #[serde(default)]
        identity: Option<u64>,
        /// Lookups of the client answered with a revision (from the arena
        /// or over the socket) since its previous `Touch` (version 7; 0
        /// when left out, as clients of version 6 do).
        #[serde(default)]
        hits: u64,
        /// Lookups of the client that went to its base storage since its
        /// previous `Touch` (version 7; 0 when left out).
        #[serde(default)]
        misses: u64,
    },
}

/// Where a client finds the sidecar's arena (the answer to `Hello`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArenaInfo {
    /// Path of the arena file, to map read-only.
    pub path: String,
    /// The sidecar run's incarnation; the mapped header must hold it.
    pub incarnation: u64,
}

/// A response: the request's id and the answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The id of the request answered; 0 for a request that could not be
    /// decoded.
    pub id: u64,
    /// The answer.
    pub body: ResponseBody,
}

/// What attaching did to the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttachState {
    /// First client: the log starts at its `last_tid`.
    Started,
    /// Joined a database already known.
    Joined,
    /// `last_tid` is below the horizon: the client's storage lags, or was
    /// restored from a backup. The client waits for its storage to reach the
    /// horizon and attaches again; if it never does, it sends `Flush` and
    /// attaches again (invariant 7), before using the database.
    Behind,
    /// `last_tid` is at or past the horizon (`Attached.horizon`, `H`), but
    /// the client has not proved its storage's history holds the horizon
    /// transaction (a restored backup committed to since, or another file
    /// at the same path, would pass the tid comparison). Nothing changed.
    /// The client checks with its storage, then attaches again with
    /// `proven: H`: (a) for each `witness` oid, `loadBefore(oid, H + 1)`
    /// returns serial `H`; with no witness, its transaction iterator has a
    /// transaction with tid `H`; (b) for each `open_sample` `(oid,
    /// serial)`, `loadBefore(oid, H + 1)` returns `serial`. If any check
    /// fails, it sends `Flush` and attaches again (invariant 7).
    Prove {
        /// Oids changed at exactly `H` (at most 4; empty when unknown).
        witness: Vec<u64>,
        /// Open revisions held, the highest serials (`<= H`) first (at most 4).
        open_sample: Vec<(u64, u64)>,
    },
}

/// Error codes of [`ResponseBody::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The frame's length is over the sidecar's maximum. Connection closed.
    FrameTooLarge,
    /// The body is not MessagePack. Connection closed.
    Malformed,
    /// Valid MessagePack, but no request this version knows. Connection kept.
    UnknownMessage,
    /// The first request was not `Hello`. Connection closed.
    NoHello,
    /// Protocol versions differ. Connection closed.
    VersionMismatch,
    /// A report starts after the horizon (invariant 4). Connection kept.
    Gap,
    /// A request whose content breaks a rule (a report's change outside
    /// its interval, a store ending before it starts). Connection kept.
    BadRequest,
    /// A view id that is not registered. Connection kept.
    UnknownView,
    /// A limit of the sidecar (number of databases, oids in one Lookup).
    /// Connection kept.
    Limit,
    /// A tid more than a day past the sidecar's wall clock (a report's
    /// `to`, a resync's or an attach's tid): ZODB tids are UTC timestamps,
    /// and such a horizon would be served to every other client of the
    /// database. Nothing changed. Connection kept.
    FutureTid,
    /// A store, report, resync or touch carrying the identity of a slot
    /// that was flushed since (another process found a restored backup or
    /// another file under the key): this client's storage is not proved to
    /// hold the new history. Nothing changed; the client attaches again,
    /// with a proof. Connection kept.
    Stale,
}

/// Every answer.
// `Stats` is far larger than the rest; it is built once per `Stats` call,
// and boxing it would change the public type for nothing measurable.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ResponseBody {
    /// Answer to `Hello`.
    Hello {
        /// [`PROTOCOL_VERSION`] of the sidecar.
        version: u32,
        /// `"tidecached <crate version>"`.
        server: String,
        /// The arena clients read revisions from.
        arena: ArenaInfo,
    },
    /// Answer to `Attach`.
    Attached {
        /// What happened.
        state: AttachState,
        /// The horizon after attaching.
        horizon: u64,
        /// The database's slot in the arena.
        slot: u8,
        /// The slot's identity: lookups in the arena check that the slot
        /// still holds it (it changes when the slot is given to another
        /// database).
        identity: u64,
    },
    /// Answer to `Lookup`: one entry per oid asked, `None` for a miss.
    Found {
        /// Results in request order.
        results: Vec<Option<Found>>,
    },
    /// Answer to `Store`.
    Stored {
        /// Revisions kept.
        kept: u32,
        /// Revisions refused (a refusal is normal: a miss is safe).
        refused: u32,
    },
    /// Answer to `Report` and `CollapsedReport`.
    Reported {
        /// The horizon after the report.
        horizon: u64,
    },
    /// Answer to `Resync`.
    Resynced {
        /// Whether the log restarted (open revisions were dropped).
        restarted: bool,
        /// The horizon after the resync.
        horizon: u64,
        /// The database's slot in the arena.
        slot: u8,
        /// The slot's identity: lookups in the arena check that the slot
        /// still holds it (it changes when the slot is given to another
        /// database).
        identity: u64,
    },
    /// Answer to `RegisterView`.
    ViewRegistered {
        /// The view's id, for `AdvanceView` and `ReleaseView`.
        view: u64,
    },
    /// Answer to `AdvanceView`, `ReleaseView`, `Flush`.
    Done,
    /// Answer to `Stats`.
    Stats(ServerStats),
    /// A refused request.
    Error {
        /// What kind of refusal.
        code: ErrorCode,
        /// A sentence for a person.
        message: String,
        /// For `Gap`: the sidecar's horizon.
        horizon: Option<u64>,
    },
}

/// Counters of one database.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DatabaseStats {
    /// Revisions held.
    pub entries: u64,
    /// Bytes of their states (the arena's per-revision record header
    /// and padding are not counted here: see `ArenaStats::record_bytes`).
    pub bytes: u64,
    /// Lookups answered with a revision, as the clients counted and sent
    /// them in `Touch` (from the arena or over the socket): the host-wide
    /// hits. (Before version 7: [`DatabaseStats::socket_hits`].)
    pub hits: u64,
    /// Lookups that went to the base storage, as the clients counted them.
    pub misses: u64,
    /// Stores kept.
    pub stores: u64,
    /// Stores refused.
    pub refused: u64,
    /// Changes received in reports.
    pub invalidations: u64,
    /// Revisions reclaimed (invisible to every view).
    pub reclaimed: u64,
    /// Revisions evicted by the size bound.
    pub evicted: u64,
    /// Registered views.
    pub views: u64,
    /// Horizon (`None` before the first attach).
    pub horizon: Option<u64>,
    /// Low-water mark (`None` without views).
    pub low_water_mark: Option<u64>,
    /// Start of the invalidation log.
    pub log_start: Option<u64>,
    /// Changes held in the log.
    pub log_len: u64,
    /// Views detached for holding the log past `--max-log-changes`.
    pub detached: u64,
    /// `Lookup` requests' oids the sidecar answered with a revision itself,
    /// over the socket (clients that cannot map the arena, tools); version
    /// 7, absent from the answer to a version 6 client.
    #[serde(default)]
    pub socket_hits: u64,
    /// `Lookup` requests' oids the sidecar answered without one.
    #[serde(default)]
    pub socket_misses: u64,
}

impl DatabaseStats {
    /// Adds `other`'s counters and sizes into `self` (the sidecar's
    /// `total`); tids (horizon, low-water mark, log start) are per database
    /// and stay as they are.
    pub fn add(&mut self, other: &DatabaseStats) {
        self.entries += other.entries;
        self.bytes += other.bytes;
        // Sums of what clients sent: saturating, whatever they sent.
        self.hits = self.hits.saturating_add(other.hits);
        self.misses = self.misses.saturating_add(other.misses);
        self.stores += other.stores;
        self.refused += other.refused;
        self.invalidations += other.invalidations;
        self.reclaimed += other.reclaimed;
        self.evicted += other.evicted;
        self.views += other.views;
        self.log_len += other.log_len;
        self.detached += other.detached;
        self.socket_hits += other.socket_hits;
        self.socket_misses += other.socket_misses;
    }

    /// `hits / (hits + misses)`, `None` before any lookup was counted.
    pub fn hit_ratio(&self) -> Option<f64> {
        let n = self.hits as f64 + self.misses as f64;
        (n > 0.0).then(|| self.hits as f64 / n)
    }
}

/// Counters of the sidecar.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerStats {
    /// `"tidecached <version>"`.
    pub server: String,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Connected clients.
    pub clients: u64,
    /// Byte budget (`--memory-mb`).
    pub capacity_bytes: u64,
    /// The arena, as a whole.
    #[serde(default)]
    pub arena: ArenaStats,
    /// Sum over databases.
    pub total: DatabaseStats,
    /// Per database key.
    pub databases: BTreeMap<String, DatabaseStats>,
}

/// Sizes and counters of the sidecar's arena (see `docs/architecture.md`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArenaStats {
    /// Path of the arena file.
    pub path: String,
    /// Its length, bytes.
    pub file_bytes: u64,
    /// Revisions readable.
    pub entries: u64,
    /// Bytes of their states.
    pub state_bytes: u64,
    /// Bytes their records take (headers, states, padding).
    pub record_bytes: u64,
    /// Segments in the small ring, in the main ring, free.
    pub small_segments: u64,
    /// Segments in the main ring.
    pub main_segments: u64,
    /// Free segments.
    pub free_segments: u64,
    /// Revisions written by stores.
    pub inserted: u64,
    /// Revisions dropped by eviction.
    pub evicted: u64,
    /// Revisions moved from the small ring to main (read while in small).
    pub promoted: u64,
    /// Revisions copied again within main (read since the last pass).
    pub reinserted: u64,
    /// Stores that went straight to main (recently evicted from small).
    pub ghost_hits: u64,
    /// Revisions removed by invalidation contradictions, resyncs, flushes.
    pub removed: u64,
    /// Records of a reopened file still to verify (0 once verified).
    pub unverified_segments: u64,
    /// Records discarded by verification after a restart.
    pub discarded: u64,
}

/// Writes one frame: 4-byte big-endian length, then `body`.
///
/// # Errors
/// I/O errors of `w`; `InvalidInput` if `body` is over 4 GiB.
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let n = u32::try_from(body.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&n.to_be_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf)
}

/// Reads a frame's 4-byte length prefix.
///
/// # Errors
/// I/O errors of `r` (`UnexpectedEof` on a closed connection).
pub fn read_frame_len(r: &mut impl Read) -> io::Result<usize> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    Ok(u32::from_be_bytes(len) as usize)
}

/// Encodes a message as MessagePack.
///
/// # Errors
/// Never for the types of this module; rmp-serde's error otherwise.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let r = Request {
            id: 7,
            body: RequestBody::Store {
                db: "zeo:/tmp/zeo.sock:1".into(),
                revisions: vec![StoreItem {
                    oid: 1,
                    serial: 2,
                    end: None,
                    view: 3,
                    state: b"pickle".to_vec(),
                }],
                identity: Some(42),
            },
        };
        let bytes = encode(&r).unwrap();
        assert_eq!(rmp_serde::from_slice::<Request>(&bytes).unwrap(), r);
    }

    #[test]
    fn an_attach_without_proven_still_decodes() {
        #[derive(Serialize)]
        enum OldBody {
            Attach { db: String, last_tid: u64 },
        }
        let bytes = encode(&(
            5u64,
            OldBody::Attach {
                db: "db".into(),
                last_tid: 9,
            },
        ))
        .unwrap();
        let r: Request = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(
            r.body,
            RequestBody::Attach {
                db: "db".into(),
                last_tid: 9,
                proven: None
            }
        );
    }

    #[test]
    fn frames_carry_a_big_endian_length() {
        let mut out = Vec::new();
        write_frame(&mut out, b"abc").unwrap();
        assert_eq!(out, [0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(read_frame_len(&mut &out[..]).unwrap(), 3);
    }
}
