//! The lock-free read path: finds the revision of an oid visible at a view
//! in an arena's words, as any process that maps the file does, without a
//! system call and without writing anything.
//!
//! Validation, in order (anything that fails is a miss):
//!
//! 1. the header's `LIVE` word is 1;
//! 2. the database slot holds the database the reader attached to: its
//!    state word (Acquire) is in use with the identity the reader was given
//!    ([`Slot`]); then its horizon `H` is loaded (Acquire) *before* any
//!    record, so every closing the writer made before publishing `H` is
//!    seen (the same protocol as `SnapshotCache`); then the state word
//!    again, which must be unchanged: `H` belongs to that database and
//!    generation (the writer clears the horizon before it changes the
//!    state word, and publishes a horizon only after the state it belongs
//!    to; see [`super::slots`]);
//! 3. each pointer followed is in bounds and its segment's generation word
//!    (Acquire) still holds the pointer's generation;
//! 4. after copying a record (header, and state when it matches), an
//!    Acquire fence and a second load of the generation must give the same
//!    value: the segment was not recycled during the copy (a seqlock per
//!    segment; H.-J. Boehm, "Can seqlocks get along with programming
//!    language memory models?", MSPC 2012);
//! 5. the record's CRC-32 (key, serial, end, length, state) matches;
//! 6. the revision is visible: `serial <= V` and either `V < end`, or the
//!    revision is open and `V <= H` (invariants 1 and 2).
//!
//! Records are written once; the writer changes a linked record in place
//! only to close it (`end`, then the CRC word) or to relink its `next`. A
//! reader that sees a mix of old and new `end`/CRC fails step 5.

use super::layout::{self, db_slot, header, record, segment, Geometry, OPEN};
use super::slots::{self, Slot};
use crate::sync::{fence, AtomicU64, Ordering};

/// A revision found by a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Serial of the revision.
    pub serial: u64,
    /// End of its validity, `None` while it is current.
    pub end: Option<u64>,
    /// The state.
    pub state: Vec<u8>,
}

/// Why a lookup missed, for counters and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// The arena is retired or not yet live.
    NotLive,
    /// The database slot is free, holds another database than the one
    /// attached to, or has no horizon yet.
    NoDatabase,
    /// The oid is over 48 bits.
    OidTooLarge,
    /// No revision of the oid visible at the view is cached.
    Absent,
    /// A record could not be validated (recycled segment, torn copy, CRC).
    Invalid,
}

/// The generation and horizon of database slot `slot`: `None` if the slot
/// no longer holds the database `slot` names (free, or given to another
/// key since), or changed while it was read.
pub fn database(words: &[AtomicU64], g: &Geometry, slot: Slot) -> Option<(u8, u64)> {
    database_stepped(words, g, slot, |_| {})
}

/// [`database`] calling `between(step)` after its first (step 0) and
/// second (step 1) load: tests put the writer's moves there to check every
/// interleaving. Not for use by readers.
#[doc(hidden)]
#[inline(always)]
pub fn database_stepped(
    words: &[AtomicU64],
    g: &Geometry,
    slot: Slot,
    mut between: impl FnMut(usize),
) -> Option<(u8, u64)> {
    if u64::from(slot.index) >= g.db_slots {
        return None;
    }
    let base = g.db_slot_word(slot.index);
    let state = words[base + db_slot::STATE].load(Ordering::Acquire);
    between(0);
    let horizon = words[base + db_slot::HORIZON].load(Ordering::Acquire);
    between(1);
    let again = words[base + db_slot::STATE].load(Ordering::Acquire);
    (state == again && slot.matches(state)).then_some((slots::generation_of(state), horizon))
}

/// A visible revision found in the index, its state not yet copied.
#[derive(Debug, Clone, Copy)]
pub struct Located {
    at: usize,
    gen_word: usize,
    generation: u64,
    key: u64,
    /// Serial of the revision.
    pub serial: u64,
    end: u64,
    lencrc: u64,
}

impl Located {
    /// Length of the state, bytes.
    pub fn len(&self) -> usize {
        (self.lencrc & layout::LENGTH_MASK) as usize
    }

    /// Whether the state is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// End of validity, `None` while current.
    pub fn end(&self) -> Option<u64> {
        (self.end != OPEN).then_some(self.end)
    }

    /// Copies the state into `buf` (of [`Located::len`] bytes) and
    /// validates the copy: the segment was not recycled meanwhile and the
    /// CRC matches. `false`: a miss (`buf` holds garbage).
    pub fn copy_to(&self, words: &[AtomicU64], buf: &mut [u8]) -> bool {
        self.copy_unchecked(words, buf)
            && layout::record_crc(self.key, self.serial, self.end, buf) == (self.lencrc >> 32) as u32
    }

    /// [`Located::copy_to`] without the CRC: the generation protocol alone
    /// (the seqlock), for the loom model that shows it needs no checksum to
    /// reject a torn copy. Not for use by readers.
    #[doc(hidden)]
    pub fn copy_unchecked(&self, words: &[AtomicU64], buf: &mut [u8]) -> bool {
        let len = self.len();
        if buf.len() != len {
            return false;
        }
        let first = self.at + layout::RECORD_HEADER_WORDS;
        let state = &words[first..first + len.div_ceil(8)];
        // Whole words with fixed-size copies (one move each; a copy of a
        // run-time length per word cost 4 ns a word, measured from Python:
        // 5.6 us for an 8 KiB hit), then the last partial word.
        let (body, tail) = buf.split_at_mut(len & !7);
        for (dst, w) in body.chunks_exact_mut(8).zip(state) {
            dst.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
        }
        if !tail.is_empty() {
            let last = state[state.len() - 1].load(Ordering::Relaxed).to_ne_bytes();
            tail.copy_from_slice(&last[..tail.len()]);
        }
        fence(Ordering::Acquire);
        words[self.gen_word].load(Ordering::Relaxed) == self.generation
    }
}

/// Looks up the revision of `oid` visible at `view` in database slot
/// `slot` (which must still hold the database of `slot.identity`); `Err`
/// says why it missed.
pub fn lookup(words: &[AtomicU64], g: &Geometry, slot: Slot, oid: u64, view: u64) -> Result<Found, Miss> {
    let found = locate_visible(words, g, slot, oid, view)?;
    let mut state = vec![0u8; found.len()];
    if !found.copy_to(words, &mut state) {
        return Err(Miss::Invalid);
    }
    Ok(Found {
        serial: found.serial,
        end: found.end(),
        state,
    })
}

/// Finds the revision of `oid` visible at `view` in slot `slot` (steps 1
/// to 4 and 6 of the module documentation); [`Located::copy_to`] does the
/// rest.
pub fn locate_visible(words: &[AtomicU64], g: &Geometry, slot: Slot, oid: u64, view: u64) -> Result<Located, Miss> {
    if words[header::LIVE].load(Ordering::Acquire) != 1 {
        return Err(Miss::NotLive);
    }
    let (generation, horizon) = database(words, g, slot).ok_or(Miss::NoDatabase)?;
    if horizon == 0 {
        return Err(Miss::NoDatabase);
    }
    let key = layout::key(slot.index, generation, oid).ok_or(Miss::OidTooLarge)?;
    let mut p = words[g.bucket_word_of(key)].load(Ordering::Acquire);
    for _ in 0..layout::MAX_CHAIN {
        if p == 0 {
            return Err(Miss::Absent);
        }
        let (pgen, offset) = layout::unpoint(p);
        let seg = g.locate(offset).ok_or(Miss::Invalid)?;
        let gen_word = g.segment_word(seg) + segment::GENERATION;
        let g1 = words[gen_word].load(Ordering::Acquire);
        if g1 & 0xffff_ffff != pgen || g1 & 1 == 1 {
            return Err(Miss::Invalid);
        }
        let at = (g.data_word + offset) as usize;
        let next = words[at + record::NEXT].load(Ordering::Acquire);
        let rkey = words[at + record::KEY].load(Ordering::Relaxed);
        let serial = words[at + record::SERIAL].load(Ordering::Relaxed);
        let end = words[at + record::END].load(Ordering::Relaxed);
        let lencrc = words[at + record::LENGTH].load(Ordering::Relaxed);
        let visible = rkey == key && serial <= view && if end == OPEN { view <= horizon } else { view < end };
        if !visible {
            fence(Ordering::Acquire);
            if words[gen_word].load(Ordering::Relaxed) != g1 {
                return Err(Miss::Invalid);
            }
            p = next;
            continue;
        }
        let len = (lencrc & layout::LENGTH_MASK) as usize;
        if offset % g.segment_words + (layout::RECORD_HEADER_WORDS + len.div_ceil(8)) as u64 > g.segment_words {
            return Err(Miss::Invalid);
        }
        return Ok(Located {
            at,
            gen_word,
            generation: g1,
            key,
            serial,
            end,
            lencrc,
        });
    }
    Err(Miss::Invalid)
}
