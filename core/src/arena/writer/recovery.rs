//! Re-attaching an arena file a previous sidecar left, and verifying its
//! records segment by segment while the arena serves.

use super::*;

impl ArenaWriter {
    /// Re-attaches an arena file a previous sidecar left (a restart, also
    /// after `kill -9`): checks the header, keeps the database slots whose
    /// CRC matches (a damaged slot is freed, its revisions unreachable) and
    /// rebuilds the rings from the segments' order words: O(segments), no
    /// record is read. Records are verified (CRC, database, link) and
    /// counted afterwards, segment by segment, by
    /// [`ArenaWriter::verify_segment`], while the arena serves (a reader
    /// validates every record it reads anyway).
    ///
    /// # Errors
    /// A [`LayoutError`] if the header is not a valid header of this layout version for
    /// a file of this length.
    pub fn recover(memory: Arc<Memory>, incarnation: u64) -> Result<(Self, Recovered), LayoutError> {
        let g = Geometry::read(memory.words(), memory.len_bytes())?;
        let w = memory.words();
        w[header::LIVE].store(0, Ordering::Release);
        let mut writer = Self::empty(memory.clone(), g, incarnation);
        let mut report = Recovered::default();
        // Slots whose CRC fails are freed; the others are kept, unleased:
        // a new key may take them while no client claims them.
        (report.databases, report.damaged_databases) = writer.slots.recover(w);
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
        w[header::INCARNATION].store(incarnation, Ordering::Relaxed);
        w[header::LIVE].store(1, Ordering::Release);
        Ok((writer, report))
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
}
