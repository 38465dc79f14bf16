//! The arena's single writer (the sidecar): databases, records, chains and
//! eviction.
//!
//! # Allocation and eviction
//!
//! Records are appended to segments (log-structured, never rewritten in
//! place except to close a revision or relink a chain). Segments form two
//! FIFO rings, after S3-FIFO (J. Yang et al., "FIFO queues are all you need
//! for cache eviction", SOSP 2023):
//!
//! - **small** (about 10% of the segments) takes new revisions;
//! - **main** takes revisions read while in small, and revisions whose key
//!   was evicted from small recently (a **ghost** list of keys, as many as
//!   main holds).
//!
//! When a free segment is needed, the tail segment of small (if small holds
//! its share) or of main is recycled: its revisions that were read since
//! they were written (a 2-bit frequency the sidecar learns from sampled hit
//! reports) are copied to main's head (from main, with the frequency
//! decremented); the others are dropped, and dropped small keys enter the
//! ghost list. Revisions no registered view can see (`end` at or below the
//! database's low-water mark) and revisions of flushed databases are
//! dropped whatever their frequency. `make bench` measures the policy's hit
//! ratio against FIFO and RelStorage's segmented LRU.
//!
//! # Recycling a segment
//!
//! Hot records are copied and linked first; then every record left in the
//! segment is unlinked, its generation made odd (pointers still held miss)
//! and the segment goes to the free list. Taking it into use again gives it
//! a new, even generation (then a Release fence) before any word of it is
//! overwritten, so every pointer made before is stale.

use super::layout::{self, db_slot, header, record, segment, Geometry, LayoutError, Ring, OPEN};
use super::reader;
use super::Memory;
use crate::sync::{fence, AtomicU64, Ordering};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Frequency bits in the record's LENGTH word.
const FREQ_SHIFT: u64 = 24;
const FREQ_MASK: u64 = 0b11 << FREQ_SHIFT;

/// Why a revision was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotWritten {
    /// The state is larger than a segment can hold.
    TooLarge,
    /// The oid is over 48 bits.
    OidTooLarge,
    /// The database slot is not in use.
    NoDatabase,
}

/// Counters and sizes of an arena.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArenaStats {
    /// Length of the file, bytes.
    pub file_bytes: u64,
    /// Revisions linked (readable).
    pub entries: u64,
    /// Bytes of their states.
    pub state_bytes: u64,
    /// Bytes their records occupy (headers, states, padding).
    pub record_bytes: u64,
    /// Segments in use (small, main).
    pub small_segments: u64,
    /// Segments of main.
    pub main_segments: u64,
    /// Free segments.
    pub free_segments: u64,
    /// Bytes per segment.
    pub segment_bytes: u64,
    /// Revisions written by stores.
    pub inserted: u64,
    /// Revisions dropped by eviction.
    pub evicted: u64,
    /// Revisions moved from small to main.
    pub promoted: u64,
    /// Revisions copied again within main.
    pub reinserted: u64,
    /// Stores that went straight to main (their key was a ghost).
    pub ghost_hits: u64,
    /// Revisions removed otherwise (invalidation contradictions, resync,
    /// flush, reclaimed history).
    pub removed: u64,
    /// Segments of a reopened file not verified yet.
    pub unverified_segments: u64,
    /// Records the verification of a reopened file discarded.
    pub discarded: u64,
}

/// A record's header as the writer reads it.
#[derive(Debug, Clone, Copy)]
struct Header {
    next: u64,
    key: u64,
    serial: u64,
    end: u64,
    length: u64,
}

impl Header {
    fn len(&self) -> usize {
        (self.length & layout::LENGTH_MASK) as usize
    }
    fn unlinked(&self) -> bool {
        self.length & layout::UNLINKED != 0
    }
    fn freq(&self) -> u64 {
        (self.length & FREQ_MASK) >> FREQ_SHIFT
    }
}

/// Keys recently evicted from small, at most `cap` of them.
#[derive(Default)]
struct Ghost {
    order: VecDeque<u64>,
    count: HashMap<u64, u32>,
}

impl Ghost {
    fn add(&mut self, key: u64, cap: usize) {
        self.order.push_back(key);
        *self.count.entry(key).or_default() += 1;
        while self.order.len() > cap.max(1) {
            if let Some(old) = self.order.pop_front() {
                self.forget(old);
            }
        }
    }
    fn forget(&mut self, key: u64) {
        if let Some(c) = self.count.get_mut(&key) {
            *c -= 1;
            if *c == 0 {
                self.count.remove(&key);
            }
        }
    }
    /// Whether `key` is a ghost; the entry stays until it ages out.
    fn contains(&self, key: u64) -> bool {
        self.count.contains_key(&key)
    }
}

/// Eviction policy (S3-FIFO is the default; FIFO is kept for measurement).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Small and main FIFO rings with a ghost list (the default).
    S3Fifo,
    /// One FIFO ring, no reinsertion: the baseline of `make bench`.
    Fifo,
}

/// The single writer of an arena. Not `Sync`: the sidecar keeps it under a
/// mutex.
pub struct ArenaWriter {
    memory: Arc<Memory>,
    g: Geometry,
    policy: Policy,
    small: VecDeque<u64>,
    main: VecDeque<u64>,
    free: Vec<u64>,
    order: u64,
    ghost: Ghost,
    low_water: [u64; 256],
    small_entries: u64,
    main_entries: u64,
    /// Segments of a reopened file not verified yet: their records are not
    /// in the counts until [`ArenaWriter::verify_segment`] counts them.
    unverified: Vec<bool>,
    /// Entries and state bytes per database slot.
    usage: Vec<(u64, u64)>,
    stats: ArenaStats,
}

impl ArenaWriter {
    /// Lays out a new, empty arena over `memory` (whatever it held is
    /// overwritten) and makes it live with `incarnation`.
    pub fn create(memory: Arc<Memory>, g: Geometry, incarnation: u64) -> Self {
        let w = memory.words();
        w[header::LIVE].store(0, Ordering::Release);
        for word in &w[g.db_word as usize..g.data_word as usize] {
            word.store(0, Ordering::Relaxed);
        }
        for seg in 0..g.segments {
            let base = g.segment_word(seg);
            w[base + segment::GENERATION].store(1, Ordering::Relaxed);
            w[base + segment::META].store(0, Ordering::Relaxed);
            w[base + segment::FILL].store(0, Ordering::Relaxed);
        }
        for (i, word) in g.header_words().iter().enumerate() {
            w[i].store(*word, Ordering::Relaxed);
        }
        w[header::INCARNATION].store(incarnation, Ordering::Relaxed);
        store_boot_id(w);
        w[header::LIVE].store(1, Ordering::Release);
        let mut writer = Self::empty(memory, g);
        writer.free = (0..g.segments).rev().collect();
        writer
    }

    /// Re-attaches an arena file a previous sidecar left (a restart, also
    /// after `kill -9`): checks the header, keeps the database slots whose
    /// CRC matches (a damaged slot is freed, its revisions unreachable) and
    /// rebuilds the rings from the segments' order words: O(segments), no
    /// record is read. Records are verified (CRC, database, link) and
    /// counted afterwards, segment by segment, by
    /// [`ArenaWriter::verify_segment`], while the arena serves (a reader
    /// validates every record it reads anyway).
    ///
    /// After a reboot (the header's boot id is not this boot's, see
    /// [`super::boot`]) the file may be torn: a horizon can have reached the
    /// disk while a closing it covers did not. Then every slot's horizon is
    /// cleared (its log restarts empty, as for a new database), and
    /// [`ArenaWriter::keep_closed_after_reboot`] rebuilds the index from
    /// closed records whose CRC verifies, before the file goes live: no open
    /// revision survives and nothing is served unverified. O(file) instead of
    /// O(segments).
    ///
    /// # Errors
    /// A [`LayoutError`] if the header is not a valid header of this
    /// layout version for a file of this length.
    pub fn recover(memory: Arc<Memory>, incarnation: u64) -> Result<(Self, Recovered), LayoutError> {
        let g = Geometry::read(memory.words(), memory.len_bytes())?;
        let w = memory.words();
        w[header::LIVE].store(0, Ordering::Release);
        let stored_boot = [header::BOOT_ID, header::BOOT_ID + 1].map(|i| w[i].load(Ordering::Relaxed));
        let rebooted = super::boot::rebooted_since(stored_boot);
        let mut writer = Self::empty(memory.clone(), g);
        let mut report = Recovered::default();
        for slot in 0..g.db_slots as u8 {
            let base = g.db_slot_word(slot);
            let state = w[base + db_slot::STATE].load(Ordering::Relaxed);
            if state >> 8 != 1 {
                continue;
            }
            if w[base + db_slot::CRC].load(Ordering::Relaxed) != u64::from(slot_crc(w, &g, slot)) {
                w[base + db_slot::STATE].store(state & 0xff, Ordering::Release);
                w[base + db_slot::HORIZON].store(0, Ordering::Release);
                writer.seal_slot(slot);
                report.damaged_databases += 1;
            } else {
                if rebooted {
                    w[base + db_slot::HORIZON].store(0, Ordering::Release);
                    writer.seal_slot(slot);
                }
                report.databases += 1;
            }
        }
        let mut rings: Vec<(u64, Ring, u64)> = Vec::new();
        for seg in 0..g.segments {
            let base = g.segment_word(seg);
            let generation = w[base + segment::GENERATION].load(Ordering::Relaxed);
            let meta = w[base + segment::META].load(Ordering::Relaxed);
            let ring = match meta & 0xff {
                1 => Ring::Small,
                2 => Ring::Main,
                _ => Ring::Free,
            };
            if generation & 1 == 1 || ring == Ring::Free {
                // Free, or left mid-recycling: nothing in it is linked
                // safely any more. Odd, so pointers into it miss.
                w[base + segment::GENERATION].store(generation | 1, Ordering::Release);
                w[base + segment::META].store(0, Ordering::Relaxed);
                writer.free.push(seg);
            } else {
                rings.push((meta >> 8, ring, seg));
            }
        }
        rings.sort_unstable_by_key(|&(order, _, seg)| (order, seg));
        for &(order, ring, seg) in &rings {
            writer.order = writer.order.max(order);
            match ring {
                Ring::Small => writer.small.push_back(seg),
                _ => writer.main.push_back(seg),
            }
            // Counted when verified: walking every record here would touch
            // every page of the file before the first answer.
            writer.unverified[seg as usize] = true;
        }
        report.segments = rings.len() as u64;
        if rebooted {
            report.rebooted = true;
            report.discarded = writer.keep_closed_after_reboot();
        }
        w[header::INCARNATION].store(incarnation, Ordering::Relaxed);
        store_boot_id(w);
        w[header::LIVE].store(1, Ordering::Release);
        Ok((writer, report))
    }

    /// Rebuilds the index of a file re-attached after a reboot (from
    /// [`ArenaWriter::recover`], before the file is live) from the records
    /// that a torn file cannot get wrong; returns how many records it
    /// dropped. Every bucket is cleared, then every record of the segments
    /// in use is read, oldest segment first, and linked again only if
    ///
    /// - it is closed: an open revision's closing may be a page that never
    ///   reached the disk, and its database's horizon is gone anyway;
    /// - its CRC-32 (key, serial, end, length, state) verifies: a record
    ///   made of pages of different ages (a header from one write, a state
    ///   from another, a recycled segment's old bytes) fails it, but for the
    ///   2^-32 chance of any checksum;
    /// - its database slot is in use at the record's generation (a slot's
    ///   words are in one page and CRC-checked by `recover`);
    /// - no record of the same key and serial was linked already (a copy
    ///   whose original's unlinked flag was lost).
    ///
    /// A closed record that passes is a revision the sidecar really stored
    /// or closed, with its true validity `[serial, end)`: closings only ever
    /// set `end` once, from open, and the CRC binds `end` to the rest. Every
    /// pointer the file holds afterwards was made here, to a record checked
    /// here, so no stale bucket or `next` word of another age is followed;
    /// the segments are marked verified (nothing is left for
    /// [`ArenaWriter::verify_next`]).
    fn keep_closed_after_reboot(&mut self) -> u64 {
        let g = self.g;
        for word in &self.w()[g.bucket_word as usize..g.data_word as usize] {
            word.store(0, Ordering::Relaxed);
        }
        let mut linked = std::collections::HashSet::new();
        let mut dropped = 0;
        let segments: Vec<u64> = self.small.iter().chain(self.main.iter()).copied().collect();
        for seg in segments {
            let mut records = Vec::new();
            self.each_record(seg, |at, h| records.push((at, h)));
            for (at, h) in records {
                let keep = !h.unlinked()
                    && h.end != OPEN
                    && u64::from(layout::key_slot(h.key)) < g.db_slots
                    && self.worth_keeping(&h)
                    && layout::record_crc(h.key, h.serial, h.end, &self.state_at(at, h.len()))
                        == (h.length >> 32) as u32
                    && linked.insert((h.key, h.serial));
                if keep {
                    self.link(h.key, at);
                    self.tally(at, h.key, h.len(), 1);
                } else {
                    self.w()[at + record::LENGTH].fetch_or(layout::UNLINKED, Ordering::Relaxed);
                    dropped += 1;
                }
            }
            self.unverified[seg as usize] = false;
        }
        self.stats.discarded += dropped;
        dropped
    }

    /// Verifies every record of segment `seg` after a restart: a record
    /// whose CRC fails, whose database slot is no longer in use at its
    /// generation, or that is not linked from its chain (a store cut short)
    /// is unlinked and forgotten; the others are counted in the stats from
    /// now on. Returns `(checked, discarded)`; `(0, 0)` for a segment
    /// verified already (or recycled since the restart).
    pub fn verify_segment(&mut self, seg: u64) -> (u64, u64) {
        if !self.unverified.get(seg as usize).copied().unwrap_or(false) {
            return (0, 0);
        }
        let mut records = Vec::new();
        self.each_record(seg, |at, h| {
            if !h.unlinked() {
                records.push((at, h));
            }
        });
        let mut bad = 0;
        for &(at, h) in &records {
            let sound = layout::record_crc(h.key, h.serial, h.end, &self.state_at(at, h.len()))
                == (h.length >> 32) as u32
                && self.worth_keeping(&Header { end: OPEN, ..h });
            let linked = self.chain(h.key).iter().any(|&(_, a)| a == at);
            if sound && linked {
                self.tally(at, h.key, h.len(), 1);
            } else if linked {
                // Not counted yet (the segment is unverified), so removing
                // it subtracts nothing.
                self.remove(at);
                bad += 1;
            } else {
                self.w()[at + record::LENGTH].fetch_or(layout::UNLINKED, Ordering::Relaxed);
                bad += 1;
            }
        }
        self.unverified[seg as usize] = false;
        self.stats.discarded += bad;
        (records.len() as u64, bad)
    }

    /// Verifies the next segment a restart left unverified (see
    /// [`ArenaWriter::verify_segment`]); `None` once every one is.
    pub fn verify_next(&mut self) -> Option<(u64, u64)> {
        let seg = self.unverified.iter().position(|&u| u)?;
        Some(self.verify_segment(seg as u64))
    }

    fn empty(memory: Arc<Memory>, g: Geometry) -> Self {
        ArenaWriter {
            memory,
            g,
            policy: Policy::S3Fifo,
            small: VecDeque::new(),
            main: VecDeque::new(),
            free: Vec::new(),
            order: 0,
            ghost: Ghost::default(),
            low_water: [0; 256],
            small_entries: 0,
            main_entries: 0,
            unverified: vec![false; g.segments as usize],
            usage: vec![(0, 0); 256],
            stats: ArenaStats {
                file_bytes: g.file_bytes,
                segment_bytes: g.segment_words * 8,
                ..ArenaStats::default()
            },
        }
    }

    /// Chooses the eviction policy (before any store).
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// The incarnation in the header (see [`header::INCARNATION`]).
    pub fn incarnation(&self) -> u64 {
        self.w()[header::INCARNATION].load(Ordering::Relaxed)
    }

    /// The arena's geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.g
    }

    /// The memory the arena lives in.
    pub fn memory(&self) -> &Arc<Memory> {
        &self.memory
    }

    fn w(&self) -> &[AtomicU64] {
        self.memory.words()
    }

    // ----- databases -------------------------------------------------

    /// The slot of database `key`: the one holding it already, else a free
    /// one (its generation bumped, no horizon). `None` if every slot is
    /// taken. Keys over [`layout::MAX_KEY_BYTES`] are stored by prefix and
    /// CRC-32.
    pub fn attach_database(&mut self, key: &str) -> Option<u8> {
        let stored = stored_key(key);
        let mut free = None;
        for slot in 0..self.g.db_slots as u8 {
            let base = self.g.db_slot_word(slot);
            let state = self.w()[base + db_slot::STATE].load(Ordering::Relaxed);
            if state >> 8 == 1 {
                if self.slot_key(slot) == stored {
                    return Some(slot);
                }
            } else if free.is_none() {
                free = Some(slot);
            }
        }
        let slot = free?;
        let base = self.g.db_slot_word(slot);
        let generation = (self.w()[base + db_slot::STATE].load(Ordering::Relaxed) as u8).wrapping_add(1);
        let w = self.w();
        w[base + db_slot::HORIZON].store(0, Ordering::Relaxed);
        w[base + db_slot::KEY_LEN].store(stored.len() as u64, Ordering::Relaxed);
        for (i, chunk) in stored.chunks(8).enumerate() {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            w[base + db_slot::KEY + i].store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        w[base + db_slot::STATE].store(1 << 8 | u64::from(generation), Ordering::Release);
        self.seal_slot(slot);
        Some(slot)
    }

    fn slot_key(&self, slot: u8) -> Vec<u8> {
        let base = self.g.db_slot_word(slot);
        let w = self.w();
        let len = (w[base + db_slot::KEY_LEN].load(Ordering::Relaxed) as usize).min(layout::MAX_KEY_BYTES);
        let mut key: Vec<u8> = (0..len.div_ceil(8))
            .flat_map(|i| w[base + db_slot::KEY + i].load(Ordering::Relaxed).to_le_bytes())
            .collect();
        key.truncate(len);
        key
    }

    /// Recomputes the slot's CRC word (checked when a file is reopened).
    fn seal_slot(&self, slot: u8) {
        let crc = slot_crc(self.w(), &self.g, slot);
        self.w()[self.g.db_slot_word(slot) + db_slot::CRC].store(u64::from(crc), Ordering::Relaxed);
    }

    /// Frees a database's slot and unlinks its revisions.
    pub fn release_database(&mut self, slot: u8) {
        let base = self.g.db_slot_word(slot);
        let state = self.w()[base + db_slot::STATE].load(Ordering::Relaxed);
        self.w()[base + db_slot::STATE].store(state & 0xff, Ordering::Release);
        self.w()[base + db_slot::HORIZON].store(0, Ordering::Release);
        self.seal_slot(slot);
        self.remove_where(|r| r.slot == slot);
    }

    /// Current generation of a slot.
    fn generation(&self, slot: u8) -> u8 {
        self.w()[self.g.db_slot_word(slot) + db_slot::STATE].load(Ordering::Relaxed) as u8
    }

    /// Publishes a database's horizon (Release): call after every closing
    /// it covers.
    pub fn publish_horizon(&self, slot: u8, horizon: u64) {
        self.w()[self.g.db_slot_word(slot) + db_slot::HORIZON].store(horizon, Ordering::Release);
        self.seal_slot(slot);
    }

    /// The horizon published for a slot.
    pub fn horizon(&self, slot: u8) -> u64 {
        self.w()[self.g.db_slot_word(slot) + db_slot::HORIZON].load(Ordering::Relaxed)
    }

    /// Drops every revision of a database at once: its generation is bumped
    /// (readers stop matching old keys), its horizon cleared, and its
    /// records unlinked.
    pub fn flush_database(&mut self, slot: u8) {
        let base = self.g.db_slot_word(slot);
        let generation = self.generation(slot).wrapping_add(1);
        self.w()[base + db_slot::HORIZON].store(0, Ordering::Release);
        self.w()[base + db_slot::STATE].store(1 << 8 | u64::from(generation), Ordering::Release);
        self.seal_slot(slot);
        self.remove_where(|r| r.slot == slot);
    }

    /// Closed revisions of `slot` ending at or below `low_water` are
    /// invisible to every view (invariant 5): eviction drops them first.
    pub fn set_low_water(&mut self, slot: u8, low_water: u64) {
        self.low_water[slot as usize] = low_water;
    }

    // ----- records -----------------------------------------------------

    fn header_at(&self, at: usize) -> Header {
        let w = self.w();
        Header {
            next: w[at + record::NEXT].load(Ordering::Relaxed),
            key: w[at + record::KEY].load(Ordering::Relaxed),
            serial: w[at + record::SERIAL].load(Ordering::Relaxed),
            end: w[at + record::END].load(Ordering::Relaxed),
            length: w[at + record::LENGTH].load(Ordering::Relaxed),
        }
    }

    fn state_at(&self, at: usize, len: usize) -> Vec<u8> {
        let w = self.w();
        let first = at + layout::RECORD_HEADER_WORDS;
        let mut state: Vec<u8> = w[first..first + len.div_ceil(8)]
            .iter()
            .flat_map(|x| x.load(Ordering::Relaxed).to_ne_bytes())
            .collect();
        state.truncate(len);
        state
    }

    /// Word index of the record a pointer designates, if it is current.
    fn resolve(&self, p: u64) -> Option<usize> {
        let (pgen, offset) = layout::unpoint(p);
        let seg = self.g.locate(offset)?;
        let generation = self.w()[self.g.segment_word(seg) + segment::GENERATION].load(Ordering::Relaxed);
        (generation & 0xffff_ffff == pgen && generation & 1 == 0).then_some((self.g.data_word + offset) as usize)
    }

    /// Walks the chain of `key`'s bucket: `(holder word, record word)` of
    /// every record in it. A stale or cyclic chain is cut where it goes bad.
    fn chain(&self, key: u64) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut holder = self.g.bucket_word_of(key);
        let mut p = self.w()[holder].load(Ordering::Relaxed);
        while p != 0 {
            match self.resolve(p) {
                Some(at) if out.len() < layout::MAX_CHAIN => {
                    out.push((holder, at));
                    holder = at + record::NEXT;
                    p = self.w()[holder].load(Ordering::Relaxed);
                }
                _ => {
                    // Only a damaged file (or a chain past MAX_CHAIN) gets
                    // here: cut it; what lies beyond is unreachable.
                    self.w()[holder].store(0, Ordering::Release);
                    break;
                }
            }
        }
        out
    }

    /// The revisions of `oid` in `slot`: `(record word, serial, end)`.
    pub fn revisions(&self, slot: u8, oid: u64) -> Vec<(usize, u64, u64)> {
        let Some(key) = layout::key(slot, self.generation(slot), oid) else {
            return Vec::new();
        };
        self.chain(key)
            .into_iter()
            .map(|(_, at)| (at, self.header_at(at)))
            .filter(|(_, h)| h.key == key)
            .map(|(at, h)| (at, h.serial, h.end))
            .collect()
    }

    /// Closes the revision at record word `at` at `end` (end first, then the
    /// CRC; publish the horizon afterwards).
    pub fn set_end(&self, at: usize, end: u64) {
        let h = self.header_at(at);
        let state = self.state_at(at, h.len());
        let crc = layout::record_crc(h.key, h.serial, end, &state);
        let w = self.w();
        w[at + record::END].store(end, Ordering::Relaxed);
        let length = (h.length & !(0xffff_ffffu64 << 32)) | u64::from(crc) << 32;
        w[at + record::LENGTH].store(length, Ordering::Relaxed);
    }

    /// Writes a revision of `oid` in `slot` and links it (Release). The
    /// caller has checked that no record of the same serial is linked.
    ///
    /// # Errors
    /// [`NotWritten`]: the state or oid is too large, or the slot is free.
    pub fn insert(&mut self, slot: u8, oid: u64, serial: u64, end: u64, state: &[u8]) -> Result<(), NotWritten> {
        let base = self.g.db_slot_word(slot);
        if self.w()[base + db_slot::STATE].load(Ordering::Relaxed) >> 8 != 1 {
            return Err(NotWritten::NoDatabase);
        }
        if state.len() > self.g.max_state_bytes() {
            return Err(NotWritten::TooLarge);
        }
        let key = layout::key(slot, self.generation(slot), oid).ok_or(NotWritten::OidTooLarge)?;
        let ring = match self.policy {
            Policy::S3Fifo if self.ghost.contains(key) => {
                self.stats.ghost_hits += 1;
                Ring::Main
            }
            Policy::S3Fifo => Ring::Small,
            Policy::Fifo => Ring::Main,
        };
        let words = layout::record_words(state.len());
        let Some(at) = self.allocate(ring, words) else {
            return Err(NotWritten::TooLarge);
        };
        let crc = layout::record_crc(key, serial, end, state);
        let w = self.w();
        w[at + record::KEY].store(key, Ordering::Relaxed);
        w[at + record::SERIAL].store(serial, Ordering::Relaxed);
        w[at + record::END].store(end, Ordering::Relaxed);
        w[at + record::LENGTH].store(u64::from(crc) << 32 | state.len() as u64, Ordering::Relaxed);
        let first = at + layout::RECORD_HEADER_WORDS;
        for (i, chunk) in state.chunks(8).enumerate() {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            w[first + i].store(u64::from_ne_bytes(b), Ordering::Relaxed);
        }
        self.link(key, at);
        self.stats.inserted += 1;
        self.account(at, key, state.len(), 1);
        Ok(())
    }

    /// Links the record at `at` at the head of its bucket's chain.
    fn link(&self, key: u64, at: usize) {
        let w = self.w();
        let bucket = self.g.bucket_word_of(key);
        w[at + record::NEXT].store(w[bucket].load(Ordering::Relaxed), Ordering::Relaxed);
        let offset = at as u64 - self.g.data_word;
        let seg = offset / self.g.segment_words;
        let generation = w[self.g.segment_word(seg) + segment::GENERATION].load(Ordering::Relaxed);
        // Release: a reader that loads this pointer sees the whole record.
        w[bucket].store(layout::pointer(generation, offset), Ordering::Release);
    }

    /// Unlinks the record at `at` from its chain and marks it unlinked.
    /// Returns whether it was linked.
    fn unlink(&mut self, at: usize) -> bool {
        let h = self.header_at(at);
        if h.unlinked() {
            return false;
        }
        self.w()[at + record::LENGTH].fetch_or(layout::UNLINKED, Ordering::Relaxed);
        let found = self.chain(h.key).into_iter().find(|&(_, a)| a == at);
        if let Some((holder, _)) = found {
            self.w()[holder].store(h.next, Ordering::Release);
        }
        self.account(at, h.key, h.len(), -1);
        true
    }

    /// Removes (unlinks) the record at `at`: an invalidation contradiction,
    /// a resync, a reclaimed revision.
    pub fn remove(&mut self, at: usize) {
        if self.unlink(at) {
            self.stats.removed += 1;
        }
    }

    /// Removes every linked record whose header satisfies `pred`; returns
    /// how many. Walks every segment in use (O(arena)); used by resync,
    /// flush and reclamation, never by a read.
    pub fn remove_where(&mut self, pred: impl Fn(&RecordInfo) -> bool) -> usize {
        let mut doomed = Vec::new();
        for seg in self.small.iter().chain(self.main.iter()).copied().collect::<Vec<_>>() {
            self.each_record(seg, |at, h| {
                if !h.unlinked() && pred(&info(h)) {
                    doomed.push(at);
                }
            });
        }
        let n = doomed.len();
        for at in doomed {
            self.remove(at);
        }
        n
    }

    /// Calls `f(record word, header)` for every record of segment `seg`.
    fn each_record(&self, seg: u64, mut f: impl FnMut(usize, Header)) {
        let base = self.g.segment_word(seg);
        let fill = self.w()[base + segment::FILL]
            .load(Ordering::Relaxed)
            .min(self.g.segment_words) as usize;
        let mut at = base + layout::SEGMENT_HEADER_WORDS;
        while at + layout::RECORD_HEADER_WORDS <= base + fill {
            let h = self.header_at(at);
            let words = layout::record_words(h.len());
            if at + words > base + fill {
                break;
            }
            f(at, h);
            at += words;
        }
    }

    fn ring_of(&self, at: usize) -> Ring {
        let seg = (at as u64 - self.g.data_word) / self.g.segment_words;
        match self.w()[self.g.segment_word(seg) + segment::META].load(Ordering::Relaxed) & 0xff {
            1 => Ring::Small,
            2 => Ring::Main,
            _ => Ring::Free,
        }
    }

    fn count_in(&mut self, ring: Ring, n: i64) {
        let c = match ring {
            Ring::Small => &mut self.small_entries,
            Ring::Main => &mut self.main_entries,
            Ring::Free => return,
        };
        *c = c.saturating_add_signed(n);
    }

    // ----- segments ----------------------------------------------------

    /// Room for `words` words in `ring`'s head segment, taking a new segment
    /// (and evicting) when the head is full. `None` if a record that size
    /// never fits.
    fn allocate(&mut self, ring: Ring, words: usize) -> Option<usize> {
        if words + layout::SEGMENT_HEADER_WORDS > self.g.segment_words as usize {
            return None;
        }
        loop {
            if let Some(at) = self.bump(ring, words) {
                return Some(at);
            }
            while self.free.len() < 2 {
                if !self.evict_one() {
                    break;
                }
            }
            let seg = self.free.pop()?;
            self.open_segment(seg, ring);
        }
    }

    /// Room in the head segment of `ring`, without taking a new one.
    fn bump(&mut self, ring: Ring, words: usize) -> Option<usize> {
        let head = *match ring {
            Ring::Small => &self.small,
            Ring::Main => &self.main,
            Ring::Free => return None,
        }
        .back()?;
        let base = self.g.segment_word(head);
        let fill = self.w()[base + segment::FILL].load(Ordering::Relaxed);
        if fill + words as u64 > self.g.segment_words {
            return None;
        }
        // The fill grows before the record is written: a crash in between
        // leaves an unlinked record a restart's scan skips.
        self.w()[base + segment::FILL].store(fill + words as u64, Ordering::Release);
        Some(base + fill as usize)
    }

    fn open_segment(&mut self, seg: u64, ring: Ring) {
        let base = self.g.segment_word(seg);
        self.order += 1;
        self.unverified[seg as usize] = false;
        let w = self.w();
        let generation = w[base + segment::GENERATION].load(Ordering::Relaxed);
        w[base + segment::META].store(self.order << 8 | ring as u64, Ordering::Relaxed);
        w[base + segment::FILL].store(layout::SEGMENT_HEADER_WORDS as u64, Ordering::Relaxed);
        // A new generation before any record is overwritten, and a Release
        // fence so that a reader who sees a new word also sees the new
        // generation on its second load (the seqlock's writer side).
        w[base + segment::GENERATION].store((generation | 1).wrapping_add(1) & 0xffff_ffff, Ordering::Relaxed);
        fence(Ordering::Release);
        match ring {
            Ring::Small => self.small.push_back(seg),
            Ring::Main => self.main.push_back(seg),
            Ring::Free => {}
        }
    }

    /// Recycles one tail segment. Returns `false` if no ring can give one.
    fn evict_one(&mut self) -> bool {
        let small_share = (self.g.segments as usize / 10).max(1);
        let from_small = match self.policy {
            Policy::Fifo => false,
            Policy::S3Fifo => {
                (self.small.len() > 1 && self.small.len() >= small_share)
                    || (self.main.len() <= 1 && self.small.len() > 1)
            }
        };
        let seg = if from_small {
            self.small.pop_front()
        } else if self.main.len() > 1 {
            self.main.pop_front()
        } else {
            None
        };
        let Some(seg) = seg else { return false };
        let policy = self.policy;
        let mut keep = Vec::new();
        let mut drop = Vec::new();
        self.each_record(seg, |at, h| {
            if !h.unlinked() {
                if policy == Policy::S3Fifo && self.worth_keeping(&h) && h.freq() > 0 {
                    keep.push(at);
                } else {
                    drop.push((at, h.key));
                }
            }
        });
        for at in keep {
            let h = self.header_at(at);
            let freq = if from_small { 0 } else { h.freq() - 1 };
            self.copy_to_main(at, freq);
            self.stats.promoted += u64::from(from_small);
            self.stats.reinserted += u64::from(!from_small);
        }
        let base = self.g.segment_word(seg);
        let ghost_cap = self.main_entries as usize;
        let mut records = Vec::new();
        self.each_record(seg, |at, h| {
            if !h.unlinked() {
                records.push(at);
            }
        });
        for at in records {
            self.unlink(at);
        }
        // Odd once nothing links into it: pointers readers still hold now
        // miss. (Its records stay intact until the segment is reused, and
        // were kept up to date by reports until unlinked, so a reader that
        // got there before reads a true revision.)
        let generation = self.w()[base + segment::GENERATION].load(Ordering::Relaxed);
        self.w()[base + segment::GENERATION].store(generation | 1, Ordering::Release);
        for (_, key) in &drop {
            if from_small {
                self.ghost.add(*key, ghost_cap);
            }
        }
        self.stats.evicted += drop.len() as u64;
        self.w()[base + segment::META].store(0, Ordering::Relaxed);
        self.free.push(seg);
        true
    }

    /// Whether a record is still of use: its database is in use at its
    /// generation, and a view may still see it.
    fn worth_keeping(&self, h: &Header) -> bool {
        let slot = layout::key_slot(h.key);
        let state = self.w()[self.g.db_slot_word(slot) + db_slot::STATE].load(Ordering::Relaxed);
        state >> 8 == 1
            && state as u8 == layout::key_generation(h.key)
            && (h.end == OPEN || h.end > self.low_water[slot as usize])
    }

    /// Copies the record at `at` to main's head with frequency `freq` and
    /// links the copy (the original is unlinked by the caller).
    fn copy_to_main(&mut self, at: usize, freq: u64) {
        let h = self.header_at(at);
        let seg = (at as u64 - self.g.data_word) / self.g.segment_words;
        if self.unverified[seg as usize]
            && layout::record_crc(h.key, h.serial, h.end, &self.state_at(at, h.len())) != (h.length >> 32) as u32
        {
            return; // damaged (a reopened file not verified this far): dropped
        }
        let words = layout::record_words(h.len());
        let Some(to) = self.bump_or_take(words) else {
            return;
        };
        let w = self.w();
        for i in 1..words {
            w[to + i].store(w[at + i].load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let length = (h.length & !(FREQ_MASK | layout::UNLINKED)) | freq << FREQ_SHIFT;
        w[to + record::LENGTH].store(length, Ordering::Relaxed);
        self.link(h.key, to);
        self.account(to, h.key, h.len(), 1);
    }

    /// Adds (`n` = 1) or subtracts (-1) the record at `at` (`len` state
    /// bytes) to the counts, unless its segment is not verified yet.
    fn account(&mut self, at: usize, key: u64, len: usize, n: i64) {
        let seg = (at as u64 - self.g.data_word) / self.g.segment_words;
        if !self.unverified[seg as usize] {
            self.tally(at, key, len, n);
        }
    }

    /// [`ArenaWriter::account`] whatever the segment's state.
    fn tally(&mut self, at: usize, key: u64, len: usize, n: i64) {
        let ring = self.ring_of(at);
        self.count_in(ring, n);
        let (len, words) = (len as u64, layout::record_words(len) as u64 * 8);
        let usage = &mut self.usage[layout::key_slot(key) as usize];
        if n > 0 {
            self.stats.entries += 1;
            self.stats.state_bytes += len;
            self.stats.record_bytes += words;
            usage.0 += 1;
            usage.1 += len;
        } else {
            self.stats.entries -= 1;
            self.stats.state_bytes -= len;
            self.stats.record_bytes -= words;
            usage.0 -= 1;
            usage.1 -= len;
        }
    }

    /// Entries and state bytes of database slot `slot`.
    pub fn slot_usage(&self, slot: u8) -> (u64, u64) {
        self.usage[slot as usize]
    }

    /// Counts a read of revision `(oid, serial)` of `slot` (a hit a client
    /// reported): eviction keeps what is read.
    pub fn touch(&self, slot: u8, oid: u64, serial: u64) {
        if let Some(&(at, _, _)) = self.revisions(slot, oid).iter().find(|r| r.1 == serial) {
            let word = &self.w()[at + record::LENGTH];
            let _ = word.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                (v & FREQ_MASK != FREQ_MASK).then_some(v + (1 << FREQ_SHIFT))
            });
        }
    }

    /// Room in main's head, taking a free segment (never evicting: eviction
    /// is what calls this).
    fn bump_or_take(&mut self, words: usize) -> Option<usize> {
        if let Some(at) = self.bump(Ring::Main, words) {
            return Some(at);
        }
        let seg = self.free.pop()?;
        self.open_segment(seg, Ring::Main);
        self.bump(Ring::Main, words)
    }

    /// Counters and sizes.
    pub fn stats(&self) -> ArenaStats {
        ArenaStats {
            small_segments: self.small.len() as u64,
            main_segments: self.main.len() as u64,
            free_segments: self.free.len() as u64,
            unverified_segments: self.unverified.iter().filter(|&&u| u).count() as u64,
            ..self.stats
        }
    }

    /// Looks up as a reader would (for the sidecar's own `Lookup` answers and
    /// tests).
    pub fn lookup(&self, slot: u8, oid: u64, view: u64) -> Result<reader::Found, reader::Miss> {
        reader::lookup(self.w(), &self.g, slot, oid, view)
    }
}

/// What [`ArenaWriter::recover`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Database slots kept.
    pub databases: u64,
    /// Database slots freed because their CRC failed.
    pub damaged_databases: u64,
    /// Segments in use.
    pub segments: u64,
    /// Whether the file was last served in another boot (see
    /// [`ArenaWriter::recover`]): horizons and open revisions were dropped.
    pub rebooted: bool,
    /// Records dropped at once because of a reboot (open, or failing their
    /// CRC); 0 otherwise.
    pub discarded: u64,
}

/// Writes this boot's id into the header ([`header::BOOT_ID`]).
fn store_boot_id(w: &[AtomicU64]) {
    let id = super::boot::current();
    w[header::BOOT_ID].store(id[0], Ordering::Relaxed);
    w[header::BOOT_ID + 1].store(id[1], Ordering::Relaxed);
}

/// What [`ArenaWriter::remove_where`] shows of a record.
#[derive(Debug, Clone, Copy)]
pub struct RecordInfo {
    /// Database slot.
    pub slot: u8,
    /// Generation of the database when written.
    pub generation: u8,
    /// Oid.
    pub oid: u64,
    /// Serial.
    pub serial: u64,
    /// End ([`OPEN`] while current).
    pub end: u64,
}

fn info(h: Header) -> RecordInfo {
    RecordInfo {
        slot: layout::key_slot(h.key),
        generation: layout::key_generation(h.key),
        oid: layout::key_oid(h.key),
        serial: h.serial,
        end: h.end,
    }
}

/// The bytes a database key is stored as.
fn stored_key(key: &str) -> Vec<u8> {
    if key.len() <= layout::MAX_KEY_BYTES {
        return key.as_bytes().to_vec();
    }
    let crc = crc32fast::hash(key.as_bytes());
    let mut s = format!("crc:{crc:08x}:").into_bytes();
    s.extend_from_slice(&key.as_bytes()[..layout::MAX_KEY_BYTES - s.len()]);
    s
}

/// CRC-32 of a database slot's words and key.
pub(crate) fn slot_crc(w: &[AtomicU64], g: &Geometry, slot: u8) -> u32 {
    let base = g.db_slot_word(slot);
    let len = (w[base + db_slot::KEY_LEN].load(Ordering::Relaxed) as usize).min(layout::MAX_KEY_BYTES);
    layout::words_crc(
        [db_slot::STATE, db_slot::HORIZON, db_slot::KEY_LEN]
            .into_iter()
            .chain((0..len.div_ceil(8)).map(|i| db_slot::KEY + i))
            .map(|i| w[base + i].load(Ordering::Relaxed)),
    )
}
