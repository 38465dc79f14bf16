//! A revision record in a run of `AtomicU64` words, validated by a sequence
//! word (a seqlock) and a CRC-32 of its state.
//!
//! Layout, in 64-bit words (host byte order):
//!
//! | word | content |
//! |---|---|
//! | 0 | sequence: even when stable, odd while being written; +2 per write, never reset (no ABA); 0 = never written |
//! | 1 | oid |
//! | 2 | serial |
//! | 3 | end (`u64::MAX` while the revision is open) |
//! | 4 | state length in bytes (low 32 bits; `u32::MAX` = cleared), CRC-32 of oid, serial and state (high 32 bits) |
//! | 5.. | the state, 8 bytes per word, the last word zero-padded |
//!
//! One writer (the sidecar) writes records; any number of readers (other
//! processes, through a read-only mapping) copy them, never taking a lock a
//! crashed reader could leave held. The writer makes the sequence odd, then
//! (after a release fence) writes the words, then stores the next even
//! sequence with release ordering. A reader loads the sequence (acquire),
//! copies the words, issues an acquire fence and loads the sequence again:
//! a copy is accepted only if both loads saw the same even value and the
//! CRC-32 of oid, serial and state matches (H.-J. Boehm, "Can seqlocks get along with
//! programming language memory models?", MSPC 2012). Anything else is a miss.
//! `loom-tests/tests/record.rs` model-checks a writer reusing a record while
//! a reader copies it.

use crate::sync::{fence, AtomicU64, Ordering};

/// Words before the state.
pub const HEADER_WORDS: usize = 5;

/// `end` of an open revision.
const OPEN: u64 = u64::MAX;

/// Length field of a cleared record.
const CLEARED: u64 = 0xffff_ffff;

/// CRC-32 of what a record's validity rests on: oid, serial and state.
fn checksum(oid: u64, serial: u64, state: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&oid.to_le_bytes());
    h.update(&serial.to_le_bytes());
    h.update(state);
    h.finalize()
}

/// The words a record of `len` state bytes occupies.
pub fn words_for(len: usize) -> usize {
    HEADER_WORDS + len.div_ceil(8)
}

/// Oid, serial and end of a record, as validated by a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Oid.
    pub oid: u64,
    /// Tid that wrote the revision.
    pub serial: u64,
    /// End of the revision's validity, `None` while open.
    pub end: Option<u64>,
}

/// A whole record read back: its header and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Oid, serial, end.
    pub header: RecordHeader,
    /// The state's bytes.
    pub state: Vec<u8>,
}

/// A run of words holding one record (see the module documentation).
pub struct RecordWords<'a> {
    words: &'a [AtomicU64],
}

impl<'a> RecordWords<'a> {
    /// The record held by `words`; `None` if `words` is shorter than a header.
    pub fn new(words: &'a [AtomicU64]) -> Option<Self> {
        (words.len() >= HEADER_WORDS).then_some(RecordWords { words })
    }

    /// Bytes of state this run of words can hold.
    pub fn capacity(&self) -> usize {
        (self.words.len() - HEADER_WORDS) * 8
    }

    /// Writes a record. Only one writer may write a given run of words at a
    /// time (the sidecar is the only writer). Returns `false`, writing
    /// nothing, if the state does not fit or is 4 GiB or more.
    pub fn write(&self, oid: u64, serial: u64, end: Option<u64>, state: &[u8]) -> bool {
        if state.len() > self.capacity() {
            return false;
        }
        let Ok(len) = u32::try_from(state.len()) else {
            return false;
        };
        let crc = checksum(oid, serial, state);
        self.under_write(|w| {
            w[1].store(oid, Ordering::Relaxed);
            w[2].store(serial, Ordering::Relaxed);
            w[3].store(end.unwrap_or(OPEN), Ordering::Relaxed);
            w[4].store(u64::from(len) | (u64::from(crc) << 32), Ordering::Relaxed);
            for (i, chunk) in state.chunks(8).enumerate() {
                let mut b = [0u8; 8];
                b[..chunk.len()].copy_from_slice(chunk);
                w[HEADER_WORDS + i].store(u64::from_ne_bytes(b), Ordering::Relaxed);
            }
        });
        true
    }

    /// Closes the record's revision at `end` (an invalidation), under the
    /// same protocol as a write.
    pub fn set_end(&self, end: u64) {
        self.under_write(|w| w[3].store(end, Ordering::Relaxed));
    }

    /// Marks the record as holding nothing (its space is being reused):
    /// readers see a miss from now on.
    pub fn clear(&self) {
        self.under_write(|w| w[4].store(CLEARED, Ordering::Relaxed));
    }

    fn under_write(&self, f: impl FnOnce(&[AtomicU64])) {
        let seq = self.words[0].load(Ordering::Relaxed);
        // Odd: readers that started before this write will not accept it.
        self.words[0].store(seq | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        f(self.words);
        self.words[0].store((seq | 1).wrapping_add(1), Ordering::Release);
    }

    /// Copies the record. `None` if it was never written, is cleared, is
    /// being written, changed during the copy, or fails its CRC: a miss.
    pub fn read(&self) -> Option<Record> {
        let w = self.words;
        let seq = w[0].load(Ordering::Acquire);
        if seq == 0 || seq & 1 == 1 {
            return None;
        }
        let oid = w[1].load(Ordering::Relaxed);
        let serial = w[2].load(Ordering::Relaxed);
        let end = w[3].load(Ordering::Relaxed);
        let lencrc = w[4].load(Ordering::Relaxed);
        let len = (lencrc & 0xffff_ffff) as usize;
        // Also a cleared record: CLEARED is more than any capacity.
        if len > self.capacity() {
            return None;
        }
        let mut state = Vec::with_capacity(len);
        for word in &w[HEADER_WORDS..HEADER_WORDS + len.div_ceil(8)] {
            state.extend_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes());
        }
        state.truncate(len);
        fence(Ordering::Acquire);
        if w[0].load(Ordering::Relaxed) != seq {
            return None;
        }
        if checksum(oid, serial, &state) != (lencrc >> 32) as u32 {
            return None;
        }
        let end = (end != OPEN).then_some(end);
        Some(Record {
            header: RecordHeader { oid, serial, end },
            state,
        })
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn words(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn a_record_reads_back_whole() {
        let w = words(words_for(13));
        let r = RecordWords::new(&w).unwrap();
        assert_eq!(r.read(), None, "never written");
        assert!(r.write(7, 100, None, b"thirteen byte"));
        let got = r.read().unwrap();
        assert_eq!(
            got.header,
            RecordHeader {
                oid: 7,
                serial: 100,
                end: None
            }
        );
        assert_eq!(got.state, b"thirteen byte");
        r.set_end(120);
        assert_eq!(r.read().unwrap().header.end, Some(120));
        let seq = w[0].load(Ordering::Relaxed);
        r.clear();
        assert_eq!(r.read(), None);
        assert!(w[0].load(Ordering::Relaxed) > seq, "the sequence only grows");
        assert!(r.write(8, 101, None, b"again"));
        assert_eq!(r.read().unwrap().state, b"again");
    }

    #[test]
    fn a_state_that_does_not_fit_is_not_written() {
        let w = words(words_for(8));
        let r = RecordWords::new(&w).unwrap();
        assert!(!r.write(1, 1, None, &[0; 9]));
        assert_eq!(r.read(), None);
        assert!(RecordWords::new(&w[..HEADER_WORDS - 1]).is_none());
    }

    #[test]
    fn a_flipped_bit_or_a_torn_length_is_a_miss() {
        let w = words(words_for(16));
        let r = RecordWords::new(&w).unwrap();
        r.write(1, 2, Some(3), b"sixteen bytes!!!");
        let word = &w[HEADER_WORDS + 1];
        word.store(word.load(Ordering::Relaxed) ^ 0x10, Ordering::Relaxed);
        assert_eq!(r.read(), None, "CRC mismatch");
        r.write(1, 2, Some(3), b"sixteen bytes!!!");
        w[4].store(w[4].load(Ordering::Relaxed) | 0xffff, Ordering::Relaxed);
        assert_eq!(r.read(), None, "length past the record");
        r.write(1, 2, Some(3), b"sixteen bytes!!!");
        w[2].store(99, Ordering::Relaxed);
        assert_eq!(r.read(), None, "serial from another record");
        r.write(1, 2, Some(3), b"sixteen bytes!!!");
        w[0].store(w[0].load(Ordering::Relaxed) | 1, Ordering::Relaxed);
        assert_eq!(r.read(), None, "odd sequence: being written");
    }

    /// Real threads: a writer reuses one record over and over while readers
    /// copy it; every accepted copy is one of the records written, whole.
    #[test]
    fn readers_never_accept_a_torn_record() {
        use std::sync::atomic::AtomicBool;
        let w: std::sync::Arc<Vec<AtomicU64>> = std::sync::Arc::new(words(words_for(64)));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let state_of = |n: u64| -> Vec<u8> { (0..(n % 64) as u8).map(|b| b ^ n as u8).collect() };
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (w, stop) = (w.clone(), stop.clone());
                std::thread::spawn(move || {
                    let r = RecordWords::new(&w).unwrap();
                    let (mut seen, mut missed) = (0u64, 0u64);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        match r.read() {
                            Some(rec) => {
                                let n = rec.header.oid;
                                assert_eq!(rec.header.serial, n * 3, "torn header");
                                assert_eq!(rec.state, state_of(n), "torn state");
                                seen += 1;
                            }
                            None => missed += 1,
                        }
                    }
                    (seen, missed)
                })
            })
            .collect();
        let r = RecordWords::new(&w).unwrap();
        for n in 1..200_000u64 {
            r.write(n, n * 3, None, &state_of(n));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in readers {
            let (seen, _missed) = t.join().unwrap();
            assert!(seen > 0);
        }
    }
}
