//! The arena's single writer (the sidecar): databases, records, chains,
//! eviction and recovery, one concern per file:
//!
//! - this file: [`ArenaWriter`] itself, creating an arena, the database
//!   operations (which check the slot's identity, see
//!   [`super::slots`]) and the counters;
//! - `chains.rs`: records and their bucket chains (read, write, link,
//!   close, remove);
//! - `eviction.rs`: segments, the S3-FIFO rings and the ghost list;
//! - `recovery.rs`: re-attaching a file a previous run left, and verifying
//!   its records.

use super::layout::{self, header, record, segment, Geometry, LayoutError, Ring, OPEN};
use super::slots::{stored_key, Slot, SlotTable};
use super::Memory;
use crate::crash;
use crate::sync::{fence, AtomicU64, Ordering};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

mod chains;
mod eviction;
mod recovery;

use eviction::Ghost;

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
    /// The database slots: leases, low-water marks, identities.
    slots: SlotTable,
    small_entries: u64,
    main_entries: u64,
    /// Segments of a reopened file not verified yet: their records are not
    /// in the counts until [`ArenaWriter::verify_segment`] counts them.
    unverified: Vec<bool>,
    /// Entries and state bytes per database slot.
    usage: Vec<(u64, u64)>,
    /// Per database slot: revisions eviction dropped for room, and those
    /// it dropped because no registered view could see them (`end` at or
    /// below the low-water mark). Reset when the slot gets a new key.
    dropped: Vec<Dropped>,
    /// Per database slot: the open revisions with the highest serials that
    /// the verification of a reopened file found, `(serial, oid)`, at most
    /// [`RECOVERED_OPEN`] (the attach rule's open sample after a restart).
    recovered_open: Vec<std::collections::BTreeSet<(u64, u64)>>,
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
        let mut writer = Self::empty(memory, g, incarnation);
        writer.free = (0..g.segments).rev().collect();
        writer
    }

    fn empty(memory: Arc<Memory>, g: Geometry, seed: u64) -> Self {
        ArenaWriter {
            memory,
            g,
            policy: Policy::S3Fifo,
            small: VecDeque::new(),
            main: VecDeque::new(),
            free: Vec::new(),
            order: 0,
            ghost: Ghost::default(),
            slots: SlotTable::new(g, seed),
            small_entries: 0,
            main_entries: 0,
            unverified: vec![false; g.segments as usize],
            usage: vec![(0, 0); 256],
            dropped: vec![Dropped::default(); 256],
            recovered_open: vec![Default::default(); 256],
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

    // ----- databases (the slot table itself is super::slots) -----------

    /// The slot of database `key`: the one holding it already, else a free
    /// one (its generation bumped, a new identity, no horizon), else one no
    /// handle of this run holds ([`ArenaWriter::lease`]): a database the
    /// previous run left in the file, or one the sidecar dropped; the one
    /// with the fewest revisions is released (its revisions removed) and
    /// given to `key`. `None` if every slot is leased. Keys over
    /// [`layout::MAX_KEY_BYTES`] are stored by prefix and CRC-32.
    pub fn attach_database(&mut self, key: &str) -> Option<Slot> {
        let stored = stored_key(key);
        if let Some(slot) = self.slots.find(self.memory.words(), &stored) {
            return Some(slot);
        }
        let index = match self.slots.free(self.memory.words()) {
            Some(index) => index,
            None => {
                let victim = self
                    .slots
                    .unleased(self.memory.words())
                    .min_by_key(|s| self.usage[s.index as usize].0)?;
                self.release_database(victim);
                victim.index
            }
        };
        self.dropped[index as usize] = Dropped::default();
        self.recovered_open[index as usize].clear();
        Some(self.slots.assign(self.memory.words(), index, &stored))
    }

    /// Counts a handle on `slot` (an [`super::ArenaCache`]): a leased slot
    /// is never freed for another key by [`ArenaWriter::attach_database`].
    pub fn lease(&mut self, slot: Slot) {
        self.slots.lease(self.memory.words(), slot);
    }

    /// Drops a handle's count on `slot` (nothing if it was released since).
    pub fn unlease(&mut self, slot: Slot) {
        self.slots.unlease(self.memory.words(), slot);
    }

    /// Whether `slot` still holds the database it was given for (not
    /// released, not given to another key since).
    pub fn holds(&self, slot: Slot) -> bool {
        self.slots.holds(self.w(), slot)
    }

    /// The slot `index` as a handle, if it is in use (tests, tools).
    pub fn slot(&self, index: u8) -> Option<Slot> {
        if u64::from(index) >= self.g.db_slots {
            return None;
        }
        self.slots.current(self.w(), index)
    }

    /// Frees a database's slot and unlinks its revisions. `false` (nothing
    /// done) if the slot no longer holds that database.
    pub fn release_database(&mut self, slot: Slot) -> bool {
        if !self.slots.release(self.memory.words(), slot) {
            return false;
        }
        crash::point(crash::SLOT_RELEASED);
        self.remove_where(|r| r.slot == slot.index);
        true
    }

    /// Current generation of slot `index`.
    fn generation(&self, index: u8) -> u8 {
        self.slots.generation(self.w(), index)
    }

    /// Publishes a database's horizon (Release): call after every closing
    /// it covers. `false` (nothing written) if the slot no longer holds
    /// that database.
    pub fn publish_horizon(&self, slot: Slot, horizon: u64) -> bool {
        self.slots.publish_horizon(self.w(), slot, horizon)
    }

    /// The horizon published for `slot`, 0 if none or if the slot no longer
    /// holds that database.
    pub fn horizon(&self, slot: Slot) -> u64 {
        if self.holds(slot) {
            self.slots.horizon(self.w(), slot.index)
        } else {
            0
        }
    }

    /// Restarts a database's log at `horizon`: its open revisions are
    /// removed (their validity after the old horizon is unknown), then the
    /// horizon is published. `false` (nothing done) if the slot no longer
    /// holds that database.
    pub fn restart_database(&mut self, slot: Slot, horizon: u64) -> bool {
        if !self.holds(slot) {
            return false;
        }
        self.remove_where(|r| r.slot == slot.index && r.end == OPEN);
        crash::point(crash::RESYNC_DROPPED);
        self.publish_horizon(slot, horizon)
    }

    /// Drops every revision of a database at once: its generation is bumped
    /// (readers stop matching old keys), its horizon cleared, and its
    /// records unlinked; the slot gets a new identity (see
    /// [`super::slots`]), returned as its new handle. `None` (nothing done)
    /// if the slot no longer holds that database.
    pub fn flush_database(&mut self, slot: Slot) -> Option<Slot> {
        let new = self.slots.flush(self.memory.words(), slot)?;
        crash::point(crash::FLUSH_GENERATION);
        self.remove_where(|r| r.slot == slot.index);
        Some(new)
    }

    /// Closed revisions of `slot` ending at or below `low_water` are
    /// invisible to every view (invariant 5): eviction drops them first.
    /// `false` (nothing set) if the slot no longer holds that database.
    pub fn set_low_water(&mut self, slot: Slot, low_water: u64) -> bool {
        self.slots.set_low_water(self.memory.words(), slot, low_water)
    }

    /// The low-water mark of `slot` (see [`ArenaWriter::set_low_water`]; 0
    /// when none is set, or the slot no longer holds that database).
    pub fn low_water(&self, slot: Slot) -> u64 {
        if self.holds(slot) {
            self.slots.low_water(slot.index)
        } else {
            0
        }
    }

    /// Removes the record at `at`, a revision no registered view can see
    /// (closed at or below its database's low-water mark, invariant 5),
    /// counted as reclaimed in its database's [`Dropped`]: what stores and
    /// reports do to the chain of the oid they write, so chains hold what
    /// views can see whatever the store pattern.
    pub fn reclaim_record(&mut self, at: usize) {
        let key = self.header_at(at).key;
        if self.unlink(at) {
            self.stats.removed += 1;
            self.dropped[layout::key_slot(key) as usize].reclaimed += 1;
        }
    }

    /// Entries and state bytes of database slot `index`.
    pub fn slot_usage(&self, index: u8) -> (u64, u64) {
        self.usage[index as usize]
    }

    /// The open revisions of `slot` with the highest serials that the
    /// verification of a reopened file found, `(serial, oid)`, highest
    /// first; `None` while segments are left to verify (the list is not
    /// complete yet). Empty for a file created by this run.
    pub fn recovered_open(&self, slot: Slot) -> Option<Vec<(u64, u64)>> {
        if !self.holds(slot) || self.unverified.iter().any(|&u| u) {
            return None;
        }
        Some(self.recovered_open[slot.index as usize].iter().rev().copied().collect())
    }

    /// What eviction dropped of database slot `index` since the slot got
    /// its key.
    pub fn slot_dropped(&self, index: u8) -> Dropped {
        self.dropped[index as usize]
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
}

/// Open revisions per database that the verification of a reopened file
/// remembers (see [`ArenaWriter::recovered_open`]).
pub const RECOVERED_OPEN: usize = 16;

/// Revisions of one database that eviction dropped (see
/// [`ArenaWriter::slot_dropped`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Dropped to make room (not read since their last pass).
    pub evicted: u64,
    /// Dropped because no registered view could see them any more
    /// (invariant 5: `end` at or below the low-water mark).
    pub reclaimed: u64,
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
    let id = crate::arena::boot::current();
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
