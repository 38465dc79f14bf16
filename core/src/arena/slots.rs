//! Database slots: the table of the arena that gives each database key a
//! slot number, a generation and an identity, and the one place that
//! assigns, leases, flushes, releases and recovers them.
//!
//! A slot's state word is `identity << 16 | 1 << 8 | generation` while it
//! holds a database, and `generation` alone once free:
//!
//! - the **generation** (8 bits) is part of every record key of the
//!   database: a flush bumps it, so no old record matches any more;
//! - the **identity** (48 bits, never 0) is chosen at random each time the
//!   slot is assigned to a key. A holder of a [`Slot`] (an
//!   [`super::ArenaCache`], a client that attached) names the identity it
//!   was given; every read ([`super::reader`]) and every write of the
//!   writer checks it against the state word, so a slot freed and given to
//!   another database (by `--max-databases`, or a restart that found the
//!   slot damaged) is never read or written through an old handle.
//!
//! Write order, for readers that load the state word, then the horizon,
//! then the state word again (and miss unless both state loads agree): any
//! change of the state word (assign, flush, release) is preceded by a
//! store of horizon 0, and every horizon is published after the state it
//! belongs to. So a reader whose two state loads agree holds a horizon of
//! that state's database and generation, or 0 (a miss).
//!
//! **Leases**: the writer counts the handles ([`super::ArenaCache`]) a run
//! holds on each slot. A slot in use with no lease (a database the
//! previous run left in the file that no client claimed yet, or one whose
//! handle was dropped) may be freed for a new key when no slot is free:
//! [`super::ArenaWriter::attach_database`] does so, the slot with the
//! fewest revisions first.

use super::layout::{self, db_slot, Geometry};
use crate::crash;
use crate::sync::{AtomicU64, Ordering};
use std::hash::{BuildHasher, Hasher};

/// Bits 8..16 of a state word hold 1 while the slot is in use.
pub const IN_USE: u64 = 1 << 8;

/// Mask of the identity (after shifting it down by 16 bits).
pub const IDENTITY_MASK: u64 = (1 << 48) - 1;

/// A database slot as its holder knows it: the slot number and the
/// identity it was given when the slot was assigned to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot {
    /// Slot number, `0..db_slots`.
    pub index: u8,
    /// Identity (48 bits, not 0); 0 never matches a slot in use.
    pub identity: u64,
}

impl Slot {
    /// Whether state word `state` is that of this slot while it holds the
    /// database it was given for.
    pub fn matches(&self, state: u64) -> bool {
        in_use(state) && identity_of(state) == self.identity
    }
}

/// The state word of a slot in use.
pub fn state_word(identity: u64, generation: u8) -> u64 {
    (identity & IDENTITY_MASK) << 16 | IN_USE | u64::from(generation)
}

/// Whether a state word is that of a slot in use.
pub fn in_use(state: u64) -> bool {
    (state >> 8) & 0xff == 1
}

/// The generation in a state word.
pub fn generation_of(state: u64) -> u8 {
    state as u8
}

/// The identity in a state word (0 when free).
pub fn identity_of(state: u64) -> u64 {
    state >> 16
}

/// The writer's side of the slot table: leases, low-water marks, and the
/// source of identities. The words themselves live in the arena.
pub(crate) struct SlotTable {
    g: Geometry,
    leases: Vec<u32>,
    low_water: Vec<u64>,
    /// Random per process and seeded with the run's incarnation.
    random: std::collections::hash_map::RandomState,
    seed: u64,
    drawn: u64,
}

impl SlotTable {
    /// The table of an arena of geometry `g`; `seed` (the incarnation) is
    /// mixed into every identity.
    pub(crate) fn new(g: Geometry, seed: u64) -> Self {
        SlotTable {
            g,
            leases: vec![0; g.db_slots as usize],
            low_water: vec![0; 256],
            random: std::collections::hash_map::RandomState::new(),
            seed,
            drawn: 0,
        }
    }

    fn word<'a>(&self, w: &'a [AtomicU64], index: u8, which: usize) -> &'a AtomicU64 {
        &w[self.g.db_slot_word(index) + which]
    }

    /// Slot numbers of the table.
    pub(crate) fn indexes(&self) -> impl Iterator<Item = u8> {
        0..self.g.db_slots as u8
    }

    /// The state word of slot `index` (the writer's own view).
    pub(crate) fn state(&self, w: &[AtomicU64], index: u8) -> u64 {
        self.word(w, index, db_slot::STATE).load(Ordering::Relaxed)
    }

    /// The slot `index` as a handle, if it is in use.
    pub(crate) fn current(&self, w: &[AtomicU64], index: u8) -> Option<Slot> {
        let state = self.state(w, index);
        in_use(state).then_some(Slot {
            index,
            identity: identity_of(state),
        })
    }

    /// Whether `slot` still holds the database it was given for.
    pub(crate) fn holds(&self, w: &[AtomicU64], slot: Slot) -> bool {
        u64::from(slot.index) < self.g.db_slots && slot.matches(self.state(w, slot.index))
    }

    /// Current generation of slot `index`.
    pub(crate) fn generation(&self, w: &[AtomicU64], index: u8) -> u8 {
        generation_of(self.state(w, index))
    }

    /// The horizon published in slot `index`.
    pub(crate) fn horizon(&self, w: &[AtomicU64], index: u8) -> u64 {
        self.word(w, index, db_slot::HORIZON).load(Ordering::Relaxed)
    }

    /// The slot in use holding the key stored as `stored`.
    pub(crate) fn find(&self, w: &[AtomicU64], stored: &[u8]) -> Option<Slot> {
        self.indexes()
            .filter_map(|i| self.current(w, i))
            .find(|s| self.key(w, s.index) == stored)
    }

    /// The first free slot.
    pub(crate) fn free(&self, w: &[AtomicU64]) -> Option<u8> {
        self.indexes().find(|&i| !in_use(self.state(w, i)))
    }

    /// Slots in use that no handle of this run holds: they may be freed for
    /// another key.
    pub(crate) fn unleased<'a>(&'a self, w: &'a [AtomicU64]) -> impl Iterator<Item = Slot> + 'a {
        self.indexes()
            .filter(|&i| self.leases[i as usize] == 0)
            .filter_map(move |i| self.current(w, i))
    }

    /// A new identity: 48 random bits, not 0.
    fn draw(&mut self) -> u64 {
        self.drawn += 1;
        let mut h = self.random.build_hasher();
        h.write_u64(self.seed);
        h.write_u64(self.drawn);
        (h.finish() & IDENTITY_MASK).max(1)
    }

    /// Assigns free slot `index` to the key stored as `stored`: horizon 0,
    /// the key, then (Release) the state word with the next generation and
    /// a new identity. No lease is taken.
    pub(crate) fn assign(&mut self, w: &[AtomicU64], index: u8, stored: &[u8]) -> Slot {
        let generation = self.generation(w, index).wrapping_add(1);
        let identity = self.draw();
        self.word(w, index, db_slot::HORIZON).store(0, Ordering::Release);
        self.word(w, index, db_slot::KEY_LEN)
            .store(stored.len() as u64, Ordering::Relaxed);
        for (i, chunk) in stored.chunks(8).enumerate() {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.word(w, index, db_slot::KEY + i)
                .store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        crash::point(crash::SLOT_ASSIGNED);
        self.word(w, index, db_slot::STATE)
            .store(state_word(identity, generation), Ordering::Release);
        self.low_water[index as usize] = 0;
        self.leases[index as usize] = 0;
        self.seal(w, index);
        Slot { index, identity }
    }

    /// Frees `slot` (horizon 0 first, then the state word: free, its
    /// generation kept). `false` if it no longer holds that database.
    pub(crate) fn release(&mut self, w: &[AtomicU64], slot: Slot) -> bool {
        if !self.holds(w, slot) {
            return false;
        }
        let generation = self.generation(w, slot.index);
        self.word(w, slot.index, db_slot::HORIZON).store(0, Ordering::Release);
        self.word(w, slot.index, db_slot::STATE)
            .store(u64::from(generation), Ordering::Release);
        self.low_water[slot.index as usize] = 0;
        self.leases[slot.index as usize] = 0;
        self.seal(w, slot.index);
        true
    }

    /// Bumps the generation of `slot` and gives it a new identity (horizon 0
    /// first): no record written before matches any more, and no handle of
    /// the flushed history holds the slot. The new handle; `None` if `slot`
    /// no longer holds that database.
    pub(crate) fn flush(&mut self, w: &[AtomicU64], slot: Slot) -> Option<Slot> {
        if !self.holds(w, slot) {
            return None;
        }
        let generation = self.generation(w, slot.index).wrapping_add(1);
        // A new identity too: clients that joined the flushed history (a
        // restored backup's other processes) miss in the arena and are
        // refused on the socket until they prove the new one (invariant 7).
        let identity = self.draw();
        self.word(w, slot.index, db_slot::HORIZON).store(0, Ordering::Release);
        self.word(w, slot.index, db_slot::STATE)
            .store(state_word(identity, generation), Ordering::Release);
        self.seal(w, slot.index);
        Some(Slot {
            index: slot.index,
            identity,
        })
    }

    /// Publishes `horizon` (Release) in `slot`. `false` (nothing written)
    /// if it no longer holds that database.
    pub(crate) fn publish_horizon(&self, w: &[AtomicU64], slot: Slot, horizon: u64) -> bool {
        if !self.holds(w, slot) {
            return false;
        }
        self.word(w, slot.index, db_slot::HORIZON)
            .store(horizon, Ordering::Release);
        crash::point(crash::HORIZON_STORED);
        self.seal(w, slot.index);
        crash::point(crash::SLOT_SEALED);
        true
    }

    /// Counts a handle on `slot` (it must hold its database).
    pub(crate) fn lease(&mut self, w: &[AtomicU64], slot: Slot) {
        if self.holds(w, slot) {
            self.leases[slot.index as usize] += 1;
        }
    }

    /// Drops a handle's count on `slot`; nothing if the slot was released
    /// (or given to another database) since.
    pub(crate) fn unlease(&mut self, w: &[AtomicU64], slot: Slot) {
        if self.holds(w, slot) {
            let n = &mut self.leases[slot.index as usize];
            *n = n.saturating_sub(1);
        }
    }

    /// Handles this run holds on slot `index`.
    #[cfg(test)]
    pub(crate) fn leases(&self, index: u8) -> u32 {
        self.leases[index as usize]
    }

    /// Sets the low-water mark of `slot`; `false` if it no longer holds
    /// that database.
    pub(crate) fn set_low_water(&mut self, w: &[AtomicU64], slot: Slot, low_water: u64) -> bool {
        if !self.holds(w, slot) {
            return false;
        }
        self.low_water[slot.index as usize] = low_water;
        true
    }

    /// The low-water mark of slot `index` (0 when none).
    pub(crate) fn low_water(&self, index: u8) -> u64 {
        self.low_water[index as usize]
    }

    /// After a restart: keeps the slots whose CRC matches (unleased, so
    /// they may be freed for new keys) and frees the others. Returns
    /// `(kept, freed)`.
    pub(crate) fn recover(&mut self, w: &[AtomicU64]) -> (u64, u64) {
        let (mut kept, mut freed) = (0, 0);
        for index in self.indexes() {
            let state = self.state(w, index);
            if !in_use(state) {
                continue;
            }
            if self.word(w, index, db_slot::CRC).load(Ordering::Relaxed) == u64::from(slot_crc(w, &self.g, index)) {
                kept += 1;
            } else {
                self.word(w, index, db_slot::HORIZON).store(0, Ordering::Release);
                self.word(w, index, db_slot::STATE)
                    .store(u64::from(generation_of(state)), Ordering::Release);
                self.seal(w, index);
                freed += 1;
            }
        }
        (kept, freed)
    }

    /// Recomputes the slot's CRC word (checked when a file is reopened).
    fn seal(&self, w: &[AtomicU64], index: u8) {
        let crc = slot_crc(w, &self.g, index);
        self.word(w, index, db_slot::CRC)
            .store(u64::from(crc), Ordering::Relaxed);
    }

    /// The stored key of slot `index`.
    pub(crate) fn key(&self, w: &[AtomicU64], index: u8) -> Vec<u8> {
        let len = (self.word(w, index, db_slot::KEY_LEN).load(Ordering::Relaxed) as usize).min(layout::MAX_KEY_BYTES);
        let mut key: Vec<u8> = (0..len.div_ceil(8))
            .flat_map(|i| {
                self.word(w, index, db_slot::KEY + i)
                    .load(Ordering::Relaxed)
                    .to_le_bytes()
            })
            .collect();
        key.truncate(len);
        key
    }
}

/// The bytes a database key is stored as: itself up to
/// [`layout::MAX_KEY_BYTES`], else `crc:XXXXXXXX:` and its first bytes.
pub(crate) fn stored_key(key: &str) -> Vec<u8> {
    if key.len() <= layout::MAX_KEY_BYTES {
        return key.as_bytes().to_vec();
    }
    let crc = crc32fast::hash(key.as_bytes());
    let mut s = format!("crc:{crc:08x}:").into_bytes();
    s.extend_from_slice(&key.as_bytes()[..layout::MAX_KEY_BYTES - s.len()]);
    s
}

/// CRC-32 of a database slot's words (state with its identity, horizon,
/// key length) and key.
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

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn table() -> (Vec<AtomicU64>, SlotTable) {
        let g = Geometry::small(8, 64);
        let words = (0..g.words()).map(|_| AtomicU64::new(0)).collect();
        (words, SlotTable::new(g, 7))
    }

    #[test]
    fn an_assigned_slot_is_found_by_its_key_and_has_an_identity() {
        let (w, mut t) = table();
        let a = t.assign(&w, 0, b"a");
        assert!(a.identity != 0 && t.holds(&w, a));
        assert_eq!(t.find(&w, b"a"), Some(a));
        assert_eq!(t.find(&w, b"b"), None);
        assert_eq!(t.free(&w), Some(1));
        assert_eq!(t.generation(&w, 0), 1);
        assert!(t.publish_horizon(&w, a, 42));
        assert_eq!(t.horizon(&w, 0), 42);
    }

    #[test]
    fn a_released_slot_refuses_its_old_handle_and_gets_a_new_identity() {
        let (w, mut t) = table();
        let a = t.assign(&w, 0, b"a");
        t.publish_horizon(&w, a, 42);
        assert!(t.release(&w, a));
        assert_eq!(t.horizon(&w, 0), 0);
        assert!(!t.holds(&w, a));
        assert!(!t.release(&w, a), "released once");
        let b = t.assign(&w, 0, b"b");
        assert_eq!(b.index, a.index);
        assert_ne!(b.identity, a.identity);
        assert_eq!(t.generation(&w, 0), 2, "the generation moves on");
        assert!(!t.publish_horizon(&w, a, 99), "the old handle writes nothing");
        assert!(t.flush(&w, a).is_none());
        assert!(!t.set_low_water(&w, a, 5));
        assert_eq!(t.horizon(&w, 0), 0);
        assert!(t.holds(&w, b));
    }

    #[test]
    fn a_flush_bumps_the_generation_and_gives_a_new_identity() {
        let (w, mut t) = table();
        let a = t.assign(&w, 2, b"a");
        t.publish_horizon(&w, a, 42);
        let b = t.flush(&w, a).unwrap();
        // Handles of the flushed history no longer hold the slot.
        assert!(!t.holds(&w, a) && t.holds(&w, b));
        assert_eq!(b.index, a.index);
        assert_ne!(b.identity, a.identity);
        assert_eq!((t.generation(&w, 2), t.horizon(&w, 2)), (2, 0));
    }

    #[test]
    fn leases_keep_a_slot_from_being_freed_for_another_key() {
        let (w, mut t) = table();
        let a = t.assign(&w, 0, b"a");
        let b = t.assign(&w, 1, b"b");
        t.lease(&w, a);
        assert_eq!(t.unleased(&w).collect::<Vec<_>>(), vec![b]);
        t.unlease(&w, a);
        assert_eq!(t.unleased(&w).count(), 2);
        // A lease taken on a handle that was released since counts nothing.
        t.release(&w, a);
        t.lease(&w, a);
        assert_eq!(t.leases(0), 0);
    }

    #[test]
    fn recovery_keeps_sound_slots_unleased_and_frees_damaged_ones() {
        let (w, mut t) = table();
        let a = t.assign(&w, 0, b"a");
        let b = t.assign(&w, 1, b"b");
        t.lease(&w, a);
        t.publish_horizon(&w, b, 9);
        // A kill between the horizon and the reseal: the CRC fails.
        w[t.g.db_slot_word(1) + db_slot::HORIZON].store(10, Ordering::Relaxed);
        let mut again = SlotTable::new(t.g, 8);
        assert_eq!(again.recover(&w), (1, 1));
        assert!(again.holds(&w, a));
        assert!(!again.holds(&w, b));
        assert_eq!(again.unleased(&w).collect::<Vec<_>>(), vec![a], "no run holds it yet");
        let c = again.assign(&w, 1, b"c");
        assert_ne!(c.identity, b.identity);
    }

    #[test]
    fn long_keys_are_stored_by_prefix_and_crc() {
        let long = "k".repeat(1000);
        let s = stored_key(&long);
        assert_eq!(s.len(), layout::MAX_KEY_BYTES);
        assert!(s.starts_with(b"crc:"));
        assert_ne!(stored_key(&"k".repeat(999)), s);
        assert_eq!(stored_key("short"), b"short");
    }
}
