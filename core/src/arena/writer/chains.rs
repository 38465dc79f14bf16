//! Records and their chains: reading headers, walking a bucket's chain,
//! writing, linking, closing and removing records.

use super::*;

impl ArenaWriter {
    pub(super) fn header_at(&self, at: usize) -> Header {
        let w = self.w();
        Header {
            next: w[at + record::NEXT].load(Ordering::Relaxed),
            key: w[at + record::KEY].load(Ordering::Relaxed),
            serial: w[at + record::SERIAL].load(Ordering::Relaxed),
            end: w[at + record::END].load(Ordering::Relaxed),
            length: w[at + record::LENGTH].load(Ordering::Relaxed),
        }
    }

    pub(super) fn state_at(&self, at: usize, len: usize) -> Vec<u8> {
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
    pub(super) fn resolve(&self, p: u64) -> Option<usize> {
        let (pgen, offset) = layout::unpoint(p);
        let seg = self.g.locate(offset)?;
        let generation = self.w()[self.g.segment_word(seg) + segment::GENERATION].load(Ordering::Relaxed);
        let at = (self.g.data_word + offset) as usize;
        // A record whose length runs past its segment is damaged (a
        // reopened file): never read past the segment, as a reader would not.
        let fits = offset % self.g.segment_words + layout::record_words(self.header_at(at).len()) as u64
            <= self.g.segment_words;
        (generation & 0xffff_ffff == pgen && generation & 1 == 0 && fits).then_some(at)
    }

    /// Walks the chain of `key`'s bucket: `(holder word, record word)` of
    /// every record in it. A stale or cyclic chain is cut where it goes bad.
    pub(super) fn chain(&self, key: u64) -> Vec<(usize, usize)> {
        self.walk(self.g.bucket_word_of(key))
    }

    /// Walks the chain that starts at bucket word `holder` (see
    /// [`ArenaWriter::chain`]).
    pub(super) fn walk(&self, mut holder: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
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

    /// The revisions of `oid` in `slot`: `(record word, serial, end)`;
    /// none if the slot no longer holds that database.
    pub fn revisions(&self, slot: Slot, oid: u64) -> Vec<(usize, u64, u64)> {
        if !self.holds(slot) {
            return Vec::new();
        }
        let Some(key) = layout::key(slot.index, self.generation(slot.index), oid) else {
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
    /// CRC; publish the horizon afterwards). A record of a reopened file not
    /// verified yet is checked first: a damaged one is removed instead (a
    /// new CRC over its damaged bytes would make them a hit).
    pub fn set_end(&mut self, at: usize, end: u64) {
        let h = self.header_at(at);
        let state = self.state_at(at, h.len());
        let seg = (at as u64 - self.g.data_word) / self.g.segment_words;
        if self.unverified[seg as usize]
            && layout::record_crc(h.key, h.serial, h.end, &state) != (h.length >> 32) as u32
        {
            self.remove(at);
            return;
        }
        let crc = layout::record_crc(h.key, h.serial, end, &state);
        let w = self.w();
        w[at + record::END].store(end, Ordering::Relaxed);
        crash::point(crash::CLOSE_END);
        let length = (h.length & !(0xffff_ffffu64 << 32)) | u64::from(crc) << 32;
        w[at + record::LENGTH].store(length, Ordering::Relaxed);
    }

    /// Writes a revision of `oid` in `slot` and links it (Release). The
    /// caller has checked that no record of the same serial is linked.
    ///
    /// # Errors
    /// [`NotWritten`]: the state or oid is too large, or the slot no longer
    /// holds that database (released, or given to another key since).
    pub fn insert(&mut self, slot: Slot, oid: u64, serial: u64, end: u64, state: &[u8]) -> Result<(), NotWritten> {
        if !self.holds(slot) {
            return Err(NotWritten::NoDatabase);
        }
        if state.len() > self.g.max_state_bytes() {
            return Err(NotWritten::TooLarge);
        }
        let key = layout::key(slot.index, self.generation(slot.index), oid).ok_or(NotWritten::OidTooLarge)?;
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
        crash::point(crash::INSERT_WRITTEN);
        self.link(key, at);
        crash::point(crash::INSERT_LINKED);
        self.stats.inserted += 1;
        self.account(at, key, state.len(), 1);
        Ok(())
    }

    /// Links the record at `at` at the head of its bucket's chain.
    pub(super) fn link(&self, key: u64, at: usize) {
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
    pub(super) fn unlink(&mut self, at: usize) -> bool {
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
    /// how many. Walks every bucket's chain (O(buckets + records); used by
    /// resync, flush and release, never by a read): what a reader can reach
    /// is exactly what the chains link, so nothing reachable is missed,
    /// even past a damaged record that would stop a walk of its segment.
    pub fn remove_where(&mut self, pred: impl Fn(&RecordInfo) -> bool) -> usize {
        let mut doomed = Vec::new();
        for bucket in 0..self.g.buckets {
            let holder = (self.g.bucket_word + bucket) as usize;
            for (_, at) in self.walk(holder) {
                let h = self.header_at(at);
                if !h.unlinked() && pred(&info(h)) {
                    doomed.push(at);
                }
            }
        }
        let n = doomed.len();
        for at in doomed {
            self.remove(at);
        }
        n
    }

    /// Calls `f(record word, header)` for every record of segment `seg`.
    pub(super) fn each_record(&self, seg: u64, mut f: impl FnMut(usize, Header)) {
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

    pub(super) fn ring_of(&self, at: usize) -> Ring {
        let seg = (at as u64 - self.g.data_word) / self.g.segment_words;
        match self.w()[self.g.segment_word(seg) + segment::META].load(Ordering::Relaxed) & 0xff {
            1 => Ring::Small,
            2 => Ring::Main,
            _ => Ring::Free,
        }
    }

    pub(super) fn count_in(&mut self, ring: Ring, n: i64) {
        let c = match ring {
            Ring::Small => &mut self.small_entries,
            Ring::Main => &mut self.main_entries,
            Ring::Free => return,
        };
        *c = c.saturating_add_signed(n);
    }
}

pub(super) fn info(h: Header) -> RecordInfo {
    RecordInfo {
        slot: layout::key_slot(h.key),
        generation: layout::key_generation(h.key),
        oid: layout::key_oid(h.key),
        serial: h.serial,
        end: h.end,
    }
}
