//! The previous protocol version, [`VERSION`]: what a sidecar speaks to a
//! client not yet upgraded, so that workers can be restarted one by one
//! after the sidecar was (docs/protocol.md, "Versions").
//!
//! Version 6 differs from version 7 ([`crate::PROTOCOL_VERSION`]) in two
//! messages only:
//!
//! - `Touch` has no `hits` and `misses`: a version 6 `Touch` decodes as a
//!   version 7 one with both 0 (`#[serde(default)]`), so the sidecar reads
//!   every version 6 request with the version 7 types;
//! - `Stats`' [`DatabaseStats`](crate::DatabaseStats) has no
//!   `socket_hits` and `socket_misses`: rmp-serde refuses an array with
//!   more elements than the struct has fields, so the answer to a version 6
//!   client is encoded by [`encode_response`] without them (its `hits` and
//!   `misses` are version 7's, the counts clients send).
//!
//! Every other message is the same in both versions.

use crate::{encode, ArenaStats, DatabaseStats, Response, ResponseBody, PROTOCOL_VERSION};
use serde::Serialize;
use std::collections::BTreeMap;

/// The previous protocol version, which a sidecar accepts beside its own.
pub const VERSION: u32 = PROTOCOL_VERSION - 1;

/// Whether a sidecar of this build speaks `version` (its own or the
/// previous one); any other `Hello` is refused with `VersionMismatch`.
pub fn accepted(version: u32) -> bool {
    version == PROTOCOL_VERSION || version == VERSION
}

/// Encodes `response` for a client that said `version` in its `Hello`
/// (one [`accepted`]): as [`encode`] for this version; for [`VERSION`],
/// a `Stats` answer without the fields that version does not know.
///
/// # Errors
/// Never for the types of this crate; rmp-serde's error otherwise.
pub fn encode_response(response: &Response, version: u32) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    match &response.body {
        ResponseBody::Stats(s) if version == VERSION => {
            let stats = ServerStats {
                server: &s.server,
                uptime_s: s.uptime_s,
                clients: s.clients,
                capacity_bytes: s.capacity_bytes,
                arena: &s.arena,
                total: (&s.total).into(),
                databases: s.databases.iter().map(|(k, v)| (k.as_str(), v.into())).collect(),
            };
            encode(&(response.id, Body::Stats(stats)))
        }
        _ => encode(response),
    }
}

/// The answers whose encoding differs in version 6 (the variant's name is
/// what goes on the wire).
#[derive(Serialize)]
enum Body<'a> {
    Stats(ServerStats<'a>),
}

/// `ServerStats` as version 6 encodes it (the same fields; its databases'
/// counters are version 6's).
#[derive(Serialize)]
struct ServerStats<'a> {
    server: &'a str,
    uptime_s: u64,
    clients: u64,
    capacity_bytes: u64,
    arena: &'a ArenaStats,
    total: DatabaseStats6,
    databases: BTreeMap<&'a str, DatabaseStats6>,
}

/// `DatabaseStats` of version 6: without `socket_hits`, `socket_misses`.
#[derive(Serialize)]
struct DatabaseStats6 {
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

impl From<&DatabaseStats> for DatabaseStats6 {
    fn from(d: &DatabaseStats) -> Self {
        DatabaseStats6 {
            entries: d.entries,
            bytes: d.bytes,
            hits: d.hits,
            misses: d.misses,
            stores: d.stores,
            refused: d.refused,
            invalidations: d.invalidations,
            reclaimed: d.reclaimed,
            evicted: d.evicted,
            views: d.views,
            horizon: d.horizon,
            low_water_mark: d.low_water_mark,
            log_start: d.log_start,
            log_len: d.log_len,
            detached: d.detached,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RequestBody, ServerStats as Stats};

    /// A version 6 `DatabaseStats`, decoded strictly (as a version 6
    /// client does: an extra element is an error).
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Old {
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

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct OldStats {
        server: String,
        uptime_s: u64,
        clients: u64,
        capacity_bytes: u64,
        arena: ArenaStats,
        total: Old,
        databases: BTreeMap<String, Old>,
    }

    #[derive(serde::Deserialize, Debug)]
    enum OldBody {
        Stats(OldStats),
    }

    fn stats() -> Response {
        let mut s = Stats {
            server: "tidecached 0".into(),
            ..Stats::default()
        };
        let d = DatabaseStats {
            hits: 5,
            misses: 2,
            socket_hits: 1,
            ..DatabaseStats::default()
        };
        s.total.add(&d);
        s.databases.insert("db".into(), d);
        Response {
            id: 9,
            body: ResponseBody::Stats(s),
        }
    }

    #[test]
    fn a_version_6_client_decodes_the_stats_answer() {
        let bytes = encode_response(&stats(), VERSION).unwrap();
        let (id, OldBody::Stats(s)): (u64, OldBody) = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!((id, s.databases["db"].hits, s.total.misses), (9, 5, 2));
        // What version 7 sends would not decode there.
        let new = encode_response(&stats(), PROTOCOL_VERSION).unwrap();
        assert!(rmp_serde::from_slice::<(u64, OldBody)>(&new).is_err());
        assert_eq!(rmp_serde::from_slice::<Response>(&new).unwrap(), stats());
    }

    #[test]
    fn a_version_6_touch_decodes_without_counts() {
        #[derive(Serialize)]
        enum OldRequest {
            Touch {
                db: String,
                revisions: Vec<(u64, u64)>,
                identity: Option<u64>,
            },
        }
        let bytes = encode(&(
            3u64,
            OldRequest::Touch {
                db: "db".into(),
                revisions: vec![(1, 2)],
                identity: Some(7),
            },
        ))
        .unwrap();
        let r: crate::Request = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(
            r.body,
            RequestBody::Touch {
                db: "db".into(),
                revisions: vec![(1, 2)],
                identity: Some(7),
                hits: 0,
                misses: 0
            }
        );
    }

    #[test]
    fn only_this_and_the_previous_version_are_accepted() {
        assert!(accepted(PROTOCOL_VERSION) && accepted(VERSION));
        assert!(!accepted(VERSION - 1) && !accepted(PROTOCOL_VERSION + 1));
    }
}
