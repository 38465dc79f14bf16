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
    /// After a reboot (the header's boot id is not this boot's, see
    /// [`crate::arena::boot`]) the file may be torn: a horizon can have
    /// reached the disk while a closing it covers did not. Then every slot's
    /// horizon is cleared (its log restarts empty, as for a new database),
    /// and [`ArenaWriter::keep_closed_after_reboot`] rebuilds the index from
    /// closed records whose CRC verifies, before the file goes live: no open
    /// revision survives and nothing is served unverified. O(file) instead
    /// of O(segments).
    ///
    /// # Errors
    /// A [`LayoutError`] if the header is not a valid header of this layout version for
    /// a file of this length.
    pub fn recover(memory: Arc<Memory>, incarnation: u64) -> Result<(Self, Recovered), LayoutError> {
        let g = Geometry::read(memory.words(), memory.len_bytes())?;
        let w = memory.words();
        w[header::LIVE].store(0, Ordering::Release);
        let stored_boot = [header::BOOT_ID, header::BOOT_ID + 1].map(|i| w[i].load(Ordering::Relaxed));
        let rebooted = crate::arena::boot::rebooted_since(stored_boot);
        let mut writer = Self::empty(memory.clone(), g, incarnation);
        let mut report = Recovered::default();
        // Slots whose CRC fails are freed; the others are kept, unleased:
        // a new key may take them while no client claims them.
        (report.databases, report.damaged_databases) = writer.slots.recover(w);
        if rebooted {
            let kept: Vec<Slot> = writer
                .slots
                .indexes()
                .filter_map(|i| writer.slots.current(w, i))
                .collect();
            for slot in kept {
                writer.slots.publish_horizon(w, slot, 0);
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
                if h.end == OPEN {
                    let top = &mut self.recovered_open[layout::key_slot(h.key) as usize];
                    top.insert((h.serial, layout::key_oid(h.key)));
                    if top.len() > RECOVERED_OPEN {
                        top.pop_first();
                    }
                }
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
