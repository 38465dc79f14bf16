//! Allocation and S3-FIFO eviction: segments, rings, the ghost list,
//! promotion and the per-slot counts.
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

use super::*;
use crate::arena::slots;

/// Keys recently evicted from small, at most `cap` of them.
#[derive(Default)]
pub(super) struct Ghost {
    order: VecDeque<u64>,
    count: HashMap<u64, u32>,
}

impl Ghost {
    pub(super) fn add(&mut self, key: u64, cap: usize) {
        self.order.push_back(key);
        *self.count.entry(key).or_default() += 1;
        while self.order.len() > cap.max(1) {
            if let Some(old) = self.order.pop_front() {
                self.forget(old);
            }
        }
    }
    pub(super) fn forget(&mut self, key: u64) {
        if let Some(c) = self.count.get_mut(&key) {
            *c -= 1;
            if *c == 0 {
                self.count.remove(&key);
            }
        }
    }
    /// Whether `key` is a ghost; the entry stays until it ages out.
    pub(super) fn contains(&self, key: u64) -> bool {
        self.count.contains_key(&key)
    }
}

impl ArenaWriter {
    // ----- segments ----------------------------------------------------

    /// Room for `words` words in `ring`'s head segment, taking a new segment
    /// (and evicting) when the head is full. `None` if a record that size
    /// never fits.
    pub(super) fn allocate(&mut self, ring: Ring, words: usize) -> Option<usize> {
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
    pub(super) fn bump(&mut self, ring: Ring, words: usize) -> Option<usize> {
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

    pub(super) fn open_segment(&mut self, seg: u64, ring: Ring) {
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
    pub(super) fn evict_one(&mut self) -> bool {
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
        let mut reclaimed = Vec::new();
        self.each_record(seg, |at, h| {
            if !h.unlinked() {
                let worth = self.worth_keeping(&h);
                if policy == Policy::S3Fifo && worth && h.freq() > 0 {
                    keep.push(at);
                } else {
                    drop.push((at, h.key));
                    reclaimed.push(!worth && h.end != OPEN);
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
        crash::point(crash::EVICT_COPIED);
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
        crash::point(crash::EVICT_UNLINKED);
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
        for ((_, key), invisible) in drop.iter().zip(reclaimed) {
            let d = &mut self.dropped[layout::key_slot(*key) as usize];
            if invisible {
                d.reclaimed += 1;
            } else {
                d.evicted += 1;
            }
        }
        self.w()[base + segment::META].store(0, Ordering::Relaxed);
        self.free.push(seg);
        true
    }

    /// Whether a record is still of use: its database is in use at its
    /// generation, and a view may still see it.
    pub(super) fn worth_keeping(&self, h: &Header) -> bool {
        let slot = layout::key_slot(h.key);
        let state = self.slots.state(self.w(), slot);
        slots::in_use(state)
            && slots::generation_of(state) == layout::key_generation(h.key)
            && (h.end == OPEN || h.end > self.slots.low_water(slot))
    }

    /// Copies the record at `at` to main's head with frequency `freq` and
    /// links the copy (the original is unlinked by the caller).
    pub(super) fn copy_to_main(&mut self, at: usize, freq: u64) {
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
    pub(super) fn account(&mut self, at: usize, key: u64, len: usize, n: i64) {
        let seg = (at as u64 - self.g.data_word) / self.g.segment_words;
        if !self.unverified[seg as usize] {
            self.tally(at, key, len, n);
        }
    }

    /// [`ArenaWriter::account`] whatever the segment's state.
    pub(super) fn tally(&mut self, at: usize, key: u64, len: usize, n: i64) {
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
            // Saturating: removal walks the chains, so it can reach a record
            // of a reopened file that verification never counted (one past
            // a damaged length word, where a walk of its segment stops).
            self.stats.entries = self.stats.entries.saturating_sub(1);
            self.stats.state_bytes = self.stats.state_bytes.saturating_sub(len);
            self.stats.record_bytes = self.stats.record_bytes.saturating_sub(words);
            usage.0 = usage.0.saturating_sub(1);
            usage.1 = usage.1.saturating_sub(len);
        }
    }

    /// Counts a read of revision `(oid, serial)` of `slot` (a hit a client
    /// reported): eviction keeps what is read.
    pub fn touch(&self, slot: Slot, oid: u64, serial: u64) {
        if let Some(&(at, _, _)) = self.revisions(slot, oid).iter().find(|r| r.1 == serial) {
            let word = &self.w()[at + record::LENGTH];
            let _ = word.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                (v & FREQ_MASK != FREQ_MASK).then_some(v + (1 << FREQ_SHIFT))
            });
        }
    }

    /// Room in main's head, taking a free segment (never evicting: eviction
    /// is what calls this).
    pub(super) fn bump_or_take(&mut self, words: usize) -> Option<usize> {
        if let Some(at) = self.bump(Ring::Main, words) {
            return Some(at);
        }
        let seg = self.free.pop()?;
        self.open_segment(seg, Ring::Main);
        self.bump(Ring::Main, words)
    }
}
