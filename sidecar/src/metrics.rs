//! The sidecar's counters for people, scripts and monitoring: one
//! [`Readout`] rendered as `tidecached stats --format json|text|prometheus`
//! and served by the `--metrics-listen` endpoint ([`crate::scrape`]).
//!
//! What `hits` and `misses` count: every client's lookups of the database,
//! counted by the client itself (a hit: a revision served from the arena
//! or over the socket; a miss: a lookup that went to the base storage) and
//! sent with its hit hints in `Touch` (protocol version 7): host-wide
//! counts, although hits read from the mapped arena never reach the
//! sidecar. They lag a worker's own count by at most
//! `tidecache_client::outbox::COUNTS_INTERVAL` (all of it is sent when the
//! worker closes). `socket_hits` and `socket_misses` count the `Lookup`
//! requests the sidecar answered itself (clients that cannot map the
//! arena, tools): those are in `hits` and `misses` too when a client
//! counted them. The hit hints (`(oid, serial)` samples for eviction) are
//! counted apart ([`Inside::hit_hints`], `tidecache_hit_hints_total`).
//! docs/operations.md says the same for operators.

use crate::timestamp;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use tidecache_protocol::{DatabaseStats, ServerStats};

/// The output formats of `tidecached stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object on one line: the sidecar's `Stats` answer
    /// (docs/protocol.md) plus, per database and in `total`, `hit_ratio`
    /// (`null` before any lookup), and per database `horizon_time` (ISO
    /// 8601 UTC) and `horizon_lag_s`. The default, for scripts.
    Json,
    /// Lines for a person: tids also as ISO times, the horizon's lag in
    /// seconds, hit ratios.
    Text,
    /// The Prometheus text exposition format (version 0.0.4), as served by
    /// `serve --metrics-listen`.
    Prometheus,
}

/// The counters of a sidecar at one moment, with what is only known
/// inside it.
#[derive(Debug, Clone)]
pub struct Readout {
    /// The sidecar's `Stats` answer. `clients` counts the connections to
    /// show: a command asking over the socket takes its own out.
    pub stats: ServerStats,
    /// When it was taken, seconds since 1970-01-01 UTC: horizon lags are
    /// measured from it.
    pub at: f64,
    /// Per database, what is known inside the sidecar only (the `Stats`
    /// answer does not carry it): `None` when read over the socket, and
    /// then not shown.
    pub inside: Option<BTreeMap<String, Inside>>,
}

/// Counters of one database that the `Stats` answer does not carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Inside {
    /// `Resync` requests served since the sidecar started.
    pub resyncs: u64,
    /// Hit hints received, `(oid, serial)` pairs of `Touch` requests: each
    /// stands for `tidecache_client::session::TOUCH_EVERY` hits a worker
    /// read from the arena.
    pub hit_hints: u64,
}

/// Seconds since 1970-01-01 UTC, now.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// How far `tid` lies behind `at` (seconds since 1970-01-01 UTC), seconds;
/// negative if the clock of the host that committed it runs ahead.
pub fn lag(tid: Option<u64>, at: f64) -> Option<f64> {
    tid.map(|t| at - timestamp::unix_time(t))
}

impl Readout {
    /// A readout of `stats` taken now.
    pub fn new(stats: ServerStats, inside: Option<BTreeMap<String, Inside>>) -> Self {
        Readout {
            stats,
            at: now(),
            inside,
        }
    }

    /// Renders it in `format`.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Json => self.json(),
            Format::Text => self.text(),
            Format::Prometheus => self.prometheus(),
        }
    }

    /// [`Format::Json`], one line with its newline.
    pub fn json(&self) -> String {
        let mut v = serde_json::to_value(&self.stats).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("version".into(), version(&self.stats).into());
        }
        if let Some(total) = v.get_mut("total").and_then(|t| t.as_object_mut()) {
            total.insert("hit_ratio".into(), self.stats.total.hit_ratio().into());
        }
        if let Some(dbs) = v.get_mut("databases").and_then(|d| d.as_object_mut()) {
            for (name, db) in dbs.iter_mut() {
                let horizon = self.stats.databases.get(name).and_then(|d| d.horizon);
                if let Some(obj) = db.as_object_mut() {
                    let ratio = self.stats.databases.get(name).and_then(DatabaseStats::hit_ratio);
                    obj.insert("hit_ratio".into(), ratio.into());
                    obj.insert("horizon_time".into(), horizon.map(timestamp::iso).into());
                    obj.insert("horizon_lag_s".into(), lag(horizon, self.at).into());
                    if let Some(i) = self.inside.as_ref().and_then(|r| r.get(name)) {
                        obj.insert("resyncs".into(), i.resyncs.into());
                        obj.insert("hit_hints".into(), i.hit_hints.into());
                    }
                }
            }
        }
        let mut out = v.to_string();
        out.push('\n');
        out
    }

    /// [`Format::Text`].
    pub fn text(&self) -> String {
        let s = &self.stats;
        let a = &s.arena;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "{}, up {}, {} client connection(s), {} database(s)",
            s.server,
            duration(s.uptime_s),
            s.clients,
            s.databases.len()
        );
        let _ = writeln!(
            o,
            "arena {}: {} of {} in records ({:.1}% full), {} revisions, {} of states",
            a.path,
            size(a.record_bytes),
            size(a.file_bytes),
            percent(a.record_bytes, a.file_bytes),
            a.entries,
            size(a.state_bytes)
        );
        let _ = writeln!(
            o,
            "  segments: {} small, {} main, {} free; inserted {}, evicted {}, promoted {}, reinserted {}, \
             ghost hits {}, removed {}",
            a.small_segments,
            a.main_segments,
            a.free_segments,
            a.inserted,
            a.evicted,
            a.promoted,
            a.reinserted,
            a.ghost_hits,
            a.removed
        );
        let _ = writeln!(
            o,
            "  re-attach: {} segment(s) still to verify, {} record(s) discarded by verification",
            a.unverified_segments, a.discarded
        );
        self.text_database(&mut o, "total (all databases)", &s.total, None);
        for (name, db) in &s.databases {
            let inside = self.inside.as_ref().and_then(|r| r.get(name)).copied();
            self.text_database(&mut o, &format!("database {name}"), db, inside);
        }
        o
    }

    fn text_database(&self, o: &mut String, title: &str, d: &DatabaseStats, inside: Option<Inside>) {
        let _ = writeln!(o, "{title}");
        let _ = writeln!(o, "  {} revisions, {} of states", d.entries, size(d.bytes));
        let _ = writeln!(
            o,
            "  lookups counted by the clients: {} hits, {} misses ({})",
            d.hits,
            d.misses,
            ratio(d.hits, d.misses)
        );
        let _ = writeln!(
            o,
            "  lookups the sidecar answered over its socket: {} hits, {} misses",
            d.socket_hits, d.socket_misses
        );
        let _ = writeln!(
            o,
            "  stores {} kept, {} refused; invalidations {}; reclaimed {}; evicted {}{}",
            d.stores,
            d.refused,
            d.invalidations,
            d.reclaimed,
            d.evicted,
            inside
                .map(|i| format!("; resyncs {}; hit hints {}", i.resyncs, i.hit_hints))
                .unwrap_or_default()
        );
        let _ = writeln!(o, "  views {}, detached {}", d.views, d.detached);
        if std::ptr::eq(d, &self.stats.total) {
            // Tids are per database.
            let _ = writeln!(o, "  log: {} changes", d.log_len);
            return;
        }
        let _ = writeln!(o, "  horizon        {}", self.tid_text(d.horizon));
        let _ = writeln!(o, "  low-water mark {}", self.tid_text(d.low_water_mark));
        let _ = writeln!(
            o,
            "  log from       {}, {} changes",
            self.tid_text(d.log_start),
            d.log_len
        );
    }

    fn tid_text(&self, tid: Option<u64>) -> String {
        match tid {
            None => "-".into(),
            Some(0) => format!("{:#018x} (before any transaction)", 0),
            Some(t) => format!(
                "{t:#018x} = {} ({:.3} s ago)",
                timestamp::iso(t),
                lag(Some(t), self.at).unwrap_or_default()
            ),
        }
    }

    /// [`Format::Prometheus`]: `# HELP` and `# TYPE` lines and one sample a
    /// line, `name{labels} value`; per-database samples carry a
    /// `database` label. docs/operations.md lists every metric.
    pub fn prometheus(&self) -> String {
        let s = &self.stats;
        let a = &s.arena;
        let mut e = Exposition::default();
        let version = version(s);
        e.family(
            "tidecache_build_info",
            "gauge",
            "Always 1; the label gives the sidecar's version.",
            [(format!("{{version=\"{}\"}}", escape(version)), Value::Int(1))],
        );
        e.one(
            "tidecache_uptime_seconds",
            "gauge",
            "Seconds since the sidecar started.",
            s.uptime_s,
        );
        e.one(
            "tidecache_clients",
            "gauge",
            "Client connections open (worker processes' and tools').",
            s.clients,
        );
        e.one(
            "tidecache_databases",
            "gauge",
            "Databases the sidecar serves.",
            s.databases.len() as u64,
        );
        e.one(
            "tidecache_arena_capacity_bytes",
            "gauge",
            "Size of the arena file (--memory-mb), bytes.",
            a.file_bytes,
        );
        e.one(
            "tidecache_arena_bytes",
            "gauge",
            "Bytes of the arena taken by revision records (headers, states, padding).",
            a.record_bytes,
        );
        e.one(
            "tidecache_arena_state_bytes",
            "gauge",
            "Bytes of the states of the revisions in the arena.",
            a.state_bytes,
        );
        e.one(
            "tidecache_arena_entries",
            "gauge",
            "Revisions readable in the arena, all databases.",
            a.entries,
        );
        e.family(
            "tidecache_arena_segments",
            "gauge",
            "Segments of the arena by ring (small, main) and free.",
            [
                ("{ring=\"small\"}".to_owned(), Value::Int(a.small_segments)),
                ("{ring=\"main\"}".to_owned(), Value::Int(a.main_segments)),
                ("{ring=\"free\"}".to_owned(), Value::Int(a.free_segments)),
            ],
        );
        for (name, help, v) in [
            (
                "tidecache_arena_inserted_total",
                "Revisions written to the arena by stores.",
                a.inserted,
            ),
            (
                "tidecache_arena_evictions_total",
                "Revisions dropped from the arena by eviction (the size bound), all databases.",
                a.evicted,
            ),
            (
                "tidecache_arena_promoted_total",
                "Revisions moved from the small ring to the main ring (read while in small).",
                a.promoted,
            ),
            (
                "tidecache_arena_reinserted_total",
                "Revisions copied again within the main ring (read since the last pass).",
                a.reinserted,
            ),
            (
                "tidecache_arena_ghost_hits_total",
                "Stores that went straight to the main ring (recently evicted from small).",
                a.ghost_hits,
            ),
            (
                "tidecache_arena_removed_total",
                "Revisions removed by invalidation contradictions, resyncs and flushes.",
                a.removed,
            ),
            (
                "tidecache_arena_discarded_total",
                "Records of a re-attached arena file discarded by verification.",
                a.discarded,
            ),
        ] {
            e.one(name, "counter", help, v);
        }
        e.one(
            "tidecache_arena_unverified_segments",
            "gauge",
            "Segments of a re-attached arena file still to verify (0 once verified).",
            a.unverified_segments,
        );
        let t = &s.total;
        e.one(
            "tidecache_host_hits_total",
            "counter",
            "Lookups answered with a revision, all databases: the sum of tidecache_hits_total.",
            t.hits,
        );
        e.one(
            "tidecache_host_misses_total",
            "counter",
            "Lookups that went to the base storage, all databases: the sum of tidecache_misses_total.",
            t.misses,
        );
        e.family(
            "tidecache_host_hit_ratio",
            "gauge",
            "Host hits / (hits + misses) since the sidecar started, all databases (absent before the \
             first lookup is counted).",
            t.hit_ratio().map(|r| (String::new(), Value::Float(r))),
        );
        let per_db: [PerDatabase; 18] = [
            (
                "tidecache_hits_total",
                "counter",
                "Lookups answered with a revision (from the mapped arena or over the socket), counted \
                 by every client process and sent with its hit hints.",
                |d, _| Some(Value::Int(d.hits)),
            ),
            (
                "tidecache_misses_total",
                "counter",
                "Lookups that went to the base storage, counted by every client process.",
                |d, _| Some(Value::Int(d.misses)),
            ),
            (
                "tidecache_hit_ratio",
                "gauge",
                "hits / (hits + misses) since the sidecar started (absent before the first lookup is \
                 counted); rate() of the two counters gives it over a window.",
                |d, _| d.hit_ratio().map(Value::Float),
            ),
            (
                "tidecache_socket_lookup_hits_total",
                "counter",
                "Oids of Lookup requests the sidecar answered with a revision itself, over its socket \
                 (clients that cannot map the arena, tools).",
                |d, _| Some(Value::Int(d.socket_hits)),
            ),
            (
                "tidecache_socket_lookup_misses_total",
                "counter",
                "Oids of Lookup requests the sidecar answered without a revision, over its socket.",
                |d, _| Some(Value::Int(d.socket_misses)),
            ),
            ("tidecache_entries", "gauge", "Revisions held.", |d, _| {
                Some(Value::Int(d.entries))
            }),
            (
                "tidecache_bytes",
                "gauge",
                "Bytes of the states of the revisions held (each revision also takes 40 bytes of record header and padding to 8 bytes, counted in tidecache_arena_bytes only).",
                |d, _| Some(Value::Int(d.bytes)),
            ),
            (
                "tidecache_stores_total",
                "counter",
                "Revisions stored (kept).",
                |d, _| Some(Value::Int(d.stores)),
            ),
            (
                "tidecache_stores_refused_total",
                "counter",
                "Revisions a store brought that the rules refused (a newer revision cached, loaded below the \
                 log's start or past the horizon, no log yet, too large).",
                |d, _| Some(Value::Int(d.refused)),
            ),
            (
                "tidecache_invalidations_total",
                "counter",
                "Changes received in invalidation reports.",
                |d, _| Some(Value::Int(d.invalidations)),
            ),
            (
                "tidecache_reclaimed_total",
                "counter",
                "Revisions reclaimed because no registered view can see them.",
                |d, _| Some(Value::Int(d.reclaimed)),
            ),
            (
                "tidecache_evictions_total",
                "counter",
                "Revisions evicted by the size bound (--memory-mb).",
                |d, _| Some(Value::Int(d.evicted)),
            ),
            (
                "tidecache_views",
                "gauge",
                "Registered views (open ZODB connections' snapshots).",
                |d, _| Some(Value::Int(d.views)),
            ),
            (
                "tidecache_detached_views_total",
                "counter",
                "Views detached for holding the invalidation log past --max-log-changes.",
                |d, _| Some(Value::Int(d.detached)),
            ),
            (
                "tidecache_log_changes",
                "gauge",
                "Changes held in the invalidation log.",
                |d, _| Some(Value::Int(d.log_len)),
            ),
            (
                "tidecache_horizon_timestamp_seconds",
                "gauge",
                "Time of the horizon (the newest transaction reported), seconds since 1970-01-01 UTC.",
                |d, _| d.horizon.map(|t| Value::Float(timestamp::unix_time(t))),
            ),
            (
                "tidecache_horizon_lag_seconds",
                "gauge",
                "Seconds between the horizon's transaction and now: how long ago the newest commit \
                 the sidecar heard of was made.",
                |d, at| lag(d.horizon, at).map(Value::Float),
            ),
            (
                "tidecache_low_water_mark_lag_seconds",
                "gauge",
                "Seconds between the oldest registered view's transaction and now.",
                |d, at| lag(d.low_water_mark, at).map(Value::Float),
            ),
        ];
        for (name, kind, help, get) in per_db {
            let samples: Vec<_> = s
                .databases
                .iter()
                .filter_map(|(db, d)| Some((database_label(db), get(d, self.at)?)))
                .collect();
            e.family(name, kind, help, samples);
        }
        if let Some(inside) = &self.inside {
            e.family(
                "tidecache_resyncs_total",
                "counter",
                "Resync requests served (a client lost invalidations and asked the sidecar to \
                 restart its log).",
                inside.iter().map(|(db, i)| (database_label(db), Value::Int(i.resyncs))),
            );
            let every = tidecache_client::session::TOUCH_EVERY;
            e.family(
                "tidecache_hit_hints_total",
                "counter",
                &format!(
                    "Hit hints received from workers: each stands for {every} hits a worker read \
                     from the arena (1 in {every} is sent), less hints lost with a full queue or \
                     not yet sent."
                ),
                inside
                    .iter()
                    .map(|(db, i)| (database_label(db), Value::Int(i.hit_hints))),
            );
        }
        e.out
    }
}

/// A per-database family: name, type, help, and its sample of a
/// database at a time (`None`: no sample, e.g. no horizon yet).
type PerDatabase = (
    &'static str,
    &'static str,
    &'static str,
    fn(&DatabaseStats, f64) -> Option<Value>,
);

/// A sample's value.
#[derive(Debug, Clone, Copy)]
enum Value {
    Int(u64),
    Float(f64),
}

#[derive(Default)]
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str, samples: impl IntoIterator<Item = (String, Value)>) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            match value {
                Value::Int(v) => {
                    let _ = writeln!(self.out, "{name}{labels} {v}");
                }
                Value::Float(v) if v.is_finite() => {
                    let _ = writeln!(self.out, "{name}{labels} {v}");
                }
                Value::Float(_) => {}
            }
        }
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.family(name, kind, help, [(String::new(), Value::Int(value))]);
    }
}

fn database_label(db: &str) -> String {
    format!("{{database=\"{}\"}}", escape(db))
}

/// A label value escaped as the exposition format asks: `\`, `"` and line
/// feeds.
fn escape(v: &str) -> String {
    let mut o = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

/// `bytes` in B, KiB, MiB or GiB, whichever reads best.
fn size(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes < 1 << 10 {
        format!("{bytes} B")
    } else if bytes < 1 << 20 {
        format!("{:.1} KiB", b / 1024.0)
    } else if bytes < 1 << 30 {
        format!("{:.1} MiB", b / 1_048_576.0)
    } else {
        format!("{:.2} GiB", b / 1_073_741_824.0)
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn ratio(hits: u64, misses: u64) -> String {
    if hits + misses == 0 {
        "no lookups".into()
    } else {
        format!("{:.1}% hits", percent(hits, hits + misses))
    }
}

fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h {m}m")
    } else if h > 0 {
        format!("{h}h {m}m {s}s")
    } else {
        format!("{m}m {s}s")
    }
}

/// The sidecar's version (the workspace's `version`, as in `tidecached
/// --version`): the last word of [`ServerStats::server`],
/// `"tidecached <version>"`.
pub fn version(stats: &ServerStats) -> &str {
    stats.server.rsplit(' ').next().unwrap_or("")
}

/// The arena's fill, percent of its size taken by records (what `check`
/// prints).
pub fn arena_fill(stats: &ServerStats) -> f64 {
    percent(stats.arena.record_bytes, stats.arena.file_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Readout {
        let mut stats = ServerStats {
            server: "tidecached 0.1.0".into(),
            clients: 2,
            ..ServerStats::default()
        };
        stats.arena.file_bytes = 1 << 20;
        stats.arena.record_bytes = 1 << 18;
        let db = DatabaseStats {
            hits: 3,
            misses: 1,
            socket_hits: 2,
            horizon: Some(timestamp::tid_at(1_700_000_000)),
            ..DatabaseStats::default()
        };
        stats.databases.insert("zeo:/run/zeo \"a\"\\b\n".into(), db.clone());
        stats.databases.insert("fs".into(), DatabaseStats::default());
        stats.total.add(&db);
        Readout {
            stats,
            at: 1_700_000_010.5,
            inside: Some(
                [(
                    "fs".to_owned(),
                    Inside {
                        resyncs: 4,
                        hit_hints: 5,
                    },
                )]
                .into(),
            ),
        }
    }

    #[test]
    fn prometheus_lines_are_samples_or_comments() {
        let text = sample().prometheus();
        for line in text.lines() {
            assert!(
                line.starts_with("# HELP tidecache_")
                    || line.starts_with("# TYPE tidecache_")
                    || line.starts_with("tidecache_"),
                "{line}"
            );
        }
        assert!(text.contains("tidecache_hits_total{database=\"zeo:/run/zeo \\\"a\\\"\\\\b\\n\"} 3\n"));
        assert!(text.contains("tidecache_horizon_lag_seconds{database=\"zeo:/run/zeo \\\"a\\\"\\\\b\\n\"} 10.5\n"));
        // No horizon: no lag sample for that database.
        assert!(!text.contains("tidecache_horizon_lag_seconds{database=\"fs\"}"));
        assert!(text.contains("tidecache_resyncs_total{database=\"fs\"} 4\n"));
        assert!(text.contains("tidecache_hit_hints_total{database=\"fs\"} 5\n"));
        assert!(text.contains("tidecache_build_info{version=\"0.1.0\"} 1\n"));
        assert!(text.contains("tidecache_hit_ratio{database=\"zeo:/run/zeo \\\"a\\\"\\\\b\\n\"} 0.75\n"));
        // No lookup counted: no ratio.
        assert!(!text.contains("tidecache_hit_ratio{database=\"fs\"}"));
        assert!(text.contains("tidecache_socket_lookup_hits_total{database=\"fs\"} 0\n"));
        assert!(text.contains("tidecache_host_hits_total 3\n"));
        assert!(text.contains("tidecache_host_misses_total 1\n"));
        assert!(text.contains("tidecache_host_hit_ratio 0.75\n"));
    }

    #[test]
    fn json_adds_times_and_lags() {
        let r = sample();
        let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        let db = &v["databases"]["zeo:/run/zeo \"a\"\\b\n"];
        assert_eq!(db["horizon_time"], "2023-11-14T22:13:20.000000Z");
        assert!((db["horizon_lag_s"].as_f64().unwrap() - 10.5).abs() < 1e-6);
        assert_eq!(v["databases"]["fs"]["horizon_lag_s"], serde_json::Value::Null);
        assert_eq!(v["databases"]["fs"]["resyncs"], 4);
        assert_eq!(v["databases"]["fs"]["hit_hints"], 5);
        assert_eq!(v["total"]["hits"], 3);
        assert_eq!(v["total"]["hit_ratio"], 0.75);
        assert_eq!(v["total"]["socket_hits"], 2);
        assert_eq!(db["hit_ratio"], 0.75);
        assert_eq!(v["databases"]["fs"]["hit_ratio"], serde_json::Value::Null);
        assert_eq!(v["version"], "0.1.0");
    }

    #[test]
    fn text_shows_iso_times_and_ratios() {
        let t = sample().text();
        assert!(t.contains("= 2023-11-14T22:13:20.000000Z (10.500 s ago)"), "{t}");
        assert!(
            t.contains("lookups counted by the clients: 3 hits, 1 misses (75.0% hits)"),
            "{t}"
        );
        assert!(t.contains("over its socket: 2 hits, 0 misses"), "{t}");
        assert!(t.contains("(25.0% full)"), "{t}");
    }
}
